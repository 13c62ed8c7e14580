"""`Checkpointer`: owns everything a training checkpoint holds and decides when to write one.

It holds the model, optimizer, scaler, loader and `TrainState`, and this rank's RNG streams; the
learning rate is a function of the step (train/schedule.py), so the step counter is all the
schedule needs back. The folder format (DCP tensors, state.json, rank_<r>.safetensors, atomic
publish) is lmforge.weights.checkpoint's; this class only says what goes in and what comes back.

Resume semantics: the run config is the source of truth for hyperparameters. The checkpoint
gives the weights, the optimizer's moment estimates, the step (and so the schedule's position),
the loader position, the counters and the RNG; optim.lr, min_lr_ratio, weight_decay, betas, eps, grad_clip, the
schedule's shape and the step budget come from this run's config, and every value that differs
from the checkpoint's config is listed in one note line. Changes that cannot be honoured (model
shape, the data's seq_len or tokenizer) are refused by the shape check and the loader.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import CheckpointError
from lmforge.train.state import TrainState
from lmforge.train.step import rng_state, seed_everything, set_rng_state
from lmforge.weights import checkpoint as ckpt

# Config keys whose change on resume is honoured (and reported), beyond the optim section.
HONOURED_TRAIN_KEYS = ("max_steps", "max_tokens", "epochs")


class Checkpointer:
    def __init__(self, cfg, ctx, root: Path, model, optimizer, scheduler, scaler, loader, state: TrainState):
        self.cfg, self.ctx, self.root = cfg, ctx, Path(root)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler, self.loader, self.state = scaler, loader, state
        self.interval, self.keep = cfg.checkpoint.interval, cfg.checkpoint.keep
        self.last_saved: Path | None = None
        self.last_saved_step = -1
        self.resumed_from: Path | None = None
        self.changes: list[str] = []  # "key old -> new" for honoured config changes on resume

    # -- writing ---------------------------------------------------------------------------------
    def maybe_save(self, last_step: bool) -> None:
        """Save on the interval and at the end of the run."""
        step = self.state.step
        if (self.interval and step % self.interval == 0) or last_step:
            self.save()

    def save(self) -> Path | None:
        if self.last_saved_step == self.state.step:
            return self.last_saved
        shared = {
            **self.state.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.loader.state_dict(),  # global position: the same on every rank
            "config": self.cfg.model_dump(mode="json"),
        }
        self.last_saved = ckpt.save_checkpoint(
            self.root, self.state.step, self.model, self.optimizer, shared, {"rng": rng_state()}, self.keep
        )
        self.last_saved_step = self.state.step
        return self.last_saved

    # -- reading ---------------------------------------------------------------------------------
    def load(self) -> Path | None:
        """Resume from the checkpoint train.resume names (None: a fresh start)."""
        cfg = self.cfg
        ckpt.clean_temporaries(self.root)
        found = ckpt.resolve_resume(cfg.train.resume, self.root)
        if cfg.train.resume == "never" and ckpt.complete_checkpoints(self.root):
            raise CheckpointError(
                f"{self.root}: holds checkpoints of an earlier run and train.resume=never would mix them "
                "with this one; pick another run.name or checkpoint.dir, delete them, or resume with train.resume=auto"
            )
        if found is None:
            return None
        _check_same_optimizer(found, ckpt.read_state(found), cfg.optim.name)
        # Only moments come back into the optimizer; its param groups (lr, weight decay, betas, eps,
        # fused/foreach flags for this device) stay the ones this run's config built.
        saved, rank_state = ckpt.load_checkpoint(
            found, self.model, self.optimizer, cfg.model.model_dump(mode="json"), partial=self.ctx.pp_size > 1
        )
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state.load_state_dict(saved)
        # Older checkpoints also hold LambdaLR's state: its position (last_epoch) is this step
        # counter (it stepped on every step, skipped ones too), so it is not needed.
        self.scheduler.resume(self.state.step)
        self.loader.load_state_dict(saved["loader"])
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:  # a different world size: new per-rank streams, derived from the step
            seed_everything(cfg.run.seed + self.ctx.rank + 1_000_003 * self.state.step)
        self.changes = config_changes(saved.get("config") or {}, cfg.model_dump(mode="json"))
        self.last_saved, self.last_saved_step = found, self.state.step
        self.resumed_from = found
        return found


def _check_same_optimizer(path: Path, saved: dict, name: str) -> None:
    """Moments resume only into the optimizer that made them (AdamW's exp_avg / exp_avg_sq, Muon's
    momentum_buffer); a switch of optim.name is refused in one line saying what to do instead."""
    was = ((saved.get("config") or {}).get("optim") or {}).get("name", "adamw")
    if was != name:
        raise CheckpointError(
            f"{path}: trained with optim.name {was}, but this run sets optim.name {name}, and optimizer state "
            f"does not carry over between them; resume with optim.name={was}, or start a new run.name from "
            f"its weights (run_mode=finetune, train.load_checkpoint={path})"
        )


def config_changes(saved: dict, current: dict) -> list[str]:
    """'optim.lr 0.001 -> 0.002' for each honoured hyperparameter that differs from the checkpoint's."""
    pairs = [(f"optim.{k}", (saved.get("optim") or {}).get(k), v) for k, v in current["optim"].items()]
    pairs += [
        (f"train.{k}", (saved.get("train") or {}).get(k), current["train"][k]) for k in HONOURED_TRAIN_KEYS
    ]
    return [f"{key} {old} -> {new}" for key, old, new in pairs if saved and old != new]
