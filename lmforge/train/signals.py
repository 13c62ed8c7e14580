"""Preemption: SIGTERM/SIGINT only set a flag; the trainer checkpoints at the next step boundary.

Doing the work in the handler itself would interrupt a forward/backward or a checkpoint write
half way; a flag checked between steps leaves everything consistent.
"""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and returns at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()
