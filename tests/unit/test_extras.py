"""Optional extras (pyproject.toml): tensorboard and matplotlib are not core; a run that asks for
one that is missing stops with one line naming the extra, before anything is written; unset, each
is used when installed. The GGUF SentencePiece path declares the protobuf it needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import lmforge
from lmforge import cli
from lmforge.config import LogConfig
from lmforge.errors import LmforgeError, use_extra
from lmforge.train.metrics import MetricsLogger

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra's tomli
    import tomli as tomllib

PYPROJECT = Path(lmforge.__file__).parents[1] / "pyproject.toml"


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in requirements}


def test_pyproject_declares_the_extras():
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    core, extras = _names(project["dependencies"]), project["optional-dependencies"]
    assert not {"tensorboard", "matplotlib"} & core
    assert "tensorboard" in _names(extras["tensorboard"]) and "matplotlib" in _names(extras["plot"])
    assert "protobuf" in _names(extras["gguf"]) and "protobuf" in _names(extras["llamacpp"])
    # CI installs dev: the tests of every extra below run there
    assert {"tensorboard", "matplotlib", "protobuf", "gguf"} <= _names(extras["dev"])


def test_unset_uses_an_installed_extra_and_skips_a_missing_one(monkeypatch):
    assert use_extra(None, "log.x", "json", "x") is True
    assert use_extra(False, "log.x", "json", "x") is False
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    assert use_extra(None, "log.tensorboard", "tensorboard", "tensorboard") is False
    with pytest.raises(LmforgeError) as err:
        use_extra(True, "log.tensorboard", "tensorboard", "tensorboard")
    assert str(err.value) == "log.tensorboard: needs the 'tensorboard' extra; pip install \"lmforge[tensorboard]\""


def test_metrics_logger_writes_tensorboard_events_only_when_installed(tmp_path, monkeypatch):
    MetricsLogger(tmp_path / "a", LogConfig(), {}, True).close()
    assert (tmp_path / "a" / "tb").is_dir()  # dev installs the extra
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    logger = MetricsLogger(tmp_path / "b", LogConfig(), {}, True)
    logger.close()
    assert logger.tb is None and not (tmp_path / "b" / "tb").exists()


def _main_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    ("key", "module", "extra"), [("tensorboard", "tensorboard", "tensorboard"), ("plots", "matplotlib", "plot")]
)
def test_train_asking_for_a_missing_extra_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, key, module, extra):
    (tmp_path / "data").mkdir()
    runs = tmp_path / "runs"
    tree = {
        "run": {"name": "t", "out_dir": str(runs)},
        "model": {"preset": "tiny"},
        "data": {"train": [str(tmp_path / "data")], "seq_len": 32},
        "train": {"device": "cpu", "max_steps": 1},
        "log": {key: True},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    monkeypatch.setitem(sys.modules, module, None)
    line = _main_error(capsys, ["train", "--config", str(path)])
    assert line == f"error: log.{key}: needs the '{extra}' extra; pip install \"lmforge[{extra}]\""
    assert not runs.exists()


def test_report_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = _main_error(capsys, ["report", str(tmp_path)])
    assert line == "error: lmforge report: needs the 'plot' extra; pip install \"lmforge[plot]\""
    assert not (tmp_path / "plots").exists()


def test_gguf_sentencepiece_without_protobuf_names_the_gguf_extra(tmp_path, monkeypatch):
    import sentencepiece

    from lmforge.interop.gguf_spm import spm_vocab

    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)  # no protobuf
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"")
    with pytest.raises(LmforgeError) as err:
        spm_vocab(model, 100)
    assert str(err.value) == (
        f"{model} (a SentencePiece vocabulary in GGUF): needs the 'gguf' extra; pip install \"lmforge[gguf]\""
    )
