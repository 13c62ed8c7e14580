"""Where training numbers go: the console, `metrics.jsonl`, TensorBoard and Weights & Biases.

Only rank 0 builds a `MetricsLogger` that writes; other ranks get one with `enabled=False`.
Values arrive already reduced across ranks. `metrics.jsonl` holds one JSON object per logged step
(and one per evaluation), appended and flushed as it goes, so a crashed run keeps its history; on
resume the lines after the checkpoint's step are dropped so the file reads as one continuous run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from lmforge.errors import LmforgeError, use_extra
from lmforge.infer.evaluate import fmt_ppl  # noqa: F401 (the one perplexity format; re-exported)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated by this process, or its peak resident set size on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def console_line(rec: dict, total_steps: int) -> str:
    mfu = "n/a" if rec.get("mfu") is None else f"{100 * rec['mfu']:.1f}%"
    parts = [
        f"step {rec['step']}/{total_steps}",
        f"loss {rec['loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"grad {rec['grad_norm']:.3f}",
        f"{fmt_count(rec['tokens_per_s'])} tok/s"
        + (f" ({fmt_count(rec['real_tokens_per_s'])} real)" if rec.get("real_tokens_per_s") is not None else ""),
        f"mfu {mfu}",
        f"mem {rec['mem'] / 2**20:.0f}MiB",
        f"data {100 * rec.get('data_wait', 0.0):.0f}%",
        f"{fmt_duration(rec['elapsed'])} elapsed",
        f"eta {fmt_duration(rec.get('eta', 0))}",
    ]
    if rec.get("skipped"):
        parts.append(f"skipped {rec['skipped']} non-finite")
    return " | ".join(parts)


def truncate_after(path: Path, step: int) -> None:
    """Keep only records with step <= `step` (resume); rewrite atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a crash
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def use_tensorboard(log_cfg) -> bool:
    """log.tensorboard through the 'tensorboard' extra (unset: when it is installed)."""
    return use_extra(log_cfg.tensorboard, "log.tensorboard", "tensorboard", "tensorboard")


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        log_cfg,
        config_dict: dict,
        enabled: bool,
        resume_step: int = 0,
        run_name: str = "run",
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step > 0:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run does not append to an old run's curve
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if use_tensorboard(log_cfg):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        if log_cfg.wandb:
            self.wandb = _start_wandb(log_cfg, run_dir, run_name, config_dict)

    def start_progress(self, total: int, initial: int, show: bool) -> None:
        # A bar only on a terminal: redirected to a file it would be \r-separated clutter; the
        # plain log lines carry the same information there.
        if self.enabled and show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log(self, rec: dict) -> None:
        """Write one record (train step or evaluation) to every enabled sink."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = rec["step"]
        scalars = {
            k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float)) and v is not None
        }
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(_tb_name(key), value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.enabled = False  # idempotent: the trainer closes on errors too
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tb_name(key: str) -> str:
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    return f"train/{key}"


def _start_wandb(log_cfg, run_dir: Path, name: str, config_dict: dict):
    try:
        import wandb
    except ImportError:
        raise LmforgeError(
            "log.wandb: the wandb package is not installed; `pip install wandb` or set log.wandb=false"
        ) from None
    if log_cfg.wandb_mode == "online" and not _wandb_credentials():
        raise LmforgeError(
            "log.wandb_mode=online: no W&B credentials (WANDB_API_KEY or `wandb login`); log in, "
            "or set log.wandb_mode=offline (sync later with `wandb sync`) or log.wandb=false"
        )
    try:
        run = wandb.init(
            project=log_cfg.wandb_project,
            name=name,
            dir=str(run_dir),
            mode=log_cfg.wandb_mode,
            config=config_dict,
            resume="allow",
        )
    except Exception as exc:  # wandb raises its own error classes (auth, network, usage)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LmforgeError(
            f"log.wandb: W&B could not start ({first}); set log.wandb_mode=offline or log.wandb=false"
        ) from None
    return run


def _wandb_credentials() -> bool:
    """Whether wandb can authenticate: an API key in the environment or a `wandb login` netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
