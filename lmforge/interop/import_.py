"""Import a Hugging Face Llama / Qwen3 / Qwen3-MoE / Mixtral folder as an lmforge state dict and
ModelConfig. Only safetensors are read: nothing is unpickled."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.interop.hf_config import from_hf_config
from lmforge.interop.hf_weights import from_hf
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import build
from lmforge.weights.safetensors_io import INDEX_NAME, hf_weight_files, read_json_object, read_safetensors
from lmforge.weights.shapes import config_shapes


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
    family, cfg = from_hf_config(read_json_object(config_path), source=str(config_path))
    files = hf_weight_files(folder)
    tensors = read_safetensors(files)
    source = str(files[0] if len(files) == 1 else folder / INDEX_NAME)
    state = from_hf(tensors, family, config_shapes(cfg), cfg.tie_embeddings, source)
    return state, cfg


def load_hf_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Our Transformer with the weights of an HF folder loaded strictly, in eval mode.

    Built on the meta device and materialised on `device`, so the weights are allocated once.
    dtype None keeps the dtype stored in the files. Returns (model, ModelConfig).
    """

    state, cfg = import_hf(path)
    # fp32 RoPE tables like HF's, whatever the parameter dtype
    model = build(cfg, device, dtype=dtype or state["tok_embeddings.weight"].dtype)
    model.load_state_dict(state, strict=True)  # every parameter; RoPE tables are not in it
    return model.eval(), cfg
