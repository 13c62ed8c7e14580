"""The one check of saved tensor shapes against a model, with one error wording everywhere."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from lmforge.errors import CheckpointError
from lmforge.model import build
from lmforge.model.config import ModelConfig

Shapes = dict[str, tuple[int, ...]]


def model_state_shapes(model: torch.nn.Module) -> Shapes:
    """Global tensor shapes of a live (possibly sharded) model, under the names DCP saves them with."""
    return {k: tuple(v.shape) for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}


def config_shapes(model_cfg: ModelConfig) -> Shapes:
    """Name -> shape of every state-dict entry `model_cfg` implies, from a model built on the meta
    device (no memory, instant even for 70B)."""
    model = build(model_cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def state_shapes(state: dict) -> Shapes:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def shape_differences(have: Shapes, want: Shapes) -> list[str]:
    """'name (saved shape) vs (model shape)' for every entry that differs or exists on one side only."""
    return [
        f"{k} {have.get(k, 'absent')} vs {want.get(k, 'absent')}"
        for k in sorted(set(have) | set(want))
        if have.get(k) != want.get(k)
    ]


def check_shapes(have: Shapes, want: Shapes, source, target: str = "the model", hint: str = "") -> None:
    """Raise CheckpointError naming the first differing tensors when `have` (the weights at
    `source`) does not fit `want` (`target`, e.g. "the run config's model")."""
    diffs = shape_differences(have, want)
    if not diffs:
        return
    shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    hint = hint or "make the model config match the weights"
    raise CheckpointError(f"{source}: weights do not fit {target} (checkpoint vs config: {shown}); {hint}")
