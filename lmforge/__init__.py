"""lmforge: pretrain Llama-family language models, from a laptop CPU to many GPUs."""

__version__ = "0.1.0"
