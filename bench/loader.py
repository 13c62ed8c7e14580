"""Loader throughput on CPU: batches/s for seq_len 512, micro batch 32 over a ~10M-token
synthetic prepared dataset (random ids, documents of 50..2000 tokens), packed and padded,
with and without the prefetch thread.

    python bench/loader.py [--tokens 10000000] [--batches 500] [--shards 50 5000 50000]

`--shards` also measures opening a prepared folder of N one-document shards (written directly,
as `lmforge prepare` of many small units would leave them): seconds and RSS growth of
`TokenDataset.open`, then of the first packed batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.loader import build_loader
from lmforge.data.shards import ShardWriter, write_meta


def make_dataset(folder: str, tokens: int, vocab: int = 6400) -> None:
    rng = np.random.default_rng(0)
    Path(folder).mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", tokens), ("val", tokens // 100)):
        with ShardWriter(folder, split, "uint16", shard_tokens=4_000_000) as w:
            done = 0
            while done < n:
                doc = rng.integers(1, vocab, int(min(rng.integers(50, 2000), n - done)), dtype=np.uint16)
                w.add_document(doc)
                done += len(doc)
        splits[split] = w.close()
    write_meta(folder, {"dtype": "uint16", "vocab_size": vocab, "eos_id": 0, "pad_id": 0, "splits": splits})


def write_tiny_shards(folder: Path, n: int, doc_len: int = 64) -> None:
    import hashlib

    shards = []
    for k in range(n):
        data = (np.arange(doc_len, dtype="<u2") + k) % 6400
        index = np.array([0, doc_len], dtype="<i8").tobytes()
        (folder / f"train_{k:06d}.bin").write_bytes(data.tobytes())
        (folder / f"train_{k:06d}.idx").write_bytes(index)
        shards.append({"file": f"train_{k:06d}.bin", "index": f"train_{k:06d}.idx", "tokens": doc_len, "docs": 1,
                       "max_id": int(data.max()), "max_doc": doc_len, "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
                       "index_sha256": hashlib.sha256(index).hexdigest()})  # fmt: skip
    split = {"shards": shards, "tokens": doc_len * n, "docs": n, "max_id": 6399}
    write_meta(folder, {"dtype": "uint16", "vocab_size": 6400, "eos_id": 0, "splits": {"train": split}})


def open_many(n: int) -> str:
    import psutil

    from lmforge.data.token_dataset import TokenDataset

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_shards(Path(tmp), n)
        rss0, t0 = proc.memory_info().rss, time.perf_counter()
        ds = TokenDataset.open(tmp, "train")
        opened, rss1 = time.perf_counter() - t0, proc.memory_info().rss
        cfg = DataConfig(train=tmp, seq_len=512, prefetch=0)
        t1 = time.perf_counter()
        with build_loader(cfg, "train", 8, 0, 1, seed=0) as loader:
            next(loader)
        first = time.perf_counter() - t1
        return (f"| {n:,} | {opened:.3f} | {(rss1 - rss0) / 2**20:.1f} MiB | {first:.3f} | "
                f"{len(ds._open)} |")


def measure(folder: str, mode: str, prefetch: int, batches: int, seq_len: int, micro: int) -> float:
    cfg = DataConfig(train=folder, mode=mode, seq_len=seq_len, prefetch=prefetch)
    with build_loader(cfg, "train", micro, 0, 1, seed=0) as loader:
        for _ in range(10):  # warm-up: permutation, page cache, thread start
            next(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        return batches / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--shards", type=int, nargs="*", default=[], help="also time opening N tiny shards")
    args = ap.parse_args()
    if args.shards:
        print("| shards | open s | RSS growth at open | first batch s (8 x 512, shuffled) | shards mapped after open |")
        print("|---|---|---|---|---|")
        for n in args.shards:
            print(open_many(n), flush=True)
        if args.batches == 0:
            return
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        make_dataset(folder, args.tokens)
        print(f"wrote {args.tokens:,} tokens in {time.perf_counter() - t0:.1f}s")
        print("| mode | prefetch | batches/s | tokens/s |\n|---|---|---|---|")
        for mode in ("packed", "padded"):
            for prefetch in (0, 2):
                rate = measure(folder, mode, prefetch, args.batches, args.seq_len, args.micro)
                print(f"| {mode} | {prefetch} | {rate:,.0f} | {rate * args.micro * args.seq_len:,.0f} |")


if __name__ == "__main__":
    main()
