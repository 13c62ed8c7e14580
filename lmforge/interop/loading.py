"""Find and load model weights for inference, export and import, whatever form they are in.

Accepted paths (checked in this order):
- a training checkpoint: a `step_N` folder (state.json + torch.distributed.checkpoint files), a
  run's `checkpoints` folder with a `latest` file, or the run folder `runs/<name>` itself;
- a weights export: a folder with `model.safetensors` and `config.yaml`, or a `.safetensors`
  file with `config.yaml` beside it (what `lmforge export --format safetensors` and
  `lmforge import` write);
- a Hugging Face folder: `config.json` + `*.safetensors` (read through lmforge.interop.import_hf).

The tokenizer is looked for in the folder itself, then its parents up to the run folder, then at
the run config's `tokenizer.path`. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config import Config, ModelConfig, config_for_model, config_from_dict, load_yaml
from lmforge.errors import CheckpointError
from lmforge.interop.import_ import import_hf
from lmforge.model import build
from lmforge.tokenizer import load_tokenizer
from lmforge.weights import files
from lmforge.weights.checkpoint import check_model_fits, load_checkpoint, read_state, resolve_checkpoint_dir
from lmforge.weights.files import CONFIG_NAME
from lmforge.weights.safetensors_io import WEIGHTS_NAME
from lmforge.weights.shapes import check_shapes, config_shapes, state_shapes
from lmforge.weights.tokenizer_files import holds_tokenizer


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _run_config_from_yaml(path: Path) -> Config:
    tree = load_yaml(path)
    if "model" not in tree and "hidden_size" in tree:  # a bare model section
        tree = {"model": tree}
    if "data" not in tree and isinstance(tree.get("model"), dict):
        # A hand-written model-only file: keep the default seq_len within the model's positions.
        return config_for_model(tree["model"], str(path))
    return config_from_dict(tree, str(path))


def _accepted_path(path: str | Path) -> Path:
    """A checkpoints folder's `latest` pointer file stands for the folder (users pass it by hand)."""
    path = Path(path)
    return path.parent if path.is_file() and path.name == "latest" else path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, Path]:
    """(state_dict, run config, folder the weights came from) for any accepted path.

    Also used by the trainer for `train.load_checkpoint` (finetune from our weights or HF)."""
    path = _accepted_path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: checkpoint not found; pass a checkpoint folder, a weights export or an HF folder"
        )
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: not a .safetensors weights file; pass a checkpoint folder or export"
            )
        cfg = _run_config_from_yaml(_need(path.parent / CONFIG_NAME, path))
        return files.read_weights_for(path, cfg.model, path), cfg, path.parent
    step = resolve_checkpoint_dir(path)
    if step is not None:
        model, cfg = _model_from_checkpoint(step, torch.device("cpu"))
        return model.state_dict(), cfg, step
    if (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file():
        state, model_cfg = import_hf(path)
        return state, config_for_model(model_cfg), path
    if (path / WEIGHTS_NAME).is_file():
        cfg = _run_config_from_yaml(_need(path / CONFIG_NAME, path / WEIGHTS_NAME))
        return files.read_weights_for(path / WEIGHTS_NAME, cfg.model, path / WEIGHTS_NAME), cfg, path
    raise CheckpointError(
        f"{path}: no checkpoint here (expected state.json, a `latest` file, {WEIGHTS_NAME} + {CONFIG_NAME}, "
        "or an HF config.json); pass the folder training or `lmforge export` wrote"
    )


def _need(config: Path, weights: Path) -> Path:
    if not config.is_file():
        raise CheckpointError(f"{weights}: no {CONFIG_NAME} beside it; the model shape is unknown without it")
    return config


def build_model_from_state(model_cfg: ModelConfig, state: dict, device: torch.device, source: str | Path):
    """Instantiate the model on `device` and load `state` strictly; shape mismatches are user errors,
    found on the meta device before the model is allocated."""
    check_shapes(
        state_shapes(state),
        config_shapes(model_cfg),
        source,
        "the model config",
        "the checkpoint is from a different model",
    )
    model = build(model_cfg, device)  # parameters left empty: the strict load fills every one
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def find_tokenizer(folder: Path, cfg: Config):
    """The tokenizer saved with a checkpoint or export, or the run config's; None if there is none."""

    candidates = [folder, *list(folder.parents)[:3]]
    for place in candidates:
        if holds_tokenizer(place):
            return load_tokenizer(place)
        if (place / "tokenizer").is_dir():
            return load_tokenizer(place / "tokenizer")
        if (place / "config.yaml").is_file() and place != folder and (place / "checkpoints").is_dir():
            break  # reached the run folder: do not wander into unrelated parents
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).exists():
        return load_tokenizer(cfg.tokenizer.path)
    return None


def _model_from_checkpoint(step: Path, device: torch.device):
    """Build the model a training checkpoint describes and load its weights (DCP, reshards from
    any world size)."""
    saved = read_state(step).get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{step}: state.json holds no run config; the model shape is unknown")
    cfg = config_from_dict(saved, str(step / "state.json"))
    check_model_fits(step, cfg.model)  # state.json's claim against the data, before allocating it
    model = build(cfg.model, device)  # parameters left empty: DCP fills every one
    load_checkpoint(step, model, model_cfg=cfg.model.model_dump(mode="json"))
    return model.eval(), cfg


def load_model_for_inference(path: str | Path, device: str | torch.device = "cpu", run_config: bool = False):
    """(model in eval mode, ModelConfig, tokenizer or None) from any accepted path; with
    run_config=True the whole run Config in place of the ModelConfig."""
    device = resolve_device(device)
    path = _accepted_path(path)
    step = resolve_checkpoint_dir(path) if path.is_dir() else None
    if step is not None:
        model, cfg = _model_from_checkpoint(step, device)
        return model, cfg if run_config else cfg.model, find_tokenizer(step, cfg)
    state, cfg, folder = load_weights(path)
    model = build_model_from_state(cfg.model, state, device, path)
    return model, cfg if run_config else cfg.model, find_tokenizer(folder, cfg)


def tokenizer_source(tokenizer) -> Path | None:
    """The folder (or lone file) a loaded tokenizer came from, for copying next to weights."""
    if tokenizer is None:
        return None
    src = Path(tokenizer.path)
    return src.parent if src.name == "tokenizer.json" else src


def save_weights(
    state: dict,
    cfg: Config,
    out: str | Path,
    dtype: str | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write `model.safetensors` + `config.yaml` (+ the tokenizer's files) as the folder `out`."""
    return files.save_weights(state, cfg, out, dtype, tokenizer_source(tokenizer), overwrite)
