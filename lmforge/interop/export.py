"""Export an lmforge model to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained`
loads with no custom code: safetensors weights, config.json, generation_config.json and,
when given, the tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import choose_family, to_hf_config
from lmforge.interop.hf_weights import to_hf
from lmforge.model.config import ModelConfig
from lmforge.tokenizer import load_tokenizer
from lmforge.weights.dtypes import dtype_name, resolve_dtype
from lmforge.weights.outdir import check_output_dir, output_dir
from lmforge.weights.safetensors_io import WEIGHTS_NAME, write_safetensors
from lmforge.weights.shapes import check_shapes, config_shapes, state_shapes
from lmforge.weights.tokenizer_files import copy_tokenizer_files

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # the shard size HF uses for large checkpoints


def plain_state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU state dict with wrapper prefixes (torch.compile, DDP) removed and DTensors gathered."""
    if isinstance(model_or_state, nn.Module):
        raw = model_or_state.state_dict()
    elif isinstance(model_or_state, dict):
        raw = model_or_state
    else:
        raise LmforgeError(f"export_hf needs a model or a state dict, got {type(model_or_state).__name__}")
    state = {}
    for key, value in raw.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
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


def _copy_tokenizer(src: Path, dst: Path, ids: dict[str, int | None]) -> None:
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
) -> Path:
    """Write `out_dir` as a Hugging Face model folder and return its path.

    dtype: tensors are cast to it (None keeps the weights' dtype). tokenizer: a folder or file
    to copy along; its BOS/EOS/PAD ids go into the configs unless given explicitly.
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
            _copy_tokenizer(Path(tokenizer), tmp, ids)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        # config.json last: a folder with it is a complete export.
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir).resolve()
