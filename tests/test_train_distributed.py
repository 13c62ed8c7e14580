"""The trainer under 2 gloo processes (torchrun): DDP gives the single-process losses, including
padded batches whose ranks hold unequal numbers of target tokens (the token count is all-reduced),
and a 2-rank FSDP2 checkpoint resumes in one process on the same loss curve (resharding)."""

import json
import os
import sys

import pytest
import torch
from test_train_utils import make_dataset, run_reaped, tiny_config

from lmforge.train.trainer import run_training

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
from lmforge.config import load_config
from lmforge.train.trainer import run_training
run_training(load_config(sys.argv[1]))
"""


def _cfg(tmp, data, name, **kw):
    return tiny_config(
        tmp,
        data,
        run__name=name,
        train__max_steps=4,
        checkpoint__interval=2,
        model__dropout=0.0,
        data__mode="padded",
        data__seq_len=48,
        **kw,
    )


def _torchrun(tmp, cfg, nproc=2):
    path = tmp / f"{cfg.run.name}.yaml"
    cfg.save(path)
    script = tmp / "train_main.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        str(path),
    ]
    proc = run_reaped(cmd, env=env, timeout=300)  # the workers die with it, also on a timeout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(tmp, name):
    recs = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}


def test_ddp_matches_one_process_and_fsdp_checkpoint_resumes_in_one_process(tmp_path):
    data = make_dataset(tmp_path / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(_cfg(tmp_path, data, "single"))
        _torchrun(tmp_path, _cfg(tmp_path, data, "ddp", parallel__strategy="ddp"))
        single, ddp = _losses(tmp_path, "single"), _losses(tmp_path, "ddp")
        assert list(ddp) == [1, 2, 3, 4]
        assert max(abs(single[s] - ddp[s]) for s in single) < 1e-5
        _torchrun(tmp_path, _cfg(tmp_path, data, "fsdp", parallel__strategy="fsdp"))
        fsdp_ckpt = tmp_path / "runs" / "fsdp" / "checkpoints" / "step_2"
        assert (fsdp_ckpt / "rank_1.pt").is_file()
        resumed = run_training(_cfg(tmp_path, data, "one", train__resume=str(fsdp_ckpt)))
    finally:
        torch.set_num_threads(before)
    assert resumed["resumed_from"] == str(fsdp_ckpt)
    fsdp, one = _losses(tmp_path, "fsdp"), _losses(tmp_path, "one")
    assert list(one) == [3, 4]
    assert max(abs(fsdp[s] - one[s]) for s in one) < 1e-5
