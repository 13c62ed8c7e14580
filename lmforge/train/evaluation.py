"""Validation loss/perplexity and sample generations during training.

Both run inside `torch.random.fork_rng` so evaluating never shifts the training run's random
streams (exact resume does not depend on where evaluations fell).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.infer.evaluate import mean_loss
from lmforge.infer.generate import encode_prompt, generate
from lmforge.tokenizer import load_tokenizer


def _fork(device: torch.device):
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def validate(train_step, val_loader, ctx, max_batches: int) -> dict:
    """Token-weighted mean loss over up to `max_batches` validation batches (the same ones every
    time), reduced over data-parallel ranks; ppl = exp(loss). The loop is infer's `mean_loss`; the
    train step's forward-only `eval_sums` gives each batch's sums: the same loss, attention masks
    and positions (data.document_mask / reset_positions) as training, on every layout (a pipeline
    passes them through its stages)."""
    with _fork(ctx.device):
        val_loader.reset()
        try:
            out = mean_loss(
                train_step.model,
                val_loader,
                lambda batch: train_step.eval_sums([batch]),
                device=ctx.device,
                max_batches=max_batches,
                reduce=ctx.reduce_sum,
            )
        finally:
            val_loader.close()
    return {"val_loss": out["loss"], "val_ppl": out["ppl"], "val_tokens": out["tokens"]}


def load_sample_tokenizer(path: str | None):
    """The tokenizer for samples, or (None, reason) when there is none to use."""
    if not path:
        return None, "no tokenizer.path in the config"

    return load_tokenizer(path), ""


@torch.no_grad()
def write_samples(
    model, tokenizer, prompts: list[str], max_new_tokens: int, step: int, out: Path, ctx, seed: int
) -> list[dict]:
    """Greedy continuations of fixed prompts; every rank runs the forwards (sharded models need
    all of them), rank 0 appends to samples.jsonl."""

    records = []
    with _fork(ctx.device):
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt)
            new = generate(model, ids, max_new_tokens, temperature=0.0, seed=seed, eos_id=tokenizer.eos_id)
            records.append({"step": step, "prompt": prompt, "text": tokenizer.decode(new)})
    if ctx.is_main and records:
        with open(out, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return records
