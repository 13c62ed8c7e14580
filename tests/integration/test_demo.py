"""The demo pipeline end to end on a small local corpus (no network), and its packaged config."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

import lmforge
from lmforge import demo
from lmforge.config import load_yaml
from lmforge.demo import DEMO_YAML, demo_config_tree, format_table, run_demo
from lmforge.errors import LmforgeError

WORDS = [
    "the",
    "river",
    "flows",
    "past",
    "the",
    "old",
    "mill",
    "and",
    "the",
    "miller",
    "sings",
    "of",
    "bread",
    "and",
    "rain",
    "while",
    "children",
    "run",
    "along",
    "the",
    "bank",
    "with",
    "kites",
    "in",
    "the",
    "wind",
    "the",
    "king",
    "rode",
    "north",
    "to",
    "the",
    "castle",
    "where",
    "his",
    "daughter",
    "waited",
    "by",
    "the",
    "fire",
    "reading",
    "letters",
    "from",
    "the",
    "sea",
]


def write_corpus(path, docs=400, seed=0):
    """A corpus with real structure (repeated phrases) so a few dozen steps can learn something."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            start = rng.randrange(len(WORDS) - 12)
            text = " ".join(WORDS[start : start + rng.randrange(8, 30)]) + ". 河水流过老磨坊。"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def test_demo_config_is_the_packaged_yaml_and_the_repository_links_to_it():
    assert DEMO_YAML.is_relative_to(Path(lmforge.__file__).parent)  # package data: installs have it
    assert demo_config_tree() == load_yaml(DEMO_YAML) and demo_config_tree()["model"]["vocab_size"] == 6400
    repo_copy = Path(lmforge.__file__).parents[1] / "configs" / "demo.yaml"
    assert repo_copy.resolve() == DEMO_YAML.resolve()  # one file, not two copies
    assert not hasattr(demo, "EMBEDDED_CONFIG")


def test_demo_refuses_to_replace_a_run_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "demo" / "train"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(LmforgeError, match="not an lmforge run folder"):
        run_demo(out_dir=tmp_path / "demo", inputs=[str(tmp_path / "missing.txt")], quick=True)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_demo_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    result = run_demo(out_dir=tmp_path / "demo", inputs=[str(corpus)], workers=2, quick=True)
    printed = capsys.readouterr().out

    assert result["val_ppl_after"] < result["val_ppl_before"] / 3
    assert result["tokens"] == result["steps"] * 8 * 64 > 0
    assert "val perplexity" in printed and "hf export" in printed and "中国的" in printed
    paths = result["paths"]
    for key in ("tokenizer", "data", "run", "checkpoint", "hf_export"):
        assert (tmp_path / "demo").resolve() in (tmp_path / paths[key]).resolve().parents, key
    assert (tmp_path / "demo" / "data" / "meta.json").is_file()
    assert (tmp_path / "demo" / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "demo" / "train" / "metrics.jsonl").is_file()

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["hf_export"])
    assert (
        model.config.vocab_size == load_yaml(DEMO_YAML)["model"]["vocab_size"]
        or model.config.vocab_size > 256
    )
    tok = transformers.AutoTokenizer.from_pretrained(paths["hf_export"])
    assert tok.decode(tok.encode("the river", add_special_tokens=False)) == "the river"

    # A second run reuses the folders and trains from scratch again.
    again = run_demo(out_dir=tmp_path / "demo", inputs=[str(corpus)], workers=1, quick=True, max_steps=3)
    assert again["steps"] == 3


def test_format_table_lists_every_figure():
    table = format_table(
        {
            "tokens": 1000,
            "steps": 10,
            "train_loss_first": 8.7,
            "train_loss": 4.2,
            "val_loss_before": 8.8,
            "val_loss_after": 4.5,
            "val_ppl_before": 6600.0,
            "val_ppl_after": 90.0,
            "val_tokens": 500,
            "tokens_per_s": 1234.5,
            "train_seconds": 50.0,
            "wall_seconds": 80.0,
            "paths": {"run": "runs/demo/train", "hf_export": "runs/demo/hf"},
        }
    )
    assert "6600.0 -> 90.0 (73.3x lower)" in table
    assert "8.700 -> 4.200" in table and "1,234" in table and "80 s total" in table
    assert re.search(r"^hf export +\| runs/demo/hf$", table, re.M)
