"""`prepare --format wikitext` against MindFormers' llama_preprocess.py: the committed rows it wrote for
tests/fixtures/wikitext/excerpt.tokens with tokenizer.model (MindFormers 1.9.0 + MindSpore 2.9.0,
tests/fixtures/wikitext/make_expected.py), compared token for token."""


import numpy as np
from paths import FIXTURES

from lmforge.data.prepare import prepare_dataset
from lmforge.data.sources import iter_documents
from lmforge.data.token_dataset import TokenDataset
from lmforge.data.wikitext import clean_mindformers, mindformers_paragraphs
from lmforge.tokenizer import load_tokenizer

FIX = FIXTURES / "wikitext"


def test_prepare_wikitext_equals_llama_preprocess_token_for_token(tmp_path):
    expected = np.load(FIX / "expected_seq64.npy")  # [rows, seq_length + 1]
    assert expected.shape == (55, 65)
    prepare_dataset([FIX / "excerpt.tokens"], FIX / "tokenizer.model", tmp_path, val_fraction=0, progress=False)
    ds = TokenDataset.open(tmp_path, "train")
    stream = ds.tokens(0, ds.num_tokens).astype(np.int64)
    flat = expected.reshape(-1)
    # MindFormers cuts the same stream into rows and drops the last partial row.
    assert np.array_equal(stream[: flat.size], flat)
    assert 0 <= stream.size - flat.size < 65
    # One BOS ... EOS document per paragraph, headings (every level) dropped.
    paragraphs = list(mindformers_paragraphs((FIX / "excerpt.tokens").read_text(encoding="utf-8")))
    assert ds.num_docs == len(paragraphs) == int((stream == 1).sum()) == int((stream == 2).sum())
    assert all(not p.strip().startswith("=") for _, p in paragraphs)


def test_mindformers_clean_up_rules():
    text = " = Title = \n \n The station 's keepers ' quarters ( 1 @,@ 200 acres ) , \" quoted \" . \n \n = = Part = = \n \n N 2 ° C \n"
    # Expected strings are what MindFormers' clean_wikitext returns for the same input.
    cleaned = clean_mindformers(text)
    assert cleaned == ' = Title =\n\nThe station\'s keepers\' quarters (1,200 acres), "quoted".\n\n== Part ==\n\nN 2°C\n'
    assert [p for _, p in mindformers_paragraphs(text)] == [
        'The station\'s keepers\' quarters (1,200 acres), "quoted".',
        "N 2°C\n",
    ]
    # Brackets pair across lines, so paragraphs can merge: the reason the rule reads whole files.
    assert clean_mindformers(" a ( \n \n c ) d \n") == " a (c) d\n"


def test_wikitext_is_the_mindformers_rule_and_articles_stay_available(tmp_path):
    path = tmp_path / "wiki.train.tokens"
    path.write_text(" = A = \n \n First para . \n \n = = S = = \n \n Second para . \n", encoding="utf-8")
    assert [d.text for d in iter_documents(path)] == ["First para.", "Second para.\n"]
    assert [d.text for d in iter_documents(path, fmt="wikitext-articles")] == ["A\n\nFirst para.\n\nS\nSecond para."]


def test_sentencepiece_encodes_special_piece_text_as_ids_like_llama_tokenizer():
    tok = load_tokenizer(FIX / "tokenizer.model")
    plain = tok.encode("a") + tok.encode(" b")
    assert tok.encode("a<unk> b") == tok.encode("a") + [0] + tok.encode(" b")
    assert tok.encode("</s>x<s>") == [2] + tok.encode("x") + [1]
    assert tok.encode_batch(["a b", "<unk>", "a<unk> b"]) == [tok.encode("a b"), [0], tok.encode("a<unk> b")]
    assert plain != tok.encode("a b")  # sanity: pieces around a special are encoded separately
