"""MindRecord (MindSpore's dataset files, what MindFormers trains from) read with numpy and the
standard library: no MindSpore at run time.

    mr = MindRecord.open("wiki4096.mindrecord")       # a file of a set, or a folder of them
    mr.num_rows, mr.schema                             # rows of the whole set; {field: {type, shape}}
    mr.row(i)                                          # {field: value}, as MindSpore's FileReader gives it
    mr.field(i, "input_ids")                           # one field of row i (numpy array)
    mr.fields(rows, "input_ids")                       # of many rows: a batch's ints decoded in one call

The layout, as MindSpore's FileWriter writes it (checked against FileReader in the tests):
- `NAME` (or `NAME0..NAME{n-1}` for a set of n files) and beside each a SQLite index `NAME.db`.
- A file opens with a little-endian uint64 length and that many bytes of JSON: header_size,
  page_size, schema (one), blob_fields, page list, shard_addresses (the set's file names in
  order). Pages follow the header area: page p starts at header_size + p * page_size.
- The .db's INDEXES table gives each row (ROW_ID) its blob page and [start, end) in it, and its
  raw page and range. Each row record there is a little-endian uint64 length, then the bytes.
- Raw records are MessagePack maps of the scalar fields (int32/int64/float32/float64/string).
- Blob records hold the array and bytes fields (blob_fields, sorted by name): with one blob field,
  the record is that field; with several, each is a big-endian uint64 length then its bytes.
- When the schema has an int32/int64 array, integer blob fields are compressed: a big-endian
  uint32 count, a bitmap of 2-bit width codes (4 per byte, first value in the high bits; code c
  means 1 << c bytes), then each value little-endian and signed in its width. Other arrays are
  little-endian values as written.
- Rows read in the order of shard_addresses, each file by ROW_ID: FileReader's order.

Everything is memory-mapped; rows are decoded when read, a batch's integer arrays in one numpy
call (mindrecord_ints.py); training reads token rows from a decoded cache (mindrecord_cache.py).
A damaged file, a missing .db or a schema this reader does not know is a DataError of one line
naming the file.
"""

from __future__ import annotations

import json
import re
import sqlite3
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.mindrecord_ints import decode_ints
from lmforge.errors import DataError

NAME_RE = re.compile(r"mindrecord\d*$")  # MindFormers' rule for MindRecord files in dataset_dir
_TYPES = {"int32": "<i4", "int64": "<i8", "float32": "<f4", "float64": "<f8", "bytes": None, "string": None}
_LENGTH_BYTES = np.arange(8)
_INDEX_SQL = (
    "SELECT ROW_ID, PAGE_ID_BLOB, PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END, "
    "PAGE_ID_RAW, PAGE_OFFSET_RAW, PAGE_OFFSET_RAW_END FROM INDEXES ORDER BY ROW_ID"
)
_REDO = "the file is damaged or incomplete; copy or write it again"


def is_mindrecord(path: str | Path) -> bool:
    """True for a MindRecord data file, or a folder holding some (by name, as MindFormers finds them)."""
    path = Path(path)
    if path.is_dir():
        return bool(_files_in(path))
    return bool(NAME_RE.search(path.name)) and path.is_file()


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and NAME_RE.search(p.name))


class _File:
    """One data file of a set: its header, its .db index as arrays, and a read-only map."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataError(f"{path}: {size} bytes, too short for a MindRecord header; {_REDO}")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise DataError(f"{path}: header claims {length} bytes but the file has {size}; {_REDO}")
            try:
                self.header = json.loads(f.read(length))
                self.header_size, self.page_size = int(self.header["header_size"]), int(self.header["page_size"])
                self.addresses = [str(a) for a in self.header["shard_addresses"]]
                schemas = self.header["schema"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}: not a MindRecord file (its header is not MindRecord's JSON); {_REDO}") from None
        if not isinstance(schemas, list) or len(schemas) != 1 or not isinstance(schemas[0], dict):
            raise DataError(f"{path}: {len(schemas) if isinstance(schemas, list) else 'no'} schemas; lmforge reads MindRecord files with exactly one")
        self.schema, self.blob_fields = _check_schema(path, schemas[0])
        self.rows = self._index(size)
        # A plain ndarray view of the map: slicing the np.memmap subclass costs more than the read.
        self.data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r")) if size else np.empty(0, np.uint8)

    def _index(self, size: int) -> np.ndarray:
        """[rows, 6] int64: absolute (blob start, blob end, raw start, raw end) ... of each row."""
        db = self.path.with_name(self.path.name + ".db")
        if not db.is_file():
            raise DataError(f"{db}: missing; a MindRecord file needs its .db index beside it (copy both files)")
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                found = con.execute(_INDEX_SQL).fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise DataError(f"{db}: not a readable MindRecord index ({exc}); {_REDO}") from None
        if not found:
            return np.empty((0, 4), dtype=np.int64)
        idx = np.array(found, dtype=np.int64)
        if np.any(idx[:, 0] != np.arange(len(idx))):
            raise DataError(f"{db}: row ids are not 0..{len(idx) - 1}; {_REDO}")
        ranges = []
        has_raw = len(self.blob_fields) < len(self.schema)
        for used, (page, start, end) in ((bool(self.blob_fields), idx[:, 1:4].T), (has_raw, idx[:, 4:7].T)):
            base = self.header_size + page * self.page_size
            ranges += [base + start, base + end] if used else [page * 0, page * 0]
            bad = (start < 0) | (end < start + 8) | (end > self.page_size) | (base + end > size)
            if used and np.any(bad):
                raise DataError(f"{self.path}: rows reach past the end of the file or of their page; {_REDO}")
        return np.stack(ranges, axis=1)

    def records(self, rows: np.ndarray, blob: bool) -> list[np.ndarray]:
        """The blob (or raw) records of `rows` of this file, each checked against its own length."""
        ranges = self.rows[rows, :2] if blob else self.rows[rows, 2:]
        starts, ends = ranges[:, 0], ranges[:, 1]
        lengths = self.data[starts[:, None] + _LENGTH_BYTES].view("<u8")[:, 0].astype(np.int64)
        bad = np.flatnonzero(lengths != ends - starts - 8)
        if len(bad):
            b = int(bad[0])
            raise DataError(f"{self.path}: a row at byte {int(starts[b])} holds {int(lengths[b])} bytes, its index says {int(ends[b] - starts[b] - 8)}; {_REDO}")
        return [self.data[a + 8 : b] for a, b in zip(starts.tolist(), ends.tolist())]


def _check_schema(path: Path, entry: dict) -> tuple[dict, list[str]]:
    schema, blob_fields = entry.get("schema"), entry.get("blob_fields")
    if not isinstance(schema, dict) or not schema or not isinstance(blob_fields, list):
        raise DataError(f"{path}: the MindRecord schema has no fields; {_REDO}")
    for name, spec in schema.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in _TYPES:
            raise DataError(f"{path}: field {name!r} has type {kind!r}; lmforge reads {', '.join(_TYPES)}")
        in_blob = "shape" in spec or kind == "bytes"
        if in_blob != (name in blob_fields):
            raise DataError(f"{path}: field {name!r} is {'not ' if in_blob else ''}listed as a blob field; {_REDO}")
    return schema, sorted(blob_fields)


class MindRecord:
    """A MindRecord set: rows across its files, in FileReader's order (see the module docs)."""

    def __init__(self, files: list[_File], where: str):
        self.files, self.where = files, where
        first = files[0]
        for f in files[1:]:
            if f.schema != first.schema:
                raise DataError(f"{f.path}: schema differs from {first.path}'s; read them as separate datasets")
        self.schema, self.blob_fields = first.schema, first.blob_fields
        # MindSpore compresses integer blob fields whenever the schema has an integer array.
        self.compressed = any(s["type"] in ("int32", "int64") and "shape" in s for s in self.schema.values())
        counts = [len(f.rows) for f in files]
        self._starts = np.cumsum([0] + counts)
        self.num_rows = int(self._starts[-1])

    @classmethod
    def open(cls, path: str | Path) -> MindRecord:
        """A data file (with the rest of its set, named in its header) or a folder of MindRecord files."""
        path = Path(path)
        if path.is_dir():
            names = _files_in(path)
            if not names:
                raise DataError(f"{path}: no MindRecord files (names ending in .mindrecord or .mindrecordN) here")
        elif not path.is_file():
            raise DataError(f"{path}: no such file; check the path")
        else:
            names = [path]
        files, seen = [], set()
        for name in names:
            for member in _set_of(name):
                if member.resolve() not in seen:
                    seen.add(member.resolve())
                    files.append(_File(member))
        return cls(files, str(path))

    def _locate(self, rows: list[int] | np.ndarray) -> list[tuple[_File, np.ndarray, np.ndarray]]:
        """(file, row numbers within it, positions in `rows`) for each file that `rows` fall in."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
            raise IndexError(f"row {bad} out of range [0, {self.num_rows})")
        if len(self.files) == 1:
            return [(self.files[0], rows, np.arange(len(rows)))]
        ks = np.searchsorted(self._starts, rows, side="right") - 1
        out = []
        for k in np.unique(ks).tolist():
            pos = np.flatnonzero(ks == k)
            out.append((self.files[k], rows[pos] - self._starts[k], pos))
        return out

    def field(self, i: int, name: str) -> Any:
        """Field `name` of row i: a numpy array (arrays), bytes, or a Python scalar/string."""
        return self.fields([i], name)[0]

    def fields(self, rows: list[int] | np.ndarray, name: str) -> list[Any]:
        """Field `name` of each of `rows`, in that order; integer arrays are decoded together."""
        if name not in self.schema:
            raise DataError(f"{self.where}: no field {name!r} (fields: {', '.join(self.schema)}); name the token field")
        if self.compressed and name in self.blob_fields and self.schema[name]["type"] in ("int32", "int64"):
            dtype = _TYPES[self.schema[name]["type"]]
            return [self._shaped(name, v.astype(dtype)) for v in self.int_arrays(rows, name)[0]]
        got: list[Any] = [None] * len(rows)
        for f, js, pos in self._locate(rows):
            if name in self.blob_fields:
                values = [self._blob_value(f, self._blob_part(f, b, name), name) for b in f.records(js, blob=True)]
            else:
                values = [_unpack_raw(f, r).get(name) for r in f.records(js, blob=False)]
            for p, v in zip(pos.tolist(), values):
                got[p] = v
        return got

    def int_arrays(self, rows: list[int] | np.ndarray, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(values of the compressed integer field `name` of each of `rows`, flat and of the narrowest
        type that holds them; pools whose min/max bound them all), one decode per file touched."""
        got: list[Any] = [None] * len(rows)
        pools = []
        for f, js, pos in self._locate(rows):
            parts = [self._blob_part(f, b, name) for b in f.records(js, blob=True)]
            values, pool = decode_ints(parts, f.path)
            pools.append(pool)
            for p, v in zip(pos.tolist(), values):
                got[p] = v
        return got, pools

    def row_chunks(self, max_bytes: int = 16 << 20) -> list[np.ndarray]:
        """Consecutive row ids in runs of about `max_bytes` of stored records (at least one row
        each): a whole-set pass decodes run by run, its temporaries bounded whatever the rows' size."""
        sizes = np.concatenate([f.rows[:, 1] - f.rows[:, 0] + f.rows[:, 3] - f.rows[:, 2] for f in self.files])
        if not len(sizes):
            return []
        cuts = np.flatnonzero(np.diff(np.cumsum(sizes) // max_bytes)) + 1
        return np.split(np.arange(len(sizes)), cuts)

    def row_lengths(self, name: str) -> np.ndarray | None:
        """Every row's value count as its compressed field `name` stores it, when that is the only
        blob field (its count opens each blob record); else None."""
        if not (self.compressed and self.blob_fields == [name]):
            return None
        counts = []
        for f in self.files:
            starts, ends = f.rows[:, 0] + 8, f.rows[:, 1]
            if np.any(ends - starts < 4):
                return None  # a damaged row: reading it says so
            head = f.data[starts[:, None] + np.arange(4)].astype(np.int64)
            counts.append(head @ np.array([1 << 24, 1 << 16, 1 << 8, 1], dtype=np.int64))
        return np.concatenate(counts) if counts else np.empty(0, dtype=np.int64)

    def row(self, i: int) -> dict[str, Any]:
        return {k: self.field(i, k) for k in self.schema}

    def _blob_part(self, f: _File, blob: np.ndarray, name: str) -> np.ndarray:
        """Field `name`'s bytes in a blob record (the whole record when it is the only blob field)."""
        if len(self.blob_fields) == 1:
            return blob
        pos = 0
        for other in self.blob_fields:
            if pos + 8 > len(blob):
                raise DataError(f"{f.path}: a row's blob ends inside field {other!r}; {_REDO}")
            (n,) = struct.unpack(">Q", blob[pos : pos + 8].tobytes())
            if other == name:
                part = blob[pos + 8 : pos + 8 + n]
                if len(part) != n:
                    raise DataError(f"{f.path}: a row's field {name!r} is cut short; {_REDO}")
                return part
            pos += 8 + n
        raise AssertionError(name)  # _blob_part is only asked for blob fields

    def _blob_value(self, f: _File, part: np.ndarray, name: str) -> Any:
        """A bytes or plain (uncompressed) array field's value; fields() decodes compressed ints."""
        spec = self.schema[name]
        if spec["type"] == "bytes":
            return part.tobytes()
        dtype = np.dtype(_TYPES[spec["type"]])
        if len(part) % dtype.itemsize:
            raise DataError(f"{f.path}: field {name!r} holds {len(part)} bytes, not a whole number of {spec['type']}; {_REDO}")
        return self._shaped(name, part.view(dtype), f.path)

    def _shaped(self, name: str, values: np.ndarray, where: Path | str | None = None) -> np.ndarray:
        shape = self.schema[name].get("shape") or [-1]
        try:
            return values.reshape(shape) if len(shape) > 1 else values
        except ValueError:
            raise DataError(f"{where or self.where}: field {name!r} has {values.size} values, not of shape {shape}; {_REDO}") from None


def _set_of(path: Path) -> list[Path]:
    """The files of the set `path` belongs to, in shard order (from its header's shard_addresses)."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            text = f.read(length) if 0 <= length <= path.stat().st_size else b""
            addresses = [str(a) for a in json.loads(text)["shard_addresses"]]
        except (ValueError, KeyError, TypeError):
            return [path]  # _File reports what is wrong with it
    members = [path.with_name(Path(a).name) for a in addresses]
    for m in members:
        if not m.is_file():
            raise DataError(f"{m}: missing; {path} is one file of a set of {len(members)} ({', '.join(Path(a).name for a in addresses)})")
    return members


def _unpack_raw(f: _File, record: np.ndarray) -> dict:
    try:
        value, end = _msgpack(record.tobytes(), 0)
    except (IndexError, KeyError, struct.error, UnicodeDecodeError, RecursionError):
        value, end = None, -1
    if not isinstance(value, dict) or end != len(record):
        raise DataError(f"{f.path}: a row's scalar fields are not a MessagePack map; {_REDO}")
    return value


def _msgpack(b: bytes, i: int) -> tuple[Any, int]:
    """The MessagePack subset nlohmann::json writes: maps, arrays, strings, bytes, ints, floats."""
    t = b[i]
    i += 1
    if t <= 0x7F:
        return t, i
    if t >= 0xE0:
        return t - 0x100, i
    if 0x80 <= t <= 0x9F:
        n, container = t & 0x0F, ("map" if t < 0x90 else "array")
        return _container(b, i, n, container)
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return b[i : i + n].decode("utf-8"), i + n
    simple = {0xC0: None, 0xC2: False, 0xC3: True}
    if t in simple:
        return simple[t], i
    fixed = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}  # fmt: skip
    if t in fixed:
        fmt = fixed[t]
        return struct.unpack_from(fmt, b, i)[0], i + struct.calcsize(fmt)
    sized = {0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"), 0xC4: (">B", "bin"), 0xC5: (">H", "bin"),
             0xC6: (">I", "bin"), 0xDC: (">H", "array"), 0xDD: (">I", "array"), 0xDE: (">H", "map"), 0xDF: (">I", "map")}  # fmt: skip
    fmt, kind = sized[t]
    n = struct.unpack_from(fmt, b, i)[0]
    i += struct.calcsize(fmt)
    if kind == "str":
        if i + n > len(b):
            raise IndexError
        return b[i : i + n].decode("utf-8"), i + n
    if kind == "bin":
        if i + n > len(b):
            raise IndexError
        return b[i : i + n], i + n
    return _container(b, i, n, kind)


def _container(b: bytes, i: int, n: int, kind: str) -> tuple[Any, int]:
    if kind == "array":
        items = []
        for _ in range(n):
            v, i = _msgpack(b, i)
            items.append(v)
        return items, i
    out = {}
    for _ in range(n):
        k, i = _msgpack(b, i)
        v, i = _msgpack(b, i)
        out[k] = v
    return out, i


class MindRecordRows:
    """A MindRecord set as one of the loader's datasets: each row is one sample, as MindFormers
    trains on it (its rows are seq_length + 1 tokens; no windows across rows). Token ids come from
    the integer array field `field` and are checked against `vocab_size` as each batch is read, or
    once when `cache` (mindrecord_cache.CachedRows, the decoded rows) is given."""

    rows_are_samples = True
    bos_id = eos_id = pad_id = None

    def __init__(self, records: MindRecord, field: str, split: str, vocab_size: int | None, cache=None):
        spec = records.schema.get(field)
        if spec is None:
            raise DataError(
                f"{records.where}: no field {field!r} (fields: {', '.join(records.schema)}); set data.token_field"
            )
        if spec["type"] not in ("int32", "int64") or len(spec.get("shape") or []) != 1:
            raise DataError(f"{records.where}: field {field!r} is {spec['type']} {spec.get('shape', 'scalar')}, not a 1-D integer array of token ids; set data.token_field")
        self.records, self.field, self.split, self.vocab_size = records, field, split, vocab_size
        self.folder = Path(records.where)
        self.num_docs = records.num_rows
        self.cache = cache  # rows decoded once (mindrecord_cache.CachedRows), or None: decoded when read
        if self.cache is not None and vocab_size is not None and self.cache.max_id >= vocab_size:
            self._out_of_vocab(self.cache.max_row, self.cache.max_id)

    @classmethod
    def open(cls, path: str | Path, field: str = "input_ids", split: str = "train", vocab_size: int | None = None) -> MindRecordRows:
        return cls(MindRecord.open(path), field, split, vocab_size)

    def doc(self, i: int) -> np.ndarray:
        return self.docs([i])[0]

    def docs(self, rows: list[int] | np.ndarray) -> list[np.ndarray]:
        """Token ids of each of `rows` (flat, of the narrowest integer type that holds them), decoded
        together and range-checked with one min/max over the batch."""
        if self.cache is not None:  # ranges checked when the cache was written and opened
            return self.cache.rows(rows)
        ids, pools = self.records.int_arrays(rows, self.field)
        lo, hi = min(int(p.min()) for p in pools), max(int(p.max()) for p in pools)
        if lo < 0 or (self.vocab_size is not None and hi >= self.vocab_size):
            for i, row in zip(np.asarray(rows).tolist(), ids):
                if len(row) and (int(row.min()) < 0 or (self.vocab_size is not None and int(row.max()) >= self.vocab_size)):
                    self._out_of_vocab(i, int(row.min()) if int(row.min()) < 0 else int(row.max()))
        return ids

    def _out_of_vocab(self, i: int, bad: int) -> None:
        raise DataError(
            f"{self.folder}: row {i} holds token id {bad}, outside vocab_size {self.vocab_size}; check "
            "model.vocab_size (training) or --tokenizer (prepare), and the token field"
        )
