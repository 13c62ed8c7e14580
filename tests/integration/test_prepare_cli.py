"""prepare / tokenizer train / data fetch where a user meets them: through the CLI in a real
process (exit code, one line, no traceback, the user's files intact), SIGKILL and resume, the Ray
engine against the local one, streaming `datasets` input, lone surrogates, val-only folders."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from jobs import reaped_popen, run_reaped, write_jsonl

from lmforge.data.prepare import prepare_dataset
from lmforge.data.token_dataset import TokenDataset
from lmforge.errors import DataError
from lmforge.tokenizer import load_tokenizer, train_tokenizer

DOCS = [f"Document number {i}: " + "some words here, " * (1 + i % 9) + "the end." for i in range(400)]


def lmforge(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_reaped([sys.executable, "-m", "lmforge", *map(str, args)], timeout=timeout, env=env)


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("clitok")
    return train_tokenizer(write_jsonl(tmp / "c.jsonl", DOCS), 400, tmp / "tok")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("clicorpus") / "corpus.jsonl", DOCS * 5)


def test_sigkill_mid_prepare_then_resume_gives_the_same_bytes(tok_dir, corpus, tmp_path):
    args = ["--tokenizer", tok_dir, "--val-fraction", "0.05", "--chunk-mb", "0.004"]
    ref = tmp_path / "ref"
    assert lmforge("prepare", "--input", corpus, "--out", ref, *args).returncode == 0
    out = tmp_path / "out"
    state = out / "prepare.state"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "lmforge", "prepare", "--input", str(corpus), "--out", str(out), *map(str, args)]
    with reaped_popen(argv, env=env, stdout=-1, stderr=-1) as proc:
        deadline = time.monotonic() + 60
        while len(list(state.glob("u*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "prepare finished before it could be killed; lower --chunk-mb"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "meta.json").exists()
    done_before = len(list(state.glob("u*.json")))
    assert done_before >= 3
    again = lmforge("prepare", "--input", corpus, "--out", out, *args)
    assert again.returncode == 0, again.stderr
    assert f"{done_before} of" in again.stderr  # it said it resumed, and from where
    assert folder_bytes(out) == folder_bytes(ref)


def test_ray_engine_writes_the_local_engines_bytes(tok_dir, corpus, tmp_path):
    pytest.importorskip("ray", reason="the Ray engine needs `ray` (pip install 'lmforge[ray]')")
    kw = dict(val_fraction=0.05, chunk_bytes=20_000, shard_tokens=3000, progress=False, workers=2)
    local = prepare_dataset(corpus, tok_dir, tmp_path / "local", **kw)
    ray = prepare_dataset(corpus, tok_dir, tmp_path / "ray", engine="ray", **kw)
    assert local["units"] > 2 and ray["tokens"] == local["tokens"]
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")


def test_streaming_datasets_input_equals_the_files(tok_dir, corpus, tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "hfdata"
    folder.mkdir()
    (folder / "part.jsonl").write_bytes(corpus.read_bytes())
    a = prepare_dataset(f"hf:{folder}", tok_dir, tmp_path / "hf", val_fraction=0, progress=False)
    b = prepare_dataset(corpus, tok_dir, tmp_path / "file", val_fraction=0, progress=False)
    assert a["documents"] == len(DOCS) * 5 and a["tokens"] == b["tokens"]
    assert (tmp_path / "hf" / "train-u00000_00000.bin").read_bytes() == (
        tmp_path / "file" / "train-u00000_00000.bin"
    ).read_bytes()


def test_data_commands_never_touch_a_users_folder(tok_dir, corpus, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "train_00000.bin").write_bytes(b"my own file with a shard-like name")
    before = folder_bytes(mine)
    for argv in (
        ("prepare", "--input", corpus, "--tokenizer", tok_dir, "--out", mine),
        ("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", mine),
        ("data", "fetch", "wiki-en", "--out", mine),
    ):
        line = one_line_error(lmforge(*argv))
        assert "lmforge did not write" in line or "not written by lmforge" in line
        assert "--overwrite" in line
        assert folder_bytes(mine) == before
    done = lmforge("prepare", "--input", corpus, "--tokenizer", tok_dir, "--out", mine, "--overwrite")
    assert done.returncode == 0, done.stderr
    after = folder_bytes(mine)
    assert {k: after[k] for k in before} == before  # written beside, nothing of the user's replaced
    assert TokenDataset.open(mine, "train").num_docs > 0
    done = lmforge("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", mine, "--overwrite")
    assert done.returncode == 0 and (mine / "tokenizer.json").is_file()
    assert {k: folder_bytes(mine)[k] for k in before} == before
    one_line_error(lmforge("prepare", "--input", corpus, "--tokenizer", tok_dir, "--out", "."))
    theirs = tmp_path / "their-tokenizer"
    theirs.mkdir()
    (theirs / "tokenizer.json").write_text("{}")  # a user's own file where ours would go
    line = one_line_error(lmforge("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", theirs, "--overwrite"))
    assert "tokenizer.json" in line and (theirs / "tokenizer.json").read_text() == "{}"
    again = tmp_path / "again"  # a folder tokenizer train wrote itself is retrained without the flag
    assert lmforge("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", again).returncode == 0
    assert lmforge("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", again).returncode == 0


def test_lone_surrogate_is_a_counted_bad_record_or_a_strict_error(tok_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine text"}\n{"text": "broken \\ud800 text"}\n{"text": "more fine text"}\n')
    done = lmforge("prepare", "--input", path, "--tokenizer", tok_dir, "--out", tmp_path / "o", "--val-fraction", "0")
    assert done.returncode == 0, done.stderr
    assert "1 invalid Unicode" in done.stdout and "bad.jsonl:2" in done.stdout
    assert TokenDataset.open(tmp_path / "o", "train").num_docs == 2
    line = one_line_error(lmforge("prepare", "--input", path, "--tokenizer", tok_dir, "--out", tmp_path / "s", "--strict"))
    assert "bad.jsonl:2" in line and "surrogate" in line
    done = lmforge("tokenizer", "train", "--input", path, "--vocab-size", 300, "--out", tmp_path / "t")
    assert done.returncode == 0 and "1 invalid Unicode" in done.stderr
    line = one_line_error(lmforge("tokenizer", "train", "--input", path, "--vocab-size", 300, "--out", tmp_path / "t2", "--strict"))
    assert "bad.jsonl:2" in line


def test_split_val_makes_a_validation_only_folder(tok_dir, tmp_path):
    raw = tmp_path / "wiki.valid.raw"
    raw.write_text("".join(f" = Article {i} = \n\n Text of article {i} , with words . \n\n" for i in range(30)))
    done = lmforge(
        "prepare", "--input", raw, "--format", "wikitext-articles", "--tokenizer", tok_dir,
        "--out", tmp_path / "valid", "--split", "val",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "valid" / "meta.json").read_text())
    assert list(meta["splits"]) == ["val"] and meta["splits"]["val"]["docs"] == 30
    val = TokenDataset.open(tmp_path / "valid", "val")
    assert load_tokenizer(tok_dir).decode(val.doc(0)[1:-1].tolist())== "Article 0\n\nText of article 0, with words."
    done = lmforge("prepare", "--input", raw, "--format", "wikitext-articles", "--tokenizer", tok_dir,
                   "--out", tmp_path / "v1", "--val-fraction", "1")  # fmt: skip
    assert done.returncode == 0 and folder_bytes(tmp_path / "v1") == folder_bytes(tmp_path / "valid")
    with pytest.raises(DataError, match="has no 'train' split"):
        TokenDataset.open(tmp_path / "valid", "train")


def test_eval_data_skips_and_counts_a_lone_surrogate(tok_dir, tmp_path):
    import torch

    from lmforge.config import config_from_dict
    from lmforge.infer import save_weights
    from lmforge.model import Transformer

    cfg = config_from_dict({"model": {"preset": "tiny", "vocab_size": 400}, "data": {"seq_len": 16}})
    torch.manual_seed(0)
    weights = save_weights(Transformer(cfg.model).state_dict(), cfg, tmp_path / "w", dtype="float32",
                           tokenizer=load_tokenizer(tok_dir))  # fmt: skip
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine text"}\n{"text": "broken \\ud800 text"}\n{"text": "more fine text"}\n')
    done = lmforge("eval", "--checkpoint", weights, "--data", path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "perplexity" in done.stdout and "1 invalid Unicode" in done.stderr and "bad.jsonl:2" in done.stderr
