"""Files from strangers run no code. Each route by which a file we read could reach an unpickler
(or import a module) is tried with a file that WOULD write a marker file if its code ran; through
the command line where a user meets it, the file is refused in one line and the marker never
appears. `test_the_payloads_are_live` shows the same payloads do write their marker when read
the unsafe way, so a passing test is not a dud payload."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jobs import make_dataset, tiny_config
from paths import REPO
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from lmforge.errors import CheckpointError
from lmforge.train.trainer import run_training
from lmforge.weights.safe_meta import read_metadata, vetted_metadata


class _Touch:
    """Unpickling this runs `touch <marker>` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _dotted_metadata(marker: Path) -> bytes:
    """Protocol 4 STACK_GLOBAL ("torch.distributed.checkpoint.filesystem", "os.system"): a plain
    find_class resolves the dotted name through the module's `os` import to os.system."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

    cmd = f"touch {shlex.quote(str(marker))}"
    return (
        b"\x80\x04" + text("torch.distributed.checkpoint.filesystem") + text("os.system") + b"\x93"
        + text(cmd) + b"\x85" + b"R" + b"."
    )  # fmt: skip


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _with_bytes_entry(step: Path, key: str, payload: bytes) -> None:
    """Declare `key` a BytesStorageMetadata whose data is `payload` (DCP torch.loads such entries
    with weights_only=False): only DCP's own classes, so a prefix allow-list lets it through."""
    meta = read_metadata(step)
    meta.state_dict_metadata[key] = dcp_md.BytesStorageMetadata()
    for index in [i for i in meta.storage_data if i.fqn == key]:
        del meta.storage_data[index]
    (step / "evil.distcp").write_bytes(payload)
    meta.storage_data[dcp_md.MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, len(payload))
    (step / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))


def _with_data_payload(step: Path, key: str, payload: bytes) -> None:
    """Keep `key` a tensor entry but point its data at `payload` (DCP torch.loads tensor data
    with weights_only=True, torch's own allow-list)."""
    meta = read_metadata(step)
    for index in [i for i in meta.storage_data if i.fqn == key]:
        meta.storage_data[index] = _StorageInfo("evil.distcp", 0, len(payload))
    (step / "evil.distcp").write_bytes(payload)
    (step / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run folder (2 steps, one checkpoint) and the config that made it."""
    tmp = tmp_path_factory.mktemp("hostile")
    data = make_dataset(tmp / "data")
    cfg = tiny_config(
        tmp, data, run__name="src", train__max_steps=2, checkpoint__interval=2, model__dropout=0.0
    )
    run_training(cfg)
    return tmp, data, cfg, tmp / "runs" / "src" / "checkpoints" / "step_2"


def _copy(trained, name: str) -> Path:
    tmp, _, _, step = trained
    dst = tmp / name / "checkpoints" / "step_2"
    shutil.copytree(step, dst)
    return dst


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _refused(proc: subprocess.CompletedProcess, marker: Path, match: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-3000:]
    assert not marker.exists(), "the hostile file's code ran"


def _commands(trained, step: Path, name: str) -> dict[str, list[str]]:
    tmp, data, cfg, _ = trained
    config = tmp / f"{name}.yaml"
    cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"{name}-run"})}).save(config)
    return {
        "generate": ["generate", "--checkpoint", str(step), "--prompt", "hi", "--max-new-tokens", "2"],
        "eval": ["eval", "--checkpoint", str(step), "--data", str(data), "--max-batches", "1"],
        "export": ["export", "--checkpoint", str(step), "--out", str(tmp / f"{name}-hf")],
        "consolidate": ["checkpoint", "consolidate", str(step), "--out", str(tmp / f"{name}-w")],
        "resume": ["train", "--config", str(config), f"train.resume={step}", "train.max_steps=4"],
        "finetune": ["train", "--config", str(config), "run_mode=finetune", f"train.load_checkpoint={step}"],
    }


COMMANDS = ["generate", "eval", "export", "consolidate", "resume", "finetune"]


def test_the_payloads_are_live(tmp_path):
    # The unsafe readers these routes would reach: plain pickle (DCP's own .metadata read) and
    # torch.load(weights_only=False) (DCP's bytes entries). Each writes its marker.
    marker = tmp_path / "a"
    pickle.loads(_dotted_metadata(marker))
    assert marker.exists()
    marker = tmp_path / "b"
    torch.load(io.BytesIO(_torch_saved(_Touch(marker))), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_dcp_index_with_a_dotted_global_is_refused(trained, command):
    step = _copy(trained, f"dotted-{command}")
    marker = step.parent.parent / "marker"
    (step / ".metadata").write_bytes(_dotted_metadata(marker))
    proc = _cli(*_commands(trained, step, f"dotted-{command}")[command], cwd=trained[0])
    _refused(proc, marker, "refusing to load torch.distributed.checkpoint.filesystem.os.system")


@pytest.mark.parametrize("command", COMMANDS)
def test_dcp_bytes_entry_is_refused_before_any_data_is_read(trained, command):
    step = _copy(trained, f"bytes-{command}")
    marker = step.parent.parent / "marker"
    _with_bytes_entry(step, "model.norm.weight", _torch_saved(_Touch(marker)))
    proc = _cli(*_commands(trained, step, f"bytes-{command}")[command], cwd=trained[0])
    _refused(proc, marker, "entry 'model.norm.weight' is not a tensor (BytesStorageMetadata)")


def test_dcp_bytes_entry_for_an_optimizer_key_is_refused_on_resume(trained):
    step = _copy(trained, "bytes-optim")
    marker = step.parent.parent / "marker"
    key = next(
        k for k in read_metadata(step).state_dict_metadata if k.startswith("optim.") and k.endswith("exp_avg")
    )
    _with_bytes_entry(step, key, _torch_saved(_Touch(marker)))
    proc = _cli(*_commands(trained, step, "bytes-optim")["resume"], cwd=trained[0])
    _refused(proc, marker, f"entry '{key}' is not a tensor")


def test_dcp_tensor_data_that_is_a_pickle_is_refused(trained):
    step = _copy(trained, "data")
    marker = step.parent.parent / "marker"
    _with_data_payload(step, "model.norm.weight", _torch_saved(_Touch(marker)))
    proc = _cli(*_commands(trained, step, "data")["generate"], cwd=trained[0])
    _refused(proc, marker, "cannot load the checkpoint")


def test_index_naming_a_data_file_outside_the_folder_is_refused(trained):
    step = _copy(trained, "outside")
    meta = read_metadata(step)
    index = next(i for i in meta.storage_data if i.fqn == "model.norm.weight")
    meta.storage_data[index] = _StorageInfo("../../../data/meta.json", 0, 16)
    (step / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    with pytest.raises(CheckpointError, match="outside the folder"):
        vetted_metadata(step)


def test_legacy_rank_state_pickle_is_refused_on_resume(trained):
    # Checkpoints before rank_<r>.safetensors kept the RNG in rank_<r>.pt (torch.load weights_only).
    step = _copy(trained, "rankpt")
    marker = step.parent.parent / "marker"
    (step / "rank_0.safetensors").unlink()
    (step / "rank_0.pt").write_bytes(_torch_saved({"rng": _Touch(marker)}))
    proc = _cli(*_commands(trained, step, "rankpt")["resume"], cwd=trained[0])
    _refused(proc, marker, "rank_0.pt: refused as a checkpoint's RNG state: it holds pickled objects")


def test_yaml_python_tags_in_an_export_config_are_refused(trained):
    tmp = trained[0]
    out = tmp / "yaml-w"
    proc = _cli("checkpoint", "consolidate", str(trained[3]), "--out", str(out), cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    marker = tmp / "yaml-marker"
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(f"evil: !!python/object/apply:os.system ['touch {marker}']\n" + text)
    _refused(_cli("generate", "--checkpoint", str(out), "--prompt", "hi", cwd=tmp), marker, "config.yaml")


def test_minimind_pth_with_code_is_refused_in_one_clear_line(tmp_path):
    marker = tmp_path / "marker"
    pth = tmp_path / "pretrain_512.pth"
    pth.write_bytes(_torch_saved({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Touch(marker)}))
    proc = _cli("import", "--minimind", str(pth), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _refused(proc, marker, "refused as a MiniMind checkpoint: it holds pickled objects other than tensors")
    assert proc.stderr.strip().endswith("save plain tensors (a state_dict) instead")  # not cut mid-word


def test_hf_folder_with_pickled_weights_is_refused(trained, tmp_path):
    from lmforge.infer import export_checkpoint

    marker = tmp_path / "marker"
    hf = export_checkpoint(trained[3], tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(_torch_saved(_Touch(marker)))
    proc = _cli("import", "--hf", str(hf), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _refused(proc, marker, "pickled weights are not loaded")


def test_tokenizer_folder_code_is_never_imported(trained, tmp_path):
    # transformers would import tokenization_*.py named by auto_map (with trust_remote_code);
    # lmforge reads tokenizer.json with the tokenizers library and tokenizer_config.json as JSON.
    from lmforge.tokenizer import train_tokenizer

    marker = tmp_path / "marker"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i} says hello"}) + "\n" for i in range(50)))
    tok = train_tokenizer([str(corpus)], 512, tmp_path / "tok")  # the run's vocab size
    (tok / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    config.update(tokenizer_class="EvilTokenizer")
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    model_dir = tmp_path / "w"
    proc = _cli("checkpoint", "consolidate", str(trained[3]), "--out", str(model_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenization_evil.py",
    ):
        shutil.copy(tok / name, model_dir / name)
    proc = _cli(
        "generate", "--checkpoint", str(model_dir), "--prompt", "doc", "--max-new-tokens", "2", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()


def test_local_dataset_loading_script_is_never_run(tmp_path):
    pytest.importorskip("datasets")
    marker = tmp_path / "marker"
    folder = tmp_path / "evilset"
    folder.mkdir()
    (folder / "evilset.py").write_text(f"open({str(marker)!r}, 'w').close()\nimport datasets\n")
    from lmforge.tokenizer import train_tokenizer

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(30)))
    tok = train_tokenizer([str(corpus)], 300, tmp_path / "tok")
    proc = _cli(
        "prepare",
        "--input",
        f"hf:{folder}",
        "--tokenizer",
        str(tok),
        "--out",
        str(tmp_path / "p"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
