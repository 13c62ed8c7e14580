"""lmforge's weights-only forms, and consolidation of a training checkpoint into one of them.

Two forms, both loadable by `lmforge.infer.load_weights` and as `train.load_checkpoint`:
- a folder: `model.safetensors` + `config.yaml` (+ the tokenizer files, + the lmforge marker),
  written by `lmforge export --format safetensors`, `lmforge import` and
  `lmforge checkpoint consolidate --out DIR`;
- a lone `.safetensors` file with `config.yaml` beside it (`consolidate --out FILE.safetensors`).
The model config also goes into the file's safetensors metadata. `config.yaml` is a loadable run
config: the checkpoint's full resolved config, or the model plus a `data.seq_len` within its
positions (config_for_model). Consolidation builds the model on the meta device, materialises
it empty on the CPU, fills it with `dcp.load` in no-process-group mode (any number of saving
ranks) and never reads the optimizer state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from lmforge.config import Config, config_from_dict
from lmforge.errors import CheckpointError
from lmforge.model import build
from lmforge.model.config import ModelConfig
from lmforge.weights.checkpoint import (
    check_model_fits,
    quiet_single_process,
    read_state,
    resolve_checkpoint_dir,
)
from lmforge.weights.outdir import check_output_file, output_dir
from lmforge.weights.safe_meta import SafeFileSystemReader
from lmforge.weights.safetensors_io import (
    WEIGHTS_NAME,
    plain_tensors,
    read_safetensors,
    safetensors_shapes,
    write_safetensors,
)
from lmforge.weights.shapes import check_shapes, config_shapes
from lmforge.weights.tokenizer_files import copy_tokenizer_files

CONFIG_NAME = "config.yaml"


def _metadata(cfg: Config) -> dict[str, str]:
    return {"lmforge_model_config": json.dumps(cfg.model.model_dump(mode="json"))}


def save_weights(
    state: dict, cfg: Config, out: str | Path, dtype=None, tokenizer_src: Path | None = None, overwrite=False
) -> Path:
    """The folder form: `model.safetensors` + `config.yaml` (+ tokenizer files) at `out`."""
    tensors = plain_tensors(state, dtype)  # checks the dtype name before anything is written
    with output_dir(out, overwrite, kind="weights", info={"dtype": str(dtype or "as-stored")}) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_NAME, _metadata(cfg))
        (tmp / CONFIG_NAME).write_text(cfg.to_yaml(), encoding="utf-8")
        copy_tokenizer_files(tokenizer_src, tmp)
    return Path(out).resolve()


def write_weights_file(state: dict, cfg: Config, out_file: str | Path, dtype=None, overwrite=False) -> Path:
    """The file form: `out_file` with `config.yaml` beside it, which is replaced only when it is
    absent, identical, or --overwrite is given (it is what makes the file loadable)."""
    out_file = check_output_file(out_file, overwrite)
    config_file = out_file.parent / CONFIG_NAME
    text = cfg.to_yaml()
    if config_file.is_file() and not overwrite and config_file.read_text(encoding="utf-8") != text:
        raise CheckpointError(
            f"{config_file}: already exists with another config; pass --overwrite, or write to a new folder"
        )
    write_safetensors(plain_tensors(state, dtype), out_file, _metadata(cfg))
    tmp = config_file.with_name(f"{CONFIG_NAME}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, config_file)
    return out_file


def read_weights_for(files: list[Path] | Path, model_cfg: ModelConfig, source) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (or shards) whose config claims `model_cfg`: the header's
    shapes are checked against the claim (a model built on the meta device) before any tensor is
    read, so a wrong or hostile config.yaml is one line, not an allocation of the model it claims."""
    check_shapes(
        safetensors_shapes(files),
        config_shapes(model_cfg),
        source,
        "the model config",
        "the config.yaml beside the weights is not theirs; restore the one exported with them",
    )
    return read_safetensors(files)


def load_model_state(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """(plain model state_dict on CPU, run Config) of a training checkpoint, in one process."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{ckpt_dir}/state.json: no run config recorded; the model shape is unknown")
    cfg = config_from_dict(state["config"], f"{ckpt_dir}/state.json")
    # Shapes first, on the meta device: state.json's claim must be what the data files hold
    # before a byte is allocated for it (the index is vetted there too).
    check_model_fits(ckpt_dir, cfg.model)
    model = build(cfg.model, "cpu")
    sd = model.state_dict()
    try:
        # Inside a live process group, read this checkpoint alone rather than collectively.
        extra = {"no_dist": True} if dist.is_available() and dist.is_initialized() else {}
        with quiet_single_process():
            reader = SafeFileSystemReader(str(ckpt_dir))
            dcp.load({"model": sd}, checkpoint_id=str(ckpt_dir), storage_reader=reader, **extra)
    # DCP's CheckpointException derives from BaseException, so `Exception` alone misses it.
    except CheckpointError:
        raise
    except (Exception, dcp.api.CheckpointException) as exc:  # noqa: BLE001 - I/O and shape errors
        raise CheckpointError(
            f"{ckpt_dir}: cannot read the checkpoint ({type(exc).__name__}); pick another step"
        ) from None
    return sd, cfg


def consolidate(
    ckpt_dir: str | Path, out: str | Path, dtype=None, overwrite=False, tokenizer_src=None
) -> Path:
    """One weights file or folder from a (possibly sharded) checkpoint, without a process group.
    `out` ending in .safetensors is the file form, anything else the folder form."""
    step = resolve_checkpoint_dir(Path(ckpt_dir)) if Path(ckpt_dir).is_dir() else None
    if step is None:
        raise CheckpointError(
            f"{ckpt_dir}: no complete checkpoint here; pass a step_<N> folder or a checkpoints folder"
        )
    sd, cfg = load_model_state(step)
    if str(out).endswith(".safetensors"):
        return write_weights_file(sd, cfg, out, dtype, overwrite)
    if tokenizer_src is None and cfg.tokenizer.path and Path(cfg.tokenizer.path).exists():
        tokenizer_src = Path(cfg.tokenizer.path)  # the folder form carries it: usable from anywhere
    return save_weights(sd, cfg, out, dtype, tokenizer_src, overwrite)
