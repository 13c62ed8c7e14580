"""Train a byte-level BPE tokenizer (MiniMind layout) and save a transformers-loadable folder."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError

PAD_UNK = "<|endoftext|>"  # id 0: padding and the (never used) unknown token
BOS = "<|im_start|>"  # id 1
EOS = "<|im_end|>"  # id 2
NUM_RESERVED = 8
SPECIAL_TOKENS = [PAD_UNK, BOS, EOS] + [f"<|reserved_{i}|>" for i in range(NUM_RESERVED)]
MODEL_MAX_LENGTH = 32768
# ChatML, the format MiniMind's chat models use; harmless for pretraining.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


MARKER_KIND = "tokenizer"  # the kind lmforge's output manifest records for `tokenizer train`


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _tokenizer_config() -> dict:
    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD_UNK,
        "unk_token": PAD_UNK,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def train_tokenizer(
    inputs,
    vocab_size: int,
    out_dir,
    fmt: str = "auto",
    text_field: str = "text",
    max_docs: int | None = None,
    strict: bool = False,
    stats=None,
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE of `vocab_size` ids (specials included) on the documents of
    `inputs` (streamed through `iter_documents`) and write tokenizer.json, tokenizer_config.json
    and special_tokens_map.json to `out_dir`. Ids 0/1/2 are <|endoftext|> (pad/unk),
    <|im_start|> (bos), <|im_end|> (eos), then reserved specials, as in MiniMind. The same input
    gives byte-identical files. Bad records are skipped, counted in `stats` (a `SourceStats`)
    and reported on stderr, or raise `DataError` when `strict`. A non-empty `out_dir` that this
    function did not write (no lmforge manifest of kind "tokenizer") is refused unless `overwrite`; nothing in it is
    deleted; files are written to a temporary sibling and moved in when complete. Returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.data.sources import SourceStats, iter_documents

    minimum = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise LmforgeError(
            f"vocab_size {vocab_size}: a byte-level BPE needs at least {minimum} ids "
            f"(256 bytes + {len(SPECIAL_TOKENS)} specials); use e.g. 6400"
        )
    if max_docs is not None and max_docs < 1:
        raise LmforgeError(f"max_docs {max_docs}: must be >= 1 (or None for all documents)")
    from lmforge.weights.outdir import check_output_dir, output_dir, written_by_lmforge

    out = Path(out_dir)
    # A folder an earlier `tokenizer train` wrote is ours to retrain into; any other non-empty
    # folder needs --overwrite, and even then no file lmforge did not write is replaced.
    overwrite = overwrite or bool(written_by_lmforge(out, kind=MARKER_KIND))
    check_output_dir(out, overwrite)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0
    stats = stats if stats is not None else SourceStats()

    def texts():
        nonlocal count
        docs = iter_documents(inputs, fmt=fmt, text_field=text_field, strict=strict, stats=stats)
        for doc in itertools.islice(docs, max_docs):
            count += 1
            yield doc.text

    tok.train_from_iterator(texts(), trainer=trainer)
    if count == 0:
        raise LmforgeError(f"{inputs}: no documents to train a tokenizer on; check the input paths")
    if stats.total_skipped or stats.empty_files:  # silent skips would hide a wrong --text-field
        print(f"tokenizer train: {stats.summary()}", file=sys.stderr)
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:  # a layout MiniMind checkpoints rely on
            raise RuntimeError(f"special token {special} got id {tok.token_to_id(special)}, expected {i}")

    with output_dir(out, overwrite=overwrite, kind=MARKER_KIND) as tmp:
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config())
        _write_json(
            tmp / "special_tokens_map.json",
            {
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD_UNK,
                "unk_token": PAD_UNK,
                "additional_special_tokens": SPECIAL_TOKENS[3:],
            },
        )
        tok.save(str(tmp / "tokenizer.json"), pretty=True)
    return out
