"""Parity of lmforge's GGUF export with llama.cpp itself (through llama-cpp-python), on CPU.

Not a unit test: llama-cpp-python compiles llama.cpp on install (minutes). Install it in its own
venv and point it at this checkout:

    python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python
    PYTHONPATH=. /tmp/llvenv/bin/python bench/gguf_llamacpp.py --site-packages .venv/lib/python3.11/site-packages

Prints max |logit difference| between lmforge and llama.cpp for random models of each exported
architecture and dtype (llama.cpp with an f32 KV cache for f32 files, its default f16 cache
otherwise), the quantisation error table (lmforge's exports against llama.cpp's own quantiser on
the same f32 file) and whether llama.cpp tokenizes a multilingual text like lmforge's tokenizer.
With the `llamacpp` extra installed in the project venv, plain `python bench/gguf_llamacpp.py` works.
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
    quant_table(root, tok_dir)
    llm = Llama(model_path=str(root / "m-f32.gguf"), verbose=False, vocab_only=True)
    same = llm.tokenize(TEXT.encode(), add_bos=False, special=True) == load_tokenizer(tok_dir).encode(TEXT)
    print(f"tokenizer: llama.cpp ids {'equal' if same else 'DIFFER from'} lmforge's on a multilingual text")


def quant_table(root: Path, tok_dir: Path) -> None:
    """Max |logit - f32 logit| in llama.cpp for lmforge's quantised exports and for llama.cpp's own
    quantiser (llama_model_quantize) on the same f32 file; hidden 256 so K-quant blocks fit, vocab
    8192 so the embedding/output weighs as in a real model."""
    import llama_cpp
    import numpy as np
    import torch

    from lmforge.config import ModelConfig
    from lmforge.interop import export_gguf
    from lmforge.model import Transformer

    cfg = ModelConfig(vocab_size=8192, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=512, max_position_embeddings=128, rope_theta=10000.0)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(3, 300, (64,), generator=torch.Generator().manual_seed(1)).tolist()

    def logits(path):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False,
                              n_threads=1, type_k=0, type_v=0)  # fmt: skip
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    f32 = export_gguf(model, cfg, tok_dir, root / "q-f32.gguf", dtype="f32", overwrite=True)
    ref = logits(f32)
    ftypes = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
    print(f"quantisation, max|dlogit| vs f32 in llama.cpp (logit std {ref.std():.3f}):")
    for dtype, ftype in ftypes.items():
        ours = export_gguf(model, cfg, tok_dir, root / f"q-{dtype}.gguf", dtype=dtype, overwrite=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        theirs = root / f"q-{dtype}-llamacpp.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
        row = f"  {dtype:7s} lmforge {np.abs(logits(ours) - ref).max():.4f}  llama.cpp {np.abs(logits(theirs) - ref).max():.4f}"
        if dtype == "q4_0":  # the embedding/output at Q4_0 too, as lmforge wrote it before
            import lmforge.interop.gguf_export as ge

            keep = ge._encode
            ge._encode = lambda name, value, dt, head=False, keep=keep: keep(name, value, dt)
            try:
                old = export_gguf(model, cfg, tok_dir, root / "q-q4_0-old.gguf", dtype=dtype, overwrite=True)
            finally:
                ge._encode = keep
            row += f"  (lmforge with a Q4_0 embedding/output: {np.abs(logits(old) - ref).max():.4f})"
        print(row, flush=True)


if __name__ == "__main__":
    main()
