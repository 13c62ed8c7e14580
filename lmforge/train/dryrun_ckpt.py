"""The dry run's checkpoint check: would the checkpoint the trainer loads at step 1 (train.resume, or
a finetune's train.load_checkpoint when it is an lmforge checkpoint) reshard into this layout?

Per simulated rank, the state the trainer loads (model, and optimizer moments on resume, as
`Checkpointer` saves them: this layout's DTensor shards, fake) is planned against the checkpoint's
index with DCP's own `DefaultLoadPlanner` (every key present, global shapes equal, read items
for this rank's shards). No tensor data is read, and the index is read only through
`weights.safe_meta.vetted_metadata` (an exact allow-list unpickler). The checkpoint's model config
(state.json, plain JSON) is compared as `Checkpointer.load` does, since a layer count the run
drops leaves no key missing.
"""

from __future__ import annotations

from pathlib import Path

MAX_LINES = 12  # problems listed one per line; the rest counted in one more


def checkpoint_to_load(cfg) -> tuple[Path, str, bool] | None:
    """(step folder, the key that names it, whether optimizer state is loaded too) or None, by the
    trainer's rule: train.resume first (auto: the newest under the run's checkpoint folder), else
    run_mode finetune's train.load_checkpoint when it is an lmforge checkpoint (not an HF folder)."""
    from lmforge.train.trainer import run_dir_of
    from lmforge.weights import checkpoint as ckpt

    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir_of(cfg) / "checkpoints"
    found = ckpt.resolve_resume(cfg.train.resume, root)
    if found is not None:
        return found, "train.resume", True
    src = cfg.train.load_checkpoint
    if cfg.run_mode == "finetune" and src and Path(src).is_dir():
        step = ckpt.resolve_checkpoint_dir(Path(src))
        if step is not None:
            return step, "train.load_checkpoint", False
    return None


def _advice(key: str) -> str:
    if key == "train.resume":
        return "make the model config match the checkpoint's, or start fresh with train.resume=never"
    return "make the model config match the checkpoint's, or point train.load_checkpoint at this model's weights"


def config_problems(path: Path, key: str, cfg) -> list[str]:
    """The model keys that differ from the checkpoint's recorded config (state.json), one line each."""
    from lmforge.weights.checkpoint import model_config_diff, read_state

    saved = (read_state(path).get("config") or {}).get("model")
    if saved is None:
        return []
    return [f"{path}: {d}; {_advice(key)}" for d in model_config_diff(saved, cfg.model.model_dump(mode="json"))]


def plan_problems(path: Path, key: str, model, optimizer, rank: int) -> list[str]:
    """DCP's load plan of this rank's state against the checkpoint's vetted index: one line per key
    missing from it or saved with another global shape; empty when DCP can plan the load."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from lmforge.weights.safe_meta import vetted_metadata

    meta = vetted_metadata(path)
    if optimizer is None:
        target = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
    planner = DefaultLoadPlanner()
    planner.set_up_planner(target, meta, rank == 0)
    saved = meta.state_dict_metadata
    out = []
    for fqn, obj in planner.state_dict.items():  # flattened: the names DCP saved
        size = getattr(obj, "size", None)
        if fqn not in saved:
            out.append(f"{path}: '{fqn}' is not in the checkpoint; {_advice(key)}")
        elif callable(size) and tuple(saved[fqn].size) != tuple(obj.size()):
            out.append(f"{path}: '{fqn}' is saved as {tuple(saved[fqn].size)}, this layout loads "
                       f"{tuple(obj.size())}; {_advice(key)}")
    if not out:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        try:
            with unset_fake_temporarily():  # shard offsets come from the mesh's real rank table
                planner.create_local_plan()
        except Exception as exc:  # noqa: BLE001 - DCP refusing the plan is the finding
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            out.append(f"{path}: DCP cannot plan rank {rank}'s load ({type(exc).__name__}: {first}); {_advice(key)}")
    return out


def refusal(problems: list[str], where: str) -> str | None:
    """The dry run's one message (a line per problem, deduplicated over ranks), or None."""
    seen = list(dict.fromkeys(problems))
    if not seen:
        return None
    shown = seen[:MAX_LINES]
    if len(seen) > MAX_LINES:
        shown.append(f"... and {len(seen) - MAX_LINES} more keys")
    return f"dry run: {where} would not load into this layout:\n" + "\n".join(shown)
