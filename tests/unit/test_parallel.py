"""One-process parts of lmforge.parallel: mesh resolution and its errors, the single-process
context, the init rule, activation checkpointing, grad clipping, grad_sync and unwrap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parity import fixed_batches, run_scenario, tiny_tree

from lmforge.config import config_from_dict
from lmforge.errors import ConfigError
from lmforge.model import Transformer
from lmforge.parallel import (
    build_parallel_model,
    clip_grad_norm,
    grad_sync,
    init_distributed,
    resolve_mesh_shape,
    unwrap_model,
)
from lmforge.parallel.tensor_parallel import check_tp_divisibility

TINY = tiny_tree()


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _build(cfg):
    """The trainer's build of `cfg`'s model in this process."""
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    return build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)


def _cfg(**parallel):
    # A global batch of 960 divides by every data-parallel size used here, so the config itself
    # validates and the mesh checks are what is tested.
    return config_from_dict(
        {**TINY, "train": {"device": "cpu", "global_batch_size": 960}, "parallel": parallel}
    )


@pytest.mark.parametrize(
    "parallel, world, expected",
    [
        ({"strategy": "single"}, 1, (1, 1, 1)),
        ({"strategy": "ddp"}, 4, (4, 1, 1)),
        ({"strategy": "fsdp"}, 4, (1, 4, 1)),
        ({"strategy": "fsdp"}, 1, (1, 1, 1)),
        ({"strategy": "hsdp", "dp_replicate": 2}, 8, (2, 4, 1)),
        ({"strategy": "hsdp", "dp_replicate": -1, "dp_shard": 2}, 8, (4, 2, 1)),
        ({"strategy": "fsdp+tp", "tp": 2}, 8, (1, 4, 2)),
        ({"strategy": "fsdp+tp", "tp": 2, "dp_shard": 1}, 2, (1, 1, 2)),
        ({"strategy": "fsdp+tp", "tp": 8, "dp_replicate": 2, "dp_shard": -1}, 64, (2, 4, 8)),
    ],
)
def test_mesh_shapes(parallel, world, expected):
    shape = resolve_mesh_shape(_cfg(**parallel).parallel, world)
    assert (shape.dp_replicate, shape.dp_shard, shape.tp) == expected
    assert shape.world_size == world


@pytest.mark.parametrize(
    "parallel, world, words",
    [
        ({"strategy": "single"}, 2, ["parallel.strategy", "WORLD_SIZE is 2"]),
        (
            {"strategy": "hsdp", "dp_replicate": 3, "dp_shard": 2},
            4,
            ["parallel.dp_replicate=3", "needs 6 GPUs", "WORLD_SIZE is 4"],
        ),
        ({"strategy": "fsdp", "tp": 2}, 4, ["parallel.tp", "fsdp+tp"]),
        ({"strategy": "fsdp+tp", "tp": 4}, 6, ["parallel.tp=4", "WORLD_SIZE 6"]),
        (
            {"strategy": "hsdp", "dp_replicate": -1, "dp_shard": -1},
            4,
            ["parallel.dp_replicate and parallel.dp_shard"],
        ),
        ({"strategy": "fsdp", "dp_shard": 2}, 4, ["parallel.dp_shard=2", "needs 2 GPUs", "WORLD_SIZE is 4"]),
        ({"strategy": "fsdp", "dp_replicate": 2}, 4, ["parallel.dp_replicate", "hsdp"]),
    ],
)
def test_mesh_errors_name_keys_and_world_size(parallel, world, words):
    with pytest.raises(ConfigError) as err:
        resolve_mesh_shape(_cfg(**parallel).parallel, world)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_tp_divisibility_errors():
    cfg = _cfg(strategy="fsdp+tp", tp=4)
    with pytest.raises(ConfigError, match=r"model.num_kv_heads: 2 is not divisible by parallel.tp 4"):
        check_tp_divisibility(cfg.model, cfg.data.seq_len, 4)
    check_tp_divisibility(cfg.model, cfg.data.seq_len, 2)  # 4 heads, 2 kv heads, vocab 256, seq 16 all divide by 2


def test_launch_env_is_read_once_and_passed_down(monkeypatch):
    from lmforge.parallel.distributed import LaunchEnv, launch_env

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert launch_env() == LaunchEnv(rank=1, world_size=3, local_rank=1, local_world_size=3)
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ConfigError, match="WORLD_SIZE='x' is not an integer"):
        launch_env()
    # A given place wins over the environment: the layout is checked against it, not WORLD_SIZE.
    with pytest.raises(ConfigError, match="parallel.strategy: single but WORLD_SIZE is 2"):
        init_distributed(_cfg().parallel, "cpu", LaunchEnv(world_size=2))
    ctx = init_distributed(_cfg().parallel, "cpu", LaunchEnv())
    assert (ctx.world_size, ctx.local_world_size, ctx.backend) == (1, 1, None)


def test_single_process_context(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed(_cfg().parallel, "cpu")
    assert (ctx.rank, ctx.world_size, ctx.dp_rank, ctx.dp_size, ctx.tp_size) == (0, 1, 0, 1, 1)
    assert ctx.is_main and ctx.mesh is None and ctx.backend is None
    assert ctx.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    t = torch.tensor([1.5, -2.0])
    for reduce in (ctx.reduce_mean, ctx.reduce_sum, ctx.reduce_max):
        assert torch.equal(reduce(t), t)
    ctx.barrier()
    ctx.shutdown()


def test_build_follows_the_init_rule():
    cfg = _cfg()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    built = _build(cfg)
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is untouched
    plain = Transformer(cfg.model)
    torch.manual_seed(cfg.run.seed)
    plain.init_weights()
    a, b = built.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(built.rope_cos, plain.rope_cos)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, every", [("full", 1), ("full", 2), ("selective", 1)])
def test_activation_checkpointing_keeps_names_loss_and_grads(mode, every):
    ids = fixed_batches(256, 4, 16, 1)[0]
    base = _build(_cfg())
    cfg = _cfg(activation_checkpoint=mode, ac_every=every)
    ac = _build(cfg)
    names = [n for n, _ in ac.named_parameters()]
    assert names == [n for n, _ in base.named_parameters()]
    applied = [getattr(b.forward, "checkpoint_mode", None) for b in ac.layers]
    assert applied == [mode if i % every == 0 else None for i in range(len(ac.layers))]
    loss0, g0 = _loss_and_grads(base, ids)
    loss1, g1 = _loss_and_grads(ac, ids)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-8)


def test_clip_grad_norm_measures_and_clips():
    model = _build(_cfg())
    _, grads = _loss_and_grads(model, fixed_batches(256, 2, 16, 1)[0])
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    norm = clip_grad_norm(model, 0.0)  # 0: measure only
    torch.testing.assert_close(norm, expected)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    limit = float(expected) / 4
    assert float(clip_grad_norm(model, limit)) == pytest.approx(float(expected), rel=1e-6)
    assert float(clip_grad_norm(model, 0.0)) == pytest.approx(limit, rel=1e-5)


def test_grad_sync_is_a_noop_for_a_plain_model_and_accumulates():
    model = _build(_cfg())
    ids = fixed_batches(256, 2, 16, 1)[0]
    _, once = _loss_and_grads(model, ids)
    with grad_sync(model, enabled=False):
        model(ids[:, :-1]).logits.sum().backward()
    assert any(not torch.equal(p.grad, once[n]) for n, p in model.named_parameters())


def test_unwrap_and_compile_in_place():
    cfg = _cfg(compile=True)
    model = _build(cfg)
    # Blocks are compiled in place (lazily, on first call), so names and the module tree stay.
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.layers)
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(model) is model


def test_fsdp_in_one_process_trains_like_single(monkeypatch):
    # strategy fsdp at world size 1 gets a one-rank gloo group (what a one-GPU FSDP2 benchmark uses).
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    torch.manual_seed(0)
    init = Transformer(_cfg().model).state_dict()
    single = run_scenario(TINY, {"steps": 4}, init)
    try:
        # cpu_offload is accepted and is a no-op on a CPU device (the shards already live there).
        fsdp = run_scenario(TINY, {"steps": 4, "parallel": {"strategy": "fsdp", "cpu_offload": True}}, init)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert fsdp == pytest.approx(single, rel=1e-6)


def test_cpu_shard_seeds_differ_across_shards_and_match_across_replicas():
    from lmforge.parallel.distributed import ParallelContext
    from lmforge.parallel.mesh import MeshShape
    from lmforge.parallel.sharding import init_seed as _init_seed

    shape = MeshShape("fsdp+tp", dp_replicate=2, dp_shard=2, tp=2)
    seeds = [
        _init_seed(7, ParallelContext(rank=r, world_size=8, shape=shape, backend="gloo")) for r in range(8)
    ]
    assert len(set(seeds[:4])) == 4  # the 4 (dp_shard, tp) shards of one replica draw differently
    assert seeds[:4] == seeds[4:]  # the second replica holds identical values
    single = ParallelContext()
    assert _init_seed(7, single) == 7  # unsharded: the plain rule


def test_cpu_offload_needs_fsdp():
    cfg = _cfg(strategy="single", cpu_offload=True)
    with pytest.raises(ConfigError, match="parallel.cpu_offload: offloading needs FSDP sharding"):
        _build(cfg)
