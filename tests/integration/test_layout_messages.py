"""A recipe laid out for more GPUs than a run has is refused in one line that names the GPUs it
needs, by `lmforge train` launched with fewer processes and by `lmforge plan --gpus`, and the note
about validation under pipeline parallel is true (it runs)."""

from __future__ import annotations

import os
import sys

import yaml
from jobs import make_dataset, run_reaped, tiny_config

# pp 2 x dp_replicate 4 x dp_shard 2 x tp 4: 64 GPUs, every axis explicit.
LAYOUT_64 = {"strategy": "fsdp+tp", "pp": 2, "dp_replicate": 4, "dp_shard": 2, "tp": 4}


def test_train_in_one_process_names_the_gpus_a_layout_needs(tmp_path):
    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, train__global_batch_size=8, train__grad_accum_steps=1)
    tree = cfg.model_dump(mode="json")
    tree["parallel"].update(LAYOUT_64)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = run_reaped([sys.executable, "-m", "lmforge", "train", "--config", str(path)], timeout=240, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs 64 GPUs" in lines[0] and "WORLD_SIZE is 1" in lines[0], lines[0]
    assert "does not match" not in lines[0]


def test_plan_names_the_gpus_the_configs_own_layout_needs(tmp_path, capsys):
    from lmforge.cli import main

    path = tmp_path / "llama.yaml"
    tree = {"model": {"preset": "llama3-8b"}, "data": {"seq_len": 8192}, "train": {"global_batch_size": 64},
            "parallel": LAYOUT_64}
    path.write_text(yaml.safe_dump(tree))
    assert main(["plan", "--config", str(path), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "own layout does not run" in x)
    assert "needs 64 GPUs" in line and "--gpus is 8" in line, line
