"""Peak memory of one pipeline-parallel (PP 2, 1f1b) training step at vocabulary 128,256: the fused
linear + cross-entropy on the last stage (`train.fused_loss: true`, no [tokens, vocab] logits)
against the plain logits loss (`train.fused_loss: false`).

CPU + gloo, 2 processes per mode, each mode in fresh processes so the peak resident set size
(ru_maxrss: the process's peak RSS, which CPU allocations of this size reach through mmap)
belongs to that mode alone. The step is the trainer's own (`lmforge.train.step.build_train_step`
-> `PipelineTrainStep.step`: schedule, loss, clip, AdamW step).

    .venv/bin/python bench/pp_loss_memory.py [--batch 2] [--seq 512] [--hidden 256] [--layers 2]

Prints one row per mode and pipeline rank (rank 1 holds the last stage and the loss): RSS before
the step, peak during it, and the step's peak increase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tp_loss_memory import VOCAB, _current_rss_mib, _rss_mib  # the same RSS readings as the TP bench


def worker(args) -> None:
    import torch

    from lmforge.config import config_from_dict
    from lmforge.parallel import build_parallel_model, init_distributed
    from lmforge.train.optim import build_optimizer
    from lmforge.train.schedule import build_schedule
    from lmforge.train.step import build_train_step

    torch.set_num_threads(1)
    tree = {
        "model": {
            "vocab_size": VOCAB,
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": args.seq,
            "tie_embeddings": False,
        },
        "data": {"seq_len": args.seq},
        "train": {"device": "cpu", "global_batch_size": args.batch * 2, "grad_accum_steps": 2,
                  "fused_loss": args.mode == "fused"},
        "parallel": {"strategy": "single", "pp": 2, "pp_schedule": "1f1b"},
    }
    cfg = config_from_dict(tree, "<bench>")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    step = build_train_step(cfg, ctx, model, optimizer, build_schedule(optimizer, cfg.optim, 10),
                            amp=contextlib.nullcontext())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, args.batch, args.seq + 1), generator=gen)
    batches = [{"input_ids": m[:, :-1].contiguous(), "labels": m[:, 1:].contiguous()} for m in ids]
    before = _current_rss_mib()
    result = step.step(batches)
    peak = _rss_mib()
    rows = [None] * ctx.world_size
    row = {"mode": args.mode, "rank": ctx.rank, "before_mib": before, "peak_mib": peak,
           "step_mib": peak - before, "loss": float(result.loss)}
    torch.distributed.all_gather_object(rows, row)
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    ctx.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mode", choices=["plain", "fused"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    import torch

    from lmforge.parallel.distributed import _free_port

    full = args.batch * args.seq * VOCAB * 4 / 2**20
    print(f"PP 2 (1f1b, 2 microbatches), vocab {VOCAB:,}, micro batch {args.batch} x seq {args.seq}, "
          f"hidden {args.hidden}, {args.layers} layers, untied, fp32, torch {torch.__version__}, CPU gloo")
    print(f"fp32 logits of one microbatch [B, T, V] = {full:.0f} MiB")
    print(f"{'mode':<8}{'rank':>5}{'RSS before':>12}{'peak':>10}{'step peak +':>13}{'loss':>9}")
    last = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("plain", "fused"):
            out = Path(tmp, f"{mode}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                   f"--master-port={_free_port()}", __file__, "--mode", mode, "--out", str(out),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
                   "--layers", str(args.layers)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for row in json.loads(out.read_text()):
                print(f"{mode:<8}{row['rank']:>5}{row['before_mib']:>10.0f}Mi{row['peak_mib']:>8.0f}Mi"
                      f"{row['step_mib']:>11.0f}Mi{row['loss']:>9.4f}")
                last[mode] = row  # rank 1: the last stage
    saved = last["plain"]["step_mib"] - last["fused"]["step_mib"]
    print(f"the fused loss saves {saved:.0f} MiB of the last stage's step peak "
          f"({saved / max(last['plain']['step_mib'], 1e-9):.0%}); losses agree to "
          f"{abs(last['plain']['loss'] - last['fused']['loss']):.1e}")


if __name__ == "__main__":
    main()
