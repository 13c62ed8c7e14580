"""The tokenizer files that travel with weights (exports, imports, consolidated folders)."""

from __future__ import annotations

import shutil
from pathlib import Path

# Every file of a tokenizer in the formats transformers and lmforge read; the first two are the
# ones that make a folder a tokenizer on their own.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def holds_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES[:2])


def tokenizer_files(src: Path) -> list[Path]:
    """The files to copy for the tokenizer at `src` (a folder, or a single tokenizer file)."""
    src = Path(src)
    if src.is_file():
        return [src]
    files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    return files + sorted(p for p in src.glob("*.tiktoken*") if p.is_file())


def copy_tokenizer_files(src: Path | None, dst: Path) -> list[str]:
    """Copy the tokenizer at `src` into `dst`; returns the names copied."""
    if src is None:
        return []
    copied = []
    for f in tokenizer_files(src):
        shutil.copy2(f, Path(dst) / f.name)
        copied.append(f.name)
    return copied
