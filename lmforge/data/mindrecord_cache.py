"""A MindRecord set's token rows decoded once into one flat file in the run folder, so training
from `data.train: [x.mindrecord]` reads them at the speed of lmforge's own shards.

MindRecord stores token ids compressed (1-8 bytes each, see mindrecord_ints.py); decoding them is
several numpy passes per batch, where a shard row is one copy. bench/mindrecord_loader.py measures
both: decoding on read leaves the loader about a third of its rate, the cache all of it. The price is a
decoded copy (2 bytes a token below 65,536 ids, else 4; about the MindRecord's own size) under
`runs/<name>/mindrecord_cache/`; `data.mindrecord_cache: false` turns it off, and a disk without
room for it is a note and reads the MindRecord as it is.

File `<name>-<key>.tokens`: a little-endian uint64 length and that much JSON (format, version, key,
field, rows, tokens, dtype, max_id, max_row), zero-padded to 4 KiB; then the rows' offsets (int64,
rows + 1); then the tokens. The key is a hash of every data file's name, size, mtime and header
bytes, its .db's size and mtime, and the field: a rewritten MindRecord gets a new cache. Nothing in
the file is taken on trust: its size must be exactly what the header's counts make, the offsets
must run from 0 to the token count without going back, and each row's length must equal the count
the MindRecord itself stores for that row; otherwise it is rebuilt. It is written to a temporary
name and renamed into place, under an flock, so ranks that start together build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from lmforge.data.mindrecord import MindRecord
from lmforge.errors import DataError

FORMAT, VERSION = "lmforge-mindrecord-cache", 1
HEADER_BYTES = 4096


def cache_key(records: MindRecord, field: str) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, VERSION, field]).encode())
    for f in records.files:
        db = f.path.with_name(f.path.name + ".db")
        stat, db_stat = f.path.stat(), db.stat()
        h.update(json.dumps([f.path.name, stat.st_size, stat.st_mtime_ns, db_stat.st_size, db_stat.st_mtime_ns]).encode())
        length = int(f.data[:8].view("<u8")[0])  # checked against the file size when it was opened
        h.update(f.data[: 8 + length].tobytes())
    return h.hexdigest()[:20]


class CachedRows:
    """Decoded token rows: `rows(ids)` gives each row as a view of the mapped file."""

    def __init__(self, path: Path, header: dict, offsets: np.ndarray, tokens: np.ndarray):
        self.path, self.header, self.offsets, self.tokens = path, header, offsets, tokens
        self.max_id, self.max_row = int(header["max_id"]), int(header["max_row"])

    def rows(self, ids) -> list[np.ndarray]:
        at = np.asarray(ids, dtype=np.int64)
        tok = self.tokens
        return [tok[a:b] for a, b in zip(self.offsets[at].tolist(), self.offsets[at + 1].tolist())]


def open_cache(records: MindRecord, field: str, folder: Path) -> CachedRows | None:
    """The cache of `field` of `records` in `folder`, built first if missing or invalid; None (with
    a note) when the disk lacks room for it."""
    key = cache_key(records, field)
    path = folder / f"{Path(records.where).name}-{key}.tokens"
    found = _load(path, records, field, key)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    need = sum(f.path.stat().st_size for f in records.files) * 2  # 4-byte ids can take twice the compressed size
    if shutil.disk_usage(folder).free < need + (1 << 30):
        print(f"note: {folder}: under {need / 2**30 + 1:.1f} GiB free, so the MindRecord rows are decoded as they are read (slower); free space or set data.mindrecord_cache: false")
        return None
    with open(folder / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks that start together: one builds, the others find it
        found = _load(path, records, field, key)
        if found is None:
            for stale in folder.glob(f".{path.name}.*.tmp"):  # a killed build's (no builder runs now)
                stale.unlink(missing_ok=True)
            print(f"note: decoding the {records.num_rows:,} rows of {records.where} once into {path} (data.mindrecord_cache)", flush=True)
            _build(path, records, field, key)
            found = _load(path, records, field, key)
    if found is None:
        raise DataError(f"{path}: the decoded MindRecord cache just written does not read back; check the disk, or set data.mindrecord_cache: false")
    return found


def _load(path: Path, records: MindRecord, field: str, key: str) -> CachedRows | None:
    """The cache at `path` when every check passes, else None (it is then rebuilt)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError:
        return None
    if len(head) < HEADER_BYTES or size < HEADER_BYTES:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    try:
        header = json.loads(head[8 : 8 + length]) if length <= HEADER_BYTES - 8 else None
        rows, count, dtype = int(header["rows"]), int(header["tokens"]), np.dtype(header["dtype"])
        good = (header["format"], header["version"], header["key"], header["field"]) == (FORMAT, VERSION, key, field)
        int(header["max_id"]), int(header["max_row"])
    except (ValueError, KeyError, TypeError, OverflowError):
        return None
    if not good or rows != records.num_rows or dtype not in (np.dtype("<u2"), np.dtype("<u4")) or count < 0:
        return None
    if size != HEADER_BYTES + 8 * (rows + 1) + count * dtype.itemsize:
        return None
    data = np.memmap(path, dtype=np.uint8, mode="r")
    offsets = np.asarray(data[HEADER_BYTES : HEADER_BYTES + 8 * (rows + 1)]).view("<i8")
    if offsets[0] != 0 or offsets[-1] != count or np.any(np.diff(offsets) < 0):
        return None
    lengths = records.row_lengths(field)
    if lengths is not None and not np.array_equal(np.diff(offsets), lengths):
        return None
    tokens = np.asarray(data[HEADER_BYTES + 8 * (rows + 1) :]).view(dtype)
    return CachedRows(path, header, offsets, tokens)


def _build(path: Path, records: MindRecord, field: str, key: str) -> None:
    """Decode every row into a temporary file, then rename it to `path` (uint16 ids, or uint32 from
    the first id past 65,535 on: the build starts over once)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        for dtype in (np.dtype("<u2"), np.dtype("<u4")):
            if _write(tmp, records, field, key, dtype):
                os.replace(tmp, path)
                return
        raise DataError(f"{records.where}: a token id past 2**32 - 1 in field {field!r}; check data.token_field")
    finally:
        tmp.unlink(missing_ok=True)


def _write(tmp: Path, records: MindRecord, field: str, key: str, dtype: np.dtype) -> bool:
    """Write the cache with ids of `dtype`; False when an id does not fit it."""
    offsets = np.zeros(records.num_rows + 1, dtype=np.int64)
    max_id, max_row, count = -1, 0, 0
    limit = np.iinfo(dtype).max
    with open(tmp, "wb") as out:
        out.seek(HEADER_BYTES + offsets.nbytes)
        for ids in records.row_chunks():
            rows, pools = records.int_arrays(ids, field)  # pools bound the rows' min and max
            low, high = min(int(p.min()) for p in pools), max(int(p.max()) for p in pools)
            if low < 0:
                i = next(i for i, r in zip(ids.tolist(), rows) if len(r) and int(r.min()) < 0)
                raise DataError(f"{records.where}: row {i} holds a negative token id; token ids never are, check data.token_field")
            if high > limit:
                return False
            if high > max_id:
                max_id = high
                max_row = next(i for i, r in zip(ids.tolist(), rows) if len(r) and int(r.max()) == high)
            out.write(np.concatenate(rows).astype(dtype).tobytes())
            offsets[ids + 1] = count + np.cumsum([len(r) for r in rows])
            count = int(offsets[ids[-1] + 1])
        out.seek(HEADER_BYTES)
        out.write(offsets.tobytes())
        header = {"format": FORMAT, "version": VERSION, "key": key, "field": field, "rows": records.num_rows,
                  "tokens": count, "dtype": dtype.str, "max_id": max_id, "max_row": max_row}  # fmt: skip
        text = json.dumps(header).encode()
        out.seek(0)
        out.write(struct.pack("<Q", len(text)) + text)
    return True
