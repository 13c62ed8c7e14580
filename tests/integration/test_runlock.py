"""Two trainings of one run folder (issue 22 item 5): the second start is one line naming the
first's pid and host; a lock left by a killed run is taken over; a lock written on another host is
refused with the file to delete. Through `lmforge train` in real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs import make_dataset, reaped_popen, run_reaped, tiny_config

from lmforge.errors import LmforgeError
from lmforge.train.runlock import LOCK_NAME, RunLock


def _lmforge(*args, timeout=180):
    return run_reaped([sys.executable, "-m", "lmforge", *map(str, args)], timeout=timeout)


def _one_line_error(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lockdata") / "ds")


def _config(tmp_path, data, steps) -> Path:
    cfg = tiny_config(tmp_path, data, train__max_steps=steps, train__eval_interval=0, checkpoint__interval=0)
    path = tmp_path / f"run{steps}.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


def test_second_start_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, data):
    lock = tmp_path / "runs" / "t" / LOCK_NAME
    with reaped_popen([sys.executable, "-m", "lmforge", "train", "--config", str(_config(tmp_path, data, 10**6))],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as first:  # fmt: skip
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
            assert first.poll() is None, "the first training ended early"
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        line = _one_line_error(_lmforge("train", "--config", _config(tmp_path, data, 2)))
        assert f"pid {first.pid} on host {socket.gethostname()}" in line and "run.name" in line
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert lock.is_file()  # a SIGKILLed run leaves its file behind ...
    done = _lmforge("train", "--config", _config(tmp_path, data, 2))
    assert done.returncode == 0, done.stdout + done.stderr  # ... and the next start takes it over
    assert f"took over the lock of pid {first.pid}, which is no longer running" in done.stdout
    assert not lock.exists()  # released at the end


def test_lock_written_on_another_host_is_refused_with_the_file_to_delete(tmp_path, data):
    lock = tmp_path / "runs" / "t" / LOCK_NAME
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 4242, "host": "node-17", "since": "yesterday"}))
    line = _one_line_error(_lmforge("train", "--config", _config(tmp_path, data, 2)))
    assert "pid 4242 on host node-17" in line and f"delete {lock}" in line
    assert lock.is_file() and not (tmp_path / "runs" / "t" / "checkpoints").exists()


def test_only_rank_zero_touches_the_lock(tmp_path):
    ctx = type("Ctx", (), {"is_main": False, "distributed": False})()
    RunLock(tmp_path, ctx).take()
    assert not (tmp_path / LOCK_NAME).exists()
    main = type("Ctx", (), {"is_main": True, "distributed": False})()
    held = RunLock(tmp_path, main)
    held.take()
    with pytest.raises(LmforgeError, match=f"pid {os.getpid()} on host"):
        RunLock(tmp_path, main).take()
    held.release()
    held.release()  # a second release is harmless
    assert not (tmp_path / LOCK_NAME).exists()
