"""Plain-text corpora at scale (issue 22 items 4, 6): a .txt file is one document of any size, read
and tokenized in pieces straight into its split's shard; a corpus whose every document would be
validation is refused before tokenizing; --val-fraction 0 writes no val split and train goes on
without validation; one empty .jsonl is one empty file; --chunk-mb must be positive."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from jobs import run_reaped, tiny_config, write_jsonl

from lmforge.data import sources
from lmforge.data.prepare import prepare_dataset
from lmforge.data.token_dataset import TokenDataset
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "café", "预训练", "x = f(y);", "1234", "end."]


def lmforge(*args, timeout=180):
    return run_reaped([sys.executable, "-m", "lmforge", *map(str, args)], timeout=timeout)


def one_line_error(done) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def synthetic_text(n_lines: int, seed: int = 0) -> str:
    """Lines of words with blank lines, indented lines, trailing spaces and punctuation at ends:
    the places where a piece cut could change the tokens if it were made in the wrong spot."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
        lines.append(rng.choice(["", "  ", "\t"]) + line + rng.choice(["", "", " ", "."]))
    return "\n\n  " + "\n".join(lines) + "\n \n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("txttok")
    texts = [synthetic_text(40, seed) for seed in range(30)]
    return train_tokenizer(write_jsonl(tmp / "c.jsonl", texts), 400, tmp / "tok")


def test_large_txt_is_one_document_encoded_in_pieces_with_the_whole_texts_tokens(tok_dir, tmp_path, monkeypatch):
    text = synthetic_text(3000, seed=1)
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    tok = load_tokenizer(tok_dir)
    whole = text.strip()
    pieces = list(sources.txt_pieces(path, sources.SourceStats(), False, piece_chars=2000))
    assert len(pieces) > 20 and "".join(pieces) == whole  # many pieces, the same text
    monkeypatch.setattr(sources, "TXT_PIECE_CHARS", 2000)
    s = prepare_dataset(path, tok_dir, tmp_path / "out", val_fraction=0, progress=False)
    ds = TokenDataset.open(tmp_path / "out", "train")
    assert (s["documents"], ds.num_docs) == (1, 1)  # the README's rule: one document per file
    assert ds.doc(0).tolist() == [tok.bos_id, *tok.encode(whole), tok.eos_id]
    assert s["text_bytes"] == len(whole.encode("utf-8"))


def test_shards_are_cut_only_between_txt_documents(tok_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TXT_PIECE_CHARS", 500)
    corpus = tmp_path / "c"
    corpus.mkdir()
    texts = [synthetic_text(200, seed) for seed in range(3)]
    for i, text in enumerate(texts):
        (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
    (corpus / "3.txt").write_text("\n \n", encoding="utf-8")  # blank: an empty file, not a document
    s = prepare_dataset(corpus, tok_dir, tmp_path / "out", val_fraction=0, shard_tokens=100, progress=False)
    tok = load_tokenizer(tok_dir)
    ds = TokenDataset.open(tmp_path / "out", "train")
    assert ds.num_docs == 3 and s["skipped"] == {"empty_files": 1}
    for i, text in enumerate(texts):
        assert tok.decode(ds.doc(i).tolist()[1:-1]) == text.strip()
    assert len(ds.meta["splits"]["train"]["shards"]) == 3  # each document longer than a shard: one each


class ExplodingTokenizer(Tokenizer):
    kind, name, path, fingerprint = "fake", "exploding", Path("/nowhere/exploding"), "e" * 64
    vocab_size, bos_id, eos_id, pad_id = 300, 1, 2, 0

    def encode(self, text):
        raise AssertionError("tokenized a corpus that was going to be refused")

    def decode(self, ids):
        return ""


def test_single_txt_all_validation_is_refused_before_tokenizing(tok_dir, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(synthetic_text(50), encoding="utf-8")
    with pytest.raises(DataError, match=r"book\.txt: a \.txt file is one document"):
        prepare_dataset(path, ExplodingTokenizer(), tmp_path / "x", progress=False)
    done = lmforge("prepare", "--input", path, "--tokenizer", tok_dir, "--out", tmp_path / "out")
    line = one_line_error(done)
    assert "every one would be validation" in line and "--val-fraction 0" in line
    assert not (tmp_path / "out" / "meta.json").exists() and not (tmp_path / "out" / "prepare.state").exists()


def test_val_fraction_zero_writes_no_val_split_and_train_runs_without_validation(tok_dir, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(synthetic_text(400), encoding="utf-8")
    done = lmforge("prepare", "--input", path, "--tokenizer", tok_dir, "--out", tmp_path / "ds", "--val-fraction", 0)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert list(meta["splits"]) == ["train"]  # no empty val split
    cfg = tiny_config(tmp_path, tmp_path / "ds", train__max_steps=2, train__eval_interval=1)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(cfg.to_yaml(), encoding="utf-8")
    done = lmforge("train", "--config", cfg_path)
    assert done.returncode == 0, done.stdout + done.stderr
    notes = [line for line in (done.stdout + done.stderr).splitlines() if "validation" in line]
    assert len(notes) == 1 and notes[0].startswith("note: no validation"), notes
    assert "val loss" not in done.stdout


def test_one_empty_jsonl_counts_as_one_empty_file(tok_dir, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "real.jsonl", [synthetic_text(5, seed) for seed in range(20)])
    (corpus / "empty.jsonl").write_text("")
    done = lmforge("prepare", "--input", corpus, "--tokenizer", tok_dir, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "skipped: 1 empty files" in done.stdout, done.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["summary"]["skipped"] == {"empty_files": 1}


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_chunk_mb_must_be_positive(tok_dir, tmp_path, value):
    path = write_jsonl(tmp_path / "c.jsonl", ["one", "two"])
    done = lmforge("prepare", "--input", path, "--tokenizer", tok_dir, "--out", tmp_path / "out", f"--chunk-mb={value}")
    assert "--chunk-mb" in one_line_error(done)
    assert not (tmp_path / "out").exists()
