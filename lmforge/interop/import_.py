"""Import a Hugging Face Llama / Qwen3 / Qwen3-MoE / Mixtral folder as an lmforge state dict and
ModelConfig. Only safetensors are read: nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.export import param_shapes
from lmforge.interop.hf_config import from_hf_config
from lmforge.interop.hf_weights import from_hf

_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: model.safetensors or the shards its index names."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmforgeError(f"{index}: has no 'weight_map'; the index is damaged")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise LmforgeError(
                    f"{index}: names shard '{file.name}' which is missing; copy the whole folder"
                )
        return files
    for name in _PICKLE_FILES:
        if (folder / name).exists():
            raise LmforgeError(
                f"{folder / name}: pickled weights are not loaded (they can run code); convert the "
                "checkpoint to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
            )
    raise LmforgeError(
        f"{folder}: no model.safetensors or model.safetensors.index.json; not a Hugging Face model folder"
    )


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = f.keys()  # safe_open is not iterable
                for key in names:
                    if key in tensors:
                        raise LmforgeError(f"{file}: tensor '{key}' also appears in another shard")
                    tensors[key] = f.get_tensor(key)
        except LmforgeError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise LmforgeError(f"{file}: not a readable safetensors file: {exc}") from None
    return tensors


def import_hf(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state_dict with our parameter names, ModelConfig) from a Hugging Face model folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise LmforgeError(
            f"{folder}: not a folder; pass a Hugging Face model folder (config.json + safetensors)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LmforgeError(f"{config_path}: missing; a Hugging Face model folder needs config.json")
    family, cfg = from_hf_config(_read_json(config_path), source=str(config_path))
    files = weight_files(folder)
    tensors = read_safetensors(files)
    source = str(files[0] if len(files) == 1 else folder / "model.safetensors.index.json")
    state = from_hf(tensors, family, param_shapes(cfg), cfg.tie_embeddings, source)
    return state, cfg


def load_hf_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Our Transformer with the weights of an HF folder loaded strictly, in eval mode.

    Built on the meta device and materialised on `device`, so the weights are allocated once.
    dtype None keeps the dtype stored in the files. Returns (model, ModelConfig).
    """
    from lmforge.model.layers import rope_tables
    from lmforge.model.transformer import Transformer

    state, cfg = import_hf(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype or state["tok_embeddings.weight"].dtype)  # on meta: only changes dtypes
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True)  # every parameter; RoPE tables are not in it
    cos, sin = rope_tables(cfg)  # fp32 like HF's, whatever the parameter dtype
    model.rope_cos = cos.to(device)
    model.rope_sin = sin.to(device)
    return model.eval(), cfg
