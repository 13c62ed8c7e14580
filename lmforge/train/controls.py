"""Run controls around the training loop: scheduled garbage collection, the host allocator's
memory cache, the data-wait share of each logged window, and the step profiler.

- `train.gc_interval` N > 0: Python's automatic GC is off for the run and every rank runs a full
  collection before steps N, 2N, ... (torchtitan's GarbageCollection). Automatic collections fire
  whenever an allocation count crosses a threshold, at a different moment on each rank, and a
  rank paused in a collection stalls every other rank at the next collective.
- `train.malloc_cache` (glibc): a step frees and re-allocates the same large activation buffers.
  By default glibc serves blocks above a dynamic threshold with mmap and returns them (and any
  free top of the heap above M_TRIM_THRESHOLD) to the OS on free, so every step faults the same
  memory in again page by page (the kernel zeroes each page: sys time and minor faults). Raising
  M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps freed blocks in the heap for reuse, as a caching
  device allocator does. Measured in bench/RESULTS.md (issue 19: peers). The resident size
  stays at the step's peak instead of dropping between steps. MALLOC_MMAP_THRESHOLD_ or
  MALLOC_TRIM_THRESHOLD_ in the environment win (nothing is changed then).
- Data wait: seconds spent in `next(loader)` over the wall time of the logged window, logged as
  `data_wait` (OLMo-core logs the same share): near 0 is compute-bound, large is input-bound.
- `log.profile_steps` [first, last]: torch.profiler around those steps, written to
  <run>/profile/trace_rank<r>.json (chrome trace, opens in Perfetto / chrome://tracing), with
  memory: CUDA's allocator history as memory_snapshot_rank<r>.pickle (pytorch.org/memory_viz),
  on CPU the profiler's per-op memory table memory_rank<r>.txt (the trace also holds the events).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import time
from pathlib import Path

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to 1 GiB come from the heap (glibc builds that cap the threshold at HEAP_MAX/2 refuse
# that, so 32 MiB is tried next); the free top of the heap is kept up to 2 GiB.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_TRIM_THRESHOLD = (1 << 31) - 1


def cache_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). True if it was set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user tuned glibc already
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, value) for value in _MMAP_THRESHOLDS):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


class RunControls:
    """Created by the trainer before the model; `close()` in its `finally` restores Python's GC."""

    def __init__(self, cfg, ctx, run_dir: Path):
        self.ctx, self.gc_interval = ctx, cfg.train.gc_interval
        self.malloc_cached = cache_freed_memory() if cfg.train.malloc_cache else False
        self._gc_was_enabled = gc.isenabled()
        if self.gc_interval:
            gc.disable()
            gc.collect()
        self._wait = 0.0
        self._profile = cfg.log.profile_steps
        self._profile_dir = Path(run_dir) / "profile"
        self._profiler = None

    # -- data wait --------------------------------------------------------------------------
    def fetch(self, loader, count: int) -> list:
        """`count` batches from the loader, timing the wait."""
        start = time.perf_counter()
        batches = [next(loader) for _ in range(count)]
        self._wait += time.perf_counter() - start
        return batches

    def data_wait_share(self, window_seconds: float) -> float:
        """The share of `window_seconds` spent in fetch() since the last call; resets it."""
        share = min(self._wait / max(window_seconds, 1e-9), 1.0)
        self._wait = 0.0
        return share

    # -- around each step --------------------------------------------------------------------
    def step_begins(self, step: int) -> None:
        """Before optimizer step `step` (1-based) runs."""
        if self.gc_interval and step % self.gc_interval == 0:
            gc.collect()
        if self._profile and step == self._profile[0] and self._profiler is None:
            self._start_profiler()

    def step_ends(self, step: int) -> None:
        if self._profiler is not None and step >= self._profile[1]:
            self._stop_profiler()

    def close(self) -> None:
        """Write a profile cut short by the end of the run; restore automatic GC."""
        if self._profiler is not None:
            self._stop_profiler()
        if self.gc_interval and self._gc_was_enabled:
            gc.enable()

    # -- profiler ----------------------------------------------------------------------------
    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        cuda = self.ctx.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profiler.__enter__()

    def _stop_profiler(self) -> None:
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        rank = self.ctx.rank
        out = self._profile_dir
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / f"trace_rank{rank}.json", prof.export_chrome_trace)
        if self.ctx.device.type == "cuda":
            _write_atomic(out / f"memory_snapshot_rank{rank}.pickle", torch.cuda.memory._dump_snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
        else:
            table = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=40)
            _write_atomic(out / f"memory_rank{rank}.txt", lambda p: Path(p).write_text(table, encoding="utf-8"))


def _write_atomic(path: Path, write) -> None:
    """`write(tmp_path)`, then moved into place: a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(str(tmp))
    os.replace(tmp, path)
