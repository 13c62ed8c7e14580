"""Tokenizers: train a byte-level BPE, and load HF / SentencePiece / tiktoken files behind one interface."""

from lmforge.tokenizer.base import Tokenizer
from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer"]
