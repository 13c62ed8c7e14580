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
from jobs import make_dataset, reaped_popen, tiny_config

from lmforge.train import step as step_mod
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


# Test-only hook, kept out of the package: sleep after DCP wrote step N's tensors into its
# temporary folder, so the test can SIGKILL the trainer in the middle of a checkpoint write.
PAUSE_AT_STEP = """
import time, torch.distributed.checkpoint as dcp
_save = dcp.save
def _slow_save(*args, **kwargs):
    out = _save(*args, **kwargs)
    if "step_{step}.tmp-" in str(kwargs.get("checkpoint_id")):
        time.sleep({seconds})
    return out
dcp.save = _slow_save
"""


def _subprocess(cfg, tmp, env_extra, pause: tuple[int, float] | None = None):
    path = tmp / "cfg.yaml"
    cfg.save(path)
    hook = PAUSE_AT_STEP.format(step=pause[0], seconds=pause[1]) if pause else ""
    code = hook + (
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
    monkeypatch.setattr(trainer._Trainer, "_should_stop", lambda self: self.state.step == 3 or real(self))
    stopped = trainer.run_training(_cfg(tmp_path, data, "b"))
    assert stopped["preempted"] and stopped["steps"] == 3 and stopped["checkpoint"].endswith("step_3")
    # The learning rate is a function of the step: no scheduler state is saved. A checkpoint from
    # before that also holds LambdaLR's state (below, as it wrote it); it resumes the same way.
    state_file = os.path.join(stopped["checkpoint"], "state.json")
    with open(state_file) as fh:
        state = json.load(fh)
    assert "scheduler" not in state and state["step"] == 3
    lr = [r[4] for r in ref if r[0] == 4 and r[1] is not None][0]
    state["scheduler"] = {"last_epoch": 3, "_step_count": 4, "base_lrs": [3e-3, 3e-3], "_last_lr": [lr, lr],
                          "lr_lambdas": [{"kind": "cosine"}, {"kind": "cosine"}], "verbose": False}
    with open(state_file, "w") as fh:
        json.dump(state, fh)
    monkeypatch.undo()
    resumed = trainer.run_training(_cfg(tmp_path, data, "b"))
    assert resumed["resumed_from"].endswith("step_3") and resumed["steps"] == STEPS
    assert _curve(tmp_path, "b") == ref


def test_sigkill_while_writing_a_checkpoint_then_resume_is_bitwise_identical(tmp_path, reference, one_thread):
    data, ref = reference
    cfg = _cfg(tmp_path, data, "k", data__prefetch=2)  # read-ahead must not leak into the resume point
    ckpts = tmp_path / "runs" / "k" / "checkpoints"
    with _subprocess(cfg, tmp_path, {}, pause=(4, 120)) as proc:
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


# ---------------------------------------------------------------------------------------------
# Resume honours the run config's hyperparameters (checkpoint: moments and schedule position)


def _stop_at_3_then_resume(tmp_path, data, monkeypatch, capsys, name, **changed):
    real = trainer._Trainer._should_stop
    monkeypatch.setattr(trainer._Trainer, "_should_stop", lambda self: self.state.step == 3 or real(self))
    trainer.run_training(_cfg(tmp_path, data, name))
    monkeypatch.undo()
    capsys.readouterr()
    groups = []
    real_step = step_mod.TrainStep.step

    def spy(self, batches):
        groups.append([dict(g) for g in self.optimizer.param_groups])
        return real_step(self, batches)

    monkeypatch.setattr(step_mod.TrainStep, "step", spy)
    resumed = trainer.run_training(_cfg(tmp_path, data, name, **changed))
    captured = capsys.readouterr()
    assert resumed["resumed_from"].endswith("step_3") and resumed["steps"] == STEPS
    return groups, captured.out + captured.err


def _lrs(curve):
    return {step: lr for step, loss, _, _, lr in curve if loss is not None}


def test_resume_with_doubled_lr_follows_the_doubled_schedule(
    tmp_path, reference, monkeypatch, capsys, one_thread
):
    data, ref = reference
    _, out = _stop_at_3_then_resume(tmp_path, data, monkeypatch, capsys, "lr2", optim__lr=6e-3)
    ref_lr, got_lr = _lrs(ref), _lrs(_curve(tmp_path, "lr2"))
    assert [got_lr[s] for s in (1, 2, 3)] == [ref_lr[s] for s in (1, 2, 3)]
    for s in (4, 5, 6):  # same schedule position and shape, twice the base rate
        assert got_lr[s] == pytest.approx(2 * ref_lr[s], rel=1e-12) and got_lr[s] > 0
    notes = [line for line in out.splitlines() if line.startswith("note: resumed with this run's config")]
    assert len(notes) == 1 and "optim.lr 0.003 -> 0.006" in notes[0]


def test_resume_with_changed_weight_decay_and_betas_uses_them(
    tmp_path, reference, monkeypatch, capsys, one_thread
):
    data, _ = reference
    groups, out = _stop_at_3_then_resume(
        tmp_path, data, monkeypatch, capsys, "wd", optim__weight_decay=0.5, optim__betas=[0.8, 0.9]
    )
    assert len(groups) == STEPS - 3
    decayed, plain = groups[0]  # decayed matrices, then norms/biases
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert tuple(decayed["betas"]) == (0.8, 0.9) and tuple(plain["betas"]) == (0.8, 0.9)
    note = next(line for line in out.splitlines() if line.startswith("note: resumed with"))
    assert "optim.weight_decay 0.1 -> 0.5" in note and "optim.betas [0.9, 0.95] -> [0.8, 0.9]" in note
    assert "optim.lr" not in note


def test_resume_without_changes_prints_no_change_note(tmp_path, reference, monkeypatch, capsys, one_thread):
    data, ref = reference
    groups, out = _stop_at_3_then_resume(tmp_path, data, monkeypatch, capsys, "same")
    assert "note: resumed with" not in out and "resuming at step" in out
    assert _curve(tmp_path, "same") == ref  # still bitwise the uninterrupted run
