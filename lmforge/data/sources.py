"""Readers that turn files on disk (or a Hugging Face dataset) into a stream of documents.

    for doc in iter_documents(["data/*.jsonl.gz", "extra.txt"], stats=stats): ...

Everything streams: files are read line by line (Parquet by record batch, `hf:` datasets in
streaming mode), so memory is bounded by the largest single document, not by the corpus.

Inputs: a path, a glob, or a list of them, expanded in sorted order. A directory expands to
the data files under it (recursively, by extension, hidden files skipped); a directory with no
data files, a directory named like a data file (`train.jsonl/`), a missing path or a glob
that matches nothing is a DataError naming it. `hf:NAME[@CONFIG][:SPLIT]` reads a Hugging Face
dataset (a hub name, a local folder of data files, or a `save_to_disk` folder).

Formats (by extension, or forced with fmt=): jsonl (`.jsonl`, `.ndjson`, `.json` as JSON
lines), txt (one document per file), paragraphs (one per blank-line-separated paragraph),
wikitext (`.raw`, `.tokens`: MindFormers' llama_preprocess.py rule, one document per paragraph,
headings dropped; see wikitext.py), wikitext-articles (one detokenised document per top-level
` = Title = ` article), parquet, and `.gz`/`.bz2` versions of the line formats.

Bad records are counted skips in a `SourceStats` (or, with strict=True, a DataError naming
`file:line`): malformed JSON, a missing or non-string text field, non-UTF-8 bytes and empty
text. A line with invalid UTF-8 is SKIPPED (never decoded with replacement characters), so
broken bytes never reach the tokenizer. Empty files are counted too (strict: an error naming
the file); a corpus with no documents at all is always a DataError.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data import cleaning
from lmforge.errors import DataError

FORMATS = ("jsonl", "txt", "paragraphs", "wikitext", "wikitext-articles", "parquet")
_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt", ".text": "txt",
    ".raw": "wikitext", ".tokens": "wikitext", ".parquet": "parquet",
}  # fmt: skip
_COMPRESSED = (".gz", ".bz2")
_HINTS = {
    "malformed JSON": "fix the line or drop --strict",
    "missing text field": "set --text-field, fix the line or drop --strict",
    "non-UTF-8": "re-encode the file as UTF-8 or drop --strict",
    "empty text": "remove the record or drop --strict",
    "invalid Unicode": "fix the escape (a lone UTF-16 surrogate such as \\ud800) or drop --strict",
}


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file path (or hf: spec) it came from
    line: int | None = None  # 1-based line (row for Parquet/hf); None for whole-file documents


@dataclass
class SourceStats:
    """What a read saw: files, documents, and skipped records by reason with examples."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty_files: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def problem(self, reason: str, where: str, detail: str, strict: bool) -> None:
        """Record a bad record at `where` (`path:line`), or raise when strict."""
        if strict:
            raise DataError(f"{where}: {detail}; {_HINTS.get(reason, 'drop --strict to skip it')}")
        self.skipped[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {detail}")

    def summary(self) -> str:
        """A few lines for the user: counts, then the first examples of skipped records."""
        head = f"read {self.documents:,} documents from {self.files:,} files ({self.bytes / 1e6:.1f} MB)"
        parts = [f"{n:,} {reason}" for reason, n in sorted(self.skipped.items())]
        if self.empty_files:
            parts.append(f"{self.empty_files:,} empty files")
        if not parts:
            return head
        lines = [head + "; skipped " + ", ".join(parts)]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return _EXTENSIONS.get(os.path.splitext(name)[1])


def _data_files_in(directory: Path) -> list[Path]:
    """Data files under `directory` (recursive, sorted), skipping hidden ones and .json files."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and _format_of(path) and ".json" not in path.suffixes[-2:]:
                found.append(path)
    return sorted(found)


def _expand_path(path: Path) -> list[Path]:
    if path.is_dir():
        if _format_of(path) is not None:
            raise DataError(f"{path}: is a directory where a data file is expected; pass a file or {path}/*")
        files = _data_files_in(path)
        if not files:
            raise DataError(f"{path}: directory has no data files (.jsonl .txt .raw .tokens .parquet [.gz])")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path")
    return [path]


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path | str]:
    """Paths, globs and directories -> sorted, de-duplicated files (hf: specs kept as str)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path | str] = []
    for item in inputs:
        text = os.fspath(item)
        if text.startswith("hf:"):
            out.append(text)
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise DataError(f"{text}: the glob matches no files; check the pattern")
            for match in matches:
                out.extend(_expand_path(Path(match)))
        else:
            out.extend(_expand_path(Path(os.path.expanduser(text))))
    seen: set = set()
    unique = [p for p in out if not (p in seen or seen.add(p))]
    if not unique:
        raise DataError("no inputs given; pass files, globs or directories")
    return unique


def _open_binary(path: Path):
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix.lower(), open)
    return opener(path, "rb")


def _lines(
    path: Path, stats: SourceStats, strict: bool, start: int = 0, stop: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without newline); undecodable lines are counted skips. With
    `start`/`stop` (byte offsets at line starts) only the lines of that range, numbered from `first_line`."""
    try:
        with _open_binary(path) as f:
            if start:
                f.seek(start)
            pos = start
            for lineno, raw in enumerate(f, first_line):
                if stop is not None and pos >= stop:
                    break
                pos += len(raw)
                stats.bytes += len(raw)
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # UTF-8 byte-order mark
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    detail = f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
                    stats.problem("non-UTF-8", f"{path}:{lineno}", detail, strict)
                    continue
                yield lineno, line.rstrip("\r\n")
    except (OSError, EOFError) as exc:  # truncated or corrupt .gz/.bz2, unreadable file
        raise DataError(f"{path}: cannot read ({exc}); check the file is complete") from None


def _text_value(obj, text_field: str) -> tuple[str | None, str]:
    """The text at `text_field` (dots walk nested objects), or None and why."""
    value = obj
    for key in text_field.split("."):
        if not isinstance(value, dict) or key not in value:
            keys = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
            return None, f"no {text_field!r} field (found: {keys})"
        value = value[key]
    if not isinstance(value, str):
        return None, f"{text_field!r} is {type(value).__name__}, not a string"
    return value, ""


def _record(obj, where: str, source: str, line, text_field, stats, strict):
    text, why = _text_value(obj, text_field)
    if text is None:
        stats.problem("missing text field", where, why, strict)
    elif not text.strip():
        stats.problem("empty text", where, "empty text", strict)
    else:
        return Document(text, source, line)
    return None


def _read_jsonl(
    path: Path, text_field: str, stats: SourceStats, strict: bool, span: tuple[int, int | None, int] = (0, None, 1)
) -> Iterator[Document]:
    """JSON lines of `path`, or of the byte range `span` = (start, stop, first line number)."""
    if span[0] == 0:
        with _open_binary(path) as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):  # a whole-file JSON array cannot be streamed
            raise DataError(f"{path}: holds one JSON array, not JSON lines; write one object per line")
    for lineno, line in _lines(path, stats, strict, *span):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            msg = getattr(exc, "msg", str(exc))
            col = getattr(exc, "colno", 0)
            stats.problem("malformed JSON", where, f"malformed JSON ({msg} at column {col})", strict)
            continue
        doc = _record(obj, where, str(path), lineno, text_field, stats, strict)
        # Valid JSON may escape a lone surrogate ("\ud800"): a str no encoder can turn into UTF-8.
        # Only a line with a \u escape can hold one, so the check costs nothing on other lines.
        if doc is not None and "\\u" in line and not _is_unicode(doc.text):
            stats.problem("invalid Unicode", where, "text holds a lone UTF-16 surrogate escape", strict)
            continue
        if doc is not None:
            yield doc


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


TXT_PIECE_CHARS = 1 << 20  # a .txt document is read and tokenized in pieces of about this size


def txt_pieces(path: Path, stats: SourceStats, strict: bool, piece_chars: int | None = None) -> Iterator[str]:
    """The one document of a .txt file, in pieces whose concatenation is exactly the text
    `_read_txt` yields (lines joined with \\n, stripped), so memory stays bounded by the piece
    size and the longest line, not by the file. A piece ends after a newline that sits between
    two non-blank characters: byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen, lmforge's
    own) split there anyway, so encoding piece by piece gives the tokens of the whole text.
    Only when no such line break turns up within 4 pieces is a piece cut at any line end."""
    piece_chars = piece_chars or TXT_PIECE_CHARS
    parts: list[str] = []
    size, prev_blank_end = 0, True
    for _, line in _lines(path, stats, strict):
        if not parts:
            line = line.lstrip()  # leading whitespace of the document is stripped
            if not line:
                continue
        elif size >= piece_chars and not prev_blank_end and line[:1] and not line[0].isspace():
            yield "".join(parts) + "\n"
            parts, size = [], 0
        elif size >= 4 * piece_chars:
            text = "".join(parts)
            body = text.rstrip()  # trailing whitespace waits: it may turn out to end the document
            if body:
                yield body
                parts, size = [text[len(body) :]], len(text) - len(body)
        if parts or size:
            parts.append("\n")
        parts.append(line)
        size += len(line) + 1
        prev_blank_end = not line[-1:] or line[-1].isspace()
    text = "".join(parts).rstrip()
    if text:
        yield text


def _read_txt(path: Path, stats: SourceStats, strict: bool) -> Iterator[Document]:
    text = "".join(txt_pieces(path, stats, strict))
    if text:
        yield Document(text, str(path), None)


def paragraphs(lines: Iterable[tuple[int, str]], source: str) -> Iterator[Document]:
    """Blank-line separated paragraphs -> documents (line = the paragraph's first line)."""
    block: list[str] = []
    start = 0
    for lineno, line in itertools.chain(lines, [(0, "")]):  # a final blank line flushes the last one
        if line.strip():
            start = start if block else lineno
            block.append(line.rstrip())
        elif block:
            yield Document("\n".join(block).strip(), source, start)
            block = []


def wikitext_articles(lines, source: str, stats: SourceStats, strict: bool) -> Iterator[Document]:
    """WikiText lines -> one detokenised document per ` = Title = ` article."""
    for start, title, text in cleaning.split_wikitext_articles(lines):
        if text:
            yield Document(text, source, start)
        else:
            stats.problem("empty text", f"{source}:{start}", f"article {title!r} has no text", strict)


def _read_parquet(
    path: Path,
    text_field: str,
    stats: SourceStats,
    strict: bool,
    row_groups: list[int] | None = None,
    first_row: int = 1,
    nbytes: int | None = None,
) -> Iterator[Document]:
    """Documents of a Parquet file's `text_field` column: every row group, or only `row_groups`
    (a prepare work unit) whose first row is number `first_row` in the file."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for non-Parquet files
        raise DataError(f"{path}: not a readable Parquet file ({exc}); check the file") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); pass --text-field")
    stats.bytes += path.stat().st_size if nbytes is None else nbytes
    if row_groups is not None and not row_groups:
        return
    row = first_row - 1
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field], row_groups=row_groups):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    stats.problem("non-UTF-8", where, "invalid UTF-8 in a binary column", strict)
                    continue
            doc = _record({text_field: value}, where, str(path), row, text_field, stats, strict)
            if doc is not None:
                yield doc


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[@CONFIG][:SPLIT]` -> (name or local folder, config, split; default train)."""
    rest = spec[3:]
    split = "train"
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail and "/" not in tail:
        rest, split = head, tail
    name, _, config = rest.partition("@")
    if not name:
        raise DataError(
            f"{spec}: expected hf:NAME[@CONFIG][:SPLIT], e.g. hf:wikitext@wikitext-2-raw-v1:train"
        )
    return name, config or None, split


def _read_hf(spec: str, fmt: str, text_field: str, stats: SourceStats, strict: bool) -> Iterator[Document]:
    """Rows of a Hugging Face dataset; with fmt=wikitext the rows are WikiText lines."""
    try:
        import datasets  # imported lazily: only hf: inputs need it
    except ImportError:
        raise DataError(f"{spec}: hf: inputs need the `datasets` package; pip install datasets") from None
    name, config, split = parse_hf_spec(spec)
    local = Path(os.path.expanduser(name))
    try:
        if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))  # memory-mapped Arrow, not loaded into RAM
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{spec}: no split {split!r} (splits: {', '.join(ds)}); add :SPLIT")
                ds = ds[split]
        else:
            target = str(local) if local.is_dir() else name
            ds = datasets.load_dataset(target, config, split=split, streaming=True)
    except DataError:
        raise
    except Exception as exc:  # hub unreachable, unknown name, bad files: all user-side problems
        raise DataError(
            f"{spec}: cannot load the dataset ({type(exc).__name__}: {exc}); check the name, split and network"
        ) from None

    if fmt == "wikitext-articles":
        lines = ((i, str(row.get(text_field) or "").rstrip("\n")) for i, row in enumerate(ds, 1))
        yield from wikitext_articles(lines, spec, stats, strict)
        return
    if fmt == "wikitext":  # the rows are the file's lines
        text = "".join(str(row.get(text_field) or "").rstrip("\n") + "\n" for row in ds)
        yield from wikitext_paragraphs(text, spec)
        return
    for i, row in enumerate(ds, 1):
        doc = _record(row, f"{spec}:row {i}", spec, i, text_field, stats, strict)
        if doc is not None:
            yield doc


def _read_file(path: Path, fmt: str, text_field: str, stats: SourceStats, strict: bool) -> Iterator[Document]:
    if fmt in ("jsonl", "parquet"):
        return (_read_jsonl if fmt == "jsonl" else _read_parquet)(path, text_field, stats, strict)
    if fmt == "txt":
        return _read_txt(path, stats, strict)
    if fmt == "paragraphs":
        return paragraphs(_lines(path, stats, strict), str(path))
    if fmt == "wikitext":
        return wikitext_paragraphs(_whole_text(path, stats), str(path))
    return wikitext_articles(_lines(path, stats, strict), str(path), stats, strict)


def wikitext_paragraphs(text: str, source: str) -> Iterator[Document]:
    """MindFormers' WikiText rule (wikitext.py): one document per paragraph, headings dropped."""
    from lmforge.data.wikitext import mindformers_paragraphs

    for line, para in mindformers_paragraphs(text):
        yield Document(para, source, line)


def _whole_text(path: Path, stats: SourceStats) -> str:
    """A file's text read whole, as Python's text mode reads it (MindFormers' rule needs all of it)."""
    try:
        with _open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); check the file is complete") from None
    stats.bytes += len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 byte 0x{raw[exc.start]:02x}; re-encode the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_documents(
    inputs,
    fmt: str = "auto",
    text_field: str = "text",
    strict: bool = False,
    stats: SourceStats | None = None,
) -> Iterator[Document]:
    """Stream documents from files, globs, directories or `hf:` specs (see module docs)."""
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    stats = stats if stats is not None else SourceStats()
    files = expand_inputs(inputs)
    yielded = 0
    for item in files:
        if isinstance(item, str):  # hf: spec
            docs = _read_hf(item, fmt, text_field, stats, strict)
        else:
            file_fmt = fmt if fmt != "auto" else _format_of(item)
            if file_fmt is None:
                raise DataError(
                    f"{item}: cannot tell the format from the extension; pass --format ({', '.join(FORMATS)})"
                )
            if item.stat().st_size == 0:
                stats.files += 1
                _empty_file(item, stats, strict)
                continue
            docs = _read_file(item, file_fmt, text_field, stats, strict)
        stats.files += 1
        before = yielded
        for doc in docs:
            yielded += 1
            stats.documents += 1
            yield doc
        if yielded == before and not isinstance(item, str) and _is_blank(item):
            _empty_file(item, stats, strict)
    if yielded == 0:
        shown = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        seen = [f"{n} {reason}" for reason, n in sorted(stats.skipped.items())]
        seen += [f"{stats.empty_files} empty files"] if stats.empty_files else []
        raise DataError(
            f"{shown}: no documents found (skipped: {', '.join(seen) or 'nothing'}); "
            f"check the inputs, --format and --text-field"
        )


def _empty_file(path: Path, stats: SourceStats, strict: bool) -> None:  # empty or blank file
    if strict:
        raise DataError(f"{path}: empty file; remove it from the inputs or drop --strict")
    stats.empty_files += 1


def _is_blank(path: Path) -> bool:
    """True when a file holds only whitespace (checked after it yielded nothing)."""
    with _open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            if block.strip():
                return False
    return True
