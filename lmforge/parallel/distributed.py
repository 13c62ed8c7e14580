"""Process groups, the device mesh and cross-rank reductions.

`launch_env()` is the one reader of torchrun's rank variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE): the world size is read there, once, and passed down (`init_distributed`, the
dry run's default world). `init_distributed(pcfg, device)` sets up the groups for `cfg.parallel`
(MASTER_ADDR / MASTER_PORT are torch's rendezvous). With WORLD_SIZE unset or 1 and
`parallel.strategy: single` it creates no process group at all, so one-process training, tests and
notebooks need no launcher. Any other strategy in one process (for example FSDP2 at world size 1,
to measure its overheads) gets a one-rank group on a free loopback port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError
from lmforge.parallel.mesh import MeshShape, resolve_mesh_shape


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this node (they share its RAM on CPU)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    shape: MeshShape = field(default_factory=MeshShape)
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh when a group exists
    backend: str | None = None  # None: no process group
    dp_group: object | None = None  # process group over data-parallel ranks (same pp and tp rank)
    pp_group: object | None = None  # process group over the pipeline stages (same dp and tp rank)
    # The dry run simulating a GPU on CPU tensors: dtypes are chosen as on a CUDA device (FSDP2's
    # param/reduce dtypes, the pipeline's activation dtype) while tensors stay on `device`.
    gpu_rules: bool = False

    @property
    def precision_device(self) -> torch.device:
        """The device whose precision rules apply: `device`, or CUDA under `gpu_rules`."""
        return torch.device("cuda") if self.gpu_rules else self.device

    @property
    def dp_size(self) -> int:
        return self.shape.dp_size

    @property
    def dp_rank(self) -> int:
        # Mesh layout is (pp, dp_replicate, dp_shard, tp) in row-major order, so ranks that share
        # a tensor-parallel group are consecutive and the dp index is (rank // tp) % dp_size.
        return (self.rank // self.shape.tp) % self.shape.dp_size

    @property
    def pp_size(self) -> int:
        return self.shape.pp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.shape.dp_size * self.shape.tp)

    @property
    def tp_size(self) -> int:
        return self.shape.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.shape.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    # Reductions run over the data-parallel ranks: tensor-parallel (and pipeline) ranks of one dp
    # group hold the same batch, so their token counts are already equal and must not be counted
    # twice. (A pipeline's loss lives on its last stage; pipeline.py shares it along the stages.)
    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed or self.dp_size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=op, group=self.dp_group)
        return out

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed or self.dp_size == 1:
            return tensor
        return self._all_reduce(tensor, dist.ReduceOp.SUM) / self.dp_size

    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        # Over every rank: max is idempotent on replicated values, and a flag raised on any one
        # rank (a stop signal, a non-finite loss) must reach all of them, tensor-parallel peers too.
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def barrier(self) -> None:
        if self.backend is not None and self.world_size > 1:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def shutdown(self) -> None:
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None
        self.mesh = None
        self.dp_group = None
        self.pp_group = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun"
        ) from None


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, as the launcher (torchrun) gave it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def launch_env() -> LaunchEnv:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (one process when unset): the
    one place lmforge reads them."""
    return LaunchEnv(
        _env_int("RANK", 0),
        _env_int("WORLD_SIZE", 1),
        _env_int("LOCAL_RANK", 0),
        _env_int("LOCAL_WORLD_SIZE", 1),
    )


def select_device(want: str, local_rank: int) -> torch.device:
    """`train.device` (auto, cuda or cpu) for the process with this LOCAL_RANK."""
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device: cuda was requested but no CUDA device is visible; use train.device=cpu"
        )
    if want != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "lower --nproc-per-node"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_safe_store(world_size: int):
    """Under torchrun's agent store, the workers of a restarted attempt can read the addresses the
    previous (dead) attempt published there and fail to connect (seen with gloo on torch 2.13).
    Namespacing every key by the restart count makes each attempt rendezvous on its own keys."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    tcp = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(minutes=30),
    )
    return dist.PrefixStore(f"lmforge/attempt_{attempt}", tcp)


def _dp_group(shape: MeshShape, rank: int, world_size: int):
    """The group of ranks with the same pipeline stage and tensor-parallel index (every rank must
    create every group, in the same order)."""
    if shape.tp == 1 and shape.pp == 1:
        return dist.group.WORLD
    per_stage = shape.dp_size * shape.tp
    mine = None
    for p in range(shape.pp):
        for t in range(shape.tp):
            ranks = [p * per_stage + d * shape.tp + t for d in range(shape.dp_size)]
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                mine = group
    return mine


def init_distributed(pcfg, device: str = "auto", env: LaunchEnv | None = None) -> ParallelContext:
    """Set up the process group and mesh for `pcfg` (cfg.parallel) on `device` (cfg.train.device);
    `env` is where this process stands in the job (default: torchrun's, `launch_env()`)."""
    env = env or launch_env()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    shape = resolve_mesh_shape(pcfg, world_size)
    dev = select_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    place = dict(
        rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=env.local_world_size
    )
    if shape.strategy == "single" and world_size == 1:
        return ParallelContext(**place, device=dev, shape=shape)

    backend = pcfg.backend
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("parallel.backend: nccl needs CUDA devices; use parallel.backend=gloo on CPU")
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        kwargs = {
            "backend": backend,
            "rank": rank,
            "world_size": world_size,
            "timeout": timedelta(minutes=30),
        }
        if backend == "nccl":
            kwargs["device_id"] = dev  # eager NCCL init binds each rank to its own GPU
        store = _restart_safe_store(world_size)
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(**kwargs)

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        dev.type,
        (shape.pp, shape.dp_replicate, shape.dp_shard, shape.tp),
        mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
    )
    pp_group = mesh["pp"].get_group() if shape.pp > 1 else None
    return ParallelContext(
        **place,
        device=dev,
        shape=shape,
        mesh=mesh,
        backend=backend,
        dp_group=_dp_group(shape, rank, world_size),
        pp_group=pp_group,
    )
