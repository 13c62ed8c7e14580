"""SentencePiece model files (Llama-2 / Mistral style `tokenizer.model`)."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer.base import Tokenizer, make_fingerprint


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
        # The serialized proto holds pieces, scores, types and the normalizer: everything that
        # decides ids. Its bytes are the same wherever the file is copied.
        self.fingerprint = make_fingerprint(self.kind, data, self.bos_id, self.eos_id, self.pad_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # num_threads=1: parallelism comes from prepare's worker processes, not from threads.
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])
