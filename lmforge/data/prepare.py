"""`lmforge prepare`: documents -> token shards + meta.json, in parallel, deterministically, resumably.

The corpus is cut into work units (`units.py`: byte ranges of JSON-lines files, Parquet row
groups, whole text files, `hf:` datasets read with streaming=True). Each unit is read, tokenized
and written to its own shard files by one worker (`encode.py`: local processes by default, Ray
tasks with engine="ray"), which then records it as done in `prepare.state/`. The driver only plans,
shows progress and finally writes `meta.json` (the one index: every unit's shards in unit order).
Memory per worker is bounded by one encode batch and the shard writer's buffer, whatever the
corpus size. Output bytes depend only on the inputs, the tokenizer and the settings, never on
the number of workers or the engine.

An interrupted prepare (Ctrl-C, SIGKILL, a lost node) leaves no meta.json, so the folder never
looks complete; running the same command again skips the units already recorded as done. A
folder this function did not write is never cleared: a non-empty folder without lmforge's
meta.json or prepare.state/ is refused unless overwrite=True, and even then only lmforge's own
files there (meta.json, *_NNNNN.bin/.idx, prepare.state/) are ever removed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.encode import (
    SPLIT_RULE,
    STATE_DIR,
    doc_is_val,
    is_streamed_txt,
    record_path,
    remove_unit_files,
    run_local,
    unit_phase,
)
from lmforge.data.shards import (
    DEFAULT_SHARD_TOKENS,
    DTYPES,
    META_NAME,
    dtype_for_vocab,
    read_meta,
    write_meta,
)
from lmforge.data.units import UNIT_BYTES, plan_units
from lmforge.errors import DataError, LmforgeError
from lmforge.tokenizer import Tokenizer, load_tokenizer
from lmforge.weights.outdir import check_output_dir

CHUNK_BYTES = UNIT_BYTES
PLAN_NAME = "plan.json"
ENGINES = ("local", "ray")


class Progress:
    """Bytes and tokens done, rate and ETA for the whole corpus: a bar on a terminal, a plain line
    every `every` seconds otherwise (log files get no carriage-return clutter)."""

    def __init__(
        self, total_bytes: int | None, units: int, done_bytes: int, enabled: bool, every: float = 30
    ):
        self.enabled, self.total, self.units, self.every = enabled, total_bytes, units, every
        self.bytes, self.tokens, self.units_done = done_bytes, 0, 0
        self.start = self.last = time.perf_counter()
        self.first_bytes = done_bytes
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                initial=done_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc="prepare",
                smoothing=0.1,
            )

    def _rate(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return self.tokens / dt, (self.bytes - self.first_bytes) / dt

    def line(self) -> str:
        tok_s, byte_s = self._rate()
        eta = ""
        if self.total and byte_s > 0:
            eta = f", ETA {max(self.total - self.bytes, 0) / byte_s:,.0f} s"
        total = f"/{self.total / 1e6:,.1f}" if self.total else ""
        return (
            f"prepare: {self.bytes / 1e6:,.1f}{total} MB, {self.tokens:,} tokens, units "
            f"{self.units_done}/{self.units}, {byte_s / 1e6:.2f} MB/s, {tok_s:,.0f} tok/s{eta}"
        )

    def update(self, nbytes: int, ntokens: int) -> None:
        self.bytes += nbytes
        self.tokens += ntokens
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(
                f"{self._rate()[0]:,.0f} tok/s, {self.units_done}/{self.units} units", refresh=False
            )
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            print(self.line(), file=sys.stderr, flush=True)

    def unit_done(self, record: dict) -> None:
        self.units_done += 1
        self.update(0, 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _resolve_dtype(tok: Tokenizer, dtype: str | None) -> str:
    if dtype is None:
        return dtype_for_vocab(tok.vocab_size)
    if dtype not in DTYPES:
        raise DataError(f"dtype {dtype!r}: not a shard dtype; use one of {sorted(DTYPES)} or leave it unset")
    if tok.vocab_size - 1 > np.iinfo(DTYPES[dtype]).max:
        raise DataError(
            f"{tok.path}: tokenizer {tok.name} has {tok.vocab_size} ids, more than dtype {dtype} holds; "
            f"use dtype {dtype_for_vocab(tok.vocab_size)} (or leave dtype unset)"
        )
    return dtype


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _claim_out_dir(out: Path, plan: dict, overwrite: bool) -> tuple[str, Any]:
    """("reuse", meta) when `out` holds this exact complete prepare, ("resume", done records) for
    an unfinished prepare of the same plan, else ("fresh", None) after removing only the files
    lmforge's own meta.json / plan list. DataError for a complete prepare of something else
    (unless overwrite); a folder of someone else's files was refused by prepare_dataset."""
    state = out / STATE_DIR
    if (out / META_NAME).is_file():
        try:
            meta = read_meta(out)
        except DataError:
            meta = {}
        same = all(meta.get(k) == plan[k] for k in ("tokenizer_fingerprint", "sources", "settings"))
        if same and not overwrite:
            return "reuse", meta
        if not same and not overwrite:
            raise DataError(
                f"{out}: already holds a complete prepare of other inputs, tokenizer or settings; "
                "choose another output folder or pass --overwrite (only lmforge's own files there are replaced)"
            )
        _remove_own(out, meta)
    elif (state / PLAN_NAME).is_file():
        old = _read_json(state / PLAN_NAME) or {}
        if old == plan and not overwrite:
            done = {}
            for unit in plan["units"]:
                rec = _read_json(record_path(out, unit["id"]))
                if rec and rec.get("unit") == unit and _files_there(out, rec):
                    done[unit["id"]] = rec
            return "resume", done
        _remove_own(out, None, old.get("units", []))  # an unfinished prepare of other inputs: ours
    state.mkdir(parents=True, exist_ok=True)
    tmp = state / (PLAN_NAME + ".tmp")
    tmp.write_text(json.dumps(plan), encoding="utf-8")
    tmp.replace(state / PLAN_NAME)
    return "fresh", None


def _remove_own(out: Path, meta: dict | None, units: list | None = None) -> None:
    """Remove exactly what a previous prepare wrote: meta.json first (the folder stops looking
    complete), the shard files its meta.json lists or its plan's units wrote, then prepare.state/."""
    (out / META_NAME).unlink(missing_ok=True)
    (out / (META_NAME + ".tmp")).unlink(missing_ok=True)
    for split in ((meta or {}).get("splits") or {}).values():
        for s in split.get("shards", []) if isinstance(split, dict) else []:
            for key in ("file", "index"):
                name = Path(str(s.get(key, "")))
                if name.name and name.parent == Path("."):
                    (out / name.name).unlink(missing_ok=True)
    for unit in units or []:
        remove_unit_files(out, int(unit["id"]))
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _files_there(out: Path, record: dict) -> bool:
    for split in record["splits"].values():
        for s in split["shards"]:
            if not (out / s["file"]).is_file() or not (out / s["index"]).is_file():
                return False
    return True


def _merge(records: list[dict]) -> dict[str, Any]:
    """Every unit's shards in unit order: the one index meta.json holds."""
    splits = {}
    for name in ("train", "val"):
        shards = [s for r in records for s in r["splits"][name]["shards"]]
        splits[name] = {
            "shards": shards,
            "tokens": sum(s["tokens"] for s in shards),
            "docs": sum(s["docs"] for s in shards),
            "max_id": max((s["max_id"] for s in shards), default=-1),
        }
    return splits


def prepare_dataset(
    inputs,
    tokenizer,
    out_dir,
    workers: int = 1,
    val_fraction: float = 0.01,
    fmt: str = "auto",
    text_field: str = "text",
    strict: bool = False,
    dtype: str | None = None,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    split: str | None = None,
    engine: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into train/val shards in `out_dir` and return a summary dict (see the
    module docstring). `tokenizer` is a `Tokenizer` or a path; `chunk_bytes` is the input size of a
    work unit (the resume granularity); `split="val"` (= val_fraction 1) writes a validation-only
    folder; `engine` "local" (processes) or "ray" (Ray Data, `address` "auto"/HOST:PORT or a local Ray)."""
    from lmforge.data.sources import FORMATS

    start = time.perf_counter()
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if split not in (None, "train", "val"):
        raise DataError(f"split {split!r}: choose train (with val_fraction of it held out) or val")
    if split == "val":
        val_fraction = 1.0
    elif split == "train" and val_fraction == 1:
        raise DataError("split train with val_fraction 1 leaves no training data; use split val")
    if not 0 <= val_fraction <= 1:
        raise DataError(f"val_fraction {val_fraction}: must be in [0, 1] (1 = a validation-only folder)")
    if workers < 1:
        raise DataError(f"workers {workers}: must be >= 1")
    if engine not in ENGINES:
        raise DataError(f"engine {engine!r}: choose local or ray")
    if fmt not in ("auto", *FORMATS):  # checked before anything in out_dir is touched
        raise DataError(f"unknown format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens {shard_tokens}: must be >= 1")
    dtype = _resolve_dtype(tok, dtype)
    out = Path(out_dir).resolve()
    # A file, or a non-empty folder that no prepare wrote (no meta.json or plan), is refused
    # (the folder unless overwrite: then prepare writes beside its files and deletes none of them).
    ours = (out / META_NAME).is_file() or (out / STATE_DIR / PLAN_NAME).is_file()
    try:
        check_output_dir(out, overwrite or ours)
    except LmforgeError as exc:
        raise DataError(str(exc)) from None
    sources, units = plan_units(inputs, fmt, chunk_bytes)
    frac = Fraction(val_fraction).limit_denominator(1_000_000)
    _refuse_all_val(units, frac, val_fraction)
    settings = {
        "fmt": fmt,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "unit_bytes": chunk_bytes,
    }
    plan = {
        "tokenizer_fingerprint": tok.fingerprint,
        "sources": sources,
        "settings": settings,
        "units": units,
    }
    status, found = _claim_out_dir(out, plan, overwrite)
    if status == "reuse":
        if progress:
            print(f"{out}: already prepared with the same inputs and tokenizer; nothing to do")
        return dict(found.get("summary", {}), out_dir=str(out), reused=True)

    job = {
        "out": str(out),
        "tok_path": str(Path(tok.path).resolve()),
        "fingerprint": tok.fingerprint,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "text_field": text_field,
        "strict": strict,
        "p": frac.numerator,
        "q": frac.denominator,
    }
    done = dict(found or {})
    todo = [u for u in units if u["id"] not in done]
    unknown = any(u["kind"] == "hf" for u in units)
    total = None if unknown else sum(u["bytes"] for u in units)
    bar = Progress(total, len(units), sum(r["unit"]["bytes"] for r in done.values()), progress)
    bar.units_done = len(done)
    if progress and done:
        print(
            f"{out}: resuming an interrupted prepare: {len(done)} of {len(units)} units already done",
            file=sys.stderr,
        )
    try:
        if engine == "ray":
            from lmforge.data.ray_engine import run_ray

            records = run_ray(todo, job, workers, address, bar)
        else:
            records = run_local(todo, job, tok, workers, bar)
    finally:
        bar.close()
    for r in records:
        done[r["unit"]["id"]] = r
    ordered = [done[u["id"]] for u in units]
    return _finish(out, tok, inputs, ordered, plan, workers, engine, time.perf_counter() - start, progress)


def _refuse_all_val(units: list[dict], frac: Fraction, val_fraction: float) -> None:
    """A corpus of .txt files only (one document each) whose split rule sends every document to
    val is refused here, before anything is tokenized (other formats are only counted later)."""
    if not 0 < val_fraction < 1 or not units or not all(is_streamed_txt(u) for u in units):
        return
    p, q = frac.numerator, frac.denominator
    if all(doc_is_val(unit_phase(u["id"], q), p, q) for u in units):
        name = units[0]["path"] if len(units) == 1 else f"{len(units)} .txt files"
        raise DataError(
            f"{name}: a .txt file is one document, and with --val-fraction {val_fraction:g} every one would be "
            "validation, leaving nothing to train on; pass --val-fraction 0 (train without validation), "
            "--format paragraphs (a document per paragraph), or prepare a validation file apart with --split val"
        )


def _finish(out, tok, inputs, records, plan, workers, engine, seconds, progress) -> dict[str, Any]:
    settings = plan["settings"]
    splits = _merge(records)
    n_docs = sum(r["documents"] for r in records)
    n_tokens = sum(r["tokens"] for r in records)
    skipped: dict[str, int] = {}
    for r in records:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    if n_docs == 0:
        _remove_own(out, None, plan["units"])
        seen = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(skipped.items())) or "nothing"
        raise DataError(
            f"{inputs}: no documents found (empty corpus; skipped: {seen}); check the input paths, --format and --text-field"
        )
    val_only = settings["val_fraction"] == 1
    if settings["val_fraction"] and not val_only and splits["train"]["docs"] == 0:
        _remove_own(out, None, plan["units"])
        raise DataError(
            f"{inputs}: only {n_docs} document(s), all in the val split; add documents or set val_fraction 0"
        )
    if val_only:
        del splits["train"]
    if settings["val_fraction"] == 0:  # no validation asked for: no empty val split for train to refuse
        del splits["val"]
    text_bytes = sum(r["text_bytes"] for r in records)
    specials = n_docs * ((tok.bos_id is not None) + 1)
    summary = {
        "documents": n_docs,
        "tokens": n_tokens,
        "train_tokens": splits.get("train", {}).get("tokens", 0),
        "val_tokens": splits.get("val", {}).get("tokens", 0),
        "train_docs": splits.get("train", {}).get("docs", 0),
        "val_docs": splits.get("val", {}).get("docs", 0),
        "text_bytes": text_bytes,
        "bytes_per_token": round(text_bytes / max(n_tokens - specials, 1), 4),
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": [e for r in records for e in r["examples"]][:5],
        "units": len(records),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
        "workers": workers,
        "engine": engine,
        "dtype": settings["dtype"],
        "splits": {k: {"docs": v["docs"], "tokens": v["tokens"]} for k, v in splits.items()},
    }
    meta = {
        "dtype": settings["dtype"],
        "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint,
        "tokenizer": {"kind": tok.kind, "name": tok.name, "path": str(Path(tok.path).resolve())},
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "splits": splits,
        "split_rule": SPLIT_RULE,
        "sources": plan["sources"],
        "settings": settings,
        "summary": {
            k: v for k, v in summary.items() if k not in ("seconds", "tokens_per_s", "workers", "engine")
        },
    }
    write_meta(out, meta)  # last: from here on the folder is a complete prepare
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    summary["out_dir"] = str(out)
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    skipped = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in s["skipped"].items()) or "none"
    mb_per_s = s["text_bytes"] / 1e6 / max(s["seconds"], 1e-9)
    engine = f", {s['engine']} engine" if s.get("engine", "local") != "local" else ""
    return (
        f"prepared {s['documents']:,} documents -> {s['tokens']:,} tokens "
        f"(train {s['train_docs']:,} docs / {s['train_tokens']:,} tok, val {s['val_docs']:,} docs / "
        f"{s['val_tokens']:,} tok), {s['text_bytes'] / 1e6:.1f} MB text, {s['bytes_per_token']:.2f} bytes/token, "
        f"{s['dtype']}, skipped: {skipped}, {s['seconds']:.1f} s ({mb_per_s:.2f} MB/s, {s['tokens_per_s']:,.0f} tok/s, "
        f"{s['workers']} worker{'s' if s['workers'] > 1 else ''}{engine})"
        + "".join(f"\n  e.g. {example}" for example in s.get("skip_examples", []))
    )
