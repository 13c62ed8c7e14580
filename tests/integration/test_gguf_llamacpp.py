"""GGUF against llama.cpp itself (llama-cpp-python, which .ci/llamacpp installs): every supported
pre-tokenizer name tokenizes like llama.cpp, export -> import -> export is byte-identical, a
SmolLM2-style Hugging Face folder runs in llama.cpp with transformers' greedy text, and K-quant /
4-bit exports are as close to f32 as llama.cpp's own quantiser makes them."""

import importlib
import json
import os

import numpy as np
import pytest
import torch


def _required(name):
    """Skipped where llama.cpp is not installed, except in CI (CI=true), where .ci/llamacpp has
    installed it and a missing module fails the run instead of hiding these tests."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"no {name}: bash .ci/llamacpp .venv installs llama.cpp")


gguf = _required("gguf")
llama_cpp = _required("llama_cpp")
transformers = _required("transformers")

from gguf_case import train_test_tokenizer  # noqa: E402

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf, import_gguf_to_folder  # noqa: E402
from lmforge.interop.gguf_pretok import (  # noqa: E402
    FINGERPRINT_TEXT,
    UNSUPPORTED,
    supported_names,
)
from lmforge.interop.gguf_quantize import llama_quantize  # noqa: E402
from lmforge.interop.gguf_reader import read_gguf  # noqa: E402
from lmforge.interop.gguf_vocab import gguf_vocab, tokenizer_files_from_gguf, write_vocab  # noqa: E402
from lmforge.model import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
# Multilingual, code, digits and whitespace; none of it an added token's text.
TEST_TEXT = FINGERPRINT_TEXT + "\n\n  x = [1, 22, 333, 4444];\tprint(f'{x!r}')  \n日本 1999年 ١٢٣ 𝟙𝟚 ﬁ ǈ ß"


def _corpus():
    lines = TEST_TEXT.splitlines()
    return [" ".join(lines[i : i + 3]) for i in range(len(lines))] * 3


@pytest.fixture(scope="module")
def vocab():
    """A byte-level BPE trained with no pre-tokenizer splits, so its merges cross every boundary a
    name might split at: a wrong split shows up as different ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    spec = json.loads(tok.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def _write_vocab_gguf(path, vocab: dict):
    """A vocabulary-only GGUF (llama hyperparameters so llama.cpp loads it, no tensors)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (writer.add_context_length, 64),
        (writer.add_embedding_length, 64),
        (writer.add_block_count, 1),
        (writer.add_feed_forward_length, 64),
        (writer.add_head_count, 4),
        (writer.add_head_count_kv, 4),
    ):
        add(value)
    writer.add_layer_norm_rms_eps(1e-5)
    write_vocab(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _named(vocab, name):
    tokens, types, merges = vocab
    return {"model": "gpt2", "pre": name, "tokens": tokens, "token_types": types, "merges": merges,
            "bos": 0, "eos": 0, "pad": None, "add_bos": False, "chat_template": None}  # fmt: skip


def _llama_ids(path, text):
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()


def _our_ids(path, text):
    from tokenizers import Tokenizer

    meta, _ = read_gguf(path)
    return Tokenizer.from_str(tokenizer_files_from_gguf(meta, str(path))["tokenizer.json"]).encode(text).ids


def test_every_supported_name_tokenizes_like_llama_cpp(tmp_path, vocab):
    wrong = {}
    for name in supported_names():
        path = _write_vocab_gguf(tmp_path / f"{name}.gguf", _named(vocab, name))
        theirs, ours = _llama_ids(path, TEST_TEXT), _our_ids(path, TEST_TEXT)
        assert len(theirs) > 150  # the text is split and merged, not byte by byte
        if ours != theirs:
            at = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            wrong[name] = (at, ours[at : at + 4], theirs[at : at + 4])
    assert not wrong, wrong
    assert len(supported_names()) > 80


def test_names_we_cannot_rebuild_are_one_line(tmp_path, vocab):
    for name in [*UNSUPPORTED, "no-such-name"]:
        path = _write_vocab_gguf(tmp_path / f"{name}.gguf", _named(vocab, name))
        with pytest.raises(LmforgeError, match=f"'{name}' is not supported.*nearest supported") as err:
            _our_ids(path, "x")
        assert "\n" not in str(err.value)


def test_export_import_export_is_byte_identical_and_keeps_the_name(tmp_path, vocab):
    for name in supported_names():
        first = _write_vocab_gguf(tmp_path / f"{name}-0.gguf", _named(vocab, name))
        files = []
        for step in (1, 2):
            folder = tmp_path / f"{name}-{step}"
            folder.mkdir()
            meta, _ = read_gguf(first if step == 1 else files[-1])
            for file, text in tokenizer_files_from_gguf(meta, name).items():
                (folder / file).write_text(text, encoding="utf-8")
            out = gguf_vocab(folder, len(vocab[0]))
            assert out["pre"] == name and out["merges"] == vocab[2]
            files.append(_write_vocab_gguf(tmp_path / f"{name}-{step}.gguf", out))
        assert files[0].read_bytes() == files[1].read_bytes(), name


def _tiny_cfg(vocab_size, hidden, intermediate, tied=True):
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=128,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=tied,
    )


def _llama_logits(path, ids):
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.fixture(scope="module")
def smollm_folder(tmp_path_factory):
    """A SmolLM2-style Hugging Face folder: Digits(individual) + ByteLevel tokenizer, tied Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    root = tmp_path_factory.mktemp("smollm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus() * 3, trainer=trainer)
    folder = root / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 128}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf_cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    return folder


def test_smollm_style_folder_runs_in_llama_cpp_like_transformers(tmp_path, smollm_folder):
    from lmforge.interop import import_hf

    state, cfg = import_hf(smollm_folder)
    path = export_gguf(state, cfg, smollm_folder, tmp_path / "m.gguf", dtype="f32")
    meta, _ = read_gguf(path)
    assert meta["tokenizer.ggml.pre"] == "smollm"  # as llama.cpp's converter names SmolLM2
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm_folder)
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm_folder).eval()
    prompt = "Hello world 12345, naïve café 3.14"
    ids = hf_tok(prompt)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, n_threads=2, type_k=0, type_v=0)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        want, seq = [], list(ids)  # greedy by hand: generate() would stop at EOS
        with torch.no_grad():
            for _ in range(24):
                want.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
                seq.append(want[-1])
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == 24:
                break
        assert got == want
        text = llm.detokenize(got).decode("utf-8", errors="replace")
        assert text == hf_tok.decode(want, skip_special_tokens=False)
    finally:
        llm.close()
    # The GGUF imported back gives the HF import's logits (f32).
    back, back_cfg, _ = import_gguf(path)
    assert back_cfg == cfg
    probe = torch.tensor([ids])
    with torch.no_grad():
        a, b = Transformer(cfg).eval(), Transformer(cfg).eval()
        a.load_state_dict(state)
        b.load_state_dict(back)
        assert torch.equal(a(probe).logits, b(probe).logits)


# Max |logit - f32 logit| in llama.cpp over a random prompt may exceed llama.cpp's own file by this
# factor (our K-quant files are llama.cpp's quantiser, so they match; 4-bit Q4_0 is the gguf
# package's rounding, with the output kept at 8 bits as llama-quantize keeps it).
QUANT_SLACK = {"q4_k_m": 1.0001, "q5_k_m": 1.0001, "q6_k": 1.0001, "q4_0": 1.3}


def test_quantised_exports_are_as_close_to_f32_as_llama_cpp_makes_them(tmp_path):
    tok = train_test_tokenizer(tmp_path)
    cfg = _tiny_cfg(320, 256, 512)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(3, 300, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    f32 = export_gguf(model, cfg, tok, tmp_path / "f32.gguf", dtype="f32")
    ref = _llama_logits(f32, ids)
    for dtype, slack in QUANT_SLACK.items():
        ours = export_gguf(model, cfg, tok, tmp_path / f"ours-{dtype}.gguf", dtype=dtype)
        theirs = tmp_path / f"theirs-{dtype}.gguf"
        if dtype == "q4_0":
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = 2  # LLAMA_FTYPE_MOSTLY_Q4_0
            assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
        else:
            llama_quantize(f32, theirs, dtype)
        err_ours = np.abs(_llama_logits(ours, ids) - ref).max()
        err_theirs = np.abs(_llama_logits(theirs, ids) - ref).max()
        print(
            f"{dtype}: max|dlogit| ours {err_ours:.4f} llama.cpp {err_theirs:.4f} (logit std {ref.std():.3f})"
        )
        assert 0 < err_ours <= err_theirs * slack, (dtype, err_ours, err_theirs)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "ours-q4_k_m.gguf")).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_K" and kinds["token_embd.weight"] == "Q6_K"
    state, back_cfg, _ = import_gguf(tmp_path / "ours-q4_k_m.gguf")  # and lmforge reads it back
    assert back_cfg == cfg and set(state) == set(model.state_dict())
    # The CLI route a user takes: a weights folder -> `lmforge export --dtype q6_k` -> llama.cpp.
    from lmforge.cli import main

    weights = import_gguf_to_folder(f32, tmp_path / "w")
    out = tmp_path / "cli-q6_k.gguf"
    assert (
        main(
            ["export", "--checkpoint", str(weights), "--format", "gguf", "--dtype", "q6_k", "--out", str(out)]
        )
        == 0
    )
    assert np.abs(_llama_logits(out, ids) - _llama_logits(tmp_path / "theirs-q6_k.gguf", ids)).max() == 0
