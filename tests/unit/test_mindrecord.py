"""lmforge's own MindRecord reader against files MindSpore's FileWriter wrote and the rows its FileReader
read back (tests/fixtures/mindrecord/, made by make_fixtures.py there; no MindSpore needed here)."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from paths import REPO

from lmforge.config import DataConfig
from lmforge.data.loader import build_loader
from lmforge.data.mindrecord import MindRecord, MindRecordRows, is_mindrecord
from lmforge.data.mindrecord_ints import decompress_ints
from lmforge.data.token_dataset import TokenDataset
from lmforge.errors import DataError
from lmforge.loss import IGNORE_INDEX

FIX = REPO / "tests" / "fixtures" / "mindrecord"
TOKENIZER = REPO / "tests" / "fixtures" / "wikitext" / "tokenizer.model"
EXPECTED = np.load(FIX / "expected_rows.npz")
FIXTURES = {"tokens": "tokens.mindrecord", "set": "set.mindrecord0", "mixed": "mixed.mindrecord", "wiki64": "wiki64.mindrecord"}  # fmt: skip


def expected_rows(fixture: str) -> list[dict]:
    """FileReader's rows, rebuilt from expected_rows.npz."""
    fields = {k.split("/")[1] for k in EXPECTED.files if k.startswith(fixture + "/")}
    rows: list[dict] = []
    for field in sorted(fields):
        key = f"{fixture}/{field}"
        values = EXPECTED[key]
        if key + "/len" in EXPECTED.files:
            cuts = np.cumsum(EXPECTED[key + "/len"])[:-1]
            parts = np.split(values, cuts)
            shapes = EXPECTED.get(key + "/shape")
            if values.dtype == np.uint8:
                parts = [p.tobytes() for p in parts]
            elif shapes is not None and shapes.size:
                parts = [p.reshape(s) for p, s in zip(parts, shapes)]
        else:
            parts = values.tolist()
        rows = rows or [{} for _ in parts]
        for row, value in zip(rows, parts):
            row[field] = value
    return rows


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return type(a) is type(b) and a == b or (isinstance(a, float) and a == b)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_rows_equal_mindspore_filereader(fixture):
    mr = MindRecord.open(FIX / FIXTURES[fixture])
    want = expected_rows(fixture)
    assert mr.num_rows == len(want) > 0
    for i, expected in enumerate(want):
        got = mr.row(i)
        assert set(got) == set(expected)
        for field, value in expected.items():
            assert same(value, got[field]), (fixture, i, field, value, got[field])


def test_a_set_reads_whole_from_any_member_or_its_folder(tmp_path):
    want = [r["input_ids"] for r in expected_rows("set")]
    for member in ("set.mindrecord0", "set.mindrecord2"):
        mr = MindRecord.open(FIX / member)
        assert [f.path.name for f in mr.files] == ["set.mindrecord0", "set.mindrecord1", "set.mindrecord2"]
        assert all(np.array_equal(mr.field(i, "input_ids"), w) for i, w in enumerate(want))
    for name in ("set.mindrecord0", "set.mindrecord1", "set.mindrecord2"):
        for suffix in ("", ".db"):
            shutil.copy(FIX / (name + suffix), tmp_path / (name + suffix))
    assert is_mindrecord(tmp_path) and MindRecord.open(tmp_path).num_rows == len(want)
    (tmp_path / "set.mindrecord1").unlink()
    with pytest.raises(DataError, match=r"set\.mindrecord1: missing; .*set\.mindrecord0 is one file of a set of 3"):
        MindRecord.open(tmp_path / "set.mindrecord0")


def test_every_compression_width_is_in_the_fixtures_and_decodes():
    tokens = EXPECTED["tokens/input_ids"]
    assert tokens.min() < 128 and ((tokens >= 128) & (tokens < 32768)).any() and tokens.max() >= 32768
    wide = EXPECTED["mixed/input_ids"]
    assert (np.abs(wide) >= 2**31).any() and (wide < 0).any()
    # One value per width: 2-bit codes 0..3, the first value in the high bits.
    values = [-5, 300, -70000, 2**40 + 3]
    blob = struct.pack(">I", 4) + bytes([0b00011011]) + struct.pack("<bhiq", *values)
    assert decompress_ints(np.frombuffer(blob, np.uint8)).tolist() == values
    with pytest.raises(DataError, match="widths add up to 15 bytes, it holds 14"):
        decompress_ints(np.frombuffer(blob[:-1], np.uint8))


def copy_fixture(tmp_path, name="tokens.mindrecord") -> Path:
    for suffix in ("", ".db"):
        shutil.copy(FIX / (name + suffix), tmp_path / (name + suffix))
    return tmp_path / name


def test_damaged_files_are_one_line_errors(tmp_path):
    path = copy_fixture(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])  # the last page cut short
    with pytest.raises(DataError, match=r"tokens\.mindrecord: rows reach past the end of the file"):
        MindRecord.open(path)
    path.write_bytes(data[:100])
    with pytest.raises(DataError, match=r"header claims \d+ bytes but the file has 100"):
        MindRecord.open(path)
    path.write_bytes(b"\x05" + bytes(7) + b"hello" + bytes(100))
    with pytest.raises(DataError, match="not a MindRecord file"):
        MindRecord.open(path)
    length = struct.unpack("<Q", data[:8])[0]
    start = MindRecord.open(FIX / "tokens.mindrecord").files[0].rows[3, 0]
    broken = bytearray(data)
    broken[start : start + 8] = struct.pack("<Q", 1 << 20)  # a row's own length disagrees with the index
    path.write_bytes(bytes(broken))
    mr = MindRecord.open(path)
    assert mr.row(2) and length > 0
    with pytest.raises(DataError, match=rf"a row at byte {start} holds 1048576 bytes, its index says"):
        mr.row(3)
    path.with_name(path.name + ".db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(DataError, match=r"tokens\.mindrecord\.db: not a readable MindRecord index"):
        MindRecord.open(path)
    path.with_name(path.name + ".db").unlink()
    with pytest.raises(DataError, match=r"tokens\.mindrecord\.db: missing; a MindRecord file needs its \.db index"):
        MindRecord.open(path)


def test_unknown_schema_and_missing_field_are_one_line_errors(tmp_path):
    path = copy_fixture(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"type":"int32"', b'"type":"int16"', 1))  # same length: header intact
    with pytest.raises(DataError, match=r"field 'input_ids' has type 'int16'; lmforge reads int32, int64"):
        MindRecord.open(path)
    mixed = copy_fixture(tmp_path, "mixed.mindrecord")
    with pytest.raises(DataError, match=r"no field 'tokens' \(fields: .*input_ids.*\); set data.token_field"):
        MindRecordRows.open(mixed, "tokens")
    with pytest.raises(DataError, match=r"field 'weights' is float32 \[-1\], not a 1-D integer array"):
        MindRecordRows.open(mixed, "weights")
    assert np.array_equal(MindRecordRows.open(mixed, "labels").doc(0), expected_rows("mixed")[0]["labels"])
    with pytest.raises(DataError, match=r"row 0 holds token id -?\d+, outside vocab_size 512"):
        MindRecordRows.open(mixed, "input_ids", vocab_size=512).doc(0)


def test_loader_gives_one_row_per_sample_as_mindformers(tmp_path):
    rows = np.stack([r["input_ids"] for r in expected_rows("wiki64")]).astype(np.int64)  # [55, 65]
    for mode in ("packed", "padded"):
        cfg = DataConfig(train=str(FIX / "wiki64.mindrecord"), seq_len=64, shuffle=False, prefetch=0, mode=mode)
        with build_loader(cfg, "train", 5, vocab_size=800) as loader:
            got = [next(loader) for _ in range(11)]  # one epoch: 55 rows
        x = torch.cat([b["input_ids"] for b in got]).numpy()
        y = torch.cat([b["labels"] for b in got]).numpy()
        assert np.array_equal(x, rows[:, :-1]) and np.array_equal(y, rows[:, 1:]), mode
    # Two data-parallel ranks split each global batch; shuffled epochs are permutations of the rows.
    cfg = DataConfig(train=str(FIX / "wiki64.mindrecord"), seq_len=64, prefetch=0)
    seen = []
    for rank in (0, 1):
        with build_loader(cfg, "train", 1, dp_rank=rank, dp_size=2, seed=3) as loader:
            seen += [next(loader)["input_ids"][0].numpy() for _ in range(27)]
    all_rows = {tuple(r) for r in rows[:, :-1].tolist()}
    assert len({tuple(s.tolist()) for s in seen}) == 54 and {tuple(s.tolist()) for s in seen} <= all_rows
    # Rows longer than seq_len + 1 are refused; shorter ones are padded with no loss on the padding.
    cfg = DataConfig(train=str(FIX / "wiki64.mindrecord"), seq_len=32, prefetch=0)
    with pytest.raises(DataError, match=r"row \d+ holds 65 tokens, more than data.seq_len \+ 1 = 33; set data.seq_len to 64"):
        next(build_loader(cfg, "train", 2))
    cfg = DataConfig(train=str(FIX / "wiki64.mindrecord"), seq_len=100, prefetch=0, shuffle=False)
    batch = next(build_loader(cfg, "train", 2))
    assert batch["input_ids"].shape == (2, 100) and (batch["labels"][:, 64:] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][:, :64], torch.from_numpy(rows[:2, 1:]))
    with pytest.raises(DataError, match=r"wiki64\.mindrecord: a MindRecord set has no val split; set data.valid"):
        build_loader(cfg, "val", 2)
    cfg = DataConfig(train=str(FIX / "wiki64.mindrecord"), valid=str(FIX / "wiki64.mindrecord"), seq_len=64)
    assert build_loader(cfg, "val", 5).num_batches == 11


def test_prepare_converts_rows_into_shards(tmp_path):
    rows = [r["input_ids"] for r in expected_rows("wiki64")]
    out = tmp_path / "shards"
    code = subprocess.run(
        [sys.executable, "-m", "lmforge", "prepare", "--input", str(FIX / "wiki64.mindrecord"),
         "--tokenizer", str(TOKENIZER), "--out", str(out), "--val-fraction", "0.1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr
    assert "prepared 55 MindRecord rows of 1 file(s) -> 3,575 tokens" in code.stdout
    train, val = TokenDataset.open(out, "train"), TokenDataset.open(out, "val")
    assert (train.num_docs, val.num_docs) == (49, 6)
    t = v = 0
    for j, row in enumerate(rows):  # val rows are 0, 10, 20, ... (prepare's split rule)
        got = val.doc(v) if j % 10 == 0 else train.doc(t)
        v, t = (v + 1, t) if j % 10 == 0 else (v, t + 1)
        assert np.array_equal(got, row), j
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["fmt"] == "mindrecord" and meta["vocab_size"] == 800
    # Ids past the tokenizer's vocabulary (Llama-3-sized ids in tokens.mindrecord) are refused.
    bad = subprocess.run(
        [sys.executable, "-m", "lmforge", "prepare", "--input", str(FIX / "tokens.mindrecord"),
         "--tokenizer", str(TOKENIZER), "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "outside vocab_size 800" in bad.stderr


def test_converted_mindformers_yaml_trains_from_its_dataset_dir_unchanged(tmp_path):
    """The guide's data step leaves a .mindrecord that train_dataset.data_loader.dataset_dir names."""
    text = (REPO / "tests" / "fixtures" / "mindformers" / "tiny_pp2_tp2.yaml").read_text()
    text = text.replace('dataset_dir: ""', f'dataset_dir: "{FIX / "wiki64.mindrecord"}"')
    text = text.replace("seq_length: 32", "seq_length: 64").replace("vocab_size: 512", "vocab_size: 800")
    (tmp_path / "run.yaml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "train", "--config", str(tmp_path / "run.yaml"), "--use_parallel", "False",
         "parallel.strategy=single", "parallel.tp=1", "parallel.pp=1", f"run.out_dir={tmp_path}/runs",
         "train.max_steps=2", "train.device=cpu", "train.sample_max_new_tokens=0", "log.tensorboard=false",
         "log.plots=false", "log.progress=false"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mapped = [line for line in proc.stdout.splitlines() if line.strip().startswith("train_dataset.data_loader.dataset_dir")]
    assert mapped and mapped[0].split()[1] == "data.train" and str(FIX / "wiki64.mindrecord") in mapped[0]
    metrics = (tmp_path / "runs" / "tiny_llama" / "metrics.jsonl").read_text()
    assert '"step": 2' in metrics
    # Training read the rows through the decoded cache in the run folder (data.mindrecord_cache).
    assert len(list((tmp_path / "runs" / "tiny_llama" / "mindrecord_cache").glob("wiki64.mindrecord-*.tokens"))) == 1
