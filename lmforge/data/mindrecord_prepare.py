"""`lmforge prepare --input x.mindrecord`: a MindRecord set's rows -> lmforge token shards, one
document per row (rows already hold their BOS/EOS: nothing is added, nothing is tokenized).

The output folder is the one `prepare_dataset` writes (meta.json, train/val shards, the same
split rule over rows, the same refusal of folders it did not write and the same reuse of a
complete identical prepare); the tokenizer given is recorded as the one the ids belong to (so
training checks it) and bounds them: an id past its vocabulary is an error.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.encode import record_path
from lmforge.data.mindrecord import MindRecord, MindRecordRows
from lmforge.data.prepare import _claim_out_dir, _finish, _resolve_dtype
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, META_NAME, ShardWriter, file_sha256
from lmforge.errors import DataError, LmforgeError
from lmforge.tokenizer import Tokenizer, load_tokenizer
from lmforge.weights.outdir import check_output_dir


def prepare_mindrecord(
    inputs,
    tokenizer,
    out_dir,
    val_fraction: float = 0.01,
    field: str = "input_ids",
    dtype: str | None = None,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the rows of the MindRecord files/folders `inputs` (in order) into `out_dir` as shards;
    returns prepare's summary dict. Row j of the whole input is val when the split rule says so."""
    start = time.perf_counter()
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction}: must be in [0, 1) for MindRecord input")
    dtype = _resolve_dtype(tok, dtype)
    out = Path(out_dir).resolve()
    try:
        check_output_dir(out, overwrite or (out / META_NAME).is_file() or record_path(out, 0).parent.is_dir())
    except LmforgeError as exc:
        raise DataError(str(exc)) from None
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    sets = [MindRecordRows(MindRecord.open(p), field, "train", tok.vocab_size) for p in inputs]
    files = [f.path.resolve() for s in sets for f in s.records.files]
    sources = [{"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files]
    size = sum(s["bytes"] for s in sources)
    unit = {"id": 0, "source": 0, "path": str(files[0]), "fmt": "mindrecord", "kind": "mindrecord",
            "start": 0, "stop": size, "line": 1, "bytes": size}  # fmt: skip
    settings = {"fmt": "mindrecord", "text_field": field, "val_fraction": val_fraction, "dtype": dtype,
                "shard_tokens": shard_tokens, "unit_bytes": size}  # fmt: skip
    plan = {"tokenizer_fingerprint": tok.fingerprint, "sources": sources, "settings": settings, "units": [unit]}
    status, found = _claim_out_dir(out, plan, overwrite)
    if status == "reuse":
        if progress:
            print(f"{out}: already prepared with the same inputs and tokenizer; nothing to do")
        return dict(found.get("summary", {}), out_dir=str(out), reused=True)
    record = _write(out, sets, unit, dtype, shard_tokens, val_fraction)
    summary = _finish(out, tok, inputs, [record], plan, 1, "local", time.perf_counter() - start, False)
    if progress:
        print(
            f"prepared {summary['documents']:,} MindRecord rows of {len(files)} file(s) -> {summary['tokens']:,} tokens "
            f"(train {summary['train_docs']:,} rows / {summary['train_tokens']:,} tok, val {summary['val_docs']:,} rows / "
            f"{summary['val_tokens']:,} tok), {dtype}, {summary['seconds']:.1f} s"
        )
    return summary


def _write(out: Path, sets: list[MindRecordRows], unit: dict, dtype: str, shard_tokens: int, f: float) -> dict:
    frac = Fraction(f).limit_denominator(1_000_000)  # prepare's rule (encode.SPLIT_RULE), unit 0
    p, q = frac.numerator, frac.denominator
    j = tokens = 0
    with (
        ShardWriter(out, "train", dtype, shard_tokens, prefix="train-u00000") as train_w,
        ShardWriter(out, "val", dtype, shard_tokens, prefix="val-u00000") as val_w,
    ):
        for rows in sets:
            for ids in rows.records.row_chunks():
                docs = rows.docs(ids)  # one decode per ~16 MiB of records
                lengths = np.array([len(d) for d in docs], dtype=np.int64)
                flat = np.concatenate(docs).astype(train_w.dtype) if docs else np.empty(0, train_w.dtype)
                k = np.arange(j, j + len(docs), dtype=np.int64)
                val = -(-(k + 1) * p // q) > -(-k * p // q)
                mask = np.repeat(val, lengths)
                if val.any():
                    val_w.add_documents(flat[mask], lengths[val])
                train_w.add_documents(flat[~mask], lengths[~val])
                j, tokens = j + len(docs), tokens + int(lengths.sum())
        splits = {"train": train_w.close(), "val": val_w.close()}
    return {"unit": unit, "splits": splits, "documents": j, "tokens": tokens, "text_bytes": 0,
            "skipped": {}, "examples": []}  # fmt: skip
