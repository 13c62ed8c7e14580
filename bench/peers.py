"""CPU-seconds and minor page faults per training step: lmforge against torchtitan, litgpt and
OLMo-core, each run from its own registry package in its own virtual environment.

    python bench/peers.py --venvs /work/venvs/speed19 --rounds 5 --steps 3
    python bench/peers.py --worker lmforge --steps 3     # one worker, one JSON line (internal)

The shape (issue 19): hidden 256, 4 layers, 8 query / 4 key-value heads, FFN 704, vocab 6,400
(untied output layer), seq 512, micro batch 8, fp32, eager, one process, one intra-op thread.
Every peer runs its OWN model, loss and AdamW step (torchtitan: its Llama 3 model, its
cross-entropy, its optimizer container; litgpt: its GPT, chunked_cross_entropy, torch AdamW as its
pretrain script builds it; OLMo-core: its TransformerConfig.llama_like model, its cross-entropy,
its AdamWConfig), with gradient clipping at 1.0 and zero_grad(set_to_none) as their trainers do.
lmforge runs the trainer's own TrainStep (build_train_step: fused loss, fused AdamW, clip, the
finiteness check).

Each round starts a fresh process per trainer, in an order rotated every round (interleaved, so
the busy machine's load falls on all of them alike). Inside it, --warmup untimed steps, then
--steps timed ones; user+sys CPU time and minor page faults come from resource.getrusage
(RUSAGE_SELF: all threads of the process) around the timed steps. The table gives medians over
rounds with the range. A peer whose venv is missing is reported as such, not skipped silently.

Setup of the venvs (torch pinned FIRST, and `-c` a file holding `torch==2.13.0` on every later
install, so no peer can pull another build; none of the three needed another torch):
    python3 -m venv V/<peer> && V/<peer>/bin/pip install torch==2.13.0
    V/torchtitan/bin/pip install torchtitan==0.3.0 triton   # its MoE module imports triton at load
    V/litgpt/bin/pip install litgpt==0.5.13
    V/olmocore/bin/pip install ai2-olmo-core==3.0.0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

SHAPE = dict(hidden=256, layers=4, heads=8, kv_heads=4, ffn=704, vocab=6400, seq=512, batch=8)
PEERS = ("lmforge", "lmforge-plain", "torchtitan", "litgpt", "olmocore")
REPO = Path(__file__).resolve().parents[1]


def _batch(torch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"] + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------
# Workers: each builds its trainer's step and returns a zero-argument callable doing one step.


def lmforge_step(controls: bool = True):
    """The trainer's step (build_train_step) with the trainer's run controls (RunControls:
    train.malloc_cache, train.gc_interval at their defaults); `lmforge-plain` runs without them
    (malloc_cache false, gc_interval 0: glibc's and Python's defaults, the step before issue 19)."""
    import torch

    from lmforge.config import load_config
    from lmforge.parallel import build_parallel_model, init_distributed
    from lmforge.train.controls import RunControls
    from lmforge.train.optim import build_optimizer
    from lmforge.train.schedule import build_schedule
    from lmforge.train.step import build_train_step

    s = SHAPE
    cfg = load_config(
        None,
        [
            f"model.hidden_size={s['hidden']}", f"model.num_layers={s['layers']}",
            f"model.num_heads={s['heads']}", f"model.num_kv_heads={s['kv_heads']}",
            f"model.intermediate_size={s['ffn']}", f"model.vocab_size={s['vocab']}",
            "model.tie_embeddings=false", f"data.seq_len={s['seq']}",
            f"train.global_batch_size={s['batch']}", "train.dtype=float32", "train.device=cpu",
            "optim.warmup_steps=0", "train.max_steps=1000",
        ] + ([] if controls else ["train.malloc_cache=false", "train.gc_interval=0"]),
    )
    ctx = init_distributed(cfg)
    model = build_parallel_model(cfg, ctx)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, cfg.optim, 1000)
    step = build_train_step(cfg, ctx, model, optimizer, scheduler, amp=torch.autocast("cpu", enabled=False))
    run_controls = RunControls(cfg, ctx, Path("/nonexistent"))  # profile_steps unset: writes nothing
    x, y = _batch(torch)
    batches = [{"input_ids": x, "labels": y}]
    count = [0]

    def one():
        count[0] += 1
        run_controls.step_begins(count[0])
        loss = step.step(batches).loss.item()
        run_controls.step_ends(count[0])
        return loss

    return one


def torchtitan_step():
    """torchtitan 0.3.0's Llama 3 (fused QKV, complex RoPE), its ChunkedLossWrapper around its
    cross-entropy (the llama3 configs' loss), its AdamW container and LR schedulers, its
    clip_grad_norm_ and its GarbageCollection handler, in the order of Trainer.train_step.
    Attention: torchtitan's own ScaledDotProductAttention module (causal SDPA, the kernel lmforge
    uses); the llama3 configs default to FlexAttention, which runs uncompiled on a CPU."""
    import torch
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
    )
    from torchtitan.tools.utils import GarbageCollection

    s = SHAPE
    dim, vocab = s["hidden"], s["vocab"]
    rope = ComplexRoPE.Config(dim=dim // s["heads"], max_seq_len=s["seq"], theta=500000, scaling="llama")
    layers = _build_llama3_layers(
        fuse_qkv=True, n_layers=s["layers"], dim=dim, n_heads=s["heads"], n_kv_heads=s["kv_heads"],
        hidden_dim=s["ffn"], rope=rope, attn_backend="flex",
    )
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    cfg = Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=_output_linear_init(dim)),
        layers=layers,
    )
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    model.train()
    loss_fn = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=vocab)).build()
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True  # what Trainer sets with a ChunkedLossWrapper
    optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8).build(
        optimizers=optimizers, training_steps=1000
    )
    gc_handler = GarbageCollection(gc_freq=50)  # TrainingConfig.gc_freq's default
    x, y = _batch(torch)
    count = [0]

    def step():
        count[0] += 1
        gc_handler.run(count[0])
        optimizers.zero_grad()
        valid = (y != -100).sum()
        pred = model(x)
        loss, _ = loss_fn(pred, y, valid)
        del pred
        loss.backward()
        params = [p for p in model.parameters()]
        dist_utils.clip_grad_norm_(params, 1.0, foreach=True, pp_mesh=None, ep_enabled=False)
        optimizers.step()
        schedulers.step()
        return loss.item()

    return step


def litgpt_step():
    """litgpt 0.5.13's GPT (LLaMA MLP, RMSNorm), initialize_weights, AdamW as pretrain.py builds
    it (instantiate_torch_optimizer, fused only on CUDA), and pretrain.fit's step through a
    one-device CPU Fabric: forward, chunked_cross_entropy, fabric.backward, clip_gradients,
    step, zero_grad. pretrain.py compiles the model; the issue's comparison is eager."""
    import lightning as L
    import torch
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.pretrain import initialize_weights
    from litgpt.utils import chunked_cross_entropy, instantiate_torch_optimizer

    s = SHAPE
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    config = Config(
        name="peers", block_size=s["seq"], vocab_size=s["vocab"], padded_vocab_size=s["vocab"],
        n_layer=s["layers"], n_head=s["heads"], n_query_groups=s["kv_heads"], n_embd=s["hidden"],
        intermediate_size=s["ffn"], mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", bias=False,
        rotary_percentage=1.0, parallel_residual=False,
    )
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    model = fabric.setup(model)
    optimizer = instantiate_torch_optimizer(
        {"class_path": "torch.optim.AdamW", "init_args": {"lr": 4e-4, "weight_decay": 0.1, "betas": (0.9, 0.95)}},
        model.parameters(), fused=False,
    )
    optimizer = fabric.setup_optimizers(optimizer)
    model.train()
    x, y = _batch(torch)

    def step():
        logits = model(x)
        loss = chunked_cross_entropy(logits, y)
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def olmocore_step():
    """OLMo-core 3.0.0's TransformerConfig.llama_like model (FFN width set to the shape's), its
    init_weights, its AdamWConfig, and TransformerTrainModule's step: forward with labels
    (loss_reduction sum, loss_div_factor = target tokens), backward, the module's clip
    (get_total_norm + clip_grads_with_norm_), optimizer step, zero_grad(set_to_none)."""
    import torch
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig

    s = SHAPE
    config = TransformerConfig.llama_like(
        d_model=s["hidden"], vocab_size=s["vocab"], n_layers=s["layers"], n_heads=s["heads"],
        n_kv_heads=s["kv_heads"], feed_forward=FeedForwardConfig(hidden_size=s["ffn"], bias=False),
    )
    model = config.build(init_device="cpu")
    model.init_weights(max_seq_len=s["seq"], device=torch.device("cpu"))
    optim = AdamWConfig(lr=4e-4, weight_decay=0.1, betas=(0.9, 0.95)).build(model)
    model.train()
    x, y = _batch(torch)

    def step():
        optim.zero_grad(set_to_none=True)
        n_tokens = (y != -100).sum()
        out = model(x, labels=y, ignore_index=-100, loss_reduction="sum", loss_div_factor=n_tokens)
        out.loss.backward()
        params = [p for p in model.parameters()]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        optim.step()
        model.post_optim_step()
        return out.loss.item()

    return step


WORKERS = {
    "lmforge": lmforge_step,
    "lmforge-plain": lambda: lmforge_step(controls=False),
    "torchtitan": torchtitan_step,
    "litgpt": litgpt_step,
    "olmocore": olmocore_step,
}


def run_worker(name: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    step = WORKERS[name]()
    losses = [step() for _ in range(warmup)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    losses += [step() for _ in range(steps)]
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "name": name,
        "torch": torch.__version__,
        "user": (after.ru_utime - before.ru_utime) / steps,
        "sys": (after.ru_stime - before.ru_stime) / steps,
        "minflt": (after.ru_minflt - before.ru_minflt) / steps,
        "maxrss_mib": after.ru_maxrss / 1024,
        "losses": losses,
    }


# ---------------------------------------------------------------------------------------------
# The driver


def _python_of(name: str, venvs: Path) -> Path | None:
    if name.startswith("lmforge"):
        return Path(sys.executable)
    exe = venvs / name / "bin" / "python"
    return exe if exe.is_file() else None


def _one(name: str, exe: Path, args) -> dict:
    cmd = [str(exe), str(Path(__file__).resolve()), "--worker", name, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = dict(os.environ)
    if name.startswith("lmforge"):
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    else:  # the peer's venv only: no lmforge, no main venv packages on the path
        env.pop("PYTHONPATH", None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"{name} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(values: list[float], digits: int = 3) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--venvs", default="/work/venvs/speed19", help="folder holding <peer>/bin/python")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (fresh processes)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every trainer")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.steps, args.warmup, args.threads)))
        return 0
    names = [n for n in args.peers.split(",") if n]
    exes = {n: _python_of(n, Path(args.venvs)) for n in names}
    for n in [n for n, e in exes.items() if e is None]:
        print(f"{n}: no venv at {Path(args.venvs) / n}; see this script's docstring to create it")
    names = [n for n in names if exes[n] is not None]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            res = _one(n, exes[n], args)
            results[n].append(res)
            print(f"round {r + 1} {n}: cpu {res['user'] + res['sys']:.3f} s "
                  f"(sys {res['sys']:.3f}), minflt {res['minflt']:.0f}", flush=True)
    base = [r["user"] + r["sys"] for r in results.get("lmforge", [])]
    print(f"\nshape {SHAPE}, fp32, eager, {args.threads} thread(s), {args.rounds} rounds x {args.steps} "
          f"steps after {args.warmup} warmup; median (range)")
    print("| trainer | CPU-s / step | sys CPU-s / step | minor faults / step | peak RSS MiB | lmforge / trainer |")
    print("|---|---|---|---|---|---|")
    for n in names:
        cpu = [r["user"] + r["sys"] for r in results[n]]
        ratio = "" if not base or n == "lmforge" else f"{statistics.median(base) / statistics.median(cpu):.2f}"
        flt = [r["minflt"] for r in results[n]]
        print(f"| {n} (torch {results[n][0]['torch']}) | {_fmt(cpu)} | {_fmt([r['sys'] for r in results[n]])} "
              f"| {_fmt(flt, 0)} | {_fmt([r['maxrss_mib'] for r in results[n]], 0)} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
