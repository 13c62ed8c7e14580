"""The one `torch.load`: weights-only (torch's exact allow-list of tensor rebuilders), with its
refusals turned into one line of our own (torch's message is many lines of advice to use
weights_only=False, which lmforge never does)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from lmforge.errors import CheckpointError


def load_weights_only(path: str | Path, what: str, error=CheckpointError):
    """torch.load(path, weights_only=True) on the CPU; `what` names the expected content."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        reason = (
            "it holds pickled objects other than tensors, which lmforge does not load (they can run code)"
        )
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file, whatever torch raises
        reason = f"not a torch.save file ({type(exc).__name__})"
    raise error(f"{path}: refused as {what}: {reason}; save plain tensors (a state_dict) instead")
