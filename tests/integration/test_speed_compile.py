"""torch.compile is real: the block and the whole model trace as single graphs (fullgraph), and
compiled training steps on CPU inductor give the eager losses, whole-model with the fused loss in
one process and per block under FSDP2 with activation checkpointing on 2 gloo processes.

CPU inductor compiles take tens of seconds on 2 cores, so these runs are tiny and few."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
from jobs import run_reaped

from lmforge.config import ModelConfig, config_from_dict
from lmforge.loss import LanguageModelLoss, set_loss_compile
from lmforge.model import Transformer
from lmforge.model.attention import document_mask
from lmforge.parallel.compile import compile_seconds

# One layer: the block graph is what matters, and each extra layer is more inductor time.
TINY = dict(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
            max_position_embeddings=32, qk_norm=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    # In-process inductor compile: a pool of compile workers costs more than it saves here.
    with torch._inductor.config.patch(compile_threads=1):
        yield
    set_loss_compile(False)
    torch._dynamo.reset()


@pytest.mark.parametrize("moe", [False, True])
def test_block_and_model_trace_without_graph_breaks(moe):
    cfg = dict(TINY)
    if moe:
        cfg["moe"] = {"num_experts": 4, "top_k": 2, "num_shared_experts": 1}
    model = Transformer(ModelConfig(**cfg))
    ids = torch.randint(0, 128, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    block = model.layers[0]
    x = torch.randn(2, 12, 32, requires_grad=True)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    compiled_block = torch.compile(block, fullgraph=True, backend="eager")
    for mask in (None, document_mask(doc_ids, flex=False)):
        out, _ = compiled_block(x, cos, sin, attn_mask=mask)  # fullgraph: a break raises
        out.sum().backward()
    compiled_model = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled_model(ids, doc_ids=doc_ids, return_hidden=True)
    (out.hidden.sum() + out.aux_loss).backward()
    explain = torch._dynamo.explain(model)(ids)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def _steps(model, batches, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
    losses = []
    for batch in batches:
        ce, aux = LanguageModelLoss(True)(model, batch)
        n = (batch["labels"] != -100).sum()
        loss = ce / n + aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _batches(steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (steps, 4, 17), generator=g)
    return [{"input_ids": s[:, :-1], "labels": s[:, 1:]} for s in ids]


def test_whole_model_compiled_steps_match_eager_on_inductor():
    from lmforge.parallel import build_parallel_model, init_distributed

    tree = {"model": TINY, "data": {"seq_len": 16}, "train": {"device": "cpu"},
            "parallel": {"compile": True, "compile_mode": "model"}}
    cfg = config_from_dict(tree, "test")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    compiled = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    eager = Transformer(cfg.model)
    eager.load_state_dict(compiled.state_dict())  # in-place compile: the same names
    set_loss_compile(False)
    ref = _steps(eager, _batches())
    set_loss_compile(True)
    got = _steps(compiled, _batches())
    assert compile_seconds() > 0  # inductor really ran (no silent eager fallback)
    assert ref[0] > 4.0  # ~ln(128) at init
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_block_compile_under_fsdp2_and_ac_matches_eager(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={_free_port()}", __file__, str(out)]
    proc = run_reaped(cmd, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["eager"]) == 2 and result["eager"][0] > 4.0
    torch.testing.assert_close(torch.tensor(result["compiled"]), torch.tensor(result["eager"]),
                               rtol=1e-4, atol=0)


def _fsdp_worker(out_path: str) -> None:
    from lmforge.parallel import build_parallel_model, full_state_dict, init_distributed, load_full_state_dict

    losses = {}
    state = None
    for name, compile_ in (("eager", False), ("compiled", True)):
        tree = {"model": TINY, "data": {"seq_len": 16}, "train": {"device": "cpu"},
                "parallel": {"strategy": "fsdp", "activation_checkpoint": "full",
                             "compile": compile_, "compile_mode": "blocks", "backend": "gloo"}}
        cfg = config_from_dict(tree, "test")
        ctx = init_distributed(cfg.parallel, cfg.train.device)
        model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
        if state is None:
            state = {k: v.clone() for k, v in full_state_dict(model, cpu_offload=False).items()}
        else:
            load_full_state_dict(model, state)
        rank_batches = [{k: v[ctx.rank * 2 : ctx.rank * 2 + 2] for k, v in b.items()} for b in _batches(2)]
        losses[name] = _steps(model, rank_batches)
        torch.distributed.barrier()
    if ctx.rank == 0:
        with open(out_path, "w") as f:
            json.dump(losses, f)
    ctx.shutdown()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])
