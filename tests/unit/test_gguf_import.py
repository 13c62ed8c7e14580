"""GGUF import side: files written without lmforge (from HF models, with K-quant tensors),
MiniMind's tokenizer, MoE models (qwen3moe through transformers' loader, llama experts), and
imported folders used by the rest of lmforge."""

import json

import numpy as np
import pytest
import torch
from paths import MINIMIND

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gguf_case import SCALING, TEXT, VOCAB, gguf_test_model, train_test_tokenizer  # noqa: E402

from lmforge.config import ModelConfig, MoEConfig, RopeScaling  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.interop.gguf_export import export_gguf  # noqa: E402
from lmforge.interop.gguf_import import import_gguf, import_gguf_to_folder  # noqa: E402
from lmforge.model import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_test_tokenizer(tmp_path_factory.mktemp("tok"))


def _write_hf_style_gguf(hf_model, arch, path, tok_dir, rope_freqs=None, raw=None):
    """A GGUF written the way llama.cpp's converter writes one, from an HF model, with gguf's own
    name map: nothing of lmforge's export is used. `raw` maps HF names to (bytes, quant type)
    stored instead of the model's values."""
    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    from lmforge.interop.gguf_vocab import gguf_vocab, write_vocab

    write_vocab(writer, gguf_vocab(tok_dir, c.vocab_size))
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN3, c.num_hidden_layers
    )
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for name, value in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        data = value.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = c.num_attention_heads if base.endswith("q_proj") else c.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:])
            data = data.swapaxes(1, 2).reshape(value.shape)
        if raw and name in raw:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", raw[name][0], raw_dtype=raw[name][1])
            continue
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_written_from_an_hf_model_imports_with_its_logits(tmp_path, tokenizer_dir, arch):
    from lmforge.interop.gguf_export import rope_factors

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    freqs = None
    if arch == "llama":  # a Llama-3.1-style scaling given only as rope_freqs, as llama.cpp writes it
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rope))
        probe = ModelConfig(
            hidden_size=16,
            num_heads=1,
            num_kv_heads=1,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8192),
        )
        freqs = rope_factors(probe).numpy()
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, rope_theta=1e6))
    hf.eval()
    _write_hf_style_gguf(hf, arch, tmp_path / "hf.gguf", tokenizer_dir, freqs)
    state, cfg, _ = import_gguf(tmp_path / "hf.gguf")
    assert cfg.qk_norm == (arch == "qwen3") and not cfg.tie_embeddings
    assert (cfg.rope_scaling is not None) == (arch == "llama")
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


def _k_quant_bytes(rows, cols, kind, rng):
    """Random blocks of a K-quant type (gguf cannot quantise these in Python) with sane fp16 scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    data = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if kind == gguf.GGMLQuantizationType.Q6_K:  # d is the last field
        data[..., -2:] = scale
    else:  # Q4_K: d and dmin first
        data[..., 0:2] = scale
        data[..., 2:4] = scale
    return data.reshape(rows, -1)


def test_k_quant_tensors_are_dequantised_and_unpermuted(tmp_path, tokenizer_dir):
    from lmforge.interop.gguf_export import llama_unpermute

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    q6k, q4k = gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q4_K
    raw = {
        "model.layers.0.self_attn.q_proj.weight": (_k_quant_bytes(256, 256, q6k, rng), q6k),
        "model.layers.0.self_attn.k_proj.weight": (_k_quant_bytes(128, 256, q4k, rng), q4k),
        "model.layers.0.mlp.down_proj.weight": (_k_quant_bytes(256, 256, q4k, rng), q4k),
    }
    _write_hf_style_gguf(hf, "llama", tmp_path / "k.gguf", tokenizer_dir, raw=raw)
    state, _, _ = import_gguf(tmp_path / "k.gguf")
    for ours, theirs, heads in (
        ("attention.wq", "self_attn.q_proj", 4),
        ("attention.wk", "self_attn.k_proj", 2),
        ("feed_forward.w2", "mlp.down_proj", None),
    ):
        data, kind = raw[f"model.layers.0.{theirs}.weight"]
        want = torch.from_numpy(gguf.quants.dequantize(data, kind).astype(np.float32))
        want = llama_unpermute(want, heads) if heads else want
        got = state[f"layers.0.{ours}.weight"]
        assert got.dtype == torch.float32 and torch.isfinite(got).all() and torch.equal(got, want)
    assert torch.equal(state["layers.0.feed_forward.w1.weight"], hf.model.layers[0].mlp.gate_proj.weight)


def test_minimind_tokenizer_embeds_and_comes_back(tmp_path):
    """MiniMind's own tokenizer (36 added tokens, ChatML template) through GGUF and back."""

    from lmforge.tokenizer import load_tokenizer

    src = MINIMIND / "model"
    if not (src / "tokenizer.json").is_file():
        pytest.skip(f"MiniMind reference tokenizer not found at {src}")
    cfg = ModelConfig(
        vocab_size=6400,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
        qk_norm=True,
    )
    path = export_gguf(Transformer(cfg), cfg, src, tmp_path / "mm.gguf", dtype="f16")
    out = import_gguf_to_folder(path, tmp_path / "back")
    text = "<|im_start|>user\n你好，世界！Hello 2025 年<|im_end|>\n<think>ok</think>"
    ours, back = load_tokenizer(src), load_tokenizer(out)
    assert back.encode(text) == ours.encode(text) and len(ours.encode(text)) > 10
    assert (back.bos_id, back.eos_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)
    template = json.loads((src / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template


def test_imported_folder_is_ready_for_eval_generate_and_export(tmp_path, tokenizer_dir):
    from lmforge.config import load_config
    from lmforge.interop.loading import find_tokenizer, load_model_for_inference, load_weights
    from lmforge.tokenizer import load_tokenizer

    model, cfg = gguf_test_model(False, 4, False, SCALING)
    first = export_gguf(model, cfg, tokenizer_dir, tmp_path / "m.gguf")
    out = import_gguf_to_folder(first, tmp_path / "weights")
    run_cfg = load_config(out / "config.yaml")  # finetune-ready: names these weights and tokenizer
    assert run_cfg.train.load_checkpoint == str(out) and run_cfg.tokenizer.path == str(out)
    assert run_cfg.checkpoint.export_dtype == "float32"
    loaded, cfg_back, tok = load_model_for_inference(out)
    assert cfg_back == cfg and tok.encode(TEXT) == load_tokenizer(tokenizer_dir).encode(TEXT)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(LmforgeError, match="not empty"):
        import_gguf_to_folder(first, out)
    # ... and exports back to the same GGUF tensors.
    state, run_cfg, folder = load_weights(out)
    again = export_gguf(state, run_cfg.model, find_tokenizer(folder, run_cfg), tmp_path / "again.gguf")
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(again))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))


def _moe_model(qk_norm, seed=0):
    moe = MoEConfig(
        num_experts=4, top_k=2, expert_intermediate_size=48, norm_topk_prob=True, aux_loss_coef=0.01
    )
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=80,
        max_position_embeddings=64,
        rope_theta=10000.0,
        qk_norm=qk_norm,
        tie_embeddings=False,
        moe=moe,
    )
    torch.manual_seed(seed)
    return Transformer(cfg).eval(), cfg


@pytest.mark.parametrize("qk_norm", [True, False])
def test_moe_models_export_as_qwen3moe_or_llama_experts(tmp_path, tokenizer_dir, qk_norm):
    model, cfg = _moe_model(qk_norm)
    path = export_gguf(model, cfg, tokenizer_dir, tmp_path / "moe.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == ("qwen3moe" if qk_norm else "llama")
    kinds = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
    assert kinds["blk.0.ffn_gate_exps.weight"] == ("Q8_0", (64, 48, 4))  # GGUF lists dims innermost first
    assert kinds["blk.0.ffn_gate_inp.weight"][0] == "F32"  # the router stays f32 as in llama.cpp
    path = export_gguf(model, cfg, tokenizer_dir, tmp_path / "moe32.gguf")
    state, cfg_back, _ = import_gguf(path)
    assert cfg_back == cfg
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    if qk_norm:  # transformers reads qwen3moe GGUFs (not llama with experts)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="moe32.gguf", dtype=torch.float32, moe_intermediate_size=48
        ).eval()  # its qwen3_moe GGUF mapping drops expert_feed_forward_length
        assert type(hf).__name__ == "Qwen3MoeForCausalLM"
        ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


def test_moe_shapes_gguf_cannot_hold_are_refused(tmp_path, tokenizer_dir):
    model, cfg = _moe_model(True)
    for update, words in (
        ({"num_shared_experts": 1}, "shared experts"),
        ({"norm_topk_prob": False}, "renormalises"),
    ):
        bad = cfg.model_copy(update={"moe": cfg.moe.model_copy(update=update)})
        with pytest.raises(LmforgeError, match=words):
            export_gguf(model.state_dict(), bad, tokenizer_dir, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_cli_export_gguf_and_import_back(tmp_path, tokenizer_dir, capsys):
    """`lmforge export --format gguf` from a weights folder, `lmforge import --gguf` back, and the
    one-line error for an existing output."""
    from lmforge.cli import main

    model, cfg = gguf_test_model(True, 1, False, None)
    weights = import_gguf_to_folder(
        export_gguf(model, cfg, tokenizer_dir, tmp_path / "a.gguf"), tmp_path / "w"
    )
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(weights),
                "--format",
                "gguf",
                "--dtype",
                "q8_0",
                "--out",
                str(tmp_path / "b.gguf"),
            ]
        )
        == 0
    )
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0"
    assert main(["import", "--gguf", str(tmp_path / "b.gguf"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").is_file() and (
        tmp_path / "back" / "tokenizer.json"
    ).is_file()
    assert (
        main(["export", "--checkpoint", str(weights), "--format", "gguf", "--out", str(tmp_path / "b.gguf")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
