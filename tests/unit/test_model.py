"""The model: shapes, causality, KV-cache decoding, init, meta builds, parameter counts, presets,
FLOPs and the MoE layer (routing, dispatch, load-balancing loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig, config_from_dict
from lmforge.errors import LmforgeError
from lmforge.model import KVCache, ModelOutput, Transformer, resolve_intermediate_size
from lmforge.model.flops import count_params, flops_per_token
from lmforge.model.info import model_info_table
from lmforge.model.layers import rope_inv_freq
from lmforge.model.moe import MoEFeedForward, load_balancing_loss
from lmforge.model.presets import PRESETS, get_preset

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    rope_theta=1e4,
)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


MOE = {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "aux_loss_coef": 0.01}

VARIANTS = {
    "mha": dict(num_kv_heads=4),
    "gqa2": dict(num_kv_heads=2),
    "mqa": dict(num_kv_heads=1),
    "qk_norm_untied_bias": dict(qk_norm=True, tie_embeddings=False, attention_bias=True),
    "moe": dict(moe=MOE),
    "llama3_scaling": dict(
        rope_scaling={"factor": 8.0, "original_max_position_embeddings": 16}, rope_theta=5e5
    ),
}


def model_for(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**VARIANTS[name])).eval()


def test_forward_shapes_and_dense_aux_is_zero():
    model = model_for("gqa2")
    ids = torch.randint(0, 97, (3, 11))
    out = model(ids)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 11, 97) and out.logits.dtype == torch.float32
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0


@pytest.mark.parametrize("name", ["gqa2", "moe"])
def test_causal_later_tokens_do_not_change_earlier_logits(name):
    model = model_for(name)
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 97
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_decode_matches_full_forward(name):
    model = model_for(name)
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids).logits
    with torch.no_grad():
        cache = model.new_kv_cache(max_len=24)
        steps = [model(ids[:, :6], kv_cache=cache, start_pos=0).logits]  # prefill
        for pos in range(6, 10):  # one token at a time
            steps.append(model(ids[:, pos : pos + 1], kv_cache=cache, start_pos=pos).logits)
        steps.append(model(ids[:, 10:17], kv_cache=cache, start_pos=10).logits)  # a chunk
        for pos in range(17, 20):
            steps.append(model(ids[:, pos : pos + 1], kv_cache=cache, start_pos=pos).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_and_positions_reject_overflow():
    model = model_for("gqa2")
    cache = KVCache(max_len=8)
    with pytest.raises(LmforgeError, match="KV cache holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(LmforgeError, match="max_position_embeddings 64"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=62)


def test_init_stds_norms_and_biases():
    cfg = ModelConfig(**{**TINY, "hidden_size": 64, "num_layers": 4, "num_heads": 4,
                         "attention_bias": True, "moe": MOE, "init_std": 0.05})  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    residual = 0.05 / math.sqrt(2 * 4)
    # Pool each kind over layers so the sample std is tight (>= 16k draws each: ~1% error).
    pools = {"plain": [model.tok_embeddings.weight], "residual": []}
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        pools["plain"] += [attn.wq.weight, attn.wk.weight, attn.wv.weight, ff.router.weight]
        pools["residual"].append(attn.wo.weight)
        for expert in (*ff.experts, *ff.shared_experts):
            pools["plain"] += [expert.w1.weight, expert.w3.weight]
            pools["residual"].append(expert.w2.weight)
        assert torch.all(layer.attention_norm.weight == 1) and torch.all(layer.ffn_norm.weight == 1)
        assert torch.all(attn.wq.bias == 0) and torch.all(attn.wo.bias == 0)
    for kind, expected in (("plain", 0.05), ("residual", residual)):
        flat = torch.cat([p.detach().flatten() for p in pools[kind]])
        assert abs(flat.std().item() - expected) < 0.03 * expected, kind
        assert abs(flat.mean().item()) < 0.05 * expected
    assert torch.all(model.norm.weight == 1)


def test_meta_build_then_materialise_matches_a_direct_build():
    cfg = tiny(qk_norm=True, moe=MOE)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    direct = Transformer(cfg)
    torch.manual_seed(3)
    direct.init_weights()  # init_weights alone decides every value, whatever was there before
    for (name, a), (_, b) in zip(meta.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(meta.rope_cos, direct.rope_cos) and torch.equal(meta.rope_sin, direct.rope_sin)
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(meta(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_llama3_70b_on_meta_allocates_nothing_and_counts_match():
    cfg = ModelConfig(**get_preset("llama3-70b"))
    # How long the build takes is measured in bench/meta_build.py, not asserted here.
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert count_params(cfg)["total"] == model.num_params()


@pytest.mark.parametrize(
    "name,published,ffn",
    [("llama2-7b", 6.74e9, 11008), ("llama3-8b", 8.03e9, 14336), ("llama3-70b", 70.6e9, 28672)],
)
def test_published_llama_counts_and_ffn_widths(name, published, ffn):
    cfg = ModelConfig(**get_preset(name))
    assert resolve_intermediate_size(cfg) == ffn
    total = count_params(cfg)["total"]
    assert abs(total - published) / published < 0.005, total


def test_minimind_ffn_rules_and_sizes():
    sizes = {n: count_params(ModelConfig(**get_preset(n))) for n in PRESETS}
    print({n: (c["total"], c["active"]) for n, c in sizes.items()})
    assert resolve_intermediate_size(ModelConfig(**get_preset("minimind2-26m"))) == 1408
    assert resolve_intermediate_size(ModelConfig(**get_preset("minimind2-104m"))) == 2048
    assert resolve_intermediate_size(ModelConfig(**get_preset("minimind3-64m"))) == 2432
    assert resolve_intermediate_size(tiny(intermediate_size=100, ffn_rule="llama")) == 100
    assert 25.5e6 < sizes["minimind2-26m"]["total"] < 26.5e6
    assert 103e6 < sizes["minimind2-104m"]["total"] < 105e6
    assert 63e6 < sizes["minimind3-64m"]["total"] < 65e6
    moe = sizes["minimind2-moe"]
    assert 144e6 < moe["total"] < 146e6 and moe["active"] < 0.7 * moe["total"]


COUNT_CONFIGS = {
    "tied_gqa": dict(),
    "untied_bias_qknorm": dict(tie_embeddings=False, attention_bias=True, mlp_bias=True, qk_norm=True),
    "head_dim_llama_rule": dict(head_dim=16, ffn_rule="llama", multiple_of=32, ffn_dim_multiplier=1.3),
    "moe_shared": dict(moe=MOE, tie_embeddings=False),
    "moe_width_bias": dict(moe={**MOE, "expert_intermediate_size": 40, "num_shared_experts": 0}, mlp_bias=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(COUNT_CONFIGS))
def test_count_params_matches_the_module(name):
    cfg = tiny(**COUNT_CONFIGS[name])
    model = Transformer(cfg)
    counts = count_params(cfg)
    assert counts["total"] == model.num_params()
    assert counts["active"] == model.num_active_params()
    assert counts["embedding"] == model.num_params() - model.num_params(exclude_embeddings=True)
    if cfg.moe is None:
        assert counts["active"] == counts["total"]
    else:
        assert counts["active"] < counts["total"]


def test_flops_per_token_formula():
    cfg = ModelConfig(**get_preset("llama2-7b"))
    expected = 6 * (6738415616 - 32000 * 4096) + 12 * 32 * 4096 * 4096
    assert flops_per_token(cfg, 4096) == expected
    # A tied model still pays for the output projection.
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert flops_per_token(tied, 8) == flops_per_token(untied, 8)
    assert flops_per_token(tied, 16) - flops_per_token(tied, 8) == 12 * 2 * 32 * 8


def test_presets_and_info_table():
    with pytest.raises(KeyError, match="unknown preset 'nope'; choose one of: tiny"):
        get_preset("nope")
    for name in PRESETS:
        assert ModelConfig(**get_preset(name)).preset == name
    table = model_info_table(["minimind2-26m", "llama3-70b", "minimind2-moe"])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["name", "params", "active"] and len(lines) == 5
    assert "25.8M" in lines[2] and "70.6B" in lines[3] and "4x1728 top2+1s" in lines[4]
    with pytest.raises(LmforgeError, match="unknown preset 'nope'"):
        model_info_table(["nope"])


def test_run_config_preset_with_overrides_builds():
    tree = {"model": {"preset": "tiny-moe", "num_layers": 1, "moe": {"top_k": 1}}, "data": {"seq_len": 64}}
    cfg = config_from_dict(tree)
    model = Transformer(cfg.model)
    assert len(model.layers) == 1 and model.layers[0].feed_forward.top_k == 1
    assert model.layers[0].feed_forward.num_experts == 4  # the rest of the preset's moe block stays
    assert model(torch.randint(0, 512, (1, 3))).logits.shape == (1, 3, 512)


def test_tied_embeddings_are_one_parameter_and_state_dict_round_trips():
    torch.manual_seed(0)
    tied = Transformer(tiny())
    assert tied.output is None and "output.weight" not in tied.state_dict()
    tied(torch.randint(0, 97, (1, 5))).logits.sum().backward()
    assert tied.tok_embeddings.weight.grad is not None
    untied = Transformer(tiny(tie_embeddings=False))
    assert "output.weight" in untied.state_dict()
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    copy = Transformer(tiny())
    copy.load_state_dict(tied.state_dict(), strict=True)
    ids = torch.randint(0, 97, (1, 6))
    assert torch.equal(copy(ids).logits, tied(ids).logits)


def test_parameter_names_follow_the_contract():
    names = set(Transformer(tiny(qk_norm=True, attention_bias=True, moe=MOE)).state_dict())
    for key in ("tok_embeddings.weight", "norm.weight", "layers.1.attention_norm.weight",
                "layers.0.attention.wq.weight", "layers.0.attention.wo.bias",
                "layers.0.attention.q_norm.weight", "layers.0.attention.k_norm.weight",
                "layers.0.ffn_norm.weight", "layers.0.feed_forward.router.weight",
                "layers.0.feed_forward.experts.3.w2.weight",
                "layers.0.feed_forward.shared_experts.0.w1.weight"):  # fmt: skip
        assert key in names, key
    assert not any("rope" in n for n in names)  # derived tables stay out of checkpoints
    dense = set(Transformer(tiny()).state_dict())
    assert {"layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight"} <= dense


def test_llama3_rope_scaling_matches_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, rope_theta=5e5, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig(hidden_size=256, num_heads=2, num_kv_heads=2, rope_theta=5e5,
                      rope_scaling={"factor": 8.0, "original_max_position_embeddings": 8192})  # fmt: skip
    ours = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    plain = rope_inv_freq(128, 5e5)
    assert torch.equal(ours[:10], plain[:10]) and torch.allclose(ours[-5:], plain[-5:] / 8)


# ---------------------------------------------------------------------------------------------
# Mixture of experts


def moe_layer(**moe) -> MoEFeedForward:
    torch.manual_seed(0)
    return MoEFeedForward(tiny(moe={**MOE, **moe}))


@pytest.mark.parametrize("norm_topk,shared", [(True, 1), (False, 0), (True, 2)])
def test_moe_dispatch_matches_a_per_token_loop(norm_topk, shared):
    layer = moe_layer(norm_topk_prob=norm_topk, num_shared_experts=shared)
    x = torch.randn(3, 7, 32)
    out, _ = layer(x)
    flat = x.reshape(-1, 32)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):  # the slow, obvious reference
        probs = torch.softmax(layer.router(flat[t]), dim=-1)
        top = torch.topk(probs, 2)
        weights = top.values / top.values.sum() if norm_topk else top.values
        for w, e in zip(weights, top.indices):
            expected[t] += w * layer.experts[int(e)](flat[t])
        for s in layer.shared_experts:
            expected[t] += s(flat[t])
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=0, atol=1e-5)


def test_load_balancing_loss_formula():
    coef, experts = 0.1, 4
    uniform_probs = torch.full((8, experts), 1 / experts)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(uniform_probs, balanced, experts, coef).item() == pytest.approx(coef)
    # All tokens to experts 0 and 1, with the router favouring them: f = (.5,.5,0,0).
    skewed_probs = torch.tensor([[0.4, 0.4, 0.1, 0.1]] * 8)
    skewed = torch.tensor([[0, 1]] * 8)
    assert load_balancing_loss(skewed_probs, skewed, experts, coef).item() == pytest.approx(
        coef * experts * (0.4 * 0.5 * 2)
    )
    collapsed = load_balancing_loss(torch.tensor([[1.0, 0, 0, 0]] * 8), torch.zeros(8, 1).long(), 4, coef)
    assert collapsed.item() == pytest.approx(coef * experts)


def test_moe_aux_loss_uniform_minimum_skew_and_gradients():
    layer = moe_layer(aux_loss_coef=0.1)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        layer.router.weight.zero_()  # every token sees probs exactly 1/E
    _, aux = layer(x)
    assert aux.item() == pytest.approx(0.1, abs=1e-7)  # uniform P gives coef whatever f is
    with torch.no_grad():
        layer.router.weight[0] = x.reshape(-1, 32).mean(0) * 50  # pull everything to expert 0
    _, skewed = layer(x)
    assert skewed.item() > 0.12
    torch.manual_seed(1)
    layer = moe_layer(aux_loss_coef=0.1)
    _, aux = layer(x)
    assert aux.item() > 0
    aux.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_model_aux_loss_sums_layers_and_every_expert_gets_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny(moe=MOE))
    ids = torch.randint(0, 97, (1, 2))  # 2 tokens x top-2 cannot reach all 4 experts
    with torch.no_grad():
        for layer in model.layers:
            layer.feed_forward.router.weight.zero_()
        assert model(ids).aux_loss.item() == pytest.approx(2 * 0.01)  # coef per MoE layer, summed
    torch.manual_seed(0)
    model = Transformer(tiny(moe=MOE))
    out = model(ids)
    assert out.aux_loss.requires_grad and out.aux_loss.item() > 0
    (out.logits.sum() + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # unused experts still join the graph (DDP-safe)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Transformer(tiny(dropout=0.2))
    ids = torch.randint(0, 97, (2, 8))
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_bf16_logits_keep_the_compute_dtype():
    torch.manual_seed(0)
    model = Transformer(tiny()).to(torch.bfloat16)
    out = model(torch.randint(0, 97, (1, 4)))
    assert out.logits.dtype == torch.bfloat16
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(loss)
