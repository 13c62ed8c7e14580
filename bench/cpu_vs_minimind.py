"""CPU cost of a training step: lmforge (packed and padded) against MiniMind's own model and step.

    python bench/cpu_vs_minimind.py --minimind ../shared/reference/minimind --data corpus.jsonl
    python bench/cpu_vs_minimind.py --learn ...   # learning mode: bench/minimind_learning.py

Same architecture (MiniMind's: QK-norm, FFN ceil(h*pi/64)*64, rope theta 1e6, tied, 6,400 vocab,
8 heads / 4 KV heads, RMSNorm eps 1e-6), hidden 128 / 4 layers / seq 256 / micro batch 16, fp32,
the same JSONL and MiniMind's tokenizer. MiniMind runs from the checkout given (imported from
there, never copied): `MiniMindForCausalLM`, its `PretrainDataset` and the body of
`train_pretrain.train_epoch` (forward with labels, loss + aux, backward, clip 1.0, AdamW).
lmforge runs its trainer's path: the parallel model, AdamW, `TrainStep`'s loss function with the
fused loss, clip, optimizer step.

Measured: CPU-seconds per step (time.process_time: this process, all threads; the machine is
shared, so wall-clock would measure the neighbours) and real (target, non-pad) tokens per
CPU-second. Batches are built before timing for all three (data loading is not in the step).
The three run interleaved, `--steps` steps each per round, for `--pairs` rounds; the figures are
medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.parallel.compile import compile_seconds

SHAPE = dict(hidden=128, layers=4, seq=256, batch=16)


def lmforge_runner(
    mode: str,
    prepared: Path,
    tok_fp: str,
    steps: int,
    fused: bool = True,
    compile_: bool = False,
    optim: dict | None = None,
    seed: int = 0,
    parts: dict | None = None,
    document_mask: bool = False,
):
    from lmforge.config import config_from_dict
    from lmforge.data.loader import build_loader
    from lmforge.parallel import build_parallel_model, clip_grad_norm, init_distributed
    from lmforge.train.optim import build_optimizer
    from lmforge.train.step import accumulate_gradients, fused_loss_fn, loss_fn

    tree = {
        "model": {
            "preset": "minimind3-64m",
            "hidden_size": SHAPE["hidden"],
            "num_layers": SHAPE["layers"],
            "norm_eps": 1e-6,
            "max_position_embeddings": 2048,
        },
        "data": {
            "train": str(prepared),
            "mode": mode,
            "seq_len": SHAPE["seq"],
            "prefetch": 0,
            "document_mask": document_mask and mode == "packed",
        },
        "train": {"device": "cpu", "dtype": "float32", "global_batch_size": SHAPE["batch"]},
        "optim": optim or {"lr": 5e-4, "weight_decay": 0.01, "grad_clip": 1.0},
        "parallel": {"compile": compile_, "compile_mode": "model"},
        "run": {"seed": seed},
    }
    cfg = config_from_dict(tree, "cpu_vs_minimind")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    loader = iter(build_loader(cfg.data, "train", SHAPE["batch"], seed=seed, tokenizer_fingerprint=tok_fp))
    batches = [next(loader) for _ in range(steps)]
    if parts is not None:  # learning mode drives the schedule and scores the model itself
        parts.update(cfg=cfg, model=model, optimizer=optimizer, loader=loader)

    def step(batch):
        loss = fused_loss_fn if fused else loss_fn
        accumulate_gradients(model, [batch], ctx, contextlib.nullcontext(), None, loss)
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int((batch["labels"] != -100).sum())

    return batches, step, sum(p.numel() for p in model.parameters())


def minimind_runner(
    root: Path, data: str, steps: int, seed: int = 42, lr: float = 5e-4, parts: dict | None = None
):
    sys.path.insert(0, str(root))
    from dataset.lm_dataset import PretrainDataset
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    config = MiniMindConfig(hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"], use_moe=False)
    model = MiniMindForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    # max_length seq+1: MiniMind shifts inside the model, so seq targets per sample like ours
    dataset = PretrainDataset(data, tokenizer, max_length=SHAPE["seq"] + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # train_pretrain.py's optimizer
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    batches = []
    for s in range(steps):
        items = [dataset[i] for i in order[s * SHAPE["batch"] : (s + 1) * SHAPE["batch"]]]
        batches.append((torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])))

    def step(batch):
        input_ids, labels = batch
        res = model(input_ids, labels=labels)
        loss = res.loss + res.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int((labels[:, 1:] != -100).sum())

    if parts is not None:
        parts.update(model=model, optimizer=optimizer, dataset=dataset, order=order)
    return batches, step, sum(p.numel() for p in model.parameters())


def prepare(data: str, tokenizer_dir: Path, out: Path) -> str:
    from lmforge.data.prepare import prepare_dataset
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    prepare_dataset([data], tok, out, workers=1, progress=False)
    return tok.fingerprint


def measure(step, batches) -> tuple[float, int]:
    """(CPU-seconds per step, real target tokens per step), averaged over the given batches."""
    cpu0 = time.process_time()
    tokens = sum(step(b) for b in batches)
    return (time.process_time() - cpu0) / len(batches), tokens // len(batches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minimind", required=True, help="path of a MiniMind checkout (read, never copied)")
    parser.add_argument("--data", required=True, help="pretraining JSONL with a 'text' field")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved rounds (median over them)")
    parser.add_argument("--steps", type=int, default=3, help="steps per runner per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-fused-loss", action="store_true", help="lmforge with the plain logits loss")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="lmforge with parallel.compile (whole model, inductor); compile time is "
        "spent in the warm-up round and reported separately",
    )
    parser.add_argument(
        "--learn",
        action="store_true",
        help="learning mode: train each to --tokens real tokens, and lmforge also to "
        "MiniMind's wall time, then score held-out documents (bench/learning.py's evaluator)",
    )
    parser.add_argument("--tokens", type=int, default=400_000, help="--learn: real-token budget")
    parser.add_argument("--seeds", default="1", help="--learn: comma-separated seeds")
    parser.add_argument(
        "--minimind-lr",
        type=float,
        default=5e-4,
        help="--learn: MiniMind's lr (default: train_pretrain.py's 5e-4)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.minimind).resolve()
    if args.learn:
        from minimind_learning import learn

        return learn(args, root)
    total = args.steps * (args.pairs + 1)  # one warm-up round
    with tempfile.TemporaryDirectory() as tmp:
        fp = prepare(args.data, root / "model", Path(tmp) / "prepared")
        runners = {
            f"lmforge {mode}": lmforge_runner(
                mode, Path(tmp) / "prepared", fp, total, not args.no_fused_loss, args.compile
            )
            for mode in ("packed", "padded")
        }
        runners |= {
            "MiniMind": minimind_runner(root, args.data, total),
        }
        rounds = {name: [] for name in runners}
        for r in range(args.pairs + 1):
            for name, (batches, step, _) in runners.items():
                cpu, tokens = measure(step, batches[r * args.steps : (r + 1) * args.steps])
                if r:  # round 0 warms allocators and caches
                    rounds[name].append((cpu, tokens))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{args.threads} thread(s); fp32; hidden {SHAPE['hidden']}, {SHAPE['layers']} layers, seq "
        f"{SHAPE['seq']}, micro batch {SHAPE['batch']}; {args.pairs} interleaved rounds of "
        f"{args.steps} steps; medians; lmforge loss: {'plain' if args.no_fused_loss else 'fused'}"
        + (f"; compiled (compile {compile_seconds():.0f} s, in the warm-up round)" if args.compile else "")
    )
    print("| runner | params | CPU-s / step | real tokens / step | real tokens / CPU-s | vs MiniMind |")
    print("|---|---|---|---|---|---|")
    ref = statistics.median(t / c for c, t in rounds["MiniMind"])
    for name, (_, _, params) in runners.items():
        cpu = statistics.median(c for c, _ in rounds[name])
        tokens = statistics.median(t for _, t in rounds[name])
        rate = statistics.median(t / c for c, t in rounds[name])
        print(
            f"| {name} | {params / 1e6:.2f}M | {cpu:.3f} | {tokens:,.0f} | {rate:,.0f} | {rate / ref:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
