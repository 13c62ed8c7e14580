"""A tiny restartable training job for launcher tests: the parity loop plus a sharded checkpoint
after every step, resumed from the newest one when torchrun restarts the workers.

    python tests/helpers/toyjob.py --out losses.json --ckpt DIR [--steps 6] [--strategy ddp]
        [--kill-at STEP]   # rank 0 SIGKILLs itself before that step, on the first attempt only

Rank 0 prints `step N loss X` and writes {"losses": [...], "restarts": k, "world_size": W} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from parity import (
    fixed_batches,
    load_sharded,
    make_optimizer,
    save_sharded,
    tiny_tree,
    train_steps,
)

from lmforge.config import config_from_dict
from lmforge.model import Transformer
from lmforge.parallel.apply import build_parallel_model, load_full_state_dict
from lmforge.parallel.distributed import init_distributed

TINY = tiny_tree()


def reference_losses(steps: int) -> list[float]:
    """The same job in one process, uninterrupted."""
    return run_job(steps, "single", None, None)


def run_job(steps: int, strategy: str, ckpt: str | None, kill_at: int | None) -> list[float]:
    cfg = config_from_dict({**TINY, "parallel": {"strategy": strategy}}, "<toyjob>")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    opt = make_optimizer(model)
    torch.manual_seed(0)
    load_full_state_dict(model, Transformer(cfg.model).state_dict())
    batches = fixed_batches(cfg.model.vocab_size, cfg.train.global_batch_size, cfg.data.seq_len, steps)
    losses: list[float] = []
    start = 0
    latest = Path(ckpt, "latest") if ckpt else None
    if latest is not None and latest.exists():
        state = json.loads(latest.read_text())
        load_sharded(model, opt, str(Path(ckpt, f"step_{state['step']}")))
        start, losses = state["step"], state["losses"]
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for step in range(start, steps):
        if kill_at == step and restarts == 0 and ctx.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # a crashed worker, mid-run
        losses += train_steps(model, opt, ctx, batches, step, step + 1)
        if ctx.is_main:
            print(f"step {step + 1} loss {losses[-1]:.6f}", flush=True)
        if ckpt:
            save_sharded(model, opt, str(Path(ckpt, f"step_{step + 1}")))
            ctx.barrier()
            if ctx.is_main:  # `latest` is written after every rank has finished its shard
                tmp = Path(ckpt, "latest.tmp")
                tmp.write_text(json.dumps({"step": step + 1, "losses": losses}))
                os.replace(tmp, latest)
            ctx.barrier()
    ctx.shutdown()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    losses = run_job(args.steps, args.strategy, args.ckpt, args.kill_at)
    if int(os.environ.get("RANK", "0")) == 0:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        Path(args.out).write_text(json.dumps({"losses": losses, "restarts": restarts, "world_size": world}))


if __name__ == "__main__":
    main()
