"""The planner against what a tiny model really holds on CPU: parameter, gradient and AdamW state
bytes exactly, and saved activations within 20% with and without activation checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import config_from_dict
from lmforge.model import Transformer
from lmforge.parallel.activation import apply_activation_checkpointing
from lmforge.parallel.plan import GIB, Layout, activation_bytes, param_shapes, plan, plan_report, state_bytes

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _model_cfg(**over):
    tree = {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_position_embeddings": 128,
        **over,
    }
    return config_from_dict({"model": tree, "data": {"seq_len": 64}}).model


SHAPES = [
    {},
    {"tie_embeddings": False, "attention_bias": True, "mlp_bias": True},
    {"qk_norm": True, "num_kv_heads": 4},
    {"moe": {"num_experts": 3, "top_k": 2, "num_shared_experts": 1}},
]


@pytest.mark.parametrize("over", SHAPES)
def test_param_shapes_match_the_model(over):
    cfg = _model_cfg(**over)
    with torch.device("meta"):
        model = Transformer(cfg)
    real = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert sorted(real) == sorted((n, s) for n, s, _ in param_shapes(cfg))


@pytest.mark.parametrize("over", SHAPES[:3])
def test_state_bytes_equal_what_adamw_allocates(over):
    cfg = _model_cfg(**over)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    measured = {
        "parameters": sum(p.nbytes for p in model.parameters()),
        "gradients": sum(p.grad.nbytes for p in model.parameters()),
        "optimizer": sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t)),
    }
    assert state_bytes(cfg, Layout("single")) == measured


def test_sharded_state_bytes_divide_with_padding():
    cfg = _model_cfg()
    full = state_bytes(cfg, Layout("single"))["parameters"]
    shard4 = state_bytes(cfg, Layout("fsdp", dp_shard=4))["parameters"]
    tp2 = state_bytes(cfg, Layout("fsdp+tp", dp_shard=2, tp=2))["parameters"]
    assert full / 4 <= shard4 < full / 4 * 1.05  # norms (dim 64) pad nothing; all rows split evenly
    assert full / 4 <= tp2 < full / 4 * 1.05


def _measured_activations(cfg, batch, seq, ac):
    """Bytes of distinct storages autograd saves (params and buffers excluded); under AC also the
    block inputs each checkpoint keeps for its recomputation (those bypass the saved-tensor hooks)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_activation_checkpointing(model, ac)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    inputs: dict[int, int] = {}

    def keep_input(module, args):
        st = args[0].untyped_storage()
        inputs[st.data_ptr()] = st.nbytes()

    for block in model.layers:
        block.register_forward_pre_hook(keep_input)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    total = sum(saved.values())
    if ac != "none":
        total += sum(n for ptr, n in inputs.items() if ptr not in saved)
    loss.backward()  # the graph really was complete
    return total


@pytest.mark.parametrize("ac", ["none", "full"])
@pytest.mark.parametrize("over, batch, seq", [({}, 4, 64), ({"num_kv_heads": 1, "hidden_size": 96}, 2, 128)])
def test_activation_bytes_within_20_percent(over, batch, seq, ac):
    cfg = _model_cfg(**over, max_position_embeddings=256)
    measured = _measured_activations(cfg, batch, seq, ac)
    predicted = activation_bytes(cfg, seq, batch, ac, s=4)["saved"]
    assert abs(predicted - measured) / measured < 0.2, (predicted, measured)


def test_checkpointing_saves_most_activation_memory():
    cfg = _model_cfg(num_layers=8)
    none = activation_bytes(cfg, 64, 4, "none", s=4)["saved"]
    full = activation_bytes(cfg, 64, 4, "full", s=4)["saved"]
    assert full < none / 2


def _cfg(preset, seq, batch):
    return config_from_dict(
        {"model": {"preset": preset}, "data": {"seq_len": seq}, "train": {"global_batch_size": batch}}
    )


def test_llama3_70b_on_64_gpus_has_a_recommendation():
    report = plan_report(_cfg("llama3-70b", 8192, 512), 64, 80)
    assert "recommended:" in report and "tokens/s" in report
    assert "not ddp tp1 AC none: needs" in report  # says why the cheaper layouts do not fit


def test_llama3_8b_does_not_fit_one_80gib_gpu():
    cfg = _cfg("llama3-8b", 8192, 512)
    assert "nothing fits" in plan_report(cfg, 1, 80)
    # fp32 params + grads + AdamW alone are 16 bytes per parameter, ~120 GiB.
    p = plan(cfg, Layout("single", ac="full"))
    assert p["parameters"] + p["gradients"] + p["optimizer"] > 110 * GIB


def test_plan_rejects_impossible_requests():
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="train.global_batch_size: 1024 is not divisible"):
        plan_report(_cfg("llama2-7b", 4096, 1024), 3)
    with pytest.raises(ConfigError, match="need gpus >= 1"):
        plan_report(_cfg("llama2-7b", 4096, 1024), 0)
