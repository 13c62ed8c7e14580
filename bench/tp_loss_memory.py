"""Peak memory of one tensor-parallel (TP 2) training step at vocabulary 128,256: vocab-parallel
loss (`parallel.loss_parallel: true`, logits stay [B, T, V/2] per rank) against gathered logits
(the default TP plan: every rank all-gathers the full [B, T, V] logits before the loss).

CPU + gloo, 2 processes per mode, each mode in fresh processes so the peak resident set size
(ru_maxrss, which CPU allocations of this size reach through mmap) belongs to that mode alone.

    .venv/bin/python bench/tp_loss_memory.py [--batch 2] [--seq 512] [--hidden 256] [--layers 2]

Prints one table row per mode: rank-0 RSS before the step, peak during it, and the step's peak
increase (the loss's working set: logits, their softmax and gradient). The step goes through
the trainer's own `accumulate_gradients`, so it measures what training does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB = 128_256


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    import contextlib

    import torch

    from lmforge.config import config_from_dict
    from lmforge.parallel import build_parallel_model, init_distributed
    from lmforge.train.step import accumulate_gradients

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
        "train": {"device": "cpu", "global_batch_size": args.batch},
        "parallel": {"strategy": "fsdp+tp", "tp": 2, "dp_shard": 1, "loss_parallel": args.mode == "vocab_parallel"},
    }
    cfg = config_from_dict(tree, "<bench>")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    before = _current_rss_mib()
    loss, _ = accumulate_gradients(model, [batch], ctx, contextlib.nullcontext())
    peak = _rss_mib()
    if ctx.rank == 0:
        row = {"mode": args.mode, "before_mib": before, "peak_mib": peak, "step_mib": peak - before,
               "loss": float(loss)}
        Path(args.out).write_text(json.dumps(row))
    ctx.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mode", choices=["gathered", "vocab_parallel"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    import torch

    from lmforge.parallel.distributed import _free_port

    full = args.batch * args.seq * VOCAB * 4 / 2**20
    print(f"TP 2, vocab {VOCAB:,}, batch {args.batch} x seq {args.seq}, hidden {args.hidden}, "
          f"{args.layers} layers, fp32, torch {torch.__version__}, CPU gloo")
    print(f"full fp32 logits [B, T, V] = {full:.0f} MiB; per-rank vocab shard = {full / 2:.0f} MiB")
    print(f"{'mode':<16}{'RSS before':>12}{'peak':>10}{'step peak +':>13}{'loss':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("gathered", "vocab_parallel"):
            out = Path(tmp, f"{mode}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                   f"--master-port={_free_port()}", __file__, "--mode", mode, "--out", str(out),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
                   "--layers", str(args.layers)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            row = json.loads(out.read_text())
            rows.append(row)
            print(f"{mode:<16}{row['before_mib']:>10.0f}Mi{row['peak_mib']:>8.0f}Mi"
                  f"{row['step_mib']:>11.0f}Mi{row['loss']:>9.4f}")
    saved = rows[0]["step_mib"] - rows[1]["step_mib"]
    print(f"vocab-parallel loss saves {saved:.0f} MiB of the step's peak per rank "
          f"({saved / max(rows[0]['step_mib'], 1e-9):.0%}); losses agree to "
          f"{abs(rows[0]['loss'] - rows[1]['loss']):.1e}")


if __name__ == "__main__":
    main()
