"""Read a torch.distributed.checkpoint `.metadata` file without running pickled code, and vet it.

DCP stores its index as a pickle and would read it with plain `pickle.load`. We unpickle it
ourselves with an EXACT allow-list of (module, qualified name) pairs: the classes DCP's metadata
is made of on torch 2.6-2.14 (listed from real single-process, DDP, FSDP2, FSDP2+TP, PP and MoE
checkpoints), torch.Size, the dtypes, paths. A name is never resolved through dots (pickle
protocol 4 would turn `("torch.distributed.checkpoint.filesystem", "os.system")` into
`os.system`), and anything not in the list is one CheckpointError.

The vetted index must then declare only tensors: DCP reads a `BytesStorageMetadata` entry with
`torch.load(weights_only=False)`, so a checkpoint declaring one is refused before any data is
read (lmforge never writes one). Every tensor chunk must be backed by bytes inside a data file of
the folder, so sizes the index claims are real before anything is allocated for them.
`SafeFileSystemReader` hands DCP this vetted index, so DCP never unpickles `.metadata` itself.
"""

from __future__ import annotations

import math
import os
import pathlib
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md

from lmforge.errors import CheckpointError

_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
_DTYPES = (
    "float32", "float64", "float16", "bfloat16", "complex64", "complex128", "bool",
    "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)  # fmt: skip
_PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")


def _allowed() -> dict[tuple[str, str], object]:
    """(module, name) -> the object itself; built from attributes, never by resolving names."""
    allowed: dict[tuple[str, str], object] = {}
    for name in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                 "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):  # fmt: skip
        if hasattr(dcp_md, name):
            allowed[(_DCP_META, name)] = getattr(dcp_md, name)
    # Unpickled only to be refused with its own message (DCP would torch.load its bytes).
    allowed[(_DCP_META, "BytesStorageMetadata")] = dcp_md.BytesStorageMetadata
    allowed[(_DCP_FS, "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name in _DTYPES:
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    # torch.layout pickles as a call of _get_layout("torch.strided"): a lookup in a table of layouts.
    for module in ("torch.serialization", "torch._utils"):
        func = getattr(__import__(module, fromlist=["_get_layout"]), "_get_layout", None)
        if func is not None:
            allowed[(module, "_get_layout")] = func
    for module in ("pathlib", "pathlib._local"):  # Python 3.13 moved the classes to pathlib._local
        for name in _PATHS:
            allowed[(module, name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("builtins", "set")] = set
    allowed[("builtins", "frozenset")] = frozenset
    return allowed


ALLOWED = _allowed()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return found


def read_metadata(ckpt_dir: str | Path):
    """The DCP Metadata object of `ckpt_dir`, loaded with the allow-list above (not yet vetted)."""
    path = Path(ckpt_dir) / ".metadata"
    try:
        with open(path, "rb") as fh:
            meta = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir}: no .metadata; this is not a complete checkpoint, pick another step folder"
        ) from None
    except Exception as exc:  # noqa: BLE001 - refused names, damaged pickles: all one line
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{path}: unreadable or unsafe checkpoint index ({reason}); use another checkpoint"
        ) from None
    if not isinstance(meta, dcp_md.Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CheckpointError(
            f"{path}: not a checkpoint index ({type(meta).__name__}); use another checkpoint"
        )
    return meta


def _plain_name(name) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
    )


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def vetted_metadata(ckpt_dir: str | Path):
    """`read_metadata`, then refuse what DCP would unpickle or what no file backs: a non-tensor
    (bytes) entry, a data file outside the folder, a chunk larger than its stored bytes."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir)
    try:
        _vet(meta, ckpt_dir)
    except (TypeError, AttributeError, ValueError, OverflowError, RuntimeError) as exc:  # odd field types
        raise CheckpointError(
            f"{ckpt_dir / '.metadata'}: malformed checkpoint index ({type(exc).__name__}); use another checkpoint"
        ) from None
    return meta


def _vet(meta, ckpt_dir: Path) -> None:
    where = ckpt_dir / ".metadata"
    for key, item in meta.state_dict_metadata.items():
        if not isinstance(item, dcp_md.TensorStorageMetadata):
            raise CheckpointError(
                f"{where}: entry '{key}' is not a tensor ({type(item).__name__}); DCP would unpickle it, "
                "so this checkpoint is refused; lmforge never writes one, use a checkpoint lmforge wrote"
            )
    storage = meta.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{where}: has no storage table; use another checkpoint")
    stored: dict[tuple[str, tuple], int] = {}
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        if not isinstance(index, dcp_md.MetadataIndex) or not isinstance(info, dcp_fs._StorageInfo):
            raise CheckpointError(f"{where}: malformed storage table; use another checkpoint")
        name = info.relative_path
        if not _plain_name(name):
            raise CheckpointError(
                f"{where}: names data file {name!r} outside the folder; use another checkpoint"
            )
        if name not in sizes:
            try:
                sizes[name] = os.stat(ckpt_dir / name).st_size
            except OSError:
                raise CheckpointError(
                    f"{ckpt_dir / name}: missing; copy the whole checkpoint folder"
                ) from None
        if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[name]:
            raise CheckpointError(
                f"{ckpt_dir / name}: shorter than its index says (truncated copy?); copy the whole checkpoint folder"
            )
        stored[(index.fqn, tuple(index.offset or ()))] = info.length
    for key, item in meta.state_dict_metadata.items():
        itemsize = _itemsize(item.properties.dtype)
        for chunk in item.chunks:
            length = stored.get((key, tuple(chunk.offsets)))
            need = math.prod(chunk.sizes) * itemsize
            if length is None or length < need:
                raise CheckpointError(
                    f"{where}: '{key}' claims {tuple(item.size)} but its data files hold less; "
                    "the checkpoint is damaged or not what it claims, use another one"
                )


def tensor_shapes(ckpt_dir: str | Path, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Saved tensor shapes under `prefix` (DCP flattens nested dicts with dots), prefix removed.
    The index is vetted first (see `vetted_metadata`)."""
    meta = vetted_metadata(ckpt_dir)
    return {
        key[len(prefix) :]: tuple(item.size)
        for key, item in meta.state_dict_metadata.items()
        if key.startswith(prefix)
    }


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, given the vetted index instead of unpickling `.metadata` itself."""

    def read_metadata(self, *args, **kwargs):
        meta = vetted_metadata(self.path)
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = dcp_md.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta
