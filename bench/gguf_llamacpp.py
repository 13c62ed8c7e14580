"""Parity of lmforge's GGUF export with llama.cpp itself (through llama-cpp-python), on CPU.

Not a unit test: llama-cpp-python compiles llama.cpp on install (minutes). Install it in its own
venv and point it at this checkout:

    python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python
    PYTHONPATH=. /tmp/llvenv/bin/python bench/gguf_llamacpp.py --site-packages .venv/lib/python3.11/site-packages

Prints max |logit difference| between lmforge and llama.cpp for random models of each exported
architecture and dtype (llama.cpp with an f32 KV cache for f32 files, its default f16 cache
otherwise) and whether llama.cpp tokenizes a multilingual text like lmforge's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TEXT = "Hello world 12345, naïve café! Привет, мир 2024. 日本語のテキスト。 <|im_start|>user\n  x=3.14159"
CORPUS = [
    "Hello world 12345 the quick brown fox jumps",
    "Привет мир, как дела? 2024 год",
    "日本語のテキストです。東京",
    "naïve café — ünïcödé 3.14159 x=42",
    "  indented\tcode()\n",
] * 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--site-packages", default=None, help="the project venv's site-packages (torch, tokenizers)"
    )
    args = ap.parse_args()
    if args.site_packages:
        sys.path.append(args.site_packages)
    import numpy as np
    import torch
    from llama_cpp import Llama

    from lmforge.config import ModelConfig, MoEConfig, RopeScaling
    from lmforge.interop import export_gguf
    from lmforge.model import Transformer
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="gguf-llamacpp-"))
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS), encoding="utf-8")
    tok_dir = train_tokenizer([str(root / "c.jsonl")], 304, root / "tok")
    scaling = RopeScaling(factor=8.0, original_max_position_embeddings=32)
    moe = MoEConfig(num_experts=4, top_k=2, expert_intermediate_size=48, norm_topk_prob=True)
    cases = {
        "llama GQA 1 tied": dict(num_kv_heads=4),
        "llama GQA 4 untied rope-scaling": dict(num_kv_heads=1, tie_embeddings=False, rope_scaling=scaling),
        "qwen3 GQA 1 untied": dict(num_kv_heads=4, qk_norm=True, tie_embeddings=False),
        "qwen3 GQA 4 tied": dict(num_kv_heads=1, qk_norm=True),
        "qwen3moe 4 experts top-2": dict(num_kv_heads=2, qk_norm=True, moe=moe),
        "llama + experts top-2": dict(num_kv_heads=2, moe=moe),
    }
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    for name, extra in cases.items():
        cfg = ModelConfig(
            vocab_size=320,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=80,
            max_position_embeddings=64,
            rope_theta=10000.0,
            **extra,
        )
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        with torch.no_grad():
            ours = model(ids).logits[0].numpy()
        for dtype in ("f32", "f16", "q8_0"):
            path = export_gguf(model, cfg, tok_dir, root / f"m-{dtype}.gguf", dtype=dtype, overwrite=True)
            cache = {"type_k": 0, "type_v": 0} if dtype == "f32" else {}  # 0 = GGML_TYPE_F32
            llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, **cache)
            llm.eval(ids[0].tolist())
            diff = np.abs(ours - np.array(llm.scores[: ids.shape[1]])).max()
            print(f"{name:34s} {dtype:5s} max|dlogit| {diff:.2e}  (logit std {ours.std():.3f})", flush=True)
    llm = Llama(model_path=str(root / "m-f32.gguf"), verbose=False, vocab_only=True)
    same = llm.tokenize(TEXT.encode(), add_bos=False, special=True) == load_tokenizer(tok_dir).encode(TEXT)
    print(f"tokenizer: llama.cpp ids {'equal' if same else 'DIFFER from'} lmforge's on a multilingual text")


if __name__ == "__main__":
    main()
