"""`load_tokenizer(path)`: pick the reader for a folder or file by name and content."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer.base import Tokenizer

_WHAT = "give a folder with tokenizer.json or tokenizer.model, or a tokenizer.json / .model / .tiktoken file"


def _pick_file(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    found = (
        sorted(folder.glob("*.tiktoken"))
        + sorted(folder.glob("*.tiktoken.gz"))
        + sorted(folder.glob("*.model"))
    )
    if found:
        return found[0]
    raise LmforgeError(
        f"{folder}: no tokenizer.json, tokenizer.model or *.tiktoken file in the folder; {_WHAT}"
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `Tokenizer` from a folder or file: HF tokenizer.json, SentencePiece .model, tiktoken ranks
    (plain or gzip). Files named tokenizer.model are told apart by content."""
    from lmforge.tokenizer.tiktoken_file import TiktokenTokenizer, looks_like_ranks, read_rank_bytes

    p = Path(path).expanduser()
    if not p.exists():
        raise LmforgeError(f"{p}: tokenizer not found; {_WHAT}")
    if p.is_dir():
        p = _pick_file(p)
    if p.name.endswith(".json"):
        from lmforge.tokenizer.hf import HFTokenizer

        return HFTokenizer(p)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise LmforgeError(f"{p}: cannot read tokenizer file ({exc.strerror})") from None
    if not data:
        raise LmforgeError(f"{p}: empty file; {_WHAT}")
    if data[:2] == b"\x1f\x8b" or p.name.endswith((".tiktoken", ".tiktoken.gz")):
        if not looks_like_ranks(read_rank_bytes(p)[:4096]):
            raise LmforgeError(f"{p}: not a tiktoken rank file ('<base64> <rank>' lines); {_WHAT}")
        return TiktokenTokenizer(p)
    if looks_like_ranks(data[:4096]):
        return TiktokenTokenizer(p)
    from lmforge.tokenizer.sp import SentencePieceTokenizer

    return SentencePieceTokenizer(p, data)
