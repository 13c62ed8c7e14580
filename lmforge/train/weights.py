"""Weights-only files: safetensors exports of a live model and of a (sharded) training checkpoint.

`export_weights` is MiniMind's half-precision `pretrain_512.pth`, as safetensors (no pickle).
`consolidate` turns a DCP checkpoint written by any number of ranks into one safetensors file in a
single process: the model is built on the meta device, materialised empty on the CPU, filled by
`dcp.load` in no-process-group mode, and written out; the optimizer state is never read.
Both write `<file>.tmp-<pid>` and rename it, and put the model config in the file's metadata and
a run config in a `config.yaml` beside it (the form `lmforge.infer.load_weights` reads): the
checkpoint's full resolved config, or, when only the model config is known, the model plus a
`data.seq_len` within its positions, so the file loads with `load_config` as it stands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.config import config_for_model
from lmforge.errors import CheckpointError
from lmforge.interop.export import resolve_dtype


def model_state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Global tensor shapes of the model's state dict, under the names DCP saves them with."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: tuple(v.shape) for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}


def _write_safetensors(
    tensors: dict[str, torch.Tensor], out_file: Path, model_cfg: dict | None, run_cfg: dict | None = None
) -> Path:
    import yaml
    from safetensors.torch import save_file

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if model_cfg is not None:
        meta["lmforge_model_config"] = json.dumps(model_cfg)
    tmp = out_file.with_name(f"{out_file.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out_file)
        config_file = out_file.parent / "config.yaml"
        if model_cfg is not None and not config_file.exists():
            tmp_cfg = config_file.with_name(f"config.yaml.tmp-{os.getpid()}")
            tree = run_cfg if run_cfg is not None else config_for_model(model_cfg).model_dump(mode="json")
            tmp_cfg.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
            os.replace(tmp_cfg, config_file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"{out_file}: cannot write weights ({exc.strerror or exc}); free space or pick another path"
        ) from None
    return out_file


def plain_tensors(state: dict, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU tensors ready for safetensors, floating point ones cast to `dtype` (a name or a dtype)."""
    dtype = resolve_dtype(dtype)
    # Cloning breaks storage sharing (tied embeddings), which safetensors refuses to write.
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.clone().contiguous()
    return out


def export_weights(
    model: torch.nn.Module,
    path: str | Path,
    dtype: str | torch.dtype | None = "bfloat16",
    model_cfg: dict | None = None,
    run_cfg: dict | None = None,
) -> Path | None:
    """All ranks call this (gathering is collective); rank 0 writes. Returns the path on rank 0.
    `run_cfg` (the full resolved config) goes into config.yaml when given."""
    from lmforge.parallel import full_state_dict

    state = full_state_dict(model, cpu_offload=True)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    return _write_safetensors(plain_tensors(state, dtype), Path(path), model_cfg, run_cfg)


def load_model_state(ckpt_dir: str | Path):
    """(plain model state_dict on CPU, run Config) of a training checkpoint, in one process."""
    import torch.distributed.checkpoint as dcp

    from lmforge.config import config_from_dict
    from lmforge.model import Transformer
    from lmforge.train.checkpoint import quiet_single_process, read_state
    from lmforge.train.safe_meta import tensor_shapes

    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if "config" not in state:
        raise CheckpointError(
            f"{ckpt_dir}/state.json: no config recorded; this checkpoint cannot be consolidated"
        )
    cfg = config_from_dict(state["config"], f"{ckpt_dir}/state.json")
    saved = tensor_shapes(ckpt_dir)  # also vets the DCP index before dcp.load unpickles it
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    missing = [k for k in sd if k not in saved]
    if missing:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint lacks {', '.join(missing[:3])}; it was not written by this model"
        )
    try:
        # Inside a live process group, read this file alone rather than collectively.
        extra = {"no_dist": True} if dist.is_available() and dist.is_initialized() else {}
        with quiet_single_process():
            dcp.load({"model": sd}, checkpoint_id=str(ckpt_dir), **extra)
    # DCP's CheckpointException derives from BaseException, so `Exception` alone misses it.
    except (Exception, dcp.api.CheckpointException) as exc:  # noqa: BLE001 - I/O and shape errors
        raise CheckpointError(
            f"{ckpt_dir}: cannot read the checkpoint ({type(exc).__name__}); pick another step"
        ) from None
    return sd, cfg


def consolidate(ckpt_dir: str | Path, out_file: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """One safetensors file from a (possibly sharded) checkpoint, without a process group."""
    from lmforge.train.checkpoint import latest_checkpoint

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.json").is_file():
        found = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
        if found is None:
            raise CheckpointError(
                f"{ckpt_dir}: no complete checkpoint here; pass a step_<N> folder or a checkpoints folder"
            )
        ckpt_dir = found
    sd, cfg = load_model_state(ckpt_dir)
    return _write_safetensors(
        plain_tensors(sd, dtype),
        Path(out_file),
        cfg.model.model_dump(mode="json"),
        cfg.model_dump(mode="json"),  # the run's data.seq_len etc., valid for this model
    )
