"""Issue 9 item 1: writing commands never delete or overwrite a user's files.

Every writing command of the weights layer (export both formats, import, checkpoint
consolidate) refuses a non-empty --out without --overwrite, with one line and exit 2; with
--overwrite it replaces only the files its manifest says lmforge wrote; `--out .` works.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import config_from_dict
from lmforge.errors import LmforgeError
from lmforge.infer import load_weights
from lmforge.model import Transformer
from lmforge.weights.outdir import MARKER, output_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A weights export, an HF export and a training checkpoint of one tiny model."""
    from lmforge.infer import save_weights
    from lmforge.interop import export_hf
    from lmforge.weights.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("src")
    cfg = config_from_dict({"model": {"preset": "tiny", "vocab_size": 300}, "data": {"seq_len": 32}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    save_weights(model.state_dict(), cfg, root / "w", dtype="float32")
    export_hf(model, cfg.model, root / "hf")
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(root / "ck", 1, model, opt, {"config": cfg.model_dump(mode="json")}, {}, keep=1)
    return root


def _user_folder(path):
    """A folder of the user's own files (one of them named like a file lmforge writes)."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_bytes(b"my notes\n")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _unchanged(path, before):
    return all((path / rel).read_bytes() == data for rel, data in before.items())


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lmforge", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def _refused(done):
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_commands_refuse_a_users_folder_in_a_real_process(sources, tmp_path):
    user = tmp_path / "mine"
    before = _user_folder(user)
    for argv in (
        ["export", "--checkpoint", str(sources / "w"), "--format", "safetensors", "--out", str(user)],
        ["import", "--hf", str(sources / "hf"), "--out", str(user)],
    ):
        err = _refused(_cli(*argv))
        assert "not empty" in err and "--overwrite" in err and "did not write" in err
        assert _unchanged(user, before) and sorted(p.name for p in user.iterdir()) == ["notes.txt", "sub"]
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_out_dot_writes_into_an_empty_current_folder_and_refuses_a_full_one(
    sources, tmp_path, monkeypatch, capsys
):
    here = tmp_path / "here"
    here.mkdir()
    done = _cli(
        "export", "--checkpoint", str(sources / "w"), "--format", "safetensors", "--out", ".", cwd=here
    )
    assert done.returncode == 0, done.stderr
    assert {"model.safetensors", "config.yaml", MARKER} <= {p.name for p in here.iterdir()}
    state, cfg, _ = load_weights(here)
    assert cfg.model.vocab_size == 300 and "tok_embeddings.weight" in state
    before = _user_folder(tmp_path / "full")
    monkeypatch.chdir(tmp_path / "full")
    assert main(["import", "--hf", str(sources / "hf"), "--out", "."]) == 2
    assert "--overwrite" in capsys.readouterr().err and _unchanged(tmp_path / "full", before)


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_overwrite_replaces_only_lmforge_files(sources, tmp_path, capsys, fmt):
    out = tmp_path / "out"
    before = _user_folder(out)
    argv = ["export", "--checkpoint", str(sources / "w"), "--format", fmt, "--out", str(out)]
    assert main([*argv, "--overwrite"]) == 0
    ours = json.loads((out / MARKER).read_text())["files"]
    assert _unchanged(out, before) and all((out / name).is_file() for name in ours)
    assert main([*argv, "--dtype", "bfloat16"]) == 2  # lmforge's own output still needs --overwrite
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main([*argv, "--dtype", "bfloat16", "--overwrite"]) == 0
    assert _unchanged(out, before) and json.loads((out / MARKER).read_text())["dtype"] == "bfloat16"
    # A file of the user's that carries a name lmforge would write is never replaced.
    (out / MARKER).write_text(json.dumps({"files": ["notes.txt"]}))
    victim = ours[0]
    (out / victim).write_bytes(b"the user's own file")
    assert main([*argv, "--overwrite"]) == 2
    assert "was not written by lmforge" in capsys.readouterr().err
    assert (out / victim).read_bytes() == b"the user's own file" and _unchanged(out, before)


def test_consolidate_folder_and_file_forms_follow_the_same_rule(sources, tmp_path, capsys):
    out = tmp_path / "flat"
    before = _user_folder(out)
    assert main(["checkpoint", "consolidate", str(sources / "ck"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and _unchanged(out, before)
    assert main(["checkpoint", "consolidate", str(sources / "ck"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and _unchanged(out, before)
    file = tmp_path / "one" / "w.safetensors"
    assert main(["checkpoint", "consolidate", str(sources / "ck"), "--out", str(file)]) == 0
    assert main(["checkpoint", "consolidate", str(sources / "ck"), "--out", str(file)]) == 2
    assert "already exists" in capsys.readouterr().err
    # A config.yaml the user wrote beside the file is not replaced without --overwrite.
    (file.parent / "config.yaml").write_text("model: {preset: tiny}\n")
    assert (
        main(["checkpoint", "consolidate", str(sources / "ck"), "--out", str(file.parent / "w2.safetensors")])
        == 2
    )
    assert "config.yaml: already exists with another config" in capsys.readouterr().err
    assert (file.parent / "config.yaml").read_text() == "model: {preset: tiny}\n"
    assert main(["checkpoint", "consolidate", str(sources / "ck"), "--out", str(file), "--overwrite"]) == 0
    assert "vocab_size: 300" in (file.parent / "config.yaml").read_text()


def test_a_failed_write_leaves_the_earlier_output_and_no_temporaries(tmp_path):
    out = tmp_path / "o"
    with output_dir(out, kind="test") as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), output_dir(out, overwrite=True, kind="test") as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("crash while writing")
    assert (out / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    (out / "a.txt").unlink()  # output_dir also refuses a path that is a file
    (tmp_path / "f").write_text("x")
    with pytest.raises(LmforgeError, match="not a folder"), output_dir(tmp_path / "f"):
        pass


def test_chat_template_travels_through_import_and_export(sources, tmp_path):
    """Issue 9 item 7's part in the weights layer: the tokenizer files that travel with weights
    (one TOKENIZER_FILES list) include chat_template.jinja, on import and on export."""
    import shutil

    from lmforge.infer import export_checkpoint, import_hf_folder
    from lmforge.tokenizer import train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat.\n" * 40, encoding="utf-8")
    hf = tmp_path / "hf"
    shutil.copytree(sources / "hf", hf)
    tok = train_tokenizer([str(text)], 300, tmp_path / "tok")
    for f in Path(tok).iterdir():
        shutil.copy2(f, hf / f.name)
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    (hf / "chat_template.jinja").write_text(template, encoding="utf-8")
    imported = import_hf_folder(hf, tmp_path / "imported")
    assert (imported / "chat_template.jinja").read_text(encoding="utf-8") == template
    exported = export_checkpoint(imported, tmp_path / "again", fmt="hf", dtype="float32")
    assert (exported / "chat_template.jinja").read_text(encoding="utf-8") == template


def test_consolidated_folder_carries_the_run_tokenizer(sources, tmp_path):
    """A consolidated folder is self-contained: the run's tokenizer is copied in, so generate works
    on it after the original tokenizer folder is gone."""
    import shutil

    from lmforge.infer import load_model_for_inference
    from lmforge.tokenizer import load_tokenizer, train_tokenizer
    from lmforge.weights.checkpoint import save_checkpoint
    from lmforge.weights.files import consolidate

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat.\n" * 40, encoding="utf-8")
    tok = train_tokenizer([str(text)], 300, tmp_path / "tok")
    cfg = config_from_dict(
        {
            "model": {"preset": "tiny", "vocab_size": 300},
            "data": {"seq_len": 32},
            "tokenizer": {"path": str(tok)},
        }
    )
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "ck", 1, model, opt, {"config": cfg.model_dump(mode="json")}, {}, keep=1)
    fingerprint = load_tokenizer(tok).fingerprint
    out = consolidate(tmp_path / "ck", tmp_path / "flat")
    shutil.rmtree(tok)
    _, _, tokenizer = load_model_for_inference(out)
    assert tokenizer is not None and tokenizer.fingerprint == fingerprint
