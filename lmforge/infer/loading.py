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

import json
import shutil
import warnings
from pathlib import Path

import torch

from lmforge.config import Config, ModelConfig, config_for_model, config_from_dict, load_yaml
from lmforge.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_checkpoint(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / ".metadata").is_file()


def resolve_checkpoint_dir(path: Path) -> Path | None:
    """The complete step folder a training-checkpoint path means, or None if it is not one."""
    if _is_checkpoint(path):
        return path
    for base in (path, path / "checkpoints"):
        latest = base / "latest"
        if latest.is_file():
            name = latest.read_text(encoding="utf-8").strip()
            step = base / name
            if not _is_checkpoint(step):
                raise CheckpointError(f"{latest}: names '{name}', which is not a complete checkpoint folder")
            return step
    return None


def _run_config_from_yaml(path: Path) -> Config:
    tree = load_yaml(path)
    if "model" not in tree and "hidden_size" in tree:  # a bare model section
        tree = {"model": tree}
    if "data" not in tree and isinstance(tree.get("model"), dict):
        # A hand-written model-only file: keep the default seq_len within the model's positions.
        return config_for_model(tree["model"], str(path))
    return config_from_dict(tree, str(path))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, Path]:
    """(state_dict, run config, folder the weights came from) for any accepted path.

    Also used by the trainer for `train.load_checkpoint` (finetune from our weights or HF)."""
    path = Path(path)
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
        return _load_safetensors(path), cfg, path.parent
    step = resolve_checkpoint_dir(path)
    if step is not None:
        model, cfg = _model_from_checkpoint(step, torch.device("cpu"))
        return model.state_dict(), cfg, step
    if (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file():
        from lmforge.interop import import_hf

        state, model_cfg = import_hf(path)
        return state, config_for_model(model_cfg), path
    if (path / WEIGHTS_NAME).is_file():
        cfg = _run_config_from_yaml(_need(path / CONFIG_NAME, path / WEIGHTS_NAME))
        return _load_safetensors(path / WEIGHTS_NAME), cfg, path
    raise CheckpointError(
        f"{path}: no checkpoint here (expected state.json, a `latest` file, {WEIGHTS_NAME} + {CONFIG_NAME}, "
        "or an HF config.json); pass the folder training or `lmforge export` wrote"
    )


def _need(config: Path, weights: Path) -> Path:
    if not config.is_file():
        raise CheckpointError(f"{weights}: no {CONFIG_NAME} beside it; the model shape is unknown without it")
    return config


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc}); re-export it") from None


def build_model_from_state(model_cfg: ModelConfig, state: dict, device: torch.device, source: str | Path):
    """Instantiate the model on `device` and load `state` strictly; shape mismatches are user errors."""
    model = _empty_model(model_cfg, device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(
            f"{source}: weights do not fit the model config ({what}); the checkpoint is from a different model"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but the config needs "
                f"{tuple(expected[name].shape)}; the checkpoint is from a different model"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def find_tokenizer(folder: Path, cfg: Config):
    """The tokenizer saved with a checkpoint or export, or the run config's; None if there is none."""
    from lmforge.tokenizer import load_tokenizer

    candidates = [folder, *list(folder.parents)[:3]]
    for place in candidates:
        if any((place / name).is_file() for name in TOKENIZER_FILES[:2]):
            return load_tokenizer(place)
        if (place / "tokenizer").is_dir():
            return load_tokenizer(place / "tokenizer")
        if (place / "config.yaml").is_file() and place != folder and (place / "checkpoints").is_dir():
            break  # reached the run folder: do not wander into unrelated parents
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).exists():
        return load_tokenizer(cfg.tokenizer.path)
    return None


def _empty_model(model_cfg: ModelConfig, device: torch.device):
    from lmforge.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device=device)
    model.init_weights()  # also fills the non-persistent RoPE tables
    return model


def _model_from_checkpoint(step: Path, device: torch.device):
    """Build the model a training checkpoint describes and load its weights through the
    trainer's own loader (DCP, reshards from any world size)."""
    from lmforge.train.checkpoint import load_checkpoint, read_state

    saved = read_state(step).get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{step}: state.json holds no run config; the model shape is unknown")
    cfg = config_from_dict(saved, str(step / "state.json"))
    model = _empty_model(cfg.model, device)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_checkpoint(step, model, model_cfg=cfg.model.model_dump(mode="json"))
    return model.eval(), cfg


def load_model_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, ModelConfig, tokenizer or None) from any accepted path."""
    device = resolve_device(device)
    step = resolve_checkpoint_dir(Path(path)) if Path(path).is_dir() else None
    if step is not None:
        model, cfg = _model_from_checkpoint(step, device)
        return model, cfg.model, find_tokenizer(step, cfg)
    state, cfg, folder = load_weights(path)
    model = build_model_from_state(cfg.model, state, device, path)
    return model, cfg.model, find_tokenizer(folder, cfg)


def tokenizer_source(tokenizer) -> Path | None:
    """The folder (or lone file) a loaded tokenizer came from, for copying next to weights."""
    if tokenizer is None:
        return None
    src = Path(tokenizer.path)
    return src.parent if src.name == "tokenizer.json" else src


def copy_tokenizer(tokenizer, out: Path) -> None:
    """Copy the tokenizer's files into `out` so an export is usable on its own."""
    src = tokenizer_source(tokenizer)
    if src is None:
        return
    files = [src] if src.is_file() else [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    for f in files:
        shutil.copy2(f, out / f.name)


def save_weights(state: dict, cfg: Config, out: str | Path, dtype: str | None = None, tokenizer=None) -> Path:
    """Write `model.safetensors` + `config.yaml` (+ tokenizer files) to `out`, atomically."""
    from safetensors.torch import save_file

    from lmforge.train.weights import plain_tensors

    tensors = plain_tensors(state, dtype)  # checks the dtype name before anything is written
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "lmforge"})
    cfg.save(tmp / CONFIG_NAME)
    copy_tokenizer(tokenizer, tmp)
    (tmp / "lmforge.json").write_text(json.dumps({"kind": "weights", "dtype": dtype or "as-trained"}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
