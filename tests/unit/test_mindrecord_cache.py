"""The batched MindRecord integer decode (mindrecord_ints.py) and the decoded cache the trainer reads
MindRecord rows from (mindrecord_cache.py), against FileReader's rows (tests/fixtures/mindrecord/)."""

import json
import os
import shutil
import struct
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from paths import FIXTURES, REPO

from lmforge.config import DataConfig
from lmforge.data import mindrecord_cache
from lmforge.data.loader import build_loader
from lmforge.data.mindrecord import MindRecord, MindRecordRows
from lmforge.data.mindrecord_cache import HEADER_BYTES, open_cache
from lmforge.data.mindrecord_ints import decode_ints, decompress_ints
from lmforge.errors import DataError

FIX = FIXTURES / "mindrecord"
EXPECTED = np.load(FIX / "expected_rows.npz")
_FORMATS = ((-(2**7), 2**7 - 1, "<b"), (-(2**15), 2**15 - 1, "<h"), (-(2**31), 2**31 - 1, "<i"), (-(2**63), 2**63 - 1, "<q"))


def compress(values: list[int]) -> np.ndarray:
    """MindSpore's integer compression, written from its description (see mindrecord_ints.py)."""
    codes, body = [], b""
    for v in values:
        code = next(c for c, (lo, hi, _) in enumerate(_FORMATS) if lo <= v <= hi)
        codes.append(code)
        body += struct.pack(_FORMATS[code][2], v)
    bitmap = bytearray((len(values) + 3) // 4)
    for i, c in enumerate(codes):
        bitmap[i // 4] |= c << (6 - 2 * (i % 4))
    return np.frombuffer(struct.pack(">I", len(values)) + bytes(bitmap) + body, dtype=np.uint8)


def expected(fixture: str) -> list[np.ndarray]:
    return np.split(EXPECTED[f"{fixture}/input_ids"], np.cumsum(EXPECTED[f"{fixture}/input_ids/len"])[:-1])


def copy_set(tmp_path: Path, *names: str) -> Path:
    for name in names:
        for suffix in ("", ".db"):
            shutil.copy(FIX / (name + suffix), tmp_path / (name + suffix))
    return tmp_path / names[0]


def test_a_batch_decodes_as_its_rows_one_by_one_at_every_width():
    rng = np.random.default_rng(0)
    for _ in range(150):
        rows = []
        for _ in range(int(rng.integers(1, 7))):
            scale = int(rng.choice([100, 30_000, 2**20, 2**40]))
            rows.append([int(v) for v in rng.integers(-scale, scale, int(rng.integers(0, 30)))])
        got, pool = decode_ints([compress(r) for r in rows])
        assert [g.tolist() for g in got] == rows
        flat = [v for r in rows for v in r]
        if flat:  # the pool bounds every row: one range check covers the batch
            assert pool.min() <= min(flat) and pool.max() >= max(flat)
        assert all(decompress_ints(compress(r)).tolist() == r for r in rows)


def test_a_shuffled_batch_across_the_files_of_a_set_reads_in_its_own_order():
    records = MindRecord.open(FIX / "set.mindrecord1")
    want = expected("set")
    order = np.random.default_rng(1).permutation(len(want))
    got = records.fields(order, "input_ids")
    assert len(records.files) == 3 and all(np.array_equal(g, want[i]) and g.dtype == np.int32 for g, i in zip(got, order))
    rows = MindRecordRows(records, "input_ids", "train", None).docs(order[:7])
    assert all(np.array_equal(r, want[i]) for r, i in zip(rows, order[:7]))


def test_a_byte_moved_between_two_rows_is_refused_not_misread():
    a, b = compress([5, 300, 7]), compress([400, 2, 3])
    # Row a loses its last body byte and row b gains one: the batch's total is still right.
    with pytest.raises(DataError, match="widths add up to 4 bytes, it holds 3"):
        decode_ints([a[:-1], np.concatenate([b, a[-1:]])])
    with pytest.raises(DataError, match="claims 9 values in 6 bytes"):
        decode_ints([compress([1, 2]), np.frombuffer(struct.pack(">I", 9) + b"\x00\x00", np.uint8)])


@pytest.mark.parametrize("fixture,name,dtype", [("wiki64", "wiki64.mindrecord", "<u2"), ("tokens", "tokens.mindrecord", "<u4"), ("set", "set.mindrecord0", "<u4")])
def test_the_cache_holds_filereaders_rows_and_is_built_once(tmp_path, fixture, name, dtype):
    records = MindRecord.open(copy_set(tmp_path, *([name] if fixture != "set" else ["set.mindrecord0", "set.mindrecord1", "set.mindrecord2"])))
    cache = open_cache(records, "input_ids", tmp_path / "cache")
    assert cache.tokens.dtype == np.dtype(dtype)  # uint16 unless an id needs more (then rebuilt as uint32)
    want = expected(fixture)
    assert all(np.array_equal(g, w) for g, w in zip(cache.rows(range(len(want))), want)) and len(cache.offsets) == len(want) + 1
    assert cache.max_id == max(int(w.max()) for w in want)
    stamp = cache.path.stat().st_mtime_ns
    again = open_cache(MindRecord.open(records.files[0].path), "input_ids", tmp_path / "cache")
    assert again.path == cache.path and again.path.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".tokens"] == [cache.path.name]


def test_a_damaged_or_stale_cache_is_rebuilt_never_trusted(tmp_path):
    path = copy_set(tmp_path, "wiki64.mindrecord")
    want = expected("wiki64")
    cache = open_cache(MindRecord.open(path), "input_ids", tmp_path / "cache")
    good = cache.path.read_bytes()
    offsets_at = HEADER_BYTES + 8  # offsets[1]: the end of row 0
    moved = bytearray(good)
    moved[offsets_at : offsets_at + 8] = struct.pack("<q", len(want[0]) + 1)  # rows 0/1 split one token later
    header = json.loads(good[8 : 8 + struct.unpack("<Q", good[:8])[0]])

    def with_header(**changes) -> bytes:
        text = json.dumps({**header, **changes}).encode()
        return struct.pack("<Q", len(text)) + text + bytes(HEADER_BYTES - 8 - len(text)) + good[HEADER_BYTES:]

    assert with_header() == good
    headers = [with_header(rows=54), with_header(max_id=float("inf")), with_header(dtype="<u8"), with_header(key="0" * 20)]
    for damaged in (good[:-2], good[:100], bytes(moved), *headers, b"\xff" * HEADER_BYTES + good[HEADER_BYTES:]):
        cache.path.write_bytes(damaged)
        again = open_cache(MindRecord.open(path), "input_ids", tmp_path / "cache")
        assert again.path.read_bytes() == good
        assert all(np.array_equal(g, w) for g, w in zip(again.rows(range(len(want))), want))
    # A rewritten MindRecord (new mtime) gets a new cache; the old one is not read for it.
    os.utime(path, ns=(1, 1))
    fresh = open_cache(MindRecord.open(path), "input_ids", tmp_path / "cache")
    assert fresh.path != cache.path and fresh.path.is_file()


def test_cache_ids_are_checked_against_the_vocabulary_and_sign(tmp_path):
    tokens = MindRecord.open(copy_set(tmp_path, "tokens.mindrecord"))
    cache = open_cache(tokens, "input_ids", tmp_path / "cache")
    with pytest.raises(DataError, match=rf"row {cache.max_row} holds token id {cache.max_id}, outside vocab_size 800"):
        MindRecordRows(tokens, "input_ids", "train", 800, cache)
    mixed = MindRecord.open(copy_set(tmp_path, "mixed.mindrecord"))
    with pytest.raises(DataError, match=r"row \d+ holds a negative token id; token ids never are, check data.token_field"):
        open_cache(mixed, "input_ids", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tmp"))  # a failed build leaves no partial file


def test_loader_batches_are_the_same_with_and_without_the_cache(tmp_path):
    path = copy_set(tmp_path, "wiki64.mindrecord")
    for mode in ("packed", "padded"):
        cfg = DataConfig(train=str(path), seq_len=64, prefetch=0, mode=mode)
        cached = build_loader(cfg, "train", 4, seed=5, vocab_size=800, cache_dir=tmp_path / "c")
        with build_loader(cfg, "train", 4, seed=5, vocab_size=800) as plain, cached:
            assert cached.sources[0].ds.cache is not None and plain.sources[0].ds.cache is None
            for _ in range(30):  # two epochs and more
                a, b = next(plain), next(cached)
                assert all(a[k].equal(b[k]) for k in a)


def test_a_disk_without_room_reads_the_mindrecord_as_it_is(tmp_path, monkeypatch, capsys):
    path = copy_set(tmp_path, "wiki64.mindrecord")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mindrecord_cache.shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1 << 20))
    assert open_cache(MindRecord.open(path), "input_ids", tmp_path / "cache") is None
    assert "decoded as they are read (slower)" in capsys.readouterr().out
    cfg = DataConfig(train=str(path), seq_len=64, prefetch=0)
    with build_loader(cfg, "train", 2, cache_dir=tmp_path / "cache") as loader:
        assert loader.sources[0].ds.cache is None and next(loader)["input_ids"].shape == (2, 64)


def test_whole_set_passes_decode_in_bounded_runs_of_rows(tmp_path, monkeypatch):
    records = MindRecord.open(copy_set(tmp_path, "set.mindrecord0", "set.mindrecord1", "set.mindrecord2"))
    chunks = records.row_chunks(max_bytes=300)
    assert len(chunks) > 3 and np.array_equal(np.concatenate(chunks), np.arange(records.num_rows))
    # The cache written run by run equals the one written in one run.
    whole = open_cache(records, "input_ids", tmp_path / "one").path.read_bytes()
    monkeypatch.setattr(MindRecord, "row_chunks", lambda self: chunks)
    assert open_cache(records, "input_ids", tmp_path / "runs").path.read_bytes() == whole


def test_ranks_starting_together_build_the_cache_once(tmp_path):
    """Two processes open the same cache while the first is still writing it (its build is slowed):
    the flock makes the second wait and read the finished file; a killed build's temporary goes."""
    path = copy_set(tmp_path, "wiki64.mindrecord")
    (tmp_path / "cache").mkdir()
    key = mindrecord_cache.cache_key(MindRecord.open(path), "input_ids")
    (tmp_path / "cache" / f".{path.name}-{key}.tokens.99999.tmp").write_bytes(b"left by a killed build")
    code = (
        "import sys, time\n"
        "from lmforge.data import mindrecord_cache as mc\n"
        "from lmforge.data.mindrecord import MindRecord\n"
        "build = mc._build\n"
        "mc._build = lambda *a: (time.sleep(2), build(*a))\n"
        "print(mc.open_cache(MindRecord.open(sys.argv[1]), 'input_ids', mc.Path(sys.argv[2])).path)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(o.count("note: decoding") for o in outs) == 1
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock", Path(outs[0].strip().splitlines()[-1]).name]
