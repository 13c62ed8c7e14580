"""Validation loss/perplexity and sample generations during training.

Both run inside `torch.random.fork_rng` so evaluating never shifts the training run's random
streams (exact resume does not depend on where evaluations fell).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lmforge.infer.generate import encode_prompt, generate
from lmforge.loss import IGNORE_INDEX, summed_cross_entropy
from lmforge.parallel import loss_parallel_context, plain
from lmforge.tokenizer import load_tokenizer


def _fork(device: torch.device):
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@torch.no_grad()
def validate(model, val_loader, ctx, amp, max_batches: int) -> dict:
    """Token-weighted mean loss over up to `max_batches` validation batches (the same ones every
    time), reduced over data-parallel ranks; ppl = exp(loss)."""
    was_training = model.training
    model.eval()
    device = ctx.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    tokens = torch.zeros((), device=device, dtype=torch.float64)
    try:
        with _fork(device):
            val_loader.reset()
            for i, batch in enumerate(val_loader):
                if i >= max_batches:
                    break
                # The same attention masks and positions as training (data.document_mask /
                # reset_positions), so validation measures the model that is being trained.
                masks = {k: batch[k] for k in ("doc_ids", "position_ids") if k in batch}
                with amp:
                    logits = model(batch["input_ids"], **masks).logits
                labels = batch["labels"]
                with loss_parallel_context(model):  # vocab-sharded logits (parallel.loss_parallel)
                    loss_sum += plain(summed_cross_entropy(logits, labels)).double()
                tokens += (labels != IGNORE_INDEX).sum().double()
            val_loader.close()
    finally:
        model.train(was_training)
    loss_sum, tokens = ctx.reduce_sum(loss_sum), ctx.reduce_sum(tokens)
    loss = (loss_sum / tokens.clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(tokens.item())}


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
