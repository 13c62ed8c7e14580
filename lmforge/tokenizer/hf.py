"""Hugging Face `tokenizers` JSON files (tokenizer.json), with roles from tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.tokenizer.base import SPECIALS_AS_IDS, Tokenizer, make_fingerprint

# Parts of tokenizer.json that decide the ids of a text; post_processor only adds specials
# (which `encode` never does), decoder/truncation/padding do not change ids.
_ID_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model")
# Used when no tokenizer_config.json / special_tokens_map.json names the roles.
_EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|im_start|>")
# MiniMind / Qwen chat layout: documents end with <|im_end|>, <|endoftext|> is only padding.
# When both chat markers exist, a lone tokenizer.json follows that convention instead.
_CHAT_ROLES = {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}


def _guess_roles(vocab: dict[str, int], named: dict[str, str | None]) -> dict[str, int | None]:
    """Ids for the roles the config files did not name, guessed from well-known token strings."""
    chat = _CHAT_ROLES["bos"] in vocab and _CHAT_ROLES["eos"] in vocab
    guesses: dict[str, int | None] = {}
    if chat:
        for role, tok in _CHAT_ROLES.items():
            if role not in named:
                guesses[role] = vocab.get(tok)
        return guesses
    if "eos" not in named:
        guesses["eos"] = next((vocab[t] for t in _EOS_GUESSES if t in vocab), None)
    if "bos" not in named:
        guesses["bos"] = next((vocab[t] for t in _BOS_GUESSES if t in vocab), None)
    return guesses


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _canonical_payload(spec: dict) -> bytes:
    parts = {k: spec.get(k) for k in _ID_KEYS}
    model = dict(parts["model"] or {})
    # tokenizers >= 0.20 saves merges as ["a", "b"] pairs, older versions as "a b" strings.
    merges = model.get("merges")
    if isinstance(merges, list):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    parts["model"] = model
    # added_tokens carry an id each; their listing order is irrelevant.
    parts["added_tokens"] = sorted(parts["added_tokens"] or [], key=lambda t: t.get("id", 0))
    return json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _read_roles(folder: Path) -> dict[str, str | None]:
    """bos/eos/pad/unk token strings from tokenizer_config.json, then special_tokens_map.json."""
    roles: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        path = folder / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LmforgeError(f"{path}: not valid JSON ({exc}); fix or remove the file") from None
        for role in ("bos", "eos", "pad", "unk"):
            key = f"{role}_token"
            if key in cfg:
                roles[role] = _token_content(cfg[key])
    return roles


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        try:
            raw = self.path.read_text(encoding="utf-8")
            spec = json.loads(raw)
            self._tok = RustTokenizer.from_str(raw)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LmforgeError(f"{self.path}: not a valid Hugging Face tokenizer.json ({first})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        # Special tokens the tokenizer defines are matched in the text and encoded as their ids,
        # as transformers' AutoTokenizer does (MiniMind's data carries <|im_start|>/<|im_end|>).
        self._tok.encode_special_tokens = False
        self._fast_batch = getattr(self._tok, "encode_batch_fast", None)

        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        roles = _read_roles(self.path.parent)
        ids = {role: (vocab.get(tok) if tok else None) for role, tok in roles.items()}
        for role, tok in roles.items():
            if tok and ids[role] is None:
                raise LmforgeError(
                    f"{self.path.parent}: {role}_token {tok!r} from the tokenizer config is not in "
                    f"{self.path.name}; fix the config"
                )
        ids.update(_guess_roles(vocab, roles))
        if ids.get("eos") is None:
            raise LmforgeError(
                f'{self.path}: no end-of-text token; add "eos_token" to tokenizer_config.json beside it'
            )
        self.eos_id = ids["eos"]
        self.bos_id = ids.get("bos")
        self.pad_id = ids.get("pad")
        model = spec.get("model") or {}
        self.name = f"hf-{str(model.get('type', 'model')).lower()}-{self.vocab_size}"
        # The suffix marks specials-as-ids encoding: data prepared when they were text differs.
        self.fingerprint = make_fingerprint(
            self.kind, _canonical_payload(spec) + SPECIALS_AS_IDS, self.bos_id, self.eos_id, self.pad_id
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast_batch is not None:  # skips offsets, which we never use
            return [e.ids for e in self._fast_batch(texts, add_special_tokens=False)]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
