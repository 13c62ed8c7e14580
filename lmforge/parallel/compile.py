"""torch.compile applied to a plain (or TP/AC-wrapped) model in place, and its cost for the log.

`parallel.compile_mode`:
  blocks  regional compile: each transformer block is compiled on its own (one graph reused by
          every layer, so compile time does not grow with depth), and FSDP2 can wrap each block
          around it: the FSDP-friendly option and the default.
  model   the whole forward (embedding, every block, final norm, output head) as one graph, and
          the fused loss's per-chunk kernel compiled too (lmforge.loss.set_loss_compile): fewer
          graph boundaries for single-device and DDP runs.
Both use `nn.Module.compile()` (in place), so parameter names and state dicts are unchanged.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, blocks, mode: str = "blocks") -> None:
    """Compile `model` in place: each of `blocks` (mode "blocks") or the whole module ("model")."""
    from lmforge.loss import set_loss_compile

    if mode == "model":
        model.compile()
        set_loss_compile(True)
        return
    for block in blocks:
        block.compile()  # in place: parameter names stay `layers.{i}....`


def compile_seconds() -> float:
    """Seconds torch.compile (dynamo + inductor) has spent in this process so far."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - very old torch
        return 0.0
    forward = 0.0
    for key in ("_compile.compile_inner", "compile_inner", "entire_frame_compile"):
        if key in compilation_time_metrics:
            forward = float(sum(compilation_time_metrics[key]))
            break
    # AOTAutograd compiles the backward lazily, on the first backward, outside compile_inner
    backward = sum(
        float(sum(v)) for k, v in compilation_time_metrics.items() if k.endswith("bw_compiler")
    )
    return forward + backward
