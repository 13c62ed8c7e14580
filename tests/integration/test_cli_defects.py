"""Defects a new user met (issue 22 item 6), each where the user meets it: through the CLI in a
real process. MiniMind export note, generate's sampling flags, a MindFormers recipe's tokenizer,
--tokenizer on export/generate, --help-config's optional sections and HF's rope_scaling spelling,
demo --format, data.valid as a list, MindFormers 1.6 `betas`, launch.sh's interpreter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jobs import make_dataset, run_reaped, tiny_config, write_jsonl
from paths import FIXTURES, REPO

from lmforge.config import config_for_model
from lmforge.data.loader import build_loader
from lmforge.model import Transformer
from lmforge.model.config import ModelConfig
from lmforge.model.presets import get_preset
from lmforge.tokenizer import train_tokenizer
from lmforge.weights.files import save_weights

MF_FIXTURES = FIXTURES / "mindformers"
LAUNCH = REPO / "scripts" / "launch.sh"


def lmforge(*args, timeout=180, **kwargs):
    return run_reaped([sys.executable, "-m", "lmforge", *map(str, args)], timeout=timeout, **kwargs)


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("defects-tok")
    texts = [f"document {i}: the quick brown fox, number {i * 7}." for i in range(200)]
    return train_tokenizer(write_jsonl(tmp / "c.jsonl", texts), 300, tmp / "tok")


@pytest.fixture(scope="module")
def moe_weights(tmp_path_factory) -> Path:
    """A tiny MoE model (top-2, QK-norm: exportable to MiniMind) saved as a weights folder, no tokenizer."""
    model_cfg = ModelConfig(**{**get_preset("tiny-moe"), "qk_norm": True})
    torch.manual_seed(0)
    state = Transformer(model_cfg).state_dict()
    out = tmp_path_factory.mktemp("defects-moe") / "w"
    save_weights(state, config_for_model(model_cfg), out)
    return out


def test_minimind_export_note_states_minimind_default_and_this_models_value(moe_weights, tmp_path):
    done = lmforge("export", "--checkpoint", moe_weights, "--format", "minimind", "--out", tmp_path / "mm")
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "num_experts_per_tok" in line]
    assert len(notes) == 1, done.stderr
    # MiniMind's scripts build top-1 (its default); this model routes to 2 experts.
    assert "this model has num_experts_per_tok=2 (MiniMind default 1)" in notes[0]
    assert "scripts build num_experts_per_tok=2" not in notes[0]
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["num_experts_per_tok"] == 2


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--temperature", "-0.5"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
    ],
)
def test_generate_refuses_out_of_range_sampling_flags(moe_weights, tok_dir, flags, flag):
    done = lmforge("generate", "--checkpoint", moe_weights, "--tokenizer", tok_dir, "--prompt", "the", *flags)
    assert one_line_error(done).startswith(f"error: {flag} ")


def test_generate_and_export_take_a_tokenizer(moe_weights, tok_dir, tmp_path):
    done = lmforge("generate", "--checkpoint", moe_weights, "--prompt", "the")
    assert "pass --tokenizer" in one_line_error(done)  # nothing saved with these weights
    done = lmforge("generate", "--checkpoint", moe_weights, "--tokenizer", tok_dir, "--prompt", "the quick",
                   "--max-new-tokens", "4", "--seed", "1", "--top-k", "5", "--top-p", "0.9")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the quick")
    done = lmforge("export", "--checkpoint", moe_weights, "--out", tmp_path / "hf", "--tokenizer", tok_dir)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    big = train_tokenizer(write_jsonl(tmp_path / "b.jsonl", [f"w{i} x{i * 3}" for i in range(3000)]), 600, tmp_path / "big")
    done = lmforge("export", "--checkpoint", moe_weights, "--out", tmp_path / "hf2", "--tokenizer", big)
    assert "600 ids but the model's vocabulary is 512" in one_line_error(done)


def _mindformers_tree(**optimizer) -> dict:
    tree = yaml.safe_load((MF_FIXTURES / "tiny_pp2_tp2.yaml").read_text())
    tree["optimizer"] = {"type": "AdamW", "eps": 1e-8, "weight_decay": 0.1, **optimizer}
    return tree


def test_mindformers_recipe_keeps_its_tokenizer_and_betas_list(tmp_path, tok_dir):
    tree = _mindformers_tree(betas=[0.85, 0.95])
    tree["processor"] = {"return_tensors": "ms", "type": "LlamaProcessor",
                         "tokenizer": {"vocab_file": str(tok_dir / "tokenizer.json"), "type": "LlamaTokenizer",
                                       "bos_token": "<s>"}}  # fmt: skip
    src = tmp_path / "mf.yaml"
    src.write_text(yaml.safe_dump(tree))
    done = lmforge("config", "convert", src, "--out", tmp_path / "lm.yaml")
    assert done.returncode == 0, done.stderr
    converted = yaml.safe_load((tmp_path / "lm.yaml").read_text())
    assert converted["optim"]["betas"] == [0.85, 0.95]  # not the (0.9, 0.999) fallback
    assert converted["tokenizer"]["path"] == str(tok_dir / "tokenizer.json")
    assert "processor.tokenizer.vocab_file" in done.stdout and "ignored processor:" not in done.stdout
    # `lmforge train` on the recipe itself sees the same tokenizer.
    done = lmforge("train", "--config", src, "--help-config")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout.split("# lmforge run config", 1)[1].split("\n", 1)[1])["tokenizer"]["path"] == str(
        tok_dir / "tokenizer.json"
    )
    tree = _mindformers_tree(betas=[0.9])
    src.write_text(yaml.safe_dump(tree))
    done = lmforge("config", "convert", src, "--out", tmp_path / "bad.yaml")
    assert "optimizer.betas" in one_line_error(done)


def test_help_config_lists_optional_sections_and_hf_rope_spelling_is_accepted(tmp_path):
    done = lmforge("train", "--help-config")
    assert done.returncode == 0, done.stderr
    assert "  # moe: {num_experts: 4, top_k: 2, num_shared_experts: 0" in done.stdout
    assert "  # rope_scaling: {factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0" in done.stdout
    cfg = tmp_path / "rope.yaml"
    cfg.write_text("model:\n  rope_scaling: {type: llama3, factor: 32.0, original_max_position_embeddings: 8192}\n")
    done = lmforge("train", "--config", cfg, "--help-config")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["model"]["rope_scaling"]["factor"] == 32.0
    cfg.write_text("model:\n  rope_scaling: {rope_type: yarn, factor: 4.0}\n")
    line = one_line_error(lmforge("train", "--config", cfg, "--help-config"))
    assert "model.rope_scaling" in line and "'yarn' is not supported" in line


def test_demo_input_takes_a_format(tmp_path):
    corpus = tmp_path / "notes.data"  # an extension prepare cannot guess
    corpus.write_text("one paragraph\n\nanother paragraph\n")
    line = one_line_error(lmforge("demo", "--input", corpus, "--out", tmp_path / "d", "--quick"))
    assert "pass --format" in line
    line = one_line_error(lmforge("demo", "--input", corpus, "--format", "csv", "--out", tmp_path / "d", "--quick"))
    assert "unknown format 'csv'" in line  # the flag reaches the tokenizer and prepare


def test_data_valid_takes_a_list_and_one_val_pass_reads_each_sample_once(tmp_path):
    a = make_dataset(tmp_path / "a", docs=64, seed=1)
    b = make_dataset(tmp_path / "b", docs=160, seed=2)
    cfg = tiny_config(tmp_path, a, data__valid=[str(a), str(b)], train__max_steps=2, train__eval_interval=2)
    assert cfg.data.valid == [str(a), str(b)]
    assert tiny_config(tmp_path, a, data__valid=str(b)).data.valid == [str(b)]  # a string still works
    loader = build_loader(cfg.data, "val", micro_batch_size=3)
    seen = [tuple(row) for batch in loader for row in batch["input_ids"].tolist()]
    want = []
    for src in loader.sources:
        want += [tuple(src.sample(i)[0][:-1].tolist()) for i in range(src.samples)]
    assert len(loader.sources) == 2 and sorted(set(seen)) == sorted(set(want))
    assert len(seen) == math.ceil(len(want) / 3) * 3  # the last batch completed from the start
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    done = lmforge("train", "--config", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "val loss" in done.stdout and "no validation" not in done.stdout + done.stderr


def test_launch_takes_the_interpreter_of_an_lmforge_given_by_path(tmp_path):
    env_bin = tmp_path / "env" / "bin"
    env_bin.mkdir(parents=True)
    python = env_bin / "python"  # stands for another environment's interpreter that has lmforge
    python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    entry = env_bin / "lmforge"
    entry.write_text(f"#!{python}\nimport sys\nfrom lmforge.cli import main\nsys.exit(main())\n")
    entry.chmod(0o755)
    fake = tmp_path / "bin"  # a python first on PATH without lmforge
    fake.mkdir()
    for name in ("python", "python3"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env.update(PATH=f"{fake}:{env['PATH']}", LAUNCH_DRY_RUN="1")
    done = run_reaped(["bash", str(LAUNCH), f"{entry} train --config x.yaml", "2"], timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    command = done.stderr.splitlines()[1].split()
    assert command[1] == str(python)  # the command's own environment, not .venv or PATH's
    assert command[-4:] == ["lmforge", "train", "--config", "x.yaml"] and command[-5] == "-m"
    assert subprocess.run([command[1], "-c", "import lmforge"], timeout=60).returncode == 0
