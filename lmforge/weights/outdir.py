"""Output folders: lmforge never deletes, or writes over, a file it did not write.

Export, import, checkpoint consolidate and tokenizer train write through `output_dir`; prepare
and data fetch, which write in place and resume, apply the same refusal with `check_output_dir`:

    with output_dir(args.out, overwrite=args.overwrite, kind="weights") as tmp:
        ...write files into tmp...
    # now published at args.out, with the manifest MARKER listing what lmforge wrote

Rules, checked before any work (`check_output_dir`) and again when publishing:
- a missing or empty folder is written: the temporary sibling is renamed into place;
- a non-empty folder is refused (one line) unless --overwrite is given; with it, lmforge
  replaces only the files its manifest says it wrote there, keeps every other file, and refuses
  when one of the files it is about to write is a file it did not write;
- files are written into a temporary sibling `.<name>.tmp-*` and moved in when complete, the
  manifest last; a crash leaves the earlier files and at most that sibling.
`--out .` works like any folder: the current folder is filled, never renamed or removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from lmforge.errors import LmforgeError

MARKER = "lmforge.json"


def written_by_lmforge(folder: Path, kind: str | None = None) -> set[str]:
    """Names of the files lmforge's manifest in `folder` lists (empty when there is none, or,
    with `kind`, when the manifest records another kind of output)."""
    try:
        record = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if kind is not None and (not isinstance(record, dict) or record.get("kind") != kind):
        return set()
    names = record.get("files") if isinstance(record, dict) else None
    return {n for n in names if isinstance(n, str) and "/" not in n} if isinstance(names, list) else set()


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """The absolute output folder, after refusing what must not be written into."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out}: exists and is not a folder; choose a folder path for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        whose = "an earlier lmforge output" if (out / MARKER).is_file() else "files lmforge did not write"
        raise LmforgeError(
            f"{out}: already exists and is not empty ({whose}); choose a new folder, or pass --overwrite "
            "(lmforge then replaces only files it wrote there)"
        )
    return out


def _merge(tmp: Path, out: Path) -> None:
    """Move tmp's files into the existing folder `out`, replacing only lmforge's own files."""
    ours = written_by_lmforge(out) | {MARKER}
    new = {p.name for p in tmp.iterdir()}
    foreign = sorted(n for n in new if (out / n).exists() and n not in ours)
    if foreign:
        raise LmforgeError(
            f"{out / foreign[0]}: exists and was not written by lmforge; move it away or choose another --out"
        )
    (out / MARKER).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    for name in sorted(ours - new):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for child in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):  # manifest last
        os.replace(child, out / child.name)


@contextlib.contextmanager
def output_dir(out: str | Path, overwrite: bool = False, kind: str = "output", info: dict | None = None):
    """Yield a temporary folder to write into; on success its files are published at `out`."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        record = {"producer": "lmforge", "kind": kind, **(info or {}), "files": files}
        (tmp / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")
        if out.exists():
            check_output_dir(out, overwrite)  # again: the folder may have been filled meanwhile
            _merge(tmp, out)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """A single output file: refuse an existing one unless --overwrite."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise LmforgeError(f"{path}: is a folder; pass a file path ending in .safetensors, or a new folder")
    if path.exists() and not overwrite:
        raise LmforgeError(f"{path}: already exists; pass --overwrite to replace it, or choose another path")
    return path
