"""Tokenizer training (MiniMind layout, transformers-loadable) and loading of every format."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
from pathlib import Path

import pytest
from jobs import write_jsonl
from paths import MINIMIND

from lmforge.errors import LmforgeError
from lmforge.tokenizer import load_tokenizer, train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "Language models learn the statistics of text; they predict the next token.",
    "预训练是大语言模型开发的第一个关键阶段，模型通过大量文本学习语言的基本规律。",
    "Emojis too: 🙂🚀🔥 and accents: café, naïve, Ångström.",
    "def f(x):\n    return x * 2  # code with    spaces\n\n\ttabs",
    "数字 12345 和 English mixed 中文 text.",
] * 20

VARIED = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "中文分词测试：你好，世界！",
    "emoji 🧪🧬 family 👨‍👩‍👧 flags 🇨🇳",
    "line1\nline2\r\nline3\n\n\n",
    "unseen words: zyxwvut qqqq 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(tmp / "corpus.jsonl", TEXTS)
    return train_tokenizer(corpus, 400, tmp / "bpe")


def test_trained_tokenizer_layout_and_roles(trained):
    assert {p.name for p in trained.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    tok = load_tokenizer(trained)
    assert (tok.kind, tok.pad_id, tok.bos_id, tok.eos_id) == ("hf", 0, 1, 2)
    assert tok.vocab_size == 400
    cfg = json.loads((trained / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )


def test_trained_tokenizer_matches_transformers(trained):
    from transformers import AutoTokenizer

    ours = load_tokenizer(trained)
    theirs = AutoTokenizer.from_pretrained(str(trained))
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)
    for text in VARIED + TEXTS[:6]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ids == theirs(text)["input_ids"], text  # no specials added by default either
        assert ours.decode(ids) == text
        assert theirs.decode(ids) == text
    assert ours.encode_batch(VARIED) == [ours.encode(t) for t in VARIED]


MINIMIND_TOKENIZER = MINIMIND / "model"
CHAT_TEXT = "<|im_start|>user\nhello <think>x</think><|im_end|>\n tail <|endoftext|><tts_pad>"


def test_special_strings_in_text_are_their_ids(trained):
    """Specials the tokenizer defines are single ids inside text, as transformers encodes them."""
    from transformers import AutoTokenizer

    tok = load_tokenizer(trained)
    ids = tok.encode("a <|im_end|> b")
    assert ids.count(tok.eos_id) == 1 and len(ids) == 5
    theirs = AutoTokenizer.from_pretrained(str(trained))
    assert ids == theirs("a <|im_end|> b", add_special_tokens=False).input_ids
    assert tok.encode_batch(["a <|im_end|> b"]) == [ids]


@pytest.mark.skipif(not MINIMIND_TOKENIZER.is_dir(), reason="MiniMind reference checkout not present")
def test_minimind_tokenizer_specials_match_transformers():
    """MiniMind's published tokenizer (6,400 ids, <|im_start|>=1, <|im_end|>=2): our encoding of
    text carrying its special tokens equals AutoTokenizer's on the same files."""
    from transformers import AutoTokenizer

    ours = load_tokenizer(MINIMIND_TOKENIZER)
    theirs = AutoTokenizer.from_pretrained(str(MINIMIND_TOKENIZER))
    assert ours.vocab_size == 6400 == len(theirs)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)
    texts = [CHAT_TEXT, "plain text, no specials", "<|im_start|><|im_start|>x<|im_end|>", *VARIED]
    for text in texts:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
    assert ours.encode_batch(texts) == [theirs(t, add_special_tokens=False).input_ids for t in texts]
    ids = ours.encode(CHAT_TEXT)
    assert ids[0] == 1 and 2 in ids and 17 in ids  # <tts_pad> is id 17


def test_training_is_deterministic(trained, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    again = train_tokenizer(corpus, 400, tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (trained / name).read_bytes(), name


def test_train_max_docs_and_errors(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    with pytest.raises(LmforgeError, match="vocab_size 100"):
        train_tokenizer(corpus, 100, tmp_path / "small")
    out = train_tokenizer(corpus, 300, tmp_path / "few", max_docs=3)
    assert load_tokenizer(out).encode("fox") != []
    assert not (tmp_path / "small").exists()


def test_train_reports_skipped_records_and_strict_stops(tmp_path, capsys):
    from lmforge.data.sources import SourceStats
    from lmforge.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a good line of text"}\n{"text": broken\n{"body": "x"}\n' * 5)
    stats = SourceStats()
    train_tokenizer(bad, 300, tmp_path / "skipping", stats=stats)
    assert stats.documents == 5
    assert stats.skipped == {"malformed JSON": 5, "missing text field": 5}
    err = capsys.readouterr().err
    assert "skipped 5 malformed JSON, 5 missing text field" in err and "bad.jsonl:2" in err
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON .*drop --strict"):
        train_tokenizer(bad, 300, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_fingerprint_stable_across_loads_and_copies(trained, tmp_path):
    a, b = load_tokenizer(trained), load_tokenizer(trained / "tokenizer.json")
    copy = shutil.copytree(trained, tmp_path / "elsewhere" / "copy")
    c = load_tokenizer(copy)
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert len(a.fingerprint) == 64
    # Re-serialised with different JSON formatting: same ids, same fingerprint.
    spec = json.loads((trained / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(spec, indent=None, sort_keys=True))
    assert load_tokenizer(copy).fingerprint == a.fingerprint
    # A different vocabulary, or different roles, change it.
    other = train_tokenizer(write_jsonl(tmp_path / "o.jsonl", TEXTS[:3] * 5), 350, tmp_path / "other")
    assert load_tokenizer(other).fingerprint != a.fingerprint
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    changed = load_tokenizer(copy)
    assert changed.bos_id is None and changed.fingerprint != a.fingerprint


def _train_sentencepiece(tmp_path: Path) -> Path:
    import sentencepiece as spm

    corpus = tmp_path / "sp.txt"
    corpus.write_text("\n".join(TEXTS), encoding="utf-8")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=450,
        model_type="bpe",
        hard_vocab_limit=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    folder = tmp_path / "spfolder"
    folder.mkdir()
    shutil.copy(f"{prefix}.model", folder / "tokenizer.model")
    return folder


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    folder = _train_sentencepiece(tmp_path)
    tok = load_tokenizer(folder)
    ref = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (
        "sentencepiece",
        1,
        2,
        None,
        ref.get_piece_size(),
    )
    for text in VARIED[:-1] + TEXTS[:6]:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == text  # byte fallback + identity normaliser round-trip exactly
    assert tok.encode_batch(VARIED) == [ref.encode(t) for t in VARIED]
    copy = shutil.copy(folder / "tokenizer.model", tmp_path / "renamed.model")
    assert load_tokenizer(copy).fingerprint == tok.fingerprint


def _write_ranks(path: Path, gz: bool = False) -> Path:
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" the"]
    data = "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def test_tiktoken_gpt2_style_and_gzip(tmp_path):
    tok = load_tokenizer(_write_ranks(tmp_path / "tiny.tiktoken"))
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.vocab_size) == ("tiktoken", None, 260, 261)
    assert tok.encode("the the") == [258, 259]
    for text in VARIED:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("the<|endoftext|>")[-1] == 260  # a special the tokenizer defines is its id
    gz = load_tokenizer(_write_ranks(tmp_path / "tiny.tiktoken.gz", gz=True))
    assert gz.encode("the the") == [258, 259] and gz.fingerprint == tok.fingerprint


def test_tiktoken_llama3_style_tokenizer_model(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    tok = load_tokenizer(_write_ranks(folder / "tokenizer.model"))
    assert tok.name.startswith("tiktoken-llama3")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (260, 261, 260 + 256)
    # Llama-3's regex keeps digits in groups of at most three.
    assert tok.decode(tok.encode("12345 the")) == "12345 the"
    assert load_tokenizer(folder).fingerprint == tok.fingerprint
    assert tok.fingerprint != load_tokenizer(_write_ranks(tmp_path / "g.tiktoken")).fingerprint


def test_load_errors_are_one_line(tmp_path):
    cases = []
    with pytest.raises(LmforgeError) as e:
        load_tokenizer(tmp_path / "missing")
    cases.append(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="no tokenizer.json") as e:
        load_tokenizer(tmp_path / "empty")
    cases.append(e)
    (tmp_path / "junk.model").write_bytes(b"\x00\x01garbage\xff" * 10)
    with pytest.raises(LmforgeError, match="neither a SentencePiece") as e:
        load_tokenizer(tmp_path / "junk.model")
    cases.append(e)
    (tmp_path / "bad.tiktoken").write_text("IQ== 0\nnot a line\n")
    with pytest.raises(LmforgeError, match=r"bad.tiktoken:2") as e:
        load_tokenizer(tmp_path / "bad.tiktoken")
    cases.append(e)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid Hugging Face") as e:
        load_tokenizer(tmp_path / "tokenizer.json")
    cases.append(e)
    for e in cases:
        assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_lone_tokenizer_json_guesses_minimind_roles(trained, tmp_path):
    """Without tokenizer_config.json, a MiniMind/Qwen-layout vocab ends documents with
    <|im_end|> (not <|endoftext|>, which is its padding), exactly as its own config says."""
    full = load_tokenizer(trained)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(trained / "tokenizer.json", lone / "tokenizer.json")
    tok = load_tokenizer(lone)
    spec = json.loads((lone / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    assert tok.eos_id == ids["<|im_end|>"] == full.eos_id
    assert tok.bos_id == ids["<|im_start|>"] == full.bos_id
    assert tok.pad_id == ids["<|endoftext|>"] == full.pad_id
    assert tok.fingerprint == full.fingerprint
    # A config naming only eos keeps it and still guesses the other roles by the convention.
    (lone / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    named = load_tokenizer(lone)
    assert named.eos_id == ids["<|endoftext|>"] and named.bos_id == ids["<|im_start|>"]
    # Without the chat markers (GPT-2 style) <|endoftext|> is the eos and there is no bos/pad.
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel

    gpt2ish = RustTokenizer(WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    gpt2ish.add_special_tokens(["<|endoftext|>"])
    plain = tmp_path / "plain"
    plain.mkdir()
    gpt2ish.save(str(plain / "tokenizer.json"))
    other = load_tokenizer(plain)
    assert other.eos_id == 3 and other.bos_id is None and other.pad_id is None
