"""One training per run folder at a time: `runs/<name>/run.lock`.

Two trainings with the same run.name would silently replace each other's checkpoints and
metrics. Rank 0 holds an exclusive `flock` on `run.lock` for the whole training, with its pid,
host and start time written inside, and removes the file at the end. A second start finds the
lock held and stops with one line naming the first's pid and host. A run that was killed leaves
the file but not the lock (the kernel drops a dead process's flock), so on the same host it is
recognised as stale and taken over, with a note. A file written on another host (a shared
filesystem whose locks may not reach here) cannot be checked from this host: it is refused, and
the message names the file to delete if that run is gone. Under torchrun only rank 0 touches the
file; every rank learns the outcome through one all-reduce, so all of them stop together.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch

from lmforge.errors import LmforgeError

LOCK_NAME = "run.lock"


class RunLock:
    """`lock = RunLock(run_dir, ctx); lock.take(); ...; lock.release()` (release is safe to repeat)."""

    def __init__(self, run_dir: str | os.PathLike, ctx):
        self.path = Path(run_dir) / LOCK_NAME
        self.ctx = ctx
        self.fd: int | None = None

    def take(self) -> None:
        error = None
        if self.ctx.is_main:
            try:
                self._take_here()
            except LmforgeError as exc:
                error = exc
        if self.ctx.distributed:  # every rank stops when rank 0 could not take the lock
            failed = self.ctx.reduce_max(torch.tensor([float(error is not None)], device=self.ctx.device))
            if failed.item() and error is None:
                raise LmforgeError(f"{self.path}: the run folder is in use by another training (see rank 0)")
        if error is not None:
            raise error

    def _take_here(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for _ in range(5):  # retried when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise LmforgeError(
                    f"{self.path.parent}: another training of this run is running (pid {owner.get('pid', '?')} "
                    f"on host {owner.get('host', '?')}, since {owner.get('since', '?')}); wait for it or stop "
                    "it, or set run.name to train a separate run"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # released and removed by its holder meanwhile: lock the new file
                os.close(fd)
                continue
            owner = _read(fd)
            if owner and owner.get("host") != host:
                os.close(fd)
                raise LmforgeError(
                    f"{self.path.parent}: another training of this run may hold it (pid {owner.get('pid', '?')} "
                    f"on host {owner.get('host', '?')}, since {owner.get('since', '?')}); wait for it, set "
                    f"run.name, or delete {self.path} if that run is gone"
                )
            if owner:
                print(f"note: {self.path}: took over the lock of pid {owner.get('pid', '?')}, which is no longer running",
                      flush=True)  # fmt: skip
            me = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self.fd = fd
            return
        raise LmforgeError(f"{self.path}: could not take the run lock (it keeps being replaced); try again")

    def release(self) -> None:
        """Remove the file, then drop the lock (a waiting start then re-checks the inode)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}
