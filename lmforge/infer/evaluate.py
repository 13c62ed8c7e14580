"""Validation loss and perplexity: a token-weighted mean of next-token cross-entropy.

The token stream is cut into consecutive, non-overlapping windows of `seq_len + 1` tokens (the
packed-mode layout of training: inputs `[:-1]`, targets `[1:]`); a shorter last window is
evaluated too, so every token after a window start counts once. `ppl = exp(mean loss)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from lmforge.errors import DataError
from lmforge.loss import IGNORE_INDEX, summed_cross_entropy


def windows(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, stop) of each evaluation window over a stream of `num_tokens` tokens."""
    span = seq_len + 1
    out = [(s, min(s + span, num_tokens)) for s in range(0, num_tokens, span)]
    return [(a, b) for a, b in out if b - a >= 2]


def _token_source(data):
    """A `tokens(start, stop) -> array` function and the stream length for a dataset-like object."""
    if hasattr(data, "tokens") and hasattr(data, "num_tokens"):
        return data.tokens, int(data.num_tokens)
    arr = np.asarray(data, dtype=np.int64).reshape(-1)
    return (lambda a, b: arr[a:b]), int(arr.size)


def mean_loss(
    model: torch.nn.Module,
    batches: Iterable,
    batch_sums,
    *,
    device,
    max_batches: int | None = None,
    reduce=None,
) -> dict:
    """THE validation loop (`evaluate` and the trainer's validation run it): up to `max_batches`
    of `batches`, each through `batch_sums(batch) -> (summed token CE, target tokens)` in eval mode
    without gradients; the sums, accumulated in float64 on `device`, go through `reduce` (the
    trainer's sum over data-parallel ranks) and are read once. Returns {loss, ppl, tokens}: the
    token-weighted mean loss (0 with no tokens) and ppl = exp(loss)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    tokens = torch.zeros((), device=device, dtype=torch.float64)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                ce, n = batch_sums(batch)
                loss_sum += ce.double()
                tokens += torch.as_tensor(n, device=device).double()
    finally:
        model.train(was_training)
    if reduce is not None:
        loss_sum, tokens = reduce(loss_sum), reduce(tokens)
    loss_sum, tokens = torch.stack([loss_sum, tokens]).tolist()
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


def _window_batches(data, seq_len: int, batch_size: int):
    """Batches of consecutive windows (module docstring) over a dataset-like token stream: full
    windows `batch_size` at a time, then each shorter one alone."""
    tokens, num_tokens = _token_source(data)
    spans = windows(num_tokens, seq_len)
    full = [s for s in spans if s[1] - s[0] == seq_len + 1]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in spans if s[1] - s[0] != seq_len + 1]
    for group in groups:
        block = torch.from_numpy(np.stack([np.asarray(tokens(a, b), dtype=np.int64) for a, b in group]))
        yield {"input_ids": block[:, :-1], "labels": block[:, 1:]}


def evaluate(
    model: torch.nn.Module,
    data,
    seq_len: int = 512,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Mean loss, perplexity and token count of `model` on `data`.

    `data` is a TokenDataset (anything with `tokens(start, stop)` and `num_tokens`), a 1-D array
    or list of token ids, or an iterable of batches (dicts with `input_ids` and `labels`, -100 =
    no loss), as the training loader yields them."""
    if device is None:
        device = next(model.parameters()).device
    batches = data if _is_batch_iterable(data) else _window_batches(data, seq_len, batch_size)

    def batch_sums(batch):
        labels = batch["labels"].to(device)
        ce = summed_cross_entropy(model(batch["input_ids"].to(device)).logits, labels)
        return ce, (labels != IGNORE_INDEX).sum()

    result = mean_loss(model, batches, batch_sums, device=device, max_batches=max_batches)
    if result["tokens"] == 0:
        raise DataError(
            "evaluate: no tokens to evaluate; the validation data is empty or shorter than 2 tokens"
        )
    return result


def fmt_ppl(x) -> str:
    """Perplexity a person can read: 'inf' when it overflowed, scientific above a million."""
    if x is None:
        return "n/a"
    if not math.isfinite(x) or x >= 1e300:
        return "inf"
    return f"{x:.3e}" if x >= 1e6 else f"{x:.2f}"


def _is_batch_iterable(data) -> bool:
    if hasattr(data, "tokens") or isinstance(data, (np.ndarray, torch.Tensor, Sequence)):
        return False
    return isinstance(data, Iterable)


def text_token_stream(
    paths: list[str], tokenizer, fmt: str = "auto", text_field: str = "text", bos: bool = True, counts=None
) -> np.ndarray:
    """Tokenize raw text files on the fly into one stream laid out like a prepared split:
    each document is [bos] + tokens + [eos] ([bos] only when `bos`); `counts` (a dict) gets the
    number of documents."""
    import sys

    from lmforge.data.sources import SourceStats, iter_documents

    ids: list[int] = []
    start = [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []
    stats = SourceStats()
    documents = 0
    for doc in iter_documents(paths, fmt=fmt, text_field=text_field, stats=stats):
        ids += start + tokenizer.encode(doc.text) + [tokenizer.eos_id]
        documents += 1
    if counts is not None:
        counts["documents"] = documents
    if stats.total_skipped or stats.empty_files:  # bad records are skipped and counted, never silent
        print(f"eval: {stats.summary()}", file=sys.stderr)
    return np.asarray(ids, dtype=np.int64)
