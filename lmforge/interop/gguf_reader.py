"""A GGUF reader for import: metadata as Python values and tensors as zero-copy views of the file.

The `gguf` package's GGUFReader builds a numpy view per string, which takes about a minute for a
Llama-3 vocabulary (128k tokens + 280k merges); this walks the same layout (GGUF v2/v3: header,
key/values, tensor infos, aligned data) with `struct` and reads strings in one pass. Tensor
sizes come from the `gguf` package's block table, and dequantisation stays with it.
"""

from __future__ import annotations

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


class _Cursor:
    def __init__(self, buf: memoryview, source: str):
        self.buf, self.pos, self.source = buf, 0, source

    def take(self, fmt: str):
        try:
            value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise LmforgeError(f"{self.source}: truncated GGUF header; the file is incomplete") from None
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        size = self.take("Q")
        raw = bytes(self.buf[self.pos : self.pos + size])
        if len(raw) != size:
            raise LmforgeError(f"{self.source}: truncated GGUF header; the file is incomplete")
        self.pos += size
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("I"), self.take("Q")
            if item == 8:
                return [self.string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += values.nbytes
                return values.tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise LmforgeError(f"{self.source}: unknown GGUF value type {kind}; the file is damaged")
        value = self.take(_SCALARS[kind])
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
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("Q") for _ in range(cur.take("I"))]
        infos.append((name, cur.take("I"), tuple(reversed(dims)), cur.take("Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = []
    for name, kind, shape, offset in infos:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise LmforgeError(
                f"{path}: tensor '{name}' has unknown type {kind}; the file is damaged"
            ) from None
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count // block * block_bytes
        if start + offset + nbytes > len(buf):
            raise LmforgeError(
                f"{path}: tensor '{name}' runs past the end of the file; the file is incomplete"
            )
        data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start + offset)
        tensors.append(GGUFTensor(name, kind, shape, data))
    return meta, tensors
