"""Whether generate and eval put BOS before a text, and the same rule spoken aloud.

A model lmforge trained saw every document as [bos] + tokens + [eos] (that is what `prepare`
writes), so it is prompted the same way. An imported model (no data.train in its config) follows
its tokenizer's own rule, as transformers' AutoTokenizer applies it: the tokenizer.json
post-processor's template (Llama's `<s> $A`; SmolLM2's ByteLevel adds nothing), else
`add_bos_token` in tokenizer_config.json; a SentencePiece model adds BOS (LlamaTokenizer's
default). `--bos` / `--no-bos` override both.
"""

from __future__ import annotations

import json
from pathlib import Path


def _template_adds_bos(processor: dict | None, bos_token: str | None) -> bool | None:
    if not isinstance(processor, dict):
        return None
    kind = processor.get("type")
    if kind == "Sequence":
        found = [_template_adds_bos(p, bos_token) for p in processor.get("processors") or []]
        return any(f for f in found if f is not None) if any(f is not None for f in found) else None
    if kind == "TemplateProcessing":
        single = processor.get("single") or []
        first = single[0] if single else {}
        special = first.get("SpecialToken") if isinstance(first, dict) else None
        return bool(special) and (bos_token is None or special.get("id") == bos_token)
    # Bert/Roberta put [CLS] / <s> first; ByteLevel and the like add no special tokens.
    return kind in ("BertProcessing", "RobertaProcessing")


def tokenizer_adds_bos(tokenizer) -> bool:
    """The tokenizer's own rule, as transformers 5 applies it to these files: the tokenizer.json
    post-processor when there is one (add_bos_token in tokenizer_config.json does not change it
    then), else add_bos_token (default false)."""
    if tokenizer is None or tokenizer.bos_id is None:
        return False
    path = Path(getattr(tokenizer, "path", ""))
    if path.suffix != ".json":  # SentencePiece (LlamaTokenizer adds BOS); tiktoken adds none
        return getattr(tokenizer, "kind", "") == "sentencepiece" or path.suffix == ".model"
    config_path = path.parent / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    token = config.get("bos_token")
    bos_token = token.get("content") if isinstance(token, dict) else token
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if spec.get("post_processor") is None:
        return config.get("add_bos_token") is True
    return bool(_template_adds_bos(spec.get("post_processor"), bos_token))


def use_bos(tokenizer, cfg, override: bool | None) -> bool:
    """--bos / --no-bos, else BOS for models lmforge trained, else the tokenizer's own rule."""
    if tokenizer is None or tokenizer.bos_id is None:
        return False
    if override is not None:
        return override
    if cfg is not None and cfg.data.train:
        return True
    return tokenizer_adds_bos(tokenizer)


def describe_bos(bos: bool, override: bool | None, cfg) -> str:
    if override is not None:
        why = "--bos" if override else "--no-bos"
    elif cfg is not None and cfg.data.train:
        why = "as the model was trained"
    else:
        why = "the tokenizer's own rule"
    return f"BOS {'included' if bos else 'not included'} ({why})"
