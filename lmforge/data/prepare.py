"""`lmforge prepare`: documents -> token shards + meta.json, in parallel, deterministically.

Pipeline: the main process streams documents (`iter_documents`) into chunks of about
`chunk_bytes` of text; worker processes (each loading the tokenizer once) turn a chunk into one
flat array of [bos] + ids + [eos] per document plus the document lengths; results come back in
input order, and the main process routes each document to the train or val `ShardWriter`. At most `2 * workers + 2` chunks are in flight, so memory does not depend on the
corpus size. Output bytes depend only on the inputs and the tokenizer, never on `workers`.

Split rule: documents are numbered 0, 1, 2, ... in input order (after skips); document i goes to
val when ceil((i+1)*f) > ceil(i*f) for f = val_fraction, i.e. documents 0, 1/f, 2/f, ... (evenly
spread, ceil(n*f) of n, so any non-empty corpus has a val document when f > 0).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import sys
import time
import types
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.shards import (
    DEFAULT_SHARD_TOKENS,
    DTYPES,
    META_NAME,
    ShardWriter,
    clear_prepared,
    dtype_for_vocab,
    file_sha256,
    read_meta,
    write_meta,
)
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer, load_tokenizer

CHUNK_BYTES = 1 << 18  # 256 KiB: enough chunks to keep every worker busy on small corpora
SPLIT_RULE = "document i (input order) is val when ceil((i+1)*val_fraction) > ceil(i*val_fraction)"

# -- worker side -------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _init_worker(tok_path: str, fingerprint: str, dtype: str) -> None:
    # Processes, not threads, give the parallelism; keep each worker's encoder single-threaded.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    # An initializer exception only shows as a broken pool; report the real one with the first chunk.
    try:
        tok = load_tokenizer(tok_path)
        if tok.fingerprint != fingerprint:
            raise DataError(
                f"{tok_path}: reloading the tokenizer in a worker gave a different fingerprint "
                "(file changed, or an in-memory tokenizer); use workers=1 or a tokenizer loaded from disk"
            )
    except Exception as exc:  # noqa: BLE001 - re-raised in _encode_chunk
        _W["error"] = exc
        return
    _set_encoder(tok, dtype)


def _set_encoder(tok: Tokenizer, dtype: str) -> None:
    _W["tok"] = tok
    _W["prefix"] = () if tok.bos_id is None else (tok.bos_id,)
    _W["suffix"] = (tok.eos_id,)
    _W["dtype"] = DTYPES[dtype]


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One chunk -> (all documents' [bos]+ids+[eos] back to back, per-document lengths)."""
    if "error" in _W:
        raise _W["error"]
    batch = _W["tok"].encode_batch(texts)
    pre, post = _W["prefix"], _W["suffix"]
    extra = len(pre) + len(post)
    lengths = np.fromiter((len(ids) + extra for ids in batch), dtype=np.int64, count=len(batch))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(pre, ids, post) for ids in batch),
        dtype=_W["dtype"],
        count=int(lengths.sum()),
    )
    return flat, lengths


# -- main process ------------------------------------------------------------------------------
def _source_files(inputs) -> list[dict[str, Any]]:
    """Every input file (expanded exactly as the readers expand it) with its sha256 and size;
    `hf:` dataset specs are recorded by name. Raises DataError for missing inputs."""
    from lmforge.data.sources import expand_inputs

    sources = []
    for item in expand_inputs(inputs):
        if isinstance(item, str):
            sources.append({"path": item, "sha256": None, "bytes": None})
        else:
            sources.append(
                {"path": str(item.resolve()), "sha256": file_sha256(item), "bytes": item.stat().st_size}
            )
    return sources


def _skips(stats, counters: dict[str, int]) -> dict[str, int]:
    """Skipped records by reason (from the readers' SourceStats) plus prepare's own counts."""
    found = {str(k): int(v) for k, v in sorted(getattr(stats, "skipped", {}).items())}
    if getattr(stats, "empty_files", 0):
        found["empty_files"] = int(stats.empty_files)
    found.update({k: v for k, v in counters.items() if v})
    return found


def _chunks(documents, chunk_bytes: int, counters: dict[str, int]):
    """(texts, UTF-8 bytes) of about `chunk_bytes` each, in document order."""
    texts, size = [], 0
    for doc in documents:
        text = doc.text
        if not text:
            counters["empty_documents"] += 1
            continue
        texts.append(text)
        size += len(text.encode("utf-8"))
        if size >= chunk_bytes:
            yield texts, size
            texts, size = [], 0
    if texts:
        yield texts, size


@contextlib.contextmanager
def _caller_main_hidden():
    """Start spawn workers without re-running the caller's `__main__` in them: workers need only
    this module, and hiding it lets scripts without an `if __name__ == "__main__"` guard, stdin
    and notebooks use workers > 1 (spawn would otherwise re-execute the script in every worker)."""
    real = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = real


def _worker_ready() -> None:
    if "error" in _W:
        raise _W["error"]


def _encode_in_workers(chunks, workers: int, tok: Tokenizer, dtype: str):
    """Yield (flat, lengths, nbytes) per chunk in input order, encoded by `workers` processes.

    At most 2 * workers + 2 chunks are in flight, so memory stays bounded whatever the corpus
    size. (Pool.imap would read the whole corpus into its task queue, and Pool respawns workers
    that die at start-up forever; a ProcessPoolExecutor reports them as BrokenProcessPool.)"""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ahead = 2 * workers + 2
    executor = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),  # no inherited locks or thread pools from the caller
        initializer=_init_worker,
        initargs=(str(tok.path), tok.fingerprint, dtype),
    )
    pending: deque = deque()
    try:
        with _caller_main_hidden():  # each submit starts one worker until all are running
            started = [executor.submit(_worker_ready) for _ in range(workers)]
        for future in started:
            future.result()
        for texts, nbytes in chunks:
            pending.append((executor.submit(_encode_chunk, texts), nbytes))
            while len(pending) >= ahead:
                future, size = pending.popleft()
                yield (*future.result(), size)
        while pending:
            future, size = pending.popleft()
            yield (*future.result(), size)
    except BrokenProcessPool as exc:
        raise DataError(
            f"{tok.path}: a tokenizer worker process died ({exc}); run with workers=1 to see why"
        ) from None
    finally:
        for future, _ in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _encode_here(chunks, tok: Tokenizer, dtype: str):
    _set_encoder(tok, dtype)
    for texts, nbytes in chunks:
        yield (*_encode_chunk(texts), nbytes)


def _resolve_dtype(tok: Tokenizer, dtype: str | None) -> str:
    if dtype is None:
        return dtype_for_vocab(tok.vocab_size)
    if dtype not in DTYPES:
        raise DataError(f"dtype {dtype!r}: not a shard dtype; use one of {sorted(DTYPES)} or leave it unset")
    if tok.vocab_size - 1 > np.iinfo(DTYPES[dtype]).max:
        raise DataError(
            f"{tok.path}: tokenizer {tok.name} has {tok.vocab_size} ids, more than dtype {dtype} holds; "
            f"use dtype {dtype_for_vocab(tok.vocab_size)} (or leave dtype unset)"
        )
    return dtype


def _check_out_dir(
    out: Path, fingerprint: str, sources: list, settings: dict, overwrite: bool
) -> dict | None:
    """The existing meta when `out` already holds this exact prepare; DataError when it holds a
    complete prepare of something else (unless overwrite); None when there is work to do."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another output folder")
    if not (out / META_NAME).is_file() or overwrite:
        return None
    try:
        meta = read_meta(out)
    except DataError:
        return None  # unreadable meta: treat as unfinished and redo
    same = (
        meta.get("tokenizer_fingerprint") == fingerprint
        and meta.get("sources") == sources
        and meta.get("settings") == settings
    )
    if same:
        return meta
    raise DataError(
        f"{out}: already holds a complete prepare of other inputs, tokenizer or settings; "
        "choose another output folder or pass overwrite (--overwrite)"
    )


def prepare_dataset(
    inputs,
    tokenizer,
    out_dir,
    workers: int = 1,
    val_fraction: float = 0.01,
    fmt: str = "auto",
    text_field: str = "text",
    strict: bool = False,
    dtype: str | None = None,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Tokenize `inputs` into train/val shards in `out_dir` and return a summary dict. See the
    module docstring for the pipeline and the split rule. `tokenizer` is a `Tokenizer` or a path."""
    from lmforge.data.sources import FORMATS, SourceStats, iter_documents

    start = time.perf_counter()
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction}: must be in [0, 1)")
    if workers < 1:
        raise DataError(f"workers {workers}: must be >= 1")
    if fmt not in ("auto", *FORMATS):  # checked before clear_prepared can remove an old prepare
        raise DataError(f"unknown format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    dtype = _resolve_dtype(tok, dtype)
    out = Path(out_dir)
    sources = _source_files(inputs)
    settings = {
        "fmt": fmt,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
    }
    done = _check_out_dir(out, tok.fingerprint, sources, settings, overwrite)
    if done is not None:
        summary = dict(done.get("summary", {}), out_dir=str(out), reused=True)
        if progress:
            print(f"{out}: already prepared with the same inputs and tokenizer; nothing to do")
        return summary
    clear_prepared(out)  # meta.json goes first, so the folder stops looking complete at once

    frac = Fraction(val_fraction).limit_denominator(1_000_000)
    p, q = frac.numerator, frac.denominator
    stats = SourceStats()
    counters = {"empty_documents": 0}
    documents = iter_documents(inputs, fmt=fmt, text_field=text_field, strict=strict, stats=stats)
    chunks = _chunks(documents, chunk_bytes, counters)
    if workers > 1:
        results = _encode_in_workers(chunks, workers, tok, dtype)
    else:
        results = _encode_here(chunks, tok, dtype)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc=f"prepare {out.name}", smoothing=0.1)
    n_docs = n_tokens = text_bytes = 0
    splits: dict[str, Any] = {}
    try:
        with (
            ShardWriter(out, "train", dtype, shard_tokens) as train_w,
            ShardWriter(out, "val", dtype, shard_tokens) as val_w,
        ):
            for flat, lengths, nbytes in results:
                offsets = np.concatenate(([0], np.cumsum(lengths)))
                for j in range(len(lengths)):
                    i = n_docs + j
                    is_val = p and -(-(i + 1) * p // q) > -(-i * p // q)
                    # A copy, not a view: ShardWriter buffers documents until 1M tokens, and a view
                    # would pin the whole chunk (the val split fills that buffer ~100x slower).
                    doc = flat[offsets[j] : offsets[j + 1]].copy()
                    (val_w if is_val else train_w).add_document(doc)
                n_docs += len(lengths)
                n_tokens += int(offsets[-1])
                text_bytes += nbytes
                if bar is not None:
                    bar.update(nbytes)
                    rate = n_tokens / max(bar.format_dict["elapsed"], 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            splits = {"train": train_w.close(), "val": val_w.close()}
    finally:
        results.close()  # stops the workers now, also on errors and Ctrl-C
        if bar is not None:
            bar.close()
    if n_docs == 0:
        clear_prepared(out)
        raise DataError(
            f"{inputs}: no documents found (empty corpus); check the input paths and --text-field"
        )
    if p and splits["train"]["docs"] == 0:
        clear_prepared(out)
        raise DataError(
            f"{inputs}: only {n_docs} document(s), all in the val split; add documents or set val_fraction 0"
        )
    seconds = time.perf_counter() - start
    specials = n_docs * ((tok.bos_id is not None) + 1)
    summary = {
        "documents": n_docs,
        "tokens": n_tokens,
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "train_docs": splits["train"]["docs"],
        "val_docs": splits["val"]["docs"],
        "text_bytes": text_bytes,
        "bytes_per_token": round(text_bytes / max(n_tokens - specials, 1), 4),
        "skipped": _skips(stats, counters),
        "skip_examples": list(getattr(stats, "examples", [])),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
        "workers": workers,
        "dtype": dtype,
        "splits": {k: {"docs": v["docs"], "tokens": v["tokens"]} for k, v in splits.items()},
    }
    meta = {
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint,
        "tokenizer": {"kind": tok.kind, "name": tok.name, "path": str(Path(tok.path).resolve())},
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "splits": splits,
        "split_rule": SPLIT_RULE,
        "sources": sources,
        "settings": settings,
        "summary": {k: v for k, v in summary.items() if k not in ("seconds", "tokens_per_s", "workers")},
    }
    write_meta(out, meta)  # last: from here on the folder is a complete prepare
    summary["out_dir"] = str(out)
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    skipped = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in s["skipped"].items()) or "none"
    mb_per_s = s["text_bytes"] / 1e6 / max(s["seconds"], 1e-9)
    return (
        f"prepared {s['documents']:,} documents -> {s['tokens']:,} tokens "
        f"(train {s['train_docs']:,} docs / {s['train_tokens']:,} tok, val {s['val_docs']:,} docs / "
        f"{s['val_tokens']:,} tok), {s['text_bytes'] / 1e6:.1f} MB text, {s['bytes_per_token']:.2f} bytes/token, "
        f"{s['dtype']}, skipped: {skipped}, {s['seconds']:.1f} s ({mb_per_s:.2f} MB/s, {s['tokens_per_s']:,.0f} tok/s, "
        f"{s['workers']} worker{'s' if s['workers'] > 1 else ''})"
        + "".join(f"\n  e.g. {example}" for example in s.get("skip_examples", []))
    )
