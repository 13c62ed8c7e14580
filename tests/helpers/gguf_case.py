"""A tiny GGUF test case: the byte-level tokenizer the GGUF tests embed and a small Llama-shaped
model whose norms are away from 1 (so a swapped or unused norm shows in the logits)."""

import json

import torch

from lmforge.config import ModelConfig, RopeScaling
from lmforge.model import Transformer

VOCAB = 320
TEXT = "Hello world 12345, naïve café! Привет, мир 2024. 日本語のテキスト。 <|im_start|>user\n  x=3.14159"
SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)


def corpus_lines():
    lines = [
        "Hello world 12345 the quick brown fox jumps",
        "Привет мир, как дела? 2024 год",
        "日本語のテキストです。東京",
        "naïve café — ünïcödé 3.14159 x=42",
        "  indented\tcode()\n",
    ]
    return lines * 40


def train_test_tokenizer(root):
    from lmforge.tokenizer import train_tokenizer

    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus_lines()), encoding="utf-8")
    return train_tokenizer([str(root / "c.jsonl")], VOCAB - 16, root / "tok")  # model vocab padded past it


def gguf_test_model(qk_norm, kv_heads, tied, scaling, seed=0):
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kv_heads,
        intermediate_size=80,
        max_position_embeddings=64,
        rope_theta=10000.0,
        norm_eps=1e-5,
        qk_norm=qk_norm,
        tie_embeddings=tied,
        rope_scaling=scaling,
    )
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped or unused norm shows in the logits
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model, cfg
