"""Export an lmforge model to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained`
loads with no custom code: safetensors weights, config.json, generation_config.json and,
when given, the tokenizer files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import choose_family, to_hf_config
from lmforge.interop.hf_weights import to_hf

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # the shard size HF uses for large checkpoints
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files that make up a tokenizer in the formats transformers and lmforge read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def param_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every entry in our state dict for `cfg`, from a model built on the meta
    device (no memory, instant even for 70B)."""
    from lmforge.model.transformer import Transformer  # late: interop is optional for the model

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise LmforgeError(f"export dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if name not in _DTYPES:
        raise LmforgeError(f"export dtype '{dtype}' is not supported; use float32, bfloat16 or float16")
    return _DTYPES[name]


def _plain_state(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    expected = param_shapes(cfg)
    state = dict(state)
    if cfg.tie_embeddings and "output.weight" in state:
        if not torch.equal(state["output.weight"].cpu(), state["tok_embeddings.weight"].cpu()):
            raise LmforgeError(
                "output.weight differs from tok_embeddings.weight but model.tie_embeddings is true; "
                "set tie_embeddings false or pass the tied weights"
            )
        del state["output.weight"]
    for key, shape in expected.items():
        if key not in state:
            raise LmforgeError(
                f"weights lack '{key}' that the model config needs; pass the config the weights were made with"
            )
        if tuple(state[key].shape) != tuple(shape):
            raise LmforgeError(
                f"'{key}' has shape {tuple(state[key].shape)} but the model config implies {tuple(shape)} "
                "(check intermediate_size, head_dim, heads, vocab); pass the config the weights were made with"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise LmforgeError(
            f"weights have '{extra[0]}' (and {len(extra) - 1} more) that the model config does not describe; "
            "pass the config the weights were made with"
        )
    return state


def _token_ids(tokenizer: str | Path | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    from lmforge.tokenizer import load_tokenizer  # late: only needed with a tokenizer

    tok = load_tokenizer(tokenizer)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def _copy_tokenizer(src: Path, dst: Path, ids: dict[str, int | None]) -> None:
    if src.is_file():  # a single tokenizer file; keep its name
        shutil.copy2(src, dst / src.name)
        return
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    copied += sorted(p.name for p in src.glob("*.tiktoken*") if p.is_file())
    for name in copied:
        shutil.copy2(src / name, dst / name)
    if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
        # A bare tokenizers file: tell AutoTokenizer which class wraps it and which tokens are special.
        vocab = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        names = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
        meta = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role in ("bos", "eos", "pad"):
            token_id = ids.get(f"{role}_token_id")
            if token_id in names:
                meta[f"{role}_token"] = names[token_id]
        (dst / "tokenizer_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(folder / filename), metadata=meta)
        weight_map.update({n: filename for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp folder into place; an old export is removed only after that."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LmforgeError(
                f"{out}: already exists and is not empty; choose a new folder or pass overwrite"
            )
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


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
    out = Path(out_dir)
    family = choose_family(model_cfg)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{out}: exists and is not a folder; choose a folder path to export to")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LmforgeError(f"{out}: already exists and is not empty; choose a new folder or pass overwrite")
    target = resolve_dtype(dtype)
    state = check_state(_plain_state(model_or_state), model_cfg)
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
    written = tensors["model.embed_tokens.weight"].dtype
    dtype_name = next(k for k, v in _DTYPES.items() if v == written)
    hf_config = to_hf_config(model_cfg, family, dtype=dtype_name, **ids)
    generation = {k: v for k, v in ids.items() if v is not None}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_weights(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), tmp, ids)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        # config.json last: a folder with it is a complete export.
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
