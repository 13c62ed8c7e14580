"""Readers on small files the tests write: formats, WikiText layout, bad input, streaming."""

import gzip
import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.sources import SourceStats, iter_documents, parse_hf_spec
from lmforge.errors import DataError


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def texts(inputs, **kw):
    return [d.text for d in iter_documents(inputs, **kw)]


def test_jsonl_custom_field_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "first doc"}, {"body": "second"}])
    docs = list(iter_documents(path, text_field="body"))
    assert [d.text for d in docs] == ["first doc", "second"]
    assert [d.line for d in docs] == [1, 2] and docs[0].source == str(path)
    nested = write_jsonl(tmp_path / "n.jsonl", [{"meta": {"content": "deep text"}}])
    assert texts(nested, text_field="meta.content") == ["deep text"]


def test_txt_per_file_and_paragraphs(tmp_path):
    (tmp_path / "b.txt").write_text("Para one line 1\nline 2\n\n\nPara two\n")
    (tmp_path / "a.txt").write_text("Alpha\n")
    # sorted expansion: a.txt before b.txt; one document per file keeps inner blank lines
    assert texts(str(tmp_path / "*.txt")) == ["Alpha", "Para one line 1\nline 2\n\n\nPara two"]
    docs = list(iter_documents(tmp_path / "b.txt", fmt="paragraphs"))
    assert [(d.text, d.line) for d in docs] == [("Para one line 1\nline 2", 1), ("Para two", 5)]


# WikiText layout: every line starts and ends with a space, blank lines are a single space.
WIKITEXT_LINES = [
    "",
    "= Valkyria Chronicles III =",
    "",
    "Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 ) is a role @-@ playing game .",
    'It sold 1 @,@ 000 copies at $ 3 @.@ 5 each , and the team \'s " best " work .',
    "",
    "= = Gameplay = =",
    "",
    "The game 's battles are n't easy ; players ' units fight .",
    "",
    "= Tower Building =",
    "",
    "The Tower Building is a skyscraper .",
]
WIKITEXT = "".join(f" {line} \n" if line else " \n" for line in WIKITEXT_LINES)


def test_wikitext_articles_split_and_detokenised(tmp_path):
    path = tmp_path / "wiki.valid.raw"
    path.write_text(WIKITEXT, encoding="utf-8")
    docs = list(iter_documents(path, fmt="wikitext-articles"))
    assert len(docs) == 2  # the section heading did not start a new article
    first = docs[0].text
    assert first.startswith(
        "Valkyria Chronicles III\n\nSenjō no Valkyria 3: Unrecorded Chronicles (Japanese:"
    )
    assert "is a role-playing game." in first
    assert 'It sold 1,000 copies at $3.5 each, and the team\'s "best" work.' in first
    assert "\n\nGameplay\nThe game's battles aren't easy; players' units fight." in first
    assert "@" not in first and " ," not in first
    assert docs[0].line == 2 and docs[1].line == 11
    assert docs[1].text == "Tower Building\n\nThe Tower Building is a skyscraper."


def test_parquet_streamed_with_column_choice(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"id": list(range(2500)), "content": [f"row {i}" for i in range(2500)]})
    pq.write_table(table, path, row_group_size=1000)
    docs = list(iter_documents(path, text_field="content"))
    assert len(docs) == 2500 and docs[0].text == "row 0" and docs[-1].line == 2500
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text' \(columns: id, content\)"):
        list(iter_documents(path))


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped one"}\n{"text": "zipped 二"}\n')
    assert texts(path) == ["zipped one", "zipped 二"]
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:40])
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read"):
        list(iter_documents(tmp_path / "broken.jsonl.gz"))


def test_hf_spec_and_local_saved_dataset(tmp_path):
    assert parse_hf_spec("hf:Salesforce/wikitext@wikitext-2-raw-v1:test") == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    assert parse_hf_spec("hf:/data/my_ds") == ("/data/my_ds", None, "train")
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["hf doc one", "", "hf doc two"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    stats = SourceStats()
    docs = list(iter_documents(f"hf:{tmp_path / 'saved'}", stats=stats))
    assert [d.text for d in docs] == ["hf doc one", "hf doc two"]
    assert stats.skipped["empty text"] == 1


# --- bad input ------------------------------------------------------------------------------------


def test_malformed_json_counted_then_strict_raises_with_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "good"}], raw_lines=['{"text": "cut', '{"text": "ok"}']
    )
    stats = SourceStats()
    assert texts(path, stats=stats) == ["good", "ok"]
    assert stats.skipped["malformed JSON"] == 1
    assert stats.examples[0].startswith(f"{path}:2: malformed JSON")
    assert "skipped 1 malformed JSON" in stats.summary() and f"{path}:2" in stats.summary()
    with pytest.raises(DataError) as err:
        list(iter_documents(path, strict=True))
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: malformed JSON") and msg.endswith("fix the line or drop --strict")
    assert "\n" not in msg


def test_missing_field_non_string_and_empty_text(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"body": "no text key"}, {"text": 42}, {"text": "   "}, {"text": "kept"}, [1, 2]],
    )
    stats = SourceStats()
    assert texts(path, stats=stats) == ["kept"]
    assert stats.skipped == {"missing text field": 3, "empty text": 1}
    assert any("no 'text' field (found: body)" in e for e in stats.examples)
    assert any("'text' is int, not a string" in e for e in stats.examples)
    with pytest.raises(DataError, match=r"m\.jsonl:1: no 'text' field .*set --text-field"):
        list(iter_documents(path, strict=True))


def test_non_utf8_line_is_skipped_and_counted(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    stats = SourceStats()
    assert texts(path, stats=stats) == ["fine", "also fine"]
    assert stats.skipped["non-UTF-8"] == 1 and "latin1.jsonl:2: invalid UTF-8 byte 0xe9" in stats.examples[0]
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: invalid UTF-8 .*re-encode"):
        list(iter_documents(path, strict=True))
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"good line\n\xff\xfe bad\nlast line\n")
    assert texts(txt) == ["good line\nlast line"]  # the bad line is dropped, not replaced


def test_empty_files_counted_and_empty_corpus_raises(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    write_jsonl(tmp_path / "real.jsonl", [{"text": "content"}])
    stats = SourceStats()
    assert texts(tmp_path, stats=stats) == ["content"]
    assert stats.empty_files == 2 and "2 empty files" in stats.summary()
    with pytest.raises(DataError, match=r"no documents found \(skipped: 1 empty files\)"):
        list(iter_documents(tmp_path / "empty.jsonl"))
    # --strict makes an empty or blank input file an error naming it, like a bad line.
    for name in ("empty.jsonl", "blank.txt"):
        with pytest.raises(DataError, match=rf"{name}: empty file; remove it .*or drop --strict"):
            list(iter_documents([tmp_path / "real.jsonl", tmp_path / name], strict=True))
    write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}])
    with pytest.raises(
        DataError, match=r"allbad\.jsonl: no documents found \(skipped: 1 missing text field\)"
    ):
        list(iter_documents(tmp_path / "allbad.jsonl"))


def test_path_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match=r"nothing-\*\.jsonl: the glob matches no files"):
        list(iter_documents(str(tmp_path / "nothing-*.jsonl")))
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(DataError, match=r"train\.jsonl: is a directory where a data file is expected"):
        list(iter_documents(tmp_path / "train.jsonl"))
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "notes.md").write_text("hi")
    with pytest.raises(DataError, match=r"nodata: directory has no data files"):
        list(iter_documents(tmp_path / "nodata"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: cannot tell the format"):
        list(iter_documents(tmp_path / "x.csv"))
    (tmp_path / "arr.json").write_text('[{"text": "a"}]')
    with pytest.raises(DataError, match=r"arr\.json: holds one JSON array"):
        list(iter_documents(tmp_path / "arr.json"))
    with pytest.raises(DataError, match=r"unknown format 'csv'"):
        list(iter_documents(tmp_path / "x.csv", fmt="csv"))


def test_directory_expansion_skips_manifests_and_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "b" / "2.jsonl", [{"text": "two"}])
    write_jsonl(tmp_path / "1.jsonl", [{"text": "one"}])
    (tmp_path / "manifest.json").write_text('{"text": "not a document"}\n')
    (tmp_path / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    assert texts(tmp_path) == ["one", "two"]
    # the same file reached twice (path + glob) is read once
    assert texts([tmp_path / "1.jsonl", str(tmp_path / "*.jsonl")]) == ["one"]


def test_reading_is_lazy_and_streams_large_files(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(60_000):
            f.write(json.dumps({"text": f"document number {i} " + "x" * 80}) + "\n")
    assert path.stat().st_size > 5_000_000
    stats = SourceStats()
    gen = iter_documents(path, stats=stats)
    assert isinstance(gen, types.GeneratorType)
    first = next(gen)
    assert first.text.startswith("document number 0 ")
    # After one document only the first buffered block of the file has been read.
    assert stats.bytes < 100_000 and stats.documents == 1
    count = 1 + sum(1 for _ in gen)
    assert count == 60_000 and stats.bytes == path.stat().st_size
