"""Dry run (lmforge train --dry-run) of the MindFormers guide's recipes at full shape on this CPU:
Llama3-70B as the guide gives it (TP 8 x PP 8, 64 ranks, seq 8192, 256 micro batches), Llama2-7B
FSDP 8, and the planner's recommended 70B layout on 64 x 80 GB. Prints wall time, the per-stage table
(simulated by category vs planned) and the collectives per step.

    PYTHONPATH=. python bench/dryrun.py [70b|7b|70b-planned ...]
"""

from __future__ import annotations

import sys
import time

FIX = "tests/fixtures/mindformers"
RECIPES = {
    "70b": (f"{FIX}/llama3_70b_pretrain.yaml", 64, []),
    "7b": (f"{FIX}/llama2_7b_pretrain.yaml", 8, []),
}


def main(names: list[str]) -> None:
    from lmforge.mindformers import load_run_config
    from lmforge.train.dryrun import dry_run

    for name in names or list(RECIPES):
        path, world, overrides = RECIPES[name]
        cfg = load_run_config(path, overrides)
        t0 = time.perf_counter()
        print(f"== {name}: {path} on {world} ranks")
        dry_run(cfg, world, gpu_memory_gib=None)
        print(f"== {name}: wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
