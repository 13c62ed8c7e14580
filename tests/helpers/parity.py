"""A minimal data-parallel training loop used to check that every layout trains like one process.

It is deliberately independent of `lmforge.train`: fixed random batches, AdamW, no schedule. Each
step uses one global batch of `global_batch` sequences; data-parallel rank r takes rows
[r*b, (r+1)*b) and tensor-parallel ranks of one group take the same rows. The logged loss is the
mean over data-parallel ranks, which equals the one-process loss of the whole global batch.

Run as `python -m torch.distributed.run --nproc-per-node N tests/helpers/parity.py SPEC.json`,
where SPEC.json lists scenarios (see `run_spec`); results are written as JSON by rank 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import config_from_dict
from lmforge.parallel.apply import build_parallel_model, clip_grad_norm, grad_sync, load_full_state_dict
from lmforge.parallel.distributed import init_distributed


def tiny_tree() -> dict:
    """The tiny CPU config every parity, launch and toy-job run shares (a fresh dict each call)."""
    return {
        "model": {
            "vocab_size": 256,
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 64,
        },
        "data": {"seq_len": 16},
        "train": {"device": "cpu", "global_batch_size": 8},
    }


def fixed_batches(vocab: int, global_batch: int, seq_len: int, steps: int, seed: int = 0) -> torch.Tensor:
    """[steps, global_batch, seq_len + 1] token ids, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, global_batch, seq_len + 1), generator=gen)


def make_optimizer(model, lr: float = 1e-2) -> torch.optim.Optimizer:
    # High lr so ten steps move the weights a lot and layout differences would show.
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)


def train_steps(model, opt, ctx, batches: torch.Tensor, start: int, stop: int, accum: int = 1) -> list[float]:
    """Steps start..stop-1 of `batches`; returns the global mean loss of each step."""
    losses = []
    for step in range(start, stop):
        rows = batches[step].shape[0] // ctx.dp_size
        local = batches[step][ctx.dp_rank * rows : (ctx.dp_rank + 1) * rows].to(ctx.device)
        micro = rows // accum
        total = torch.zeros((), device=ctx.device)
        for i in range(accum):
            chunk = local[i * micro : (i + 1) * micro]
            with grad_sync(model, enabled=i == accum - 1):
                logits = model(chunk[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
                (loss / accum).backward()
            total += loss.detach() / accum
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ctx.reduce_mean(total).item())
    return losses


def save_sharded(model, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_sharded(model, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run_scenario(base: dict, sc: dict, init_state: dict | None) -> list[float]:
    """One layout: build, load the shared initial weights, train; optionally save or resume."""
    tree = json.loads(json.dumps(base))
    tree.setdefault("parallel", {}).update(sc.get("parallel", {}))
    tree.setdefault("model", {}).update(sc.get("model", {}))
    if sc.get("init"):
        from safetensors.torch import load_file

        init_state = load_file(sc["init"])
    cfg = config_from_dict(tree, "<parity>")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    if sc.get("reductions"):
        # [mean of dp_rank over dp, sum of 1 over dp, max of the global rank over all ranks]
        one = torch.ones((), device=ctx.device)
        return [
            ctx.reduce_mean(one * ctx.dp_rank).item(),
            ctx.reduce_sum(one).item(),
            ctx.reduce_max(one * ctx.rank).item(),
        ]
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    opt = make_optimizer(model)
    steps, seq = sc.get("steps", 10), cfg.data.seq_len
    batches = fixed_batches(cfg.model.vocab_size, sc.get("global_batch", 8), seq, steps)
    start = 0
    if sc.get("resume_from"):
        load_sharded(model, opt, sc["resume_from"])
        start = sc["resume_step"]
    elif init_state is not None:
        load_full_state_dict(model, init_state)
    losses = []
    save_at = sc.get("save_at")
    if save_at:
        losses += train_steps(model, opt, ctx, batches, start, save_at, sc.get("accum", 1))
        save_sharded(model, opt, sc["save_to"])
        start = save_at
    losses += train_steps(model, opt, ctx, batches, start, steps, sc.get("accum", 1))
    return losses


def run_spec(spec: dict) -> dict:
    """spec: {"config": {...}, "init": safetensors path|None, "out": path, "scenarios": {name: {...}}};
    a scenario may override "parallel" and "model" keys and bring its own "init" file."""
    init_state = None
    if spec.get("init"):
        from safetensors.torch import load_file

        init_state = load_file(spec["init"])
    results = {name: run_scenario(spec["config"], sc, init_state) for name, sc in spec["scenarios"].items()}
    if int(os.environ.get("RANK", "0")) == 0 and spec.get("out"):
        tmp = Path(spec["out"] + ".tmp")
        tmp.write_text(json.dumps(results))
        os.replace(tmp, spec["out"])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    run_spec(json.loads(Path(sys.argv[1]).read_text()))
