"""lm-evaluation-harness tasks during training (train.eval_tasks every train.eval_tasks_interval).

Every rank runs the same evaluation on its model (a sharded model needs all ranks in each
forward, as for sample generations); only the main rank logs. Each task metric goes to
metrics.jsonl, TensorBoard and W&B as `val_<task>_<metric>` with the step and token count, so
`lmforge report` plots it against tokens beside the validation loss. The tasks and their datasets
are loaded when the trainer starts, so a typo or a missing dataset fails before the first step.
Python's, NumPy's and torch's RNGs are left as they were (exact resume does not depend on where
evaluations fell).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.bos import use_bos
from lmforge.infer.lm_eval_tasks import (
    prepare_tasks,
    quiet_lm_eval,
    require_lm_eval,
    run_tasks,
    task_metrics,
)
from lmforge.parallel import unwrap_model


class TaskEvaluation:
    def __init__(self, cfg, ctx, tokenizer):
        self.train_cfg, self.ctx, self.tokenizer = cfg.train, ctx, tokenizer
        self.enabled = bool(cfg.train.eval_tasks)
        self.skip_reason = None
        if not self.enabled:
            return
        if tokenizer is None:
            raise ConfigError(
                "train.eval_tasks: lm-eval tasks are text and this run has no tokenizer; set tokenizer.path "
                "or clear train.eval_tasks"
            )
        try:
            require_lm_eval()
            quiet_lm_eval()
            self.prepared = prepare_tasks(cfg.train.eval_tasks, cfg.train.eval_tasks_include_path or None)
        except LmforgeError as exc:
            raise ConfigError(f"train.eval_tasks: {exc}") from exc
        self.bos = use_bos(tokenizer, cfg, None)  # as the model is trained: BOS first when there is one
        if ctx.pp_size > 1 or cfg.parallel.loss_parallel:
            self.skip_reason = (
                "not run with pipeline parallel or loss_parallel; use lmforge eval --tasks on a checkpoint"
            )

    def due(self, step: int, last_step: bool) -> bool:
        interval = self.train_cfg.eval_tasks_interval
        return self.enabled and bool((interval and step % interval == 0) or last_step)

    @torch.no_grad()
    def run(self, model, step: int, tokens: int, amp, logger) -> dict:
        """Evaluate, log {"step", "tokens", "val_<task>_<metric>"...} on the main rank, return it."""
        from lmforge.infer.lm_eval_model import LmforgeLM

        if self.skip_reason is not None:
            if self.ctx.is_main:
                logger.print(f"note: train.eval_tasks {self.skip_reason}")
            self.enabled = False  # said once
            return {}
        plain = unwrap_model(model)
        was_training = plain.training
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        try:
            plain.eval()
            with torch.random.fork_rng(devices=devices), amp:
                lm = LmforgeLM(plain, self.tokenizer, self.bos, self.train_cfg.eval_tasks_batch_size)
                results = run_tasks(
                    lm,
                    self.prepared,
                    limit=self.train_cfg.eval_tasks_limit,
                    num_fewshot=self.train_cfg.eval_tasks_num_fewshot,
                    seed_rngs=False,
                )
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            plain.train(was_training)
        metrics = task_metrics(results) if results else {}
        record = {"step": step, "tokens": tokens, **metrics}
        if self.ctx.is_main and metrics:
            logger.log(record)
            shown = " | ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items())
            logger.print(f"tasks step {step} | {shown}")
        return record
