"""MindRecord's compressed integer arrays, decoded many rows at a time with numpy.

An array is a big-endian uint32 count n, a bitmap of n 2-bit width codes (4 per byte, the first
value in the high bits; code c means 1 << c bytes; the last byte's unused codes are padding), then
each value little-endian and signed in its own width. MindSpore picks the narrowest width, so text
token ids mix 1- and 2-byte values (Llama-2's 32k vocabulary) or 1/2/4 (Llama-3's 128k).

Decoding a batch of rows is a handful of whole-batch numpy passes, with no per-value Python and no
prefix sum (numpy's cumsum is the slowest pass there would be): with W the widest width present,
every value gets W byte slots; a 256-entry table turns each bitmap byte into the 4 x W slot mask
(slot k of a value is filled when k < its width); one boolean assignment drops the body bytes into
the filled slots in order; the slots read as W-byte integers, and a shift left then arithmetic
shift right by the unfilled bits extends each narrow value's sign. Every row's widths must add up
to its body before anything is placed, so a damaged row is a one-line DataError, never a misread.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from lmforge.errors import DataError

_REDO = "the file is damaged or incomplete; copy or write it again"
_INT = (np.dtype("<i1"), np.dtype("<i2"), np.dtype("<i4"), np.dtype("<i8"))
_CODES = np.array([[(b >> (6 - 2 * k)) & 3 for k in range(4)] for b in range(256)], dtype=np.int64)  # [256, 4]
_WIDTHS = 1 << _CODES
# Bytes taken by the values of a bitmap byte from code r on (r = 0..4): the padding codes of a
# row's last byte are those from n % 4 on, and their widths are not in the body.
_TAIL = np.concatenate([np.cumsum(_WIDTHS[:, ::-1], axis=1)[:, ::-1], np.zeros((256, 1), np.int64)], axis=1)
# One lookup gives both what the checks and the decode need of a bitmap byte: its values' bytes in
# the low 32 bits (summed per row by reduceat) and its widest code above them (its max is the top).
_BYTES_AND_TOP = _TAIL[:, 0] | (_CODES.max(axis=1) << 32)


@cache
def _tables(top: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot mask per bitmap byte [256, 4 * W] bool, packed into uint64 words where W > 1;
    sign shifts per bitmap byte [256, 4] of the W-byte integer type) for W = 1 << top."""
    width = 1 << top
    mask = np.arange(width)[None, None, :] < np.minimum(_WIDTHS, width)[:, :, None]
    mask = np.ascontiguousarray(mask.reshape(256, 4 * width))
    words = mask.view(np.uint32 if width == 1 else np.uint64)
    shifts = (8 * (width - np.minimum(_WIDTHS, width))).astype(_INT[top])
    return words, np.ascontiguousarray(shifts).view(np.uint64 if width == 2 else shifts.dtype)


def _rows(table: np.ndarray, bitmap: np.ndarray) -> np.ndarray:
    return np.take(table.reshape(-1) if table.ndim == 1 or table.shape[1] == 1 else table, bitmap, axis=0)


def decode_ints(parts: list[np.ndarray], where: Path | str = "MindRecord") -> tuple[list[np.ndarray], np.ndarray]:
    """Compressed integer arrays -> (each row's values, pool). The rows are views of pool, of the
    narrowest signed type that holds the widest width present; pool also holds zeros between rows,
    so its min and max bound the rows' (one range check for the whole batch)."""
    counts = np.zeros(len(parts), dtype=np.int64)
    bitmaps, bodies = [], []
    for r, part in enumerate(parts):
        if len(part) < 4:
            raise DataError(f"{where}: a compressed integer field is {len(part)} bytes long; {_REDO}")
        n = int.from_bytes(part[:4].tobytes(), "big")
        nmap = (n + 3) // 4
        if 4 + nmap > len(part):
            raise DataError(f"{where}: a compressed integer field claims {n} values in {len(part)} bytes; {_REDO}")
        counts[r] = n
        bitmaps.append(part[4 : 4 + nmap])
        bodies.append(part[4 + nmap :])
    if not counts.sum():
        return [np.empty(0, dtype=_INT[0]) for _ in parts], np.zeros(1, dtype=_INT[0])
    nmaps = (counts + 3) // 4
    map_ends = np.cumsum(nmaps)
    bitmap = np.concatenate(bitmaps)
    body = np.concatenate(bodies)
    # Each row's widths must add up to its own body (checked per row: a shifted boundary between
    # two rows would pass a total), the last byte's padding codes left out.
    per_byte = np.take(_BYTES_AND_TOP, bitmap)
    full = nmaps > 0
    sums = np.zeros(len(parts), dtype=np.int64)
    sums[full] = np.add.reduceat(per_byte, (map_ends - nmaps)[full]) & 0xFFFFFFFF
    sums[full] -= _TAIL[bitmap[map_ends[full] - 1], counts[full] % 4 + 4 * (counts[full] % 4 == 0)]
    have = np.array([len(b) for b in bodies], dtype=np.int64)
    bad = np.flatnonzero(sums != have)
    if len(bad):
        r = int(bad[0])
        raise DataError(f"{where}: a compressed integer field's widths add up to {int(sums[r])} bytes, it holds {int(have[r])}; {_REDO}")
    top = int(per_byte.max()) >> 32
    width = 1 << top
    if len(body) == width * int(counts.sum()):  # one width throughout: a plain view
        pool = body.view(_INT[top])
        return np.split(pool, np.cumsum(counts)[:-1]), pool
    # Every value gets `width` slots; the value slots of row r start at 4 * (its first bitmap byte).
    words, shifts = _tables(top)
    mask = _rows(words, bitmap).view(bool).reshape(len(bitmap), 4 * width)
    tails = np.flatnonzero(counts % 4)
    for r in tails.tolist():  # the last byte's padding codes take no bytes
        mask[map_ends[r] - 1, int(counts[r] % 4) * width :] = False
    slots = np.zeros(mask.size, dtype=np.uint8)
    slots[mask.reshape(-1)] = body
    values = slots.view(_INT[top])
    if top:
        shift = _rows(shifts, bitmap).view(_INT[top]).reshape(-1)
        values <<= shift
        values >>= shift
    firsts = 4 * (map_ends - nmaps)
    return [values[a : a + n] for a, n in zip(firsts.tolist(), counts.tolist())], values


def decompress_ints(buf: np.ndarray, where: Path | str = "MindRecord") -> np.ndarray:
    """One compressed integer array -> int64 values."""
    return decode_ints([buf], where)[0][0].astype(np.int64)
