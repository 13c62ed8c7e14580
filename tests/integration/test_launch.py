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
from jobs import reaped_popen, run_reaped
from paths import FIXTURES, HELPERS, REPO
from toyjob import reference_losses

LAUNCH = REPO / "scripts" / "launch.sh"
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
        f"python {HELPERS / 'toyjob.py'} --out {tmp}/out.json --ckpt {tmp}/ckpt --steps {STEPS} "
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
        (
            ["8", "3", "127.0.0.1", "8118", "0", "logs", "True", "60"],
            "worker_num 8 is not a multiple of local_worker 3",
        ),
        (
            ["4", "2", "127.0.0.1", "8118", "2", "logs", "True", "60"],
            "node_rank 2 must be below the number of nodes 2 (worker_num/local_worker)",
        ),
        (["2", "x", "logs", "True", "60"], "master_port 'x' is not a non-negative integer"),
        (["two"], "worker_num 'two' is not a non-negative integer"),
        (["2", "8118", "logs", "maybe", "60"], "join 'maybe' must be True or False"),
        *[
            (["2"] * (argc - 1), f"got {argc} arguments; msrun_launcher.sh forms:")
            for argc in (3, 4, 5, 7, 8, 10)
        ],
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    proc = run_reaped(["bash", str(LAUNCH), "true", *args], timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.strip().startswith(f"error: launch.sh: {message}")


# How mindspore-lab/mindformers scripts/msrun_launcher.sh reads each accepted argument count, as
# written in its source: `$# == 1` keeps the defaults (8 workers, port 8118, output/msrun_log,
# join False, timeout 7200); `$# == 2` sets LOCAL_WORKER=$WORKER_NUM; `$# == 6` sets
# LOCAL_WORKER=$WORKER_NUM MASTER_PORT=$3 LOG_DIR=$4 JOIN=$5 CLUSTER_TIME_OUT=$6; `$# == 9` sets
# LOCAL_WORKER=$3 MASTER_ADDR=$4 MASTER_PORT=$5 NODE_RANK=$6 LOG_DIR=$7 JOIN=$8 CLUSTER_TIME_OUT=$9
# and is single-node (no --master_addr/--node_rank) when WORKER_NUM equals LOCAL_WORKER;
# MF_LOG_SUFFIX=s appends _s to LOG_DIR. The msrun command lines below are the ones it builds.
MSRUN_FORMS = [
    ([], {}, "msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --log_dir=output/msrun_log --join=False --cluster_time_out=7200",
     "--nnodes=1 --node-rank=0 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:8118"),
    (["4"], {}, "msrun --worker_num=4 --local_worker_num=4 --master_port=8118 --log_dir=output/msrun_log --join=False --cluster_time_out=7200",
     "--nnodes=1 --node-rank=0 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:8118"),
    (["4", "9000", "mylogs", "True", "300"], {}, "msrun --worker_num=4 --local_worker_num=4 --master_port=9000 --log_dir=mylogs --join=True --cluster_time_out=300",
     "--nnodes=1 --node-rank=0 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:9000"),
    (["64", "8", "10.0.0.1", "8118", "3", "output/msrun_log", "False", "300"], {},
     "msrun --worker_num=64 --local_worker_num=8 --master_addr=10.0.0.1 --master_port=8118 --node_rank=3 --log_dir=output/msrun_log --join=False --cluster_time_out=300",
     "--nnodes=8 --node-rank=3 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:8118"),
    (["8", "8", "10.0.0.1", "8118", "0", "logs", "True", "300"], {"MF_LOG_SUFFIX": "r1"},
     "msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --log_dir=logs_r1 --join=True --cluster_time_out=300",
     "--nnodes=1 --node-rank=0 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:8118"),
]  # fmt: skip


@pytest.mark.parametrize("args, env, msrun, torchrun", MSRUN_FORMS)
def test_every_msrun_form_is_read_as_msrun_reads_it(tmp_path, args, env, msrun, torchrun):
    proc = run_reaped(
        ["bash", str(LAUNCH), "run_llama3.py --config x.yaml", *args],
        timeout=60,
        cwd=tmp_path,
        env=_env(**{"LAUNCH_DRY_RUN": "1", "MF_LOG_SUFFIX": "", **env}),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"launch.sh: msrun_launcher.sh would run: {msrun}"
    assert torchrun in lines[1] and lines[1].endswith("-m lmforge train --config x.yaml")
    assert f"--log-dir={msrun.split('--log_dir=')[1].split()[0]}" in lines[1]
    assert not list(tmp_path.iterdir())  # a dry run creates no log folder


def test_launcher_uses_the_interpreter_that_has_lmforge(tmp_path):
    # A `python3`/`python` first on PATH without lmforge must not be used.
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python", "python3"):
        (fake / name).write_text("#!/bin/sh\necho fake python >&2\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {k: v for k, v in _env(LAUNCH_DRY_RUN="1").items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = f"{fake}:{env['PATH']}"
    proc = run_reaped(["bash", str(LAUNCH), "lmforge train --config x.yaml", "2"], timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    chosen = proc.stderr.splitlines()[1].split()[1]
    assert chosen != "python3" and str(fake) not in chosen
    check = subprocess.run([chosen, "-c", "import lmforge"], capture_output=True, timeout=60)
    assert check.returncode == 0
    # An explicit PYTHON without lmforge is refused in one line, not used.
    env["PYTHON"] = str(fake / "python3")
    proc = run_reaped(["bash", str(LAUNCH), "lmforge train", "2"], timeout=60, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: launch.sh: no Python with lmforge")


def test_mindformers_command_runs_lmforge_train(tmp_path):
    # `run_mindformer.py ...` (no such file here) becomes `lmforge train ...` with the same flags.
    from jobs import make_dataset, tiny_config

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


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "step" in r]


def test_mindformers_yaml_runs_tp2_pp2_on_four_processes_like_one(tmp_path):
    """MindFormers' own layout (model_parallel 2 x pipeline_stage 2) from its YAML, launched with
    msrun's 6-argument form, trains like the converted lmforge YAML in one process."""
    from jobs import make_dataset

    mf = FIXTURES / "mindformers" / "tiny_pp2_tp2.yaml"
    data = make_dataset(tmp_path / "data")
    common = ["train.device=cpu", "train.sample_max_new_tokens=0", "train.eval_interval=0", "train.eval_batches=1",
              "log.interval=1", "log.tensorboard=false", "log.plots=false", "log.progress=false"]  # fmt: skip
    one = ["parallel.strategy=single", "parallel.tp=1", "parallel.pp=1"]
    lmforge = [sys.executable, "-m", "lmforge"]
    # Shared start: one step in one process, saved as a DCP checkpoint that both runs resume
    # (the TP shards' CPU initialisation differs from one process's, so neither starts from scratch).
    init = run_reaped(
        [*lmforge, "train", "--config", str(mf), "--train_dataset_dir", str(data), *one, *common,
         f"run.out_dir={tmp_path}/init", "train.max_steps=1", "checkpoint.interval=1"],
        timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr[-3000:]
    start = next(p for p in (tmp_path / "init").rglob("step_1") if p.is_dir())
    converted = tmp_path / "tiny.yaml"
    conv = run_reaped([*lmforge, "config", "convert", str(mf), "--out", str(converted)], timeout=120)
    assert conv.returncode == 0, conv.stderr
    finetune = ["train.max_steps=4", f"train.resume={start}"]
    ref = run_reaped(
        [*lmforge, "train", "--config", str(converted), f"data.train=[{data}]", *one, *common, *finetune,
         f"run.out_dir={tmp_path}/ref"],
        timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    command = (
        f"run_mindformer.py --config {mf} --train_dataset_dir {data} --use_parallel True --run_mode train "
        f"--resume_training {start} run.out_dir={tmp_path}/mf train.max_steps=4 " + " ".join(common)
    )
    with contextlib.ExitStack() as stack:
        out = _finish(_launch(stack, command, 4, _port(), tmp_path / "logs", "True", 300))
    assert "--nproc-per-node=4" in out and "MindFormers run config, mapped to lmforge" in out
    want, got = _losses(tmp_path / "ref" / "tiny_llama"), _losses(tmp_path / "mf" / "tiny_llama")
    assert len(want) == len(got) == 3, (want, got)  # steps 2..4
    worst = max(abs(g - w) / w for g, w in zip(got, want))
    print(f"TP 2 x PP 2 from the MindFormers YAML vs one process: max relative loss difference {worst:.1e}")
    assert worst < 1e-5, (got, want)
