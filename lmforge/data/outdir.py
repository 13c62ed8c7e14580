"""The output-folder rule of the data commands (`prepare`, `tokenizer train`, `data fetch`): a
non-empty folder that lmforge did not write is refused unless --overwrite is given, and even then
nothing in it is deleted; lmforge only writes (and replaces) its own files there."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import DataError


def check_output_dir(out: Path, ours: bool, overwrite: bool, command: str) -> None:
    """DataError when `out` is a file, or a non-empty folder not written by `command` (unless overwrite)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and not ours and not overwrite and any(out.iterdir()):
        raise DataError(
            f"{out}: not empty and not written by lmforge {command}; choose an empty or new folder, "
            "or pass --overwrite to write beside its files (none of them is deleted)"
        )
