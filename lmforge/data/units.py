"""Work units of `lmforge prepare`: the corpus cut into pieces that are read, tokenized and written
independently (by a local worker process or a Ray task), so a prepare runs in parallel from the
files themselves and an interrupted one resumes per unit.

A unit is a plain dict (JSON-serialisable, it travels to Ray tasks and into `prepare.state/`):

    {"id": 0, "source": 0, "path": "...", "fmt": "jsonl", "kind": "range", "start": 0, "stop": 67108864,
     "line": 1, "bytes": 67108864}

kinds: `range` (uncompressed JSON lines: a byte range that starts and ends at line starts, `line`
its first line number), `rows` (Parquet: row groups [start, stop), `line` the first row number),
`file` (txt, paragraphs, wikitext and compressed files: the whole file) and `hf` (a `hf:` dataset
spec, read in streaming mode). The plan depends only on the inputs and `unit_bytes`, never on the
number of workers, which is what makes the output independent of workers and engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data import sources as S
from lmforge.errors import DataError

UNIT_BYTES = 64 << 20  # 64 MiB of input per unit: ~15M tokens, minutes of one worker at most
_BLOCK = 8 << 20


def _range_boundaries(path: Path, size: int, unit_bytes: int) -> list[int]:
    """Byte offsets (line starts) cutting `path` into pieces of about `unit_bytes`."""
    cuts = [0]
    with open(path, "rb") as f:
        target = unit_bytes
        while target < size:
            f.seek(target - 1)
            f.readline()  # to the end of the line that holds byte target-1
            pos = f.tell()
            if pos >= size:
                break
            cuts.append(pos)
            target = pos + unit_bytes
    return [*cuts, size]


def _hash_and_count_lines(path: Path, cuts: list[int]) -> tuple[str, list[int]]:
    """sha256 of the file and the 1-based line number at each cut, in one pass."""
    h = hashlib.sha256()
    lines_at, newlines, offset, k = [], 0, 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            end = offset + len(block)
            while k < len(cuts) and cuts[k] <= end:
                lines_at.append(newlines + block[: cuts[k] - offset].count(b"\n") + 1)
                k += 1
            if not block:
                break
            h.update(block)
            newlines += block.count(b"\n")
            offset = end
    return h.hexdigest(), lines_at


def _parquet_units(path: Path, unit_bytes: int) -> list[tuple[int, int, int, int]]:
    """(first row group, stop group, first row number, bytes) per unit of a Parquet file."""
    import pyarrow.parquet as pq

    try:
        md = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-Parquet files
        raise DataError(f"{path}: not a readable Parquet file ({exc}); check the file") from None
    out, start, row, size, first_row = [], 0, 0, 0, 1
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        size += rg.total_byte_size
        row += rg.num_rows
        if size >= unit_bytes or g == md.num_row_groups - 1:
            out.append((start, g + 1, first_row, size))
            start, size, first_row = g + 1, 0, row + 1
    return out or [(0, 0, 1, 0)]


def plan_units(inputs, fmt: str, unit_bytes: int = UNIT_BYTES) -> tuple[list[dict], list[dict]]:
    """(sources, units): every input with sha256/bytes (`hf:` specs by name) and the work units.
    Reads each file once (hash, line numbers at the cuts); DataError for missing inputs."""
    if unit_bytes < 1:
        raise DataError(f"unit_bytes {unit_bytes}: must be >= 1")
    sources, units = [], []

    def add(**unit) -> None:
        units.append({"id": len(units), "source": len(sources), **unit})

    for item in S.expand_inputs(inputs):
        if isinstance(item, str):
            add(path=item, fmt=fmt, kind="hf", start=0, stop=None, line=1, bytes=0)
            sources.append({"path": item, "sha256": None, "bytes": None})
            continue
        path = item.resolve()
        file_fmt = fmt if fmt != "auto" else S._format_of(item)
        if file_fmt is None:
            raise DataError(
                f"{item}: cannot tell the format from the extension; pass --format ({', '.join(S.FORMATS)})"
            )
        size = path.stat().st_size
        compressed = path.name.lower().endswith(S._COMPRESSED)
        cuts = (
            _range_boundaries(path, size, unit_bytes) if file_fmt == "jsonl" and not compressed else [0, size]
        )
        sha, lines = _hash_and_count_lines(path, cuts)
        if file_fmt == "parquet":
            for a, b, first_row, nbytes in _parquet_units(path, unit_bytes):
                add(path=str(path), fmt=file_fmt, kind="rows", start=a, stop=b, line=first_row, bytes=nbytes)
        elif size and (len(cuts) > 2 or (file_fmt == "jsonl" and not compressed)):
            for a, b, line in zip(cuts[:-1], cuts[1:], lines):
                add(path=str(path), fmt=file_fmt, kind="range", start=a, stop=b, line=line, bytes=b - a)
        else:
            add(path=str(path), fmt=file_fmt, kind="file", start=0, stop=size, line=1, bytes=size)
        sources.append({"path": str(path), "sha256": sha, "bytes": size})
    return sources, units


def txt_unit_pieces(unit: dict[str, Any], stats: S.SourceStats, strict: bool) -> Iterator[str]:
    """The text of a whole-file .txt unit (one document) in bounded pieces (`sources.txt_pieces`);
    a missing, empty or blank file is handled as `iter_unit` handles it."""
    path = Path(unit["path"])
    if not path.is_file():
        raise DataError(f"{path}: no such file (it was there when the prepare started); restore it")
    if path.stat().st_size == 0:
        S._empty_file(path, stats, strict)
        return
    found = False
    for piece in S.txt_pieces(path, stats, strict):
        found = True
        yield piece
    if not found and S._is_blank(path):
        S._empty_file(path, stats, strict)


def _parquet_rows(path: Path, unit: dict, text_field: str, stats, strict: bool) -> Iterator[S.Document]:
    groups = list(range(unit["start"], unit["stop"]))
    yield from S._read_parquet(path, text_field, stats, strict, groups, unit["line"], unit["bytes"])


def iter_unit(
    unit: dict[str, Any], text_field: str, stats: S.SourceStats, strict: bool
) -> Iterator[S.Document]:
    """The documents of one unit, in order; bad records are counted in `stats` (or DataError)."""
    kind, fmt = unit["kind"], unit["fmt"]
    if kind == "hf":
        yield from S._read_hf(unit["path"], fmt, text_field, stats, strict)
        return
    path = Path(unit["path"])
    if not path.is_file():
        raise DataError(f"{path}: no such file (it was there when the prepare started); restore it")
    whole = unit["start"] == 0 and unit["stop"] == path.stat().st_size
    if path.stat().st_size == 0:
        S._empty_file(path, stats, strict)
        return
    if kind == "rows":
        docs = _parquet_rows(path, unit, text_field, stats, strict)
    elif kind == "range":
        docs = S._read_jsonl(path, text_field, stats, strict, (unit["start"], unit["stop"], unit["line"]))
    else:
        docs = S._read_file(path, fmt, text_field, stats, strict)
    found = 0
    for doc in docs:
        found += 1
        yield doc
    if not found and whole and S._is_blank(path):
        S._empty_file(path, stats, strict)
