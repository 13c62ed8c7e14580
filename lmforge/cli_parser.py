"""The argument parser of `lmforge <command>`: every command, flag and help text, in one place
(`lmforge/cli.py` holds the handlers that call the stage entry points)."""

from __future__ import annotations

import argparse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _sub(subparsers, name: str, help_text: str, description: str | None = None):
    return subparsers.add_parser(
        name, help=help_text, description=description or help_text, formatter_class=_Formatter
    )


def _bool_or_path(text: str) -> str:
    """MindFormers' --resume_training takes True/False or a checkpoint name."""
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return "auto"
    if low in ("false", "0", "no"):
        return "never"
    return text


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set >= p")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def _add_device_and_bos(p: argparse.ArgumentParser) -> None:
    """The inference commands' shared flags (eval, generate)."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put BOS before each text (default: as the model was trained, or the imported tokenizer's own rule)",
    )


# Same flag, same rule on every command that writes weights (lmforge.weights.outdir).
WEIGHTS_OVERWRITE_HELP = "write into a non-empty --out; only files lmforge wrote there are replaced"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Pretrain Llama-family language models, from a laptop CPU to many GPUs.",
        formatter_class=_Formatter,
    )
    from lmforge import __version__

    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _sub(sub, "demo", "fetch a corpus, train a tokenizer and a small model, evaluate, generate, export")
    p.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    p.add_argument("--corpus", default="demo", help="corpus name for `data fetch`")
    p.add_argument("--input", nargs="+", default=None, help="use these local text files instead of fetching")
    p.add_argument("--format", default="auto", help="--input's format: auto, txt, jsonl, paragraphs, wikitext, parquet")
    p.add_argument("--max-steps", type=int, default=None, help="override the demo config's train.max_steps")
    p.add_argument("--workers", type=int, default=2, help="processes for data preparation")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (for tests)")

    p = _sub(sub, "data", "fetch public corpora")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = _sub(data_sub, "fetch", "download and clean a named corpus into a folder of text files")
    q.add_argument("name", help="corpus name (see `lmforge data list`)")
    q.add_argument("--out", default="data/raw", help="destination folder")
    q.add_argument("--force", action="store_true", help="fetch again even when the folder is complete")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty folder lmforge did not write")
    _sub(data_sub, "list", "list the corpora `data fetch` knows")

    p = _sub(sub, "tokenizer", "train tokenizers")
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    q = _sub(tok_sub, "train", "train a byte-level BPE tokenizer on text files")
    q.add_argument("--input", nargs="+", required=True, help="text files, folders or globs")
    q.add_argument("--vocab-size", type=int, default=6400, help="vocabulary size (MiniMind uses 6400)")
    q.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    q.add_argument("--format", default="auto", help="input format: auto, txt, jsonl, parquet, ...")
    q.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet")
    q.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    q.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty folder lmforge did not write")

    p = _sub(sub, "prepare", "tokenize text into train/val token shards")
    p.add_argument("--input", nargs="+", required=True, help="text files, folders or globs, or MindRecord files")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or file")
    p.add_argument("--out", required=True, help="prepared dataset folder to write")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for validation")
    p.add_argument("--format", default="auto", help="input format: auto, txt, jsonl, parquet, wikitext, mindrecord, ...")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet")
    p.add_argument("--token-field", default="input_ids", help="MindRecord input: the field holding token ids")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping")
    p.add_argument("--dtype", default=None, choices=["uint16", "uint32"], help="shard dtype (from vocab)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a complete prepare of other inputs, or write into a non-empty folder (only lmforge's files are replaced)",
    )
    p.add_argument("--split", default=None, choices=["train", "val"], help="val: a validation-only folder")
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="local processes or Ray Data")
    p.add_argument("--address", default=None, help="Ray cluster: auto or HOST:PORT (default: a local Ray)")
    p.add_argument("--chunk-mb", type=float, default=64, help="input MB per work unit (resume granularity)")

    p = _sub(
        sub,
        "train",
        "train (or finetune, predict, eval) from a run config",
        "Train from a YAML run config. Positional key=value pairs override config keys "
        "(train.max_steps=100 model.num_layers=4).\nMindFormers' run_mindformer.py flags are accepted "
        "as aliases.",
    )
    p.add_argument("overrides", nargs="*", default=[], help="config overrides as dotted key=value")
    p.add_argument("--config", default=None, help="YAML run config (required unless --help-config)")
    p.add_argument(
        "--help-config",
        action="store_true",
        help="print the config tree with defaults (or --config's values)",
    )
    p.add_argument(
        "--run_mode",
        "--run-mode",
        default=None,
        choices=["train", "finetune", "predict", "eval"],
        help="sets run_mode: predict generates from train.sample_prompts, eval reports val perplexity",
    )
    p.add_argument("--train_dataset_dir", "--train-dataset-dir", default=None, help="sets data.train")
    p.add_argument("--load_checkpoint", "--load-checkpoint", default=None, help="sets train.load_checkpoint")
    p.add_argument(
        "--resume_training",
        "--resume-training",
        type=_bool_or_path,
        default=None,
        help="sets train.resume: True -> auto, False -> never, or a checkpoint path",
    )
    p.add_argument(
        "--use_parallel",
        "--use-parallel",
        default=None,
        help="accepted for MindFormers compatibility and ignored: parallelism comes from the config's "
        "parallel section and torchrun's environment (WORLD_SIZE, RANK)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build and run one step of every pipeline rank's role at full shape on a fake process group "
        "(no GPU, no data): memory by category vs the planner, collectives per step",
    )
    p.add_argument("--world-size", type=int, default=None, help="--dry-run: ranks to simulate (default: WORLD_SIZE or 1)")
    p.add_argument("--gpu-memory", type=float, default=None, help="--dry-run: GiB per GPU; a rank above it is an error")
    p.add_argument("--json", default=None, help="--dry-run: write one record per simulated rank to this file")

    p = _sub(sub, "eval", "validation perplexity of a checkpoint, or lm-eval benchmarks with --tasks")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, weights export or HF folder")
    p.add_argument("--data", nargs="+", default=None, help="prepared dataset folder, or raw text files (perplexity)")
    p.add_argument(
        "--tasks",
        default=None,
        help="lm-eval tasks, groups or tags, comma-separated (e.g. arc_easy,hellaswag); needs lmforge[eval]",
    )
    p.add_argument("--limit", type=float, default=None, help="--tasks: at most this many items per task (<1: a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's)")
    p.add_argument(
        "--include-path",
        action="append",
        default=None,
        help="--tasks: a folder of your own task YAMLs (e.g. over local JSONL, for offline use); repeatable",
    )
    p.add_argument("--out", default=None, help="--tasks: write lm-eval's results JSON here")
    p.add_argument("--log-samples", action="store_true", help="--tasks: put every item's scores in the --out JSON")
    p.add_argument("--dtype", default=None, help="--tasks: float32, bfloat16 or float16 (default: the weights')")
    p.add_argument("--split", default="val", help="split of a prepared folder")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's seq_len)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    _add_device_and_bos(p)

    p = _sub(sub, "generate", "sample text from a checkpoint, streamed as it is produced")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, weights export or HF folder")
    p.add_argument("--prompt", default="", help="prompt text")
    _add_sampling(p)
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin in a loop")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or file (default: the one saved with the weights or the run's)"
    )
    _add_device_and_bos(p)

    p = _sub(sub, "export", "write a checkpoint as a Hugging Face folder, safetensors weights, GGUF or MiniMind .pth")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or weights export")
    p.add_argument(
        "--format", default="hf", choices=["hf", "safetensors", "gguf", "minimind"], help="output format"
    )
    p.add_argument("--out", required=True, help="output folder (a .gguf file for --format gguf)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or file (default: the one saved with the weights or the run's)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
        help="weight dtype (gguf: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0; q4_k_m, q5_k_m, q6_k with the llamacpp extra; minimind: float16 default)",
    )
    p.add_argument("--overwrite", action="store_true", help=WEIGHTS_OVERWRITE_HELP)

    p = _sub(sub, "import", "convert a Hugging Face folder, a GGUF file or a MiniMind .pth into lmforge weights")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="folder with config.json and *.safetensors")
    source.add_argument("--gguf", help="a .gguf file (llama.cpp llama / qwen3 / qwen3moe)")
    source.add_argument("--minimind", help="a MiniMind .pth state dict (as its trainer saves it)")
    p.add_argument("--minimind-config", default=None, help="MiniMind's config.json, to check shapes against")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder to copy along (--minimind)")
    p.add_argument("--out", required=True, help="output folder (usable as --checkpoint / load_checkpoint)")
    p.add_argument("--overwrite", action="store_true", help=WEIGHTS_OVERWRITE_HELP)

    p = _sub(sub, "model-info", "parameter counts and FLOPs per token of model presets")
    p.add_argument("names", nargs="+", help="preset names")

    p = _sub(sub, "plan", "memory and throughput plan for a config on N GPUs")
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-type", default="H100", help="H100, H200, A100-40, A100-80, B200, MI300X, Ascend-910B, ...")
    p.add_argument("--gpu-memory", type=float, default=None, help="memory per GPU in GiB (default: the GPU type's)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="also dry-run the config's own layout on --gpus ranks (lmforge train --dry-run) and check it fits",
    )

    p = _sub(sub, "config", "run config tools")
    cf_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = _sub(cf_sub, "convert", "write a MindFormers run config (YAML) as an lmforge run config")
    q.add_argument("source", help="MindFormers YAML (pretrain_llama2_7b.yaml, ...)")
    q.add_argument("--out", required=True, help="lmforge YAML to write")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = _sub(sub, "report", "redraw a run's plots and print its summary")
    p.add_argument("run_dir", help="runs/<name> folder")

    p = _sub(sub, "checkpoint", "checkpoint tools")
    ck_sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    q = _sub(ck_sub, "consolidate", "merge a (sharded) checkpoint into one safetensors weights file")
    q.add_argument("dir", help="checkpoint folder")
    q.add_argument("--out", required=True, help="output folder, or a .safetensors file (config.yaml beside it)")
    q.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weight dtype")
    q.add_argument("--overwrite", action="store_true", help=WEIGHTS_OVERWRITE_HELP)
    return parser
