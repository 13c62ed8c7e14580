"""Encode one work unit of `lmforge prepare` into its own shard files, and the local engine that
runs units in this process or in a pool of worker processes (`ray_engine.py` runs the same
`encode_unit` in Ray tasks, so both engines write the same bytes).

A unit `u` writes `train-u{u:05d}_NNNNN.bin/.idx` and `val-u{u:05d}_NNNNN.bin/.idx` (each renamed
into place when complete), then its record `prepare.state/u{u:05d}.json` (atomically, last): a
unit with a record is done and a resumed prepare skips it; a unit without one is redone from
scratch (its partial files removed first).

Split rule: document j of unit u (counted after skipped records) goes to val when
ceil((k+1)*f) > ceil(k*f) for k = j + phase(u), f = val_fraction; phase(0) = 0 and
phase(u) = (u * 2654435761) mod q for f = p/q spreads val documents evenly over units without
counting the documents of earlier units (which a parallel engine cannot know). A one-unit corpus
keeps the plain rule: documents 0, 1/f, 2/f, ... are val, so any non-empty corpus has one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.shards import DTYPES, ShardWriter
from lmforge.errors import DataError

STATE_DIR = "prepare.state"
ENCODE_BYTES = 1 << 20  # text per encode_batch call: large enough to amortise the call
SPLIT_RULE = (
    "document j of unit u is val when ceil((k+1)*val_fraction) > ceil(k*val_fraction), "
    "k = j + (0 if u == 0 else u * 2654435761 mod q), val_fraction = p/q"
)


def unit_phase(unit_id: int, q: int) -> int:
    return 0 if unit_id == 0 else (unit_id * 2654435761) % q


def doc_is_val(k: int, p: int, q: int) -> bool:
    """The split rule for one document (k = j + phase): ceil((k+1)*p/q) > ceil(k*p/q)."""
    return p > 0 and -(-(k + 1) * p // q) > -(-k * p // q)


def is_streamed_txt(unit: dict[str, Any]) -> bool:
    """A whole .txt file is one document of any size: encoded piece by piece, never held whole."""
    return unit["kind"] == "file" and unit["fmt"] == "txt"


def record_path(out: Path, unit_id: int) -> Path:
    return out / STATE_DIR / f"u{unit_id:05d}.json"


def remove_unit_files(out: Path, unit_id: int) -> None:
    for p in out.glob(f"*-u{unit_id:05d}_[0-9][0-9][0-9][0-9][0-9].*"):
        p.unlink()


def _batches(documents, counters: dict[str, int]):
    texts, size = [], 0
    for doc in documents:
        if not doc.text:
            counters["empty_documents"] += 1
            continue
        texts.append(doc.text)
        size += len(doc.text.encode("utf-8"))
        if size >= ENCODE_BYTES:
            yield texts, size
            texts, size = [], 0
    if texts:
        yield texts, size


def _encode(tok, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (all documents' [bos]+ids+[eos] back to back, per-document lengths)."""
    batch = tok.encode_batch(texts)
    pre = () if tok.bos_id is None else (tok.bos_id,)
    post = (tok.eos_id,)
    lengths = np.fromiter((len(ids) + len(pre) + 1 for ids in batch), dtype=np.int64, count=len(batch))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(pre, ids, post) for ids in batch),
        dtype=dtype,
        count=int(lengths.sum()),
    )
    return flat, lengths


def _encode_txt_unit(unit, job, tok, dtype, stats, writers, report) -> tuple[int, int, int, int]:
    """(documents, tokens, text bytes, bytes reported) of a .txt unit: its one document's split is
    decided before anything is encoded, then each piece's ids go straight into that split's shard."""
    from lmforge.data.units import txt_unit_pieces

    val = doc_is_val(unit_phase(unit["id"], job["q"]), job["p"], job["q"])
    writer = writers["val" if val else "train"]
    head = [] if tok.bos_id is None else [tok.bos_id]
    tokens = text_bytes = seen = 0
    for piece in txt_unit_pieces(unit, stats, job["strict"]):
        ids = np.asarray(head + tok.encode(piece), dtype=dtype)
        head = []
        writer.add_document_part(ids, end=False)
        tokens += ids.size
        text_bytes += len(piece.encode("utf-8"))
        if report is not None:
            report(stats.bytes - seen, ids.size)
            seen = stats.bytes
    if tokens == 0:
        return 0, 0, 0, seen
    writer.add_document_part(np.asarray([tok.eos_id], dtype=dtype), end=True)
    return 1, tokens + 1, text_bytes, seen


def encode_unit(unit: dict[str, Any], job: dict[str, Any], tok, report=None) -> dict[str, Any]:
    """Read, tokenize and write one unit; returns (and stores) its record. `report(bytes, tokens)`
    is called as input is consumed (progress)."""
    from lmforge.data.sources import SourceStats
    from lmforge.data.units import iter_unit

    out, uid = Path(job["out"]), unit["id"]
    p, q = job["p"], job["q"]
    dtype = DTYPES[job["dtype"]]
    remove_unit_files(out, uid)
    stats, counters = SourceStats(), {"empty_documents": 0}
    phase, j, tokens, text_bytes, seen = unit_phase(uid, q), 0, 0, 0, 0
    docs = () if is_streamed_txt(unit) else iter_unit(unit, job["text_field"], stats, job["strict"])
    with (
        ShardWriter(out, "train", job["dtype"], job["shard_tokens"], prefix=f"train-u{uid:05d}") as train_w,
        ShardWriter(out, "val", job["dtype"], job["shard_tokens"], prefix=f"val-u{uid:05d}") as val_w,
    ):
        if is_streamed_txt(unit):
            writers = {"train": train_w, "val": val_w}
            j, tokens, text_bytes, seen = _encode_txt_unit(unit, job, tok, dtype, stats, writers, report)
        for texts, nbytes in _batches(docs, counters):
            flat, lengths = _encode(tok, texts, dtype)
            if p:
                k = np.arange(j + phase, j + phase + len(lengths), dtype=np.int64)
                val = -(-(k + 1) * p // q) > -(-k * p // q)
            if p and val.any():
                mask = np.repeat(val, lengths)
                val_w.add_documents(flat[mask], lengths[val])
                train_w.add_documents(flat[~mask], lengths[~val])
            else:
                train_w.add_documents(flat, lengths)
            j += len(lengths)
            tokens += flat.size
            text_bytes += nbytes
            if report is not None:
                report(stats.bytes - seen, flat.size)
                seen = stats.bytes
        splits = {"train": train_w.close(), "val": val_w.close()}
    if report is not None and unit["bytes"] > seen:
        report(unit["bytes"] - seen, 0)  # the unit's planned size, so totals add up
    skipped = {str(k): int(v) for k, v in sorted(stats.skipped.items())}
    if stats.empty_files:
        skipped["empty_files"] = int(stats.empty_files)
    skipped.update({k: v for k, v in counters.items() if v})
    record = {
        "unit": unit,
        "splits": splits,
        "documents": j,
        "tokens": tokens,
        "text_bytes": text_bytes,
        "skipped": skipped,
        "examples": list(stats.examples),
    }
    path = record_path(out, uid)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)
    return record


# -- local engine ------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _init_worker(job: dict[str, Any], queue) -> None:
    # Processes, not threads, give the parallelism; keep each worker's encoder single-threaded.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _W["queue"] = queue
    try:  # an initializer exception only shows as a broken pool; re-raise it with the first unit
        _W["tok"] = load_checked_tokenizer(job)
    except Exception as exc:  # noqa: BLE001
        _W["error"] = exc


def load_checked_tokenizer(job: dict[str, Any]):
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(job["tok_path"])
    if tok.fingerprint != job["fingerprint"]:
        raise DataError(
            f"{job['tok_path']}: reloading the tokenizer in a worker gave a different fingerprint "
            "(file changed, or an in-memory tokenizer); use workers=1 or a tokenizer loaded from disk"
        )
    return tok


def _worker_unit(unit: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    if "error" in _W:
        raise _W["error"]
    queue = _W["queue"]
    return encode_unit(unit, job, _W["tok"], report=lambda b, t: queue.put((b, t)))


@contextlib.contextmanager
def _caller_main_hidden():
    """Start spawn workers without re-running the caller's `__main__` in them (scripts without an
    `if __name__ == "__main__"` guard, stdin and notebooks can use workers > 1)."""
    real = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = real


def run_local(todo: list[dict], job: dict[str, Any], tok, workers: int, progress) -> list[dict]:
    """Encode `todo` units here (workers=1) or in `workers` spawned processes; records in any order."""
    if workers == 1 or len(todo) <= 1:
        records = []
        for unit in todo:
            records.append(encode_unit(unit, job, tok, report=progress.update))
            progress.unit_done(records[-1])
        return records
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")  # no inherited locks or thread pools from the caller
    queue = ctx.Queue()
    executor = ProcessPoolExecutor(
        min(workers, len(todo)), mp_context=ctx, initializer=_init_worker, initargs=(job, queue)
    )
    records: list[dict] = []
    try:
        with _caller_main_hidden():
            pending = {executor.submit(_worker_unit, unit, job) for unit in todo}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(queue, progress)
            for future in done:
                records.append(future.result())
                progress.unit_done(records[-1])
        _drain(queue, progress)
    except BrokenProcessPool as exc:
        raise DataError(
            f"{job['tok_path']}: a tokenizer worker process died ({exc}); run with workers=1 to see why"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return records


def _drain(queue, progress) -> None:
    import queue as queue_mod

    while True:
        try:
            nbytes, ntokens = queue.get_nowait()
        except (queue_mod.Empty, OSError, ValueError):
            return
        progress.update(nbytes, ntokens)
