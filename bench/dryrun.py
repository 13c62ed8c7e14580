"""Dry run (lmforge train --dry-run) of the MindFormers guide's recipes at full shape on this CPU:
Llama3-70B as the guide gives it (TP 8 x PP 8, 64 ranks, seq 8192, 256 micro batches), Llama2-7B
FSDP 8, and the planner's recommended 70B layout on 64 x 80 GB (H100). Prints the machine load,
wall time, the per-stage table (simulated by category vs planned) and the collectives per step;
`--json DIR` also writes each recipe's records to DIR/dryrun_<name>.json.

    PYTHONPATH=. python bench/dryrun.py [70b|7b|70b-planned ...] [--json DIR]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

FIX = "tests/fixtures/mindformers"
RECIPES = {
    "70b": (f"{FIX}/llama3_70b_pretrain.yaml", 64),
    "7b": (f"{FIX}/llama2_7b_pretrain.yaml", 8),
    "70b-planned": (f"{FIX}/llama3_70b_pretrain.yaml", 64),
}


def planned_overrides(cfg, gpus: int, gpu_memory_gib: float = 80.0) -> list[str]:
    """`lmforge plan`'s recommended layout for `cfg` on `gpus` x H100 80 GB, as config overrides."""
    from lmforge.hardware import find_accelerator
    from lmforge.parallel.plan_search import config_keys, describe, recommend

    best, _, _ = recommend(cfg, gpus, find_accelerator("H100"), gpu_memory_gib)
    if best is None:
        raise SystemExit(f"the planner finds no layout of {gpus} x {gpu_memory_gib:g} GB that fits")
    print(f"   planner recommends: {describe(best.layout)}")
    return config_keys(best.layout, best.cost["grad_accum_steps"]).split()


def main(argv: list[str]) -> None:
    from lmforge.mindformers import load_run_config
    from lmforge.train.dryrun import dry_run

    out_dir = None
    if "--json" in argv:
        i = argv.index("--json")
        out_dir, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    for name in argv or list(RECIPES):
        path, world = RECIPES[name]
        cfg = load_run_config(path)
        print(f"== {name}: {path} on {world} ranks; load average {os.getloadavg()[0]:.1f} (2 cores)")
        if name == "70b-planned":
            over = planned_overrides(cfg, world)
            print(f"   overrides: {' '.join(over)}")
            cfg = load_run_config(path, over)
        t0 = time.perf_counter()
        json_path = str(out_dir / f"dryrun_{name}.json") if out_dir else None
        records = dry_run(cfg, world, gpu_memory_gib=None, json_path=json_path)
        wall = time.perf_counter() - t0
        cpu = sum(r.get("cpu_seconds", 0.0) for r in records)
        print(f"== {name}: wall {wall:.1f} s; load average {os.getloadavg()[0]:.1f}; worker CPU {cpu:.0f} s "
              f"(~{cpu / 2:.0f} s of wall on 2 idle cores); per rank {[r['seconds'] for r in records]} s")
        if json_path:
            data = json.loads(Path(json_path).read_text())
            data["wall_s"] = round(wall, 1)
            Path(json_path).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
