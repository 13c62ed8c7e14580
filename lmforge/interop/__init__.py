"""Interop: Hugging Face folders (Llama / Qwen3 / Qwen3-MoE / Mixtral), GGUF files for llama.cpp /
Ollama / LM Studio, and MiniMind's .pth checkpoints."""

from lmforge.interop.export import export_hf
from lmforge.interop.gguf_export import export_gguf
from lmforge.interop.gguf_import import import_gguf, import_gguf_to_folder
from lmforge.interop.import_ import import_hf, load_hf_model
from lmforge.interop.minimind import export_minimind, import_minimind, import_minimind_to_folder

__all__ = [
    "export_hf",
    "import_hf",
    "load_hf_model",
    "export_gguf",
    "import_gguf",
    "import_gguf_to_folder",
    "export_minimind",
    "import_minimind",
    "import_minimind_to_folder",
]
