"""Measure one training step of a config on this device: tokens/s, MFU and peak memory.

    python bench/train_step.py --config configs/pretrain_minimind2_26m.yaml --steps 10
    python bench/train_step.py model.preset=tiny data.seq_len=256 train.global_batch_size=8 --steps 20

Synthetic token ids stand in for data (no dataset needed); everything else is the trainer's own
code path: the parallel model for `cfg.parallel`, AdamW, autocast per train.dtype, gradient
accumulation with the global-token-count loss, clipping and the optimizer step. The first
--warmup steps (allocator, kernels, compile) are not timed. Under torchrun each rank runs it and
rank 0 prints.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from lmforge.config import load_config
from lmforge.parallel import build_parallel_model, clip_grad_norm, init_distributed
from lmforge.train.metrics import fmt_count, peak_memory_bytes
from lmforge.train.mfu import model_flops_per_token, peak_flops
from lmforge.train.optim import build_optimizer
from lmforge.train.step import accumulate_gradients, autocast_context, fused_loss_fn, loss_fn, make_scaler
from lmforge.weights.dtypes import compute_dtype as resolve_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg, steps: int, warmup: int) -> dict:
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    torch.manual_seed(cfg.run.seed + ctx.rank)
    dtype = resolve_dtype(cfg.train.dtype, ctx.device)
    sharded = ctx.distributed and (ctx.shape.uses_fsdp or ctx.tp_size > 1)
    amp, scaler = autocast_context(ctx.device, dtype), make_scaler(ctx.device, dtype, sharded)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    micro, seq = cfg.micro_batch_size(ctx.dp_size), cfg.data.seq_len
    vocab = cfg.model.vocab_size

    def batch():
        ids = torch.randint(0, vocab, (micro, seq + 1), device=ctx.device)
        out = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
        if cfg.data.document_mask:  # synthetic documents of ~seq/4 tokens, as packed data has
            starts = torch.rand(micro, seq, device=ctx.device) < 4.0 / seq
            starts[:, 0] = True
            out["doc_ids"] = torch.cumsum(starts.long(), dim=1) - 1
            if cfg.data.reset_positions:
                idx = torch.arange(seq, device=ctx.device).expand(micro, seq)
                start_of = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
                out["position_ids"] = idx - start_of
        return out

    batches = [batch() for _ in range(cfg.train.grad_accum_steps)]
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    loss = fused_loss_fn if cfg.train.fused_loss else loss_fn
    times = []
    for i in range(warmup + steps):
        _sync(ctx.device)
        start = time.perf_counter()
        accumulate_gradients(model, batches, ctx, amp, scaler, loss)
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip_grad_norm(model, cfg.optim.grad_clip)
        (scaler.step(optimizer), scaler.update()) if scaler is not None else optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(ctx.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]  # median: robust to a noisy shared machine
    tokens_per_step = cfg.train.global_batch_size * seq
    tokens_per_s = tokens_per_step / step_s
    fpt = model_flops_per_token(cfg.model, seq)
    peak = peak_flops(ctx.device, dtype)
    result = {
        "device": torch.cuda.get_device_name(ctx.device)
        if ctx.device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "world_size": ctx.world_size,
        "dtype": str(dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in model.parameters()),
        "micro_batch": micro,
        "grad_accum": cfg.train.grad_accum_steps,
        "seq_len": seq,
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "model_flops": fpt * tokens_per_s,
        "mfu": fpt * tokens_per_s / (peak * ctx.world_size) if peak else None,
        "peak_mem": peak_memory_bytes(ctx.device),
        "torch": torch.__version__,
        "fused_loss": cfg.train.fused_loss,
        "compile": cfg.parallel.compile_mode if cfg.parallel.compile else "off",
        "document_mask": cfg.data.document_mask,
    }
    is_main = ctx.is_main
    ctx.shutdown()
    return result if is_main else {}


def table(r: dict, name: str) -> str:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    rows = [
        ("config", name),
        ("device", f"{r['device']} x{r['world_size']}"),
        ("torch / dtype", f"{r['torch']} / {r['dtype']}"),
        ("fused loss / compile", f"{r['fused_loss']} / {r['compile']}"),
        ("parameters", fmt_count(r["params"])),
        ("micro batch x accum x seq", f"{r['micro_batch']} x {r['grad_accum']} x {r['seq_len']}"),
        ("tokens / step", str(r["tokens_per_step"])),
        ("step time (median)", f"{r['step_s'] * 1000:.1f} ms"),
        ("tokens / s", fmt_count(r["tokens_per_s"])),
        ("model FLOP/s", f"{r['model_flops'] / 1e9:.1f} GFLOP/s"),
        ("MFU", mfu),
        ("peak memory", f"{r['peak_mem'] / 2**20:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="run config YAML (default: built-in defaults)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    result = bench(cfg, args.steps, args.warmup)
    if result:
        name = (args.config or "defaults") + (" " + " ".join(args.overrides) if args.overrides else "")
        print(table(result, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
