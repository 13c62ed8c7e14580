"""Text cleaners for the raw corpora that registries ship.

Each cleaner is a pure function on strings so it can be tested on small literal samples:
Project Gutenberg licence headers/footers, People's Daily `word/POS` tags, MediaWiki markup,
and WikiText's tokenisation (undone when reading WikiText, redone when writing our
WikiText-layout split from real Wikipedia prose).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

# --- Project Gutenberg -----------------------------------------------------------------------

_GUTENBERG_START = re.compile(
    r"^\s*(\*+\s*START OF (THE|THIS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$",
    re.IGNORECASE,
)
_GUTENBERG_END = re.compile(
    r"^\s*(\*+\s*END OF (THE|THIS) PROJECT GUTENBERG.*|END OF (THE|THIS) PROJECT GUTENBERG.*"
    r"|End of Project Gutenberg.*)$",
    re.IGNORECASE,
)
# Old (1990s) Gutenberg Shakespeare files interleave this notice between works.
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """Cut the Project Gutenberg licence header and footer, keep the work itself."""
    lines = text.splitlines()
    start = 0
    for i, line in enumerate(lines):
        if _GUTENBERG_START.match(line):
            start = i + 1  # the last start marker wins: some files repeat it after a preface
    end = len(lines)
    for i in range(start, len(lines)):
        if _GUTENBERG_END.match(lines[i]):
            end = i
            break
    body = "\n".join(lines[start:end])
    body = _WORLD_LIBRARY_NOTICE.sub("", body)
    return body.strip("\n")


# --- People's Daily 1998 (PKU tagged corpus) -------------------------------------------------

# `[中央/n  人民/n  广播/vn  电台/n]nt` marks a named entity made of several words.
_ENTITY_BRACKET = re.compile(r"\[([^\[\]]*)\][a-zA-Z]+")
_POS_TAG = re.compile(r"/[A-Za-z]+(?=\s|$)")
_DOC_ID = re.compile(r"(?:^|\s)\d{8}-\d{2}-\d{3}-\d{3}(?=\s|$)")
_LATIN_GAP = re.compile(r"(?<=[A-Za-z0-9])\s+(?=[A-Za-z0-9])")
_SPACES = re.compile(r"\s+")


def strip_pos_tags(line: str) -> str:
    """`迈向/v  充满/v  希望/n` -> `迈向充满希望`; entity brackets and article ids are dropped.

    Chinese words are joined without spaces; two neighbouring Latin/digit words keep one
    space between them so `Windows/nx 98/m` does not become `Windows98`.
    """
    line = _ENTITY_BRACKET.sub(r"\1", line)
    line = _POS_TAG.sub("", line)
    line = _DOC_ID.sub(" ", line)  # the 1998 corpus may open paragraphs with 19980101-01-001-001/m
    line = _LATIN_GAP.sub("\0", line.strip())
    return _SPACES.sub("", line).replace("\0", " ")


# --- MediaWiki markup ------------------------------------------------------------------------

_REDIRECT = re.compile(r"^\s*#\s*REDIRECT", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_DROP_BLOCKS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|templatedata)\b[^>]*>.*?</\1>",
    re.DOTALL | re.IGNORECASE,
)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_SKIP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:")
# Sections that are link lists and citations rather than prose.
_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
}  # fmt: skip


def is_redirect(text: str) -> bool:
    return bool(_REDIRECT.match(text))


def _strip_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced `{{...}}` / `{|...|}` blocks, nested to any depth, in one pass."""
    out, depth, last = [], 0, 0
    for match in re.finditer(re.escape(opener) + "|" + re.escape(closer), text):
        if match.group() == opener:
            if depth == 0:
                out.append(text[last : match.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                last = match.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def _replace_link(match: re.Match) -> str:
    target, label = match.group(1), match.group(2)
    low = target.strip().lower()
    if low.startswith(_SKIP_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", low):
        return ""  # images, categories and interlanguage links carry no prose
    return label if label is not None else target


def _strip_links(text: str) -> str:
    # Image captions may hold links themselves, so resolve inner links first, repeatedly.
    for _ in range(4):
        new = _LINK.sub(_replace_link, text)
        if new == text:
            break
        text = new
    # Leftover `[[File:...]]` whose caption had nested brackets
    return re.sub(r"\[\[(?:File|Image):[^\n]*?\]\]", "", text, flags=re.IGNORECASE)


def strip_mediawiki(text: str, keep_headings: bool = True) -> str:
    """MediaWiki source -> plain prose.

    Drops templates, tables, refs, comments, files, categories and citation sections; keeps
    link labels and heading lines (as `== Title ==` when keep_headings, else dropped).
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _strip_links(text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _HTML_TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")
    lines: list[str] = []
    dropping = False
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            title = heading.group(2).strip()
            dropping = title.lower() in _DROP_SECTIONS
            if not dropping and keep_headings and title:
                level = len(heading.group(1))
                lines.extend(["", "=" * level + " " + title + " " + "=" * level, ""])
            continue
        if dropping:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where templates were
        line = re.sub(r"[ \t]+([,.;:])", r"\1", line)  # " ," left where a template was
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        lines.append(line)
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return _drop_empty_sections(cleaned)


def _drop_empty_sections(text: str) -> str:
    """Remove heading lines whose section ended up with no prose."""
    blocks = text.split("\n\n")
    kept = []
    for i, block in enumerate(blocks):
        if _HEADING.match(block):
            nxt = next((b for b in blocks[i + 1 :] if b.strip()), None)
            nxt_heading = _HEADING.match(nxt) if nxt else None
            if nxt is None or (
                nxt_heading and len(nxt_heading.group(1)) <= len(_HEADING.match(block).group(1))
            ):
                continue
        kept.append(block)
    return "\n\n".join(kept)


def mediawiki_sections(text: str) -> list[tuple[int, str]]:
    """Split `strip_mediawiki` output into (heading level or 0 for prose, line) pairs."""
    out = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        heading = _HEADING.match(line)
        out.append((len(heading.group(1)), heading.group(2)) if heading else (0, line))
    return out


# --- WikiText tokenisation -------------------------------------------------------------------

# Undoing WikiText's spacing follows the rule set that MindFormers' wikitext preprocessing (and
# Megatron's detokenizer) apply: hyphens/commas/points inside numbers, punctuation spacing,
# bracket and quote padding, split-off clitics; written here as an ordered rule table.
_DETOKENIZE_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r" @([-,.])@ "), r"\1"),
    (re.compile(r"s ' "), "s' "),
    (re.compile(r" (['’](?:s|re|ve|m|ll|d|S|RE|VE|M|LL|D))\b"), r"\1"),
    (re.compile(r" (n't)\b"), r"\1"),
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r" ° "), "°"),
    (re.compile(r" {2,}"), " "),
]


def detokenize_wikitext(text: str) -> str:
    """`a role @-@ playing game , 1 @,@ 000 ( US )` -> `a role-playing game, 1,000 (US)`."""
    for pattern, repl in _DETOKENIZE_RULES:
        text = pattern.sub(repl, text)
    return text.strip()


_TOKENIZE_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"(?<=\w)-(?=\w)"), " @-@ "),
    (re.compile(r"(?<=\d),(?=\d)"), " @,@ "),
    (re.compile(r"(?<=\d)\.(?=\d)"), " @.@ "),
    (re.compile(r"(?<=\w)(['’](?:s|re|ve|m|ll|d))\b"), r" \1"),
    (re.compile(r"(?<=\w)(n't)\b"), r" \1"),
    (re.compile(r"([.,;:!?])(?=[\s\"')\]}]|$)"), r" \1 "),
    (re.compile(r"([%)\]}(\[{$\"])"), r" \1 "),
    (re.compile(r" {2,}"), " "),
]


def tokenize_wikitext(text: str) -> str:
    """Plain prose -> WikiText-style spacing (the inverse of `detokenize_wikitext`)."""
    for pattern, repl in _TOKENIZE_RULES:
        text = pattern.sub(repl, text)
    # "@ - @" markers must survive the punctuation split above
    text = text.replace("@ , @", "@,@").replace("@ . @", "@.@")
    return text.strip()


def wikitext_heading(level: int, title: str) -> str:
    """` = Title = ` for articles, ` = = Section = = ` for level 2, and so on."""
    marks = " ".join("=" * level)
    return f" {marks} {title} {marks} "


def top_level_title(line: str) -> str | None:
    """The article title if `line` is a WikiText ` = Title = ` heading, else None."""
    s = line.strip()
    if len(s) >= 5 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= ="):
        return s[2:-2].strip() or None
    return None


def section_heading(line: str) -> tuple[int, str] | None:
    """(level, title) for ` = = Section = = ` style headings (level >= 2), else None."""
    s = line.strip()
    match = re.match(r"^((?:= ){2,})(.*?)((?: =){2,})$", s)
    if not match:
        return None
    return match.group(1).count("="), match.group(2).strip()


def split_wikitext_articles(lines) -> Iterator[tuple[int, str | None, str]]:
    """WikiText `(line number, line)` pairs -> `(first line, title, text)` per article.

    Articles start at top-level ` = Title = ` headings (not ` = = Section = = `), as in
    MindFormers' wiki preprocessing. The text reads `Title`, a blank line, then one detokenised
    paragraph per line; a section title becomes its own line after a blank line. Text before
    the first title (a file without headings) is one untitled article. Empty text is "".
    """
    title, start, body = None, None, []
    for lineno, line in lines:
        new_title = top_level_title(line)
        if new_title is not None:
            if title is not None or body:
                yield start, title, _article_text(title, body)
            title, start, body = detokenize_wikitext(new_title), lineno, []
        elif line.strip():
            start = lineno if start is None else start
            section = section_heading(line)
            body += ["", detokenize_wikitext(section[1])] if section else [detokenize_wikitext(line)]
    if title is not None or body:
        yield start, title, _article_text(title, body)


def _article_text(title: str | None, body: list[str]) -> str:
    text = "\n".join(body).strip()
    if not text:
        return ""
    return f"{title}\n\n{text}" if title else text
