"""Resolve `parallel.strategy` and the pp x dp_replicate x dp_shard x tp sizes against the world size.

The mesh is always four-dimensional, `("pp", "dp_replicate", "dp_shard", "tp")`, with size-1 axes
for what a layout does not use. Pipeline parallel is outermost (stages exchange only activations,
so they can sit on different nodes) and tensor parallel innermost (consecutive ranks, one node).
`parallel.pp` divides the world first; the strategy then resolves its axes against the rest.
Strategies (per pipeline stage):

    single   no data parallel (one process, or pp alone)    1 x 1 x 1
    ddp      replicate only (DistributedDataParallel)      W x 1 x 1   (dp_replicate defaults to W)
    fsdp     shard only (FSDP2 fully_shard)                1 x W x 1
    hsdp     replicate x shard (FSDP2 on a 2-D mesh)       R x S x 1
    fsdp+tp  (replicate x) shard x tensor parallel         R x S x T   (tp alone: dp_shard=1)

`-1` means "the rest of the world size"; at most one axis may be -1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class MeshShape:
    strategy: str = "single"
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_size * self.tp

    @property
    def uses_fsdp(self) -> bool:
        # fsdp/hsdp shard even at world size 1 (to measure FSDP2 itself); fsdp+tp with a single
        # data-parallel rank is plain tensor parallelism and skips the FSDP wrapper.
        return self.strategy in ("fsdp", "hsdp") or (self.strategy == "fsdp+tp" and self.dp_size > 1)

    @property
    def fsdp_wrapped(self) -> bool:
        """Whether the model (or pipeline stage) is wrapped by FSDP2: FSDP sharding, or DDP under a
        pipeline, which runs as FSDP2 on the (dp_replicate, dp_shard=1) mesh (DDP's reducer cannot
        follow a pipeline's interleaved forwards and backwards)."""
        return self.uses_fsdp or (self.pp > 1 and self.strategy == "ddp" and self.dp_size > 1)


def needed_processes(pcfg) -> int | None:
    """Processes (GPUs) the layout asks for when every axis its strategy uses is explicit (no -1),
    else None: the one home of "this layout needs N GPUs"."""
    axes = {
        "single": {},
        "ddp": {"dp_replicate": -1 if pcfg.dp_replicate in (-1, 1) else pcfg.dp_replicate},
        "fsdp": {"dp_shard": pcfg.dp_shard},
        "hsdp": {"dp_replicate": pcfg.dp_replicate, "dp_shard": pcfg.dp_shard},
        "fsdp+tp": {"dp_replicate": pcfg.dp_replicate, "dp_shard": pcfg.dp_shard, "tp": pcfg.tp},
    }[pcfg.strategy]
    if -1 in axes.values():
        return None
    return pcfg.pp * math.prod(axes.values())


def _layout_desc(pcfg) -> str:
    keys = ("pp", "dp_replicate", "dp_shard", "tp")
    return " x ".join(f"parallel.{k}={getattr(pcfg, k)}" for k in keys if getattr(pcfg, k) != 1)


def _fill(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        keys = " and ".join(f"parallel.{k}" for k in unknown)
        raise ConfigError(f"{keys} are both -1; at most one mesh axis may take the rest of the world size")
    known = 1
    for v in sizes.values():
        if v != -1:
            known *= v
    if unknown:
        if world_size % known:
            raise ConfigError(
                f"parallel: WORLD_SIZE {world_size} is not divisible by "
                + " x ".join(f"parallel.{k}={v}" for k, v in sizes.items() if v != -1)
                + f" = {known}; change those sizes or the number of processes"
            )
        sizes[unknown[0]] = world_size // known
    product = 1
    for v in sizes.values():
        product *= v
    if product != world_size:
        desc = " x ".join(f"parallel.{k}={v}" for k, v in sizes.items())
        raise ConfigError(
            f"parallel: {desc} = {product} does not match WORLD_SIZE {world_size}; "
            "make the product equal the number of processes or set one axis to -1"
        )
    return sizes


def resolve_mesh_shape(pcfg, world_size: int, source: str = "WORLD_SIZE") -> MeshShape:
    """Mesh sizes for `pcfg` (ParallelConfig) at `world_size` processes; ConfigError when they
    disagree. `source` names where the world size came from (torchrun's WORLD_SIZE, plan's --gpus)."""
    pp = pcfg.pp
    need = needed_processes(pcfg)
    # (single on more processes than it uses: its own message below says which strategies to use)
    if need is not None and need != world_size and not (pcfg.strategy == "single" and world_size > need):
        raise ConfigError(
            f"parallel: this layout ({pcfg.strategy}: {_layout_desc(pcfg) or 'one process'}) needs {need} GPUs (one process each) "
            f"but {source} is {world_size}; launch {need} processes or set parallel.dp_shard (or dp_replicate) to -1"
        )
    if world_size % pp:
        raise ConfigError(
            f"parallel.pp: {pp} pipeline stages do not divide WORLD_SIZE {world_size}; "
            "make the number of processes a multiple of parallel.pp"
        )
    shape = _resolve_per_stage(pcfg, world_size // pp, pp)
    return MeshShape(shape.strategy, shape.dp_replicate, shape.dp_shard, shape.tp, pp)


def _resolve_per_stage(pcfg, world_size: int, pp: int) -> MeshShape:
    s = pcfg.strategy
    if pcfg.tp > 1 and s != "fsdp+tp":
        raise ConfigError(
            f"parallel.tp: {pcfg.tp} needs parallel.strategy fsdp+tp (strategy is {s}); "
            "set parallel.strategy=fsdp+tp or parallel.tp=1"
        )
    if s == "single":
        if world_size != 1:
            raise ConfigError(
                f"parallel.strategy: single but WORLD_SIZE{' / parallel.pp' if pp > 1 else ''} is {world_size}; "
                "set parallel.strategy to ddp, fsdp, hsdp or fsdp+tp for multi-process runs"
            )
        return MeshShape("single", 1, 1, 1)
    if s == "ddp":
        if pcfg.dp_shard not in (-1, 1):
            raise ConfigError(
                f"parallel.dp_shard: {pcfg.dp_shard} with strategy ddp; ddp only replicates, use hsdp"
            )
        rep = -1 if pcfg.dp_replicate in (-1, 1) else pcfg.dp_replicate
        sizes = _fill({"dp_replicate": rep}, world_size)
        return MeshShape("ddp", sizes["dp_replicate"], 1, 1)
    if s == "fsdp":
        if pcfg.dp_replicate not in (-1, 1):
            raise ConfigError(
                f"parallel.dp_replicate: {pcfg.dp_replicate} with strategy fsdp; use strategy hsdp to replicate"
            )
        sizes = _fill({"dp_shard": pcfg.dp_shard}, world_size)
        return MeshShape("fsdp", 1, sizes["dp_shard"], 1)
    if s == "hsdp":
        sizes = _fill({"dp_replicate": pcfg.dp_replicate, "dp_shard": pcfg.dp_shard}, world_size)
        return MeshShape("hsdp", sizes["dp_replicate"], sizes["dp_shard"], 1)
    sizes = _fill({"dp_replicate": pcfg.dp_replicate, "dp_shard": pcfg.dp_shard, "tp": pcfg.tp}, world_size)
    return MeshShape("fsdp+tp", sizes["dp_replicate"], sizes["dp_shard"], sizes["tp"])
