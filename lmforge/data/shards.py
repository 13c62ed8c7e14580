"""The prepared-dataset format: token shards, document indexes and `meta.json`.

A prepared folder holds, per split (`train`, `val`):

    <split>_00000.bin   raw token ids (uint16 or uint32, little-endian), documents back to back
    <split>_00000.idx   raw little-endian int64 document start offsets into that .bin plus the end
                        (docs + 1 values, first 0, last = tokens of the shard)

and one `meta.json`, written LAST and atomically; a folder without it is an unfinished prepare.
A document never straddles two shards. Writing (`lmforge prepare`) looks like::

    dtype = dtype_for_vocab(tok.vocab_size)
    with ShardWriter(out, "train", dtype) as w:          # an exception removes the temp files
        for ids in documents:                            # ids already hold [bos] + tokens + [eos]
            w.add_document(np.asarray(ids))
        train = w.close()                                # {"shards": [...], "tokens", "docs", "max_id"}
    ... same for "val" ...
    write_meta(out, {"dtype": dtype, "vocab_size": ..., "tokenizer_fingerprint": ...,
                     "bos_id": ..., "eos_id": ..., "pad_id": ..., "splits": {"train": train, "val": val},
                     "sources": [{"path", "sha256", "bytes"}], ...})   # format_version filled in

Reading: `TokenDataset.open(folder, "train", expect_fingerprint, vocab_size)` checks the folder
and returns a memmapped view over all shards of the split; it raises `DataError` (one line
naming the file) for anything that is not a complete, consistent prepared dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError

FORMAT_VERSION = 1
META_NAME = "meta.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
INDEX_DTYPE = np.dtype("<i8")
DEFAULT_SHARD_TOKENS = 100_000_000
# On open, .bin files are hashed when the whole split is at most this big; larger splits get
# size and index checks only (hash them with `TokenDataset.verify()`).
HASH_ON_OPEN_BYTES = 64 * 1024 * 1024
_FLUSH_TOKENS = 1 << 20
EAGER_SHARDS = 64  # splits with at most this many shards are fully checked at open
MAX_OPEN_SHARDS = 256  # memory maps kept open at once (file descriptors, page tables)
_HASH_CHUNK = 8 * 1024 * 1024


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest shard dtype holding ids 0..vocab_size-1: "uint16" up to 65,536 ids, else "uint32"."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


def _sync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())  # the data is on disk before the rename that makes it look complete
    f.close()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Append documents of one split to `<split>_NNNNN.bin/.idx` shards in `out_dir`.

    `add_document(ids)` takes a 1-D integer array (the caller adds bos/eos); ids must fit `dtype`.
    A new shard starts when the current one holds >= `shard_tokens` tokens (documents are never
    split). Each shard is written as `<name>.bin.tmp` / `<name>.idx.tmp` and renamed only when it
    is complete. `close()` returns the split summary that goes into meta.json["splits"][split]:
    {"shards": [{"file", "index", "tokens", "docs", "max_id", "sha256", "index_sha256"}],
     "tokens", "docs", "max_id"}. Used as a context manager, an exception calls `abort()`,
    which deletes the temp files of the shard in progress.
    """

    def __init__(
        self, out_dir: str | Path, split: str, dtype: str, shard_tokens: int = DEFAULT_SHARD_TOKENS, prefix: str = ""
    ):
        if dtype not in DTYPES:
            raise DataError(f"shard dtype '{dtype}' is not supported; use one of {sorted(DTYPES)}")
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.prefix = split, prefix or split  # files are <prefix>_NNNNN.bin/.idx
        self.dtype = DTYPES[dtype]
        self.max_value = int(np.iinfo(self.dtype).max)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._closed = False
        self._part_tokens = 0  # tokens of the document add_document_part is writing (0: none open)

    # -- one shard in progress ----------------------------------------------------------------
    def _start_shard(self) -> None:
        self._name = name = f"{self.prefix}_{len(self.shards):05d}"
        self._bin_tmp = self.out_dir / f"{name}.bin.tmp"
        self._file = open(self._bin_tmp, "wb")  # noqa: SIM115  (kept open across add_document calls)
        self._hash = hashlib.sha256()
        # array('q'): 8 bytes per document instead of ~40 for a list of Python ints.
        self._offsets, self._tokens, self._max_id, self._max_doc = array("q", [0]), 0, -1, 0
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def _flush(self) -> None:
        if self._pending:
            data = np.concatenate(self._pending).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._pending, self._pending_tokens = [], 0

    def _finish_shard(self) -> None:
        self._flush()
        _sync_close(self._file)
        self._file = None
        index = np.frombuffer(self._offsets, dtype=np.int64).astype(INDEX_DTYPE, copy=False).tobytes()
        idx_tmp = self.out_dir / f"{self._name}.idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(index)
            _sync_close(f)
        os.replace(idx_tmp, self.out_dir / f"{self._name}.idx")
        os.replace(self._bin_tmp, self.out_dir / f"{self._name}.bin")
        self.shards.append(
            {
                "file": f"{self._name}.bin",
                "index": f"{self._name}.idx",
                "tokens": self._tokens,
                "docs": len(self._offsets) - 1,
                "max_id": self._max_id,
                "max_doc": self._max_doc,  # longest document: padded mode checks it without the index
                "sha256": self._hash.hexdigest(),
                "index_sha256": hashlib.sha256(index).hexdigest(),
            }
        )

    # -- public -------------------------------------------------------------------------------
    def add_document(self, ids: np.ndarray | list[int]) -> None:
        """Append one document (1-D ints, bos/eos already included). Empty documents are skipped."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"add_document expects a 1-D integer array, got {arr.dtype} {arr.shape}")
        self.add_document_part(arr, end=True, copy=False)

    def add_document_part(self, ids: np.ndarray, end: bool, copy: bool = True) -> None:
        """Append the next part of one long document (bos/eos included by the caller); `end=True`
        closes it. The parts go to disk as they come (a document of GBs never sits in memory);
        the shard is only cut after the document ends, so a document still never straddles two.
        `copy=False`: the caller hands `ids` over (add_document's whole documents)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        arr = np.asarray(ids)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > self.max_value:
                raise DataError(
                    f"{self.out_dir}: token id {hi if hi > self.max_value else lo} does not fit shard dtype "
                    f"{self.dtype.name}; prepare with dtype uint32 (vocab larger than 65,536?)"
                )
            if self._file is None:
                self._start_shard()
            self._pending.append(arr.astype(self.dtype, copy=copy))
            self._pending_tokens += arr.size
            self._tokens += arr.size
            self._part_tokens = self._part_tokens + arr.size
            self._max_id = max(self._max_id, hi)
            if self._pending_tokens >= _FLUSH_TOKENS:
                self._flush()
        if end and self._part_tokens:
            self._offsets.append(self._tokens)
            self._max_doc = max(self._max_doc, self._part_tokens)
            self._part_tokens = 0
            if self._tokens >= self.shard_tokens:
                self._finish_shard()

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: `flat` holds them back to back, `lengths` their sizes
        (> 0). Same files as one add_document per document, without a Python step per document."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        lengths = np.asarray(lengths, dtype=np.int64)
        if not len(lengths):
            return
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi > self.max_value:
            raise DataError(
                f"{self.out_dir}: token id {hi if hi > self.max_value else lo} does not fit shard dtype "
                f"{self.dtype.name}; prepare with dtype uint32 (vocab larger than 65,536?)"
            )
        ends = np.cumsum(lengths)
        done_docs = done_tok = 0
        while done_docs < len(lengths):
            if self._file is None:
                self._start_shard()
            # Documents up to and including the one that brings the shard to shard_tokens.
            room = self.shard_tokens - self._tokens
            last = int(np.searchsorted(ends, done_tok + room, side="left"))
            stop = min(last + 1, len(lengths))
            part = flat[done_tok : int(ends[stop - 1])]
            self._pending.append(part.astype(self.dtype, copy=True))
            self._pending_tokens += part.size
            self._offsets.extend((self._tokens + ends[done_docs:stop] - done_tok).tolist())
            self._tokens += part.size
            self._max_id = max(self._max_id, int(part.max()))
            self._max_doc = max(self._max_doc, int(lengths[done_docs:stop].max()))
            done_docs, done_tok = stop, int(ends[stop - 1])
            if self._pending_tokens >= _FLUSH_TOKENS:
                self._flush()
            if self._tokens >= self.shard_tokens:
                self._finish_shard()

    def close(self) -> dict[str, Any]:
        """Finish the open shard and return the split summary for meta.json (see class doc)."""
        if self._part_tokens:
            raise RuntimeError("ShardWriter.close: a document added in parts was never ended")
        if not self._closed:
            if self._file is not None:
                self._finish_shard()
            self._closed = True
        totals = {k: sum(x[k] for x in self.shards) for k in ("tokens", "docs")}
        max_id = max((x["max_id"] for x in self.shards), default=-1)
        return {"shards": [dict(x) for x in self.shards], **totals, "max_id": max_id}

    def abort(self) -> None:
        """Drop the shard in progress (its temp files); finished shards stay."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._bin_tmp.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def write_meta(out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write meta.json atomically (temp file, fsync, rename); call it LAST, after every shard.

    Fills in "format_version" when absent. Required: "dtype", "vocab_size", "splits" (the
    ShardWriter.close() summaries by split name). Recommended: "tokenizer_fingerprint", "bos_id",
    "eos_id", "pad_id", "sources"."""
    meta = dict(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    for key in ("dtype", "vocab_size", "splits"):
        if key not in meta:
            raise ValueError(f"write_meta: meta is missing '{key}'")
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"write_meta: dtype must be one of {sorted(DTYPES)}")
    out = Path(out_dir)
    tmp = out / (META_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        _sync_close(f)
    os.replace(tmp, out / META_NAME)
    return out / META_NAME


def read_meta(folder: str | Path) -> dict[str, Any]:
    """meta.json of a prepared folder, with the format version checked; DataError otherwise."""
    folder = Path(folder)
    unfinished = "is not a prepared dataset or its prepare did not finish; run lmforge prepare"
    if not folder.is_dir():
        raise DataError(f"{folder}: {unfinished}")
    path = folder / META_NAME
    if not path.is_file():
        raise DataError(f"{folder}: no {META_NAME}: {unfinished}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); re-run lmforge prepare") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a JSON object; re-run lmforge prepare")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {version!r} is not supported (this lmforge reads {FORMAT_VERSION}); "
            "re-prepare the data with this lmforge version"
        )
    if meta.get("dtype") not in DTYPES or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{path}: missing or invalid 'dtype'/'splits'; re-run lmforge prepare")
    return meta
