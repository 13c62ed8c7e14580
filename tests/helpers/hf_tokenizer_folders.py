"""Hugging Face tokenizer folders in the layouts real models ship (SmolLM2's, Llama's), trained on
a few lines so tests build them offline in milliseconds."""

import json
from pathlib import Path

TEXT = "the cat sat on the mat and the dog ran to the park. " * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_level_bpe(post_processor=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = post_processor or processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    return tok


def smollm2_style(folder: Path) -> Path:
    """SmolLM2's layout: ByteLevel post-processor, bos_token <|im_start|>, no add_bos_token."""
    folder.mkdir(parents=True, exist_ok=True)
    _byte_level_bpe().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "add_prefix_space": False, "model_max_length": 128}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def llama_style(folder: Path, add_bos_token=None) -> Path:
    """A `<s> $A` template post-processor (Llama's), with or without an explicit add_bos_token."""
    from tokenizers import processors

    folder.mkdir(parents=True, exist_ok=True)
    template = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    _byte_level_bpe(template).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
