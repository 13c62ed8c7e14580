"""prepare_dataset: shards decode back to the sources, worker-count independence, splits, dtypes,
interrupted and repeated prepares."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from jobs import write_jsonl

from lmforge.data.prepare import format_summary, prepare_dataset
from lmforge.data.shards import file_sha256
from lmforge.data.token_dataset import TokenDataset
from lmforge.errors import DataError, LmforgeError
from lmforge.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

BASE = [
    "The quick brown fox jumps over the lazy dog.",
    "预训练是大语言模型开发的第一个关键阶段。",
    "Emoji 🙂🚀 and accents café.\nSecond line,  double  spaces.",
    "Numbers 1234567 and code: x = f(y)  # comment",
]
DOCS = [f"{BASE[i % 4]} Document {i}." + (" more words" * (i % 7)) for i in range(83)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("preptok")
    return train_tokenizer(write_jsonl(tmp / "c.jsonl", DOCS), 400, tmp / "tok")


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", DOCS)


def is_val(i: int, f: float) -> bool:
    import math

    return math.ceil((i + 1) * f) > math.ceil(i * f)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".idx")}


def test_prepared_tokens_decode_to_source_documents(tok_dir, corpus, tmp_path):
    tok = load_tokenizer(tok_dir)
    summary = prepare_dataset(corpus, tok_dir, tmp_path / "out", val_fraction=0.1, progress=False)
    assert summary["documents"] == len(DOCS)
    train, val = TokenDataset.open(tmp_path / "out", "train"), TokenDataset.open(tmp_path / "out", "val")
    assert train.dtype == np.uint16 and train.meta["dtype"] == "uint16"
    expect_val = [d for i, d in enumerate(DOCS) if is_val(i, 0.1)]
    expect_train = [d for i, d in enumerate(DOCS) if not is_val(i, 0.1)]
    assert len(expect_val) == 9 and (val.num_docs, train.num_docs) == (9, 74)
    for ds, texts in ((train, expect_train), (val, expect_val)):
        for j, text in enumerate(texts):
            ids = ds.doc(j).tolist()
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
            assert tok.decode(ids[1:-1]) == text
    assert set(expect_val).isdisjoint(expect_train)
    assert summary["tokens"] == train.num_tokens + val.num_tokens
    assert summary["bytes_per_token"] > 1


def test_meta_records_tokenizer_sources_and_counts(tok_dir, corpus, tmp_path):
    tok = load_tokenizer(tok_dir)
    prepare_dataset(corpus, tok, tmp_path / "out", progress=False)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["vocab_size"]) == (1, 2, 0, 400)
    [src] = meta["sources"]
    assert src["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert src["bytes"] == corpus.stat().st_size
    assert meta["splits"]["val"]["docs"] == 1  # ceil(83 * 0.01)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == len(DOCS)
    for shard in meta["splits"]["train"]["shards"]:
        assert file_sha256(tmp_path / "out" / shard["file"]) == shard["sha256"]
    TokenDataset.open(tmp_path / "out", "train", expect_fingerprint=tok.fingerprint)


def test_one_and_four_workers_write_identical_bytes(tok_dir, corpus, tmp_path):
    # Small chunks and shards so that many chunks cross worker boundaries and shards roll over.
    kw = dict(val_fraction=0.05, progress=False, chunk_bytes=300, shard_tokens=500)
    one = prepare_dataset(corpus, tok_dir, tmp_path / "w1", workers=1, **kw)
    four = prepare_dataset(corpus, tok_dir, tmp_path / "w4", workers=4, **kw)
    a, b = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w4")
    assert len(a) > 4 and a == b
    assert one["tokens"] == four["tokens"]
    meta1 = json.loads((tmp_path / "w1" / "meta.json").read_text())
    meta4 = json.loads((tmp_path / "w4" / "meta.json").read_text())
    assert meta1["splits"] == meta4["splits"]


def test_tiny_corpus_still_gets_a_val_document(tok_dir, tmp_path):
    two = write_jsonl(tmp_path / "two.jsonl", ["first document", "second document"])
    s = prepare_dataset(two, tok_dir, tmp_path / "two", val_fraction=0.01, progress=False)
    assert (s["train_docs"], s["val_docs"]) == (1, 1)
    one = write_jsonl(tmp_path / "one.jsonl", ["only one"])
    with pytest.raises(DataError, match="only 1 document"):
        prepare_dataset(one, tok_dir, tmp_path / "one", progress=False)
    assert not (tmp_path / "one" / "meta.json").exists()
    s = prepare_dataset(one, tok_dir, tmp_path / "one", val_fraction=0.0, progress=False)
    assert (s["train_docs"], s["val_docs"]) == (1, 0)


class WideTokenizer(Tokenizer):
    """Stands in for a >65,536-id tokenizer (Llama-3 has 128,256) without building one."""

    kind, name, path, fingerprint = "fake", "wide-128256", Path("/nowhere/wide"), "f" * 64
    vocab_size, bos_id, eos_id, pad_id = 128256, 128000, 128001, None

    def encode(self, text):
        return [100_000 + b for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 100_000 for i in ids).decode()


def test_dtype_follows_vocab_and_too_small_dtype_is_refused(corpus, tmp_path):
    wide = WideTokenizer()
    with pytest.raises(DataError, match=r"wide-128256.*dtype uint16"):
        prepare_dataset(corpus, wide, tmp_path / "bad", dtype="uint16", progress=False)
    assert not (tmp_path / "bad" / "meta.json").exists()
    s = prepare_dataset(corpus, wide, tmp_path / "wide", progress=False)
    ds = TokenDataset.open(tmp_path / "wide", "train")
    assert s["dtype"] == "uint32" and ds.dtype == np.uint32
    assert ds.doc(0)[0] == 128000 and wide.decode(ds.doc(0)[1:-1].tolist()) == DOCS[1]


def test_gpt2_style_tokenizer_has_no_bos(corpus, tmp_path):
    ranks = [bytes([b]) for b in range(256)]
    path = tmp_path / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    prepare_dataset(corpus, path, tmp_path / "out", progress=False)
    doc = TokenDataset.open(tmp_path / "out", "train").doc(0).tolist()
    assert doc == list(DOCS[1].encode()) + [256]  # bytes then <|endoftext|>, no BOS


def test_interrupted_prepare_resumes_per_unit(tok_dir, corpus, tmp_path, monkeypatch):
    import lmforge.data.encode as encode

    kw = dict(progress=False, shard_tokens=300, chunk_bytes=200, val_fraction=0.05)
    reference = tmp_path / "ref"
    prepare_dataset(corpus, tok_dir, reference, **kw)
    real, calls = encode.encode_unit, []

    def dies_at_unit_5(unit, *args, **kwargs):
        calls.append(unit["id"])
        if unit["id"] == 5:
            raise KeyboardInterrupt
        return real(unit, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(encode, "encode_unit", dies_at_unit_5)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(corpus, tok_dir, out, **kw)
    assert not (out / "meta.json").exists() and not list(out.glob("*.tmp"))
    assert len(list((out / "prepare.state").glob("u*.json"))) == 5
    with pytest.raises(DataError, match="meta.json"):
        TokenDataset.open(out, "train")
    calls.clear()
    monkeypatch.setattr(encode, "encode_unit", lambda unit, *a, **k: calls.append(unit["id"]) or real(unit, *a, **k))
    s = prepare_dataset(corpus, tok_dir, out, **kw)
    assert calls[0] == 5 and 0 not in calls  # units 0-4 were not redone
    assert s["units"] > 5 and shard_bytes(out) == shard_bytes(reference)
    assert json.loads((out / "meta.json").read_text())["splits"] == json.loads(
        (reference / "meta.json").read_text()
    )["splits"]
    assert not (out / "prepare.state").exists()


def test_complete_prepare_is_reused_or_refused(tok_dir, corpus, tmp_path):
    out = tmp_path / "out"
    first = prepare_dataset(corpus, tok_dir, out, progress=False)
    again = prepare_dataset(corpus, tok_dir, out, progress=False)
    assert again["reused"] and again["tokens"] == first["tokens"]
    other = write_jsonl(tmp_path / "other.jsonl", DOCS[:10])
    with pytest.raises(DataError, match="overwrite"):
        prepare_dataset(other, tok_dir, out, progress=False)
    assert TokenDataset.open(out, "train").num_docs == first["train_docs"]  # untouched
    s = prepare_dataset(other, tok_dir, out, progress=False, overwrite=True)
    assert s["documents"] == 10 and TokenDataset.open(out, "train").num_docs == 9


def test_bad_arguments(tok_dir, corpus, tmp_path):
    with pytest.raises(DataError, match="val_fraction"):
        prepare_dataset(corpus, tok_dir, tmp_path / "o", val_fraction=1.5, progress=False)
    with pytest.raises(DataError, match="not a shard dtype"):
        prepare_dataset(corpus, tok_dir, tmp_path / "o", dtype="int8", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        prepare_dataset(corpus, tok_dir, tmp_path / "file", progress=False)
    # A bad --format is refused before an existing complete prepare is cleared for --overwrite.
    prepare_dataset(corpus, tok_dir, tmp_path / "kept", progress=False)
    with pytest.raises(DataError, match="unknown format 'xml'"):
        prepare_dataset(corpus, tok_dir, tmp_path / "kept", fmt="xml", overwrite=True, progress=False)
    assert (tmp_path / "kept" / "meta.json").exists()


def test_progress_prints_summary(tok_dir, corpus, tmp_path, capsys):
    prepare_dataset(corpus, tok_dir, tmp_path / "o", progress=True)
    out = capsys.readouterr().out
    assert f"prepared {len(DOCS)} documents" in out and "bytes/token" in out and "tok/s" in out
    assert "MB/s" in out and "skipped: none" in out


def test_summary_labels_skips_by_reason():
    s = {"documents": 3, "tokens": 30, "train_docs": 2, "train_tokens": 20, "val_docs": 1}
    s |= {"val_tokens": 10, "text_bytes": 2_000_000, "bytes_per_token": 3.5, "dtype": "uint16"}
    s |= {"seconds": 4.0, "tokens_per_s": 7.5, "workers": 2}
    s |= {"skipped": {"malformed JSON": 2, "empty_files": 1}, "skip_examples": ["a.jsonl:3: bad"]}
    line, example = format_summary(s).split("\n")
    assert "skipped: 2 malformed JSON, 1 empty files," in line
    assert "4.0 s (0.50 MB/s, 8 tok/s, 2 workers)" in line and "3.50 bytes/token" in line
    assert example == "  e.g. a.jsonl:3: bad"


def test_in_memory_tokenizer_with_workers_fails_cleanly(corpus, tmp_path):
    # Several units, so workers are started (one unit is encoded in this process).
    with pytest.raises(LmforgeError, match="tokenizer not found"):
        prepare_dataset(corpus, WideTokenizer(), tmp_path / "o", workers=2, progress=False, chunk_bytes=500)
    assert not (tmp_path / "o" / "meta.json").exists()


def test_bad_lines_are_counted_skips_or_strict_errors(tok_dir, tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": t}) for t in DOCS[:5]]
    path.write_text("\n".join(good[:2] + ["{broken json"] + good[2:] + ['{"title": "no text"}']) + "\n")
    s = prepare_dataset(path, tok_dir, tmp_path / "o", progress=False)
    assert s["documents"] == 5 and sum(s["skipped"].values()) == 2
    assert any("mixed.jsonl:3" in e for e in s["skip_examples"])
    with pytest.raises(DataError, match="mixed.jsonl:3"):
        prepare_dataset(path, tok_dir, tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict" / "meta.json").exists()
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset(tmp_path / "nope.jsonl", tok_dir, tmp_path / "o2", progress=False)


def test_workers_from_a_script_without_main_guard(tok_dir, corpus, tmp_path):
    import subprocess

    script = tmp_path / "no_guard.py"
    script.write_text(
        "from lmforge.data.prepare import prepare_dataset\n"
        f"s = prepare_dataset({str(corpus)!r}, {str(tok_dir)!r}, {str(tmp_path / 'o')!r}, workers=2, progress=False)\n"
        "print('TOKENS', s['tokens'])\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("TOKENS") == 1  # the script ran once, not once per worker
    assert TokenDataset.open(tmp_path / "o", "train").num_docs == len(DOCS) - 1


def test_parquet_row_group_units_and_gzip_equal_the_jsonl(tok_dir, corpus, tmp_path):
    """Parquet is cut into units of row groups, .gz is one unit; the tokens equal the JSONL's."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet", row_group_size=10)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(corpus.read_bytes()))
    kw = dict(val_fraction=0, progress=False)
    ref = prepare_dataset(corpus, tok_dir, tmp_path / "ref", **kw)
    par = prepare_dataset(tmp_path / "c.parquet", tok_dir, tmp_path / "par", chunk_bytes=200, **kw)
    gz = prepare_dataset(tmp_path / "c.jsonl.gz", tok_dir, tmp_path / "gz", chunk_bytes=200, **kw)
    assert par["units"] > 3 and gz["units"] == 1
    want = TokenDataset.open(tmp_path / "ref", "train")
    for name, s in (("par", par), ("gz", gz)):
        ds = TokenDataset.open(tmp_path / name, "train")
        assert s["tokens"] == ref["tokens"] and ds.num_docs == len(DOCS)
        assert np.array_equal(ds.tokens(0, ds.num_tokens), want.tokens(0, want.num_tokens)), name
