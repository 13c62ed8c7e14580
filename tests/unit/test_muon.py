"""optim.name muon: the update equals a reference written from the paper's equations, the param
groups are as documented, and a stopped-and-resumed run is bitwise the uninterrupted one."""

import json
import math

import pytest
import torch
from jobs import make_dataset, tiny_config
from torch import nn

from lmforge.config import OptimConfig
from lmforge.model import Transformer
from lmforge.model.config import ModelConfig
from lmforge.train import trainer
from lmforge.train.muon import Muon, MuonAdamW, newton_schulz
from lmforge.train.optim import build_optimizer, muon_param_groups
from lmforge.train.schedule import LrSchedule


# --- reference: Jordan et al.'s Muon, Moonlight's RMS rule, in float64 with explicit steps -------
def ref_orthogonalise(m: torch.Tensor, steps: int) -> torch.Tensor:
    """Quintic Newton-Schulz on one matrix: X0 = M/||M||_F, X <- aX + b(XX^T)X + c(XX^T)^2 X."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.double()
    flip = x.shape[0] > x.shape[1]
    if flip:
        x = x.t()
    x = x / max(torch.linalg.matrix_norm(x).item(), 1e-7)
    for _ in range(steps):
        xxt = x @ x.t()
        x = a * x + b * (xxt @ x) + c * (xxt @ xxt @ x)
    return x.t() if flip else x


def ref_muon_step(w, g, buf, lr, mu, wd, nesterov, steps, rule):
    """One Muon step on a [rows, cols] matrix; returns (new weight, new momentum), float64."""
    buf = mu * buf + (1 - mu) * g.double()
    u = (1 - mu) * g.double() + mu * buf if nesterov else buf
    o = ref_orthogonalise(u, steps)
    rows, cols = w.shape
    scale = {
        "original": math.sqrt(max(1.0, rows / cols)),
        "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols)),
    }
    w = w.double() * (1 - lr * wd) - lr * scale.get(rule, 1.0) * o
    return w, buf


@pytest.mark.parametrize("nesterov,rule", [(True, "match_rms_adamw"), (False, "original"), (True, "none")])
def test_muon_update_equals_reference_to_1e6(nesterov, rule):
    torch.manual_seed(0)
    shapes = [(24, 16), (16, 40), (32, 32)]
    params = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    opt = Muon(params, lr=0.02, momentum=0.9, nesterov=nesterov, ns_steps=5, adjust_lr=rule, weight_decay=0.1)
    ref = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64)) for p in params]
    for _ in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref = [ref_muon_step(w, g, b, 0.02, 0.9, 0.1, nesterov, 5, rule) for (w, b), g in zip(ref, grads)]
    for p, (w, b) in zip(params, ref):
        assert torch.allclose(p.double(), w, atol=1e-6, rtol=0), (p.double() - w).abs().max()
        assert torch.allclose(opt.state[p]["momentum_buffer"].double(), b, atol=1e-6, rtol=0)


def test_stacked_expert_weights_are_orthogonalised_one_matrix_at_a_time():
    torch.manual_seed(1)
    stack = torch.randn(3, 12, 20)
    out = newton_schulz(stack, 5)
    for e in range(3):
        assert torch.allclose(out[e].double(), ref_orthogonalise(stack[e], 5), atol=1e-6)
    # ... and a NS step ~orthogonalises: singular values near 1, unlike the input's
    s = torch.linalg.svdvals(out[0])
    assert s.min() > 0.5 and s.max() < 1.5


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
def test_same_equations_as_torch_optim_muon_in_its_bfloat16():
    torch.manual_seed(2)
    w0, g = torch.randn(32, 48) * 0.1, torch.randn(32, 48)
    ours, theirs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(lr=0.05, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1)
    a = Muon([ours], adjust_lr="match_rms_adamw", ns_dtype="bfloat16", **kw)
    b = torch.optim.Muon([theirs], adjust_lr_fn="match_rms_adamw", **kw)
    for _ in range(2):
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    ours_step, their_step = (ours - w0).detach(), (theirs - w0).detach()
    # bfloat16 rounding in different op orders: a few percent of the step, not a different rule
    assert (ours_step - their_step).norm() < 0.05 * their_step.norm()
    assert torch.nn.functional.cosine_similarity(ours_step.flatten(), their_step.flatten(), dim=0) > 0.999


def _model(**kw):
    base = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
    )
    base.update(kw)
    return Transformer(ModelConfig(**base))


@pytest.mark.parametrize(
    "kw",
    [
        {"tie_embeddings": True},
        {"tie_embeddings": False},
        {"moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1}},
    ],
)
def test_param_groups_no_vector_embedding_output_or_router_in_muon(kw):
    model = _model(**kw)
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.05, muon_weight_decay=0.2)
    muon_groups, adamw_groups = muon_param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = [names[id(p)] for g in muon_groups for p in g["params"]]
    in_adamw = [names[id(p)] for g in adamw_groups for p in g["params"]]
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # every parameter exactly once
    for n in in_muon:
        assert n.rsplit(".", 2)[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), n
    assert all(p.ndim >= 2 for g in muon_groups for p in g["params"])
    assert "tok_embeddings.weight" in in_adamw and "norm.weight" in in_adamw
    if not kw.get("tie_embeddings", True):
        assert "output.weight" in in_adamw
    if "moe" in kw:
        assert "layers.0.feed_forward.router.weight" in in_adamw
        assert "layers.0.feed_forward.experts.3.w2.weight" in in_muon
    assert muon_groups[0]["lr"] == 0.02 and muon_groups[0]["weight_decay"] == 0.2
    # decayed AdamW matrices: an untied output layer and routers (embeddings only with decay_embeddings)
    decayed = {names[id(p)] for g in adamw_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert decayed == {n for n in in_adamw if n == "output.weight" or ".router." in n}


def test_one_optimizer_object_state_dict_round_trip_and_adamw_part_is_torch_adamw():
    torch.manual_seed(3)
    model, twin = _model(), _model()
    twin.load_state_dict(model.state_dict())
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, fused="off")
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    sched = LrSchedule(opt, lambda s: 0.5)  # each group's own base rate (optim.lr, optim.muon_lr) x 0.5
    assert [g["lr"] for g in opt.param_groups] == [0.0005, 0.01]  # tied: embeddings+norms, matrices
    _, adamw_groups = muon_param_groups(twin, cfg)
    ref = torch.optim.AdamW(adamw_groups, lr=5e-4, betas=cfg.betas, eps=cfg.eps, foreach=False)
    ids = torch.randint(0, 64, (2, 8))
    for m, o in ((model, opt), (twin, ref)):
        m(ids).logits.sum().backward()
        o.step()
    assert torch.equal(model.tok_embeddings.weight, twin.tok_embeddings.weight)
    assert torch.equal(model.norm.weight, twin.norm.weight)
    assert not torch.equal(model.layers[0].attention.wq.weight, twin.layers[0].attention.wq.weight)
    sd = opt.state_dict()
    fresh = build_optimizer(model, cfg)
    fresh.load_state_dict(sd)
    wq = model.layers[0].attention.wq.weight
    assert fresh._muon.state is fresh.state and "momentum_buffer" in fresh.state[wq]
    assert torch.equal(fresh.state[wq]["momentum_buffer"], opt.state[wq]["momentum_buffer"])
    assert sched.lrs(sched.position)[1] == 0.01 == opt.param_groups[1]["lr"]


def _curve(tmp, name):
    recs = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr")) for r in recs if "loss" in r]


def test_muon_run_stopped_and_resumed_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "data")
    kw = dict(optim__name="muon", optim__muon_lr=0.02, train__max_steps=6, checkpoint__interval=2)
    full = trainer.run_training(tiny_config(tmp_path, data, run__name="ref", **kw))
    real = trainer._Trainer._should_stop
    monkeypatch.setattr(trainer._Trainer, "_should_stop", lambda self: self.state.step == 3 or real(self))
    stopped = trainer.run_training(tiny_config(tmp_path, data, run__name="b", **kw))
    assert stopped["preempted"] and stopped["steps"] == 3
    monkeypatch.undo()
    resumed = trainer.run_training(tiny_config(tmp_path, data, run__name="b", **kw))
    assert resumed["resumed_from"].endswith("step_3")
    assert _curve(tmp_path, "b") == _curve(tmp_path, "ref")
    assert full["loss"] < full["first_loss"]


@pytest.mark.parametrize("first, then", [("adamw", "muon"), ("muon", "adamw")])
def test_resume_that_switches_optim_name_is_one_line_naming_it(tmp_path, first, then):
    from lmforge.errors import CheckpointError

    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "data")
    kw = dict(checkpoint__interval=2, train__eval_interval=0, log__plots=False)
    trainer.run_training(tiny_config(tmp_path, data, optim__name=first, train__max_steps=2, **kw))
    with pytest.raises(CheckpointError) as err:
        trainer.run_training(tiny_config(tmp_path, data, optim__name=then, train__max_steps=4, **kw))
    message = str(err.value)
    assert "\n" not in message and message.endswith("run_mode=finetune, train.load_checkpoint=" + message.split(": ")[0] + ")")
    assert f"trained with optim.name {first}, but this run sets optim.name {then}" in message
    assert f"resume with optim.name={first}" in message
