"""Tokenizers in GGUF: a byte-level BPE `tokenizer.json` <-> llama.cpp's `tokenizer.ggml.*` keys.

llama.cpp does not run `tokenizer.json`: it keeps the vocabulary, the merges and one named
pre-tokenizer (`tokenizer.ggml.pre`), a fixed regex set chosen by name (gguf_pretok.py). So a
tokenizer is exported only when it splits text like one of those names, and import rebuilds the
`tokenizer.json` that the name describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.interop.gguf_pretok import PRE_TOKENIZERS, pre_name, pre_tokenizer
from lmforge.interop.gguf_spm import spm_files_from_gguf, spm_vocab, write_spm_vocab
from lmforge.tokenizer import load_tokenizer

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# tokenizer_config.json key where a GGUF import records llama.cpp's name, so that export gives the
# same name back when several names split text alike (smollm, starcoder, refact, ...).
PRE_HINT = "lmforge_gguf_pre"


def tokenizer_file(tokenizer: Any) -> Path:
    """The tokenizer.json or SentencePiece tokenizer.model of a folder, file or loaded tokenizer."""
    path = Path(getattr(tokenizer, "path", tokenizer))
    if path.is_dir():
        path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "tokenizer.model"
    if not path.is_file() or getattr(tokenizer, "kind", "") == "tiktoken":
        raise LmforgeError(
            f"{path}: GGUF embeds a tokenizer.json (byte-level BPE) or a SentencePiece tokenizer.model; "
            "tiktoken files are not supported"
        )
    return path


def _pre_name(path: Path, config: dict) -> str:
    """The llama.cpp pre-tokenizer name of this tokenizer.json, or a one-line refusal."""
    from tokenizers import Tokenizer

    name = pre_name(Tokenizer.from_file(str(path)), config.get(PRE_HINT))
    if name is None:
        raise LmforgeError(
            f"{path}: its normalizer/pre-tokenizer splits text unlike every pre-tokenizer llama.cpp "
            "names (gpt-2, llama-bpe, qwen2, smollm, ...), so llama.cpp would tokenize it "
            "differently; cannot export to GGUF (use --format hf)"
        )
    return name


def _read_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"{path}: not valid JSON ({exc}); fix or remove it") from None


def gguf_vocab(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Everything `write_vocab` puts in the file, checked first so nothing is written on a refusal."""

    path = tokenizer_file(tokenizer)
    config = _read_config(path.parent)
    template = config.get("chat_template")
    template = template if isinstance(template, str) else None
    if path.name != "tokenizer.json":
        vocab = spm_vocab(path, vocab_size)
        # lmforge starts every training document with BOS, so llama.cpp should too.
        return {**vocab, "add_bos": vocab["bos"] is not None, "chat_template": template}
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise LmforgeError(f"{path}: only byte-level BPE tokenizers can be embedded in GGUF")
    pre = _pre_name(path, config)
    ids = {tok: i for tok, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in spec.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(ids.values()) + 1
    if size > vocab_size:
        raise LmforgeError(
            f"{path}: {size} tokens but the model has vocab_size {vocab_size}; pass its own tokenizer"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # llama.cpp's filler for ids past the tokenizer
    token_types = [UNUSED] * vocab_size
    for tok, i in ids.items():
        tokens[i] = tok
        token_types[i] = types.get(i, NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tok = load_tokenizer(path.parent)
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "token_types": token_types,
        "merges": merges,
        "bos": tok.bos_id,
        "eos": tok.eos_id,
        "pad": tok.pad_id,
        # lmforge starts every training document with BOS, so llama.cpp should too.
        "add_bos": tok.bos_id is not None,
        "chat_template": template,
    }


def write_vocab(writer, vocab: dict[str, Any]) -> None:
    if vocab["model"] == "llama":
        write_spm_vocab(writer, vocab)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["token_types"])
        writer.add_token_merges(vocab["merges"])
    for role in ("bos", "eos", "pad"):
        if vocab[role] is not None:
            getattr(writer, f"add_{role}_token_id")(vocab[role])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(False)
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


def tokenizer_files_from_gguf(meta: dict[str, Any], source: str) -> dict[str, str | bytes]:
    """{file name: contents} of the tokenizer rebuilt from GGUF metadata: tokenizer.json (byte-level
    BPE, 'gpt2') or tokenizer.model (SentencePiece, 'llama'), plus tokenizer_config.json; empty
    when the file carries no tokenizer."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return {}
    if kind == "llama":
        return {**spm_files_from_gguf(meta, source), "tokenizer_config.json": _config_json(meta)}
    if kind != "gpt2":
        raise LmforgeError(
            f"{source}: tokenizer.ggml.model '{kind}' is not supported (byte-level BPE 'gpt2' and "
            "SentencePiece 'llama' are); import a GGUF with one of those vocabularies"
        )
    return {"tokenizer.json": _bpe_json(meta, source), "tokenizer_config.json": _config_json(meta)}


def _bpe_json(meta: dict[str, Any], source: str) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    # llama.cpp reads a missing name as 'default' (with a warning); so do we.
    pre = meta.get("tokenizer.ggml.pre") or "default"
    splitter = pre_tokenizer(pre, source)  # a one-line refusal for names we cannot rebuild
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    while tokens and types[-1] == UNUSED and tokens[-1].startswith("[PAD"):  # llama.cpp's padding
        tokens.pop()
        types.pop()
    # Added tokens stay in the BPE vocabulary too (as tokenizers' trainer leaves them), so adding
    # them below marks them whole-match without giving them new ids.
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise LmforgeError(f"{source}: the vocabulary lists a token twice; the file is damaged")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    ignore = PRE_TOKENIZERS[pre].ignore_merges
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore))
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.ByteLevel()
    # Added tokens in id order so each keeps the id the file gives it.
    for i, (t, kind_id) in enumerate(zip(tokens, types)):
        if kind_id in (CONTROL, USER_DEFINED):
            added = AddedToken(t, special=kind_id == CONTROL, normalized=False)
            tok.add_special_tokens([added]) if kind_id == CONTROL else tok.add_tokens([added])
            if tok.token_to_id(t) != i:
                raise LmforgeError(
                    f"{source}: token {i} {t!r} is duplicated or out of order in the vocabulary"
                )
    return tok.to_str(pretty=True)


def _config_json(meta: dict[str, Any]) -> str:
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for role in ("bos", "eos", "pad", "unk"):
        key = "unknown" if role == "unk" else "padding" if role == "pad" else role
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id < len(tokens):
            config[f"{role}_token"] = tokens[token_id]
    if meta.get("tokenizer.ggml.model") == "gpt2":
        config[PRE_HINT] = meta.get("tokenizer.ggml.pre") or "default"
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
