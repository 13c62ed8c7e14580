"""`lmforge report RUN_DIR`: redraw a run's plots from metrics.jsonl and summarise it in text."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmforge.errors import LmforgeError, use_extra
from lmforge.train.metrics import fmt_count, fmt_duration, fmt_ppl


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run, skipping a line cut short by a crash."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise LmforgeError(f"{path}: not found; pass a run folder written by `lmforge train` (runs/<name>)")
    train, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("val_loss") is not None:
            evals.append(rec)
        if rec.get("loss") is not None:
            train.append(rec)
    return train, evals


def use_plots(log_cfg) -> bool:
    """log.plots through the 'plot' extra (matplotlib; unset: when it is installed)."""
    return use_extra(log_cfg.plots, "log.plots", "matplotlib", "plot")


def draw_plots(run_dir: str | Path) -> list[Path]:
    """loss.png (train and val loss), lr.png, throughput.png under run_dir/plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in train]
    figures = {
        "loss.png": (
            "loss",
            [("train", steps, [r["loss"] for r in train])]
            + ([("val", [r["step"] for r in evals], [r["val_loss"] for r in evals])] if evals else []),
        ),
        "lr.png": ("learning rate", [("lr", steps, [r.get("lr") for r in train])]),
        "throughput.png": ("tokens/s", [("tokens/s", steps, [r.get("tokens_per_s") for r in train])]),
    }
    written = []
    for name, (ylabel, series) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, xs, ys in series:
            pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pairs:
                # A one-point series (a run stopped at its first step) needs a marker to be seen.
                marker = "o" if label == "val" or len(pairs) == 1 else None
                ax.plot(*zip(*pairs), label=label, marker=marker, markersize=3 if len(pairs) > 1 else 6)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = out / name
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    written += draw_task_plot(run_dir, out)
    return written


# Keys of the validation record itself; every other val_* key is an lm-eval task metric.
VAL_KEYS = ("val_loss", "val_ppl", "val_tokens")


def task_records(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{"<task>_<metric>": [(tokens, value), ...]} from train.eval_tasks records."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for key, value in rec.items():
            if key.startswith("val_") and key not in VAL_KEYS and isinstance(value, (int, float)):
                series.setdefault(key[4:], []).append((rec.get("tokens", rec["step"]), value))
    return series


def draw_task_plot(run_dir, out: Path) -> list[Path]:
    """tasks.png: each lm-eval task metric against training tokens (none without eval_tasks)."""
    import matplotlib.pyplot as plt

    series = task_records(run_dir)
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(series.items()):
        ax.plot(*zip(*points), label=name, marker="o", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("task metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path, tmp = out / "tasks.png", out / ".tasks.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return [path]


def summarize(train: list[dict], evals: list[dict]) -> dict:
    last = train[-1] if train else {}
    rates = [r["tokens_per_s"] for r in train[1:] or train if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    return {
        "steps": last.get("step", 0),
        "tokens": last.get("tokens", 0),
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": last.get("loss"),
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_ppl": evals[-1].get("val_ppl") if evals else None,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_step": best["step"] if best else None,
        "tokens_per_s": sum(rates) / len(rates) if rates else None,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "elapsed": last.get("elapsed"),
    }


def report(run_dir: str | Path) -> str:
    """Redraw the plots and return a short text summary of the run."""
    run_dir = Path(run_dir)
    use_extra(True, "lmforge report", "matplotlib", "plot")
    train, evals = read_metrics(run_dir)
    if not train:
        raise LmforgeError(
            f"{run_dir / 'metrics.jsonl'}: has no training steps yet; run longer or check log.interval"
        )
    plots = draw_plots(run_dir)
    s = summarize(train, evals)

    def num(x, spec=".4f"):
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    mfu_text = "n/a" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
    lines = [
        f"run            {run_dir}",
        f"steps          {s['steps']}",
        f"tokens         {fmt_count(s['tokens'] or 0)}",
        f"train loss     {num(s['first_loss'])} -> {num(s['last_loss'])}",
        f"val loss       {num(s['val_loss'])} (ppl {fmt_ppl(s['val_ppl'])})",
        f"best val loss  {num(s['best_val_loss'])} at step {s['best_val_step'] if s['best_val_step'] is not None else 'n/a'}",
        f"tokens/s       {fmt_count(s['tokens_per_s']) if s['tokens_per_s'] else 'n/a'}",
        f"MFU            {mfu_text}",
        f"time           {fmt_duration(s['elapsed'] or 0)}",
        f"plots          {', '.join(str(p) for p in plots)}",
    ]
    for name, points in sorted(task_records(run_dir).items()):
        lines.append(f"task {name:<10} {points[-1][1]:.4f} at {fmt_count(points[-1][0])} tokens")
    return "\n".join(lines)
