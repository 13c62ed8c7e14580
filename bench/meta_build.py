"""Time to build a preset on the meta device and count its parameters, with the process's RSS
before and after (nothing should be allocated). Usage: python bench/meta_build.py [PRESET ...]"""

from __future__ import annotations

import sys
import time

import psutil
import torch

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.model.flops import count_params
from lmforge.model.presets import get_preset


def main(names: list[str]) -> None:
    proc = psutil.Process()
    print("| preset | params | build s | count_params s | RSS before | RSS after |")
    print("|---|---|---|---|---|---|")
    for name in names:
        cfg = ModelConfig(**get_preset(name))
        rss0 = proc.memory_info().rss
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = Transformer(cfg)
        t1 = time.perf_counter()
        total = count_params(cfg)["total"]
        t2 = time.perf_counter()
        rss1 = proc.memory_info().rss
        assert total == model.num_params()
        print(
            f"| {name} | {total:,} | {t1 - t0:.2f} | {t2 - t1:.4f} | "
            f"{rss0 / 2**20:.0f} MiB | {rss1 / 2**20:.0f} MiB |"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["llama2-7b", "llama3-8b", "llama3-70b"])
