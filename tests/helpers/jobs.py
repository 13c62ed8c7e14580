"""Test helpers shared by unit and integration tests: a tiny learnable token dataset, a tiny run config, JSONL corpora, and
subprocesses that are always reaped.

(No tests here; pytest collects nothing from this module.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from lmforge.config import config_from_dict
from lmforge.data.shards import ShardWriter, write_meta

BOS, EOS, PAD = 1, 2, 0


def write_jsonl(path: Path, texts) -> Path:
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return path


def make_dataset(
    folder, vocab_size=512, docs=120, seed=0, min_len=20, max_len=60, fingerprint="test", val=True
):
    """Documents are arithmetic progressions mod (vocab-3), shifted past the special ids: easy to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", docs), ("val", max(8, docs // 8)))[: 2 if val else 1]:
        with ShardWriter(folder, split, "uint16") as w:
            for _ in range(n):
                start, step = int(rng.integers(0, 50)), int(rng.integers(1, 4))
                length = int(rng.integers(min_len, max_len))
                body = (start + step * np.arange(length)) % (vocab_size - 3) + 3
                w.add_document(np.concatenate([[BOS], body, [EOS]]).astype(np.int64))
            splits[split] = w.close()
    write_meta(
        folder,
        {
            "dtype": "uint16",
            "vocab_size": vocab_size,
            "tokenizer_fingerprint": fingerprint,
            "bos_id": BOS,
            "eos_id": EOS,
            "pad_id": PAD,
            "splits": splits,
        },
    )
    return folder


def tiny_config(tmp_path, data, **overrides):
    """A CPU run of the `tiny` preset; dotted overrides as keyword args with '__' for '.'."""
    tree = {
        "run": {"name": "t", "out_dir": str(tmp_path / "runs"), "seed": 7},
        "model": {"preset": "tiny", "dropout": 0.1},
        "data": {"train": [str(data)], "seq_len": 32, "prefetch": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "global_batch_size": 4,
            "grad_accum_steps": 2,
            "max_steps": 6,
            "eval_interval": 3,
            "eval_batches": 2,
            "device": "cpu",
            "deterministic": True,
            "sample_max_new_tokens": 0,
        },
        "checkpoint": {"interval": 3, "keep": 2},
        "log": {"interval": 1, "progress": False, "tensorboard": False, "plots": False},
    }
    for key, value in overrides.items():
        node = tree
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(tree, "test")


# --- Child processes that cannot outlive their test ------------------------------------------
# torchrun starts each worker in a session of its own, so killing the launcher's process group
# misses the workers, and a worker orphaned that way sits in a collective for the process-group
# timeout while holding the inherited stdout/stderr open (a CI job then hangs). Every process a
# test starts carries a marker in its environment, which torchrun passes on to the workers; on
# leaving the block, whatever happens in it, every live process with that marker is SIGKILLed.

_REAP_VAR = "LMFORGE_TEST_REAP"
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies (pytest killed by a CI
    timeout); torchrun answers SIGTERM by stopping its workers, the trainer by exiting."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _marked_pids(marker: bytes) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):  # a zombie's environ reads empty
                pids.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in pids if pid != os.getpid()]


def kill_tree(proc: subprocess.Popen, marker: bytes | None = None) -> None:
    """SIGKILL `proc`'s session and every process carrying `marker`, then reap `proc`."""
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is None:  # not yet reaped, so its pid still names its own group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True made it a leader
        pids = _marked_pids(marker) if marker and Path("/proc").is_dir() else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def reaped_popen(argv, env=None, **kwargs):
    """`subprocess.Popen` whose whole process tree is killed when the block ends (also when the
    test fails or times out)."""
    token = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), _REAP_VAR: token}
    # Workers that are test files run as scripts (torchrun) and import these helpers by name.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
    try:
        yield proc
    finally:
        kill_tree(proc, f"{_REAP_VAR}={token}".encode())


def run_reaped(argv, timeout: float, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True, timeout=...)` with the tree killed
    on the way out; a timeout raises `subprocess.TimeoutExpired` after the kill."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    with reaped_popen(argv, env=env, text=True, **kwargs) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
