"""Loglikelihood items/s: lmforge's lm-eval model against lm-eval's own `hf` backend, same weights.

The demo model's shape (lmforge/configs/demo.yaml; random weights: the speed does not depend on
their values) is exported as a Hugging Face folder; both backends score the same requests
(contexts of 40-120 tokens, continuations of 2-20) in fp32 on the CPU, at each batch size, taking
turns, best of --repeats. Also checks that both give the same log-likelihoods.

    python bench/lm_eval_speed.py [--requests 256] [--batch-sizes 1,32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lm_eval_tasks"


def demo_model_folder(root: Path) -> Path:
    from lmforge.config import load_yaml
    from lmforge.interop import export_hf
    from lmforge.model import Transformer
    from lmforge.model.config import ModelConfig
    from lmforge.tokenizer import train_tokenizer

    texts = [json.loads(x)["text"] for x in (FIXTURES / "text.jsonl").read_text().splitlines()]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 50))
    tok_dir = train_tokenizer([str(corpus)], 512, root / "tok")
    demo = load_yaml(Path(__file__).resolve().parent.parent / "lmforge" / "configs" / "demo.yaml")["model"]
    cfg = ModelConfig(**demo)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    return export_hf(model, cfg, root / "hf", dtype="float32", tokenizer=tok_dir, bos_token_id=None)


def make_requests(n: int, seed: int = 0):
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    words = " ".join(
        json.loads(x)["text"] for x in (FIXTURES / "text.jsonl").read_text().splitlines()
    ).split()
    out = []
    for i in range(n):
        start = rng.randrange(len(words))
        ctx = " ".join((words * 3)[start : start + rng.randint(20, 60)])
        cont = " " + " ".join(rng.sample(words, rng.randint(1, 8)))
        out.append(Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i))
    return out


def timed(lm, requests) -> tuple[float, list]:
    start = time.perf_counter()
    with torch.no_grad():
        scores = lm.loglikelihood(requests, disable_tqdm=True)
    return len(requests) / (time.perf_counter() - start), scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from lm_eval.models.huggingface import HFLM

    from lmforge.infer.lm_eval_tasks import make_lm, quiet_lm_eval
    from lmforge.interop.loading import load_model_for_inference

    quiet_lm_eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = demo_model_folder(Path(tmp))
        requests = make_requests(args.requests)
        model, cfg, tok = load_model_for_inference(folder, "cpu", run_config=True)
        lengths = [len(tok.encode(r.args[0] + r.args[1])) for r in requests]
        print(
            f"model: demo shape, {sum(p.numel() for p in model.parameters()):,} parameters; folder {folder}"
        )
        print(
            f"requests: {len(requests)}, tokens per request {min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.0f})"
        )
        print(
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
        )
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            ours_lm = make_lm(model, tok, cfg, batch_size=bs)
            hf_lm = HFLM(pretrained=str(folder), batch_size=bs, dtype="float32", device="cpu")
            best = {"lmforge": 0.0, "hf": 0.0}
            for _ in range(args.repeats):
                for name, lm in (("lmforge", ours_lm), ("hf", hf_lm)):
                    rate, scores = timed(lm, requests)
                    best[name] = max(best[name], rate)
                    if name == "lmforge":
                        ours_scores = scores
                    else:
                        diff = max(abs(a[0] - b[0]) for a, b in zip(ours_scores, scores))
            print(
                f"batch {bs:>3}: lmforge {best['lmforge']:7.1f} items/s | hf {best['hf']:7.1f} items/s | "
                f"ratio {best['lmforge'] / best['hf']:.2f} | max |dlogL| {diff:.2e} "
                f"| load {os.getloadavg()[0]:.1f}"
            )


if __name__ == "__main__":
    main()
