"""Inference: generate with the KV cache, evaluate perplexity, the eval/generate/export/import
commands. Loading weights of any form lives in lmforge.interop.loading (re-exported here)."""

from lmforge.infer.commands import (
    evaluate_checkpoint,
    evaluate_from_config,
    export_checkpoint,
    generate_from_checkpoint,
    import_hf_folder,
    predict_from_config,
)
from lmforge.infer.evaluate import evaluate
from lmforge.infer.generate import filter_logits, generate, sample_next
from lmforge.interop.loading import load_model_for_inference, load_weights, save_weights

__all__ = [
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_from_config",
    "export_checkpoint",
    "filter_logits",
    "generate",
    "generate_from_checkpoint",
    "import_hf_folder",
    "load_model_for_inference",
    "load_weights",
    "predict_from_config",
    "sample_next",
    "save_weights",
]
