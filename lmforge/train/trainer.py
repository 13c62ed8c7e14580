"""`run_training(cfg)`: pretrain or finetune a model from a config, with exact resume.

Shaped like torchtitan's trainer: `TrainState` holds the counters, `Checkpointer` owns
everything a checkpoint holds (model, optimizer, scheduler, scaler, loader, train state, RNG)
and decides when to save, and `TrainStep` (train_step.step(batches) -> StepResult, step.py) does one
optimizer step. The loop below only sequences them: fetch, step, count, log, evaluate, save.
Per step the only host synchronisation is the finiteness check, plus `.item()` on log steps.

Exact resume: restoring every piece the Checkpointer saves reproduces the uninterrupted run bit
for bit on CPU (train.deterministic also pins deterministic kernels); evaluation runs under
fork_rng. Hyperparameters on resume come from this run's config (checkpointer.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from lmforge.data.loader import build_loader
from lmforge.data.mindrecord import is_mindrecord
from lmforge.data.shards import read_meta
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.interop.loading import load_weights
from lmforge.parallel import build_parallel_model, init_distributed, load_full_state_dict, unwrap_model
from lmforge.parallel.compile import compile_seconds
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.controls import RunControls
from lmforge.train.evaluation import load_sample_tokenizer, validate, write_samples
from lmforge.train.messages import end_summary, start_banner, warmup_note
from lmforge.train.metrics import MetricsLogger, console_line, fmt_ppl, peak_memory_bytes, use_tensorboard
from lmforge.train.mfu import mfu, model_flops_per_token, peak_flops
from lmforge.train.optim import build_optimizer
from lmforge.train.preflight import check_memory
from lmforge.train.report import draw_plots, use_plots
from lmforge.train.runlock import RunLock
from lmforge.train.schedule import build_schedule, total_steps
from lmforge.train.signals import StopFlag
from lmforge.train.state import TrainState
from lmforge.train.step import autocast_context, build_train_step, make_scaler, seed_everything
from lmforge.train.task_eval import TaskEvaluation
from lmforge.weights.dtypes import compute_dtype
from lmforge.weights.shapes import check_shapes, config_shapes, model_state_shapes, state_shapes


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def _check_inputs(cfg) -> None:
    if cfg.run_mode not in ("train", "finetune"):
        raise ConfigError(
            f"run_mode: '{cfg.run_mode}' is not a training mode; use lmforge eval / generate for it"
        )
    if not cfg.data.train:
        raise ConfigError("data.train: no training data; set it to a folder written by `lmforge prepare`")
    for spec in cfg.data.train:
        if not Path(spec.path).is_dir() and not is_mindrecord(spec.path):
            raise ConfigError(
                f"data.train: {spec.path} is not a folder or a MindRecord file; run `lmforge prepare` or fix the path"
            )
    for valid in cfg.data.valid or []:
        if not Path(valid).is_dir() and not is_mindrecord(valid):
            raise ConfigError(f"data.valid: {valid} is not a folder or a MindRecord file; run `lmforge prepare` or fix the path")
    # An optional extra the config asks for (log.tensorboard, log.plots) fails before anything is written.
    use_tensorboard(cfg.log)
    use_plots(cfg.log)


def run_training(cfg) -> dict:
    """Train until the step budget is spent (or a stop signal); returns a summary dict."""
    cfg = _resolve_paths(cfg)
    _check_inputs(cfg)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    ctx = init_distributed(cfg.parallel, cfg.train.device)  # reads torchrun's environment, once
    stop = StopFlag()
    stop.install()
    lock = RunLock(run_dir_of(cfg), ctx)  # one training per run folder at a time (rank 0 holds it)
    try:
        lock.take()
        check_memory(cfg, ctx.world_size, ctx.device, ctx.local_world_size)  # before any tensor of the model exists
        seed_everything(cfg.run.seed + ctx.rank)
        return _Trainer(cfg, ctx, stop).fit()
    finally:
        lock.release()
        stop.restore()
        ctx.shutdown()
        torch.use_deterministic_algorithms(was_deterministic)


class _Trainer:
    def __init__(self, cfg, ctx, stop: StopFlag):

        self.cfg, self.ctx, self.stop = cfg, ctx, stop
        self.run_dir = run_dir_of(cfg)
        self.dtype = compute_dtype(cfg.train.dtype, ctx.device)
        self.amp = autocast_context(ctx.device, self.dtype)
        sharded = ctx.distributed and (ctx.shape.uses_fsdp or ctx.tp_size > 1)
        self.scaler = make_scaler(ctx.device, self.dtype, sharded)
        # A tokenizer.path that is set but unreadable is an error, not a note: it is also what
        # checks that the shards were prepared with this tokenizer.
        self.tokenizer, self.no_samples_reason = load_sample_tokenizer(cfg.tokenizer.path)
        fingerprint = self.tokenizer.fingerprint if self.tokenizer is not None else None
        micro = cfg.micro_batch_size(ctx.dp_size)
        loader_args = dict(
            dp_rank=ctx.dp_rank,
            dp_size=ctx.dp_size,
            seed=cfg.run.seed,
            device=ctx.device,
            tokenizer_fingerprint=fingerprint,
            vocab_size=cfg.model.vocab_size,
            cache_dir=self.run_dir / "mindrecord_cache" if cfg.data.mindrecord_cache else None,
        )
        self.train_loader = build_loader(cfg.data, "train", micro, **loader_args)
        self.val_loader, self.no_val_reason = None, None
        try:
            self.val_loader = build_loader(cfg.data, "val", micro, **loader_args)
        except DataError as exc:
            # Asked for explicitly (data.valid, or a val split the folder's meta.json lists): its
            # problems are errors, not a reason to train blind.
            if cfg.data.valid is not None or _lists_val_split(cfg.data.train):
                raise
            self.no_val_reason = _no_val_reason(cfg.data, exc)
        self.task_eval = TaskEvaluation(cfg, ctx, self.tokenizer)  # before the model: fails fast
        self.model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.total = total_steps(cfg, self.train_loader.samples_per_epoch)
        self.scheduler = build_schedule(self.optimizer, cfg.optim, self.total)
        self.train_step = build_train_step(
            cfg, ctx, self.model, self.optimizer, self.scheduler, amp=self.amp, scaler=self.scaler
        )
        self.state = TrainState()
        ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        parts = (self.model, self.optimizer, self.scheduler, self.scaler, self.train_loader, self.state)
        self.checkpointer = Checkpointer(cfg, ctx, ckpt_root, *parts)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops(ctx.device, self.dtype)
        if self.checkpointer.load() is None and cfg.run_mode == "finetune":
            self._load_finetune_weights()
        self.logger = MetricsLogger(
            self.run_dir,
            cfg.log,
            cfg.model_dump(mode="json"),
            ctx.is_main,
            resume_step=self.state.step,
            run_name=cfg.run.name,
        )
        if ctx.is_main:
            _write_text_atomic(self.run_dir / "config.yaml", cfg.to_yaml())

    def _load_finetune_weights(self) -> None:

        src = self.cfg.train.load_checkpoint
        if not src:
            raise ConfigError(
                "train.load_checkpoint: run_mode finetune needs weights to start from (a checkpoint or HF folder)"
            )
        state, _, _ = load_weights(src)
        # A pipeline rank holds only its stages; the whole model's shapes come from the config.
        pipelined = self.ctx.pp_size > 1
        have = config_shapes(self.cfg.model) if pipelined else model_state_shapes(self.model)
        check_shapes(state_shapes(state), have, src, "this run's model")
        load_full_state_dict(self.model, state)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        self._print_start_notes()
        start_tokens = self.state.tokens
        self.state.start_clock()
        self.model.train()
        self.controls = RunControls(self.cfg, self.ctx, self.run_dir)  # GC, allocator, data wait, profiler
        try:
            preempted, first_loss, last_loss, last_eval = self._loop()
        finally:
            self.controls.close()
            self.logger.close()
        elapsed = self.state.elapsed()
        rate = (self.state.tokens - start_tokens) / max(elapsed - self.state.elapsed_before, 1e-9)
        if self.ctx.is_main and use_plots(self.cfg.log) and self.logger.path.is_file():
            draw_plots(self.run_dir)
        ckpt = self.checkpointer
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.state.step,
            "total_steps": self.total,
            "tokens": self.state.tokens,
            "first_loss": first_loss,
            "loss": last_loss,
            "val_loss": last_eval["val_loss"] if last_eval else None,
            "val_ppl": last_eval["val_ppl"] if last_eval else None,
            "tokens_per_s": rate,
            "elapsed": elapsed,
            "bad_steps": self.state.bad_steps,
            "preempted": preempted,
            "checkpoint": str(ckpt.last_saved) if ckpt.last_saved else None,
            "resumed_from": str(ckpt.resumed_from) if ckpt.resumed_from else None,
        }
        if self.ctx.is_main:
            for line in end_summary(summary):
                print(line, flush=True)
        return summary

    def _loop(self):
        cfg, state = self.cfg, self.state
        window = (time.perf_counter(), state.tokens, state.step)
        first_loss = last_loss = last_eval = None
        compile_pending = cfg.parallel.compile
        first_step = state.step + 1
        real = torch.zeros((), device=self.ctx.device)  # target tokens since the last log, all ranks
        positions = 0  # positions computed since the last log, this rank (padded batches are trimmed)
        while state.step < self.total:
            batches = self.controls.fetch(self.train_loader, cfg.train.grad_accum_steps)
            positions += sum(b["input_ids"].numel() for b in batches)
            self.controls.step_begins(state.step + 1)
            result = self.train_step.step(batches)
            self.controls.step_ends(state.step + 1)
            real += result.targets  # counted by the step for its loss normalisation: no second pass
            state.record_step(result.finite, self.tokens_per_step)
            if compile_pending:  # the first step compiled the graphs: one line with the cost
                compile_pending = False
                self.logger.print(f"compile: {compile_seconds():.1f} s ({cfg.parallel.compile_mode})")
            self.logger.advance()
            last_step = state.step == self.total
            stopping = self._should_stop()
            if should_log(state.step, cfg.log.interval, first_step, last_step or stopping):
                last_loss = self._log_step(result, window, real, positions)
                real.zero_()
                positions = 0
                window = (time.perf_counter(), state.tokens, state.step)
                first_loss = last_loss if first_loss is None else first_loss
            if state.bad_streak >= cfg.train.max_bad_steps:
                self._fail_non_finite()  # before any eval or checkpoint of this step
            if should_validate(state.step, cfg.train.eval_interval, last_step):
                last_eval = self._evaluate()
            if self.task_eval.due(state.step, last_step):  # lm-eval tasks (train/task_eval.py)
                self.task_eval.run(self.model, state.step, state.tokens, self.amp, self.logger)
            if stopping:
                path = self.checkpointer.save()
                out_of_time = self.stop.signal is None and cfg.train.max_time is not None
                why = f"train.max_time {cfg.train.max_time:g} s" if out_of_time else "signal"
                self.logger.print(f"stopped by {why} at step {state.step}; checkpoint {path}")
                return True, first_loss, last_loss, last_eval
            self.checkpointer.maybe_save(last_step)
        return False, first_loss, last_loss, last_eval

    # -- around the loop -----------------------------------------------------------------------
    def _print_start_notes(self) -> None:
        cfg, ctx, ckpt = self.cfg, self.ctx, self.checkpointer
        for line in start_banner(cfg, ctx, self.dtype, self.total, self.run_dir, self.state.step, ckpt.resumed_from):
            self.logger.print(line)
        if self.state.step >= self.total:
            self.logger.print(
                f"run already complete: step {self.state.step} of {self.total} (checkpoint {ckpt.resumed_from}); "
                "nothing to train; raise train.max_steps (or max_tokens / epochs) to continue it"
            )
        self.logger.start_progress(self.total, self.state.step, cfg.log.progress)
        note = warmup_note(cfg.optim, self.total)
        if note:
            self.logger.print(note)
        if ckpt.changes:
            changed = ", ".join(ckpt.changes)
            self.logger.print(
                f"note: resumed with this run's config, changed from the checkpoint's: {changed}"
            )
        if self.val_loader is None:
            self.logger.print(f"note: no validation: {self.no_val_reason}")
        wants_samples = bool(cfg.train.sample_prompts and cfg.train.sample_max_new_tokens)
        if wants_samples and self.tokenizer is None:
            self.logger.print(f"note: no sample generations ({self.no_samples_reason})")
        elif wants_samples and (ctx.tp_size > 1 or ctx.pp_size > 1):
            self.logger.print(
                "note: no sample generations under tensor or pipeline parallel; use lmforge generate on a checkpoint"
            )

    def _log_step(self, result, window, real: torch.Tensor, positions: int) -> float:
        """Log one step's record (rates over the window since the last log) and return its loss.
        tokens_per_s counts every position the model computed (padded batches are trimmed to their
        longest sample, so this is below the seq_len budget there); real_tokens_per_s only the
        positions with a target (padding and ignored labels excluded)."""
        state, ctx = self.state, self.ctx
        computed = ctx.reduce_sum(torch.tensor(float(positions), device=real.device))
        real_tokens, computed = (float(v) for v in torch.stack([real.to(torch.float32), computed]).tolist())
        now = time.perf_counter()
        t0, _, step0 = window
        rate = computed / max(now - t0, 1e-9)
        rec = {
            "step": state.step,
            "loss": result.loss.item(),
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "tokens": state.tokens,
            "tokens_per_s": rate,
            "real_tokens_per_s": real_tokens / max(now - t0, 1e-9),
            "mfu": mfu(self.flops_per_token, rate, self.peak, ctx.world_size),
            "mem": peak_memory_bytes(ctx.device),
            "elapsed": state.elapsed(),
            "skipped": state.bad_steps,
            "data_wait": self.controls.data_wait_share(now - t0),
        }
        eta = (now - t0) / max(state.step - step0, 1) * (self.total - state.step)
        self.logger.print(console_line({**rec, "eta": eta}, self.total))
        self.logger.log(rec)
        return rec["loss"]

    def _should_stop(self) -> bool:
        budget = self.cfg.train.max_time
        out_of_time = budget is not None and self.state.elapsed() >= budget  # train.max_time
        stop = self.stop.signal is not None or out_of_time
        flag = torch.tensor(1.0 if stop else 0.0, device=self.ctx.device)
        return bool(self.ctx.reduce_max(flag) > 0) if self.ctx.distributed else stop

    def _fail_non_finite(self) -> None:
        last = self.checkpointer.last_saved or "none (no checkpoint was written yet)"
        raise LmforgeError(
            f"train: non-finite loss or gradient norm for {self.state.bad_streak} steps in a row at step "
            f"{self.state.step}; last good checkpoint is {last}; lower optim.lr, keep optim.grad_clip > 0 or "
            "use train.dtype=bfloat16/float32, then resume (the resumed run uses the config's new values)"
        )

    def _evaluate(self) -> dict | None:
        cfg, ctx = self.cfg, self.ctx
        if self.val_loader is None:
            return None
        result = validate(self.train_step, self.val_loader, ctx, cfg.train.eval_batches)
        self.logger.log({"step": self.state.step, **result})
        self.logger.print(
            f"eval step {self.state.step} | val loss {result['val_loss']:.4f} | ppl {fmt_ppl(result['val_ppl'])}"
        )
        if (
            self.tokenizer is not None
            and cfg.train.sample_prompts
            and cfg.train.sample_max_new_tokens
            and ctx.tp_size == 1
            and ctx.pp_size == 1
        ):
            write_samples(
                unwrap_model(self.model),
                self.tokenizer,
                cfg.train.sample_prompts,
                cfg.train.sample_max_new_tokens,
                self.state.step,
                self.run_dir / "samples.jsonl",
                ctx,
                cfg.run.seed,
            )
        return result


def should_log(step: int, interval: int, first_step: int, final: bool) -> bool:
    """Every log.interval steps; also the first step of every run segment and a final step (the
    budget's last, or the one a signal stops at), so a short or interrupted run still has a curve."""
    return step % interval == 0 or step == first_step or final


def should_validate(step: int, interval: int, last_step: bool) -> bool:
    """Every train.eval_interval steps (0: never) and at the end of training."""
    return bool(interval and step % interval == 0) or last_step


def _resolve_paths(cfg):
    """A relative tokenizer.path made absolute, so the config saved in the run and in every
    checkpoint still finds the tokenizer from another working directory (generate --checkpoint)."""
    path = cfg.tokenizer.path
    if not path or Path(path).is_absolute():
        return cfg
    tokenizer = cfg.tokenizer.model_copy(update={"path": str(Path(path).resolve())})
    return cfg.model_copy(update={"tokenizer": tokenizer})


def _lists_val_split(train_specs) -> bool:
    """Whether a training folder's meta.json promises a validation split."""
    for spec in train_specs:
        try:
            if "val" in (read_meta(spec.path).get("splits") or {}):
                return True
        except (DataError, OSError, ValueError):
            continue  # the train loader reports an unreadable meta.json itself
    return False


def _no_val_reason(data_cfg, exc: DataError) -> str:
    """Why a run has no validation, and what would give it one."""
    first = data_cfg.train[0].path  # the loader's val split is the first train folder's
    if is_mindrecord(first):
        return f"{exc}"
    return (
        f"{first} has no val split (prepared with --val-fraction 0); to evaluate, set data.valid to a "
        "prepared folder, or prepare the data again with --val-fraction above 0"
    )


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
