"""Optimizer groups, schedules and step budgets (no model or data needed)."""

import math

import pytest
import torch
from torch import nn

from lmforge.config import config_from_dict
from lmforge.errors import ConfigError
from lmforge.model import Transformer
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
    assert opt.defaults["fused"] is True  # CPU, plain parameters: the fused kernel (torch >= 2.4)


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


def test_lr_is_a_pure_function_of_the_step():
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
    # The same rates, bit for bit, as torch's LambdaLR over the same multiplier (what checkpoints
    # before the step-function schedule used), and a jump to step k is k steps taken.
    twin = build_optimizer(model, cfg)
    ref = torch.optim.lr_scheduler.LambdaLR(twin, lr_multiplier(cfg, 10))
    fresh = build_schedule(build_optimizer(model, cfg), cfg, 10)
    for step in range(10):
        fresh.resume(step)
        assert [g["lr"] for g in twin.param_groups] == [g["lr"] for g in fresh.optimizer.param_groups]
        twin.step()
        ref.step()
    # Muon's matrices keep their own base rate (optim.muon_lr), scaled by the same multiplier.
    muon_cfg = config_from_dict({"optim": {"name": "muon", "lr": 1e-3, "muon_lr": 0.02, "warmup_steps": 4}}).optim
    tiny = config_from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 32}}).model
    muon = build_optimizer(Transformer(tiny), muon_cfg)
    build_schedule(muon, muon_cfg, 10).resume(1)
    assert sorted(g["lr"] for g in muon.param_groups)[-1] == pytest.approx(0.02 * 2 / 4, rel=1e-15)
    assert sorted(g["lr"] for g in muon.param_groups)[0] == pytest.approx(1e-3 * 2 / 4, rel=1e-15)


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


# ---------------------------------------------------------------------------------------------
# The training loop on the `tiny` preset and a synthetic shard folder


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grad_accumulation_equals_one_big_batch_with_unequal_masks():
    from lmforge.model import Transformer
    from lmforge.parallel import ParallelContext
    from lmforge.train.step import accumulate_gradients, autocast_context

    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 16}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ids = torch.randint(3, 512, (4, 16))
    labels = ids.clone()
    labels[0, 3:] = -100  # padded samples with very different numbers of target tokens
    labels[1, 12:] = -100
    labels[3, :1] = -100
    ctx, amp = ParallelContext(), autocast_context(torch.device("cpu"), torch.float32)

    def grads(batches):
        model.zero_grad(set_to_none=True)
        loss, n = accumulate_gradients(model, batches, ctx, amp)
        return loss, n, {k: p.grad.clone() for k, p in model.named_parameters()}

    big_loss, big_n, big = grads([{"input_ids": ids, "labels": labels}])
    split = [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(4)]
    acc_loss, acc_n, acc = grads(split)
    assert big_n.item() == acc_n.item() == (labels != -100).sum().item()
    assert acc_loss.item() == pytest.approx(big_loss.item(), abs=1e-6)
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-6, rtol=0), name
    # the same tokens as a plain token-mean cross-entropy
    ref = torch.nn.functional.cross_entropy(
        model(ids).logits.view(-1, 512), labels.view(-1), ignore_index=-100
    )
    assert big_loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_training_reduces_loss_and_writes_metrics_checkpoints_plots(tmp_path):
    from jobs import make_dataset, tiny_config

    from lmforge.train.report import report
    from lmforge.train.trainer import run_training

    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(
        tmp_path, data, train__max_steps=8, train__eval_interval=4, log__plots=True, log__tensorboard=True
    )
    summary = run_training(cfg)
    run = tmp_path / "runs" / "t"
    recs = _records(run)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem", "elapsed"):
        assert key in train[0], key
    assert train[0]["mfu"] is None and train[-1]["tokens"] == 8 * 4 * 32 and train[0]["mem"] > 0
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and train[-1]["loss"] < train[0]["loss"] - 0.2
    assert summary["steps"] == 8 and summary["val_loss"] == evals[-1]["val_loss"] and not summary["preempted"]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "latest",
        "step_6",
        "step_8",
    ]  # interval 3 + end, keep 2
    assert (ckpts / "latest").read_text().strip() == "step_8"
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert (run / "plots" / name).stat().st_size > 1000
    (run / "plots" / "loss.png").unlink()
    text = report(run)
    assert "steps          8" in text and (run / "plots" / "loss.png").is_file()


def test_fp16_grad_scaler_path_on_cpu(tmp_path):
    from jobs import make_dataset, tiny_config

    from lmforge.train.trainer import run_training
    from lmforge.weights.checkpoint import read_state

    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, train__max_steps=2, train__dtype="float16", train__eval_interval=0)
    summary = run_training(cfg)
    assert math.isfinite(summary["loss"])
    scaler = read_state(tmp_path / "runs" / "t" / "checkpoints" / "step_2")["scaler"]
    assert scaler is not None and scaler["scale"] > 0


def test_peak_flops_by_device_name(monkeypatch):
    from lmforge.train import mfu

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, want in [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40", 181e12),
        ("Some Unknown GPU", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, name=name: name)
        assert mfu.peak_flops(gpu, torch.bfloat16) == want, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d: "NVIDIA H100 80GB HBM3")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # true fp32 matmuls: no tensor-core peak
        assert mfu.peak_flops(gpu, torch.float32) is None
        torch.set_float32_matmul_precision("high")  # TF32
        assert mfu.peak_flops(gpu, torch.float32) == 494.7e12
    finally:
        torch.set_float32_matmul_precision(before)
    assert mfu.peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_fp16_scaler_agrees_across_ranks_when_gradients_are_sharded():
    # Under FSDP2 / TP a rank sees only its shards' overflows; the sharded scaler all-reduces the
    # flag so every rank skips the same steps. Replicated gradients (DDP, one process) need none.
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from lmforge.train.step import make_scaler

    cpu = torch.device("cpu")
    assert isinstance(make_scaler(cpu, torch.float16, sharded=True), ShardedGradScaler)
    plain = make_scaler(cpu, torch.float16, sharded=False)
    assert isinstance(plain, torch.amp.GradScaler) and not isinstance(plain, ShardedGradScaler)
    assert make_scaler(cpu, torch.bfloat16, sharded=True) is None


def test_non_finite_loss_skips_steps_then_stops_without_overwriting(tmp_path, monkeypatch):
    from jobs import make_dataset, tiny_config

    from lmforge.errors import LmforgeError
    from lmforge.train import step, trainer

    real = step.accumulate_gradients
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, n = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 3 else loss), n

    monkeypatch.setattr(step, "accumulate_gradients", poisoned)
    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data, train__max_steps=8, train__max_bad_steps=2, checkpoint__interval=2)
    with pytest.raises(LmforgeError) as err:
        trainer.run_training(cfg)
    msg = str(err.value)
    assert "2 steps in a row at step 4" in msg and "step_2" in msg and "lower optim.lr" in msg
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2"]
    assert (ckpts / "latest").read_text().strip() == "step_2"


def test_bad_inputs_are_one_line_errors(tmp_path):
    from jobs import make_dataset, tiny_config

    from lmforge.errors import CheckpointError, DataError, LmforgeError
    from lmforge.train.trainer import run_training

    missing = tiny_config(tmp_path, tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"data\.train: .*nope is not a folder"):
        run_training(missing)
    typo = tiny_config(tmp_path, make_dataset(tmp_path / "ok"), tokenizer__path=str(tmp_path / "tokenizr"))
    with pytest.raises(LmforgeError, match="tokenizr") as err:
        run_training(typo)
    assert "\n" not in str(err.value)
    big_vocab = make_dataset(tmp_path / "big", vocab_size=1000)
    with pytest.raises(DataError, match=r"model\.vocab_size 512 is smaller"):
        run_training(tiny_config(tmp_path, big_vocab))
    data = make_dataset(tmp_path / "data")
    run_training(tiny_config(tmp_path, data, train__max_steps=1, train__eval_interval=0))
    changed = tiny_config(tmp_path, data, train__max_steps=2, model__hidden_size=32)
    with pytest.raises(CheckpointError, match=r"model\.hidden_size \(64 in checkpoint, 32 now\)") as err:
        run_training(changed)
    assert "\n" not in str(err.value)
    with pytest.raises(LmforgeError, match="load_checkpoint"):
        run_training(tiny_config(tmp_path, data, run_mode="finetune", run__name="ft"))
    with pytest.raises(CheckpointError, match="earlier run and train.resume=never"):
        run_training(tiny_config(tmp_path, data, train__resume="never"))
    assert (tmp_path / "runs" / "t" / "checkpoints" / "step_1" / "state.json").is_file()


def test_finetune_starts_from_weights_with_fresh_optimizer(tmp_path):
    from jobs import make_dataset, tiny_config

    from lmforge.train.trainer import run_training

    data = make_dataset(tmp_path / "data")
    base = run_training(tiny_config(tmp_path, data, train__max_steps=2, train__eval_interval=0))
    cfg = tiny_config(
        tmp_path,
        data,
        run_mode="finetune",
        run__name="ft",
        train__load_checkpoint=base["checkpoint"],
        train__max_steps=1,
        train__eval_interval=0,
        data__mode="padded",
        data__seq_len=16,
    )
    summary = run_training(cfg)
    assert summary["steps"] == 1 and summary["resumed_from"] is None
    scratch = run_training(
        tiny_config(
            tmp_path,
            data,
            run__name="scratch",
            train__max_steps=1,
            train__eval_interval=0,
            data__mode="padded",
            data__seq_len=16,
        )
    )
    assert summary["loss"] < scratch["loss"]  # it started from the pretrained weights


def test_samples_are_generated_with_the_run_tokenizer(tmp_path):
    import json

    from jobs import make_dataset, tiny_config

    from lmforge.tokenizer import load_tokenizer, train_tokenizer
    from lmforge.train.trainer import run_training

    text = tmp_path / "corpus.txt"
    text.write_text(
        "\n".join(f"The cat number {i} sat on the mat and looked at the sky." for i in range(200))
    )
    tok_dir = train_tokenizer([str(text)], 300, tmp_path / "tok")
    tok = load_tokenizer(tok_dir)
    data = make_dataset(tmp_path / "data", vocab_size=300, fingerprint=tok.fingerprint)
    cfg = tiny_config(
        tmp_path,
        data,
        train__max_steps=2,
        train__eval_interval=0,
        tokenizer__path=str(tok_dir),
        train__sample_prompts=["The cat", "Once"],
        train__sample_max_new_tokens=4,
    )
    run_training(cfg)
    samples = [json.loads(x) for x in (tmp_path / "runs" / "t" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(2, "The cat"), (2, "Once")]
    assert all(isinstance(s["text"], str) and s["text"] for s in samples)
    # a tokenizer other than the one the data was prepared with is refused
    other = make_dataset(tmp_path / "other", vocab_size=300, fingerprint="someone-else")
    with pytest.raises(Exception, match="prepared with tokenizer someone-else"):
        run_training(tiny_config(tmp_path, other, run__name="o", tokenizer__path=str(tok_dir)))


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from jobs import make_dataset, tiny_config

    from lmforge.errors import LmforgeError
    from lmforge.train.trainer import run_training

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    data = make_dataset(tmp_path / "data")
    with pytest.raises(LmforgeError, match="wandb package is not installed"):
        run_training(tiny_config(tmp_path, data, log__wandb=True))


def test_moe_aux_loss_is_part_of_the_step_loss():
    from lmforge.model import Transformer
    from lmforge.parallel import ParallelContext
    from lmforge.train.step import accumulate_gradients, autocast_context

    cfg = config_from_dict({"model": {"preset": "tiny-moe"}, "data": {"seq_len": 16}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ids = torch.randint(3, 512, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    loss, _ = accumulate_gradients(
        model, [batch], ParallelContext(), autocast_context(torch.device("cpu"), torch.float32)
    )
    with torch.no_grad():
        out = model(ids)
    ce = torch.nn.functional.cross_entropy(out.logits.view(-1, 512), ids.view(-1))
    assert out.aux_loss.item() > 0
    assert loss.item() == pytest.approx((ce + out.aux_loss).item(), abs=1e-6)


def test_training_without_validation_split_and_checkpoint_reads_for_inference(tmp_path, capsys):
    from jobs import make_dataset, tiny_config

    from lmforge.interop.loading import load_weights
    from lmforge.train.trainer import run_training

    data = make_dataset(tmp_path / "data", val=False)
    summary = run_training(tiny_config(tmp_path, data, train__max_steps=1))
    out = capsys.readouterr().out
    assert summary["val_loss"] is None and f"note: no validation: {data} has no val split" in out
    assert "--val-fraction above 0" in out and "re-run lmforge prepare" not in out  # what applies
    state, cfg, _ = load_weights(summary["checkpoint"])
    assert cfg.model.hidden_size == 64 and state["tok_embeddings.weight"].shape == (512, 64)


def test_validation_under_document_mask_scores_each_document_alone(tmp_path):
    """With data.document_mask, validation sees the masks training sees: its loss equals running
    every document piece of every window through the model on its own (RoPE is relative, so the
    absolute positions of a masked piece do not matter)."""
    import contextlib

    from jobs import make_dataset, tiny_config

    from lmforge.data.loader import build_loader
    from lmforge.loss import summed_cross_entropy
    from lmforge.model import Transformer
    from lmforge.parallel.distributed import ParallelContext
    from lmforge.train.evaluation import validate
    from lmforge.train.step import TrainStep

    data = make_dataset(tmp_path / "data", min_len=5, max_len=14)
    cfg = tiny_config(tmp_path, data, data__document_mask=True)
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    loader = build_loader(cfg.data, "val", micro_batch_size=2)
    ctx = ParallelContext()
    step = TrainStep(model, None, None, None, ctx, contextlib.nullcontext(), 0.0)
    got = validate(step, loader, ctx, max_batches=3)
    loss_sum, tokens, pieces = 0.0, 0, 0
    loader.reset()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= 3:
                break
            for row in range(batch["input_ids"].size(0)):
                docs = batch["doc_ids"][row]
                for d in docs.unique().tolist():
                    keep = docs == d
                    ids, labels = batch["input_ids"][row][keep], batch["labels"][row][keep]
                    logits = model(ids[None]).logits
                    loss_sum += float(summed_cross_entropy(logits, labels[None]))
                    tokens += int((labels != -100).sum())
                    pieces += 1
    loader.close()
    assert pieces > 2 * 3  # several documents per window, or the check proves nothing
    assert got["val_tokens"] == tokens
    assert got["val_loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_training_validation_and_evaluate_are_one_loop(tmp_path):
    # validate (the train step's eval_sums, reduced over ranks) and infer's evaluate (a plain
    # forward) both run infer.evaluate.mean_loss: on the same batches they agree to the bit.
    import contextlib

    from jobs import make_dataset, tiny_config

    from lmforge.data.loader import build_loader
    from lmforge.infer.evaluate import evaluate
    from lmforge.model import Transformer
    from lmforge.parallel.distributed import ParallelContext
    from lmforge.train.evaluation import validate
    from lmforge.train.step import TrainStep

    data = make_dataset(tmp_path / "data")
    cfg = tiny_config(tmp_path, data)
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    loader = build_loader(cfg.data, "val", micro_batch_size=2)
    ctx = ParallelContext()
    got = validate(TrainStep(model, None, None, None, ctx, contextlib.nullcontext(), 0.0), loader, ctx, 3)
    assert model.training  # put back in training mode
    loader.reset()
    ref = evaluate(model, iter(list(loader)), max_batches=3)
    loader.close()
    assert (got["val_loss"], got["val_ppl"], got["val_tokens"]) == (ref["loss"], ref["ppl"], ref["tokens"])
    assert ref["tokens"] == 3 * 2 * cfg.data.seq_len


def test_the_loop_logs_and_validates_on_its_intervals_and_at_the_ends():
    from lmforge.train.trainer import should_log, should_validate

    logged = [s for s in range(5, 13) if should_log(s, 4, first_step=5, final=s == 12)]
    assert logged == [5, 8, 12]  # the segment's first step, the interval, the last step
    assert should_log(7, 4, first_step=5, final=True)  # a step a signal stops at
    assert [s for s in range(1, 8) if should_validate(s, 3, s == 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if should_validate(s, 0, s == 7)] == [7]
