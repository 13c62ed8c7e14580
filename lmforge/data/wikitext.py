"""WikiText files read as MindFormers' `llama_preprocess.py --dataset_type wiki` reads them, so that
`lmforge prepare --format wikitext` writes the token stream of the MindFormers guide's data step.

The rule (MindFormers 1.9.0's `clean_wikitext` and `tokenize_wiki`):
1. the WHOLE file is cleaned at once by the ordered substitutions of `_MINDFORMERS_RULES` (some of
   them pair brackets and quotes across lines, so a file cannot be cleaned line by line);
2. the cleaned text is split at every "\\n\\n"; a piece is a paragraph unless it is empty or,
   stripped, starts with "=" (headings of every level are dropped);
3. each paragraph, exactly as split (inner and edge newlines kept), is one document: BOS +
   tokens + EOS, paragraphs back to back (lmforge's prepare adds BOS/EOS to every document).
MindFormers then cuts the stream into rows of seq_length + 1 tokens and drops the last partial
row; lmforge's loader reads the stream in windows of seq_len + 1 (see README).

Memory: a file is read whole (as MindFormers does): about three times its size at the peak.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# MindFormers' clean_wikitext as an ordered table: (pattern, replacement, is_regex). The order matters
# (e.g. " @-@ " is joined before " . " is closed up, "= = = =" before "= =").
_MINDFORMERS_RULES: list[tuple[str, str, bool]] = [
    ("s '", "s'", False),  # plural possessive
    (r"/' [0-9]/", r"/'[0-9]/", True),  # as in MindFormers: a literal pattern that matches "/' 5/" only
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^)]*?)\s*\)", r"(\1)", True),  # pairs may span lines: the whole file at once
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),  # Penn Treebank's number token
    (" 's", "'s", False),
]
_COMPILED = [(re.compile(p) if is_re else p, r, is_re) for p, r, is_re in _MINDFORMERS_RULES]


def clean_mindformers(text: str) -> str:
    """MindFormers' WikiText clean-up of a whole file's text (rules in `_MINDFORMERS_RULES`)."""
    for pattern, repl, is_re in _COMPILED:
        text = pattern.sub(repl, text) if is_re else text.replace(pattern, repl)
    return text


def mindformers_paragraphs(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line in the cleaned text, paragraph) for each paragraph MindFormers tokenizes."""
    line = 1
    for piece in clean_mindformers(text).split("\n\n"):
        if piece and not piece.strip().startswith("="):
            yield line, piece
        line += piece.count("\n") + 2
