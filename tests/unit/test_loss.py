"""The fused, chunked linear + cross-entropy gives the loss and gradients of the plain logits path
(fp32 tolerance), with IGNORE_INDEX targets, any chunk size, tied and untied output weights,
autocast, without gradients, and under FSDP2 on 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
from jobs import run_reaped

from lmforge.config import ModelConfig
from lmforge.loss import (
    IGNORE_INDEX,
    LanguageModelLoss,
    fused_linear_cross_entropy,
    output_weight_is_tensor_parallel,
    summed_cross_entropy,
    summed_z_loss,
)
from lmforge.model import Transformer

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=64)


def _labels(shape, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::3] = IGNORE_INDEX  # every third position carries no loss
    return labels


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_fused_matches_plain_loss_and_grads(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=True)
    labels = _labels((3, 11), 50)
    ref = summed_cross_entropy(hidden @ weight.t(), labels)
    ref_h, ref_w = torch.autograd.grad(ref * 0.5, (hidden, weight))
    out = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, use_liger=False)
    got_h, got_w = torch.autograd.grad(out * 0.5, (hidden, weight))  # upstream grad is scaled
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)


def test_all_ignored_is_zero_with_zero_grads():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.full((5,), IGNORE_INDEX)
    out = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=2)
    out.backward()
    assert out.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_without_grad_and_only_one_input_needing_grad():
    hidden = torch.randn(9, 8)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = _labels((9,), 13)
    ref = summed_cross_entropy(hidden @ weight.t(), labels)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4), ref)
    (got_w,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4), weight)
    (ref_w,) = torch.autograd.grad(ref, weight)
    torch.testing.assert_close(got_w, ref_w)


def test_autocast_bf16_matches_autocast_logits():
    torch.manual_seed(1)
    hidden = torch.randn(16, 32, requires_grad=True)
    weight = torch.randn(40, 32, requires_grad=True)
    labels = _labels((16,), 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = summed_cross_entropy(torch.nn.functional.linear(hidden, weight), labels)
        out = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=5)
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    got_h, got_w = torch.autograd.grad(out, (hidden, weight))
    assert out.dtype == torch.float32 and got_w.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)  # same bf16 logits, fp32 softmax
    torch.testing.assert_close(got_h, ref_h, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_w, ref_w, rtol=2e-2, atol=2e-2)


def test_fused_loss_finds_the_output_weight_inside_wrappers():
    """The model a wrapper holds as a submodule (torch.compile here; DDP keeps it as .module the
    same way) is asked for its output weight; a module with none gets the logits path."""
    model = Transformer(ModelConfig(**TINY))
    loss = LanguageModelLoss(fused=True)
    assert loss.forward_kwargs(model) == {"return_hidden": True}
    assert loss.forward_kwargs(torch.compile(model)) == {"return_hidden": True}
    assert loss.forward_kwargs(torch.nn.Sequential(torch.nn.Linear(2, 2))) == {}
    assert LanguageModelLoss(fused=False).forward_kwargs(model) == {}


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_fused_equals_logits_path(tied):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, tie_embeddings=tied))
    ids = torch.randint(0, 97, (2, 12))
    batch = {"input_ids": ids, "labels": _labels((2, 12), 97)}
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        ce, aux = LanguageModelLoss(fused)(model, batch)
        (ce + aux).backward()
        grads.append((ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_g), (got, got_g) = grads
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert ref_g.keys() == got_g.keys()
    for name in ref_g:
        torch.testing.assert_close(got_g[name], ref_g[name], rtol=1e-4, atol=1e-6, msg=name)


def test_plain_weight_is_not_tensor_parallel():
    assert not output_weight_is_tensor_parallel(torch.zeros(3, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fused_loss_under_fsdp2_matches_plain(tmp_path):
    """2 gloo ranks, FSDP2 on every block and the root (tied embedding in the root unit): the fused
    loss and every gathered gradient equal the logits path's."""
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={_free_port()}", __file__, str(out)]
    proc = run_reaped(cmd, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["params"] > 5
    assert result["loss_diff"] < 1e-4, result
    assert result["grad_diff"] < 1e-5, result
    assert result["tp_flags"] == [False, True, False]  # FSDP shard, TP vocab shard, TP replicated


def _fsdp_worker(out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, tie_embeddings=True))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(10 + rank)  # each rank its own batch
    batch = {"input_ids": torch.randint(0, 97, (2, 12)), "labels": _labels((2, 12), 97, seed=rank)}
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        ce, aux = LanguageModelLoss(fused)(model, batch)
        (ce + aux).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        results.append((ce.detach(), grads))
    (ref, ref_g), (got, got_g) = results
    grad_diff = max((got_g[n] - ref_g[n]).abs().max().item() for n in ref_g)
    # which output weights take the fused path: FSDP shards yes, a vocab-sharded TP weight no
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    tp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    fsdp_weight = model.output_weight()
    tp_weight = distribute_tensor(torch.randn(8, 4), tp_mesh, [Shard(0)])
    tp_replicated = distribute_tensor(torch.randn(8, 4), tp_mesh, [Replicate()])
    flags = [output_weight_is_tensor_parallel(w) for w in (fsdp_weight, tp_weight, tp_replicated)]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"loss_diff": abs(got - ref).item(), "grad_diff": grad_diff,
                       "params": len(ref_g), "tp_flags": flags}, f)
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])


def _direct_z_loss(logits, labels, coef):
    """coef x sum over target tokens of logsumexp(logits)^2, written out from the definition."""
    total = torch.zeros((), dtype=torch.float64)
    for row, label in zip(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)):
        if label != IGNORE_INDEX:
            total += torch.log(torch.exp(row).sum()) ** 2
    return coef * total


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_z_loss_equals_a_direct_computation_on_both_paths(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=True)
    labels = _labels((3, 11), 50)
    coef = 0.01
    logits = hidden @ weight.t()
    ref = summed_cross_entropy(logits, labels) + _direct_z_loss(logits, labels, coef).float()
    ref_h, ref_w = torch.autograd.grad(ref * 0.5, (hidden, weight))
    plain = summed_cross_entropy(logits, labels) + summed_z_loss(logits, labels, coef)
    fused = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk, use_liger=False, z_loss=coef)
    got_h, got_w = torch.autograd.grad(fused * 0.5, (hidden, weight))
    assert float(_direct_z_loss(logits.detach(), labels, coef)) > 1.0  # the term is large enough to be seen
    torch.testing.assert_close(plain, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_model_z_loss_in_training_only_and_zero_changes_nothing(fused):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    batch = {"input_ids": torch.randint(0, 97, (2, 12)), "labels": _labels((2, 12), 97)}
    base, _ = LanguageModelLoss(fused)(model, batch)
    off, _ = LanguageModelLoss(fused, z_loss=0.0)(model, batch)
    on, _ = LanguageModelLoss(fused, z_loss=1e-3)(model, batch)
    logits = model(batch["input_ids"]).logits
    assert torch.equal(off, base)  # 0.0 is bitwise the plain loss
    torch.testing.assert_close(on, base + _direct_z_loss(logits, batch["labels"], 1e-3).float(), rtol=1e-6, atol=1e-5)
    with torch.no_grad():  # validation: plain CE
        assert torch.equal(LanguageModelLoss(fused, z_loss=1e-3)(model, batch)[0], LanguageModelLoss(fused)(model, batch)[0])


def test_z_loss_with_vocab_parallel_logits_is_refused():
    from lmforge.config import config_from_dict
    from lmforge.errors import ConfigError

    tree = {"model": dict(TINY), "data": {"seq_len": 64}, "parallel": {"strategy": "fsdp+tp", "tp": 2, "loss_parallel": True}, "train": {"z_loss": 1e-4}}
    with pytest.raises(ConfigError, match="train.z_loss"):
        config_from_dict(tree, "<test>")
    tree["train"]["z_loss"] = 0.0
    assert config_from_dict(tree, "<test>").train.z_loss == 0.0
