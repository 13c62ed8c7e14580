"""`run_training(cfg)`: pretrain or finetune a model from a config, with exact resume.

Per optimizer step: fetch the step's micro batches, count their target tokens (all-reduced),
forward/backward each with gradient reduction only on the last (step.py), unscale (fp16),
clip and measure the gradient norm, then either step the optimizer or, when the loss or norm is
not finite, skip the update and count it. The step's loss stays on the device; the only host
synchronisation per step is the finiteness check, plus `.item()` on log steps.

Exact resume: a checkpoint holds the model, the optimizer, the scheduler, the scaler, the loader
position (samples handed out, so read-ahead does not matter), every rank's Python/NumPy/torch
RNG states and the counters; evaluation runs under fork_rng. Restoring all of them reproduces
the uninterrupted run bit for bit on CPU (train.deterministic also pins deterministic kernels).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.parallel import build_parallel_model, clip_grad_norm, init_distributed, unwrap_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.evaluation import load_sample_tokenizer, validate, write_samples
from lmforge.train.metrics import MetricsLogger, console_line, peak_memory_bytes
from lmforge.train.mfu import mfu, model_flops_per_token, peak_flops
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import build_schedule, total_steps
from lmforge.train.signals import StopFlag
from lmforge.train.step import (
    accumulate_gradients,
    autocast_context,
    make_scaler,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)


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
        if not Path(spec.path).is_dir():
            raise ConfigError(
                f"data.train: {spec.path} is not a folder; run `lmforge prepare` or fix the path"
            )
    if cfg.data.valid is not None and not Path(cfg.data.valid).is_dir():
        raise ConfigError(
            f"data.valid: {cfg.data.valid} is not a folder; run `lmforge prepare` or fix the path"
        )


def run_training(cfg) -> dict:
    """Train until the step budget is spent (or a stop signal); returns a summary dict."""
    _check_inputs(cfg)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    ctx = init_distributed(cfg)
    seed_everything(cfg.run.seed + ctx.rank)
    stop = StopFlag()
    stop.install()
    try:
        return _Trainer(cfg, ctx, stop).fit()
    finally:
        stop.restore()
        ctx.shutdown()
        torch.use_deterministic_algorithms(was_deterministic)


class _Trainer:
    def __init__(self, cfg, ctx, stop: StopFlag):
        from lmforge.data.loader import build_loader

        self.cfg, self.ctx, self.stop = cfg, ctx, stop
        self.run_dir = run_dir_of(cfg)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.dtype = resolve_dtype(cfg.train.dtype, ctx.device)
        self.amp = autocast_context(ctx.device, self.dtype)
        sharded = ctx.distributed and (ctx.shape.uses_fsdp or ctx.tp_size > 1)
        self.scaler = make_scaler(ctx.device, self.dtype, sharded)
        # A tokenizer.path that is set but unreadable is an error, not a note: it is also what
        # checks that the shards were prepared with this tokenizer.
        self.tokenizer, why = load_sample_tokenizer(cfg.tokenizer.path)
        fingerprint = self.tokenizer.fingerprint if self.tokenizer is not None else None
        self.no_samples_reason = why
        micro = cfg.micro_batch_size(ctx.dp_size)
        loader_args = dict(
            dp_rank=ctx.dp_rank,
            dp_size=ctx.dp_size,
            seed=cfg.run.seed,
            device=ctx.device,
            tokenizer_fingerprint=fingerprint,
            vocab_size=cfg.model.vocab_size,
        )
        self.train_loader = build_loader(cfg.data, "train", micro, **loader_args)
        self.val_loader = None
        try:
            self.val_loader = build_loader(cfg.data, "val", micro, **loader_args)
        except DataError as exc:
            if cfg.data.valid is not None:  # asked for explicitly: its problems are errors
                raise
            self.no_val_reason = str(exc)
        self.model = build_parallel_model(cfg, ctx)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.total = total_steps(cfg, self.train_loader.samples_per_epoch)
        self.scheduler = build_schedule(self.optimizer, cfg.optim, self.total)
        self.step = self.tokens = self.bad_steps = self.bad_streak = 0
        self.elapsed_before = 0.0
        self.last_saved: Path | None = None
        self.last_saved_step = -1
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len, self.model)
        self.peak = peak_flops(ctx.device, self.dtype)
        self._restore()
        self.logger = MetricsLogger(
            self.run_dir,
            cfg.log,
            cfg.model_dump(mode="json"),
            ctx.is_main,
            resume_step=self.step,
            run_name=cfg.run.name,
        )
        if ctx.is_main:
            _write_text_atomic(self.run_dir / "config.yaml", cfg.to_yaml())

    # -- start: resume, finetune weights, or fresh -------------------------------------------
    def _restore(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        ckpt.clean_temporaries(self.ckpt_root)
        found = ckpt.resolve_resume(cfg.train.resume, self.ckpt_root)
        if cfg.train.resume == "never" and ckpt.complete_checkpoints(self.ckpt_root):
            raise ckpt.CheckpointError(
                f"{self.ckpt_root}: holds checkpoints of an earlier run and train.resume=never would mix them "
                "with this one; pick another run.name or checkpoint.dir, delete them, or resume with train.resume=auto"
            )
        if found is not None:
            state, rank_state = ckpt.load_checkpoint(
                found, self.model, self.optimizer, cfg.model.model_dump(mode="json")
            )
            # The schedule's shape comes from this run's config; only the position is restored.
            sched = {**state["scheduler"], "lr_lambdas": self.scheduler.state_dict()["lr_lambdas"]}
            self.scheduler.load_state_dict(sched)
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            self.bad_steps = int(state.get("bad_steps", 0))
            self.bad_streak = int(state.get("bad_streak", 0))
            self.elapsed_before = float(state.get("elapsed", 0.0))
            loader_state = (rank_state or {}).get("loader") or state["loader"]
            self.train_loader.load_state_dict(loader_state)
            if rank_state is not None:
                set_rng_state(rank_state["rng"])
            else:  # a different world size: new per-rank streams, derived from the step
                seed_everything(cfg.run.seed + ctx.rank + 1_000_003 * self.step)
            self.last_saved, self.last_saved_step = found, self.step
            self.resumed_from = str(found)
            return
        self.resumed_from = None
        if cfg.run_mode == "finetune":
            self._load_finetune_weights()

    def _load_finetune_weights(self) -> None:
        from lmforge.infer.loading import load_weights
        from lmforge.parallel import load_full_state_dict

        src = self.cfg.train.load_checkpoint
        if not src:
            raise ConfigError(
                "train.load_checkpoint: run_mode finetune needs weights to start from (a checkpoint or HF folder)"
            )
        state, _, _ = load_weights(src)
        have = ckpt.model_state_shapes(self.model)
        got = {k: tuple(v.shape) for k, v in state.items()}
        bad = [
            f"{k} {got.get(k)} vs {have.get(k)}"
            for k in sorted(set(have) | set(got))
            if have.get(k) != got.get(k)
        ]
        if bad:
            raise ckpt.CheckpointError(
                f"{src}: weights do not fit this model ({', '.join(bad[:4])}); make the model config match them"
            )
        load_full_state_dict(self.model, state)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        self.logger.start_progress(self.total, self.step, cfg.log.progress)
        if self.resumed_from:
            self.logger.print(f"resumed from {self.resumed_from} at step {self.step}")
        if self.val_loader is None:
            self.logger.print(f"note: no validation ({self.no_val_reason}); set data.valid to evaluate")
        wants_samples = bool(cfg.train.sample_prompts and cfg.train.sample_max_new_tokens)
        if wants_samples and self.tokenizer is None:
            self.logger.print(f"note: no sample generations ({self.no_samples_reason})")
        elif wants_samples and ctx.tp_size > 1:
            self.logger.print(
                "note: no sample generations under tensor parallel; use lmforge generate on a checkpoint"
            )
        self.t_start = t_start = time.perf_counter()
        start_step, start_tokens = self.step, self.tokens
        self.model.train()
        try:
            preempted, first_loss, last_loss, last_eval = self._loop(start_step, t_start)
        finally:
            self.logger.close()
        elapsed = self.elapsed_before + time.perf_counter() - t_start
        if ctx.is_main and cfg.log.plots and self.logger.path.is_file():
            from lmforge.train.report import draw_plots

            draw_plots(self.run_dir)
        return {
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "total_steps": self.total,
            "tokens": self.tokens,
            "first_loss": first_loss,
            "loss": last_loss,
            "val_loss": last_eval["val_loss"] if last_eval else None,
            "val_ppl": last_eval["val_ppl"] if last_eval else None,
            "tokens_per_s": (self.tokens - start_tokens) / max(elapsed - self.elapsed_before, 1e-9),
            "elapsed": elapsed,
            "bad_steps": self.bad_steps,
            "preempted": preempted,
            "checkpoint": str(self.last_saved) if self.last_saved else None,
            "resumed_from": self.resumed_from,
        }

    def _loop(self, start_step: int, t_start: float):
        cfg, ctx = self.cfg, self.ctx
        accum = cfg.train.grad_accum_steps
        log_every, eval_every, ckpt_every = cfg.log.interval, cfg.train.eval_interval, cfg.checkpoint.interval
        window_t, window_tokens = t_start, self.tokens
        first_loss = last_loss = last_eval = None
        preempted = False
        while self.step < self.total:
            batches = [next(self.train_loader) for _ in range(accum)]
            loss, _ = accumulate_gradients(self.model, batches, ctx, self.amp, self.scaler)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = clip_grad_norm(self.model, cfg.optim.grad_clip)
            loss = ctx.reduce_mean(loss)
            finite = (
                torch.isfinite(loss)
                if self.scaler is not None
                else torch.isfinite(loss) & torch.isfinite(norm)
            )
            lr = self.optimizer.param_groups[0]["lr"]
            if bool(finite):
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.bad_streak = 0
            else:
                if self.scaler is not None:
                    self.scaler.update()
                self.bad_steps += 1
                self.bad_streak += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            self.tokens += self.tokens_per_step
            self.logger.advance()
            if self.step % log_every == 0 or self.step == self.total:
                now = time.perf_counter()
                rate = (self.tokens - window_tokens) / max(now - window_t, 1e-9)
                window_t, window_tokens = now, self.tokens
                elapsed = self.elapsed_before + now - t_start
                rec = {
                    "step": self.step,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": norm.item(),
                    "tokens": self.tokens,
                    "tokens_per_s": rate,
                    "mfu": mfu(self.flops_per_token, rate, self.peak, ctx.world_size),
                    "mem": peak_memory_bytes(ctx.device),
                    "elapsed": elapsed,
                    "skipped": self.bad_steps,
                }
                rec["eta"] = (now - t_start) / max(self.step - start_step, 1) * (self.total - self.step)
                last_loss = rec["loss"]
                first_loss = last_loss if first_loss is None else first_loss
                self.logger.print(console_line(rec, self.total))
                self.logger.log({k: v for k, v in rec.items() if k != "eta"})
            if self.bad_streak >= cfg.train.max_bad_steps:
                self._fail_non_finite()  # before any eval or checkpoint of this step
            if (eval_every and self.step % eval_every == 0) or self.step == self.total:
                last_eval = self._evaluate()
            if self._should_stop():
                self._save()
                preempted = True
                self.logger.print(f"stopped by signal at step {self.step}; checkpoint {self.last_saved}")
                break
            if (ckpt_every and self.step % ckpt_every == 0) or self.step == self.total:
                self._save()
        return preempted, first_loss, last_loss, last_eval

    def _should_stop(self) -> bool:
        flag = torch.tensor(1.0 if self.stop.signal is not None else 0.0, device=self.ctx.device)
        return bool(self.ctx.reduce_max(flag) > 0) if self.ctx.distributed else self.stop.signal is not None

    def _fail_non_finite(self) -> None:
        last = self.last_saved or "none (no checkpoint was written yet)"
        raise LmforgeError(
            f"train: non-finite loss or gradient norm for {self.bad_streak} steps in a row at step {self.step}; "
            f"last good checkpoint is {last}; lower optim.lr, keep optim.grad_clip > 0 or use train.dtype=bfloat16/float32, "
            "then resume"
        )

    def _evaluate(self) -> dict | None:
        cfg, ctx = self.cfg, self.ctx
        if self.val_loader is None:
            return None
        result = validate(self.model, self.val_loader, ctx, self.amp, cfg.train.eval_batches)
        self.logger.log({"step": self.step, **result})
        self.logger.print(
            f"eval step {self.step} | val loss {result['val_loss']:.4f} | ppl {result['val_ppl']:.2f}"
        )
        if (
            self.tokenizer is not None
            and cfg.train.sample_prompts
            and cfg.train.sample_max_new_tokens
            and ctx.tp_size == 1
        ):
            write_samples(
                unwrap_model(self.model),
                self.tokenizer,
                cfg.train.sample_prompts,
                cfg.train.sample_max_new_tokens,
                self.step,
                self.run_dir / "samples.jsonl",
                ctx,
                cfg.run.seed,
            )
        return result

    def _save(self) -> None:
        if self.last_saved_step == self.step:
            return
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
            "total_steps": self.total,
            "elapsed": self.elapsed_before + time.perf_counter() - self.t_start,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.train_loader.state_dict(),
            "config": self.cfg.model_dump(mode="json"),
        }
        rank_state = {"rng": rng_state(), "loader": self.train_loader.state_dict()}
        self.last_saved = ckpt.save_checkpoint(
            self.ckpt_root, self.step, self.model, self.optimizer, state, rank_state, self.cfg.checkpoint.keep
        )
        self.last_saved_step = self.step


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
