"""What `lmforge eval|generate|export|import` and run modes predict/eval do, above the CLI's parsing."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from lmforge.config import Config, config_for_model
from lmforge.data.token_dataset import TokenDataset
from lmforge.errors import LmforgeError
from lmforge.infer.bos import describe_bos, use_bos
from lmforge.infer.evaluate import evaluate, fmt_ppl, text_token_stream
from lmforge.infer.generate import TextStreamer, encode_prompt, generate
from lmforge.interop import export_gguf, export_hf, export_minimind, import_hf
from lmforge.interop.folder import finetune_ready_config
from lmforge.interop.loading import (
    CONFIG_NAME,
    build_model_from_state,
    find_tokenizer,
    load_model_for_inference,
    load_weights,
    resolve_device,
    save_weights,
    tokenizer_source,
)
from lmforge.interop.minimind import minimind_script_differences
from lmforge.tokenizer import load_tokenizer
from lmforge.weights.outdir import check_output_dir
from lmforge.weights.shapes import check_shapes, config_shapes


def _need_tokenizer(tokenizer, checkpoint, also: str = "") -> None:
    if tokenizer is None:
        raise LmforgeError(
            f"{checkpoint}: no tokenizer found next to the checkpoint or at the run config's tokenizer.path; "
            f"copy tokenizer.json into the checkpoint folder{also}"
        )


def given_tokenizer(path, model_vocab: int, found):
    """`--tokenizer PATH` (generate, export) in place of the one found with the weights; None
    keeps `found`. Refused when it has ids the model has no row for."""
    if path is None:
        return found
    tok = load_tokenizer(path)
    if tok.vocab_size > model_vocab:
        raise LmforgeError(
            f"{path}: tokenizer has {tok.vocab_size} ids but the model's vocabulary is {model_vocab}; "
            "pass the --tokenizer the model was trained with"
        )
    return tok


def open_eval_data(data: list[str] | str, split: str, tokenizer, vocab_size: int, bos: bool = True, counts=None):
    """A TokenDataset for a prepared folder, or a token stream for raw text files (BOS first in
    each document when `bos`; `counts` gets what was counted)."""
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if len(paths) == 1 and Path(paths[0]).is_dir() and (Path(paths[0]) / "meta.json").exists():
        fingerprint = tokenizer.fingerprint if tokenizer is not None else None
        if counts is not None:
            counts["what"] = f"{split} split of {paths[0]} as prepared (each document BOS + tokens + EOS)"
        return TokenDataset.open(paths[0], split=split, expect_fingerprint=fingerprint, vocab_size=vocab_size)
    for p in paths:
        if Path(p).is_dir() and not any(Path(p).iterdir()):
            raise LmforgeError(
                f"{p}: empty folder; pass a prepared dataset folder (with meta.json) or text files"
            )
    _need_tokenizer(tokenizer, "--data is raw text")
    stream = text_token_stream([str(p) for p in paths], tokenizer, bos=bos, counts=counts)
    if counts is not None:
        start = "BOS + " if bos and tokenizer.bos_id is not None else ""
        counts["what"] = f"{counts['documents']} documents, each {start}tokens + EOS"
    return stream


def check_run_model(run_cfg: Config, model_cfg, checkpoint) -> None:
    """Refuse weights whose tensor shapes differ from the model a run config describes (predict and
    eval modes), instead of silently using a model other than the one the config names."""
    check_shapes(
        config_shapes(model_cfg),
        config_shapes(run_cfg.model),
        checkpoint,
        "the run config's model",
        "make model: in the config match the checkpoint, or use lmforge generate/eval --checkpoint",
    )


def evaluate_checkpoint(
    checkpoint,
    data,
    split="val",
    batch_size=8,
    seq_len=None,
    max_batches=None,
    device="auto",
    run_cfg: Config | None = None,
    bos: bool | None = None,
) -> dict:
    """Loss and perplexity; the result's "counted" says what the tokens were (documents, BOS/EOS)."""
    for p in [data] if isinstance(data, (str, Path)) else data:
        if not Path(p).exists():
            raise LmforgeError(f"{p}: evaluation data not found; pass a prepared folder or text files")
    state, cfg, folder = load_weights(checkpoint)
    if run_cfg is not None:
        check_run_model(run_cfg, cfg.model, checkpoint)
    dev = resolve_device(device)
    model = build_model_from_state(cfg.model, state, dev, checkpoint)
    tokenizer = find_tokenizer(folder, cfg)
    counts: dict = {}
    with_bos = use_bos(tokenizer, cfg, bos)
    dataset = open_eval_data(data, split, tokenizer, cfg.model.vocab_size, bos=with_bos, counts=counts)
    seq_len = seq_len or min(cfg.data.seq_len, cfg.model.max_position_embeddings - 1)
    result = evaluate(
        model, dataset, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches, device=dev
    )
    raw = "documents" in counts
    rule = f"; {describe_bos(with_bos, bos, cfg)}" if raw else ""
    result["counted"] = f"{counts['what']}{rule}; {result['tokens']} predicted tokens in windows of {seq_len}"
    return result


def _print_generation(model, tokenizer, prompt, out=None, bos: bool = True, **sampling) -> str:
    out = out or sys.stdout  # looked up per call: tests and callers may redirect sys.stdout
    streamer = TextStreamer(tokenizer, lambda piece: (out.write(piece), out.flush()))
    out.write(prompt)
    out.flush()
    generate(model, encode_prompt(tokenizer, prompt, bos), eos_id=tokenizer.eos_id, stream=streamer, **sampling)
    text = streamer.finish()
    out.write("\n")
    out.flush()
    return text


def _read_prompt() -> str | None:
    """The next prompt line, None at end of input. Only a terminal gets the "> " prompt (with
    line editing); piped input must not leave prompt markers in the generated text on stdout."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """`lmforge generate`'s sampling flags, refused in one line when out of range (or NaN)."""
    if not temperature >= 0 or math.isinf(temperature):
        raise LmforgeError(f"--temperature {temperature}: must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise LmforgeError(f"--top-k {top_k}: must be >= 1; leave it out to keep every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise LmforgeError(f"--top-p {top_p}: must be in (0, 1]; leave it out to keep every token")


def generate_from_checkpoint(
    checkpoint,
    prompt="",
    max_new_tokens=128,
    temperature=0.8,
    top_k=None,
    top_p=None,
    seed=None,
    interactive=False,
    device="auto",
    out=None,
    bos: bool | None = None,
    tokenizer=None,
) -> None:
    out = out or sys.stdout
    check_sampling(temperature, top_k, top_p)  # before the (slow) load
    model, cfg, found = load_model_for_inference(checkpoint, resolve_device(device), run_config=True)
    tokenizer = given_tokenizer(tokenizer, cfg.model.vocab_size, found)
    _need_tokenizer(tokenizer, checkpoint, "; or pass --tokenizer FOLDER")
    sampling = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        bos=use_bos(tokenizer, cfg, bos),
    )
    if not interactive:
        _print_generation(model, tokenizer, prompt, out, **sampling)
        return
    print("enter a prompt (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        line = _read_prompt()
        if line is None or not line.strip():
            return
        _print_generation(model, tokenizer, line, out, **sampling)


def export_checkpoint(checkpoint, out, fmt="hf", dtype=None, overwrite=False, tokenizer=None) -> Path:
    """`tokenizer`: a folder or file to ship with the export instead of the one found with the weights."""
    if fmt in ("gguf", "minimind"):
        return _export_gguf_or_minimind(checkpoint, out, fmt, dtype, overwrite, tokenizer)
    if fmt not in ("hf", "safetensors"):
        raise LmforgeError(f"export: unknown format '{fmt}'; use hf or safetensors")
    check_output_dir(out, overwrite)  # refuse before the (slow) load
    state, cfg, folder = load_weights(checkpoint)
    tokenizer = given_tokenizer(tokenizer, cfg.model.vocab_size, None) or find_tokenizer(folder, cfg)
    dtype = dtype or cfg.checkpoint.export_dtype
    if fmt == "safetensors":
        return save_weights(state, cfg, out, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)

    # A model lmforge trained saw BOS before every document: the export tokenizes the same way
    # (an imported model's tokenizer files go out as they came in).
    return export_hf(
        state,
        cfg.model,
        out,
        dtype=dtype,
        tokenizer=tokenizer_source(tokenizer),
        overwrite=overwrite,
        add_bos=bool(cfg.data.train) and use_bos(tokenizer, cfg, None),
    )


def _export_gguf_or_minimind(checkpoint, out, fmt, dtype, overwrite, tokenizer=None) -> Path:
    """GGUF (one file for llama.cpp, f16 unless asked) or MiniMind (.pth + config.json, fp16 like
    MiniMind's trainer); the tokenizer given, or found with the weights, goes along."""
    state, cfg, folder = load_weights(checkpoint)
    tokenizer = given_tokenizer(tokenizer, cfg.model.vocab_size, None) or find_tokenizer(folder, cfg)
    if fmt == "gguf":
        return export_gguf(state, cfg.model, tokenizer, out, dtype=dtype or "f16", overwrite=overwrite)
    path = export_minimind(
        state, cfg.model, out, dtype=dtype or "float16", tokenizer=tokenizer, overwrite=overwrite
    )
    for line in minimind_script_differences(cfg.model):
        print(  # `line` is "key=this model's value (MiniMind default value)"
            f"note: MiniMind's trainer scripts build MiniMindConfig from its defaults, and this model has "
            f"{line}; pass that value to MiniMindConfig there",
            file=sys.stderr,
        )
    return path


def import_hf_folder(hf_dir, out, overwrite=False) -> Path:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise LmforgeError(f"{hf_dir}: no config.json; pass a Hugging Face model folder")
    check_output_dir(out, overwrite)  # refuse before the (slow) import

    state, model_cfg = import_hf(hf_dir)
    cfg = config_for_model(model_cfg)
    tokenizer = find_tokenizer(hf_dir, cfg)
    # The config.yaml written beside the weights is the starting point of a finetune (the same
    # one `lmforge import --gguf/--minimind` writes).
    cfg = finetune_ready_config(model_cfg, state, Path(out), tokenizer is not None)
    return save_weights(state, cfg, out, dtype=None, tokenizer=tokenizer, overwrite=overwrite)


def _checkpoint_of(cfg: Config) -> str:
    """The weights a predict/eval run uses: train.load_checkpoint, a resume path, or the run's latest."""
    if cfg.train.load_checkpoint:
        return cfg.train.load_checkpoint
    if cfg.train.resume not in ("auto", "never"):
        return cfg.train.resume
    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.run.out_dir) / cfg.run.name / "checkpoints")
    if not (ckpt_dir / "latest").is_file():
        raise LmforgeError(
            f"{ckpt_dir}: no checkpoint to {cfg.run_mode} with; train first or pass --load_checkpoint DIR"
        )
    return str(ckpt_dir)


def predict_from_config(cfg: Config, out=None) -> list[str]:
    """run_mode predict: generate from train.sample_prompts (MindFormers' predict), sampling with
    train.predict_temperature / predict_top_k."""
    out = out or sys.stdout
    checkpoint = _checkpoint_of(cfg)
    model, weights_cfg, tokenizer = load_model_for_inference(
        checkpoint, resolve_device(cfg.train.device), run_config=True
    )
    check_run_model(cfg, weights_cfg.model, checkpoint)
    if tokenizer is None and cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    _need_tokenizer(tokenizer, checkpoint)
    bos = use_bos(tokenizer, weights_cfg, None)  # the same rule as `lmforge generate` on these weights
    texts = []
    for i, prompt in enumerate(cfg.train.sample_prompts):
        texts.append(
            _print_generation(
                model,
                tokenizer,
                prompt,
                out,
                max_new_tokens=cfg.train.sample_max_new_tokens,
                temperature=cfg.train.predict_temperature,
                top_k=cfg.train.predict_top_k,
                seed=cfg.run.seed + i,
                bos=bos,
            )
        )
    return texts


def evaluate_from_config(cfg: Config, out=None) -> dict:
    """run_mode eval: loss and perplexity on the run's validation data."""
    out = out or sys.stdout
    if cfg.data.valid and len(cfg.data.valid) > 1:
        raise LmforgeError(
            f"data.valid: run_mode eval reports one folder, got {len(cfg.data.valid)}; "
            "evaluate each with lmforge eval --checkpoint CKPT --data FOLDER"
        )
    if cfg.data.valid:
        data = cfg.data.valid[0]
    elif cfg.data.train:
        data = cfg.data.train[0].path
    else:
        raise LmforgeError(f"{CONFIG_NAME}: data.train and data.valid are empty; nothing to evaluate on")
    result = evaluate_checkpoint(
        _checkpoint_of(cfg),
        data,
        split="val",
        batch_size=cfg.micro_batch_size(1),
        seq_len=cfg.data.seq_len,
        device=cfg.train.device,
        run_cfg=cfg,
    )
    print(f"loss {result['loss']:.4f}  perplexity {fmt_ppl(result['ppl'])}  tokens {result['tokens']}", file=out)
    return result
