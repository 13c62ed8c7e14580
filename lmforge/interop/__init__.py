"""Hugging Face interop: export to and import from Llama / Qwen3 / Qwen3-MoE / Mixtral folders."""

from lmforge.interop.export import export_hf
from lmforge.interop.import_ import import_hf, load_hf_model

__all__ = ["export_hf", "import_hf", "load_hf_model"]
