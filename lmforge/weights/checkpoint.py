"""Training checkpoints: torch.distributed.checkpoint folders that are complete or absent.

Layout of `<checkpoint dir>/step_<N>/`:
  .metadata, __*.distcp   model and optimizer tensors (DCP: sharded by FSDP/TP, reshardable,
                          also written and read by a single process without a process group)
  rank_<r>.safetensors    per-rank RNG states: the tensors, and the plain values as JSON in its
                          header (nothing pickled; older checkpoints' rank_<r>.pt are still read,
                          with torch.load(weights_only=True))
  state.json              counters (the step: the LR schedule's position), scaler, loader state, the resolved config;
                          written last inside the folder
A checkpoint is written into `step_<N>.tmp-<id>`, synced, renamed to `step_<N>`, and only then is
`latest` (a one-line text file, replaced atomically) pointed at it. A crash at any moment leaves
the earlier checkpoints and `latest` untouched; `*.tmp-*` leftovers are removed on the next save
or resume. Only tensors go through DCP (optimizer hyper-parameters are not saved: on resume they
are the run config's, built into the optimizer it passes in; `save_checkpoint` refuses anything
else), so no checkpoint lmforge writes has a bytes entry, and one that declares any is refused:
DCP reads the index `safe_meta` vetted (SafeFileSystemReader), never unpickling it itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmforge.errors import CheckpointError
from lmforge.model.config import ModelConfig
from lmforge.weights.safe_meta import SafeFileSystemReader, tensor_shapes
from lmforge.weights.safetensors_io import read_safetensors_with_metadata, write_safetensors
from lmforge.weights.shapes import check_shapes, config_shapes, model_state_shapes
from lmforge.weights.torch_pickle import load_weights_only

STEP_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.json"
RANK_STATE_KEY = "lmforge_rank_state"
# Model config keys that do not change any tensor's shape; every other key must match on resume.
NON_SHAPE_KEYS = {
    "preset",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "norm_eps",
    "init_std",
    "dropout",
    "aux_loss_coef",
    "norm_topk_prob",
    "top_k",
}


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _agreed_tmp_name(step: int) -> str:
    token = [f"step_{step}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"]
    if _dist():
        dist.broadcast_object_list(token, src=0)
    return token[0]


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def is_complete(path: Path) -> bool:
    """The one rule: a checkpoint folder is complete when it holds state.json, written last."""
    return path.is_dir() and (path / STATE_FILE).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete step folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint: `latest` when it names one, unless a newer complete folder
    exists (a crash between the rename and the `latest` update); then the newest folder."""
    root = Path(root)
    complete = complete_checkpoints(root)
    pointer = root / "latest"
    named = None
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if STEP_RE.match(candidate.name) and is_complete(candidate):
            named = candidate
    if named is not None and (not complete or _step_of(named) >= _step_of(complete[-1])):
        return named
    return complete[-1] if complete else None


def _step_of(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def clean_temporaries(root: str | Path) -> None:
    """Remove half-written folders left by a crash (rank 0 only)."""
    root = Path(root)
    if _rank() != 0 or not root.is_dir():
        return
    for p in root.iterdir():
        if ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def resolve_checkpoint_dir(path: Path) -> Path | None:
    """The complete step folder `path` means: itself, the newest under it, or under its
    `checkpoints` folder (a run folder); None when it holds no training checkpoint."""
    path = Path(path)
    if is_complete(path):
        return path
    for base in (path, path / "checkpoints"):
        found = latest_checkpoint(base)
        if found is not None:
            return found
    if (path / "latest").is_file() or (path / "checkpoints" / "latest").is_file():
        raise CheckpointError(
            f"{path}: its `latest` names no complete checkpoint folder; pass a step_<N> folder"
        )
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """train.resume: auto (newest under root, or None), never, or a folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"train.resume: {resume} is not a complete checkpoint folder (step_<N> with state.json) or a folder "
        "holding them; pass one, or use train.resume=auto / never"
    )


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rank_state: dict,
    keep: int,
) -> Path:
    """Write step_<step> under root (all ranks call this). `state` must be JSON-serialisable;
    `rank_state` holds this rank's tensors/plain values. Returns the final folder."""
    root = Path(root)
    final = root / f"step_{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        clean_temporaries(root)
    tmp = root / _agreed_tmp_name(step)
    failure: BaseException | None = None
    try:
        if _rank() == 0:
            tmp.mkdir()
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
        _refuse_non_tensors(tensors, "")
        with quiet_single_process():
            dcp.save(tensors, checkpoint_id=str(tmp))
        _save_rank_state(rank_state, tmp / f"rank_{_rank()}.safetensors")
        _barrier()
        if _rank() == 0:
            full = dict(state, step=step)
            full["world_size"] = dist.get_world_size() if _dist() else 1
            full["saved_at"] = time.time()
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if "config" in state:
                _write_bytes_synced(
                    tmp / "config.yaml", yaml.safe_dump(state["config"], sort_keys=False).encode()
                )
            _write_bytes_synced(tmp / STATE_FILE, json.dumps(full, indent=1).encode())
            _fsync_dir(tmp)
            _publish(root, tmp, final)
            _prune(root, keep, final)
    except (OSError, dcp.api.CheckpointException) as exc:
        failure = exc
    if failure is not None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{final}: could not write the checkpoint ({_describe(failure)}); {_advice(failure)}"
        )
    _barrier()
    return final


def _refuse_non_tensors(tree: dict, prefix: str) -> None:
    """DCP pickles any non-tensor value (BytesStorageMetadata) and unpickles it on load, so a
    checkpoint lmforge writes holds tensors only; this is a programming error, not a user's."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _refuse_non_tensors(value, f"{prefix}{key}.")
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry {prefix}{key} is a {type(value).__name__}, not a tensor")


def _pack(value, tensors: dict[str, torch.Tensor]):
    """A JSON tree of `value` with each tensor replaced by {"tensor": name} (stored in `tensors`)."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": {str(k): _pack(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_pack(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"rank state holds a {type(value).__name__}; only tensors and plain values are saved")


def _unpack(node, tensors: dict[str, torch.Tensor]):
    ((kind, body),) = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: _unpack(v, tensors) for k, v in body.items()}
    if kind == "list":
        return [_unpack(v, tensors) for v in body]
    if kind == "value":
        return body
    raise ValueError(f"unknown node {kind!r}")


def _save_rank_state(rank_state: dict, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_pack(rank_state, tensors))
    write_safetensors(tensors, path, {RANK_STATE_KEY: tree})


def _load_rank_state(path: Path):
    """This rank's state from rank_<r>.safetensors (or an older checkpoint's rank_<r>.pt)."""
    new, old = path / f"rank_{_rank()}.safetensors", path / f"rank_{_rank()}.pt"
    if new.is_file():
        tensors, meta = read_safetensors_with_metadata(new)
        try:
            return _unpack(json.loads(meta[RANK_STATE_KEY]), tensors)
        except (KeyError, ValueError, TypeError, AttributeError):
            raise CheckpointError(f"{new}: not an lmforge rank state; pick another step folder") from None
    if old.is_file():  # torch's weights-only unpickler: an exact allow-list of tensor rebuilders
        return load_weights_only(old, "a checkpoint's RNG state")
    return None


def _publish(root: Path, tmp: Path, final: Path) -> None:
    if final.exists():  # a stale folder from an earlier run with train.resume=never
        old = root / f"{final.name}.tmp-old-{uuid.uuid4().hex[:6]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    pointer_tmp = root / f"latest.tmp-{os.getpid()}"
    _write_bytes_synced(pointer_tmp, (final.name + "\n").encode())
    os.replace(pointer_tmp, root / "latest")
    _fsync_dir(root)


def _prune(root: Path, keep: int, newest: Path) -> None:
    complete = [p for p in complete_checkpoints(root) if p != newest]
    for old in complete[: max(0, len(complete) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _root_causes(exc: BaseException) -> list[BaseException]:
    """DCP wraps per-rank failures as {rank: exception or (exception, traceback)}."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return [exc]
    found = []
    for value in failures.values():
        value = value[0] if isinstance(value, tuple) and value else value
        if isinstance(value, BaseException):
            found.append(value)
    return found or [exc]


def _is_disk_full(exc: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _root_causes(exc))


def _describe(exc: BaseException) -> str:
    if _is_disk_full(exc):
        return "no space left on device"
    cause = _root_causes(exc)[0]
    text = f"{type(cause).__name__}: {cause}".strip().splitlines()
    return text[0] if text else type(cause).__name__


def _advice(exc: BaseException) -> str:
    if _is_disk_full(exc):
        return "free disk space or lower checkpoint.keep; earlier checkpoints are intact"
    return "check the folder is writable; earlier checkpoints are intact"


# ---------------------------------------------------------------------------------------------
# Loading


def read_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no {STATE_FILE}); pick another step folder"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({exc}); pick another step folder") from None


def model_config_diff(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    """Dotted keys whose values differ and that change tensor shapes."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in NON_SHAPE_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            diffs += model_config_diff(a or {}, b or {}, f"{prefix}.{key}")
        elif a != b:
            diffs.append(f"{prefix}.{key} ({a} in checkpoint, {b} now)")
    return diffs


def _flat_shapes(tree: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    """Global shapes of a nested state dict under the dotted names DCP saves them with."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_shapes(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = tuple(value.shape)
    return out


def check_compatible(
    path: Path, model: torch.nn.Module, model_cfg: dict | None, saved_cfg: dict | None, optim_state=None, partial: bool = False
) -> None:
    """Refuse a checkpoint whose model (or optimizer state) differs in shape, naming the keys."""
    hint = "fix the model config to match it, or start a fresh run with train.resume=never"
    if model_cfg is not None and saved_cfg is not None:
        diffs = model_config_diff(saved_cfg, model_cfg)
        if diffs:
            raise CheckpointError(
                f"{path}: checkpoint model differs from this run's: {', '.join(diffs)}; {hint}"
            )
    saved = tensor_shapes(path, prefix="")  # vets the index: tensors only, backed by data files
    want = model_state_shapes(model)
    have = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    if partial:
        # A pipeline rank holds only its stages' tensors; every other tensor is checked on the rank
        # that holds it (and another layer count is caught by the config comparison above).
        have = {k: v for k, v in have.items() if k in want}
    check_shapes(have, want, path, "this run's model", hint)
    if optim_state is not None:
        # Every moment this optimizer reads must be saved with its parameter's shape.
        want = _flat_shapes(optim_state, "optim.state.")
        have = {k: v for k, v in saved.items() if k in want}
        check_shapes(have, want, path, "this run's optimizer state", hint)


def check_model_fits(path: str | Path, model_cfg: ModelConfig, what: str = "its recorded model config") -> None:
    """Before a model is allocated for a checkpoint: the shapes `model_cfg` implies (built on the
    meta device) must be the saved ones, which `tensor_shapes` has checked are backed by data."""
    check_shapes(tensor_shapes(path), config_shapes(model_cfg), path, what, "pick another step folder")


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    model_cfg: dict | None = None,
    partial: bool = False,
) -> tuple[dict, dict | None]:
    """Load model (and optimizer) in place; returns (state.json, this rank's rank_state or None).
    partial: `model` holds only some of the model's tensors (a pipeline rank's stages)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: checkpoint folder not found; check train.resume / train.load_checkpoint"
        )
    state = read_state(path)
    saved_cfg = (state.get("config") or {}).get("model")
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model), None
        target = {"model": model_sd}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
    check_compatible(path, model, model_cfg, saved_cfg, optim_sd["state"] if optim_sd else None, partial)
    try:
        with quiet_single_process():
            dcp.load(target, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(str(path)))
        if optimizer is None:
            set_model_state_dict(model, model_sd)
        else:
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    except CheckpointError:
        raise
    except (Exception, dcp.api.CheckpointException) as exc:  # noqa: BLE001 - damaged data files
        raise CheckpointError(
            f"{path}: cannot load the checkpoint ({_describe(exc)}); pick another step folder"
        ) from None
    rank_state = None
    if state.get("world_size") == (dist.get_world_size() if _dist() else 1):
        rank_state = _load_rank_state(path)
    return state, rank_state
