"""MindRecord (MindSpore's dataset files, what MindFormers trains from) read with numpy and the
standard library: no MindSpore at run time.

    mr = MindRecord.open("wiki4096.mindrecord")       # a file of a set, or a folder of them
    mr.num_rows, mr.schema                             # rows of the whole set; {field: {type, shape}}
    mr.row(i)                                          # {field: value}, as MindSpore's FileReader gives it
    mr.field(i, "input_ids")                           # one field of row i (numpy array)

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

Everything is memory-mapped; a row is decoded when it is read. A damaged file, a missing .db or
a schema this reader does not know is a DataError of one line naming the file.
"""

from __future__ import annotations

import json
import re
import sqlite3
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError

NAME_RE = re.compile(r"mindrecord\d*$")  # MindFormers' rule for MindRecord files in dataset_dir
_TYPES = {"int32": "<i4", "int64": "<i8", "float32": "<f4", "float64": "<f8", "bytes": None, "string": None}
_INT_DTYPES = (np.dtype("<i1"), np.dtype("<i2"), np.dtype("<i4"), np.dtype("<i8"))
_UINT_DTYPES = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8"))
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

    def record(self, start: int, end: int) -> np.ndarray:
        (length,) = struct.unpack("<Q", self.data[start : start + 8].tobytes())
        if length != end - start - 8:
            raise DataError(f"{self.path}: a row at byte {start} holds {length} bytes, its index says {end - start - 8}; {_REDO}")
        return self.data[start + 8 : end]


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

    def _locate(self, i: int) -> tuple[_File, int]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range [0, {self.num_rows})")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.files[k], i - int(self._starts[k])

    def field(self, i: int, name: str) -> Any:
        """Field `name` of row i: a numpy array (arrays), bytes, or a Python scalar/string."""
        if name not in self.schema:
            raise DataError(f"{self.where}: no field {name!r} (fields: {', '.join(self.schema)}); name the token field")
        f, j = self._locate(i)
        if name in self.blob_fields:
            return self._blob_field(f, f.record(*f.rows[j, :2]), name)
        return _unpack_raw(f, f.record(*f.rows[j, 2:])).get(name)

    def row(self, i: int) -> dict[str, Any]:
        f, j = self._locate(i)
        out = {}
        if len(self.blob_fields) < len(self.schema):
            raw = _unpack_raw(f, f.record(*f.rows[j, 2:]))
            out = {k: raw.get(k) for k in self.schema if k not in self.blob_fields}
        if self.blob_fields:
            blob = f.record(*f.rows[j, :2])
            out.update({k: self._blob_field(f, blob, k) for k in self.blob_fields})
        return out

    def _blob_field(self, f: _File, blob: np.ndarray, name: str) -> Any:
        part = blob
        if len(self.blob_fields) > 1:
            pos = 0
            for other in self.blob_fields:
                if pos + 8 > len(blob):
                    raise DataError(f"{f.path}: a row's blob ends inside field {other!r}; {_REDO}")
                (n,) = struct.unpack(">Q", blob[pos : pos + 8].tobytes())
                if other == name:
                    part = blob[pos + 8 : pos + 8 + n]
                    if len(part) != n:
                        raise DataError(f"{f.path}: a row's field {name!r} is cut short; {_REDO}")
                    break
                pos += 8 + n
        spec = self.schema[name]
        if spec["type"] == "bytes":
            return part.tobytes()
        if self.compressed and spec["type"] in ("int32", "int64"):
            values = decompress_ints(part, f.path).astype(_TYPES[spec["type"]], copy=False)
        else:
            dtype = np.dtype(_TYPES[spec["type"]])
            if len(part) % dtype.itemsize:
                raise DataError(f"{f.path}: field {name!r} holds {len(part)} bytes, not a whole number of {spec['type']}; {_REDO}")
            values = part.view(dtype)
        shape = spec.get("shape") or [-1]
        try:
            return values.reshape(shape) if len(shape) > 1 else values
        except ValueError:
            raise DataError(f"{f.path}: field {name!r} has {values.size} values, not of shape {shape}; {_REDO}") from None


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


def decompress_ints(buf: np.ndarray, where: Path | str = "MindRecord") -> np.ndarray:
    """MindRecord's compressed integer array (see the module docs) -> int64 values."""
    if len(buf) < 4:
        raise DataError(f"{where}: a compressed integer field is {len(buf)} bytes long; {_REDO}")
    n = int.from_bytes(buf[:4].tobytes(), "big")
    nmap = (n + 3) // 4
    if 4 + nmap > len(buf):
        raise DataError(f"{where}: a compressed integer field claims {n} values in {len(buf)} bytes; {_REDO}")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    bits = np.unpackbits(buf[4 : 4 + nmap])[: 2 * n]
    codes = (bits[0::2] << 1) | bits[1::2]
    body = buf[4 + nmap :]
    widths = np.left_shift(1, codes, dtype=np.int64)
    ends = np.cumsum(widths)
    if int(ends[-1]) != len(body):
        raise DataError(f"{where}: a compressed integer field's widths add up to {int(ends[-1])} bytes, it holds {len(body)}; {_REDO}")
    top = int(codes.max())
    if top == int(codes.min()):  # one width throughout: a plain view
        return body.view(_INT_DTYPES[top]).astype(np.int64)
    # Assemble every value from little-endian bytes as the widest width present (byte gathers are
    # numpy's fast path), then shift left and arithmetically right by the bits past each value's
    # own width: that drops the next values' bytes and extends the sign.
    starts, wide, size = ends - widths, _UINT_DTYPES[top], 1 << top
    padded = np.zeros(len(body) + size, dtype=np.uint8)
    padded[: len(body)] = body
    raw = padded[starts].astype(wide)
    for k in range(1, size):
        raw |= padded[starts + k].astype(wide) << wide.type(8 * k)
    shift = ((size - widths) << 3).astype(_INT_DTYPES[top])
    return ((raw.view(_INT_DTYPES[top]) << shift) >> shift).astype(np.int64)


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
    the integer array field `field` and are checked against `vocab_size` as each row is read."""

    rows_are_samples = True
    bos_id = eos_id = pad_id = None

    def __init__(self, records: MindRecord, field: str, split: str, vocab_size: int | None):
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

    @classmethod
    def open(cls, path: str | Path, field: str = "input_ids", split: str = "train", vocab_size: int | None = None) -> MindRecordRows:
        return cls(MindRecord.open(path), field, split, vocab_size)

    def doc(self, i: int) -> np.ndarray:
        ids = self.records.field(i, self.field)
        if len(ids) and (int(ids.min()) < 0 or (self.vocab_size is not None and int(ids.max()) >= self.vocab_size)):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise DataError(
                f"{self.folder}: row {i} holds token id {bad}, outside vocab_size {self.vocab_size}; check "
                "model.vocab_size (training) or --tokenizer (prepare), and the token field"
            )
        return ids
