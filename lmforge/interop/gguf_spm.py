"""SentencePiece tokenizers (Llama-2 / Mistral / TinyLlama `tokenizer.model`) in GGUF: llama.cpp's
`tokenizer.ggml.model = "llama"` stores the pieces, their scores and types, and the two normaliser
flags (dummy prefix; extra-whitespace removal, which llama.cpp's SPM tokenizer never applies). Both directions go through SentencePiece's
own model proto, so an imported `tokenizer.model` is read by the sentencepiece library itself.
Only BPE models with the identity normaliser are taken: llama.cpp's SPM tokenizer merges by
score like SentencePiece's BPE and applies no NFKC table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError, missing_extra

BPE = 2  # sentencepiece TrainerSpec.ModelType
BYTE = 6  # piece type (the GGUF token types use SentencePiece's numbering)
UNUSED = 5


def _proto(source):
    """SentencePiece's model proto; it needs protobuf, which the 'gguf' extra declares."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise missing_extra(f"{source} (a SentencePiece vocabulary in GGUF)", "gguf") from None
    except Exception as exc:  # protobuf's VersionError: a runtime older than sentencepiece's gencode
        raise LmforgeError(f"{source}: {str(exc).splitlines()[0]}; pip install -U protobuf") from None
    return sentencepiece_model_pb2


def spm_vocab(path: Path, vocab_size: int) -> dict[str, Any]:
    """What `write_spm_vocab` writes, from a tokenizer.model file."""
    model = _proto(path).ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError
        raise LmforgeError(f"{path}: not a SentencePiece model; cannot embed it in GGUF") from None
    spec, norm = model.trainer_spec, model.normalizer_spec
    if spec.model_type != BPE:
        raise LmforgeError(
            f"{path}: a SentencePiece unigram model; llama.cpp's 'llama' vocabulary is BPE only"
        )
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise LmforgeError(
            f"{path}: normaliser '{norm.name}' has no llama.cpp equivalent; cannot export to GGUF"
        )
    if norm.remove_extra_whitespaces:
        raise LmforgeError(
            f"{path}: remove_extra_whitespaces is on, which llama.cpp's SentencePiece tokenizer ignores "
            "(Llama-2's is off); cannot export to GGUF"
        )
    size = len(model.pieces)
    if size > vocab_size:
        raise LmforgeError(
            f"{path}: {size} pieces but the model has vocab_size {vocab_size}; pass its own tokenizer"
        )
    filler = vocab_size - size
    role = {name: getattr(spec, f"{name}_id") for name in ("bos", "eos", "unk", "pad")}
    return {
        "model": "llama",
        "tokens": [p.piece for p in model.pieces] + [f"[PAD{i}]" for i in range(size, vocab_size)],
        "scores": [p.score for p in model.pieces] + [-1000.0] * filler,
        "token_types": [p.type for p in model.pieces] + [UNUSED] * filler,
        **{name: (i if 0 <= i < size else None) for name, i in role.items()},
        "add_space_prefix": norm.add_dummy_prefix,
    }


def write_spm_vocab(writer, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["token_types"])
    writer.add_add_space_prefix(vocab["add_space_prefix"])
    writer.add_remove_extra_whitespaces(False)
    if vocab["unk"] is not None:
        writer.add_unk_token_id(vocab["unk"])


def spm_files_from_gguf(meta: dict[str, Any], source: str) -> dict[str, bytes]:
    """{"tokenizer.model": serialized SentencePiece model} rebuilt from a 'llama' GGUF vocabulary."""
    pb = _proto(source)
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    while tokens and types[-1] == UNUSED and tokens[-1].startswith("[PAD"):  # llama.cpp's padding
        tokens.pop()
        scores.pop()
        types.pop()
    model = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), int(kind)
    spec = model.trainer_spec
    spec.model_type = BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        setattr(spec, f"{name}_id", token_id if token_id is not None and token_id < len(tokens) else -1)
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False  # llama.cpp's SPM tokenizer keeps every space, whatever the flag
    norm.escape_whitespaces = True
    data = model.SerializeToString()
    try:
        import sentencepiece

        sentencepiece.SentencePieceProcessor().LoadFromSerializedProto(data)
    except Exception as exc:  # sentencepiece validates ids and piece types
        raise LmforgeError(f"{source}: its SentencePiece vocabulary does not load ({exc})") from None
    return {"tokenizer.model": data}
