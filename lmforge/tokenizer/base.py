"""The one tokenizer interface every stage uses, whatever file format it came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class Tokenizer:
    """Text <-> ids. `encode` never adds special tokens of its own, and encodes the special-token
    strings the tokenizer defines inside the text as their ids, as transformers' AutoTokenizer
    does (MiniMind's pretraining text carries "<|im_start|>" and "<|im_end|>" as single ids).

    Attributes: `kind` ("hf", "sentencepiece", "tiktoken"), `name` (a short human label),
    `path` (the file it was loaded from; worker processes reload from it), `vocab_size`
    (largest id + 1, specials included), `bos_id` (None when the tokenizer has no BOS),
    `eos_id`, `pad_id` (None when absent) and `fingerprint` (sha256 hex over everything that
    decides the ids; see `make_fingerprint`).
    """

    kind: str = "base"
    name: str
    path: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} vocab={self.vocab_size} bos={self.bos_id} "
            f"eos={self.eos_id} pad={self.pad_id} fp={self.fingerprint[:12]}>"
        )


# Appended to a fingerprint's payload by tokenizers that encode special-token text as the special
# ids: data prepared when specials were split as plain text then gets a different fingerprint.
SPECIALS_AS_IDS = b"\0specials-as-ids"


def make_fingerprint(kind: str, payload: bytes, bos_id: int | None, eos_id: int, pad_id: int | None) -> str:
    """sha256 over the tokenizer kind, its canonical id-determining content and the special-token
    roles (bos/eos/pad decide what `prepare` writes around each document). Independent of file
    names, paths, timestamps and JSON formatting, so a copied tokenizer keeps its fingerprint."""
    h = hashlib.sha256()
    roles = json.dumps({"kind": kind, "bos": bos_id, "eos": eos_id, "pad": pad_id}, sort_keys=True)
    h.update(roles.encode())
    h.update(b"\0")
    h.update(payload)
    return h.hexdigest()
