"""Loader batches/s from a MindRecord (lmforge's own reader) against the same rows as lmforge shards.

    # 1. write the MindRecord with MindSpore's FileWriter (a venv with mindspore==2.9.0):
    python bench/mindrecord_loader.py write --out /tmp/mr --rows 2000
    # 2. measure (lmforge's venv; no MindSpore): the MindRecord decoded as it is read, the same
    #    MindRecord through the decoded cache training uses by default, and the same rows converted
    #    by `prepare --input x.mindrecord` and read as shards; interleaved rounds, medians
    python bench/mindrecord_loader.py measure --data /tmp/mr --batches 300 --rounds 5

Rows are Llama-2-shaped: seq_length 4096 + 1 ids in [0, 32000) with a newline id (13) every ~50
tokens, so most rows mix 1- and 2-byte widths as real text does; FileWriter's default header (16
MiB) and page (32 MiB) sizes, as llama_preprocess.py leaves them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 4096


def write(out: Path, rows: int) -> None:
    from mindspore.mindrecord import FileWriter

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = FileWriter(str(out / "wiki4096.mindrecord"), shard_num=1, overwrite=True)
    w.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "wiki")
    for start in range(0, rows, 100):
        batch = []
        for _ in range(min(100, rows - start)):
            ids = rng.integers(0, 32000, SEQ + 1).astype(np.int32)
            ids[rng.random(SEQ + 1) < 0.02] = 13
            batch.append({"input_ids": ids})
        w.write_raw_data(batch)
    w.commit()


def measure(data: Path, batches: int, micro: int, rounds: int) -> None:
    from lmforge.config import DataConfig
    from lmforge.data.loader import build_loader
    from lmforge.data.mindrecord_prepare import prepare_mindrecord
    from lmforge.tokenizer.base import Tokenizer

    class LlamaIds(Tokenizer):  # prepare only needs the id roles and bounds: Llama-2's
        kind, name, vocab_size, bos_id, eos_id, pad_id, fingerprint = "ids", "llama2-ids", 32000, 1, 2, None, "bench"

    mr = data / "wiki4096.mindrecord"
    with tempfile.TemporaryDirectory() as tmp:
        tok = LlamaIds()
        tok.path = Path(tmp)
        t0 = time.perf_counter()
        prepare_mindrecord([mr], tok, Path(tmp) / "shards", val_fraction=0, progress=False)
        print(f"prepare --input {mr.name}: {time.perf_counter() - t0:.2f} s")
        cache = Path(tmp) / "run" / "mindrecord_cache"
        t0 = time.perf_counter()
        build_loader(DataConfig(train=str(mr), mode="padded", seq_len=SEQ), "train", micro, cache_dir=cache).close()
        print(f"first open with the cache (decodes every row into {cache.name}/): {time.perf_counter() - t0:.2f} s")
        cases = [
            ("MindRecord, decoded as read (data.mindrecord_cache: false)", mr, None, "padded"),
            ("MindRecord, decoded once into the run's cache (default)", mr, cache, "padded"),
            ("lmforge shards, padded (one row per sample)", Path(tmp) / "shards", None, "padded"),
            ("lmforge shards, packed", Path(tmp) / "shards", None, "packed"),
        ]
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):  # interleaved rounds: the shared machine's load moves between them
            for name, path, cache_dir, mode in cases:
                for prefetch in (0, 2):
                    cfg = DataConfig(train=str(path), mode=mode, seq_len=SEQ, prefetch=prefetch)
                    with build_loader(cfg, "train", micro, seed=0, cache_dir=cache_dir) as loader:
                        for _ in range(10):
                            next(loader)
                        start = time.perf_counter()
                        for _ in range(batches):
                            next(loader)
                        rates.setdefault((name, prefetch), []).append(batches / (time.perf_counter() - start))
        print(f"| source | prefetch | batches/s ({micro} x {SEQ}), median of {rounds} | tokens/s |\n|---|---|---|---|")
        for (name, prefetch), got in rates.items():
            rate = float(np.median(got))
            print(f"| {name} | {prefetch} | {rate:,.0f} | {rate * micro * SEQ / 1e6:,.1f}M |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--rows", type=int, default=2000)
    m = sub.add_parser("measure")
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--batches", type=int, default=300)
    m.add_argument("--micro", type=int, default=8)
    m.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "write":
        write(args.out, args.rows)
    else:
        measure(args.data, args.batches, args.micro, args.rounds)


if __name__ == "__main__":
    main()
