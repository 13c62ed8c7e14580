"""Optimizer groups, schedules and step budgets (no model or data needed)."""

import math

import pytest
import torch
from torch import nn

from lmforge.config import config_from_dict
from lmforge.errors import ConfigError
from lmforge.train.optim import build_optimizer, param_groups
from lmforge.train.schedule import build_schedule, lr_multiplier, total_steps


class TinyLM(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.tok_embeddings = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.norm = nn.LayerNorm(8)
        self.output = nn.Linear(8, 16, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_weight_decay_only_on_matrices_not_embeddings_norms_biases():
    cfg = config_from_dict({"optim": {"weight_decay": 0.1}}).optim
    model = TinyLM(tie=False)
    decay, no_decay = param_groups(model, cfg)
    assert _names(model, decay) == ["output.weight", "proj.weight"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert _names(model, no_decay) == ["norm.bias", "norm.weight", "proj.bias", "tok_embeddings.weight"]


def test_tied_embedding_counted_once_and_decayed_only_when_asked():
    model = TinyLM(tie=True)
    cfg = config_from_dict({"optim": {"decay_embeddings": True}}).optim
    groups = param_groups(model, cfg)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    assert "tok_embeddings.weight" in _names(model, groups[0])
    opt = build_optimizer(model, cfg)
    assert opt.defaults["foreach"] is True  # CPU: foreach, never fused


def test_minimind_cosine_is_expressible():
    base, total = 5e-4, 1000
    cfg = config_from_dict(
        {"optim": {"schedule": "cosine", "lr": 1.1 * base, "min_lr_ratio": 1 / 11, "warmup_steps": 0}}
    ).optim
    mult = lr_multiplier(cfg, total)
    for step in (0, 1, 250, 500, 999, 1000):
        minimind = base / 10 + 0.5 * base * (1 + math.cos(math.pi * step / total))
        assert cfg.lr * mult(step) == pytest.approx(minimind, rel=1e-12)


def test_warmup_cosine_wsd_constant_shapes():
    def mult(**optim):
        return lr_multiplier(config_from_dict({"optim": optim}).optim, 100)

    cos = mult(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.1)
    assert cos(55) == pytest.approx(0.55)
    wsd = mult(schedule="wsd", warmup_steps=10, decay_ratio=0.2, min_lr_ratio=0.0)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == 0.0
    const = mult(schedule="constant", warmup_steps=4)
    assert const(1) == pytest.approx(0.5) and const(80) == 1.0


def test_lambda_lr_drives_optimizer_lr():
    model = TinyLM()
    cfg = config_from_dict({"optim": {"lr": 1e-3, "warmup_steps": 2}}).optim
    opt = build_optimizer(model, cfg)
    sched = build_schedule(opt, cfg, 10)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3])


def test_total_steps_from_steps_tokens_or_epochs():
    base = {"data": {"seq_len": 16}, "train": {"global_batch_size": 4}}
    assert total_steps(config_from_dict({**base, "train": {"global_batch_size": 4, "max_steps": 7}})) == 7
    by_tokens = config_from_dict({**base, "train": {"global_batch_size": 4, "max_tokens": 640}})
    assert total_steps(by_tokens) == 10  # 640 / (4 * 16)
    by_epochs = config_from_dict({**base, "train": {"global_batch_size": 4, "epochs": 2}})
    assert total_steps(by_epochs, samples_per_epoch=10) == 5
    with pytest.raises(ConfigError, match="max_steps"):
        total_steps(config_from_dict(base))


def test_adamw_step_changes_matrices_only_via_decay_group():
    torch.manual_seed(0)
    model = TinyLM(tie=False)
    cfg = config_from_dict({"optim": {"lr": 0.1, "weight_decay": 0.5}}).optim
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only decoupled weight decay moves anything
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"proj.weight", "output.weight"}
