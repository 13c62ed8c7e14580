"""A GGUF reader for import: metadata as Python values and tensors as zero-copy views of the file.

The `gguf` package's GGUFReader builds a numpy view per string, which takes about a minute for a
Llama-3 vocabulary (128k tokens + 280k merges); this walks the same layout (GGUF v2/v3: header,
key/values, tensor infos, aligned data) with `struct` and reads strings in one pass. Tensor
sizes come from the `gguf` package's block table, and dequantisation stays with it.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmforge.errors import LmforgeError

# value type id -> (struct format, size); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


class GGUFTensor(NamedTuple):
    name: str
    kind: int  # GGMLQuantizationType value
    shape: tuple[int, ...]  # torch order (outermost first)
    data: np.ndarray  # uint8 bytes of the tensor, a view of the file


# The fewest bytes one array item of each value type takes in the file (a string: its 8-byte length).
_MIN_ITEM = {**{k: struct.calcsize("<" + f) for k, f in _SCALARS.items()}, 8: 8, 9: 12}
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    def __init__(self, buf: memoryview, source: str):
        self.buf, self.pos, self.source = buf, 0, source

    def truncated(self, what: str) -> LmforgeError:
        return LmforgeError(
            f"{self.source}: truncated GGUF header ({what} runs past the end of the file at byte "
            f"{len(self.buf)}); the file is incomplete (an interrupted download?): fetch it again"
        )

    def take(self, fmt: str, what: str = "a value"):
        try:
            value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise self.truncated(what) from None
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def count(self, what: str, item_bytes: int) -> int:
        """A count the file claims, refused before anything is sized by it when the rest of the
        file cannot hold that many items."""
        n = self.take("Q", what)
        room = (len(self.buf) - self.pos) // max(item_bytes, 1)
        if n > room:
            raise LmforgeError(
                f"{self.source}: {what} claims {n} entries but only {room} fit in the rest of the file; "
                "the file is damaged or incomplete (an interrupted download?): fetch it again"
            )
        return n

    def string(self, what: str = "a string") -> str:
        size = self.take("Q", what)
        if size > len(self.buf) - self.pos:
            raise self.truncated(what)
        raw = bytes(self.buf[self.pos : self.pos + size])
        self.pos += size
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, what: str) -> Any:
        if kind == 8:
            return self.string(what)
        if kind == 9:
            item = self.take("I", what)
            if item not in _MIN_ITEM:
                raise LmforgeError(f"{self.source}: {what} has unknown item type {item}; the file is damaged")
            count = self.count(f"array {what}", _MIN_ITEM[item])
            if item == 8:
                return [self.string(what) for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += values.nbytes
                return values.tolist()
            return [self.value(item, what) for _ in range(count)]
        if kind not in _SCALARS:
            raise LmforgeError(
                f"{self.source}: {what} has unknown GGUF value type {kind}; the file is damaged"
            )
        value = self.take(_SCALARS[kind], what)
        if kind == 6:  # float32: the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)
            value = float(str(np.float32(value)))
        return value


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensors) of a little-endian GGUF file; LmforgeError naming the file if it is not one."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    source = str(path)
    with open(path, "rb") as f:
        try:
            buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except ValueError:  # an empty file cannot be mapped
            raise LmforgeError(f"{path}: not a readable GGUF file (empty)") from None
    cur = _Cursor(buf, source)
    if bytes(buf[:4]) != b"GGUF":
        raise LmforgeError(f"{path}: not a readable GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise LmforgeError(
            f"{path}: GGUF version {version} is not supported (2 and 3 are; big-endian files are not)"
        )
    # a tensor info takes at least 8 (name) + 4 (dims) + 4 (type) + 8 (offset) bytes; a key/value 8 + 4 + 1
    n_tensors, n_kv = cur.count("the tensor count", 24), cur.count("the key/value count", 13)
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        meta[key] = cur.value(cur.take("I", f"key '{key}'"), f"'{key}'")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.take("I", f"tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise LmforgeError(
                f"{path}: tensor '{name}' claims {n_dims} dimensions (1 to {MAX_DIMS}); the file is damaged"
            )
        dims = [cur.take("Q", f"tensor '{name}'") for _ in range(n_dims)]
        infos.append(
            (
                name,
                cur.take("I", f"tensor '{name}'"),
                tuple(reversed(dims)),
                cur.take("Q", f"tensor '{name}'"),
            )
        )
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 20:
        raise LmforgeError(
            f"{path}: general.alignment {align!r} is not a sensible alignment; the file is damaged"
        )
    start = -(-cur.pos // align) * align
    tensors = []
    for name, kind, shape, offset in infos:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise LmforgeError(
                f"{path}: tensor '{name}' has unknown type {kind}; the file is damaged"
            ) from None
        count = math.prod(shape)  # Python ints: a hostile shape cannot overflow into a small size
        if count % block or any(d <= 0 for d in shape):
            raise LmforgeError(
                f"{path}: tensor '{name}' has shape {shape}, which {GGMLQuantizationType(kind).name} "
                "blocks cannot hold; the file is damaged"
            )
        nbytes = count // block * block_bytes
        if start + offset + nbytes > len(buf):
            raise LmforgeError(
                f"{path}: tensor '{name}' ({shape}) runs past the end of the file; the file is incomplete"
            )
        data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start + offset)
        tensors.append(GGUFTensor(name, kind, shape, data))
    return meta, tensors
