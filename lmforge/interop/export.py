"""Export an lmforge model to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained`
loads with no custom code: safetensors weights, config.json, generation_config.json and,
when given, the tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import choose_family, to_hf_config
from lmforge.interop.hf_weights import to_hf
from lmforge.model.config import ModelConfig
from lmforge.parallel.apply import unwrap_model
from lmforge.tokenizer import load_tokenizer
from lmforge.weights.dtypes import dtype_name, resolve_dtype
from lmforge.weights.outdir import check_output_dir, output_dir
from lmforge.weights.safetensors_io import WEIGHTS_NAME, write_safetensors
from lmforge.weights.shapes import check_shapes, config_shapes, state_shapes
from lmforge.weights.tokenizer_files import copy_tokenizer_files

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # the shard size HF uses for large checkpoints


# What DDP and torch.compile's wrapper put before every key of a state dict saved through them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def plain_state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU state dict with wrappers (torch.compile, DDP) removed and DTensors gathered: a model
    is unwrapped (parallel.unwrap_model), a state dict saved through wrappers loses their prefixes."""
    if isinstance(model_or_state, nn.Module):
        raw = unwrap_model(model_or_state).state_dict()
    elif isinstance(model_or_state, dict):
        raw = dict(model_or_state)
        while True:  # nested wrappers (DDP around a compiled model, or the reverse)
            keys = list(raw)
            for prefix in WRAPPER_PREFIXES:
                consume_prefix_in_state_dict_if_present(raw, prefix)
            if list(raw) == keys:
                break
    else:
        raise LmforgeError(f"export_hf needs a model or a state dict, got {type(model_or_state).__name__}")
    state = {}
    for key, value in raw.items():
        if hasattr(value, "full_tensor"):  # DTensor from FSDP2 / tensor parallel
            value = value.full_tensor()
        if value.is_meta:
            raise LmforgeError(
                f"'{key}' is on the meta device (no values); materialise the model before exporting"
            )
        state[key] = value.detach()
    return state


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict must hold exactly the parameters `cfg` describes, with their shapes."""
    expected = config_shapes(cfg)
    state = dict(state)
    if cfg.tie_embeddings and "output.weight" in state:
        if not torch.equal(state["output.weight"].cpu(), state["tok_embeddings.weight"].cpu()):
            raise LmforgeError(
                "output.weight differs from tok_embeddings.weight but model.tie_embeddings is true; "
                "set tie_embeddings false or pass the tied weights"
            )
        del state["output.weight"]
    check_shapes(
        state_shapes(state),
        expected,
        "export",
        "the model config",
        "pass the config the weights were made with (check intermediate_size, head_dim, heads, vocab)",
    )
    return state


def _token_ids(tokenizer: str | Path | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {}

    tok = load_tokenizer(tokenizer)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def _bos_template(bos: str, bos_id: int) -> dict:
    """The tokenizers post-processor that puts BOS first (Llama's `<s> $A`)."""
    token = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [token, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [token, {"Sequence": {"id": "A", "type_id": 0}}, token, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _puts_bos_first(processor, bos: str) -> bool:
    if not isinstance(processor, dict):
        return False
    if processor.get("type") == "Sequence":
        return any(_puts_bos_first(p, bos) for p in processor.get("processors") or [])
    first = (processor.get("single") or [{}])[0] if processor.get("type") == "TemplateProcessing" else {}
    return isinstance(first, dict) and (first.get("SpecialToken") or {}).get("id") == bos


def _add_bos_rule(dst: Path, bos_id: int) -> None:
    """Make transformers' AutoTokenizer put BOS first, as lmforge's training did: a template
    post-processor in tokenizer.json (what transformers 4 and 5 apply) and add_bos_token in
    tokenizer_config.json (what a SentencePiece LlamaTokenizer and transformers 5 read)."""
    spec_path, config_path = dst / "tokenizer.json", dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        names = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
        bos = names.get(bos_id) or next((k for k, v in (spec.get("model") or {}).get("vocab", {}).items()
                                         if v == bos_id), None)  # fmt: skip
        if bos is None:
            return
        processor = spec.get("post_processor")
        if not _puts_bos_first(processor, bos):
            template = _bos_template(bos, bos_id)
            keep = processor if isinstance(processor, dict) and processor.get("type") != "TemplateProcessing" else None
            spec["post_processor"] = {"type": "Sequence", "processors": [keep, template]} if keep else template
            spec_path.write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        config.setdefault("bos_token", bos)
    elif not (dst / "tokenizer.model").is_file():
        return  # tiktoken files: transformers has no BOS rule to set
    config.update(add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _copy_tokenizer(src: Path, dst: Path, ids: dict[str, int | None], add_bos: bool = False) -> None:
    copied = copy_tokenizer_files(src, dst)
    if "tokenizer.json" in copied and "tokenizer_config.json" not in copied and src.is_dir():
        # A bare tokenizers file: tell AutoTokenizer which class wraps it and which tokens are special.
        vocab = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        names = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
        meta = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role in ("bos", "eos", "pad"):
            token_id = ids.get(f"{role}_token_id")
            if token_id in names:
                meta[f"{role}_token"] = names[token_id]
        (dst / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if add_bos and ids.get("bos_token_id") is not None:
        _add_bos_rule(dst, ids["bos_token_id"])


def export_hf(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    add_bos: bool = False,
) -> Path:
    """Write `out_dir` as a Hugging Face model folder and return its path.

    dtype: tensors are cast to it (None keeps the weights' dtype). tokenizer: a folder or file
    to copy along; its BOS/EOS/PAD ids go into the configs unless given explicitly. add_bos: the
    model was trained with BOS before every document, so the exported tokenizer files make
    transformers put it first too (otherwise they are copied as they are).
    Raises LmforgeError, before anything is written, when the model cannot be represented
    exactly by any of the supported HF classes.
    """
    family = choose_family(model_cfg)
    check_output_dir(out_dir, overwrite)
    target = resolve_dtype(dtype)
    state = check_state(plain_state(model_or_state), model_cfg)
    ids = _token_ids(tokenizer)
    if bos_token_id is not None:
        ids["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        ids["eos_token_id"] = eos_token_id

    tensors = {}
    for name, value in to_hf(state, family).items():
        value = value.cpu()
        if target is not None and value.is_floating_point():
            value = value.to(target)
        tensors[name] = value.contiguous()
    written = dtype_name(tensors["model.embed_tokens.weight"].dtype)
    hf_config = to_hf_config(model_cfg, family, dtype=written, **ids)
    generation = {k: v for k, v in ids.items() if v is not None}

    with output_dir(out_dir, overwrite, kind="hf", info={"dtype": written}) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_NAME, max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), tmp, ids, add_bos)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        # config.json last: a folder with it is a complete export.
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir).resolve()
