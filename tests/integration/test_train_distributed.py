"""The trainer under 2 gloo processes (torchrun): DDP gives the single-process losses, including
padded batches whose ranks hold unequal numbers of target tokens (the token count is all-reduced),
and a 2-rank FSDP2 checkpoint resumes in one process on the same loss curve (resharding)."""

import json
import os
import sys

import pytest
import torch
from jobs import make_dataset, run_reaped, tiny_config

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


def _losses(tmp, name, key="loss"):
    recs = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if r.get(key) is not None}


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
        assert (fsdp_ckpt / "rank_1.safetensors").is_file()
        resumed = run_training(_cfg(tmp_path, data, "one", train__resume=str(fsdp_ckpt)))
    finally:
        torch.set_num_threads(before)
    assert resumed["resumed_from"] == str(fsdp_ckpt)
    fsdp, one = _losses(tmp_path, "fsdp"), _losses(tmp_path, "one")
    assert list(one) == [3, 4]
    assert max(abs(fsdp[s] - one[s]) for s in one) < 1e-5


def test_pipeline_trainer_logs_like_one_process_and_its_checkpoint_loads_anywhere(tmp_path):
    # The trainer under PP 2 (1f1b, gradient accumulation 2 = 2 microbatches, padded batches of
    # varying length and unequal target counts) trains; its DCP checkpoint resumes in one process
    # on the same loss curve, and the weights reader (export/eval/generate) sees the plain model.
    # Finetuned from that checkpoint (equal start: the stages' own init is not value-equal to the
    # unsplit model's), PP 2 logs the one-process loss AND gradient norm (clip over all stages), and
    # validates at train.eval_interval with the one-process validation loss.
    from lmforge.interop.loading import load_weights
    from lmforge.model import Transformer

    data = make_dataset(tmp_path / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _torchrun(tmp_path, _cfg(tmp_path, data, "pp2", parallel__pp=2))
        pp_ckpt = tmp_path / "runs" / "pp2" / "checkpoints" / "step_2"
        resumed = run_training(_cfg(tmp_path, data, "one_from_pp", train__resume=str(pp_ckpt)))
        state, cfg, _ = load_weights(pp_ckpt)
        finetune = {"run_mode": "finetune", "train__load_checkpoint": str(pp_ckpt)}
        run_training(_cfg(tmp_path, data, "ft_one", **finetune))
        _torchrun(tmp_path, _cfg(tmp_path, data, "ft_pp2", parallel__pp=2, **finetune))
    finally:
        torch.set_num_threads(before)
    pp = _losses(tmp_path, "pp2")
    assert list(pp) == [1, 2, 3, 4]
    assert pp[4] < pp[1] - 0.1  # it learns
    assert resumed["resumed_from"] == str(pp_ckpt)
    one = _losses(tmp_path, "one_from_pp")
    assert max(abs(pp[s] - one[s]) / pp[s] for s in one) < 1e-5
    assert set(state) == set(Transformer(cfg.model).state_dict())
    for key, steps in (("loss", [1, 2, 3, 4]), ("grad_norm", [1, 2, 3, 4]), ("val_loss", [3, 4])):
        ref, got = _losses(tmp_path, "ft_one", key), _losses(tmp_path, "ft_pp2", key)
        assert list(got) == steps, (key, got)
        assert max(abs(ref[s] - got[s]) / ref[s] for s in ref) < 1e-5, (key, ref, got)
