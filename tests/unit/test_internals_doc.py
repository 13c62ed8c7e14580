"""docs/internals.md's file list matches the package: every module under lmforge/ has exactly one
entry (packages' __init__.py aside), and every entry names a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import lmforge

ROOT = Path(lmforge.__file__).parents[1]
DOC = ROOT / "docs" / "internals.md"


def listed_files(text: str) -> list[str]:
    """The paths that start the entries of the block after 'Files (one line each):' (an entry's
    continuation lines are indented)."""
    block = text.split("Files (one line each):\n```\n", 1)[1].split("```", 1)[0]
    return [line.split()[0] for line in block.splitlines() if re.match(r"lmforge/", line)]


def test_the_reader_finds_the_entries():
    text = "x\nFiles (one line each):\n```\nlmforge/a.py     A\n                 more\nlmforge/b/c.py   C\n```\n"
    assert listed_files(text) == ["lmforge/a.py", "lmforge/b/c.py"]


def test_every_module_has_one_entry_and_every_entry_a_file():
    listed = listed_files(DOC.read_text(encoding="utf-8"))
    modules = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "lmforge").rglob("*.py") if p.name != "__init__.py"
    )
    twice = sorted({p for p in listed if listed.count(p) > 1})
    assert twice == [], f"listed more than once in docs/internals.md: {twice}"
    missing = [m for m in modules if m not in listed]
    assert missing == [], f"not in docs/internals.md's file list (add one line each): {missing}"
    stale = [p for p in listed if not (ROOT / p).is_file()]
    assert stale == [], f"docs/internals.md lists files that do not exist: {stale}"
