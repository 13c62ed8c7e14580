"""The config tree: one-line errors for every kind of bad input, overrides, and YAML round trips."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from paths import REPO

from lmforge.config import Config, config_from_dict, load_config, parse_overrides
from lmforge.errors import ConfigError, LmforgeError

HAS_PRESETS = importlib.util.find_spec("lmforge.model.presets") is not None


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tree: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree, "bad.yaml")
    message = str(info.value)
    assert "\n" not in message, "config errors must be one line"
    assert message.startswith("bad.yaml: "), message
    return message


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"model": {"hiden_size": 64}}, "bad.yaml: model.hiden_size: unknown key"),
        ({"trian": {}}, "bad.yaml: trian: unknown key"),
        ({"model": {"hidden_size": "wide"}}, "model.hidden_size: Input should be a valid integer"),
        ({"train": {"max_steps": True}}, "train.max_steps: expected a number, got true"),
        ({"optim": {"lr": False}}, "optim.lr: expected a number, got false"),
        ({"train": {"sample_prompts": "Once"}}, "train.sample_prompts: Input should be a valid list"),
        ({"model": 5}, "bad.yaml: model: Input should be a valid dictionary"),
        ({"run_mode": "serve"}, "run_mode: Input should be 'train', 'finetune', 'predict' or 'eval'"),
        (
            {"model": {"hidden_size": 100, "num_heads": 8}},
            "model.num_heads: hidden_size 100 is not divisible by num_heads 8",
        ),
        (
            {"model": {"num_heads": 8, "num_kv_heads": 3}},
            "model.num_kv_heads: 3 does not divide num_heads 8",
        ),
        (
            {"data": {"seq_len": 2048}, "model": {"max_position_embeddings": 1024}},
            "data.seq_len: 2048 is beyond model.max_position_embeddings 1024",
        ),
        (
            {"train": {"global_batch_size": 30, "grad_accum_steps": 4}},
            "train.global_batch_size: 30 is not divisible by grad_accum_steps 4",
        ),
        (
            {
                "train": {"global_batch_size": 32, "grad_accum_steps": 4},
                "parallel": {"strategy": "ddp", "dp_replicate": 1, "dp_shard": 3},
            },
            "train.global_batch_size: 32 is not divisible by grad_accum_steps x data-parallel size = 4 x 3",
        ),
        ({"model": {"moe": {"num_experts": 2, "top_k": 3}}}, "model.moe.top_k: 3 is larger than"),
        ({"optim": {"min_lr_ratio": 1.5}}, "optim.min_lr_ratio: Input should be less than or equal to 1"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tree, expected):
    assert expected in error_of(tree)


def test_data_parallel_size_comes_from_the_launch_not_the_environment(monkeypatch):
    # The config never reads WORLD_SIZE: the world size is read once, at launch, and the batch
    # rule is checked there (micro_batch_size) with the data-parallel size the mesh resolved.
    tree = {"train": {"global_batch_size": 32, "grad_accum_steps": 2}, "parallel": {"strategy": "ddp"}}
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = config_from_dict(tree)
    assert cfg.static_dp_size() is None and cfg.static_dp_size(world_size=4) == 4
    assert cfg.micro_batch_size(4) == 4
    with pytest.raises(ConfigError, match="not divisible by grad_accum_steps x data-parallel size = 2 x 3"):
        cfg.micro_batch_size(3)


@pytest.mark.skipif(not HAS_PRESETS, reason="lmforge.model.presets has not landed")
def test_unknown_preset_names_the_key():
    message = error_of({"model": {"preset": "gpt-17"}})
    assert "model.preset" in message and "gpt-17" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_invalid_yaml_reports_the_line(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 64\n  num_heads: [4\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line ") and "is not valid YAML" in message
    line = int(message.split("line ")[1].split()[0])
    assert 3 <= line <= 4  # the unclosed bracket opens on line 3; the parser notices on line 4


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- model\n- train\n"))


def test_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "model:\n  num_kv_heads: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model.num_kv_heads: 3 does not divide"):
        load_config(path)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_round_trip_yaml_tree_yaml_tree(tmp_path):
    text = """
run_mode: finetune
run: {name: rt, seed: 7}
model: {hidden_size: 96, num_layers: 3, num_heads: 6, num_kv_heads: 2, rope_theta: 500000.0,
        tie_embeddings: false, rope_scaling: {factor: 4.0}, moe: {num_experts: 4, top_k: 2}}
data: {train: [a, {path: b, weight: 3}], seq_len: 128, mode: padded}
optim: {lr: 3.0e-4, schedule: wsd, betas: [0.9, 0.99]}
train: {global_batch_size: 8, grad_accum_steps: 2, max_tokens: 100000, sample_prompts: [x, 你好]}
checkpoint: {interval: 50, keep: 2}
log: {wandb: true, wandb_mode: offline}
"""
    first = load_config(write(tmp_path, text))
    assert first.data.train[1].weight == 3 and first.model.moe.top_k == 2
    dumped = first.to_yaml()
    second = load_config(write(tmp_path, dumped, "again.yaml"))
    assert second == first
    assert second.to_yaml() == dumped
    saved = tmp_path / "saved.yaml"
    second.save(saved)
    assert load_config(saved) == first
    assert yaml.safe_load(dumped)["model"]["rope_scaling"]["factor"] == 4.0


@pytest.mark.skipif(not HAS_PRESETS, reason="lmforge.model.presets has not landed")
def test_round_trip_with_a_preset(tmp_path):
    from lmforge.model.presets import PRESETS

    name = "minimind2-26m" if "minimind2-26m" in PRESETS else sorted(PRESETS)[0]
    first = load_config(write(tmp_path, f"model: {{preset: {name}, num_layers: 2}}\n"))
    assert first.model.preset == name and first.model.num_layers == 2
    second = load_config(write(tmp_path, first.to_yaml(), "again.yaml"))
    assert second == first


def test_overrides_apply_with_yaml_types(tmp_path):
    path = write(tmp_path, "train: {max_steps: 100}\nmodel: {hidden_size: 64, num_heads: 4}\n")
    cfg = load_config(
        path,
        [
            "train.max_steps=5",
            "log.wandb=true",
            "optim.lr=1e-3",
            "train.sample_prompts=[Hello, 'Once upon']",
            "data.train=[x, y]",
            "model.moe.num_experts=2",
            "model.moe.top_k=1",
            "run.name=my run",
        ],
    )
    assert cfg.train.max_steps == 5
    assert cfg.log.wandb is True
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.sample_prompts == ["Hello", "Once upon"]
    assert [d.path for d in cfg.data.train] == ["x", "y"]
    assert cfg.model.moe.num_experts == 2 and cfg.model.hidden_size == 64
    assert cfg.run.name == "my run"


def test_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match="override 'train.max_steps': expected key=value"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["=5"])
    with pytest.raises(ConfigError, match=r"train.max_steps.x: 'max_steps' is a value, not a section"):
        load_config(None, ["train.max_steps=5", "train.max_steps.x=1"])
    with pytest.raises(ConfigError, match=r"\(with overrides\): train.max_stepz: unknown key"):
        load_config(write(tmp_path, "{}"), ["train.max_stepz=5"])
    with pytest.raises(LmforgeError, match="train.max_steps: Input should be greater than or equal to 1"):
        load_config(None, ["train.max_steps=0"])


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    if not HAS_PRESETS and "preset" in (REPO / "configs" / name).read_text():
        pytest.skip("needs lmforge.model.presets")
    cfg = load_config(REPO / "configs" / name)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize(
    "parallel, expected",
    [
        ({"pp": 0}, "parallel.pp: Input should be greater than or equal to 1"),
        ({"pp": 2, "pp_schedule": "zbv"}, "parallel.pp_virtual_stages: 1 with pp_schedule zbv"),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b"}, "interleaved schedules need at least 2"),
        ({"pp": 2, "pp_virtual_stages": 2}, "pp_schedule 1f1b, which runs one stage per rank"),
        ({"pp": 2, "pp_schedule": "pipedream"}, "parallel.pp_schedule: Input should be"),
        ({"pp": 2, "pp_layers": [1, 1, 1]}, "parallel.pp_layers: has 3 entries; it needs one per stage"),
        ({"pp": 2, "pp_layers": [3, 4]}, "parallel.pp_layers: sums to 7 layers but model.num_layers is 8"),
        ({"pp": 2, "pp_layers": [-1, 9]}, "parallel.pp_layers: expected a non-empty list"),
        ({"pp": 9}, "parallel.pp: 9 x pp_virtual_stages 1 = 9 stages but the model has 8 layers"),
        ({"pp": 2, "pp_microbatches": 0}, "parallel.pp_microbatches: Input should be greater than"),
        ({"loss_parallel": True}, "parallel.loss_parallel: needs tensor parallelism"),
    ],
)
def test_pipeline_keys_are_validated(parallel, expected):
    assert expected in error_of({"parallel": parallel})


@pytest.mark.parametrize("key", ["document_mask", "reset_positions"])
def test_document_layout_under_pipeline_parallel_is_accepted(key):
    # the masks and positions travel with each pipeline microbatch (parallel/pipeline_step.py)
    cfg = config_from_dict({"data": {key: True}, "parallel": {"pp": 2}})
    assert getattr(cfg.data, key) and cfg.parallel.pp == 2


def test_pipeline_keys_accept_valid_layouts():
    cfg = config_from_dict(
        {
            "parallel": {
                "pp": 2,
                "pp_schedule": "interleaved_1f1b",
                "pp_virtual_stages": 2,
                "pp_layers": [1, 3, 3, 1],
            }
        }
    )
    assert (cfg.parallel.pp, cfg.parallel.pp_virtual_stages, cfg.parallel.pp_layers) == (2, 2, [1, 3, 3, 1])
    assert config_from_dict({}).parallel.pp_schedule == "1f1b"
    # World size 8 = pp 2 x tp 2 x dp 2: the data-parallel size excludes the pipeline axis.
    cfg = config_from_dict({"parallel": {"strategy": "fsdp+tp", "tp": 2, "pp": 2}})
    assert cfg.static_dp_size(world_size=8) == 2


# ---------------------------------------------------------------------------------------------
# MindFormers run configs and command-line presets

MF = REPO / "tests" / "fixtures" / "mindformers"


def load_run_config(path):
    from lmforge.mindformers import load_run_config as load

    return load(path)


def _lmforge(*args, cwd=None):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_mindformers_llama2_7b_maps_every_listed_key():
    cfg = load_run_config(MF / "llama2_7b_pretrain.yaml")
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.vocab_size) == (
        4096,
        32,
        32,
        32,
        32000,
    )
    from lmforge.model import resolve_intermediate_size

    assert resolve_intermediate_size(m) == 11008 and m.tie_embeddings is False and m.rope_theta == 1e4
    assert cfg.data.seq_len == 4096 and cfg.data.train[0].path == "data/wikitext2-llama2-4096"
    # data_parallel 8 with MindSpore's parallel optimizer (sharded states) -> FSDP over 8.
    assert (p.strategy, p.dp_shard, p.tp, p.pp, p.activation_checkpoint) == ("fsdp", 8, 1, 1, "none")
    # batch_size 1 x data_parallel 8 x gradient_accumulation_steps 8 (no pipeline: micro_batch_num unused)
    assert (t.global_batch_size, t.grad_accum_steps, t.epochs, t.dtype) == (64, 8, 2.0, "float16")
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.schedule, o.min_lr_ratio) == (
        5e-5,
        (0.9, 0.95),
        1e-8,
        0.0,
        "cosine",
        0.0,
    )
    assert o.warmup_ratio == 0.03 and o.grad_clip == 1.0
    assert (cfg.run.name, cfg.run.seed, cfg.run_mode, t.resume, cfg.checkpoint.interval) == (
        "llama2_7b",
        0,
        "train",
        "never",
        100,
    )


def test_mindformers_llama3_70b_is_tp8_pp8_with_256_micro_batches():
    cfg = load_run_config(MF / "llama3_70b_pretrain.yaml")
    p = cfg.parallel
    assert (p.strategy, p.dp_shard, p.tp, p.pp, p.pp_microbatches) == ("fsdp+tp", 1, 8, 8, 256)
    assert p.activation_checkpoint == "selective"  # select_recompute lists layers per stage
    assert cfg.train.global_batch_size == 256 and cfg.train.dtype == "bfloat16"
    from lmforge.model import resolve_intermediate_size

    # MindFormers' LlamaConfig rule with this file's multiple_of 256: int(1.3 * int(2 * 32768 / 3))
    # = 28398, rounded up to 28416 (Meta's 70B uses 28672 from multiple_of 4096).
    assert resolve_intermediate_size(cfg.model) == 28416
    assert (cfg.model.num_kv_heads, cfg.model.rope_theta) == (8, 5e5)


def test_config_convert_writes_a_loadable_file_and_lists_ignored_keys(tmp_path):
    out = tmp_path / "llama2.yaml"
    code, stdout, err = _lmforge("config", "convert", str(MF / "llama2_7b_pretrain.yaml"), "--out", str(out))
    assert code == 0, err
    assert "train.global_batch_size" in stdout and "parallel.strategy" in stdout
    assert "  ignored context: MindSpore runtime settings" in stdout
    assert "  ignored runner_config.sink_mode: MindSpore data sinking" in stdout
    assert load_config(out).model_dump() == load_run_config(MF / "llama2_7b_pretrain.yaml").model_dump()
    before = out.read_bytes()
    code, _, err = _lmforge("config", "convert", str(MF / "llama2_7b_pretrain.yaml"), "--out", str(out))
    assert (
        code == 2 and err.strip() == f"error: {out}: already exists; choose another --out or pass --overwrite"
    )
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"lr_schedule": {"type": "PolynomialWithWarmUpLR", "learning_rate": 1e-4}},
            "lr_schedule.type: PolynomialWithWarmUpLR has no lmforge equivalent",
        ),
        ({"optimizer": {"type": "Came"}}, "optimizer.type: Came has no lmforge equivalent"),
        (
            {"model": {"model_config": {"hidden_size": 64}}},
            "model.model_config: missing num_layers, num_heads, vocab_size, seq_length",
        ),
    ],
)
def test_unmappable_mindformers_keys_are_one_line_errors(tmp_path, change, message):
    tree = yaml.safe_load((MF / "tiny_pp2_tp2.yaml").read_text())
    tree.update(change)
    path = write(tmp_path, yaml.safe_dump(tree), "mf.yaml")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == f"{path}: {message}" or str(info.value).startswith(f"{path}: {message}")


def test_warmup_ratio_is_a_fraction_of_the_run():
    from lmforge.config import OptimConfig
    from lmforge.train.schedule import lr_multiplier

    assert lr_multiplier(OptimConfig(warmup_ratio=0.03), 1000).warmup_steps == 30
    assert lr_multiplier(OptimConfig(warmup_steps=7), 1000).warmup_steps == 7


def test_command_line_preset_replaces_the_files_shape(tmp_path):
    path = write(tmp_path, "model: {hidden_size: 128, num_layers: 3, dropout: 0.1}\ndata: {seq_len: 64}\n")
    code, out, err = _lmforge("train", "--config", str(path), "model.preset=tiny", "--help-config")
    assert code == 0, err
    note = [line for line in out.splitlines() if line.startswith("note: model.preset=tiny")]
    assert note and "model.hidden_size, model.num_layers" in note[0] and "dropout" not in note[0]
    tree = yaml.safe_load(out.split("\n", 2)[-1] if out.startswith("note") else out)
    assert tree["model"]["hidden_size"] == 64 and tree["model"]["num_layers"] == 2  # tiny's shape
    assert tree["model"]["dropout"] == 0.1  # not a shape key: kept
    # Shape keys on the command line beside the preset still customise it, in any order.
    notes: list[str] = []
    cfg = load_config(path, ["model.num_layers=4", "model.preset=tiny"], notes=notes)
    assert (cfg.model.preset, cfg.model.hidden_size, cfg.model.num_layers) == ("tiny", 64, 4)
    assert len(notes) == 1


def test_mindformers_yaml_trains_unchanged(tmp_path):
    from jobs import make_dataset

    data = make_dataset(tmp_path / "data")
    code, out, err = _lmforge(
        "train", "--config", str(MF / "tiny_pp2_tp2.yaml"), "--train_dataset_dir", str(data),
        "--use_parallel", "False", "--run_mode", "train",
        # One process: the file's TP 2 x PP 2 needs 4 (tests/integration/test_launch.py runs it so).
        "parallel.strategy=single", "parallel.tp=1", "parallel.pp=1",
        f"run.out_dir={tmp_path}/runs", "train.max_steps=2", "train.device=cpu", "train.sample_max_new_tokens=0",
        "train.eval_batches=1", "log.tensorboard=false", "log.plots=false", "log.progress=false",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert "MindFormers run config, mapped to lmforge" in out and "  ignored context: " in out
    metrics = (tmp_path / "runs" / "tiny_llama" / "metrics.jsonl").read_text()
    assert '"step": 2' in metrics


@pytest.mark.parametrize(
    "load, resume, expected",
    [
        ("", False, ("train", "never", None)),  # MindFormers starts fresh; lmforge's default would resume
        ("w/ckpt", False, ("finetune", "never", "w/ckpt")),  # start from those weights
        ("w/ckpt", True, ("train", "w/ckpt", None)),  # continue the run saved there
        ("", True, ("train", "auto", None)),
    ],
)
def test_mindformers_load_checkpoint_and_resume_training(load, resume, expected):
    from lmforge.mindformers import convert

    tree = yaml.safe_load((MF / "tiny_pp2_tp2.yaml").read_text())
    out, _, _ = convert({**tree, "load_checkpoint": load, "resume_training": resume})
    assert (out["run_mode"], out["train"]["resume"], out["train"].get("load_checkpoint")) == expected
