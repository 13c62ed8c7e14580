"""Read a torch.distributed.checkpoint `.metadata` file without running arbitrary pickled code.

DCP stores its index as a pickle and reads it with plain `pickle.load`. Before handing a folder to
DCP we unpickle that index ourselves with an allow-list of the classes DCP's metadata is made of
(its dataclasses, torch.Size, dtypes and layouts, paths), so a crafted checkpoint is refused as
a CheckpointError instead of executing code. The result also gives us every saved tensor's shape,
which is how a checkpoint/model mismatch is reported by key.
"""

from __future__ import annotations

import pathlib
import pickle
from collections import OrderedDict
from pathlib import Path

import torch

from lmforge.errors import CheckpointError

_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}
_BUILTINS = {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint"):
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if module in ("torch._utils", "torch.serialization") and name == "_get_layout":
            return super().find_class(module, name)
        if module in ("pathlib", "pathlib._local") and name in _PATHS:
            return getattr(pathlib, name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "builtins" and name in _BUILTINS:
            return _BUILTINS[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_metadata(ckpt_dir: str | Path):
    """The DCP Metadata object of `ckpt_dir`, loaded with the allow-list above."""
    path = Path(ckpt_dir) / ".metadata"
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir}: no .metadata; this is not a complete checkpoint, pick another step folder"
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable or unsafe checkpoint index ({exc}); use another checkpoint"
        ) from None


def tensor_shapes(ckpt_dir: str | Path, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Saved tensor shapes under `prefix` (DCP flattens nested dicts with dots), prefix removed."""
    meta = read_metadata(ckpt_dir)
    shapes = {}
    for key, item in meta.state_dict_metadata.items():
        size = getattr(item, "size", None)
        if key.startswith(prefix) and size is not None:
            shapes[key[len(prefix) :]] = tuple(size)
    return shapes
