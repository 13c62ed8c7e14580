"""One-shot GPU benchmark (run through bench/gpu.sh): checks the fast paths on the device, measures
tokens/s, MFU and peak memory of three model shapes eager vs compiled, with and without document
masking, FSDP2 at world size 1, MiniMind's own train_pretrain.py side by side, and the planner's
memory prediction against the measured peak; appends a section to bench/RESULTS.md.

    python bench/gpu_bench.py --minimind ../shared/reference/minimind            # on a GPU
    python bench/gpu_bench.py --cpu --minimind ../shared/reference/minimind      # tiny dry run

--cpu runs every part with tiny shapes on the CPU (fp32) so the script itself is tested without
a GPU; its section is written to --out (default: a temp file in --cpu mode).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent

# name, config overrides, seq_len, global batch; the --cpu variants shrink everything
GPU_MODELS = [
    ("minimind2-26m", ["model.preset=minimind2-26m"], 512, 32),
    ("llama-1b (h2048 x16, vocab 128k)", ["model.preset=llama3-8b", "model.hidden_size=2048",
     "model.num_layers=16", "model.num_heads=32", "model.num_kv_heads=8",
     "model.intermediate_size=8192", "model.tie_embeddings=true"], 2048, 4),
    ("llama3-8b shape, 4 layers", ["model.preset=llama3-8b", "model.num_layers=4"], 8192, 1),
]
CPU_MODELS = [("tiny", ["model.preset=tiny", "model.max_position_embeddings=512"], 64, 2)]


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_variant(name, overrides, seq, batch, device, compile_, mask, steps, warmup) -> dict:
    from train_step import bench

    from lmforge.config import load_config

    over = [*overrides, f"data.seq_len={seq}", f"train.global_batch_size={batch}",
            f"train.device={device}", f"parallel.compile={str(compile_).lower()}",
            f"data.document_mask={str(mask).lower()}", f"data.reset_positions={str(mask).lower()}",
            "train.dtype=" + ("bfloat16" if device == "cuda" else "float32")]
    if seq > 2048:
        over.append(f"model.max_position_embeddings={seq}")
    cfg = load_config(None, over)
    torch._dynamo.reset()
    result = bench(cfg, steps, warmup)
    result["planned"] = planned_bytes(cfg)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def planned_bytes(cfg) -> float | None:
    try:
        from lmforge.parallel.plan import Layout, rank_memory

        layout = Layout(micro_batch=cfg.train.global_batch_size, compute_bytes=2)
        return float(rank_memory(cfg, layout, 0)["total"])
    except Exception as exc:  # the planner's API is another stage's; never lose the run over it
        print(f"planner prediction unavailable: {exc}", file=sys.stderr)
        return None


def device_checks(device: str) -> list[str]:
    """Fast paths on this device: FlexAttention doc mask == SDPA mask, grouped-GEMM MoE == tiled
    fallback, and no host sync in a training step (torch.cuda.set_sync_debug_mode)."""
    import contextlib

    from lmforge.config import ModelConfig, config_from_dict
    from lmforge.model import Transformer
    from lmforge.model.attention import use_flex_attention
    from lmforge.model.moe import MoEFeedForward, tiled_expert_matmul
    from lmforge.parallel import init_distributed
    from lmforge.train.step import accumulate_gradients, fused_loss_fn

    lines = []
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=256, qk_norm=True)
    model = Transformer(cfg).to(dev)
    ids = torch.randint(0, 512, (2, 256), device=dev)
    doc_ids = torch.cumsum((torch.rand(2, 256, device=dev) < 0.02).long(), 1)
    if use_flex_attention(dev):
        import lmforge.model.transformer as tr

        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            a = model(ids, doc_ids=doc_ids).logits.float()
            original = tr.document_mask
            tr.document_mask = lambda d: original(d, flex=False)
            try:
                b = model(ids, doc_ids=doc_ids).logits.float()
            finally:
                tr.document_mask = original
        lines.append(f"FlexAttention doc mask vs SDPA mask (bf16): max |logit diff| {(a - b).abs().max():.3g}")
    else:
        lines.append(f"FlexAttention: not used on {device} (SDPA boolean mask instead)")
    moe_cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                          moe={"num_experts": 8, "top_k": 2, "num_shared_experts": 1,
                               "expert_intermediate_size": 256})
    moe = MoEFeedForward(moe_cfg).to(dev)
    moe.reset_parameters(0.05, 0.02)
    x = torch.randn(4, 64, 128, device=dev)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        got, _ = moe(x)
        x_flat = x.reshape(-1, 128)
        _, w, idx = moe.route(x_flat)
        order = torch.argsort(idx.reshape(-1), stable=True)
        rows = x_flat[order // 2]
        y = tiled_expert_matmul(rows.float(), idx.reshape(-1)[order], moe.stacked_weights(torch.float32), 8)
        ref = torch.zeros_like(x_flat).index_add_(0, order // 2, y * w.reshape(-1)[order, None].float())
        ref = ref + moe.shared_experts[0](x_flat).float()
    lines.append(f"MoE dispatch on {device} vs fp32 tiled reference: max |diff| "
                 f"{(got.reshape(-1, 128).float() - ref).abs().max():.3g}")
    run_cfg = config_from_dict({"model": cfg.model_dump(), "data": {"seq_len": 256},
                                "train": {"device": device}}, "gpu_bench")
    ctx = init_distributed(run_cfg.parallel, run_cfg.train.device)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "doc_ids": doc_ids}
    amp = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    accumulate_gradients(model, [batch], ctx, amp, None, fused_loss_fn)  # warm-up (compiles flex)
    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                accumulate_gradients(model, [batch], ctx, amp, None, fused_loss_fn)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        lines.append(f"host syncs in a step's forward/backward (set_sync_debug_mode): {len(syncs)}"
                     + (f" (first: {syncs[0]})" if syncs else ""))
    else:
        lines.append("host syncs: set_sync_debug_mode is CUDA-only (tests/unit/test_speed.py counts them on CPU)")
    return lines


def minimind_side_by_side(root: Path, device: str, cpu: bool, tmp: Path, budget: Budget) -> list[str]:
    """MiniMind's own train_pretrain.py, run from its checkout on a JSONL written here, timed at
    two data sizes so start-up cancels: real tokens/s = extra real tokens / extra seconds."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "model"))
    hidden, layers, seq, batch = (64, 2, 64, 4) if cpu else (512, 8, 512, 32)
    small, large = (2, 6) if cpu else (20, 120)
    gen = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(batch * large):
        n = int(torch.randint(seq // 4, seq * 2, (1,), generator=gen))
        docs.append(tok.decode(torch.randint(300, tok.vocab_size, (n,), generator=gen).tolist()))
    real = [min(len(tok(d, add_special_tokens=False).input_ids), seq - 2) + 1 for d in docs]
    times = {}
    for steps in (small, large):
        if budget.left() < 60:
            return ["MiniMind side by side: skipped (time budget)"]
        data = tmp / f"minimind_{steps}.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[: batch * steps]))
        # train_pretrain reads its tokenizer from ../model and writes ../checkpoints relative to its
        # working directory: run it in a scratch trainer/ whose ../model links to the checkout's
        run = tmp / f"mm_run_{steps}"
        (run / "trainer").mkdir(parents=True, exist_ok=True)
        if not (run / "model").exists():
            (run / "model").symlink_to(root / "model", target_is_directory=True)
        cmd = [sys.executable, str(root / "trainer" / "train_pretrain.py"), "--epochs", "1",
               "--batch_size", str(batch), "--max_seq_len", str(seq), "--hidden_size", str(hidden),
               "--num_hidden_layers", str(layers), "--accumulation_steps", "1", "--num_workers", "2",
               "--log_interval", "10", "--save_interval", "100000000", "--data_path", str(data),
               "--save_dir", str(run / "out"), "--from_weight", "none",
               "--device", "cuda:0" if device == "cuda" else "cpu",
               "--dtype", "bfloat16"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=run / "trainer", capture_output=True, text=True, timeout=max(30, budget.left() - 30))
        times[steps] = time.perf_counter() - start
        if proc.returncode != 0:
            return [f"MiniMind side by side: train_pretrain.py failed: {proc.stderr.strip().splitlines()[-1:]}"]
    extra_tokens = sum(real[batch * small : batch * large])
    rate = extra_tokens / max(1e-9, times[large] - times[small])
    return [f"MiniMind train_pretrain.py (hidden {hidden}, {layers} layers, seq {seq}, batch {batch}, "
            f"{'fp32 on CPU' if cpu else 'bf16 autocast'}): {rate:,.0f} real tokens/s "
            f"({small} vs {large} steps: {times[small]:.1f} s vs {times[large]:.1f} s wall incl. start-up)",
            ]


def fsdp_world1(name, overrides, seq, batch, device, budget: Budget) -> str:
    if budget.left() < 60:
        return f"FSDP2 world size 1 ({name}): skipped (time budget)"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-port=29533",
           str(REPO / "bench" / "train_step.py"), *overrides, f"data.seq_len={seq}",
           f"train.global_batch_size={batch}", f"train.device={device}", "parallel.strategy=fsdp",
           "--steps", "3" if device == "cpu" else "8", "--warmup", "1" if device == "cpu" else "2"]
    if device == "cuda":
        cmd.append("train.dtype=bfloat16")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, budget.left() - 30))
    if proc.returncode != 0:
        return f"FSDP2 world size 1 ({name}): failed: {proc.stderr.strip().splitlines()[-1:]}"
    fields = dict(re.findall(r"^(tokens / s|MFU|peak memory)\s+(.+)$", proc.stdout, re.M))
    return (f"FSDP2 world size 1 ({name}, eager): {fields.get('tokens / s')} tokens/s, MFU "
            f"{fields.get('MFU')}, peak {fields.get('peak memory')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minimind", default=str(REPO.parent / "shared" / "reference" / "minimind"))
    parser.add_argument("--cpu", action="store_true", help="tiny dry run on the CPU")
    parser.add_argument("--out", default=None, help="markdown file to append to (default bench/RESULTS.md; "
                        "a temp file with --cpu)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new parts after this")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu for the dry run", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp()) / "RESULTS.md" if args.cpu else REPO / "bench" / "RESULTS.md")
    models = CPU_MODELS if args.cpu else GPU_MODELS
    steps, warmup = (2, 1) if args.cpu else (8, 3)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    lines = [f"## GPU benchmark ({dev_name}, {started})", "",
             f"Command: `bash bench/gpu.sh{' --cpu' if args.cpu else ''}`; torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}; {'bf16 autocast' if device == 'cuda' else 'fp32'}, fused loss, "
             f"median of {steps} steps after {warmup} warm-up (compile happens in warm-up).", ""]
    try:
        lines += [f"- {line}" for line in device_checks(device)]
    except Exception as exc:  # a failed check is a finding, not a reason to lose the benchmark
        lines.append(f"- device checks failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    lines += ["", "| model | seq x batch | compile | doc mask | tokens/s | MFU | peak memory | planner total |",
              "|---|---|---|---|---|---|---|---|"]
    for name, overrides, seq, batch in models:
        for compile_ in (False, True):
            for mask in (False, True):
                if budget.left() < 90:
                    lines.append(f"| {name} | {seq} x {batch} | {compile_} | {mask} | skipped (time budget) | | | |")
                    continue
                try:
                    r = run_variant(name, overrides, seq, batch, device, compile_, mask, steps, warmup)
                except Exception as exc:  # one failing variant must not lose the others
                    lines.append(f"| {name} | {seq} x {batch} | {compile_} | {mask} | failed: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | |")
                    continue
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                plan = "n/a" if r["planned"] is None else f"{r['planned'] / 2**30:.2f} GiB"
                lines.append(f"| {name} | {seq} x {batch} | {compile_} | {mask} | {r['tokens_per_s']:,.0f} | "
                             f"{mfu} | {r['peak_mem'] / 2**30:.2f} GiB | {plan} |")
                print(lines[-1], flush=True)
    lines.append("")
    name, overrides, seq, batch = models[1] if len(models) > 1 else models[0]
    lines.append(f"- {fsdp_world1(name, overrides, seq, batch, device, budget)}")
    with tempfile.TemporaryDirectory() as tmp:
        lines += [f"- {x}" for x in minimind_side_by_side(Path(args.minimind), device, args.cpu, Path(tmp), budget)]
    text = "\n".join(lines) + "\n"
    print(text)
    previous = out.read_text() if out.exists() else ""
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(previous.rstrip("\n") + "\n\n" + text if previous else text)
    os.replace(partial, out)
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
