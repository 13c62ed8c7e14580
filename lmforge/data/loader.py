"""Deterministic, resumable, rank-aware batches from prepared token shards.

The global sample stream is independent of the number of data-parallel ranks. Each dataset has
`samples` samples per epoch (packed: windows of seq_len+1 tokens taken every seq_len tokens, so
consecutive windows share one boundary token and every token after the first is a target exactly
once; padded: one document per sample). Dataset d's k-th sample overall is sample
perm(seed, d, k // samples)[k % samples]: epochs follow each other without a gap, so a global batch
that crosses an epoch end is filled from the next epoch's permutation and nothing is dropped.
With several datasets, global position p draws from the dataset that is furthest behind its
weight share (argmax of w_d * (p + 1) - taken_d), a smooth deterministic interleave.

Each micro step takes the next micro_batch_size * dp_size global samples; rank r keeps the slice
[r * B, (r + 1) * B). The state (taken per dataset) therefore resumes at the exact next sample
under any dp_size whose global batch is B' * dp_size'.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.mindrecord import MindRecord, MindRecordRows, is_mindrecord
from lmforge.data.mindrecord_cache import open_cache
from lmforge.data.token_dataset import TokenDataset
from lmforge.errors import DataError
from lmforge.loss import IGNORE_INDEX

STATE_VERSION = 1
PAD_MULTIPLE = 8  # padded batches are trimmed to a multiple of this (bounds torch.compile's shapes)


class _Source:
    """One prepared split seen as fixed-size samples of seq_len + 1 tokens (+ real length); a
    MindRecord set gives one sample per row in either mode (MindFormers' samples, see mindrecord.py)."""

    def __init__(self, ds: TokenDataset | MindRecordRows, mode: str, seq_len: int, weight: float):
        self.ds, self.mode, self.seq_len, self.weight = ds, mode, seq_len, weight
        self.path = str(ds.folder)
        where = f"{ds.folder} (split '{ds.split}')"
        self.rows = getattr(ds, "rows_are_samples", False)
        if self.rows:
            self.samples, self.pad_id = ds.num_docs, 0  # padding positions carry no loss
            if self.samples == 0:
                raise DataError(f"{ds.folder}: the MindRecord set has no rows; check the path")
        elif mode == "packed":
            self.samples = max(ds.num_tokens - 1, 0) // seq_len
            if self.samples == 0:
                fix = "prepare with a larger val_fraction or set data.valid" if ds.split == "val" else ""
                raise DataError(
                    f"{where}: {ds.num_tokens} tokens, fewer than one window of data.seq_len + 1 = "
                    f"{seq_len + 1}; lower data.seq_len or {fix or 'prepare more text'}"
                )
        else:
            self.samples = ds.num_docs
            longest = ds.max_doc_length()
            if longest < seq_len:
                raise DataError(
                    f"{where}: data.seq_len {seq_len} is longer than every document (longest {longest} "
                    "tokens), so padded mode would train mostly on padding; lower data.seq_len or use mode packed"
                )
            pad = ds.pad_id if ds.pad_id is not None else ds.eos_id
            self.pad_id = int(pad) if pad is not None else 0
        self._perms: dict[int, np.ndarray] = {}

    def samples_of(self, ids: list[int]) -> list[tuple[np.ndarray, int]]:
        """(tokens, real length) of samples `ids`; a MindRecord batch's rows are decoded in one call."""
        if not self.rows:
            return [self.sample(i) for i in ids]
        n = self.seq_len + 1
        rows = self.ds.docs(ids)
        for i, row in zip(ids, rows):
            if len(row) > n:
                raise DataError(
                    f"{self.path}: row {i} holds {len(row)} tokens, more than data.seq_len + 1 = {n}; "
                    f"set data.seq_len to {len(row) - 1} (MindFormers' seq_length)"
                )
        return [(row, len(row)) for row in rows]

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        n = self.seq_len + 1
        if self.rows:
            return self.samples_of([i])[0]
        if self.mode == "packed":
            start = i * self.seq_len
            return self.ds.tokens(start, start + n), n
        doc = self.ds.doc(i)
        if len(doc) > n:  # as MiniMind's PretrainDataset: bos + the first n-2 tokens + eos
            doc = np.concatenate((doc[: n - 1], doc[-1:]))
        return doc, len(doc)

    def doc_layout(self, i: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc_ids, position_ids) [width] of packed sample i's inputs: the document index within
        the window (from the shard indexes; nondecreasing from 0) and the position within it."""
        steps = np.arange(width, dtype=np.int64)
        if self.rows:  # a row is one sequence: plain causal attention and positions
            return np.zeros(width, dtype=np.int64), steps
        start = i * self.seq_len
        inside = self.ds.doc_starts(start, start + width) - start
        doc_ids = np.searchsorted(inside, steps, side="right")
        return doc_ids, steps - np.concatenate(([0], inside))[doc_ids]

    def order(self, epoch: int, seed: int, index: int, shuffle: bool) -> np.ndarray | None:
        if not shuffle:
            return None
        if epoch not in self._perms:
            if len(self._perms) > 2:  # keep the current and neighbouring epochs only
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([seed % 2**64, index, epoch]).permutation(self.samples)
        return self._perms[epoch]

    def indices(self, taken: int, count: int, seed: int, index: int, shuffle: bool) -> np.ndarray:
        """Sample ids for this dataset's stream positions [taken, taken + count), across epochs."""
        out, pos = [], taken
        while pos < taken + count:
            epoch, offset = divmod(pos, self.samples)
            stop = min(self.samples, offset + taken + count - pos)
            perm = self.order(epoch, seed, index, shuffle)
            out.append(np.arange(offset, stop) if perm is None else perm[offset:stop])
            pos += stop - offset
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def _prefetch(maker: _BatchMaker, device: torch.device, *args) -> None:
    # A new thread's current CUDA device is cuda:0, and pinning creates a context on it: without
    # this every rank of a node would put a context on GPU 0 (as torch's own pinning thread avoids).
    if maker.pin and device.index is not None:
        torch.cuda.set_device(device)
    maker.produce(*args)


class _BatchMaker:
    """Builds rank-local batches from global positions; shared with the prefetch thread (which
    must not hold the DataLoader itself, so that a dropped loader is collected and closed)."""

    def __init__(
        self, sources: list[_Source], micro_batch_size: int, dp_rank: int, dp_size: int, pin: bool, layout=(False, False)
    ):
        self.sources, self.pin = sources, pin
        self.document_mask, self.reset_positions = layout
        self.micro_batch_size, self.dp_rank = micro_batch_size, dp_rank
        self.global_batch_size = micro_batch_size * dp_size
        self.seq_len = sources[0].seq_len
        total = sum(s.weight for s in sources)
        self.weights = np.array([s.weight / total for s in sources], dtype=np.float64)
        self.seed, self.shuffle = 0, True

    def choose(self, taken: list[int], count: int) -> np.ndarray:
        """Dataset of each of the next `count` global samples (advances `taken` in place)."""
        if len(self.sources) == 1:
            taken[0] += count
            return np.zeros(count, dtype=np.int64)
        picks = np.empty(count, dtype=np.int64)
        counts = np.array(taken, dtype=np.float64)
        p = int(counts.sum())
        for j in range(count):
            d = int(np.argmax(self.weights * (p + j + 1) - counts))
            picks[j] = d
            counts[d] += 1
            taken[d] += 1
        return picks

    def global_rows(self, taken: list[int]) -> list[tuple[int, int]]:
        """(dataset, sample id) of the next global batch; advances `taken` in place."""
        before = list(taken)
        picks = self.choose(taken, self.global_batch_size)
        rows: list[tuple[int, int]] = [(0, 0)] * self.global_batch_size
        for d, src in enumerate(self.sources):
            where = np.flatnonzero(picks == d)
            if len(where):
                ids = src.indices(before[d], len(where), self.seed, d, self.shuffle)
                for w, i in zip(where.tolist(), ids.tolist()):
                    rows[w] = (d, i)
        return rows

    def make(self, taken: list[int]) -> dict[str, torch.Tensor]:
        rows = self.global_rows(taken)
        lo = self.dp_rank * self.micro_batch_size
        mine = rows[lo : lo + self.micro_batch_size]
        samples: list[tuple[np.ndarray, int]] = [None] * len(mine)  # type: ignore[list-item]
        for d, src in enumerate(self.sources):  # per source, so a MindRecord batch decodes at once
            at = [b for b, (e, _) in enumerate(mine) if e == d]
            for b, got in zip(at, src.samples_of([mine[b][1] for b in at])):
                samples[b] = got
        width = self.seq_len
        if self.sources[0].mode == "padded":  # trim to the longest sample (multiple of 8: few shapes)
            longest = max(length for _, length in samples) - 1
            width = min(self.seq_len, max(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE))
        data = np.empty((len(mine), width + 1), dtype=np.int64)
        no_loss = np.zeros((len(mine), width), dtype=bool)
        for b, ((d, _), (tokens, length)) in enumerate(zip(mine, samples)):
            data[b, :length] = tokens
            if length < width + 1:  # padded mode: targets from position length-1 on are padding
                data[b, length:] = self.sources[d].pad_id
                no_loss[b, max(length - 1, 0) :] = True
        x = torch.from_numpy(data)
        labels = x[:, 1:].clone()
        labels[torch.from_numpy(no_loss)] = IGNORE_INDEX
        batch = {"input_ids": x[:, :-1].contiguous(), "labels": labels}
        if self.document_mask or self.reset_positions:
            layouts = [self.sources[d].doc_layout(i, width) for d, i in mine]
            if self.document_mask:
                batch["doc_ids"] = torch.from_numpy(np.stack([a for a, _ in layouts]))
            if self.reset_positions:
                batch["position_ids"] = torch.from_numpy(np.stack([p for _, p in layouts]))
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def produce(self, taken: list[int], out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (self.make(taken), list(taken))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = (exc, None)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[1] is None:
                return


class DataLoader:
    """Iterator of {"input_ids", "labels"} LongTensors [B, seq_len] for one data-parallel rank.

    Train loaders are endless. Val loaders (`max_batches` set) stop after one pass (the last
    batch is completed from the start of the split) and `reset()` starts over.
    """

    def __init__(
        self,
        sources: list[_Source],
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        device: torch.device,
        shuffle: bool,
        prefetch: int,
        pin_memory: bool,
        max_batches: int | None = None,
        document_mask: bool = False,
        reset_positions: bool = False,
    ):
        if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
            raise ValueError(f"bad rank layout: rank {dp_rank} of {dp_size}, micro batch {micro_batch_size}")
        self.sources, self.device, self.prefetch, self.max_batches = sources, device, prefetch, max_batches
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.global_batch_size = micro_batch_size * dp_size
        self.seq_len, self.mode = sources[0].seq_len, sources[0].mode
        self.pin = pin_memory and device.type == "cuda" and torch.cuda.is_available()
        # A padded sample is one document: its layout would be all zeros / 0..T-1, the plain causal
        # attention and positions the model uses anyway, so padded batches carry none.
        packed = self.mode == "packed"
        layout = (document_mask and packed, reset_positions and packed)
        self._maker = _BatchMaker(sources, micro_batch_size, dp_rank, dp_size, self.pin, layout)
        self._maker.seed, self._maker.shuffle = int(seed), shuffle
        self.samples_per_epoch = sum(s.samples for s in sources)
        self._taken = [0] * len(sources)  # state after the last batch handed out
        self._yielded = 0
        self._thread: threading.Thread | None = None

    @property
    def seed(self) -> int:
        return self._maker.seed

    @property
    def shuffle(self) -> bool:
        return self._maker.shuffle

    # -- iteration with optional background prefetch ------------------------------------------
    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        args = (list(self._taken), self._queue, self._stop)
        self._thread = threading.Thread(
            target=_prefetch, args=(self._maker, self.device, *args), daemon=True, name="lmforge-prefetch"
        )
        self._thread.start()

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.max_batches is not None and self._yielded >= self.max_batches:
            self.close()  # no idle read-ahead thread between evaluations
            raise StopIteration
        if self.prefetch > 0:
            if self._thread is None:
                self._start()
            batch, taken = self._queue.get()
            if taken is None:
                self.close()
                raise batch
        else:
            taken = list(self._taken)
            batch = self._maker.make(taken)
        self._taken = taken
        self._yielded += 1
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=self.pin) for k, v in batch.items()}
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (if any) and drop batches it read ahead."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def reset(self) -> None:
        """Start again from the first sample of epoch 0 (used before each evaluation)."""
        self.close()
        self._taken = [0] * len(self.sources)
        self._yielded = 0

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- state -------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return sum(self._taken)

    @property
    def epoch(self) -> int:
        return self.position // self.samples_per_epoch

    @property
    def num_batches(self) -> int:
        """Batches in one pass over an epoch (the last one completed from the next epoch)."""
        return -(-self.samples_per_epoch // self.global_batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Exactly the batches handed out so far (not what the prefetcher has read ahead)."""
        datasets = []
        for src, taken in zip(self.sources, self._taken):
            epoch, consumed = divmod(taken, src.samples)
            datasets.append(
                {
                    "path": src.path,
                    "samples": src.samples,
                    "weight": src.weight,
                    "taken": taken,
                    "epoch": epoch,
                    "consumed": consumed,
                }
            )
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.position % self.samples_per_epoch,
            "position": self.position,
            "seed": self.seed,
            "mode": self.mode,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "datasets": datasets,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue right after the last sample of `state` (any dp_size); DataError if the data changed."""
        saved = state.get("datasets")
        if not isinstance(saved, list) or len(saved) != len(self.sources):
            have = len(saved) if isinstance(saved, list) else "no"
            raise DataError(
                f"loader state: saved for {have} datasets but data.train now lists {len(self.sources)}; "
                "resume with the same data.train or start a fresh run"
            )
        for src, s in zip(self.sources, saved):
            if (
                s.get("samples") != src.samples
                or state.get("mode") != self.mode
                or state.get("seq_len") != self.seq_len
            ):
                raise DataError(
                    f"{src.path}: loader state holds {s.get('samples')} {state.get('mode')} samples of "
                    f"seq_len {state.get('seq_len')}, the data now gives {src.samples} of {self.mode}/{self.seq_len}; "
                    "resume with the same data and data.seq_len/mode or start a fresh run"
                )
        self.close()
        self._maker.seed = int(state["seed"])
        self._maker.shuffle = bool(state.get("shuffle", self.shuffle))
        self._taken = [int(s["taken"]) for s in saved]
        self._yielded = 0


def build_loader(
    data_cfg,
    split: str,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    tokenizer_fingerprint: str | None = None,
    vocab_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> DataLoader:
    """Loader for `split` ("train": data_cfg.train mixed by weight, shuffled, endless; "val": the
    val splits of data_cfg.valid (one or more folders) or of the first train dataset, in order, one
    pass per reset()). MindRecord sets are decoded once into `cache_dir` when given (the trainer
    gives the run folder's, unless data.mindrecord_cache is false), else as their rows are read."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if split == "train":
        if not data_cfg.train:
            raise DataError(
                "data.train: no prepared dataset given; set it to a folder written by lmforge prepare"
            )
        specs = [(spec.path, spec.weight) for spec in data_cfg.train]
    elif split == "val":
        if data_cfg.valid is None and not data_cfg.train:
            raise DataError("data.valid: no prepared dataset given; set data.valid or data.train")
        paths = data_cfg.valid if data_cfg.valid is not None else [data_cfg.train[0].path]
        specs = [(path, 1.0) for path in paths]
    else:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    sources = []
    for path, weight in specs:
        if is_mindrecord(path):  # read as it is, every row (MindRecord sets have no val split)
            if split == "val" and data_cfg.valid is None:
                raise DataError(f"{path}: a MindRecord set has no val split; set data.valid (a MindRecord or a prepared folder)")
            records, field = MindRecord.open(path), getattr(data_cfg, "token_field", "input_ids")
            ds = MindRecordRows(records, field, split, vocab_size)  # checks the field before any cache
            if cache_dir is not None:
                ds = MindRecordRows(records, field, split, vocab_size, open_cache(records, field, Path(cache_dir)))
        else:
            ds = TokenDataset.open(
                Path(path), split, expect_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size
            )
        sources.append(_Source(ds, data_cfg.mode, data_cfg.seq_len, weight))
    train = split == "train"
    if not train:  # several val folders: weights = sample counts, so one pass is each sample once
        for src in sources:
            src.weight = float(src.samples)
    loader = DataLoader(
        sources,
        micro_batch_size,
        dp_rank,
        dp_size,
        seed,
        device,
        shuffle=data_cfg.shuffle and train,
        prefetch=data_cfg.prefetch,
        pin_memory=data_cfg.pin_memory,
        document_mask=data_cfg.document_mask,
        reset_positions=data_cfg.reset_positions,
    )
    if not train:
        loader.max_batches = loader.num_batches
    return loader
