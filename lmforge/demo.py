"""`lmforge demo`: the whole pipeline on a small corpus, on CPU, in a few minutes.

fetch the `demo` corpus -> train a 6,400-token BPE -> prepare shards (2 workers) -> measure the
freshly initialised model's validation perplexity -> pretrain with configs/demo.yaml -> measure
it again -> generate from three prompts -> export a Hugging Face folder -> print a table.

The run config is `lmforge/configs/demo.yaml`, shipped as package data (configs/demo.yaml in the
repository is a link to it).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

# Package data (pyproject's package-data), so an installed lmforge has it; configs/demo.yaml in the
# repository links to this file.
DEMO_YAML = Path(__file__).resolve().parent / "configs" / "demo.yaml"
# --quick (tests): a tiny model for a few steps on whatever small corpus is given.
QUICK_OVERRIDES = {
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    "data": {"seq_len": 64},
    "optim": {"warmup_steps": 5, "lr": 0.01},
    "train": {"max_steps": 40, "global_batch_size": 8, "sample_max_new_tokens": 8},
    "log": {"interval": 10, "plots": False},
}
PROMPTS = ["The history of", "To be, or not to be", "中国的"]
VOCAB_SIZE = 6400
VAL_FRACTION = 0.02
EVAL_MAX_BATCHES = 40


def demo_config_tree() -> dict:
    """The demo's run config as a tree, read from the packaged YAML."""
    from lmforge.config import load_yaml

    return load_yaml(DEMO_YAML)


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _is_run_folder(path: Path) -> bool:
    """A folder the trainer wrote: its resolved config.yaml beside metrics or checkpoints."""
    return (path / "config.yaml").is_file() and any(
        (path / n).exists() for n in ("metrics.jsonl", "checkpoints")
    )


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(
    out_dir: str | Path = "runs/demo",
    corpus: str = "demo",
    inputs: list[str] | None = None,
    max_steps: int | None = None,
    workers: int = 2,
    quick: bool = False,
    fmt: str = "auto",
) -> dict:
    """Run the pipeline into `out_dir`; returns the figures of the final table. `fmt` is the
    format of `inputs` (as `prepare --format`: auto by extension, txt, jsonl, paragraphs, ...)."""
    from lmforge.config import config_from_dict
    from lmforge.data.prepare import prepare_dataset
    from lmforge.data.token_dataset import TokenDataset
    from lmforge.infer import evaluate, export_checkpoint, load_model_for_inference
    from lmforge.infer.commands import _print_generation
    from lmforge.model import Transformer
    from lmforge.tokenizer import load_tokenizer, train_tokenizer
    from lmforge.train.trainer import run_training

    t_start = time.perf_counter()
    out = Path(out_dir)
    run_dir = out / demo_config_tree()["run"]["name"]
    if run_dir.is_dir() and not _is_run_folder(run_dir):  # checked first: before any work
        raise LmforgeError(
            f"{run_dir}: exists and is not an lmforge run folder; the demo would replace it, so pass another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if inputs:
        missing = [p for p in inputs if not Path(p).exists()]
        if missing:
            raise LmforgeError(f"{missing[0]}: demo input not found; pass existing text files with --input")
        sources = [str(p) for p in inputs]
    else:
        from lmforge.data.fetch import fetch_corpus

        _say(f"fetching corpus '{corpus}' into {out / 'raw'}")
        sources = [str(fetch_corpus(corpus, out / "raw"))]

    _say(f"training a {VOCAB_SIZE}-token byte-level BPE tokenizer")
    fmt = fmt if inputs else "auto"  # a fetched corpus names its own format
    tok_dir = train_tokenizer(sources, VOCAB_SIZE, out / "tokenizer", fmt=fmt)
    tokenizer = load_tokenizer(tok_dir)
    _say(f"preparing token shards with {workers} workers")
    data_dir = out / "data"
    prepare_dataset(
        sources,
        tokenizer,
        data_dir,
        workers=workers,
        val_fraction=VAL_FRACTION,
        fmt=fmt,
        progress=False,
        overwrite=True,
    )

    tree = _merge(demo_config_tree(), QUICK_OVERRIDES if quick else {})
    overrides = {
        "run": {"out_dir": str(out)},
        "model": {"vocab_size": tokenizer.vocab_size},  # a tiny --quick corpus may give fewer ids
        "tokenizer": {"path": str(tok_dir)},
        "data": {"train": [str(data_dir)]},
        "train": {"max_steps": max_steps} if max_steps else {},
    }
    cfg = config_from_dict(_merge(tree, overrides), str(DEMO_YAML))
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if run_dir.is_dir():  # the demo always trains from scratch, in a run folder it wrote itself
        shutil.rmtree(run_dir)

    val = TokenDataset.open(data_dir, split="val", expect_fingerprint=tokenizer.fingerprint)
    eval_args = dict(
        seq_len=cfg.data.seq_len, batch_size=cfg.micro_batch_size(1), max_batches=EVAL_MAX_BATCHES
    )
    torch.manual_seed(cfg.run.seed)
    before = evaluate(Transformer(cfg.model), val, **eval_args)
    _say(f"initial validation perplexity {before['ppl']:.1f} (loss {before['loss']:.3f})")

    _say(
        f"pretraining {cfg.train.max_steps} steps of {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens"
    )
    summary = run_training(cfg)
    if not summary.get("checkpoint"):
        raise LmforgeError(f"{run_dir}: training wrote no checkpoint; see the log above")
    model, _, _ = load_model_for_inference(summary["checkpoint"], device="cpu")
    after = evaluate(model, val, **eval_args)
    _say(f"final validation perplexity {after['ppl']:.1f} (loss {after['loss']:.3f})")

    _say("samples (temperature 0.8, top-k 50):")
    for i, prompt in enumerate(PROMPTS):
        print("  ", end="")
        _print_generation(
            model,
            tokenizer,
            prompt,
            max_new_tokens=cfg.train.sample_max_new_tokens,
            temperature=0.8,
            top_k=50,
            seed=cfg.run.seed + i,
        )
    hf_dir = export_checkpoint(summary["checkpoint"], out / "hf", fmt="hf", dtype="float32", overwrite=True)

    result = {
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "train_loss_first": summary.get("first_loss"),
        "train_loss": summary.get("loss"),
        "val_loss_before": before["loss"],
        "val_loss_after": after["loss"],
        "val_ppl_before": before["ppl"],
        "val_ppl_after": after["ppl"],
        "val_tokens": after["tokens"],
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_seconds": summary.get("elapsed"),
        "wall_seconds": time.perf_counter() - t_start,
        "paths": {
            "corpus": sources[0] if len(sources) == 1 else ", ".join(sources),
            "tokenizer": str(tok_dir),
            "data": str(data_dir),
            "run": str(run_dir),
            "checkpoint": summary["checkpoint"],
            "hf_export": str(hf_dir),
        },
    }
    print(format_table(result), flush=True)
    return result


def format_table(r: dict) -> str:
    def num(x, fmt):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    drop = r["val_ppl_before"] / r["val_ppl_after"]
    rows = [
        ("tokens seen", f"{r['tokens']:,} in {r['steps']} steps"),
        ("train loss", f"{num(r['train_loss_first'], '.3f')} -> {num(r['train_loss'], '.3f')}"),
        ("val loss", f"{r['val_loss_before']:.3f} -> {r['val_loss_after']:.3f} ({r['val_tokens']:,} tokens)"),
        ("val perplexity", f"{r['val_ppl_before']:.1f} -> {r['val_ppl_after']:.1f} ({drop:.1f}x lower)"),
        ("train tokens/s", num(r["tokens_per_s"], ",.0f")),
        ("time", f"{r['wall_seconds']:.0f} s total, {num(r['train_seconds'], '.0f')} s training"),
    ] + [(name.replace("_", " "), path) for name, path in r["paths"].items()]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])
