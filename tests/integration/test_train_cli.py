"""What a user meets running `lmforge train` (issue 9): memory pre-flight, the banner and end
summary, a stopped run's metrics and report, real tokens/s, W&B and validation-split errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from jobs import make_dataset, run_reaped, tiny_config

from lmforge import cli
from lmforge.tokenizer import load_tokenizer
from lmforge.train import preflight
from lmforge.train.metrics import fmt_ppl


def _lmforge(*args, cwd=None, env=None, timeout=240):
    return run_reaped([sys.executable, "-m", "lmforge", *args], timeout=timeout, cwd=cwd, env=env)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _write_config(path: Path, cfg) -> Path:
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def test_llama3_8b_is_refused_before_anything_is_allocated(tmp_path, data):
    cfg = tiny_config(tmp_path, data, model__preset="llama3-8b", data__seq_len=256)
    proc = _lmforge("train", "--config", str(_write_config(tmp_path / "big.yaml", cfg)), timeout=120)
    line = _one_line_error(proc)
    assert "GiB per rank" in line and "available RAM" in line and "train.skip_memory_check=true" in line
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()


def test_preflight_advice_is_the_planners_and_the_skip_key_goes_on(tmp_path, data, monkeypatch):
    cfg = tiny_config(tmp_path, data, train__global_batch_size=8, train__grad_accum_steps=1, data__seq_len=64)
    import torch

    need, layout = preflight.estimate_bytes(cfg, 1, torch.device("cpu"))
    assert "micro batch 8" in layout
    # Room for the parameters and states but not a micro batch of 8: the planner's answer is a
    # smaller micro batch or activation checkpointing, named as config keys.
    monkeypatch.setattr(preflight, "available_memory", lambda device, local_ranks=1: (need - 1, "available RAM"))
    with pytest.raises(Exception) as info:
        preflight.check_memory(cfg, 1, torch.device("cpu"))
    message = str(info.value)
    assert "`lmforge plan` recommends" in message and "parallel.activation_checkpoint=" in message
    skip = cfg.model_copy(update={"train": cfg.train.model_copy(update={"skip_memory_check": True})})
    preflight.check_memory(skip, 1, torch.device("cpu"))  # no error


def test_run_output_first_step_real_tokens_report_and_complete_rerun(tmp_path, data, capsys):
    # Padded mode: real (target) tokens are fewer than the positions the batch holds.
    cfg = tiny_config(
        tmp_path,
        data,
        data__mode="padded",
        optim__warmup_steps=50,
        train__max_steps=2,
        train__eval_interval=0,
        log__interval=10,
        log__progress=True,
        log__plots=True,
    )
    path = _write_config(tmp_path / "run.yaml", cfg)
    proc = _lmforge("train", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\r" not in out + proc.stderr  # no progress bar when the output is a file
    assert "model   tiny:" in out and "tokens per step" in out and "layout single" in out
    assert "note: optim.warmup_steps 50 is longer than the run (2 steps)" in out
    assert "done: 2/2 steps" in out and "checkpoint " in out and "lmforge export --checkpoint" in out
    run_dir = tmp_path / "runs" / "t"
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]  # step 1 logged although log.interval is 10
    assert all(0 < r["real_tokens_per_s"] < r["tokens_per_s"] for r in steps)

    assert cli.main(["train", "--config", str(path)]) == 0  # the same command again, in-process
    assert "run already complete: step 2 of 2" in capsys.readouterr().out


def test_stop_at_step_one_has_metrics_visible_plots_and_a_report(tmp_path, data, monkeypatch):
    from lmforge.train import trainer

    monkeypatch.setattr(trainer._Trainer, "_should_stop", lambda self: True)
    cfg = tiny_config(tmp_path, data, log__interval=10, log__plots=True, train__max_steps=20)
    summary = trainer.run_training(cfg)
    assert summary["preempted"] and summary["steps"] == 1
    run_dir = Path(summary["run_dir"])
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1]
    proc = _lmforge("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image as mpimg

    pixels = mpimg.imread(run_dir / "plots" / "loss.png")[..., :3]
    blue = (abs(pixels[..., 0] - 0x1F / 255) < 0.05) & (abs(pixels[..., 2] - 0xB4 / 255) < 0.05)
    assert blue.sum() > 10  # the one point is drawn, not blank axes


def test_perplexity_is_readable():
    assert fmt_ppl(12.345) == "12.35"
    assert fmt_ppl(3.2e7) == "3.200e+07"
    assert fmt_ppl(float("inf")) == "inf" and fmt_ppl(1e308) == "inf"


def _main_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_wandb_online_without_credentials_or_package_is_one_line(tmp_path, data, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, data, log__wandb=True, log__wandb_mode="online")
    path = str(_write_config(tmp_path / "w.yaml", cfg))
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert "wandb package is not installed" in _main_error(capsys, ["train", "--config", path])

    # Installed but never logged in: a stand-in module whose init would fail like wandb's does.
    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=...)\nmore")

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert "no W&B credentials" in _main_error(capsys, ["train", "--config", path])
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert "W&B could not start (api_key not configured" in _main_error(capsys, ["train", "--config", path])


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_promised_val_split_that_fails_is_an_error(tmp_path, capsys, damage):
    folder = make_dataset(tmp_path / "ds", docs=40)
    for bin_file in folder.glob("val_*.bin"):
        if damage == "missing":
            bin_file.unlink()
        else:
            bin_file.write_bytes(bin_file.read_bytes()[:3])
    cfg = tiny_config(tmp_path, folder)
    line = _main_error(capsys, ["train", "--config", str(_write_config(tmp_path / "v.yaml", cfg))])
    assert "val_00000.bin" in line and "re-run lmforge prepare" in line
    # Named as data.valid: the same.
    tree = yaml.safe_load(cfg.to_yaml())
    tree["data"]["valid"] = str(folder)
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(tree))
    assert "val_00000.bin" in _main_error(capsys, ["train", "--config", str(tmp_path / "v2.yaml")])


def test_relative_tokenizer_path_is_stored_resolved(tmp_path, monkeypatch):
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.trainer import run_training

    (tmp_path / "text.txt").write_text("the cat sat on the mat. a dog ran.\n" * 40, encoding="utf-8")
    tokenizer = load_tokenizer(train_tokenizer([str(tmp_path / "text.txt")], 300, tmp_path / "tok"))
    data = make_dataset(tmp_path / "ds", vocab_size=300, docs=40, fingerprint=tokenizer.fingerprint)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, data, model__vocab_size=300, tokenizer__path="tok", train__max_steps=2)
    summary = run_training(cfg)
    saved = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    assert saved["tokenizer"]["path"] == str(tmp_path / "tok")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _lmforge("generate", "--checkpoint", summary["checkpoint"], "--prompt", "the cat",
                    "--max-new-tokens", "3", "--temperature", "0", cwd=elsewhere)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("the cat"), proc.stderr


def test_preflight_on_a_gpu_reads_the_devices_memory(tmp_path, data, monkeypatch):
    import torch

    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 24 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    cuda = torch.device("cuda")
    big = tiny_config(tmp_path, data, model__preset="llama3-8b", data__seq_len=256)
    with pytest.raises(Exception) as info:
        preflight.check_memory(big, 1, cuda)
    assert "the memory of NVIDIA GeForce RTX 4090 is 24.0 GiB" in str(info.value)
    preflight.check_memory(tiny_config(tmp_path, data), 1, cuda)  # the tiny model fits
