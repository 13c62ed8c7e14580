"""llama.cpp's named BPE pre-tokenizers (`tokenizer.ggml.pre`) as `tokenizers` pre-tokenizers, and
the name a `tokenizer.json` gets on export.

llama.cpp does not run `tokenizer.json`: each name stands for a fixed list of split regexes applied
one after the other (each match and each stretch between matches becomes its own piece, which is
`tokenizers`' Split with behavior "isolated"), GPT-2's byte-to-unicode mapping, and for a few names
a whole-piece vocabulary lookup before merging (`ignore_merges`). The facts below (names, regexes,
flags) are llama.cpp's (src/llama-vocab.cpp, src/unicode.cpp at commit 0c1e570); where llama.cpp
runs a hand-written splitter for a regex (GPT-2, Llama-3, Qwen2, Qwen3.5, Kimi-K2, AFMoE digits)
we write the regex that splitter implements, and where it runs std::regex on a rewritten regex we
write the rewritten one, since that is what it executes (including its quirks: Kimi-K2's letters
without marks, DeepSeek's ranges that skip the spaces llama.cpp rewrites to U+000B).
tests/integration/test_gguf_llamacpp.py checks every name against llama.cpp's own tokenizer.

Export names a tokenizer as llama.cpp's converter does, by what it does to a fixed text: first
the converter's own hash table (ids of CHK_TXT, so a real model's tokenizer gets the exact name
llama.cpp gives it), then, for vocabularies not in that table (anything trained with lmforge),
the name whose splits equal the tokenizer's own on that text.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from lmforge.errors import LmforgeError
from lmforge.interop.gguf_chkhsh import CHK_TXT, CHKHSH

# llama.cpp's rewrite of the (?i:'s|...) contraction group, which std::regex cannot parse.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_CPP = _CONTRACTIONS + QWEN2[len(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)") :]
_DS3_MAIN = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER_THEN_LOWER = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+<C>"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*<C>"
)
_AYA_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Digits in groups of three counted from the right (1234567 -> 1 234 567): llama.cpp's AFMoE splitter.
_DIGITS_FROM_RIGHT = r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"
# llama.cpp's Kimi-K2 splitter (what it runs, not tokenization_kimi.py's regex): letters are \p{L}
# without Han and without marks (a mark falls to the punctuation rule), no upper/lower distinction.
_KIMI_K2 = (
    r"\p{Han}+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek's explicit ranges run in std::wregex on text whose non-ASCII whitespace llama.cpp has
# replaced by U+000B, so a range that spans U+3000 or U+2000-U+200A never matches those spaces.
_DS_CJK = "[[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]&&[^\\s]]+"


class Pre(NamedTuple):
    """One llama.cpp pre-tokenizer type: its split regexes (None: the GPT-2 regex built into
    `tokenizers`' ByteLevel) and whether whole pieces found in the vocabulary skip merging."""

    regexes: tuple[str, ...] | None
    ignore_merges: bool = False


# llama.cpp names that share one pre-tokenizer type; the first name of each is what export writes
# when only the splits identify the tokenizer (the one llama.cpp also detokenizes like HF).
# fmt: off
PRE_TYPES: list[tuple[tuple[str, ...], Pre]] = [
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
      "mellum", "modern-bert", "exaone4", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo",
      "jais", "trillion", "granite-docling"), Pre(None)),
    (("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
      "jina-v5-nano", "glm4", "glm5"), Pre((LLAMA3,), True)),
    (("smaug-bpe", "dbrx", "chatglm-bpe"), Pre((LLAMA3,))),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
     Pre((QWEN2,))),
    (("qwen35",), Pre((
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
        r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",))),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
     Pre((r"\p{N}", GPT2))),
    (("default",), Pre((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
    (("falcon",), Pre((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"))),
    (("jais-2",), Pre((
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
        r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",))),
    (("deepseek-llm",), Pre((
        r"[\r\n]",
        "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
        "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
        "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
        "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
        "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-"
        "\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
        "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d"
        "\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
        "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
        "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
        "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
        "\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]&&[^\\s]]+",
        r"\s+$",
        _DS_CJK,
        r"\p{N}+"))),
    (("deepseek-coder",), Pre((r"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", _DS_CJK, "\\p{N}"))),
    (("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"),
     Pre(("\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DS3_MAIN))),
    (("spark2_5",), Pre((
        "\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        _DS3_MAIN.replace(r"[\r\n]*|\s*[\r\n]+", r"|[\r\n]"), r"\p{N}"))),
    (("youtu",), Pre((
        "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        _AYA_WORDS.replace(r"\p{N}{1,3}|", r"\p{N}|"),
    ), True)),
    (("poro-chat", "bloom", "gpt3-finnish"), Pre((" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",))),
    (("viking",), Pre((" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+", "\\p{N}"))),
    (("tekken",), Pre((
        _UPPER_THEN_LOWER.replace("<C>", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ), True)),
    (("chameleon",), Pre((
        r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]", GPT2))),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), Pre((
        _UPPER_THEN_LOWER.replace("<C>", _CONTRACTIONS + "?")
        + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",))),
    (("granite-embed-multi-97m",), Pre((
        _UPPER_THEN_LOWER.replace("<C>", _CONTRACTIONS + "?").replace(r"(?=[\p{L}])", r"(?=[\p{L}\p{M}])")
        + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",), True)),
    (("tiny_aya", "cohere2moe"), Pre((_DIGITS_FROM_RIGHT, _AYA_WORDS))),
    (("kimi-k2",), Pre((_KIMI_K2,))),
    (("superbpe",), Pre((r"\p{N}+", r"[0-9]{1,3}(?=(?:[0-9]{3})*(?![0-9]))"))),
    (("bailingmoe", "bailingmoe2", "llada-moe"), Pre((
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",))),
    (("seed-coder",), Pre((
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",))),
    (("ufakzeka",), Pre((
        r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",))),
    (("grok-2",), Pre((_QWEN2_CPP,))),
    (("afmoe",), Pre((
        _DIGITS_FROM_RIGHT,
        "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+",
        _DS3_MAIN))),
    (("laguna",), Pre((r"[^\n]+|[\n]+", _QWEN2_CPP))),
    (("exaone-moe",), Pre((
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",))),
    (("minicpm5",), Pre((
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"), True)),
]
# fmt: on
PRE_TOKENIZERS: dict[str, Pre] = {name: pre for names, pre in PRE_TYPES for name in names}
# Names llama.cpp knows that a byte-level BPE tokenizer.json cannot stand for -> (why, nearest).
_SPM_STYLE = "llama.cpp runs it on raw UTF-8 without GPT-2's byte mapping, unlike byte-level BPE"
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "gemma4": (_SPM_STYLE + " (spaces as U+2581)", "llama (SentencePiece)"),
    "granite-embed-multi-311m": (_SPM_STYLE + " (spaces as U+2581)", "llama (SentencePiece)"),
    "sarvam-moe": (_SPM_STYLE + " (spaces as U+2581)", "llama (SentencePiece)"),
    "whitespace": (_SPM_STYLE + ", split at whitespace only", "gpt-2"),
}


def supported_names() -> list[str]:
    return list(PRE_TOKENIZERS)


def pre_tokenizer(name: str, source: str):
    """The `tokenizers` pre-tokenizer llama.cpp's `name` describes, or a one-line refusal."""
    from tokenizers import Regex, pre_tokenizers

    why = UNSUPPORTED.get(name)
    if why is not None or name not in PRE_TOKENIZERS:
        reason, nearest = why or ("llama.cpp does not know it either", "gpt-2")
        raise LmforgeError(
            f"{source}: tokenizer.ggml.pre '{name}' is not supported ({reason}); the nearest "
            f"supported name is '{nearest}' (all: lmforge/interop/gguf_pretok.py)"
        )
    regexes = PRE_TOKENIZERS[name].regexes
    if regexes is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


# The text a tokenizer's splits are compared on: llama.cpp's own test text plus digits, code,
# scripts with combining marks and the whitespace runs the names treat differently.
FINGERPRINT_TEXT = CHK_TXT + (
    "\n12345678901 1,234,567.89 ٣٤٥ ½ x²\n\tdef f(a, b):\r\n        return a**2 // b  # ok\n"
    "Ünïcödé naïve CAFÉ Éclair ǅemal ΑΒΓ αβγ Привет МИР 日本語のテキスト。한국어 ไทย हिन्दी العربية\n"
    "<sentinel:12> IMGIMGABZ don't DON'T they'RE\u00a0nbsp\u3000ideographic " + " " * 40 + "end\n\n\n"
)


def _splits(tokenizer: Any) -> list[str] | None:
    text = FINGERPRINT_TEXT
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    if tokenizer.pre_tokenizer is None:
        return None
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def pre_name(tokenizer: Any, hint: str | None = None) -> str | None:
    """llama.cpp's name for a loaded `tokenizers.Tokenizer` (byte-level BPE), or None: its
    converter's hash of CHK_TXT's ids first, else the name (`hint` first, e.g. the one a GGUF
    import recorded) whose splits of FINGERPRINT_TEXT and ignore_merges equal the tokenizer's."""
    from tokenizers import Tokenizer

    chkhsh = hashlib.sha256(str(tokenizer.encode(CHK_TXT).ids).encode()).hexdigest()
    if CHKHSH.get(chkhsh) in supported_names():
        return CHKHSH[chkhsh]
    ours = _splits(tokenizer)
    ignore = bool(getattr(tokenizer.model, "ignore_merges", False))
    candidates = ([hint] if hint in PRE_TOKENIZERS else []) + [names[0] for names, _ in PRE_TYPES]
    probe = Tokenizer.from_str(tokenizer.to_str())  # a copy whose pre-tokenizer we swap
    probe.normalizer = None
    for name in candidates:
        if PRE_TOKENIZERS[name].ignore_merges != ignore:
            continue
        probe.pre_tokenizer = pre_tokenizer(name, "")
        if _splits(probe) == ours:
            return name
    return None
