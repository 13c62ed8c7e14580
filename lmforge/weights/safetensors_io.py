"""The one safetensors writer and reader (no pickle anywhere), and HF folder file resolution.

`write_safetensors` writes one file, or HF-style shards plus `model.safetensors.index.json`
when a shard limit is given and exceeded; each file goes to `<name>.tmp-<pid>` first and is
renamed into place, the index last, so a crash never leaves a complete-looking set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.errors import CheckpointError
from lmforge.weights.dtypes import resolve_dtype

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def plain_tensors(state: dict, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU tensors ready for safetensors, floating point ones cast to `dtype` (a name or a dtype)."""
    dtype = resolve_dtype(dtype)
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        # Cloning breaks storage sharing (tied embeddings), which safetensors refuses to write.
        out[key] = value.clone().contiguous()
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a written file the mode `open()` would (0666 minus the umask): safetensors (0.6+)
    creates its files 0600 through a temporary file, unlike every other file we write."""
    os.chmod(path, 0o666 & ~_umask())


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        honour_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"{path}: cannot write weights ({exc.strerror or exc}); free space or pick another path"
        ) from None


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write `tensors` to `path` (a .safetensors file), or to HF-named shards beside it when they
    exceed `max_shard_bytes`. Returns the files written (the index last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}  # transformers refuses files without "format"
    shards = _shards(tensors, max_shard_bytes) if max_shard_bytes else [sorted(tensors)]
    if len(shards) == 1:
        _save_atomic(tensors, path, meta)
        return [path]
    written, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = path.parent / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_atomic({n: tensors[n] for n in shard}, file, meta)
        weight_map.update({n: file.name for n in shard})
        written.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = path.parent / INDEX_NAME
    tmp = index.with_name(f"{index.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    os.replace(tmp, index)
    return written + [index]


def read_safetensors(files: list[Path] | Path) -> dict[str, torch.Tensor]:
    """All tensors of one file or of a set of shards; a damaged file is one CheckpointError."""
    tensors: dict[str, torch.Tensor] = {}
    for file in [files] if isinstance(files, (str, Path)) else files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = f.keys()  # safe_open is not iterable
                for key in names:
                    if key in tensors:
                        raise CheckpointError(f"{file}: tensor '{key}' also appears in another shard")
                    tensors[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged files
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc}); re-export it") from None
    return tensors


def read_safetensors_with_metadata(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the header's string metadata) of one file; a damaged file is one CheckpointError."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise CheckpointError(f"{file}: unreadable safetensors file ({exc}); re-export it") from None
    return read_safetensors(file), meta


def safetensors_shapes(files: list[Path] | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape from the headers only (no tensor data is read). safetensors checks when
    opening that the header's offsets fit the file, so these shapes are backed by real bytes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in [files] if isinstance(files, (str, Path)) else files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = f.keys()  # safe_open is not iterable
                for key in names:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged files
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc}); re-export it") from None
    return shapes


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: model.safetensors or the shards its index names."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map'; the index is damaged")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"{index}: names shard '{file.name}' which is missing; copy the whole folder"
                )
        return files
    for name in PICKLE_FILES:
        if (folder / name).exists():
            raise CheckpointError(
                f"{folder / name}: pickled weights are not loaded (they can run code); convert the "
                "checkpoint to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
            )
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}; not a Hugging Face model folder")
