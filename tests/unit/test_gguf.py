"""GGUF export and import: transformers' own GGUF loader as the independent reader, bit-exact
re-import, quantisation error bounds, the embedded tokenizer, and GGUFs written without lmforge."""

import json
import math

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.interop.gguf_export import export_gguf
from lmforge.interop.gguf_import import import_gguf, import_gguf_to_folder
from lmforge.interop.gguf_pretok import LLAMA3 as LLAMA3_SPLIT
from lmforge.interop.gguf_pretok import QWEN2 as QWEN2_SPLIT
from lmforge.model import Transformer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

from gguf_case import SCALING, TEXT, VOCAB, corpus_lines, gguf_test_model, train_test_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_test_tokenizer(tmp_path_factory.mktemp("tok"))


def _hf_from_gguf(folder, name, cfg):
    kwargs = {}
    if cfg.qk_norm:
        # transformers' qwen3 GGUF mapping drops attention.key_length (it assumes Qwen3's 128).
        kwargs["head_dim"] = cfg.resolved_head_dim
    if cfg.rope_scaling is not None:
        # transformers ignores llama.cpp's rope_freqs tensor; the scaling is checked against
        # llama.cpp's formula in test_rope_freqs_follow_llama_cpp instead.
        kwargs["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            **cfg.rope_scaling.model_dump(),
        }
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, dtype=torch.float32, **kwargs
    ).eval()


CASES = [  # (qk_norm, kv_heads, tied, rope scaling)
    (False, 4, True, None),
    (False, 1, False, SCALING),
    (False, 1, True, SCALING),
    (True, 4, False, None),
    (True, 1, True, None),
]


@pytest.mark.parametrize("qk_norm,kv_heads,tied,scaling", CASES)
def test_f32_round_trip_through_transformers(tmp_path, tokenizer_dir, qk_norm, kv_heads, tied, scaling):
    model, cfg = gguf_test_model(qk_norm, kv_heads, tied, scaling)
    path = export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf")
    hf = _hf_from_gguf(tmp_path, "m.gguf", cfg)
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    state, cfg_back, files = import_gguf(path)
    assert cfg_back == cfg
    expected = model.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], value), name
    assert set(files) == {"tokenizer.json", "tokenizer_config.json"}


def test_rope_freqs_follow_llama_cpp(tmp_path, tokenizer_dir):
    """rope_freqs as llama.cpp's converter computes it for Llama 3.1 (scalar Python arithmetic)."""
    model, cfg = gguf_test_model(False, 1, True, SCALING)
    path = export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    s, dim = SCALING, cfg.resolved_head_dim
    want = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / cfg.rope_theta ** (i / dim))
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            want.append(1.0)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            want.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            want.append(1 / ((1 - smooth) / s.factor + smooth))
    np.testing.assert_allclose(np.asarray(freqs), np.asarray(want, dtype=np.float32), rtol=1e-6)


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_exports_reimport_exactly(tmp_path, tokenizer_dir, dtype, torch_dtype):
    model, cfg = gguf_test_model(True, 1, False, None)
    state, _, _ = import_gguf(export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf", dtype=dtype))
    for name, value in model.state_dict().items():
        want = value if value.ndim == 1 else value.to(torch_dtype)  # norms stay f32 as in llama.cpp
        assert state[name].dtype == want.dtype and torch.equal(state[name], want), name


# Stated tolerances: worst relative Frobenius error of any weight tensor, and max logit error over
# the logits' std, on this tiny random model. Measured: q8_0 0.0055 / 0.037, q5_1 0.038 / 0.24,
# q5_0 0.044 / 0.30, q4_1 0.080 / 0.62, q4_0 0.089 / 0.57 (bounds ~1.4x that).
QUANT_BOUNDS = {
    "q8_0": (0.008, 0.06),
    "q5_1": (0.055, 0.35),
    "q5_0": (0.062, 0.43),
    "q4_1": (0.11, 0.87),
    "q4_0": (0.125, 0.8),
}


@pytest.mark.parametrize("dtype", list(QUANT_BOUNDS))
def test_quantised_exports_reimport_within_tolerance(tmp_path, tokenizer_dir, dtype):
    model, cfg = gguf_test_model(False, 1, False, None)
    path = export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf", dtype=dtype)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # 80 columns: not a multiple of the 32-wide block
    # As llama-quantize: the logit-making tensor keeps 8 bits; an untied embedding takes the type.
    assert kinds["output.weight"] == "Q8_0" and kinds["token_embd.weight"] == dtype.upper()
    tied, tied_cfg = gguf_test_model(False, 1, True, None)
    tied_path = export_gguf(tied, tied_cfg, tokenizer_dir, tmp_path / "tied.gguf", dtype=dtype)
    tied_kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tied_path)).tensors}
    assert tied_kinds["token_embd.weight"] == "Q8_0" and "output.weight" not in tied_kinds
    state, cfg_back, _ = import_gguf(path)
    assert cfg_back == cfg
    weight_bound, logit_bound = QUANT_BOUNDS[dtype]
    for name, value in model.state_dict().items():
        err = (state[name] - value).norm() / value.norm()
        assert err < weight_bound, (name, err.item())
    back = Transformer(cfg).eval()
    back.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids).logits, back(ids).logits
    assert ((ours - theirs).abs().max() / ours.std()).item() < logit_bound


def _train_split_tokenizer(folder, regex, ignore_merges=False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    folder.mkdir()
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = ignore_merges  # Llama-3's tokenizer.json sets it
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smaug-bpe", "qwen2"])
def test_embedded_tokenizer_encodes_like_ours(tmp_path, tokenizer_dir, pre):
    from lmforge.tokenizer import load_tokenizer

    if pre == "gpt-2":
        src = tokenizer_dir
    else:
        regex = QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT
        src = _train_split_tokenizer(tmp_path / "src", regex, ignore_merges=pre == "llama-bpe")
    model, cfg = gguf_test_model(False, 1, True, None)
    path = export_gguf(model, cfg, src, tmp_path / "m.gguf")
    meta = {
        k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer")
    }
    assert meta["tokenizer.ggml.pre"] == pre and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1
    assert len(meta["tokenizer.ggml.tokens"]) == VOCAB  # padded with llama.cpp's [PAD] fillers
    ours = load_tokenizer(src)
    out = import_gguf_to_folder(path, tmp_path / "imported")
    back = load_tokenizer(out)
    rebuilt = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert rebuilt["model"]["ignore_merges"] == (pre == "llama-bpe")  # as llama.cpp treats each name
    want = ours.encode(TEXT)
    assert len(want) > 30 and back.encode(TEXT) == want
    assert (back.bos_id, back.eos_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    # transformers' independent GGUF tokenizer reader agrees on the ids too.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == want
    if pre != "gpt-2":
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for m")


def test_refusals_are_one_line(tmp_path, tokenizer_dir):
    model, cfg = gguf_test_model(False, 1, True, None)
    bad = [
        (cfg.model_copy(update={"attention_bias": True}), "biases"),
        (cfg.model_copy(update={"qk_norm": True, "rope_scaling": SCALING}), "rope frequency factors"),
    ]
    for bad_cfg, words in bad:
        with pytest.raises(LmforgeError, match=words) as err:
            export_gguf(model.state_dict(), bad_cfg, tokenizer_dir, tmp_path / "x.gguf")
        assert "\n" not in str(err.value)
    with pytest.raises(LmforgeError, match="not supported"):
        export_gguf(model, cfg, tokenizer_dir, tmp_path / "x.gguf", dtype="q2_k")
    path = export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf")
    with pytest.raises(LmforgeError, match="already exists"):
        export_gguf(model, cfg, tokenizer_dir, path)
    assert not list(tmp_path.glob("*.tmp-*"))
    data = path.read_bytes()
    for cut, words in ((len(data) - 100, "past the end"), (200, "incomplete")):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(LmforgeError, match=words):
            import_gguf(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(LmforgeError, match="not a readable GGUF"):
        import_gguf(tmp_path / "junk.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LmforgeError, match="architecture 'gpt2' is not supported"):
        import_gguf(tmp_path / "gpt2.gguf")


def test_sentencepiece_tokenizer_embeds_and_comes_back(tmp_path):
    """A Llama-2-style SentencePiece BPE (byte fallback, dummy prefix) as llama.cpp's 'llama' vocab."""
    import sentencepiece as spm

    from lmforge.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=480,
        normalization_rule_name="identity",  # as Llama-2's: llama.cpp applies no NFKC table
        remove_extra_whitespaces=False,  # as Llama-2's: llama.cpp keeps repeated spaces
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    src = tmp_path / "sp"
    src.mkdir()
    (tmp_path / "tokenizer.model").rename(src / "tokenizer.model")
    cfg = ModelConfig(
        vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64
    )
    path = export_gguf(Transformer(cfg), cfg, src, tmp_path / "m.gguf")
    meta = {
        k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer")
    }
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    ours = load_tokenizer(src)
    text = TEXT + " 𝔘nknown ✓"  # characters outside the vocabulary take the byte fallback
    want = ours.encode(text)
    assert any(ours.decode([i]).startswith("<0x") or i in range(3, 259) for i in want)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == want
    out = import_gguf_to_folder(path, tmp_path / "back")
    back = load_tokenizer(out)
    assert (out / "tokenizer.model").is_file() and back.encode(text) == want
    assert (back.bos_id, back.eos_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, None)
    # sentencepiece's default normaliser (NFKC, extra spaces removed) has no llama.cpp equivalent.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(LmforgeError, match="remove_extra_whitespaces"):
        export_gguf(Transformer(cfg), cfg, tmp_path / "bad", tmp_path / "bad.gguf")


def test_config_values_float32_cannot_hold_come_back_exactly(tmp_path, tokenizer_dir):
    model, cfg = gguf_test_model(True, 1, True, None)
    cfg = cfg.model_copy(update={"rope_theta": 123456.7, "norm_eps": 1.234567e-6, "init_std": 0.0123})
    _, back, _ = import_gguf(export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf", dtype="f16"))
    assert back == cfg


def _layout(folder, pre_tokenizer, normalizer=None, ignore_merges=False):
    """A byte-level BPE tokenizer.json with the given pre-tokenizer layout and a byte vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[], ignore_merges=ignore_merges)
    )
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.add_special_tokens(["<|endoftext|>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def test_export_names_a_tokenizer_by_what_it_does_not_its_json(tmp_path):
    """Equivalent layouts get llama.cpp's name (SmolLM2's Digits + ByteLevel is 'smollm'); a
    tokenizer llama.cpp would split differently is refused in one line."""
    from tokenizers import Regex, normalizers
    from tokenizers import pre_tokenizers as pt

    from lmforge.interop.gguf_pretok import GPT2
    from lmforge.interop.gguf_vocab import gguf_vocab

    bytelevel = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    adapted = LLAMA3_SPLIT.replace(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    )
    cases = {
        "smollm": _layout(tmp_path / "a", pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])),
        "gpt-2": _layout(tmp_path / "b", pt.Sequence([pt.Split(Regex(GPT2 + r"|\s+"), "isolated"), bytelevel])),
        "llama-bpe": _layout(tmp_path / "c", pt.Sequence([pt.Split(Regex(adapted), "isolated"), bytelevel]), ignore_merges=True),
        "smaug-bpe": _layout(tmp_path / "d", pt.Sequence([pt.Split(Regex(adapted), "isolated"), bytelevel])),
        "qwen2": _layout(tmp_path / "e", pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), "isolated"), bytelevel]), normalizers.NFC()),
    }  # fmt: skip
    for name, folder in cases.items():
        assert gguf_vocab(folder, 512)["pre"] == name
    lowercase = _layout(tmp_path / "f", pt.ByteLevel(add_prefix_space=False), normalizers.Lowercase())
    prefixed = _layout(tmp_path / "g", pt.ByteLevel(add_prefix_space=True))
    for folder in (lowercase, prefixed):
        with pytest.raises(
            LmforgeError, match="splits text unlike every pre-tokenizer llama.cpp names"
        ) as err:
            gguf_vocab(folder, 512)
        assert "\n" not in str(err.value)


def test_k_quant_without_llama_cpp_python_is_one_line_naming_the_extra(tmp_path, tokenizer_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    model, cfg = gguf_test_model(False, 1, True, None)
    with pytest.raises(LmforgeError, match=r"pip install 'lmforge\[llamacpp\]'") as err:
        export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf", dtype="q4_k_m")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())
