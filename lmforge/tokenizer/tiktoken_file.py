"""tiktoken rank files: Llama-3 `tokenizer.model`, GPT-2 `gpt2.tiktoken`, `*.tiktoken.gz`.

A rank file is only the mergeable byte sequences; the split regex and the special tokens come
from the model family. Files whose sha256 is one of OpenAI's published encodings get that
encoding's regex and specials (from tiktoken's own registry). Otherwise a file named
`tokenizer.model` follows the Llama-3 convention (its regex, 256 specials after the ranks,
`<|begin_of_text|>` = bos, `<|end_of_text|>` = eos), and any other file the GPT-2 convention
(GPT-2 regex, `<|endoftext|>` right after the ranks as eos, no bos).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer.base import SPECIALS_AS_IDS, Tokenizer, make_fingerprint

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_NUM_SPECIALS = 256
# Llama 3.1+ names for the first special ids after the ranks; the rest are reserved slots.
_LLAMA3_NAMED = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)


def read_rank_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise LmforgeError(f"{path}: corrupt gzip ({exc}); re-download the tokenizer file") from None
    return raw


def looks_like_ranks(head: bytes) -> bool:
    """True when the first line is `<base64> <int>` (a tiktoken rank file)."""
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def parse_ranks(path: Path, raw: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise LmforgeError(
                f"{path}:{lineno}: not a tiktoken rank line ('<base64> <rank>'); re-download the file"
            ) from None
    if not ranks:
        raise LmforgeError(f"{path}: empty tiktoken rank file; re-download the file")
    return ranks


def _openai_encoding(content_sha: str, ranks: dict[bytes, int]) -> dict | None:
    """The spec of the OpenAI encoding whose published file hash equals `content_sha`, if any."""
    try:
        import tiktoken_ext.openai_public as registry
    except ImportError:
        return None
    seen: dict[str, str | None] = {}

    def fake_load(_url, expected_hash=None):
        seen["hash"] = expected_hash
        return ranks

    original = registry.load_tiktoken_bpe
    registry.load_tiktoken_bpe = fake_load  # read regex + specials without any download
    try:
        for name in ("r50k_base", "p50k_base", "cl100k_base", "o200k_base"):
            ctor = getattr(registry, name, None)
            if ctor is None:
                continue
            try:
                spec = ctor()
            except Exception:  # noqa: BLE001 - a changed registry layout just means "unknown"
                continue
            if seen.get("hash") == content_sha:
                return spec
    finally:
        registry.load_tiktoken_bpe = original
    return None


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path):
        import tiktoken

        self.path = Path(path)
        raw = read_rank_bytes(self.path)
        ranks = parse_ranks(self.path, raw)
        n = max(ranks.values()) + 1
        spec = _openai_encoding(hashlib.sha256(raw).hexdigest(), ranks)
        if spec is not None:
            pattern, specials, style = spec["pat_str"], dict(spec["special_tokens"]), spec["name"]
            bos, eos = None, specials["<|endoftext|>"]
            pad = None
        elif self.path.name == "tokenizer.model":
            pattern, style = LLAMA3_PATTERN, "llama3"
            names = list(_LLAMA3_NAMED) + [
                f"<|reserved_special_token_{i}|>"
                for i in range(2, 2 + LLAMA3_NUM_SPECIALS - len(_LLAMA3_NAMED))
            ]
            specials = {tok: n + i for i, tok in enumerate(names)}
            bos, eos = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
            pad = specials["<|finetune_right_pad_id|>"]
        else:
            pattern, style = GPT2_PATTERN, "gpt2"
            specials = {"<|endoftext|>": n}
            bos, eos, pad = None, n, None
        try:
            self._enc = tiktoken.Encoding(
                name=f"lmforge-{style}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
            )
        except Exception as exc:  # noqa: BLE001 - tiktoken rejects inconsistent rank tables
            raise LmforgeError(f"{self.path}: tiktoken could not build an encoder ({exc})") from None
        self.bos_id, self.eos_id, self.pad_id = bos, eos, pad
        self.vocab_size = max([n - 1, *specials.values()]) + 1
        self.name = f"tiktoken-{style}-{self.vocab_size}"
        # Canonical content: ranks in rank order, the regex and the specials; the same for a
        # .gz and a plain copy of one file.
        lines = [pattern.encode()]
        lines += [f"{t} {i}".encode() for t, i in sorted(specials.items(), key=lambda kv: kv[1])]
        lines += [
            base64.b64encode(tok) + b" " + str(r).encode()
            for tok, r in sorted(ranks.items(), key=lambda kv: kv[1])
        ]
        # The suffix marks specials-as-ids encoding: data prepared when they were text differs.
        self.fingerprint = make_fingerprint(self.kind, b"\n".join(lines) + SPECIALS_AS_IDS, bos, eos, pad)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: prepare parallelises with processes.
        return [self._enc.encode(t, allowed_special="all") for t in texts]

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])
