"""Shard format: round trips across shard boundaries, atomic writing, and every bad-input check."""

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import shards
from lmforge.data.shards import ShardWriter, dtype_for_vocab, write_meta
from lmforge.data.token_dataset import TokenDataset
from lmforge.errors import DataError


def write_folder(path, docs, val_docs=(), dtype="uint16", shard_tokens=300, vocab=6400, fingerprint="tok-a"):
    Path(path).mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, items in (("train", docs), ("val", val_docs)):
        with ShardWriter(path, split, dtype, shard_tokens=shard_tokens) as w:
            for d in items:
                w.add_document(np.asarray(d))
        splits[split] = w.close()
    meta = {"dtype": dtype, "vocab_size": vocab, "tokenizer_fingerprint": fingerprint, "bos_id": None}
    write_meta(path, {**meta, "eos_id": 0, "pad_id": None, "splits": splits})
    return path


def random_docs(n=80, vocab=6400, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, rng.integers(1, 60)) for _ in range(n)]


def test_round_trip_across_shards(tmp_path):
    docs = random_docs()
    write_folder(tmp_path, docs, val_docs=docs[:3])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert len(meta["splits"]["train"]["shards"]) > 3  # several shards, so boundaries are exercised
    assert meta["splits"]["train"]["docs"] == len(docs)
    ds = TokenDataset.open(tmp_path, "train", expect_fingerprint="tok-a", vocab_size=6400)
    stream = np.concatenate(docs)
    assert ds.num_tokens == len(stream) and ds.num_docs == len(docs)
    assert np.array_equal(ds.tokens(0, ds.num_tokens), stream)
    for start in range(0, len(stream), 41):
        for stop in (start, start + 1, start + 299, start + 1000):
            stop = min(stop, len(stream))
            assert np.array_equal(ds.tokens(start, stop), stream[start:stop])
    for i, d in enumerate(docs):
        assert np.array_equal(ds.doc(i), d)
    assert np.array_equal(ds.doc_lengths(), [len(d) for d in docs])
    with pytest.raises(IndexError):
        ds.doc(len(docs))
    val = TokenDataset.open(tmp_path, "val")
    assert val.num_docs == 3 and np.array_equal(val.doc(2), docs[2])
    ds.verify()


def test_uint32_and_dtype_choice(tmp_path):
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"
    docs = [np.array([70000, 128255, 5]), np.array([1, 2])]
    write_folder(tmp_path, docs, dtype="uint32", vocab=128256)
    ds = TokenDataset.open(tmp_path)
    assert ds.dtype == np.dtype("<u4") and np.array_equal(ds.doc(0), docs[0])


def test_id_beyond_dtype_is_refused(tmp_path):
    with ShardWriter(tmp_path, "train", "uint16") as w, pytest.raises(DataError, match="uint32"):
        w.add_document(np.array([1, 70000]))


def test_interrupted_writer_leaves_nothing_complete(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", "uint16", shard_tokens=10) as w:
        for _ in range(3):
            w.add_document(np.arange(1, 12))  # each document closes a shard
        w.add_document(np.arange(1, 5))
        raise RuntimeError("killed")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"train_0000{k}.{ext}" for k in range(3) for ext in ("bin", "idx")]
    with pytest.raises(DataError, match="prepare did not finish"):
        TokenDataset.open(tmp_path)


def test_missing_folder_and_unfinished(tmp_path):
    with pytest.raises(DataError, match=r"nope: is not a prepared dataset.*run lmforge prepare"):
        TokenDataset.open(tmp_path / "nope")
    write_folder(tmp_path, random_docs(5))
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataError, match="no meta.json"):
        TokenDataset.open(tmp_path)


def test_fingerprint_mismatch_names_both(tmp_path):
    write_folder(tmp_path, random_docs(5))
    with pytest.raises(
        DataError, match=r"meta.json: prepared with tokenizer tok-a but this run uses tokenizer tok-b"
    ):
        TokenDataset.open(tmp_path, expect_fingerprint="tok-b")


def test_model_vocab_smaller_than_data(tmp_path):
    write_folder(tmp_path, [np.array([1, 6399])], vocab=6400)
    with pytest.raises(DataError, match=r"model.vocab_size 4000 is smaller.*at least 6400"):
        TokenDataset.open(tmp_path, vocab_size=4000)
    TokenDataset.open(tmp_path, vocab_size=6400)


def test_max_id_beyond_declared_vocab(tmp_path):
    write_folder(tmp_path, [np.array([1, 9000])], vocab=6400)
    with pytest.raises(DataError, match="largest id 9000"):
        TokenDataset.open(tmp_path, vocab_size=6400)


def test_unsupported_format_version(tmp_path):
    write_folder(tmp_path, random_docs(5))
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99 is not supported"):
        TokenDataset.open(tmp_path)


def test_missing_split(tmp_path):
    write_folder(tmp_path, random_docs(5))
    with pytest.raises(DataError, match="has no 'test' split"):
        TokenDataset.open(tmp_path, "test")


def test_truncated_shard(tmp_path):
    write_folder(tmp_path, random_docs())
    path = tmp_path / "train_00001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train_00001.bin: \d+ bytes but meta.json says"):
        TokenDataset.open(tmp_path)


def test_missing_shard_file(tmp_path):
    write_folder(tmp_path, random_docs())
    (tmp_path / "train_00002.idx").unlink()
    with pytest.raises(DataError, match="train_00002.idx: missing"):
        TokenDataset.open(tmp_path)


def test_inconsistent_index(tmp_path):
    write_folder(tmp_path, random_docs())
    meta_path = tmp_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["splits"]["train"]["shards"][0]["index_sha256"]  # only the structural check is left
    meta_path.write_text(json.dumps(meta))
    idx = tmp_path / "train_00000.idx"
    offsets = np.fromfile(idx, dtype="<i8")
    offsets[1], offsets[2] = offsets[2], offsets[1]
    offsets.tofile(idx)
    with pytest.raises(DataError, match="train_00000.idx: document offsets are not an increasing"):
        TokenDataset.open(tmp_path)


def test_bit_flip_caught_on_open_for_small_splits_and_by_verify(tmp_path, monkeypatch):
    write_folder(tmp_path, random_docs())
    path = tmp_path / "train_00003.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train_00003.bin: sha256 differs"):
        TokenDataset.open(tmp_path)
    monkeypatch.setattr(shards, "HASH_ON_OPEN_BYTES", 0)  # a "large" split: only sizes on open
    ds = TokenDataset.open(tmp_path)
    with pytest.raises(DataError, match="train_00003.bin: sha256 differs"):
        ds.verify()


def test_corrupt_meta_json(tmp_path):
    write_folder(tmp_path, random_docs(5))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json: unreadable"):
        TokenDataset.open(tmp_path)
