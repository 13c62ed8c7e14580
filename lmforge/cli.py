"""`lmforge <command>`: parses arguments and calls the stage entry points (docs/internals.md).

User errors (`LmforgeError`) print `error: <message>` on stderr and exit 2 without a traceback;
Ctrl-C exits 130. Every other exception is a bug and keeps its traceback. Stage modules are
imported inside the handlers so `--help` stays fast and one stage's import cost is not paid by
another's command.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.cli_parser import build_parser
from lmforge.errors import LmforgeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------------------------
# Handlers: each one calls a stage entry point and prints its result.


def _train_config(args):
    from lmforge.config import Config, apply_overrides, config_from_dict, load_yaml, parse_overrides
    from lmforge.mindformers import convert_if_mindformers, print_once

    overrides = parse_overrides(args.overrides)
    if args.config is None and not args.help_config:
        raise LmforgeError("train: --config FILE is required (see configs/ for examples)")
    tree = load_yaml(args.config) if args.config else {}
    source = args.config or "<defaults>"
    tree = convert_if_mindformers(tree, source, report=print_once)
    aliases = [
        ("run_mode", args.run_mode),
        ("data.train", [args.train_dataset_dir] if args.train_dataset_dir else None),
        ("train.load_checkpoint", args.load_checkpoint),
        ("train.resume", args.resume_training),
    ]
    for note in apply_overrides(tree, overrides + [(k, v) for k, v in aliases if v is not None], source):
        print_once(f"note: {note}")
    if overrides:
        source += " (with overrides)"
    if not tree and args.help_config:
        return Config()
    return config_from_dict(tree, source)


def cmd_train(args) -> None:
    cfg = _train_config(args)
    if args.dry_run:
        from lmforge.parallel.distributed import launch_env
        from lmforge.train.dryrun import dry_run

        world = args.world_size or launch_env().world_size
        dry_run(cfg, world, args.gpu_memory, args.json)
        return
    if args.help_config:
        print("# lmforge run config (every key, with its value or default)")
        print(cfg.help_yaml(), end="")
        return
    if cfg.run_mode == "predict":
        from lmforge.infer import predict_from_config

        predict_from_config(cfg)
    elif cfg.run_mode == "eval":
        from lmforge.infer import evaluate_from_config

        evaluate_from_config(cfg)
    else:
        from lmforge.train.trainer import run_training

        run_training(cfg)


def cmd_demo(args) -> None:
    from lmforge.demo import run_demo

    run_demo(
        out_dir=args.out,
        corpus=args.corpus,
        inputs=args.input,
        max_steps=args.max_steps,
        workers=args.workers,
        quick=args.quick,
        fmt=args.format,
    )


def cmd_data(args) -> None:
    from lmforge.data import fetch

    if args.data_command == "list":
        for name, description in fetch.list_corpora():
            print(f"{name:24s} {description}")
    else:
        print(fetch.fetch_corpus(args.name, args.out, force=args.force, overwrite=args.overwrite))


def cmd_tokenizer(args) -> None:
    from lmforge.tokenizer import train_tokenizer

    out = train_tokenizer(
        args.input,
        args.vocab_size,
        args.out,
        fmt=args.format,
        text_field=args.text_field,
        max_docs=args.max_docs,
        strict=args.strict,
        overwrite=args.overwrite,
    )
    print(out)


def cmd_prepare(args) -> None:
    from lmforge.data.mindrecord import is_mindrecord
    from lmforge.data.prepare import prepare_dataset

    if not 0 < args.chunk_mb < float("inf"):  # also NaN: a unit must hold some input
        raise LmforgeError(f"--chunk-mb {args.chunk_mb:g}: must be a positive number of MB (default 64)")
    if args.format == "mindrecord" or (args.format == "auto" and all(map(is_mindrecord, args.input))):
        from lmforge.data.mindrecord_prepare import prepare_mindrecord

        prepare_mindrecord(args.input, args.tokenizer, args.out, args.val_fraction, args.token_field,
                           args.dtype, overwrite=args.overwrite)  # fmt: skip
        print(f"prepared dataset written to {args.out}")
        return
    prepare_dataset(
        args.input,
        args.tokenizer,
        args.out,
        workers=args.workers,
        val_fraction=args.val_fraction,
        fmt=args.format,
        text_field=args.text_field,
        strict=args.strict,
        dtype=args.dtype,
        overwrite=args.overwrite,
        split=args.split,
        engine=args.engine,
        address=args.address,
        chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
    )  # prints its own summary
    print(f"prepared dataset written to {args.out}")


def cmd_eval(args) -> None:
    if args.tasks is not None:
        from lmforge.infer.lm_eval_tasks import evaluate_tasks_checkpoint

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        evaluate_tasks_checkpoint(
            args.checkpoint,
            args.tasks,
            limit=limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            include_path=args.include_path,
            out=args.out,
            device=args.device,
            dtype=args.dtype,
            bos=args.bos,
            log_samples=args.log_samples,
        )
        return
    if not args.data:
        raise LmforgeError("eval: pass --data FILES for perplexity or --tasks NAMES for lm-eval benchmarks")
    from lmforge.infer import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_batches=args.max_batches,
        device=args.device,
        bos=args.bos,
    )
    from lmforge.infer.evaluate import fmt_ppl

    print(f"loss {result['loss']:.4f}  perplexity {fmt_ppl(result['ppl'])}  tokens {result['tokens']}")
    print(f"counted: {result['counted']}")


def cmd_generate(args) -> None:
    from lmforge.infer import generate_from_checkpoint

    generate_from_checkpoint(
        args.checkpoint,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        interactive=args.interactive,
        device=args.device,
        bos=args.bos,
        tokenizer=args.tokenizer,
    )


def cmd_export(args) -> None:
    from lmforge.infer import export_checkpoint

    fmt, dtype = args.format, args.dtype
    out = export_checkpoint(args.checkpoint, args.out, fmt=fmt, dtype=dtype, overwrite=args.overwrite,
                            tokenizer=args.tokenizer)  # fmt: skip
    print(out)


def cmd_import(args) -> None:
    if args.gguf:
        from lmforge.interop import import_gguf_to_folder

        print(import_gguf_to_folder(args.gguf, args.out, overwrite=args.overwrite))
        return
    if args.minimind:
        from lmforge.interop import import_minimind_to_folder

        out = import_minimind_to_folder(
            args.minimind, args.out, args.minimind_config, args.tokenizer, overwrite=args.overwrite
        )
        print(out)
        return
    from lmforge.infer import import_hf_folder

    print(import_hf_folder(args.hf, args.out, overwrite=args.overwrite))


def cmd_model_info(args) -> None:
    from lmforge.model.info import model_info_table

    print(model_info_table(args.names))


def cmd_plan(args) -> None:
    from lmforge.parallel.plan_search import plan_command

    plan_command(args.config, args.gpus, args.gpu_type, args.gpu_memory, args.mfu)
    if args.simulate:
        from lmforge.mindformers import load_run_config
        from lmforge.train.dryrun import dry_run

        dry_run(load_run_config(args.config), args.gpus, args.gpu_memory)


def cmd_config(args) -> None:
    from lmforge.mindformers import convert_file

    convert_file(args.source, args.out, overwrite=args.overwrite)


def cmd_report(args) -> None:
    from lmforge.train.report import report

    if not Path(args.run_dir).is_dir():
        raise LmforgeError(f"{args.run_dir}: run folder not found; pass runs/<name>")
    print(report(args.run_dir))


def cmd_checkpoint(args) -> None:
    from lmforge.weights.files import consolidate

    print(consolidate(args.dir, args.out, dtype=args.dtype, overwrite=args.overwrite))


def _handler(command: str):
    return globals()["cmd_" + command.replace("-", "_")]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may sit between options (`train a=1 --config X b=2`); argparse leaves the later
    # ones unrecognised, so they are collected here and anything else is still an error.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _handler(args.command)(args)
    except LmforgeError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lmforge generate ... | head` closed the pipe: not an error
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
