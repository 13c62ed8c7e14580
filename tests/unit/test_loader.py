"""Loader: exactly-once epochs over ranks, deterministic shuffling, exact resume across dp sizes,
prefetch equivalence, padded-mode masks, packed shift, weighted mixing and bad input."""

import gc
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig
from lmforge.data.loader import IGNORE_INDEX, build_loader
from lmforge.data.shards import ShardWriter, write_meta
from lmforge.errors import DataError

SEQ = 8


def prepare(path, docs, val_docs=None, pad_id=None, fingerprint="tok-a", vocab=65536):
    Path(path).mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, items in (("train", docs), ("val", val_docs if val_docs is not None else docs[:4])):
        with ShardWriter(path, split, "uint16", shard_tokens=97) as w:
            for d in items:
                w.add_document(np.asarray(d))
        splits[split] = w.close()
    meta = {"dtype": "uint16", "vocab_size": vocab, "tokenizer_fingerprint": fingerprint}
    write_meta(path, {**meta, "eos_id": 0, "pad_id": pad_id, "splits": splits})
    return str(path)


def counting_docs(total, offset=0, seed=0):
    """Documents whose concatenation is offset, offset+1, ...: a token names its stream position."""
    rng = np.random.default_rng(seed)
    docs, pos = [], 0
    while pos < total:
        n = int(min(rng.integers(1, 30), total - pos))
        docs.append(np.arange(offset + pos, offset + pos + n))
        pos += n
    return docs


@pytest.fixture
def packed_dir(tmp_path):
    return prepare(tmp_path / "packed", counting_docs(SEQ * 50 + 5))  # 50 windows, a ragged tail


def cfg(paths, **kw):
    train = [{"path": p, "weight": w} for p, w in paths] if isinstance(paths, list) else paths
    return DataConfig(train=train, seq_len=kw.pop("seq_len", SEQ), **kw)


def global_ids(data_cfg, dp_size, micro, steps, seed=1, state=None):
    """Global sample ids (window start // SEQ) over `steps` micro steps, gathered from all ranks."""
    loaders = [build_loader(data_cfg, "train", micro, r, dp_size, seed) for r in range(dp_size)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        for ld in loaders:
            out.extend((next(ld)["input_ids"][:, 0] // SEQ).tolist())
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states)  # every rank agrees on the global position
    for ld in loaders:
        ld.close()
    return out, states[0]


def test_packed_windows_shift_by_one(packed_dir):
    loader = build_loader(cfg(packed_dir), "train", 4, 0, 1, seed=3)
    assert loader.samples_per_epoch == 50
    for _ in range(20):
        b = next(loader)
        x, y = b["input_ids"], b["labels"]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, SEQ)
        start = x[:, :1]
        assert torch.equal(x, start + torch.arange(SEQ))  # contiguous stream windows
        assert torch.equal(y, start + 1 + torch.arange(SEQ))  # targets are the next tokens
        assert bool((start % SEQ == 0).all())  # windows start every seq_len tokens
    loader.close()


@pytest.mark.parametrize("dp_size,micro", [(1, 5), (2, 5), (4, 3), (2, 7), (4, 1)])
def test_epoch_is_every_sample_exactly_once(packed_dir, dp_size, micro):
    gb = dp_size * micro
    steps = -(-50 // gb)  # enough steps to cover an epoch; the last may spill into epoch 1
    ids, state = global_ids(cfg(packed_dir), dp_size, micro, steps)
    assert sorted(ids[:50]) == list(range(50))
    # The tail is not dropped: it is the start of epoch 1's order, as one rank alone sees it.
    alone, _ = global_ids(cfg(packed_dir), 1, 1, 50 + len(ids) - 50)
    assert ids == alone[: len(ids)]
    assert state["epoch"] == len(ids) // 50 and state["consumed"] == len(ids) % 50


def test_shuffle_deterministic_and_differs_by_epoch_and_seed(packed_dir):
    a, _ = global_ids(cfg(packed_dir), 1, 10, 10, seed=1)
    b, _ = global_ids(cfg(packed_dir), 1, 10, 10, seed=1)
    c, _ = global_ids(cfg(packed_dir), 1, 10, 5, seed=2)
    assert a == b
    assert a[:50] != a[50:] and sorted(a[50:]) == list(range(50))
    assert c != a[:50]
    ordered, _ = global_ids(cfg(packed_dir, shuffle=False), 2, 5, 6)
    assert ordered == list(range(50)) + list(range(10))


@pytest.mark.parametrize("new_dp,new_micro", [(2, 3), (3, 2), (1, 5), (4, 1)])
def test_resume_continues_exactly_with_any_dp_size(packed_dir, new_dp, new_micro):
    full, _ = global_ids(cfg(packed_dir), 1, 1, 140)
    first, state = global_ids(cfg(packed_dir), 2, 3, 7)  # 42 samples, then "crash"
    rest, _ = global_ids(cfg(packed_dir), new_dp, new_micro, 90 // (new_dp * new_micro), state=state)
    joined = first + rest
    assert joined == full[: len(joined)]


def test_state_counts_only_what_was_handed_out_not_read_ahead(packed_dir):
    with build_loader(cfg(packed_dir, prefetch=4), "train", 2, 0, 1, seed=5) as ld:
        got = [next(ld) for _ in range(3)]
        state = ld.state_dict()  # the prefetcher is ahead by now
        assert state["position"] == 6
        nxt = next(ld)
    with build_loader(cfg(packed_dir, prefetch=0), "train", 2, 0, 1, seed=99) as ld2:
        ld2.load_state_dict(state)  # the saved seed wins over the constructor's
        assert torch.equal(next(ld2)["input_ids"], nxt["input_ids"])
    assert len(got) == 3


def test_prefetch_gives_identical_batches_and_leaks_no_thread(packed_dir):
    def run(prefetch):
        with build_loader(cfg(packed_dir, prefetch=prefetch), "train", 3, 1, 2, seed=7) as ld:
            return [next(ld) for _ in range(30)]

    with_thread, without = run(3), run(0)
    for a, b in zip(with_thread, without):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    ld = build_loader(cfg(packed_dir, prefetch=2), "train", 3, 0, 1, seed=7)
    next(ld)
    del ld  # dropped without close(): the thread must still end
    gc.collect()
    for t in threading.enumerate():
        if t.name == "lmforge-prefetch":
            t.join(timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "lmforge-prefetch" and t.is_alive()]


def test_padded_mode_masks_exactly_the_padding(tmp_path):
    lengths = [3, 9, 12, 1, 5, 9, 30]  # shorter, exactly seq_len+1, longer (truncated)
    docs = [np.arange(1, n + 1) + 100 * i for i, n in enumerate(lengths)]
    path = prepare(tmp_path, docs, pad_id=7)
    ld = build_loader(cfg(path, mode="padded", shuffle=False), "train", len(docs), 0, 1, seed=0)
    assert ld.samples_per_epoch == len(docs)
    b = next(ld)
    for i, n in enumerate(lengths):
        x, y = b["input_ids"][i], b["labels"][i]
        real = min(n, SEQ + 1)
        expect = np.full(SEQ + 1, 7)
        # A long document keeps its last token (eos) after truncation, as MiniMind's PretrainDataset.
        expect[:real] = docs[i] if n <= SEQ + 1 else np.concatenate((docs[i][:SEQ], docs[i][-1:]))
        assert x.tolist() == expect[:-1].tolist()
        assert y[: real - 1].tolist() == expect[1:real].tolist()  # every real target is trained on
        assert (y[real - 1 :] == IGNORE_INDEX).all()  # and exactly the padding is not
    ld.close()


def test_padded_mode_pads_with_eos_without_pad_id(tmp_path):
    path = prepare(tmp_path, [np.arange(5, 8), np.arange(1, 20)])
    b = next(build_loader(cfg(path, mode="padded", shuffle=False, prefetch=0), "train", 1, 0, 1))
    assert b["input_ids"][0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert b["labels"][0].tolist() == [6, 7] + [IGNORE_INDEX] * 6


def test_mixing_follows_weights_deterministically_and_resumes(tmp_path):
    a = prepare(tmp_path / "a", counting_docs(SEQ * 40 + 1))
    b = prepare(tmp_path / "b", counting_docs(SEQ * 7 + 1, offset=30000, seed=1))
    mix = cfg([(a, 3.0), (b, 1.0)])

    def sources(steps, dp=1, micro=8, state=None):
        ids, st = global_ids(mix, dp, micro, steps, state=state)
        return [i >= 30000 // SEQ for i in ids], ids, st

    from_b, ids, state = sources(50)
    assert abs(sum(from_b) / len(from_b) - 0.25) < 0.01  # 400 samples, 1:3
    assert max(len(list(g)) for _, g in itertools.groupby(from_b)) <= 4  # interleaved
    b_ids = [i for i, fb in zip(ids, from_b) if fb]
    assert sorted(b_ids[:7]) == sorted(b_ids[7:14])  # dataset b has its own epochs (7 windows)
    assert b_ids[:7] != b_ids[7:14]
    assert state["datasets"][1]["taken"] == 100 and state["datasets"][1]["epoch"] == 100 // 7
    _, first_ids, st = sources(5, dp=2, micro=4)
    _, rest_ids, _ = sources(20, dp=4, micro=1, state=st)
    assert ids[:120] == first_ids + rest_ids


def test_val_loader_one_pass_in_order_and_reset(tmp_path):
    path = prepare(tmp_path, counting_docs(SEQ * 50 + 1), val_docs=counting_docs(SEQ * 5 + 1))
    ld = build_loader(cfg(path), "val", 2, 0, 1, seed=0)
    assert ld.num_batches == 3
    first = [b["input_ids"][:, 0].tolist() for b in ld]
    assert first == [[0, 8], [16, 24], [32, 0]]  # the last batch is completed from the start
    ld.reset()
    assert [b["input_ids"][:, 0].tolist() for b in ld] == first
    sep = prepare(tmp_path / "v", counting_docs(SEQ * 3 + 1, offset=500))
    ld = build_loader(cfg(path, valid=sep), "val", 3, 0, 1)
    assert next(ld)["input_ids"][:, 0].tolist() == [500, 508, 516]


def test_bad_inputs_name_the_file(tmp_path, packed_dir):
    with pytest.raises(DataError, match=r"missing: is not a prepared dataset.*run lmforge prepare"):
        build_loader(cfg(str(tmp_path / "missing")), "train", 1)
    with pytest.raises(DataError, match="data.train: no prepared dataset"):
        build_loader(DataConfig(), "train", 1)
    with pytest.raises(DataError, match="prepared with tokenizer tok-a but this run uses tokenizer tok-z"):
        build_loader(cfg(packed_dir), "train", 1, tokenizer_fingerprint="tok-z")
    with pytest.raises(DataError, match="model.vocab_size 100 is smaller"):
        build_loader(cfg(packed_dir), "train", 1, vocab_size=100)
    with pytest.raises(DataError, match=r"packed.*split 'train'.*fewer than one window.*lower data.seq_len"):
        build_loader(cfg(packed_dir, seq_len=1000), "train", 1)
    with pytest.raises(DataError, match=r"packed.*seq_len 64 is longer than every document \(longest 29"):
        build_loader(cfg(packed_dir, mode="padded", seq_len=64), "train", 1)
    state = build_loader(cfg(packed_dir), "train", 1).state_dict()
    with pytest.raises(DataError, match="loader state holds 50 packed samples of seq_len 8"):
        build_loader(cfg(packed_dir, seq_len=4), "train", 1).load_state_dict(state)
    with pytest.raises(DataError, match="saved for 1 datasets but data.train now lists 2"):
        build_loader(cfg([(packed_dir, 1.0), (packed_dir, 1.0)]), "train", 1).load_state_dict(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned-memory path needs a CUDA device")
def test_cuda_batches_are_pinned_and_on_device(packed_dir):
    with build_loader(cfg(packed_dir), "train", 4, 0, 1, seed=3, device="cuda") as ld:
        b = next(ld)
        assert b["input_ids"].is_cuda and b["labels"].is_cuda and ld.pin
        ref = next(build_loader(cfg(packed_dir, prefetch=0), "train", 4, 0, 1, seed=3))
        assert torch.equal(b["input_ids"].cpu(), ref["input_ids"])


def test_empty_val_split_says_how_to_fix(tmp_path):
    path = prepare(tmp_path, counting_docs(SEQ * 10 + 1), val_docs=[])
    with pytest.raises(DataError, match=r"split 'val'\): 0 tokens.*larger val_fraction or set data.valid"):
        build_loader(cfg(path), "val", 1)


def test_global_batch_larger_than_an_epoch_and_negative_seed(tmp_path):
    path = prepare(tmp_path, counting_docs(SEQ * 5 + 1))  # 5 samples, global batch 12
    ids, state = global_ids(cfg(path), 3, 4, 1, seed=-3)
    assert sorted(ids[:5]) == sorted(ids[5:10]) == list(range(5)) and ids[:5] != ids[5:10]
    assert (state["epoch"], state["consumed"]) == (2, 2)
