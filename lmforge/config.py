"""One typed config tree for a whole run, loaded from YAML with dotted command-line overrides.

Every section rejects unknown keys and wrong types. Errors come out as one line naming the file
and the dotted key (`configs/demo.yaml: model.num_heads: ...`), raised as `ConfigError`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    Field,
    ValidationError,
    model_validator,
)

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, MoEConfig, RopeScaling, Section  # noqa: F401 (re-exported)
from lmforge.model.presets import expand_preset, without_shape_keys


class TokenizerConfig(Section):
    # A folder with tokenizer.json, a tokenizer.model (SentencePiece or tiktoken) or a .tiktoken file.
    path: str | None = None


class DatasetSpec(Section):
    path: str
    weight: float = Field(1.0, gt=0)


class DataConfig(Section):
    # Prepared dataset folders (output of `lmforge prepare`); several are mixed by weight.
    train: list[DatasetSpec] = Field(default_factory=list)
    # Validation data: prepared folders whose `val` splits are evaluated together (a path or a
    # list, like train); None means the `val` split of the first training dataset.
    valid: list[str] | None = None
    mode: Literal["packed", "padded"] = "packed"
    seq_len: int = Field(512, ge=1)
    shuffle: bool = True
    prefetch: int = Field(2, ge=0)
    pin_memory: bool = True
    # Packed data: attend only within each document (batches carry doc_ids [B, T]) and, with
    # reset_positions, restart RoPE positions at every document start (position_ids [B, T]).
    document_mask: bool = False
    reset_positions: bool = False
    # MindRecord datasets (data.train: [x.mindrecord]): the integer array field holding token ids.
    token_field: str = "input_ids"
    # MindRecord rows decoded once into runs/<name>/mindrecord_cache/ (about its size) so they load at
    # shard speed; false decodes each batch as it is read (no copy on disk, about a third of the rate).
    mindrecord_cache: bool = True

    @model_validator(mode="before")
    @classmethod
    def _train_shorthand(cls, value: Any) -> Any:
        # `data.train: path` and `data.train: [p1, p2]` are shorthands for weight-1 specs.
        if isinstance(value, dict) and "train" in value:
            train = value["train"]
            if isinstance(train, str):
                train = [train]
            if isinstance(train, list):
                value = {**value, "train": [{"path": t} if isinstance(t, str) else t for t in train]}
        if isinstance(value, dict) and isinstance(value.get("valid"), str):  # `data.valid: path`
            value = {**value, "valid": [value["valid"]]}
        return value


class OptimConfig(Section):
    lr: float = Field(5e-4, gt=0)
    # Floor of the decay, as a fraction of lr (MiniMind's lr/10 + cosine with its lr_mm is
    # lr = 1.1*lr_mm and min_lr_ratio = 1/11; see lmforge/train/schedule.py).
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    # Warm-up as a fraction of the run's steps (MindFormers' warmup_ratio); replaces warmup_steps.
    warmup_ratio: float | None = Field(None, ge=0.0, le=1.0)
    # WSD: fraction of the run spent in the final decay.
    decay_ratio: float = Field(0.2, ge=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    decay_embeddings: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    fused: Literal["auto", "fused", "foreach", "off"] = "auto"
    # adamw: AdamW for every parameter. muon: Muon for the hidden matrices (attention, MLP, each
    # expert), AdamW (lr, weight_decay above) for embeddings, output, norms, biases, routers
    # (lmforge/train/muon.py). muon_lr null: optim.lr (with match_rms_adamw AdamW's rate transfers).
    name: Literal["adamw", "muon"] = "adamw"
    muon_lr: float | None = Field(None, gt=0)
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    muon_nesterov: bool = True
    muon_ns_steps: int = Field(5, ge=1, le=50)
    muon_adjust_lr: Literal["match_rms_adamw", "original", "none"] = "match_rms_adamw"
    muon_weight_decay: float | None = Field(None, ge=0.0)  # null: optim.weight_decay
    muon_ns_dtype: Literal["float32", "bfloat16"] = "float32"


class TrainConfig(Section):
    # Samples per optimizer step over all ranks; the per-rank micro batch is
    # global_batch_size / (grad_accum_steps * data-parallel size).
    global_batch_size: int = Field(32, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    eval_interval: int = Field(200, ge=0)  # 0: only at the end
    eval_batches: int = Field(20, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: continue from runs/<name>/checkpoints/latest when it exists; never; or a checkpoint path.
    resume: str = "auto"
    # finetune: weights to start from (our checkpoint folder or a Hugging Face folder).
    load_checkpoint: str | None = None
    max_bad_steps: int = Field(5, ge=1)
    # Wall-clock budget in seconds over the whole run (resumed segments included): at the first step
    # past it the run checkpoints and stops; resuming continues it (raise max_time to go on).
    max_time: float | None = Field(None, gt=0)
    sample_prompts: list[str] = Field(default_factory=lambda: ["The", "Once upon a time"])
    sample_max_new_tokens: int = Field(48, ge=0)
    # Sampling for run_mode predict (validation samples during training stay greedy so they
    # compare across evaluations); temperature 0 is greedy, top_k null keeps every token.
    predict_temperature: float = Field(0.8, ge=0.0)
    predict_top_k: int | None = Field(50, ge=1)
    deterministic: bool = False
    # Output layer + loss fused and chunked over tokens (lmforge/loss.py): same loss, no
    # [tokens, vocab] logits; tensor-parallel output layers use the plain logits path anyway.
    fused_loss: bool = True
    # z-loss coefficient: coef x mean(logsumexp(logits)^2) over the target tokens joins the training
    # loss (and the logged train loss); validation stays plain CE. PaLM used 1e-4; 0 is off.
    z_loss: float = Field(0.0, ge=0.0)
    # The trainer refuses a run whose estimated per-rank memory (parallel/plan.py) exceeds the
    # device's (RAM on CPU) before it allocates anything; true goes on anyway.
    skip_memory_check: bool = False
    # lm-evaluation-harness tasks run every eval_tasks_interval steps (0: only at the end) and
    # logged as val_<task>_<metric> (lmforge/train/task_eval.py; needs lmforge[eval] and
    # tokenizer.path). include_path: folders of task YAMLs (offline); limit: items per task.
    eval_tasks: list[str] = Field(default_factory=list)
    eval_tasks_interval: int = Field(0, ge=0)
    eval_tasks_limit: int | None = Field(None, ge=1)
    eval_tasks_include_path: list[str] = Field(default_factory=list)
    eval_tasks_num_fewshot: int | None = Field(None, ge=0)
    eval_tasks_batch_size: int = Field(8, ge=1)
    # Run controls (lmforge/train/controls.py). gc_interval: Python's automatic garbage collection
    # is off during training and every rank collects every N steps (torchtitan's approach: no rank
    # stalls alone mid-step); 0 keeps automatic collection.
    gc_interval: int = Field(50, ge=0)
    # glibc: freed host memory stays in the process for the next step (mallopt) instead of going
    # back to the OS and being faulted in again; the resident size stays at the step's peak.
    malloc_cache: bool = True


class CheckpointConfig(Section):
    interval: int = Field(1000, ge=0)  # 0: only at the end
    keep: int = Field(3, ge=1)
    dir: str | None = None  # default runs/<name>/checkpoints
    export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


# The one list of pipeline schedules (parallel.pp_schedule), in the planner's order of preference;
# the last three run several stages per rank.
PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "gpipe")
PP_MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble", "zbv")


def batch_split_error(global_batch: int, grad_accum_steps: int, dp_size: int, microbatches: int = 1) -> str | None:
    """The one divisibility rule of a step's batch: global_batch_size = micro batch x grad_accum_steps
    x data-parallel size (x pipeline microbatches when they cut the batch further); the reason it
    fails (naming the factors above 1), or None."""
    per_step = grad_accum_steps * dp_size * microbatches
    if global_batch % per_step == 0:
        return None
    factors = [("grad_accum_steps", grad_accum_steps), ("data-parallel size", dp_size), ("pp_microbatches", microbatches)]
    shown = [(name, v) for name, v in factors if v > 1]
    if len(shown) == 1:
        return f"train.global_batch_size {global_batch} is not divisible by {shown[0][0]} {shown[0][1]}"
    names, values = (" x ".join(str(part[i]) for part in shown) for i in (0, 1))
    return f"train.global_batch_size {global_batch} is not divisible by {names} = {values}"


class ParallelConfig(Section):
    strategy: Literal["single", "ddp", "fsdp", "hsdp", "fsdp+tp"] = "single"
    # -1 means "whatever is left of the world size".
    dp_replicate: int = Field(1, ge=-1)
    dp_shard: int = Field(-1, ge=-1)
    tp: int = Field(1, ge=1)
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    ac_every: int = Field(1, ge=1)  # full AC on every N-th block
    compile: bool = False
    # blocks: each block compiled on its own (FSDP-friendly); model: the whole forward and the
    # fused loss kernel (lmforge/parallel/compile.py)
    compile_mode: Literal["blocks", "model"] = "blocks"
    cpu_offload: bool = False
    param_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    reduce_dtype: Literal["bfloat16", "float32"] = "float32"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Pipeline parallel: pp stages (torch.distributed.pipelining), composing with the axes above.
    pp: int = Field(1, ge=1)
    # gpipe and 1f1b run one stage per rank; interleaved_1f1b and zero_bubble (interleaved zero
    # bubble) run pp_virtual_stages >= 2 per rank; zbv (zero bubble, V-shaped) runs exactly 2.
    pp_schedule: Literal[PP_SCHEDULES] = "1f1b"
    pp_microbatches: int | None = Field(None, ge=1)  # None: chosen by the pipeline builder
    pp_virtual_stages: int = Field(1, ge=1)
    # Explicit layers per stage (pp * pp_virtual_stages entries summing to model.num_layers);
    # None balances them, counting the embedding and the output layer's cost.
    pp_layers: list[int] | None = None
    # Vocab-parallel cross-entropy under tensor parallel: logits stay sharded over the vocabulary.
    loss_parallel: bool = False

    @model_validator(mode="after")
    def _pipeline(self) -> ParallelConfig:
        multi = self.pp_schedule in PP_MULTI_STAGE_SCHEDULES
        v = self.pp_virtual_stages
        if self.pp_layers is not None and (not self.pp_layers or min(self.pp_layers) < 0):
            raise ValueError(
                f"@pp_layers expected a non-empty list of layer counts >= 0, got {self.pp_layers}"
            )
        if self.pp_schedule == "zbv" and v != 2:
            raise ValueError(
                f"@pp_virtual_stages {v} with pp_schedule zbv; the V schedule runs exactly 2 stages per rank"
            )
        if multi and v < 2:
            raise ValueError(
                f"@pp_virtual_stages {v} with pp_schedule {self.pp_schedule}; interleaved schedules need "
                "at least 2 stages per rank (or use pp_schedule 1f1b or gpipe)"
            )
        if not multi and v != 1:
            raise ValueError(
                f"@pp_virtual_stages {v} with pp_schedule {self.pp_schedule}, which runs one stage per rank; "
                "use interleaved_1f1b, zero_bubble or zbv, or set pp_virtual_stages 1"
            )
        if self.pp_layers is not None and len(self.pp_layers) != self.pp * v:
            raise ValueError(
                f"@pp_layers has {len(self.pp_layers)} entries; it needs one per stage, pp x pp_virtual_stages "
                f"= {self.pp} x {v} = {self.pp * v}"
            )
        if self.loss_parallel and self.tp == 1:
            raise ValueError(
                "@loss_parallel needs tensor parallelism (parallel.tp > 1); set it false or raise tp"
            )
        return self




class LogConfig(Section):
    interval: int = Field(10, ge=1)
    progress: bool = True
    tensorboard: bool | None = None  # the 'tensorboard' extra: None = when installed, true = needed
    wandb: bool = False
    wandb_project: str = "lmforge"
    wandb_mode: Literal["online", "offline"] = "offline"
    plots: bool | None = None  # the 'plot' extra (matplotlib): None = when installed, true = needed
    # [first, last] optimizer steps (1-based, inclusive) to profile into <run>/profile/: a
    # torch.profiler chrome trace per rank, plus a CUDA memory snapshot or a CPU memory table.
    profile_steps: list[int] | None = None

    @model_validator(mode="after")
    def _profile_steps(self) -> LogConfig:
        steps = self.profile_steps
        if steps is not None and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ValueError(f"@profile_steps expected [first, last] with 1 <= first <= last, got {steps}")
        return self


class RunConfig(Section):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 1337


class Config(Section):
    run_mode: Literal["train", "finetune", "predict", "eval"] = "train"
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"@data.seq_len {self.data.seq_len} is beyond model.max_position_embeddings "
                f"{self.model.max_position_embeddings}; shorten seq_len or raise max_position_embeddings"
            )
        p = self.parallel
        stages = p.pp * p.pp_virtual_stages
        if p.pp_layers is not None and sum(p.pp_layers) != self.model.num_layers:
            raise ValueError(
                f"@parallel.pp_layers sums to {sum(p.pp_layers)} layers but model.num_layers is "
                f"{self.model.num_layers}; the per-stage counts must add up to the model's layers"
            )
        if p.pp_layers is None and stages > self.model.num_layers:
            raise ValueError(
                f"@parallel.pp {p.pp} x pp_virtual_stages {p.pp_virtual_stages} = {stages} stages but the model "
                f"has {self.model.num_layers} layers; every stage needs at least one layer"
            )
        if self.train.z_loss and p.loss_parallel:
            raise ValueError(
                "@train.z_loss with parallel.loss_parallel (vocab-sharded logits) is not supported; "
                "set train.z_loss 0 or parallel.loss_parallel false"
            )
        # With the data-parallel size still unknown (set by the launch), grad_accum_steps alone.
        dp = self.static_dp_size() or 1
        problem = batch_split_error(self.train.global_batch_size, self.train.grad_accum_steps, dp)
        if problem:
            raise ValueError("@" + problem)
        return self

    def static_dp_size(self, world_size: int | None = None) -> int | None:
        """Data-parallel size when it is known without a process group: explicit sizes, or the
        `world_size` a caller knows. The config never reads the environment; the world size is read
        once, at launch (parallel.distributed.launch_env)."""
        p = self.parallel
        if p.strategy == "single":
            return 1
        if p.dp_replicate > 0 and p.dp_shard > 0:
            return p.dp_replicate * p.dp_shard
        if world_size is None:
            return None
        if world_size % (p.tp * p.pp):
            return None  # reported by the mesh builder, which knows the world size for sure
        return world_size // (p.tp * p.pp)

    def micro_batch_size(self, dp_size: int) -> int:
        problem = batch_split_error(self.train.global_batch_size, self.train.grad_accum_steps, dp_size)
        if problem:
            raise ConfigError(f"{problem}; change train.global_batch_size or grad_accum_steps to fit the layout")
        return self.train.global_batch_size // (self.train.grad_accum_steps * dp_size)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def help_yaml(self) -> str:
        """to_yaml() with the keys of each unset optional section (model.moe, model.rope_scaling)
        shown as a comment under its `null`, so --help-config lists every key there is."""
        hints = {}
        for name in type(self).model_fields:
            section = getattr(self, name)
            for key, field in type(section).model_fields.items() if isinstance(section, Section) else ():
                sub = next((t for t in get_args(field.annotation) if isinstance(t, type) and issubclass(t, Section)), None)
                if sub is not None and getattr(section, key) is None:
                    flow = yaml.safe_dump(sub().model_dump(mode="json"), default_flow_style=True, sort_keys=False, width=1 << 20)
                    hints[(name, key)] = f"  # {key}: {flow.strip()}  (null = off; these are the defaults when set)"
        lines, top = [], None
        for line in self.to_yaml().splitlines():
            lines.append(line)
            if line and not line[0].isspace():
                top = line.split(":", 1)[0]
            elif line.startswith("  ") and not line.startswith("   ") and line.endswith(": null"):
                hint = hints.get((top, line.strip().split(":", 1)[0]))
                if hint:
                    lines.append(hint)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Loading


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling against `lmforge train --help-config`"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        # Validators that check several fields name the key they blame as "@key message".
        if msg.startswith("@"):
            rel, _, msg = msg[1:].partition(" ")
            key = f"{key}.{rel}" if key else rel
    where = f"{source}: {key}" if key else source
    return f"{where}: {msg}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted: str, value: Any, source: str) -> None:
    """Set `a.b.c=value` in a nested dict, creating sections as needed."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value, for example train.max_steps=100")
        key, _, text = item.partition("=")
        parsed.append((key.strip(), _parse_value(text)))
    return parsed


def apply_overrides(tree: dict, parsed: list[tuple[str, Any]], source: str) -> list[str]:
    """Apply parsed `key=value` overrides to `tree` and return notes for the user.

    `model.preset=X` goes first and replaces the file's model shape keys with the preset's (a
    model called X must have X's shape): the note names every file key it dropped. Shape keys
    given on the command line beside it still customise the preset."""
    notes = []
    presets = [(k, v) for k, v in parsed if k == "model.preset"]
    if presets and isinstance(tree.get("model"), dict):
        tree["model"], dropped = without_shape_keys(tree["model"])
        if dropped:
            keys = ", ".join(f"model.{k}" for k in dropped)
            notes.append(
                f"model.preset={presets[-1][1]} on the command line replaces {source}'s {keys} with the "
                "preset's shape; set shape keys on the command line to change the preset"
            )
    for key, value in presets + [(k, v) for k, v in parsed if k != "model.preset"]:
        apply_override(tree, key, value, source)
    return notes


def config_from_dict(tree: dict, source: str = "<config>") -> Config:
    tree = copy.deepcopy(tree)
    if isinstance(tree.get("model"), dict):
        tree["model"] = expand_preset(tree["model"], source)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def parallel_section(values: dict) -> ParallelConfig:
    """A validated parallel section alone (the planner's candidate layouts); ConfigError naming the key."""
    try:
        return ParallelConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_format_error("parallel", err).replace("parallel: ", "parallel.", 1)) from None


def config_for_model(model: ModelConfig | dict, source: str = "<model>") -> Config:
    """A run config around a bare model config (HF imports, weights exports): defaults for every
    other section, with data.seq_len kept within the model's positions so the tree validates."""
    tree = model.model_dump(mode="json") if isinstance(model, ModelConfig) else dict(model)
    limit = tree.get("max_position_embeddings") or ModelConfig().max_position_embeddings
    seq_len = min(DataConfig().seq_len, int(limit))
    return config_from_dict({"model": tree, "data": {"seq_len": seq_len}}, source)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file with --config")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; pass a YAML file with --config")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return tree


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, notes: list[str] | None = None
) -> Config:
    """Load a YAML file (or defaults) and apply `key=value` overrides, then validate. Lines the
    user should see are appended to `notes` when given. (MindFormers YAML: lmforge.mindformers.)"""
    tree = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    return config_from_tree(tree, source, overrides, notes)


def config_from_tree(
    tree: dict, source: str, overrides: list[str] | None = None, notes: list[str] | None = None
) -> Config:
    parsed = parse_overrides(overrides or [])
    found = apply_overrides(tree, parsed, source)
    if notes is not None:
        notes.extend(found)
    if parsed:
        source = f"{source} (with overrides)"
    return config_from_dict(tree, source)
