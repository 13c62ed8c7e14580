"""Memory pre-flight: refuse a run that cannot fit before anything is allocated.

The estimate is the planner's (lmforge/parallel/plan.py: parameters, gradients, optimizer states,
activations at the configured micro batch, temporaries) for the layout the config gives on this
world size; the advice is what `lmforge plan` would recommend on the same devices.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lmforge.errors import ConfigError
from lmforge.hardware import accelerator_of_device, find_accelerator
from lmforge.parallel.plan import DEFAULT_GPU, GIB, OVERHEAD, plan
from lmforge.parallel.plan_search import config_keys, configured_layout, describe, recommend

# A CPU process has no CUDA context or caching allocator (the planner's OVERHEAD), but Python,
# torch and the loader still take about this much.
CPU_BASELINE = GIB // 2


def _accelerator(device: torch.device):
    """The hardware row of this CUDA device (for the planner's step-time side; memory is measured)."""
    if device.type == "cuda":
        acc = accelerator_of_device(torch.cuda.get_device_name(device), with_memory=True)
        if acc is not None:
            return acc
    return find_accelerator(DEFAULT_GPU)


def available_memory(device: torch.device, local_ranks: int = 1) -> tuple[int, str]:
    """(bytes this rank may use, what they are): device memory on GPU, free RAM shared by the
    `local_ranks` ranks of this node (torchrun's LOCAL_WORLD_SIZE) on CPU."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total), f"memory of {torch.cuda.get_device_name(device)}"
    import psutil

    local = max(1, local_ranks)
    free = psutil.virtual_memory().available
    where = "available RAM" + (f" / {local} ranks on this node" if local > 1 else "")
    return int(free // local), where


def own_layout(cfg, world_size: int):
    """The config's layout on this world size, or None when it cannot run here."""
    layout, _ = configured_layout(cfg, world_size)
    return layout


def estimate_bytes(cfg, world_size: int, device: torch.device) -> tuple[int, str] | None:
    """(bytes per rank, layout description) or None when the config's layout cannot run here
    (the parallel setup refuses that itself, with its own message)."""
    layout = own_layout(cfg, world_size)
    if layout is None:
        return None
    if device.type == "cpu" and cfg.train.dtype in ("auto", "float32"):
        layout = replace(layout, compute_bytes=4)
    total = plan(cfg, layout, _accelerator(device))["total"]
    if device.type != "cuda":
        total = total - OVERHEAD + CPU_BASELINE
    return int(total), describe(layout)


def _advice(cfg, world_size: int, device: torch.device, limit: int) -> str:
    unit = "GPU" if device.type == "cuda" else "process"
    if device.type != "cuda":  # the planner counts a GPU's OVERHEAD, estimate_bytes does not
        limit = limit + OVERHEAD - CPU_BASELINE
    try:
        best, _, _ = recommend(cfg, world_size, _accelerator(device), limit / GIB, margin=0.0)
    except ConfigError:
        best = None
    if best is not None:
        keys = config_keys(best.layout, best.cost["grad_accum_steps"])
        return f"`lmforge plan` recommends {describe(best.layout)}: {keys}"
    return (
        f"nothing fits on {world_size} {unit}{'s' if world_size > 1 else ''} of this size: use more GPUs, a smaller model or a "
        "shorter data.seq_len (`lmforge plan --config FILE --gpus N` shows what fits where)"
    )


def check_memory(cfg, world_size: int, device: torch.device, local_ranks: int = 1) -> None:
    """Raise one ConfigError line if the run cannot fit; train.skip_memory_check=true skips it."""
    if cfg.train.skip_memory_check:
        return
    estimate = estimate_bytes(cfg, world_size, device)
    if estimate is None:
        return
    need, layout = estimate
    limit, what = available_memory(device, local_ranks)
    if need <= limit:
        return
    raise ConfigError(
        f"train: this run needs about {need / GIB:.1f} GiB per rank ({layout}) but the {what} is "
        f"{limit / GIB:.1f} GiB; {_advice(cfg, world_size, device, limit)}; "
        "or set train.skip_memory_check=true to try anyway"
    )
