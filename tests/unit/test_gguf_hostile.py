"""Damaged and hostile GGUF files through `lmforge import --gguf`: each is one line on stderr, exit
code 2, no traceback, nothing written, and nothing sized by what the file claims (peak RSS stays
at what importing lmforge costs)."""

import struct
import subprocess
import sys

import pytest

pytest.importorskip("gguf")

from gguf_case import gguf_test_model, train_test_tokenizer  # noqa: E402

from lmforge.interop.gguf_export import export_gguf  # noqa: E402

# What `python -m lmforge` costs with torch imported, plus room; a claimed model would be GBs.
MAX_RSS_MB = 1200
# VmHWM, not ru_maxrss: Linux carries the forking parent's peak into the child's ru_maxrss across
# exec, so a pytest process grown large by earlier tests would be measured instead of this one.
_RUN = (
    "import sys\n"
    "from lmforge.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "print(int(hwm.split()[1]) // 1024)\n"
    "sys.exit(rc)\n"
)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model, cfg = gguf_test_model(False, 2, True, None)
    return export_gguf(model, cfg, train_test_tokenizer(root), root / "good.gguf").read_bytes()


def _key_value_at(data: bytes, key: str) -> int:
    """Offset of the value type (u32) that follows `key` in the key/value section."""
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    return at + 8 + len(raw)


def _set_u32(data: bytes, key: str, value: int) -> bytes:
    at = _key_value_at(data, key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # a uint32 value
    return data[: at + 4] + struct.pack("<I", value) + data[at + 8 :]


def _cut_inside_tokens(data: bytes) -> bytes:
    at = _key_value_at(data, "tokenizer.ggml.tokens")
    return data[: at + 4 + 4 + 8 + 100]  # type, item type, count, then part of the strings


def _tokens_claim(data: bytes, count: int) -> bytes:
    at = _key_value_at(data, "tokenizer.ggml.tokens") + 8  # past the type and the item type
    return data[:at] + struct.pack("<Q", count) + data[at + 8 :]


def _huge_tensor(data: bytes) -> bytes:
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at)[0] == 2  # two dims follow
    return data[: at + 4] + struct.pack("<QQ", 1 << 31, 1 << 31) + data[at + 20 :]


CASES = {
    "cut_inside_array": (_cut_inside_tokens, "incomplete"),
    "array_claims_too_many": (lambda d: _tokens_claim(d, 1 << 60), "claims 1152921504606846976 entries"),
    "head_count_zero": (lambda d: _set_u32(d, "llama.attention.head_count", 0), "head_count' is 0"),
    "huge_embedding_length": (
        lambda d: _set_u32(d, "llama.embedding_length", 0xFFFFFFFF),
        "embedding_length' is 4294967295",
    ),
    "huge_tensor_dims": (_huge_tensor, "runs past the end of the file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_gguf_is_one_line_and_allocates_nothing(tmp_path, good, case):
    damage, words = CASES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(damage(good))
    out = tmp_path / "w"
    done = subprocess.run(
        [sys.executable, "-c", _RUN, "import", "--gguf", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(err) == 1 and words in err[0] and str(path) in err[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert int(done.stdout.split()[-1]) < MAX_RSS_MB
