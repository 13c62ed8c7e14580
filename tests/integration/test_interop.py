"""Hugging Face interop: exports load in `transformers` (no custom code) with the same fp32
logits; import(export(m)) is bitwise m; what no format holds exactly is refused. The parity
figures print as a table with `pytest tests/integration/test_interop.py -s`."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from lmforge.config import ModelConfig, RopeScaling
from lmforge.errors import LmforgeError
from lmforge.interop import export_hf, import_hf, load_hf_model
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 256
PARITY: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def parity_table():
    """After the module: the figures of every parity test in one table (visible with -s)."""
    yield
    if PARITY:
        print("\n\nparity table (max abs logit difference vs transformers; fp32 unless bf16_)")
        for name, diff in PARITY.items():
            print(f"  {name:30s} {diff:.3e}")


def make_model(seed: int = 0, **overrides) -> tuple[Transformer, ModelConfig]:
    """A tiny random model whose norm weights and biases are random too, so a swapped or
    dropped tensor changes the logits."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=96, max_position_embeddings=128, rope_theta=10000.0, tie_embeddings=False,
    )  # fmt: skip
    cfg = ModelConfig(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model, cfg


def hf_model(folder, dtype=torch.float32, attn="eager"):
    auto = transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=dtype, attn_implementation=attn).eval()


def max_logit_diff(ours: Transformer, theirs, seed: int = 1) -> float:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (ours(ids).logits - theirs(ids).logits).abs().max().item()


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


MOE4 = dict(num_experts=4, top_k=2, expert_intermediate_size=48)
LLAMA3_ROPE = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)
CASES = {
    # name: (ModelConfig overrides, expected HF class)
    "llama_mha_tied": (dict(num_kv_heads=4, tie_embeddings=True), "LlamaForCausalLM"),
    "llama_gqa2_untied_theta5e5": (dict(rope_theta=5e5), "LlamaForCausalLM"),
    "llama_gqa4_theta1e6": (dict(num_heads=8, num_kv_heads=2, rope_theta=1e6), "LlamaForCausalLM"),
    "llama_mqa_tied": (dict(num_kv_heads=1, tie_embeddings=True), "LlamaForCausalLM"),
    "llama3_rope_scaling": (dict(rope_theta=5e5, rope_scaling=LLAMA3_ROPE), "LlamaForCausalLM"),
    "llama_biases": (dict(attention_bias=True, mlp_bias=True), "LlamaForCausalLM"),
    "qwen3_tied": (dict(qk_norm=True, tie_embeddings=True, rope_theta=1e6), "Qwen3ForCausalLM"),
    "qwen3_head_dim32_bias": (
        dict(qk_norm=True, head_dim=32, attention_bias=True, num_kv_heads=1),
        "Qwen3ForCausalLM",
    ),
    "qwen3_moe": (dict(qk_norm=True, moe={**MOE4, "norm_topk_prob": False}), "Qwen3MoeForCausalLM"),
    "qwen3_moe_renorm_tied": (
        dict(qk_norm=True, tie_embeddings=True, moe={**MOE4, "norm_topk_prob": True, "aux_loss_coef": 0.02}),
        "Qwen3MoeForCausalLM",
    ),
    "mixtral": (dict(intermediate_size=48, moe={**MOE4, "norm_topk_prob": True}), "MixtralForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_and_round_trips(case, tmp_path):
    overrides, arch = CASES[case]
    model, cfg = make_model(**overrides)
    out = export_hf(model, cfg, tmp_path / "hf")

    theirs = hf_model(out)
    assert type(theirs).__name__ == arch
    diff = max_logit_diff(model, theirs)
    PARITY[case] = diff
    print(f"\nparity {case:28s} {arch:22s} max|dlogit| = {diff:.3e}")
    assert diff <= 1e-4

    state, cfg2 = import_hf(out)
    assert cfg2 == cfg
    assert_same_state(state, model.state_dict())
    loaded, _ = load_hf_model(out)  # strict load into our Transformer: same logits bit for bit
    assert max_logit_diff(model, loaded) == 0.0


def test_derived_ffn_width_becomes_explicit(tmp_path):
    model, cfg = make_model(intermediate_size=None, ffn_rule="llama", multiple_of=32)
    width = model.layers[0].feed_forward.w1.weight.shape[0]
    out = export_hf(model, cfg, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == width
    state, cfg2 = import_hf(out)
    assert cfg2.intermediate_size == width
    assert_same_state(state, model.state_dict())


def test_config_json_is_readable_by_4x_and_5x(tmp_path):
    model, cfg = make_model(rope_theta=5e5, rope_scaling=RopeScaling(original_max_position_embeddings=32))
    hf = json.loads((export_hf(model, cfg, tmp_path / "hf") / "config.json").read_text())
    assert hf["rope_theta"] == 5e5 and hf["rope_scaling"]["rope_type"] == "llama3"  # 4.x spelling
    assert hf["rope_parameters"]["rope_theta"] == 5e5  # 5.x spelling
    assert hf["rope_parameters"]["rope_type"] == "llama3"
    assert hf["torch_dtype"] == hf["dtype"] == "float32"
    assert hf["tie_word_embeddings"] is False
    model, cfg = make_model(qk_norm=True, moe=MOE4)
    hf = json.loads((export_hf(model, cfg, tmp_path / "moe") / "config.json").read_text())
    assert hf["num_experts"] == hf["num_local_experts"] == 4
    assert hf["decoder_sparse_step"] == 1 and hf["mlp_only_layers"] == []
    assert hf["router_aux_loss_coef"] == cfg.moe.aux_loss_coef
    assert hf["use_sliding_window"] is False and hf["head_dim"] == 16


def test_tied_weights_written_once(tmp_path):
    from safetensors import safe_open

    model, cfg = make_model(tie_embeddings=True)
    out = export_hf(model, cfg, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118 (safe_open is not a mapping)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    theirs = hf_model(out)
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()


def test_wrapped_models_and_prefixed_state_dicts_export_plain_names():
    """torch.compile's wrapper is unwrapped; a state dict saved through DDP and compile (in
    either nesting) loses the prefixes at the front of its keys, and only there."""
    from lmforge.interop.export import plain_state

    model, _ = make_model()
    want = model.state_dict()
    assert list(plain_state(torch.compile(model))) == list(want)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        got = plain_state({prefix + k: v for k, v in want.items()})
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    odd = plain_state({"layers.0.module.weight": want["norm.weight"]})
    assert list(odd) == ["layers.0.module.weight"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_moe", "mixtral"])
def test_missing_keys_default_like_transformers(model_type, tmp_path):
    """A config.json that leaves out optional keys means what transformers says it means."""
    from lmforge.interop.hf_config import FAMILIES, from_hf_config

    hf = dict(
        architectures=[FAMILIES[model_type][0]], model_type=model_type, vocab_size=VOCAB,
        hidden_size=256, intermediate_size=96, num_hidden_layers=2, num_attention_heads=32,
        max_position_embeddings=128, moe_intermediate_size=32, num_experts=4,
        num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    _, ours = from_hf_config(hf)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.norm_eps == theirs.rms_norm_eps
    assert ours.resolved_head_dim == (getattr(theirs, "head_dim", None) or 256 // 32)
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.tie_embeddings == theirs.tie_word_embeddings


def test_bf16_export_writes_bf16(tmp_path):
    from safetensors import safe_open

    model, cfg = make_model(qk_norm=True)
    out = export_hf(model, cfg, tmp_path / "hf", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {torch.bfloat16}
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == hf["torch_dtype"] == "bfloat16"
    state, _ = import_hf(out)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert_same_state(state, expected)
    loaded, _ = load_hf_model(out)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert loaded.rope_cos.dtype == torch.float32


@pytest.mark.parametrize("case", ["llama_gqa2_untied_theta5e5", "qwen3_tied", "qwen3_moe", "mixtral"])
def test_bf16_logits_match_transformers_bf16(case, tmp_path):
    """Both sides in bf16 with SDPA: our norm/RoPE numerics follow HF's, so the logits agree to
    about one bf16 rounding step (Mixtral keeps routing weights in fp32 where we cast)."""
    model, cfg = make_model(**CASES[case][0])
    out = export_hf(model, cfg, tmp_path / "hf", dtype="bfloat16")
    ours, _ = load_hf_model(out)
    theirs = hf_model(out, dtype=torch.bfloat16, attn="sdpa")
    diff = max_logit_diff(ours, theirs)
    PARITY[f"bf16_{case}"] = diff
    print(f"\nparity bf16_{case:23s} {type(theirs).__name__:22s} max|dlogit| = {diff:.3e}")
    assert diff <= 1e-2


@pytest.mark.parametrize("case", ["llama_gqa2_untied_theta5e5", "qwen3_tied"])
def test_autocast_bf16_follows_transformers_and_caches_bf16(case, tmp_path):
    """Mixed precision as the trainer runs it (fp32 weights, bf16 autocast): RoPE is applied in
    the fp32 residual dtype as HF does, so the logits agree with HF's to well under one bf16
    step at the logits' scale (rotating in bf16 gave ~4e-3); the KV cache holds bf16 keys and
    values even with QK-norm (whose fp32 weight promotes q/k), and cached decoding matches."""
    model, cfg = make_model(**CASES[case][0])
    theirs = hf_model(export_hf(model, cfg, tmp_path / "hf"), attn="sdpa")
    ids = torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids).logits
        diff = (full.float() - theirs(ids).logits.float()).abs().max().item()
        cache = model.new_kv_cache(120)
        pieces = [model(ids[:, :90], kv_cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], kv_cache=cache, start_pos=t).logits for t in range(90, 120)]
    PARITY[f"autocast_bf16_{case}"] = diff
    assert full.dtype == torch.bfloat16 and diff <= 1e-3
    assert {t.dtype for t in (*cache.keys.values(), *cache.values.values())} == {torch.bfloat16}
    assert (torch.cat(pieces, 1).float() - full.float()).abs().max().item() <= 1e-2


def test_sharded_export_loads_everywhere(tmp_path):
    model, cfg = make_model(qk_norm=True, moe=MOE4)
    out = export_hf(model, cfg, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert max_logit_diff(model, hf_model(out)) <= 1e-4
    state, _ = import_hf(out)
    assert_same_state(state, model.state_dict())
    (out / sorted(shards)[0]).unlink()
    with pytest.raises(LmforgeError, match="missing"):
        import_hf(out)


def _hf_reference(kind: str):
    t = transformers
    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
    )  # fmt: skip
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
        return t.LlamaForCausalLM(t.LlamaConfig(intermediate_size=96, rope_parameters=rope, **common))
    if kind == "qwen3":
        return t.Qwen3ForCausalLM(
            t.Qwen3Config(intermediate_size=96, head_dim=16, tie_word_embeddings=True, **common)
        )
    if kind == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(
            intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=16, **common,
        )  # fmt: skip
        return t.Qwen3MoeForCausalLM(cfg)
    return t.MixtralForCausalLM(t.MixtralConfig(intermediate_size=32, num_local_experts=4, **common))


def _saved_reference(kind: str, folder):
    """A random HF model (norm weights too) saved by transformers' own save_pretrained."""
    model = _hf_reference(kind).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.uniform_(0.5, 1.5) if name.endswith("norm.weight") else param.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe", "mixtral"])
def test_import_folder_saved_by_transformers(kind, tmp_path):
    reference = _saved_reference(kind, tmp_path / "hf")
    ours, _ = load_hf_model(tmp_path / "hf")
    diff = max_logit_diff(ours, reference)
    PARITY[f"import_{kind}"] = diff
    print(f"\nparity import_{kind:21s} {type(reference).__name__:22s} max|dlogit| = {diff:.3e}")
    assert diff <= 1e-4


def test_import_fused_expert_layout(tmp_path):
    """transformers 5 keeps experts fused in memory ([E, 2I, H] gate_up, [E, H, I] down); a file
    written from that state dict must import to the same model."""
    from safetensors.torch import save_file

    reference = _saved_reference("qwen3_moe", tmp_path / "hf")
    fused = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file(fused, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    ours, _ = load_hf_model(tmp_path / "hf")
    assert max_logit_diff(ours, reference) <= 1e-4


EXPORT_REFUSALS = {
    "shared_experts": (dict(qk_norm=True, moe={**MOE4, "num_shared_experts": 1}), "num_shared_experts"),
    "moe_no_qknorm_no_renorm": (dict(moe={**MOE4, "norm_topk_prob": False}), "norm_topk_prob"),
    "qwen3_mlp_bias": (dict(qk_norm=True, mlp_bias=True), "mlp_bias"),
    "moe_mlp_bias": (dict(qk_norm=True, mlp_bias=True, moe=MOE4), "mlp_bias"),
    "mixtral_attention_bias": (dict(attention_bias=True, moe=MOE4), "attention_bias"),
    "llama_head_dim_not_dividing": (dict(num_heads=6, num_kv_heads=2, head_dim=16), "divisible"),
}


@pytest.mark.parametrize("case", list(EXPORT_REFUSALS))
def test_export_refuses_what_hf_cannot_hold(case, tmp_path):
    overrides, words = EXPORT_REFUSALS[case]
    model, cfg = make_model(**overrides)
    with pytest.raises(LmforgeError, match=words) as info:
        export_hf(model, cfg, tmp_path / "hf")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_weights_that_disagree_with_config(tmp_path):
    model, cfg = make_model()
    wider = cfg.model_copy(update={"intermediate_size": 128})
    with pytest.raises(LmforgeError, match=r"feed_forward\.w1\.weight.*intermediate_size"):
        export_hf(model, wider, tmp_path / "a")
    state = dict(model.state_dict(), extra=torch.zeros(1))
    with pytest.raises(LmforgeError, match=r"extra \(1,\) vs absent"):
        export_hf(state, cfg, tmp_path / "b")
    tied, tied_cfg = make_model(tie_embeddings=True)
    state = dict(tied.state_dict(), **{"output.weight": torch.zeros(VOCAB, 64)})
    with pytest.raises(LmforgeError, match="tie_embeddings"):
        export_hf(state, tied_cfg, tmp_path / "c")
    state = dict(tied.state_dict(), **{"output.weight": tied.tok_embeddings.weight.clone()})
    assert (export_hf(state, tied_cfg, tmp_path / "d") / "config.json").exists()


def test_failed_export_leaves_nothing_and_keeps_old(tmp_path, monkeypatch):
    import lmforge.weights.safetensors_io as writer

    model, cfg = make_model()
    out = export_hf(model, cfg, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(LmforgeError, match="already exists"):
        export_hf(model, cfg, out)

    monkeypatch.setattr(writer, "save_file", mock.Mock(side_effect=OSError("disk full")))
    with pytest.raises(LmforgeError, match="disk full"):
        export_hf(model, cfg, tmp_path / "new")
    with pytest.raises(LmforgeError, match="disk full"):
        export_hf(model, cfg, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp folder, no "new"
    assert (out / "model.safetensors").read_bytes() == before
    monkeypatch.undo()
    other, _ = make_model(seed=5)
    export_hf(other, cfg, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _edit_config(folder, **changes):
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **changes}))


def test_import_refusals(tmp_path):
    with pytest.raises(LmforgeError, match="not a folder"):
        import_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="config.json"):
        import_hf(tmp_path / "empty")
    model, cfg = make_model(qk_norm=True, moe=MOE4)
    out = export_hf(model, cfg, tmp_path / "hf")

    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(LmforgeError, match="convert the checkpoint to safetensors"):
        import_hf(out)
    (out / "pytorch_model.bin").rename(out / "model.safetensors")

    good = (out / "config.json").read_text()
    cases = [
        (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
        (dict(rope_scaling=None, rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(moe_intermediate_size=40), "shape .* config.json implies"),
        (dict(use_sliding_window=True, sliding_window=16), "sliding-window"),
        (dict(mlp_only_layers=[1]), "mlp_only_layers"),
        (dict(num_hidden_layers=3), "'model.layers.2.*' is missing"),
        (dict(num_hidden_layers=1), "has no place"),
    ]
    for changes, words in cases:
        (out / "config.json").write_text(good)
        _edit_config(out, **changes)
        with pytest.raises(LmforgeError, match=words) as info:
            import_hf(out)
        assert "\n" not in str(info.value)
    (out / "config.json").write_text("{not json")
    with pytest.raises(LmforgeError, match=r"config.json:1: not valid JSON"):
        import_hf(out)


def test_tokenizer_files_and_special_ids_travel(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))

    model, cfg = make_model()
    out = export_hf(model, cfg, tmp_path / "hf", tokenizer=tmp_path / "tok")
    hf = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, 2)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.encode("hello world", add_special_tokens=False) == [3, 4]
    assert (auto.bos_token_id, auto.eos_token_id) == (1, 2)
