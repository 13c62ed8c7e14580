"""The loader at scale and its batch layout: thousands of shards open lazily, document ids and
restarted positions for document masking, padded batches trimmed to their longest sample, and
padded mode sample for sample equal to MiniMind's PretrainDataset (imported from its source)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from jobs import write_jsonl
from paths import MINIMIND

from lmforge.config import DataConfig
from lmforge.data.loader import IGNORE_INDEX, PAD_MULTIPLE, build_loader
from lmforge.data.shards import ShardWriter, write_meta
from lmforge.data.token_dataset import TokenDataset


def write_many_shards(folder: Path, n_shards: int, doc_len: int = 5) -> None:
    """n_shards shards of one document each, written directly (no fsync: this is test data)."""
    folder.mkdir(parents=True)
    shards = []
    for k in range(n_shards):
        tokens = np.arange(k, k + doc_len, dtype="<u2") % 60000
        index = np.array([0, doc_len], dtype="<i8").tobytes()
        (folder / f"train_{k:05d}.bin").write_bytes(tokens.tobytes())
        (folder / f"train_{k:05d}.idx").write_bytes(index)
        shards.append({"file": f"train_{k:05d}.bin", "index": f"train_{k:05d}.idx", "tokens": doc_len,
                       "docs": 1, "max_id": int(tokens.max()), "max_doc": doc_len,
                       "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                       "index_sha256": hashlib.sha256(index).hexdigest()})  # fmt: skip
    split = {"shards": shards, "tokens": doc_len * n_shards, "docs": n_shards, "max_id": 60000}
    write_meta(folder, {"dtype": "uint16", "vocab_size": 65536, "splits": {"train": split}, "eos_id": 0})


def test_five_thousand_shards_open_lazily(tmp_path):
    write_many_shards(tmp_path / "many", 5000)
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    tracemalloc.start()
    ds = TokenDataset.open(tmp_path / "many", "train")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ds.num_docs == 5000 and ds.num_tokens == 25000
    assert peak < 64 * 2**20  # the parsed meta.json only, not 5,000 maps and indexes
    assert not ds._open  # nothing mapped until a sample needs it
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds + 1
    assert ds.tokens(12, 18).tolist() == [4, 5, 6, 3, 4, 5]  # spans shards 2 and 3
    assert ds.doc(4321).tolist() == list(range(4321, 4326)) and len(ds._open) == 3
    ld = build_loader(DataConfig(train=[{"path": str(tmp_path / "many")}], seq_len=16, prefetch=0), "train", 4)
    assert next(ld)["input_ids"].shape == (4, 16)
    assert len(ld.sources[0].ds._open) <= 4 * (17 // 5 + 2)  # only the shards of this rank's 4 windows


def prepared(tmp_path, lengths) -> Path:
    docs = [np.arange(1, n + 1) + 100 * i for i, n in enumerate(lengths)]
    with ShardWriter(tmp_path, "train", "uint16", shard_tokens=23) as w:  # several shards, too
        for d in docs:
            w.add_document(d)
        train = w.close()
    write_meta(tmp_path, {"dtype": "uint16", "vocab_size": 65536, "splits": {"train": train}, "eos_id": 0, "pad_id": 0})
    return tmp_path


def test_packed_batches_carry_document_ids_and_restarted_positions(tmp_path):
    lengths = [3, 7, 1, 12, 4, 9, 2, 15, 6, 5]
    path = prepared(tmp_path, lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)))[:-1]
    seq = 10
    data = DataConfig(train=[{"path": str(path)}], seq_len=seq, shuffle=False, prefetch=0,
                      document_mask=True, reset_positions=True)  # fmt: skip
    ld = build_loader(data, "train", ld_batch := 3)
    for step in range(2):
        b = next(ld)
        for r in range(ld_batch):
            w0 = (step * ld_batch + r) * seq
            pos = np.arange(w0, w0 + seq)
            doc_of = np.searchsorted(starts, pos, side="right") - 1  # global document of each input
            expect_ids = doc_of - doc_of[0]
            assert b["doc_ids"][r].tolist() == expect_ids.tolist()
            first = np.maximum(starts[doc_of], w0)  # a document cut by the window restarts at 0
            assert b["position_ids"][r].tolist() == (pos - first).tolist()
    plain = next(build_loader(DataConfig(train=[{"path": str(path)}], seq_len=seq, prefetch=0), "train", 2))
    assert "doc_ids" not in plain and "position_ids" not in plain


def test_padded_batches_are_trimmed_to_their_longest_sample(tmp_path):
    lengths = [3, 9, 12, 5]
    path = prepared(tmp_path, lengths)
    data = DataConfig(train=[{"path": str(path)}], seq_len=64, mode="padded", shuffle=False, prefetch=0,
                      document_mask=True)  # fmt: skip
    with pytest.raises(Exception, match="longer than every document"):
        next(build_loader(data, "train", 2))
    data.seq_len = 11
    b = next(build_loader(data, "train", 4))
    assert b["input_ids"].shape == (4, 11)  # 12 tokens -> 11 inputs: the cap, not 16
    data.seq_len, ld = 8, None
    ld = build_loader(DataConfig(train=[{"path": str(path)}], seq_len=8, mode="padded", shuffle=False, prefetch=0), "train", 1)
    first = next(ld)  # a 3-token document: 2 real targets, trimmed to one multiple of 8
    assert first["input_ids"].shape == (1, PAD_MULTIPLE)
    assert first["labels"][0].tolist() == [2, 3] + [IGNORE_INDEX] * (PAD_MULTIPLE - 2)
    assert int((b["labels"] != IGNORE_INDEX).sum()) == sum(min(n, 12) - 1 for n in lengths)
    assert "doc_ids" not in b  # one document per sample: nothing to mask (document_mask is for packed)


@pytest.mark.skipif(not (MINIMIND / "dataset/lm_dataset.py").is_file(), reason="MiniMind reference not present")
def test_padded_mode_is_minimind_pretrain_dataset_sample_for_sample(tmp_path):
    """Same tokenizer (MiniMind's own), same JSONL with special tokens inside the text, same
    max_length: our padded batches equal PretrainDataset's (input_ids, labels) after the shift
    MiniMind's model applies (logits[:-1] against labels[1:])."""
    from transformers import AutoTokenizer

    from lmforge.data.prepare import prepare_dataset

    spec = importlib.util.spec_from_file_location("minimind_lm_dataset", MINIMIND / "dataset/lm_dataset.py")
    lm_dataset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm_dataset)
    texts = [
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
        "一个简短的中文句子。",
        "A longer English document " + "with many repeated words " * 30,
        "short",
        "<think>reasoning</think> answer <|endoftext|> after the pad token",
    ]
    corpus = write_jsonl(tmp_path / "pretrain.jsonl", texts)
    max_length = 32
    tok_dir = MINIMIND / "model"
    theirs = lm_dataset.PretrainDataset(str(corpus), AutoTokenizer.from_pretrained(str(tok_dir)), max_length)
    prepare_dataset(corpus, tok_dir, tmp_path / "data", val_fraction=0, progress=False)
    data = DataConfig(train=[{"path": str(tmp_path / "data")}], seq_len=max_length - 1, mode="padded",
                      shuffle=False, prefetch=0)  # fmt: skip
    ld = build_loader(data, "train", 1)
    assert ld.samples_per_epoch == len(theirs) == len(texts)
    for i in range(len(texts)):
        ours = next(ld)
        mm_x, mm_y = theirs[i]
        width = ours["input_ids"].shape[1]
        full_x = mm_x[:-1].tolist()
        assert ours["input_ids"][0].tolist() == full_x[:width], i
        expect_y = mm_y[1:].tolist()
        assert all(t == IGNORE_INDEX for t in expect_y[width:]), i  # trimming drops no trained target
        got_y = ours["labels"][0].tolist() + [IGNORE_INDEX] * (max_length - 1 - width)
        if i != 4:
            assert got_y == expect_y, i
        else:  # MiniMind masks every pad id, also a <|endoftext|> written inside the text
            differ = [j for j, (a, b) in enumerate(zip(got_y, expect_y)) if a != b]
            assert differ and all(expect_y[j] == IGNORE_INDEX and got_y[j] == 0 for j in differ)
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["pad_id"] == 0
