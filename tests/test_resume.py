"""Exact resume: a run stopped at step k (by a stop signal, or SIGKILL in the middle of writing a
checkpoint) and resumed logs bitwise the same losses at every step as an uninterrupted run.

All runs use one CPU thread (in-process via torch.set_num_threads, subprocesses via
OMP_NUM_THREADS) so their kernels reduce in the same order; dropout is on, so RNG restore matters.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_utils import make_dataset, reaped_popen, tiny_config

from lmforge.train import trainer

STEPS = 6


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tmp, data, name, **kw):
    return tiny_config(tmp, data, run__name=name, train__max_steps=STEPS, checkpoint__interval=2, **kw)


def _curve(tmp, name):
    lines = (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("grad_norm"), r.get("lr")) for r in recs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    data = make_dataset(tmp / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.run_training(_cfg(tmp, data, "ref"))
    finally:
        torch.set_num_threads(before)
    curve = _curve(tmp, "ref")
    assert [c[0] for c in curve if c[1] is not None] == list(range(1, STEPS + 1))
    return data, curve


def _subprocess(cfg, tmp, env_extra):
    path = tmp / "cfg.yaml"
    cfg.save(path)
    code = (
        "import json, sys; from lmforge.config import load_config; "
        "from lmforge.train.trainer import run_training; "
        "print('SUMMARY ' + json.dumps(run_training(load_config(sys.argv[1]))), flush=True)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    # A context manager: the trainer is killed when the test leaves it, also on failure.
    return reaped_popen(
        [sys.executable, "-c", code, str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the training subprocess")  # the caller kills it


def test_stop_at_step_and_resume_is_bitwise_identical(tmp_path, reference, monkeypatch, one_thread):
    data, ref = reference
    real = trainer._Trainer._should_stop
    monkeypatch.setattr(trainer._Trainer, "_should_stop", lambda self: self.step == 3 or real(self))
    stopped = trainer.run_training(_cfg(tmp_path, data, "b"))
    assert stopped["preempted"] and stopped["steps"] == 3 and stopped["checkpoint"].endswith("step_3")
    monkeypatch.undo()
    resumed = trainer.run_training(_cfg(tmp_path, data, "b"))
    assert resumed["resumed_from"].endswith("step_3") and resumed["steps"] == STEPS
    assert _curve(tmp_path, "b") == ref


def test_sigkill_while_writing_a_checkpoint_then_resume_is_bitwise_identical(tmp_path, reference, one_thread):
    data, ref = reference
    cfg = _cfg(tmp_path, data, "k", data__prefetch=2)  # read-ahead must not leak into the resume point
    ckpts = tmp_path / "runs" / "k" / "checkpoints"
    with _subprocess(cfg, tmp_path, {"LMFORGE_TEST_CKPT_PAUSE": "4:120"}) as proc:
        _wait_for(
            lambda: ckpts.is_dir() and any(p.name.startswith("step_4.tmp-") for p in ckpts.iterdir()), proc
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpts / "latest").read_text().strip() == "step_2" and not (ckpts / "step_4").exists()
    resumed = trainer.run_training(cfg)
    assert resumed["resumed_from"].endswith("step_2")
    assert not any(".tmp-" in p.name for p in ckpts.iterdir())
    assert _curve(tmp_path, "k") == ref


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, reference):
    data, _ = reference
    cfg = tiny_config(
        tmp_path, data, run__name="s", train__max_steps=500, checkpoint__interval=0, train__eval_interval=0
    )
    metrics = tmp_path / "runs" / "s" / "metrics.jsonl"
    with _subprocess(cfg, tmp_path, {}) as proc:
        _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.loads(out.split("SUMMARY ", 1)[1])
    assert summary["preempted"] and 2 <= summary["steps"] < 500
    ckpts = tmp_path / "runs" / "s" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{summary['steps']}"
    assert (ckpts / f"step_{summary['steps']}" / "state.json").is_file()
