"""`TokenDataset`: the read side of the prepared-dataset format (see `shards.py` for the format)."""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data import shards as _format  # limits read at call time (tests lower them)
from lmforge.data.shards import (
    DTYPES,
    INDEX_DTYPE,
    META_NAME,
    file_sha256,
    read_meta,
)
from lmforge.errors import DataError


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
        for s in shards:  # checked once here, for every shard: _open_shard relies on it
            try:
                int(s["tokens"]), int(s["docs"]), folder / s["file"], folder / s["index"]
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
        hash_bins = sum(int(s["tokens"]) for s in shards) * dtype.itemsize <= _format.HASH_ON_OPEN_BYTES
        ds = cls(folder, split, meta, shards, hash_bins)
        if len(shards) <= _format.EAGER_SHARDS:
            for s in shards:
                _open_shard(folder, s, dtype, hash_bin=hash_bins)
        return ds

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens memmap, offsets) of shard k, checked and mapped on first use (LRU-bounded)."""
        got = self._open.get(k)
        if got is None:
            got = _open_shard(self.folder, self._shards[k], self.dtype, hash_bin=self._hash_bins)
            self._open[k] = got
            if len(self._open) > _format.MAX_OPEN_SHARDS:
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
    """Check one shard against its meta.json entry (well-formed: TokenDataset.open checked it);
    return (tokens memmap, offsets array)."""
    redo = "the shard is corrupt or truncated; re-run lmforge prepare"
    bin_path, idx_path = folder / s["file"], folder / s["index"]
    tokens, docs = int(s["tokens"]), int(s["docs"])
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
