"""`lmforge demo` with today's (pre-issue-19) recipe against the new demo.yaml, side by side.

    PYTHONPATH=. python bench/demo_recipe.py --out runs/demo_ab --rounds 3 --seeds 1337,1,2

Each round starts both demos at the same moment, as two processes (so the shared machine's load
falls on both alike), each the whole `lmforge demo` pipeline (fetch from the download cache,
tokenizer, shards, train, evaluate, generate, export) with one torch thread; the order of the two in
a round alternates; round r runs both with run.seed seeds[r] (default: demo.yaml's own seed, every
round). "today" is the packaged demo.yaml with TODAY's overrides, which restore the
recipe the demo had before issue 19 (AdamW lr 6e-3 for every parameter, cosine, warmup 30, no document
mask, 500 steps of 16 x 128). Reported per run: the demo's own validation perplexity (its evaluator, 40 batches of the
val split), total and training wall seconds, and the process's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TODAY = {
    "optim": {
        "name": "adamw",
        "lr": 0.006,
        "min_lr_ratio": 0.1,
        "schedule": "cosine",
        "warmup_steps": 30,
        "weight_decay": 0.1,
        "muon_lr": None,
    },
    "data": {"document_mask": False},
    "model": {"tie_embeddings": True},
    "train": {"global_batch_size": 16, "max_steps": 500},
}

CHILD = """
import json, resource, sys, time, torch
from pathlib import Path
import lmforge.demo as demo
torch.set_num_threads(1)
demo.DEMO_YAML = Path(sys.argv[1])
r = demo.run_demo(sys.argv[2])
cpu = resource.getrusage(resource.RUSAGE_SELF)
print("DEMO_RESULT " + json.dumps({"val_ppl": r["val_ppl_after"], "val_loss": r["val_loss_after"],
      "steps": r["steps"], "tokens": r["tokens"], "wall_s": r["wall_seconds"], "train_s": r["train_seconds"],
      "cpu_s": cpu.ru_utime + cpu.ru_stime}))
"""


def write_configs(tmp: Path, seed: int | None = None) -> dict[str, Path]:
    import yaml

    from lmforge.demo import _merge, demo_config_tree

    extra = {"run": {"seed": seed}} if seed is not None else {}
    today, new = tmp / f"today_{seed}.yaml", tmp / f"new_{seed}.yaml"
    today.write_text(yaml.safe_dump(_merge(_merge(demo_config_tree(), json.loads(json.dumps(TODAY))), extra)))
    new.write_text(yaml.safe_dump(_merge(demo_config_tree(), extra)))
    return {"today": today, "new": new}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo_ab")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seeds", default=None, help="run.seed per round, comma-separated (cycled)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    out = Path(args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            seed = seeds[r % len(seeds)]
            configs = write_configs(Path(tmp), seed)
            names = list(configs) if r % 2 == 0 else list(configs)[::-1]
            procs = {
                n: subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(configs[n]), str(out / f"{n}_r{r}")],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                for n in names
            }
            for name, proc in procs.items():
                text, _ = proc.communicate()
                line = next(x for x in text.splitlines() if x.startswith("DEMO_RESULT "))
                rows.append({"config": name, "round": r, "seed": seed, **json.loads(line.split(" ", 1)[1])})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| config | round | seed | steps | tokens | val ppl (demo's evaluator) | total wall s | train wall s | CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['config']} | {x['round']} | {x['seed'] or 'demo.yaml'} | {x['steps']} | {x['tokens']:,} | {x['val_ppl']:.1f} | "
            f"{x['wall_s']:.0f} | {x['train_s']:.0f} | {x['cpu_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
