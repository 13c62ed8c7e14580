"""MindFormers run configs (`pretrain_llama2_7b.yaml`, `pretrain_llama3_70b.yaml`, ...) as lmforge input.

`convert(tree)` maps a MindFormers YAML tree onto an lmforge config tree and returns, besides the
tree, one row per mapped key and one line per ignored key with the reason. `lmforge train
--config <MindFormers YAML>` and `lmforge plan` use it when `looks_like_mindformers` says so;
`lmforge config convert` writes the result as an lmforge YAML file.

MindFormers semantics kept (from its Llama configs and trainer):
  global batch = runner_config.batch_size x data_parallel x gradient_accumulation_steps
                 x micro_batch_num (the last only when pipeline_stage > 1)
  FFN width    = LlamaConfig's rule: int(2 * 4h / 3), x ffn_dim_multiplier, rounded up to
                 multiple_of (default 256) unless intermediate_size is given
  n_kv_heads   absent means multi-head attention (= num_heads); theta defaults to 10000
  weight decay AdamWeightDecay's default is 0.0 when the YAML sets none
  resume_training False means start fresh (lmforge's default would resume)
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import ConfigError
from lmforge.mindformers.keys import DTYPES, IGNORED, IGNORED_PREFIXES, MODEL_IGNORED, OPTIMIZERS, SCHEDULES


def looks_like_mindformers(tree: dict) -> bool:
    model = tree.get("model")
    return (
        (isinstance(model, dict) and "model_config" in model)
        or "runner_config" in tree
        or "parallel_config" in tree
    )


class _Mapper:
    def __init__(self, source: str):
        self.source = source
        self.tree: dict[str, Any] = {}
        self.mapped: list[tuple[str, str, Any]] = []
        self.ignored: list[tuple[str, str]] = []

    def set(self, mf_key: str, key: str, value: Any) -> None:
        node = self.tree
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
        self.mapped.append((mf_key, key, value))

    def note(self, mf_key: str, what: str, value: Any) -> None:
        """A row of the table that sets no key (what lmforge does instead)."""
        self.mapped.append((mf_key, what, value))

    def ignore(self, mf_key: str, why: str) -> None:
        self.ignored.append((mf_key, why))

    def fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.source}: {key}: {message}")


def _section(tree: dict, key: str, mapper: _Mapper) -> dict:
    value = tree.get(key) or {}
    if not isinstance(value, dict):
        mapper.fail(key, f"expected a mapping, got {type(value).__name__}")
    return value


def _model(mc: dict, mp: _Mapper, pp: int) -> int:
    need = ("hidden_size", "num_layers", "num_heads", "vocab_size", "seq_length")
    missing = [k for k in need if mc.get(k) is None]
    if missing:
        mp.fail("model.model_config", f"missing {', '.join(missing)}; lmforge needs the model's shape")
    for key, target in (
        ("hidden_size", "hidden_size"),
        ("num_layers", "num_layers"),
        ("num_heads", "num_heads"),
    ):
        mp.set(f"model.model_config.{key}", f"model.{target}", int(mc[key]))
    mp.set(
        "model.model_config.n_kv_heads", "model.num_kv_heads", int(mc.get("n_kv_heads") or mc["num_heads"])
    )
    mp.set("model.model_config.vocab_size", "model.vocab_size", int(mc["vocab_size"]))
    mp.set("model.model_config (LlamaConfig)", "model.ffn_rule", "llama")
    if mc.get("intermediate_size"):
        mp.set(
            "model.model_config.intermediate_size", "model.intermediate_size", int(mc["intermediate_size"])
        )
    mp.set("model.model_config.multiple_of", "model.multiple_of", int(mc.get("multiple_of") or 256))
    if mc.get("ffn_dim_multiplier") is not None:
        mp.set(
            "model.model_config.ffn_dim_multiplier",
            "model.ffn_dim_multiplier",
            float(mc["ffn_dim_multiplier"]),
        )
    seq = int(mc["seq_length"])
    mp.set("model.model_config.seq_length", "data.seq_len", seq)
    label = "max_position_embedding" if mc.get("max_position_embedding") else "seq_length"
    positions = int(mc.get("max_position_embedding") or seq)
    mp.set(f"model.model_config.{label}", "model.max_position_embeddings", positions)
    mp.set("model.model_config.theta", "model.rope_theta", float(mc.get("theta") or 10000.0))
    mp.set("model.model_config.rms_norm_eps", "model.norm_eps", float(mc.get("rms_norm_eps") or 1e-5))
    mp.set("model.model_config (Llama)", "model.tie_embeddings", bool(mc.get("tie_word_embeddings", False)))
    dtype = str(mc.get("compute_dtype") or "float16")
    if dtype not in DTYPES:
        mp.fail("model.model_config.compute_dtype", f"'{dtype}' is not float16, bfloat16 or float32")
    mp.set("model.model_config.compute_dtype", "train.dtype", DTYPES[dtype])
    if dtype != "float32":
        mp.set("model.model_config.compute_dtype", "parallel.param_dtype", DTYPES[dtype])
    if (
        str(mc.get("extend_method", "None")) not in ("None", "none")
        or float(mc.get("scaling_factor", 1.0)) != 1.0
    ):
        mp.fail(
            "model.model_config.extend_method",
            "RoPE scaling (PI/NTK) is not supported; set extend_method 'None'",
        )
    offset = mc.get("offset", 0)
    layers = int(mc["num_layers"])
    if isinstance(offset, list) and pp > 1 and any(offset):
        if len(offset) != pp or (layers - sum(offset)) % pp:
            mp.fail("model.model_config.offset", f"{offset} does not fit {layers} layers on {pp} stages")
        base = (layers - sum(offset)) // pp
        mp.set("model.model_config.offset", "parallel.pp_layers", [base + int(o) for o in offset])
        mc = {k: v for k, v in mc.items() if k != "offset"}
    handled = {
        "hidden_size", "num_layers", "num_heads", "n_kv_heads", "vocab_size", "intermediate_size", "multiple_of",
        "ffn_dim_multiplier", "seq_length", "max_position_embedding", "theta", "rms_norm_eps", "compute_dtype",
        "tie_word_embeddings",
    }  # fmt: skip
    for key in mc:
        if key not in handled:
            mp.ignore(f"model.model_config.{key}", MODEL_IGNORED.get(key, "no lmforge equivalent"))
    return layers


def _parallel(pc: dict, tree: dict, mp: _Mapper) -> tuple[int, int, int, int]:
    dp, tp, pp = (int(pc.get(k) or 1) for k in ("data_parallel", "model_parallel", "pipeline_stage"))
    micro_num = int(pc.get("micro_batch_num") or 1)
    sharded = bool((tree.get("parallel") or {}).get("enable_parallel_optimizer", False))
    if tp > 1:
        strategy = "fsdp+tp"
    elif dp > 1:
        strategy = "fsdp" if sharded else "ddp"
    else:
        strategy = "single"
    mp.set("parallel_config (+ parallel.enable_parallel_optimizer)", "parallel.strategy", strategy)
    if strategy == "ddp":
        mp.set("parallel_config.data_parallel", "parallel.dp_replicate", dp)
    else:
        mp.set("parallel_config.data_parallel", "parallel.dp_shard", dp)
        mp.set("parallel_config.data_parallel", "parallel.dp_replicate", 1)
    mp.set("parallel_config.model_parallel", "parallel.tp", tp)
    mp.set("parallel_config.pipeline_stage", "parallel.pp", pp)
    if pp > 1:
        # lmforge's pipeline cuts a step's whole batch (all accumulation steps) into
        # pp_microbatches; MindFormers runs micro_batch_num per accumulation step.
        accum = int((tree.get("runner_config") or {}).get("gradient_accumulation_steps") or 1)
        label = "parallel_config.micro_batch_num" + (" x gradient_accumulation_steps" if accum > 1 else "")
        mp.set(label, "parallel.pp_microbatches", micro_num * accum)
    elif micro_num > 1:
        mp.ignore("parallel_config.micro_batch_num", "only used with pipeline_stage > 1 (as in MindFormers)")
    for key in pc:
        if key not in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
            why = IGNORED.get(f"parallel_config.{key}", "no lmforge equivalent")
            mp.ignore(f"parallel_config.{key}", why)
    return dp, tp, pp, micro_num if pp > 1 else 1


def _recompute(rc: dict, mp: _Mapper) -> None:
    def on(value) -> bool:
        return any(bool(v) for v in value) if isinstance(value, list) else bool(value)

    if on(rc.get("recompute")):
        mode, key = "full", "recompute_config.recompute"
    elif on(rc.get("select_recompute")):
        mode, key = "selective", "recompute_config.select_recompute"
    else:
        mode, key = "none", "recompute_config.recompute"
    mp.set(key, "parallel.activation_checkpoint", mode)
    for k in rc:
        if k not in ("recompute", "select_recompute"):
            mp.ignore(f"recompute_config.{k}", IGNORED.get(f"recompute_config.{k}", "no lmforge equivalent"))


def _optimizer(tree: dict, mp: _Mapper) -> None:
    opt, lr = _section(tree, "optimizer", mp), _section(tree, "lr_schedule", mp)
    kind = opt.get("type", "AdamWeightDecay")
    if kind not in OPTIMIZERS:
        mp.fail(
            "optimizer.type",
            f"{kind} has no lmforge equivalent; lmforge trains with AdamW ({', '.join(OPTIMIZERS)} map to it)",
        )
    mp.note(f"optimizer.type ({kind})", "optimizer", "AdamW with float32 states")
    if "betas" in opt:  # MindFormers 1.6+ (AdamW): betas: [b1, b2]
        betas = opt["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            mp.fail("optimizer.betas", f"{betas!r} is not a list of two numbers [beta1, beta2]")
        mp.set("optimizer.betas", "optim.betas", [float(b) for b in betas])
    else:
        mp.set(
            "optimizer.beta1, beta2",
            "optim.betas",
            [float(opt.get("beta1", 0.9)), float(opt.get("beta2", 0.999))],
        )
    mp.set("optimizer.eps", "optim.eps", float(opt.get("eps", 1e-8)))
    mp.set("optimizer.weight_decay", "optim.weight_decay", float(opt.get("weight_decay", 0.0)))
    rate = lr.get("learning_rate", opt.get("learning_rate"))
    if rate is None:
        mp.fail("lr_schedule.learning_rate", "missing; set the peak learning rate")
    mp.set("lr_schedule.learning_rate", "optim.lr", float(rate))
    schedule = lr.get("type", "ConstantWarmUpLR") if lr else "ConstantWarmUpLR"
    if schedule not in SCHEDULES:
        mp.fail(
            "lr_schedule.type", f"{schedule} has no lmforge equivalent; use one of {', '.join(SCHEDULES)}"
        )
    mp.set("lr_schedule.type", "optim.schedule", SCHEDULES[schedule])
    mp.set("lr_schedule.lr_end", "optim.min_lr_ratio", float(lr.get("lr_end", 0.0)) / float(rate))
    if lr.get("warmup_steps") is not None:
        mp.set("lr_schedule.warmup_steps", "optim.warmup_steps", int(lr["warmup_steps"]))
    else:
        mp.set("lr_schedule.warmup_ratio", "optim.warmup_ratio", float(lr.get("warmup_ratio", 0.0)))
    total = lr.get("total_steps")
    if total not in (None, -1):
        mp.set("lr_schedule.total_steps", "train.max_steps", int(total))
    use_clip = (tree.get("runner_wrapper") or {}).get("use_clip_grad", True)
    mp.set("runner_wrapper.use_clip_grad", "optim.grad_clip", 1.0 if use_clip else 0.0)
    for key in opt:
        if key not in ("type", "beta1", "beta2", "betas", "eps", "weight_decay", "learning_rate"):
            mp.ignore(f"optimizer.{key}", "no lmforge equivalent")
    for key in lr:
        if key not in ("type", "learning_rate", "lr_end", "warmup_ratio", "warmup_steps", "total_steps"):
            mp.ignore(f"lr_schedule.{key}", "no lmforge equivalent")


def convert(tree: dict, source: str = "<mindformers>") -> tuple[dict, list, list]:
    """(lmforge config tree, [(MindFormers key, lmforge key, value)], [(MindFormers key, why ignored)])."""
    mp = _Mapper(source)
    model = _section(tree, "model", mp)
    mc = model.get("model_config") if isinstance(model.get("model_config"), dict) else None
    if mc is None:
        mp.fail("model.model_config", "missing; a MindFormers run config describes its model there")
    pc, rc, runner = (_section(tree, k, mp) for k in ("parallel_config", "recompute_config", "runner_config"))
    dp, tp, pp, micro_num = _parallel(pc, tree, mp)
    _model(mc, mp, pp)
    _recompute(rc, mp)
    _optimizer(tree, mp)
    batch, accum = int(runner.get("batch_size") or 1), int(runner.get("gradient_accumulation_steps") or 1)
    mp.set(
        "runner_config.batch_size x dp x grad_accum x micro_batch_num",
        "train.global_batch_size",
        batch * dp * accum * micro_num,
    )
    mp.set("runner_config.gradient_accumulation_steps", "train.grad_accum_steps", accum)
    if runner.get("epochs") is not None and "max_steps" not in mp.tree.get("train", {}):
        mp.set("runner_config.epochs", "train.epochs", float(runner["epochs"]))
    for key in runner:
        if key not in ("batch_size", "gradient_accumulation_steps", "epochs"):
            mp.ignore(f"runner_config.{key}", IGNORED.get(f"runner_config.{key}", "no lmforge equivalent"))
    if tree.get("seed") is not None:
        mp.set("seed", "run.seed", int(tree["seed"]))
    name = (tree.get("trainer") or {}).get("model_name")
    if name:
        mp.set("trainer.model_name", "run.name", str(name))
    if tree.get("output_dir"):
        mp.set("output_dir", "run.out_dir", str(tree["output_dir"]))
    mode = str(tree.get("run_mode") or "train")
    if mode not in ("train", "finetune", "predict", "eval"):
        mp.fail("run_mode", f"'{mode}' is not train, finetune, predict or eval")
    resume, weights = tree.get("resume_training", False), tree.get("load_checkpoint")
    if weights and resume is True:
        # MindFormers resumes the run saved in load_checkpoint (weights, optimizer, step).
        mp.set("load_checkpoint + resume_training True", "train.resume", str(weights))
    else:
        if weights:
            mp.set("load_checkpoint", "train.load_checkpoint", str(weights))
            if mode == "train":
                mode = "finetune"  # MindFormers' train + load_checkpoint starts from those weights
        how = "auto" if resume is True else "never" if not resume else str(resume)
        mp.set("resume_training", "train.resume", how)
    mp.set("run_mode", "run_mode", mode)
    loader = _section(tree, "train_dataset", mp).get("data_loader") or {}
    if loader.get("dataset_dir"):
        mp.set("train_dataset.data_loader.dataset_dir", "data.train", [str(loader["dataset_dir"])])
    if "shuffle" in loader:
        mp.set("train_dataset.data_loader.shuffle", "data.shuffle", bool(loader["shuffle"]))
    valid = (_section(tree, "eval_dataset", mp).get("data_loader") or {}).get("dataset_dir")
    if valid:
        mp.set("eval_dataset.data_loader.dataset_dir", "data.valid", str(valid))
    _callbacks(tree, mp)
    done = {"model", "parallel_config", "recompute_config", "runner_config", "optimizer", "lr_schedule", "seed",
            "trainer", "output_dir", "run_mode", "load_checkpoint", "resume_training"}  # fmt: skip
    if _tokenizer(tree, mp):
        done.add("processor")
    for key in tree:
        if key in done:
            continue
        why = IGNORED.get(key) or next((w for p, w in IGNORED_PREFIXES.items() if key.startswith(p)), None)
        mp.ignore(key, why or "not a MindFormers key lmforge knows")
    if isinstance(tree.get("trainer"), dict) and "type" in tree["trainer"]:
        mp.ignore("trainer.type", IGNORED["trainer.type"])
    if "arch" in model:
        mp.ignore("model.arch", IGNORED["model.arch"])
    return mp.tree, mp.mapped, mp.ignored


def _tokenizer(tree: dict, mp: _Mapper) -> bool:
    """processor.tokenizer.vocab_file (tokenizer.model) or tokenizer_file (tokenizer.json) ->
    tokenizer.path; whether it was mapped. Its type and special tokens come from the file itself."""
    tok = _section(tree, "processor", mp).get("tokenizer")
    if not isinstance(tok, dict):
        return False
    key = next((k for k in ("tokenizer_file", "vocab_file") if tok.get(k)), None)
    if key is None:
        return False
    mp.set(f"processor.tokenizer.{key}", "tokenizer.path", str(tok[key]))
    rest = sorted(k for k in tok if k != key)
    if rest:
        mp.ignore(f"processor.tokenizer.{', '.join(rest)}", "the tokenizer's own files define its type and special tokens")
    return True


def _callbacks(tree: dict, mp: _Mapper) -> None:
    for cb in tree.get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("type") == "CheckpointMonitor":
            if cb.get("save_checkpoint_steps"):
                mp.set(
                    "callbacks.CheckpointMonitor.save_checkpoint_steps",
                    "checkpoint.interval",
                    int(cb["save_checkpoint_steps"]),
                )
            if cb.get("keep_checkpoint_max"):
                mp.set(
                    "callbacks.CheckpointMonitor.keep_checkpoint_max",
                    "checkpoint.keep",
                    int(cb["keep_checkpoint_max"]),
                )
