"""Shared helpers for the trainer tests: a tiny learnable token dataset and a tiny run config.

(No tests here; pytest collects nothing from this module.)
"""

from __future__ import annotations

import numpy as np

from lmforge.config import config_from_dict
from lmforge.data.shards import ShardWriter, write_meta

BOS, EOS, PAD = 1, 2, 0


def make_dataset(
    folder, vocab_size=512, docs=120, seed=0, min_len=20, max_len=60, fingerprint="test", val=True
):
    """Documents are arithmetic progressions mod (vocab-3), shifted past the special ids: easy to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", docs), ("val", max(8, docs // 8)))[: 2 if val else 1]:
        with ShardWriter(folder, split, "uint16") as w:
            for _ in range(n):
                start, step = int(rng.integers(0, 50)), int(rng.integers(1, 4))
                length = int(rng.integers(min_len, max_len))
                body = (start + step * np.arange(length)) % (vocab_size - 3) + 3
                w.add_document(np.concatenate([[BOS], body, [EOS]]).astype(np.int64))
            splits[split] = w.close()
    write_meta(
        folder,
        {
            "dtype": "uint16",
            "vocab_size": vocab_size,
            "tokenizer_fingerprint": fingerprint,
            "bos_id": BOS,
            "eos_id": EOS,
            "pad_id": PAD,
            "splits": splits,
        },
    )
    return folder


def tiny_config(tmp_path, data, **overrides):
    """A CPU run of the `tiny` preset; dotted overrides as keyword args with '__' for '.'."""
    tree = {
        "run": {"name": "t", "out_dir": str(tmp_path / "runs"), "seed": 7},
        "model": {"preset": "tiny", "dropout": 0.1},
        "data": {"train": [str(data)], "seq_len": 32, "prefetch": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "global_batch_size": 4,
            "grad_accum_steps": 2,
            "max_steps": 6,
            "eval_interval": 3,
            "eval_batches": 2,
            "device": "cpu",
            "deterministic": True,
            "sample_max_new_tokens": 0,
        },
        "checkpoint": {"interval": 3, "keep": 2},
        "log": {"interval": 1, "progress": False, "tensorboard": False, "plots": False},
    }
    for key, value in overrides.items():
        node = tree
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(tree, "test")
