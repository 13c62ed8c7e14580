"""Downstream benchmarks through lm-evaluation-harness: `lmforge eval --tasks ...` and the runs the
trainer makes at train.eval_tasks_interval. lm-eval owns the tasks, prompts and metrics; lmforge
only supplies the model (infer/lm_eval_model.py).

Offline first: tasks named in --include-path folders are indexed without lm-eval's ~10,000
built-in task files when every requested name is found there; a task whose dataset cannot be
loaded (no network, no local file) is one line naming it and the --include-path recipe.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.bos import use_bos
from lmforge.interop.loading import load_model_for_inference, resolve_device
from lmforge.weights.dtypes import resolve_dtype

MISSING_EXTRA = (
    "lm-eval is not installed; pip install 'lmforge[eval]' (lm-evaluation-harness 0.4.x) to run --tasks"
)
OFFLINE_HINT = (
    "without network, write a task YAML over local JSONL/Parquet files and pass its folder with "
    "--include-path DIR (README: Offline evaluation)"
)


def require_lm_eval():
    try:
        import lm_eval  # optional extra `eval`
    except ImportError as exc:
        raise LmforgeError(MISSING_EXTRA) from exc
    return lm_eval


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = (
        tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in str(item).split(",")]
    )
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise LmforgeError("--tasks: no task named; pass e.g. --tasks arc_easy,hellaswag")
    return names


def _paths(include_path) -> list[str]:
    if not include_path:
        return []
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for p in paths:
        if not Path(p).is_dir():
            raise LmforgeError(
                f"--include-path: {p} is not a folder; pass the folder holding your task YAMLs"
            )
    return [str(Path(p).resolve()) for p in paths]


def task_manager(names: list[str], include_path=None):
    """lm-eval's TaskManager; only the --include-path folders when they define every name."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = _paths(include_path)
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" nor in {', '.join(paths)}" if paths else ""
        raise LmforgeError(
            f"--tasks: unknown task {', '.join(unknown)} (not an lm-eval task, group or tag{where}); "
            "list them with `lm-eval ls tasks`, or pass --include-path DIR for your own task YAMLs"
        )
    return manager


def load_tasks(manager, names: list[str]) -> list:
    """lm-eval Task/Group objects, one name at a time so a dataset that cannot be loaded is
    reported with the task that needs it."""
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError, missing files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LmforgeError(
                f"task {name}: its dataset could not be loaded ({first}); {OFFLINE_HINT}"
            ) from exc
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            built.extend(loaded["tasks"].values())
    return built


def prepare_tasks(tasks, include_path=None) -> tuple:
    """(TaskManager, task objects) with every dataset loaded: unknown names and missing data
    fail here, before a model is loaded or a training step is taken."""
    names = parse_tasks(tasks)
    manager = task_manager(names, include_path)
    return manager, load_tasks(manager, names)


def run_tasks(
    lm,
    prepared: tuple,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    seed_rngs: bool = True,
    log_samples: bool = False,
) -> dict | None:
    """lm-eval's simple_evaluate on an `LM` over prepare_tasks' result; returns lm-eval's result
    dict (None on a torchrun rank other than local rank 0, as lm-eval decides). seed_rngs=False
    leaves Python's, NumPy's and torch's global RNGs alone (the trainer's exact resume)."""
    from lm_eval import simple_evaluate

    manager, objects = prepared
    seeds = {} if seed_rngs else dict(random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    return simple_evaluate(
        model=lm,
        tasks=list(objects),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        **seeds,
    )


def make_lm(model, tokenizer, cfg, *, batch_size: int = 1, bos: bool | None = None, max_length=None):
    require_lm_eval()
    from lmforge.infer.lm_eval_model import LmforgeLM

    if tokenizer is None:
        raise LmforgeError(
            "--tasks: no tokenizer found next to the weights; copy tokenizer.json into the folder"
        )
    return LmforgeLM(
        model, tokenizer, use_bos(tokenizer, cfg, bos), batch_size=batch_size, max_length=max_length
    )


def task_metrics(results: dict) -> dict[str, float]:
    """Flat {"val_<task>_<metric>": value} for metrics.jsonl / TensorBoard / W&B: every numeric
    metric of every task and group, filter names kept only when not lm-eval's "none"."""
    flat = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                name, _, filt = key.partition(",")
                if (
                    "stderr" in name
                    or name == "sample_len"
                    or not isinstance(value, (int, float))
                    or isinstance(value, bool)
                ):
                    continue
                suffix = name if filt in ("", "none") else f"{name}_{filt}"
                flat[f"val_{task}_{suffix}"] = float(value)
    return flat


def quiet_lm_eval() -> None:
    """lm-eval logs every task's configuration at INFO; keep its warnings only."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def evaluate_tasks_checkpoint(
    checkpoint,
    tasks,
    *,
    limit=None,
    num_fewshot=None,
    batch_size: int = 1,
    include_path=None,
    out=None,
    device="auto",
    dtype=None,
    bos: bool | None = None,
    log_samples: bool = False,
) -> dict:
    """`lmforge eval --tasks`: lm-eval on any weights lmforge reads; prints lm-eval's table and
    writes its JSON to `out` (atomically)."""
    require_lm_eval()
    quiet_lm_eval()
    prepared = prepare_tasks(tasks, include_path)  # unknown names and missing data fail before the load
    dev = resolve_device(device)
    model, cfg, tokenizer = load_model_for_inference(checkpoint, dev, run_config=True)
    if dtype is not None:
        model = model.to(resolve_dtype(dtype))
    lm = make_lm(model, tokenizer, cfg, batch_size=batch_size, bos=bos)
    with torch.no_grad():
        results = run_tasks(lm, prepared, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples)
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if out is not None:
        write_results(results, out)
        print(f"results written to {out}", file=sys.stderr)
    return results


def write_results(results: dict, out) -> Path:
    from lm_eval.utils import handle_non_serializable

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False), "utf-8"
    )
    os.replace(tmp, out)
    return out
