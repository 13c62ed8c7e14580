"""Output folders: lmforge never deletes or mixes into files it did not write.

Every command that writes a folder (export, import, checkpoint consolidate; prepare, tokenizer
train and data fetch should adopt it too) goes through `output_dir`:

    with output_dir(args.out, overwrite=args.overwrite, kind="weights") as tmp:
        ...write files into tmp...
    # now published at args.out, with the marker file MARKER in it

Rules: a missing or empty folder is written; a non-empty folder without lmforge's marker is
refused (one line; lmforge never replaces what it did not create, --overwrite or not); a
folder lmforge wrote (it holds MARKER) is replaced only with --overwrite. The files are written
into a temporary sibling and renamed into place when complete, so a crash leaves the old folder
(or nothing) and at most a `.tmp-` sibling. `--out .` (the current folder) works when it is
empty; it is never replaced wholesale, because a process must not pull the floor from under its
own working directory.
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


def is_lmforge_output(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """The absolute output folder, after refusing what must not be written over (call it before
    doing expensive work, so a refusal is immediate)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out}: exists and is not a folder; choose a folder path for --out")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not is_lmforge_output(out):
        raise LmforgeError(
            f"{out}: not empty and not written by lmforge; choose a new or empty folder for --out "
            "(lmforge only replaces folders it wrote itself, and only with --overwrite)"
        )
    if not overwrite:
        raise LmforgeError(
            f"{out}: already exists (an earlier lmforge output); pass --overwrite to replace it, or choose a new folder"
        )
    if Path.cwd() == out or out in Path.cwd().parents:
        raise LmforgeError(
            f"{out}: is the current folder (or holds it) and cannot be replaced; run from elsewhere"
        )
    return out


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place; an earlier lmforge output is removed only after."""
    if out.is_dir() and not any(out.iterdir()):
        for child in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):  # marker last
            os.replace(child, out / child.name)
        tmp.rmdir()
    elif out.exists():
        if not is_lmforge_output(out):  # filled by someone else since check_output_dir
            raise LmforgeError(
                f"{out}: not empty and not written by lmforge; left untouched; run again with a new folder"
            )
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def output_dir(out: str | Path, overwrite: bool = False, kind: str = "output", info: dict | None = None):
    """Yield a temporary folder to write into; on success it becomes `out` (see module doc)."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir()
    try:
        yield tmp
        record = {"producer": "lmforge", "kind": kind, **(info or {})}
        (tmp / MARKER).write_text(json.dumps(record) + "\n", encoding="utf-8")
        publish(tmp, out)
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
