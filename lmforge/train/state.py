"""`TrainState`: the run's counters, saved in every checkpoint and restored on resume."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    tokens: int = 0
    bad_steps: int = 0  # non-finite steps skipped over the whole run
    bad_streak: int = 0  # ... in a row, up to now
    elapsed_before: float = 0.0  # wall time of the earlier segments of a resumed run
    _clock: float = field(default_factory=time.perf_counter, repr=False)

    def start_clock(self) -> None:
        self._clock = time.perf_counter()

    def elapsed(self) -> float:
        """Wall time of the whole run so far, across resumes."""
        return self.elapsed_before + time.perf_counter() - self._clock

    def record_step(self, finite: bool, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens
        if finite:
            self.bad_streak = 0
        else:
            self.bad_steps += 1
            self.bad_streak += 1

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
            "elapsed": self.elapsed(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.bad_streak = int(state.get("bad_streak", 0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.start_clock()
