"""Run controls (lmforge/train/controls.py): the step profiler, the data-wait share in the log,
scheduled garbage collection and the glibc memory cache."""

from __future__ import annotations

import gc
import json
import platform
import subprocess
import sys

import pytest
from jobs import make_dataset, tiny_config

from lmforge.errors import ConfigError
from lmforge.train.step import TrainStep
from lmforge.train.trainer import run_training


def _run(tmp_path, **overrides):
    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, train__eval_interval=0, checkpoint__interval=0, **overrides)
    return cfg, run_training(cfg)


def test_profile_steps_write_a_chrome_trace_that_names_ops_and_a_memory_table(tmp_path):
    _, summary = _run(tmp_path, train__max_steps=4, log__profile_steps=[2, 3])
    out = tmp_path / "runs" / "t" / "profile"
    trace = json.loads((out / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names and "aten::scaled_dot_product_attention" in names
    assert any(e.get("name") == "[memory]" for e in trace["traceEvents"])  # profile_memory events
    assert "CPU Mem" in (out / "memory_rank0.txt").read_text()
    assert summary["steps"] == 4
    assert not list(out.glob("*.tmp-*"))


def test_profile_cut_short_by_the_end_of_the_run_is_still_written(tmp_path):
    _run(tmp_path, train__max_steps=3, log__profile_steps=[3, 10])
    assert json.loads((tmp_path / "runs" / "t" / "profile" / "trace_rank0.json").read_text())["traceEvents"]


def test_profile_steps_must_be_an_ordered_pair(tmp_path):
    data = make_dataset(tmp_path / "data")
    for bad in ([3, 2], [0, 1], [1, 2, 3]):
        with pytest.raises(ConfigError, match="log.profile_steps"):
            tiny_config(tmp_path, data, log__profile_steps=bad)


def test_log_line_and_record_carry_the_data_wait_share(tmp_path, capsys):
    _run(tmp_path, train__max_steps=2)
    out = capsys.readouterr().out
    assert " | data " in [line for line in out.splitlines() if line.startswith("step 2/2")][0]
    recs = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["data_wait"] for r in recs if "loss" in r]
    assert len(shares) == 2 and all(0.0 < s < 1.0 for s in shares)


def test_gc_interval_turns_automatic_gc_off_and_collects_on_schedule(tmp_path, monkeypatch):
    events = []  # ("step", n, gc enabled) and ("gc", generation) in order
    original = TrainStep.step

    def step(self, batches):
        events.append(("step", gc.isenabled()))
        return original(self, batches)

    def on_gc(phase, info):
        if phase == "start":
            events.append(("gc", info["generation"]))

    monkeypatch.setattr(TrainStep, "step", step)
    gc.callbacks.append(on_gc)
    try:
        assert gc.isenabled()
        _run(tmp_path, train__max_steps=6, train__gc_interval=3)
        assert gc.isenabled()  # restored after the run
    finally:
        gc.callbacks.remove(on_gc)
    steps = [e for e in events if e[0] == "step"]
    assert len(steps) == 6 and not any(enabled for _, enabled in steps)
    # collections between the first and the last step: full ones right before steps 3 and 6 only
    first = events.index(steps[0])
    last = len(events) - 1 - events[::-1].index(steps[-1])
    between = events[first:last]
    before = [sum(1 for e in between[:i] if e[0] == "step") + 1 for i, e in enumerate(between) if e[0] == "gc"]
    assert before == [3, 6]
    assert all(e[1] == 2 for e in between if e[0] == "gc")


def test_gc_interval_zero_leaves_automatic_gc_on(tmp_path, monkeypatch):
    seen = []
    original = TrainStep.step
    monkeypatch.setattr(TrainStep, "step", lambda self, b: (seen.append(gc.isenabled()), original(self, b))[1])
    _run(tmp_path, train__max_steps=2, train__gc_interval=0)
    assert seen == [True, True]


_FAULTS = """
import resource, sys, torch
from lmforge.train.controls import cache_freed_memory
if sys.argv[1] == "1":
    assert cache_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 18).fill_(1.0)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(12):  # glibc's bins settle after a few rounds (alignment splits; see controls.py)
    faults()
print(min(faults() for _ in range(3)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_cache_reuses_freed_memory_instead_of_faulting_it_in_again():
    # A fresh process each: the setting is process-wide. 64 MiB is 16,384 pages of 4 KiB.
    def faults(tuned: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, tuned], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert faults("0") > 8000  # glibc's default: mmap'd, unmapped on free, faulted in again
    assert faults("1") < 1000  # kept in the heap and reused
