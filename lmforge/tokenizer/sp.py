"""SentencePiece model files (Llama-2 / Mistral style `tokenizer.model`)."""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer.base import SPECIALS_AS_IDS, Tokenizer, make_fingerprint


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path, data: bytes):
        import sentencepiece as spm

        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception:  # noqa: BLE001 - the C++ parser raises plain RuntimeError/OSError
            raise LmforgeError(
                f"{self.path}: neither a SentencePiece model nor a tiktoken rank file; "
                "give tokenizer.json, a SentencePiece tokenizer.model or a tiktoken file"
            ) from None
        self.vocab_size = self._sp.get_piece_size()

        def role(i: int) -> int | None:
            return i if 0 <= i < self.vocab_size else None

        self.bos_id = role(self._sp.bos_id())
        self.pad_id = role(self._sp.pad_id())
        eos = role(self._sp.eos_id())
        if eos is None:
            raise LmforgeError(
                f"{self.path}: SentencePiece model has no eos piece; retrain it with eos_id >= 0"
            )
        self.eos_id = eos
        self.name = f"sentencepiece-{self.vocab_size}"
        # The text of the unk/bos/eos/pad pieces stands for their ids, as in transformers' (and
        # MindFormers') LlamaTokenizer: the text is cut there and each piece between is encoded alone.
        roles = [self._sp.unk_id(), self.bos_id, self.eos_id, self.pad_id]
        self._specials = {self._sp.id_to_piece(i): i for i in roles if i is not None and 0 <= i < self.vocab_size}
        ordered = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        # The serialized proto holds pieces, scores, types and the normalizer: everything that
        # decides ids. Its bytes are the same wherever the file is copied.
        self.fingerprint = make_fingerprint(self.kind, data + SPECIALS_AS_IDS, self.bos_id, self.eos_id, self.pad_id)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # num_threads=1: parallelism comes from prepare's worker processes, not from threads.
        plain = [self._split is None or self._split.search(t) is None for t in texts]
        simple = self._sp.encode([t for t, p in zip(texts, plain) if p], out_type=int, num_threads=1)
        it = iter(simple)
        return [next(it) if p else self._encode_with_specials(t) for t, p in zip(texts, plain)]

    def _encode_with_specials(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids += self._sp.encode(part, out_type=int)
        return ids

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])
