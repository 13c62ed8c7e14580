"""The weights folder an import writes (`lmforge import --hf/--gguf/--minimind`): the weights,
a finetune-ready config.yaml and the tokenizer files."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig, config_for_model
from lmforge.weights.dtypes import DTYPES, dtype_name
from lmforge.weights.files import save_weights


def finetune_ready_config(model_cfg: ModelConfig, state: dict[str, torch.Tensor], out: Path, tokenizer: bool):
    """The run config written beside imported weights: it names these weights
    (train.load_checkpoint) and the tokenizer copied next to them by absolute path, and exports
    in the dtype the weights came in when they share one (fp32 stays fp32), so
    `lmforge train --config OUT/config.yaml --run_mode finetune data.train=...` runs as it is."""
    cfg = config_for_model(model_cfg)
    here = Path(out).resolve()
    updates: dict[str, Any] = {"train": cfg.train.model_copy(update={"load_checkpoint": str(here)})}
    if tokenizer:
        updates["tokenizer"] = cfg.tokenizer.model_copy(update={"path": str(here)})
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(stored) == 1 and stored <= set(DTYPES.values()):
        updates["checkpoint"] = cfg.checkpoint.model_copy(update={"export_dtype": dtype_name(stored.pop())})
    return cfg.model_copy(update=updates)


def write_weights_folder(
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    files: dict[str, str | bytes],
    out: str | Path,
    overwrite: bool = False,
    tokenizer_src: Path | None = None,
) -> Path:
    """`out/` in lmforge's weights-folder form (model.safetensors + finetune-ready config.yaml +
    tokenizer files: `files` written out, or copied from `tokenizer_src`), loadable by
    eval/generate/finetune/export; lmforge.weights owns the writing (temp sibling, refuses a
    folder it did not write unless overwrite)."""
    has_tokenizer = bool(files) or tokenizer_src is not None
    run_cfg = finetune_ready_config(cfg, state, Path(out), has_tokenizer)
    with tempfile.TemporaryDirectory(prefix="lmforge-tok-") as tok_dir:
        for name, text in files.items():
            target = Path(tok_dir) / name
            target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text, encoding="utf-8")
        src = Path(tok_dir) if files else tokenizer_src
        return save_weights(state, run_cfg, out, tokenizer_src=src, overwrite=overwrite)
