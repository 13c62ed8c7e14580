"""Weights of a live (possibly sharded) model, written in the weights layer's file form."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from lmforge.config import config_for_model, config_from_dict
from lmforge.parallel import full_state_dict
from lmforge.weights.files import write_weights_file


def export_weights(
    model, path: str | Path, dtype="bfloat16", model_cfg: dict | None = None, run_cfg: dict | None = None
):
    """The file form from a live (possibly sharded) model: all ranks call it (gathering is
    collective), rank 0 writes and gets the path. `run_cfg` (the full config) wins over `model_cfg`."""
    state = full_state_dict(model, cpu_offload=True)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    cfg = config_from_dict(run_cfg, "<run config>") if run_cfg is not None else config_for_model(model_cfg)
    return write_weights_file(state, cfg, path, dtype, overwrite=True)  # the caller's own training output
