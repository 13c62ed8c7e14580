"""scripts/launch.sh with MindFormers' msrun_launcher.sh arguments, run on loopback with gloo:
one node of 2 workers, two "nodes" of 2 workers each (two launches, c10d rendezvous), and a worker
killed mid-run that torchrun restarts and that resumes from its checkpoint. Each run's losses must
equal the same job run uninterrupted in one process (relative 1e-5)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_utils import reaped_popen, run_reaped
from toyjob import reference_losses

LAUNCH = Path(__file__).resolve().parents[1] / "scripts" / "launch.sh"
STEPS = 5


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def reference():
    return reference_losses(STEPS)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def _job(tmp: Path, *flags: str) -> str:
    return (
        f"python {Path(__file__).parent / 'toyjob.py'} --out {tmp}/out.json --ckpt {tmp}/ckpt --steps {STEPS} "
        + " ".join(flags)
    )


def _launch(stack: contextlib.ExitStack, command: str, *args, env=None) -> subprocess.Popen:
    """Start launch.sh; its whole process tree (torchrun and workers) dies when `stack` closes."""
    argv = ["bash", str(LAUNCH), command, *map(str, args)]
    return stack.enter_context(
        reaped_popen(argv, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _check(tmp: Path, reference, world: int, restarts: int = 0) -> None:
    result = json.loads((tmp / "out.json").read_text())
    assert result["world_size"] == world and result["restarts"] == restarts
    assert len(result["losses"]) == STEPS
    for got, want in zip(result["losses"], reference):
        assert abs(got - want) / want < 1e-5, (result["losses"], reference)


def test_nine_msrun_arguments_one_node(tmp_path, reference):
    logs = tmp_path / "msrun_log"
    with contextlib.ExitStack() as stack:
        out = _finish(_launch(stack, _job(tmp_path), 2, 2, "127.0.0.1", _port(), 0, logs, "True", 120))
    assert "--nnodes=1 --node-rank=0 --nproc-per-node=2" in out
    _check(tmp_path, reference, world=2)
    per_rank = sorted(p.relative_to(logs).parts[-2] for p in logs.glob("*/attempt_0/*/stdout.log"))
    assert per_rank == ["0", "1"]  # one log folder per local rank


def test_two_nodes_on_loopback(tmp_path, reference):
    port = _port()
    job = _job(tmp_path, "--strategy fsdp")
    with contextlib.ExitStack() as stack:  # a failing node must not leave the other one running
        nodes = [
            _launch(stack, job, 4, 2, "127.0.0.1", port, rank, tmp_path / f"log{rank}", "True", 120)
            for rank in (0, 1)
        ]
        for proc in nodes:
            _finish(proc)
    _check(tmp_path, reference, world=4)
    assert (tmp_path / "ckpt" / f"step_{STEPS}").is_dir()


def test_killed_worker_is_restarted_and_resumes(tmp_path, reference):
    job = _job(tmp_path, "--kill-at 3")
    with contextlib.ExitStack() as stack:
        out = _finish(
            _launch(
                stack,
                job,
                2,
                2,
                "127.0.0.1",
                _port(),
                0,
                tmp_path / "logs",
                "True",
                120,
                env=_env(MAX_RESTARTS="1"),
            )
        )
    assert "--max-restarts=1" in out
    _check(tmp_path, reference, world=2, restarts=1)
    assert list((tmp_path / "logs").glob("*/attempt_1"))  # torchrun really ran a second attempt


@pytest.mark.parametrize(
    "args, message",
    [
        (["8", "3"], "worker_num 8 is not a multiple of local_worker 3"),
        (
            ["4", "2", "127.0.0.1", "8118", "2"],
            "node_rank 2 must be below the number of nodes 2 (worker_num/local_worker)",
        ),
        (["2", "2", "127.0.0.1", "x"], "master_port 'x' is not a non-negative integer"),
        (["2", "2", "127.0.0.1", "8118", "0", "logs", "maybe"], "join 'maybe' must be True or False"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    proc = run_reaped(["bash", str(LAUNCH), "true", *args], timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: launch.sh: {message}"


def test_mindformers_command_runs_lmforge_train(tmp_path):
    # `run_mindformer.py ...` (no such file here) becomes `lmforge train ...` with the same flags.
    from test_train_utils import make_dataset, tiny_config

    cfg = tiny_config(tmp_path, make_dataset(tmp_path / "data"), train__max_steps=2, parallel__strategy="ddp")
    cfg.save(tmp_path / "cfg.yaml")
    command = f"run_mindformer.py --config {tmp_path}/cfg.yaml --use_parallel True --run_mode train"
    with contextlib.ExitStack() as stack:
        out = _finish(_launch(stack, command, 2, 2, "127.0.0.1", _port(), 0, tmp_path / "logs", "True", 120))
    assert "-m lmforge train --config" in out
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    ]
    assert 2 in steps


def test_a_test_leaves_no_process_behind(tmp_path):
    # Like torchrun's workers: a grandchild in a session of its own, outliving its parent.
    pidfile = tmp_path / "pid"
    code = (
        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        f" start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); open({str(pidfile)!r}, 'w').write(str(p.pid))"
    )
    proc = run_reaped([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 0, proc.stderr
    orphan = int(pidfile.read_text())
    for _ in range(100):  # SIGKILLed; wait for init to reap it
        try:
            if "Z" in Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[-1][:3]:
                break  # dead, not yet reaped
        except OSError:
            break  # gone
        time.sleep(0.05)
    else:
        raise AssertionError(f"process {orphan} outlived the test")
