"""The prepared-dataset format: token shards, document indexes and `meta.json`.

A prepared folder holds, per split (`train`, `val`):

    <split>_00000.bin   raw token ids (uint16 or uint32, little-endian), documents back to back
    <split>_00000.idx   raw little-endian int64 document start offsets into that .bin plus the end
                        (docs + 1 values, first 0, last = tokens of the shard)

and one `meta.json`, written LAST and atomically; a folder without it is an unfinished prepare.
A document never straddles two shards. Writing (`lmforge prepare`) looks like::

    clear_prepared(out)                                  # drop meta.json first, then stale shards
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

import bisect
import hashlib
import itertools
import json
import os
from array import array
from collections import OrderedDict
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
# size and index checks only (hash them with `TokenDataset.verify()` or `lmforge prepare --verify`).
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


def clear_prepared(out_dir: str | Path) -> None:
    """Make a folder ready for a (re-)prepare: remove meta.json FIRST (so the folder no longer
    looks complete), then every shard, index and temp file a previous prepare left behind.
    Other files (licences, notes) are kept. Creates the folder if needed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)
    (out / (META_NAME + ".tmp")).unlink(missing_ok=True)
    for pattern in ("*_[0-9][0-9][0-9][0-9][0-9].bin*", "*_[0-9][0-9][0-9][0-9][0-9].idx*"):
        for p in out.glob(pattern):
            p.unlink()


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
        if arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > self.max_value:
            raise DataError(
                f"{self.out_dir}: token id {hi if hi > self.max_value else lo} does not fit shard dtype "
                f"{self.dtype.name}; prepare with dtype uint32 (vocab larger than 65,536?)"
            )
        if self._file is None:
            self._start_shard()
        self._pending.append(arr.astype(self.dtype, copy=False))
        self._pending_tokens += arr.size
        self._tokens += arr.size
        self._offsets.append(self._tokens)
        self._max_id = max(self._max_id, hi)
        self._max_doc = max(self._max_doc, arr.size)
        if self._pending_tokens >= _FLUSH_TOKENS:
            self._flush()
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
        if not self._closed:
            if self._file is not None:
                self._finish_shard()
            self._closed = True
        totals = {k: sum(x[k] for x in self.shards) for k in ("tokens", "docs")}
        max_id = max((x["max_id"] for x in self.shards), default=-1)
        return {"shards": [dict(x) for x in self.shards], **totals, "max_id": max_id}

    def abort(self) -> None:
        """Drop the shard in progress (its temp files); finished shards stay until clear_prepared."""
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


class TokenDataset:
    """Read-only, memmapped view of one split of a prepared folder, across all its shards.

    `ds.num_tokens`, `ds.num_docs`, `ds.tokens(start, stop)` (global token positions, may span
    shards; returns a new array of the shard dtype), `ds.doc(i)` (a view of document i with its
    bos/eos), `ds.doc_starts(start, stop)` (global positions of the documents that start inside
    (start, stop)), `ds.doc_lengths()` (int64 per document), `ds.max_doc_length()`, `ds.meta`,
    `ds.bos_id`, `ds.eos_id`, `ds.pad_id`, `ds.verify()` (hash every file against meta.json).

    Opening reads meta.json only (the one index: each shard's tokens and documents); a shard's
    files are checked and memory-mapped when a sample first touches them, and at most
    `MAX_OPEN_SHARDS` stay open, so thousands of shards cost neither time nor memory up front.
    Splits of up to `EAGER_SHARDS` shards are checked completely at open.
    """

    def __init__(self, folder: Path, split: str, meta: dict[str, Any], shards: list, hash_bins: bool):
        self.folder, self.split, self.meta = folder, split, meta
        self.dtype = DTYPES[meta["dtype"]]
        self._shards = [s for s in shards if int(s["tokens"])]
        self._hash_bins = hash_bins
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # Python ints and bisect: per-sample lookups are hot in the loader, numpy scalars are slow.
        self._token_starts = list(itertools.accumulate([int(s["tokens"]) for s in self._shards], initial=0))
        self._doc_starts = list(itertools.accumulate([int(s["docs"]) for s in self._shards], initial=0))
        self.num_tokens, self.num_docs = self._token_starts[-1], self._doc_starts[-1]
        self.bos_id, self.eos_id, self.pad_id = (meta.get(k) for k in ("bos_id", "eos_id", "pad_id"))

    @classmethod
    def open(
        cls,
        folder: str | Path,
        split: str = "train",
        expect_fingerprint: str | None = None,
        vocab_size: int | None = None,
    ) -> TokenDataset:
        """Open and check a split: meta.json present and of this format version, tokenizer
        fingerprint equal to `expect_fingerprint` (when given), the model's `vocab_size` (when
        given) covering the tokenizer's vocab and every stored id; each shard's file size and
        index are checked against meta.json (at open for small splits, else at first use), and
        the sha256 of every file when the split is at most 64 MiB."""
        folder = Path(folder)
        meta = read_meta(folder)
        meta_path = folder / META_NAME
        found = meta.get("tokenizer_fingerprint")
        if expect_fingerprint is not None and found != expect_fingerprint:
            raise DataError(
                f"{meta_path}: prepared with tokenizer {found} but this run uses tokenizer {expect_fingerprint}; "
                "re-prepare the data with this tokenizer or point tokenizer.path at the one used to prepare it"
            )
        if split not in meta["splits"]:
            raise DataError(
                f"{meta_path}: has no '{split}' split (it has {sorted(meta['splits'])}); re-run lmforge prepare"
            )
        info = meta["splits"][split]
        shards = info.get("shards", []) if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise DataError(f"{meta_path}: split '{split}' has no shard list; re-run lmforge prepare")
        for s in shards:
            try:
                int(s["tokens"]), int(s["docs"]), s["file"], s["index"]
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{meta_path}: malformed shard entry {s!r}; re-run lmforge prepare") from None
        if vocab_size is not None:
            data_vocab = int(meta.get("vocab_size") or 0)
            max_id = max([int(s.get("max_id", -1)) for s in shards] + [-1])
            if vocab_size < data_vocab or max_id >= vocab_size:
                raise DataError(
                    f"{meta_path}: model.vocab_size {vocab_size} is smaller than the data's vocabulary "
                    f"(tokenizer vocab {data_vocab}, largest id {max_id}); raise model.vocab_size to at least {max(data_vocab, max_id + 1)}"
                )
        dtype = DTYPES[meta["dtype"]]
        hash_bins = sum(int(s["tokens"]) for s in shards) * dtype.itemsize <= HASH_ON_OPEN_BYTES
        ds = cls(folder, split, meta, shards, hash_bins)
        if len(shards) <= EAGER_SHARDS:
            for s in shards:
                _open_shard(folder, s, dtype, hash_bin=hash_bins)
        return ds

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens memmap, offsets) of shard k, checked and mapped on first use (LRU-bounded)."""
        got = self._open.get(k)
        if got is None:
            got = _open_shard(self.folder, self._shards[k], self.dtype, hash_bin=self._hash_bins)
            self._open[k] = got
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(k)
        return got

    def _locate(self, starts: list[int], i: int, n: int, what: str) -> int:
        if not 0 <= i < n:
            raise IndexError(f"{what} {i} out of range [0, {n})")
        return bisect.bisect_right(starts, i) - 1

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens at global positions [start, stop) of the split's stream (documents back to back)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}]")
        if start == stop:
            return np.empty(0, dtype=self.dtype)
        k = self._locate(self._token_starts, start, self.num_tokens, "token")
        base = self._token_starts[k]
        if stop <= self._token_starts[k + 1]:
            return np.array(self._shard(k)[0][start - base : stop - base])
        parts = []
        while start < stop:
            base, end = self._token_starts[k], self._token_starts[k + 1]
            take = min(stop, end)
            parts.append(self._shard(k)[0][start - base : take - base])
            start, k = take, k + 1
        return np.concatenate(parts)

    def doc_starts(self, start: int, stop: int) -> np.ndarray:
        """Global positions p of document starts with start < p < stop (int64, increasing)."""
        if stop - start < 2:
            return np.empty(0, dtype=np.int64)
        k = self._locate(self._token_starts, start, self.num_tokens, "token")
        found = []
        while k < len(self._shards) and self._token_starts[k] < stop:
            base = self._token_starts[k]
            offsets = self._shard(k)[1][:-1] + base  # every shard starts a document
            lo, hi = np.searchsorted(offsets, [start + 1, stop])
            found.append(offsets[lo:hi])
            k += 1
        return np.concatenate(found).astype(np.int64, copy=False)

    def doc(self, i: int) -> np.ndarray:
        """Document i (a read-only view, bos/eos included)."""
        k = self._locate(self._doc_starts, i, self.num_docs, "document")
        j = i - self._doc_starts[k]
        tokens, idx = self._shard(k)
        return tokens[int(idx[j]) : int(idx[j + 1])]

    def doc_lengths(self) -> np.ndarray:
        """Length in tokens of every document, in order (int64; reads every index)."""
        if not self._shards:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.diff(self._shard(k)[1]) for k in range(len(self._shards))])

    def max_doc_length(self) -> int:
        """The longest document (from meta.json when prepare recorded it, else from the indexes)."""
        if all("max_doc" in s for s in self._shards):
            return max((int(s["max_doc"]) for s in self._shards), default=0)
        return int(self.doc_lengths().max()) if self.num_docs else 0

    def verify(self) -> None:
        """Hash every .bin and .idx of the split and compare with meta.json; DataError on mismatch."""
        for s in self.meta["splits"][self.split]["shards"]:
            _open_shard(self.folder, s, self.dtype, hash_bin=True)


def _open_shard(folder: Path, s: dict[str, Any], dtype: np.dtype, hash_bin: bool):
    """Check one shard against its meta.json entry; return (tokens memmap, offsets array)."""
    redo = "the shard is corrupt or truncated; re-run lmforge prepare"
    try:
        bin_path, idx_path = folder / s["file"], folder / s["index"]
        tokens, docs = int(s["tokens"]), int(s["docs"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{folder / META_NAME}: malformed shard entry {s!r}; re-run lmforge prepare"
        ) from None
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise DataError(f"{path}: missing; {redo}")
    size = bin_path.stat().st_size
    if size != tokens * dtype.itemsize:
        raise DataError(f"{bin_path}: {size} bytes but meta.json says {tokens} {dtype.name} tokens; {redo}")
    raw = idx_path.read_bytes()
    if len(raw) != (docs + 1) * INDEX_DTYPE.itemsize:
        raise DataError(f"{idx_path}: {len(raw)} bytes but meta.json says {docs} documents; {redo}")
    if "index_sha256" in s and hashlib.sha256(raw).hexdigest() != s["index_sha256"]:
        raise DataError(f"{idx_path}: sha256 differs from meta.json; {redo}")
    offsets = np.frombuffer(raw, dtype=INDEX_DTYPE)
    if offsets[0] != 0 or offsets[-1] != tokens or np.any(np.diff(offsets) < 0):
        raise DataError(f"{idx_path}: document offsets are not an increasing 0..{tokens} sequence; {redo}")
    if hash_bin and "sha256" in s and file_sha256(bin_path) != s["sha256"]:
        raise DataError(f"{bin_path}: sha256 differs from meta.json; {redo}")
    if tokens == 0:
        return np.empty(0, dtype=dtype), offsets
    # A plain ndarray view of the map: slicing a np.memmap subclass costs more than the copy.
    return np.asarray(np.memmap(bin_path, dtype=dtype, mode="r", shape=(tokens,))), offsets
