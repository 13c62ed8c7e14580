"""One rank of a training layout at full shape without the hardware: torch's `fake` process group,
`FakeTensorMode` (shapes and dtypes, no storage), `MemTracker` (bytes by category) and a dispatch
mode that records every collective with its process group and size.

`fake_rank(rank, world_size)` makes this process rank `rank` of a fake world: `init_distributed`
then builds the same mesh and groups as under torchrun, and every tensor created inside is a fake
tensor. `StepMeasure(ctx, model, optimizer, fake)` wraps the step(s) to measure; the same class
measures a real run on gloo (fake=False), which is how the tests hold the simulation to reality.

What the fake backend cannot see: the allocator (caching, fragmentation, rounding to 512-byte
blocks), NCCL's own buffers and the CUDA context, kernels' workspaces (cuBLAS, flash attention),
timing and overlap, and values (a data-dependent read such as the step's finiteness check gets a
neutral answer: True / 1). Collectives are counted as issued; none carries data.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from lmforge.errors import LmforgeError

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
# MemTracker's reference types -> the planner's categories. Buffers (RoPE tables) live with the
# parameters; "Other" is what track_external saw that is none of these (the step's batches).
_CATEGORY_OF = {
    "Parameter": "parameters",
    "Buffer": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "activations",
}


def require_fake_backend() -> None:
    """One line naming what this torch lacks (the dry run needs torch >= 2.6's tools)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401
        from torch.distributed._tools.mem_tracker import MemTracker  # noqa: F401
        from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401
    except ImportError as exc:
        raise LmforgeError(
            f"dry run: torch {torch.__version__} lacks {exc.name or 'the fake process group tools'}; "
            "install torch >= 2.6 for --dry-run / --simulate"
        ) from None


def _fake_to_empty(self: nn.Module, *, device, recurse: bool = True) -> nn.Module:
    """nn.Module.to_empty for fake tensors. torch's swaps each parameter with `swap_tensors`, which
    refuses tensors FakeTensorMode's converter holds weak references to; this assigns new
    Parameters instead (keeping shared ones shared). Sharded (DTensor) modules are already built
    that way by FSDP2/TP before materialisation and keep torch's path."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in self.parameters()):
        return _ORIG_TO_EMPTY(self, device=device, recurse=recurse)
    memo: dict[int, nn.Parameter] = {}
    for mod in self.modules() if recurse else [self]:
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
                mod._parameters[name] = memo[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = torch.empty_like(b, device=device)
    return self


_ORIG_TO_EMPTY = nn.Module.to_empty


@contextlib.contextmanager
def fake_rank(rank: int, world_size: int):
    """Inside: this process is rank `rank` of `world_size` on the fake backend (torchrun's
    environment variables say so for `init_distributed`, which then builds the mesh and groups).
    Build the model and run the step inside `fake_tensors()`, entered after the mesh exists."""
    require_fake_backend()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise LmforgeError("dry run: a process group already exists in this process; run it alone")
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fake_tensors():
    """FakeTensorMode, with `nn.Module.to_empty` able to materialise fake parameters and device
    meshes built with real rank tables (FSDP2 over a TP mesh concatenates meshes while sharding,
    and a mesh finds its coordinates with `nonzero`, which fake tensors cannot answer)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    mesh_init = DeviceMesh.__init__

    def real_mesh_init(self, *args, **kwargs):
        with unset_fake_temporarily():
            mesh_init(self, *args, **kwargs)

    nn.Module.to_empty = _fake_to_empty
    DeviceMesh.__init__ = real_mesh_init
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, _unmeasured_sharding_propagation():
            yield mode
    finally:
        nn.Module.to_empty = _ORIG_TO_EMPTY
        DeviceMesh.__init__ = mesh_init


_PROPAGATING = [0]  # > 0 while DTensor derives an op's output shape (no real memory)


@contextlib.contextmanager
def _unmeasured_sharding_propagation():
    """DTensor derives each new op's output shape by running it on global-shape fake tensors, in
    the active FakeTensorMode when there is one. In a real run that is a FakeTensorMode of its
    own, which MemTracker skips; in the dry run it is ours, and the tracker would count every
    gradient and optimizer tensor at its unsharded size (the gradient norm's foreach op alone
    added the whole stage's gradients x tp). Ops inside it are marked to be skipped."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    propagate = ShardingPropagator._propagate_tensor_meta_non_cached

    def marked(self, *args, **kwargs):
        _PROPAGATING[0] += 1
        try:
            return propagate(self, *args, **kwargs)
        finally:
            _PROPAGATING[0] -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = marked
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = propagate


def _memtracker_class():
    import weakref

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
    from torch.distributed._tools.mod_tracker import ModTracker
    from torch.utils._pytree import tree_flatten

    device_query = torch.ops.prim.device.default

    class LeafSafeModTracker(ModTracker):
        """ModTracker whose end-of-backward hook skips leaf inputs (a pipeline stage's received
        activations): torch refuses a multi-grad hook on a leaf while zero-bubble schedules run
        their input-gradient pass as autograd.grad. A module with only leaf inputs leaves the
        backward at the end of the backward pass instead, as one with no tensor inputs does."""

        def _fw_pre_hook(self, mod, input):
            args, _ = tree_flatten(input)
            if any(isinstance(a, torch.Tensor) and a.requires_grad and a.grad_fn is None for a in args):
                input = tuple(a for a in args if not (isinstance(a, torch.Tensor) and a.grad_fn is None))
            return super()._fw_pre_hook(mod, input)

    class StepMemTracker(MemTracker):
        """MemTracker keeping only what the dry run reports: the global peak and its breakdown by
        category, over a whole training step (a module may run again: the next micro batch, the
        next step). torch's tracker also keeps a snapshot per module call and walks every module
        on every op; at 70B shapes (tens of thousands of ops per micro batch) that bookkeeping was
        two thirds of the run. What decides the categories is kept as torch has it: parameters,
        buffers and gradient hooks tracked when a module is first seen, the optimizer hooks, the
        recomputation (AC) region, and forward vs backward."""

        def __init__(self):
            super().__init__()
            self._mod_tracker = LeafSafeModTracker()

        def _pre_fw_hook(self, module, inputs):
            if module not in self.memory_tracking:
                self._track_module_params_and_buffers(module, install_grad_hooks=True)
                self.memory_tracking[module] = True
            elif self._mod_tracker.is_bw and self._ac_mod is None:  # recomputation starts
                self._ac_mod = weakref.ref(module)
                self._in_ac = True

        def _post_fw_hook(self, module, inputs, outputs):
            if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
                self._ac_mod = None
                self._in_ac = False

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is device_query or _PROPAGATING[0]:  # `.device`: half of all calls; shapes only
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return StepMemTracker


def _group_name(arg) -> str | None:
    if isinstance(arg, str):
        return arg
    if isinstance(arg, dist.ProcessGroup):
        return arg.group_name
    try:  # c10d ops carry the group as a TorchScript object
        return dist.ProcessGroup.unbox(arg).group_name
    except Exception:  # noqa: BLE001 - not a process group
        return None


def _tensor_bytes(args) -> int:
    """The op's payload: its largest tensor argument (a list counts as one, summed), i.e. the
    gathered size of an all-gather, the unscattered one of a reduce-scatter, the message of a send."""
    best = 0
    for a in args:
        if isinstance(a, torch.Tensor):
            best = max(best, a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a):
            best = max(best, sum(t.numel() * t.element_size() for t in a))
    return best


def group_labels(ctx, extra: dict | None = None) -> dict[str, str]:
    """Process-group name -> the mesh dimension(s) it spans ("tp", "dp_shard", "pp", ...)."""
    labels: dict[str, str] = {}
    if ctx.mesh is not None:
        for dim, size in zip(ctx.mesh.mesh_dim_names, ctx.mesh.shape):
            if size > 1:
                labels[ctx.mesh[dim].get_group().group_name] = dim
    if ctx.dp_group is not None and ctx.dp_group is not dist.group.WORLD:
        labels.setdefault(ctx.dp_group.group_name, "dp")
    if dist.is_initialized():
        labels.setdefault(dist.group.WORLD.group_name, "world")
    labels.update(extra or {})
    return labels


def _complete_now(out, functional: bool) -> None:
    """Wait for a collective just issued: its work handles (c10d ops) or its output tensors
    (functional collectives). The fake backend completes every collective when it is issued; a
    real gloo run measured against it must too, or the collective's buffers are released at a
    moment that varies from run to run (seen as +3-6% activations on a TP rank). A gloo worker
    thread keeps its work, and with it the tensors, a little past completion; the short sleep
    lets it drop them before the step goes on."""
    work_type = torch._C._distributed_c10d.Work
    for leaf in tree_leaves(out):
        if isinstance(leaf, torch.ScriptObject):  # c10d ops return their work
            work_type.unbox(leaf).wait()
        elif functional and isinstance(leaf, torch.Tensor):  # functional ones register outputs
            torch.ops._c10d_functional.wait_tensor(leaf)
    time.sleep(0.005)


class _CollectiveRecorder:
    """A TorchDispatchMode (built lazily) recording each collective and point-to-point op as
    (kind, group label, bytes). Under fake tensors it also answers what depends on values: a scalar
    read (the step's finiteness check: True, a count: 1) and `nonzero` (every element). In a real
    run it completes each collective (not point-to-point op) when issued, as the fake backend does."""

    def __new__(cls, labels: dict[str, str], fake: bool):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.debug import _comm_mode
        from torch.utils._python_dispatch import TorchDispatchMode

        kinds = set(_comm_mode.c10d_collective_ops) | set(_comm_mode.NATIVE_TO_PY_MAPPING)
        collectives = frozenset(kinds)
        functional = frozenset(_comm_mode.NATIVE_TO_PY_MAPPING)
        kinds |= {torch.ops.c10d.send, torch.ops.c10d.recv_}
        local_scalar = torch.ops.aten._local_scalar_dense.default
        device_query = torch.ops.prim.device.default
        nonzero = torch.ops.aten.nonzero.default

        class Recorder(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops: list[tuple[str, str, int]] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is device_query:
                    return func(*args, **(kwargs or {}))
                if any(t is DTensor for t in types):
                    return NotImplemented  # let DTensor lower itself to the collectives it issues
                if fake and func is local_scalar:
                    t = args[0]
                    return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
                if fake and func is nonzero:  # every position holds a target (packed batches)
                    t = args[0]
                    return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
                out = func(*args, **(kwargs or {}))
                packet = func._overloadpacket
                if packet in kinds:
                    names = [g for g in map(_group_name, args) if g is not None]
                    label = next((labels[g] for g in names if g in labels), "other")
                    kind = str(packet).split(".")[-1].strip("_")
                    self.ops.append((kind, label, _tensor_bytes(args)))
                    if not fake and packet in collectives:
                        _complete_now(out, packet in functional)
                return out

        return Recorder()


def summarize_collectives(ops) -> dict[str, dict[str, dict[str, int]]]:
    """{mesh dim: {kind: {"count", "bytes"}}}."""
    out: dict = defaultdict(lambda: defaultdict(lambda: {"count": 0, "bytes": 0}))
    for kind, label, nbytes in ops:
        out[label][kind]["count"] += 1
        out[label][kind]["bytes"] += nbytes
    return {k: dict(v) for k, v in sorted(out.items())}


class StepMeasure:
    """`with StepMeasure(ctx, model, optimizer, fake) as m: <the step(s)>`; then `m.result()`:
    {"peak_bytes", "categories": {...} at the peak, "collectives": {...}}."""

    def __init__(self, ctx, model: nn.Module, optimizer, fake: bool, extra_groups: dict | None = None):
        self.ctx, self.device = ctx, ctx.device
        self.tracker = _memtracker_class()()
        self.tracker.track_external(model, optimizer)
        for stage in getattr(model, "stages", ()):  # pipeline stages' buffers sit outside the tree
            self.tracker.track_external(stage)
        self.recorder = _CollectiveRecorder(group_labels(ctx, extra_groups), fake)
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        self._stack.enter_context(self.tracker)
        self._stack.enter_context(self.recorder)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def result(self) -> dict:
        snap = self.tracker._peak_mem_snap.get(self.device)
        if snap is None:  # torch.device("cpu") vs device(type="cpu", index=None) keys
            snap = next((v for d, v in self.tracker._peak_mem_snap.items() if d.type == self.device.type), {})
        cats = dict.fromkeys(CATEGORIES, 0)
        for ref, nbytes in snap.items():
            name = getattr(ref, "value", ref)
            if name in _CATEGORY_OF:
                cats[_CATEGORY_OF[name]] += int(nbytes)
        return {
            "peak_bytes": sum(cats.values()),
            "categories": cats,
            "collectives": summarize_collectives(self.recorder.ops),
        }
