"""The command line: help with defaults everywhere, one-line user errors, and the main flows."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

import lmforge.cli as cli
from lmforge.cli import build_parser, main
from lmforge.config import config_from_dict


def subcommand_parsers(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subcommand_parsers(sub, (*prefix, name))


ALL = list(subcommand_parsers(build_parser()))


def test_every_subcommand_is_there():
    names = {" ".join(n) for n, _ in ALL}
    for expected in (
        "demo", "data fetch", "data list", "tokenizer train", "prepare", "train", "eval", "generate",
        "export", "import", "model-info", "plan", "report", "checkpoint consolidate",
    ):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("names", [n for n, _ in ALL], ids=lambda n: " ".join(n))
def test_help_lists_every_option_with_its_default(names, capsys):
    with pytest.raises(SystemExit) as info:
        main([*names, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    parser = dict(ALL)[names]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{names} {action.dest} has no help text"
        shown = " ".join(formatter._expand_help(action).split())
        assert shown in text, f"{names}: help of {action.dest} not shown"
        if action.option_strings:
            assert "(default: " in shown, f"{names}: {action.option_strings[0]} shows no default"


def run_cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_top_level_help_and_missing_config_in_a_real_process(tmp_path):
    done = run_cli("--help")
    assert done.returncode == 0 and "generate" in done.stdout
    done = run_cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {tmp_path / 'missing.yaml'}: config file not found; pass an existing YAML file with --config"
    )
    assert "Traceback" not in done.stderr + done.stdout


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_user_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {preset: tiny}\ndata: {seq_len: 32, train: [%s]}\n" % (tmp_path / "nodata"))
    assert "expected key=value" in one_line_error(capsys, ["train", "--config", str(cfg), "train.max_steps"])
    assert "model.hidden_sizee: unknown key" in one_line_error(
        capsys, ["train", "--config", str(cfg), "model.hidden_sizee=3"]
    )
    assert "nodata" in one_line_error(capsys, ["train", "--config", str(cfg)])
    assert "--config FILE is required" in one_line_error(capsys, ["train"])
    assert "checkpoint not found" in one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "x")])
    assert "evaluation data not found" in one_line_error(
        capsys, ["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "none")]
    )
    assert "no checkpoint to predict with" in one_line_error(
        capsys, ["train", "--config", str(cfg), "--run_mode", "predict", f"run.out_dir={tmp_path}"]
    )
    assert "run folder not found" in one_line_error(capsys, ["report", str(tmp_path / "norun")])
    assert "no config.json" in one_line_error(
        capsys, ["import", "--hf", str(tmp_path), "--out", str(tmp_path / "o")]
    )


def test_interrupt_exits_130(monkeypatch, capsys):
    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_model_info", boom)
    assert main(["model-info", "tiny"]) == 130


def test_mindformers_aliases_and_interleaved_overrides(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("lmforge.train.trainer.run_training", lambda cfg: seen.setdefault("cfg", cfg))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {preset: tiny}\ndata: {seq_len: 32}\n")
    argv = ["train", "train.max_steps=7", "--config", str(cfg), "optim.lr=1e-3", "--train_dataset_dir", "d1"]
    argv += [
        "--load_checkpoint",
        "ck",
        "--resume_training",
        "False",
        "--use_parallel",
        "True",
        "--run_mode",
        "finetune",
    ]
    assert main(argv) == 0
    got = seen["cfg"]
    assert got.train.max_steps == 7 and got.optim.lr == 1e-3 and got.run_mode == "finetune"
    assert [d.path for d in got.data.train] == ["d1"]
    assert got.train.load_checkpoint == "ck" and got.train.resume == "never"


def test_help_config_prints_the_tree(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "global_batch_size: 32" in out and "max_position_embeddings:" in out


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A random tiny model saved as a weights export with a 300-token tokenizer beside it."""
    from lmforge.infer import save_weights
    from lmforge.model import Transformer
    from lmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    text = root / "text.txt"
    text.write_text("the cat sat on the mat. 猫坐在垫子上。\n" * 50, encoding="utf-8")
    tok_dir = train_tokenizer([str(text)], 300, root / "tok")
    cfg = config_from_dict({"model": {"preset": "tiny", "vocab_size": 300}, "data": {"seq_len": 32}})
    torch.manual_seed(0)
    weights = root / "w"
    save_weights(Transformer(cfg.model).state_dict(), cfg, weights, dtype="float32", tokenizer=_tok(tok_dir))
    return weights, text


def _generate_out(capsys, weights, prompt, *extra) -> str:
    argv = ["generate", "--checkpoint", str(weights), "--prompt", prompt, "--max-new-tokens", "5", *extra]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_generate_interactive_answers_each_stdin_line_and_exits_on_eof(tiny_weights, capsys):
    weights, _ = tiny_weights
    args = ["--max-new-tokens", "5", "--seed", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "lmforge", "generate", "--checkpoint", str(weights), "--interactive", *args],
        input="the cat\n猫坐\n",  # then end of input, no empty line
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    # Each prompt is completed exactly as a one-shot `generate` with the same seed would, and
    # nothing else (no "> " prompt markers) reaches stdout when input is piped.
    expected = _generate_out(capsys, weights, "the cat", "--seed", "1")
    expected += _generate_out(capsys, weights, "猫坐", "--seed", "1")
    assert expected.startswith("the cat") and "\n猫坐" in expected
    assert done.stdout == expected


def test_bad_weights_and_mismatched_data_are_one_line_errors(tiny_weights, tmp_path, capsys):
    """Issue 4's bad inputs for the inference commands: weights from another model shape, a
    truncated weights file, and shards prepared with another tokenizer."""
    import shutil

    from jobs import make_dataset

    weights, _ = tiny_weights
    reshaped = tmp_path / "reshaped"
    shutil.copytree(weights, reshaped)
    cfg_file = reshaped / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("hidden_size: 64", "hidden_size: 32"))
    err = one_line_error(capsys, ["generate", "--checkpoint", str(reshaped), "--prompt", "the"])
    assert "weights do not fit the model config (checkpoint vs config:" in err
    assert "the config.yaml beside the weights is not theirs" in err

    truncated = tmp_path / "truncated"
    shutil.copytree(weights, truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[:100])
    err = one_line_error(capsys, ["export", "--checkpoint", str(truncated), "--out", str(tmp_path / "o")])
    assert "model.safetensors: unreadable safetensors file" in err
    assert not (tmp_path / "o").exists()

    other = make_dataset(tmp_path / "other", vocab_size=300, fingerprint="someone-else")
    err = one_line_error(capsys, ["eval", "--checkpoint", str(weights), "--data", str(other)])
    assert "prepared with tokenizer someone-else" in err
    wide = make_dataset(tmp_path / "wide", vocab_size=400, fingerprint=_tok(weights).fingerprint)
    err = one_line_error(capsys, ["eval", "--checkpoint", str(weights), "--data", str(wide)])
    assert "model.vocab_size 300 is smaller than the data's vocabulary" in err


def test_generate_eval_export_import_predict(tiny_weights, tmp_path, capsys):
    """The inference commands on a weights export with a tokenizer beside it."""
    weights, text = tiny_weights

    args = [
        "generate",
        "--checkpoint",
        str(weights),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("the cat") and main(args) == 0 and capsys.readouterr().out == first

    assert main(["eval", "--checkpoint", str(weights), "--data", str(text), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "perplexity" in out

    assert (
        main(["export", "--checkpoint", str(weights), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    )
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "back"), "--prompt", "the cat",
                 "--max-new-tokens", "5", "--seed", "1"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("the cat")

    run = tmp_path / "run.yaml"
    run.write_text("model: {preset: tiny, vocab_size: 300}\ndata: {seq_len: 32}\n"
                   "train: {sample_prompts: [the, 猫], sample_max_new_tokens: 4}\n")  # fmt: skip
    assert (
        main(["train", "--config", str(run), "--run_mode", "predict", "--load_checkpoint", str(weights)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("the") and lines[1].startswith("猫")

    argv = ["train", "--config", str(run), "--run_mode", "predict", "--load_checkpoint", str(weights)]
    # predict/eval refuse weights that do not fit the config's model rather than ignore the config
    err = one_line_error(capsys, [*argv, "model.num_layers=3"])
    assert "weights do not fit the run config's model (checkpoint vs config: layers.2." in err
    assert "absent vs (" in err
    err = one_line_error(capsys, [*argv, "--run_mode", "eval", f"data.valid={text}", "model.hidden_size=32"])
    assert "weights do not fit the run config's model" in err and "(64, 64) vs (32, 32)" in err

    # predict honours train.predict_temperature / predict_top_k: greedy equals greedy `generate`.
    assert main([*argv, "train.predict_temperature=0", "train.sample_max_new_tokens=5"]) == 0
    greedy = capsys.readouterr().out
    expected = _generate_out(capsys, weights, "the", "--temperature", "0")
    assert greedy == expected + _generate_out(capsys, weights, "猫", "--temperature", "0")
    # the default (0.8, top-k 50, seed run.seed + i) matches `generate` with those settings
    assert main([*argv, "train.sample_max_new_tokens=5"]) == 0
    sampled = capsys.readouterr().out
    assert sampled.startswith(_generate_out(capsys, weights, "the", "--top-k", "50", "--seed", "1337"))


def _tok(path):
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(path)
