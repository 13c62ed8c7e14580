"""Inference: KV-cache sampling, top-k/top-p, perplexity (checked against transformers), loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import Config, config_from_dict
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.infer import (
    evaluate,
    filter_logits,
    generate,
    load_model_for_inference,
    load_weights,
    save_weights,
)
from lmforge.infer.evaluate import windows
from lmforge.model import Transformer


@pytest.fixture(scope="module")
def cfg() -> Config:
    return config_from_dict({"model": {"preset": "tiny", "vocab_size": 97}, "data": {"seq_len": 16}})


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return Transformer(cfg.model).eval()


PROMPT = [1, 5, 9, 33, 2]


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def test_kv_cache_greedy_equals_full_forward(model):
    streamed = []
    out = generate(model, PROMPT, 20, temperature=0.0, stream=streamed.append)
    assert out == greedy_without_cache(model, PROMPT, 20)
    assert streamed == out and len(out) == 20


def test_seed_reproducible_and_seeds_differ(model):
    a = generate(model, PROMPT, 30, temperature=1.0, seed=11)
    b = generate(model, PROMPT, 30, temperature=1.0, seed=11)
    c = generate(model, PROMPT, 30, temperature=1.0, seed=12)
    assert a == b
    assert a != c
    state = torch.random.get_rng_state()
    generate(model, PROMPT, 5, temperature=1.0, seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "sampling must not touch the global RNG"


def test_top_k_one_is_greedy(model):
    greedy = generate(model, PROMPT, 15, temperature=0.0)
    assert generate(model, PROMPT, 15, temperature=1.3, top_k=1, seed=5) == greedy


def test_top_k_and_top_p_mask_the_right_tokens():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # ranked: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.7)) == [1, 3]
    assert kept(filter_logits(logits, top_p=0.8)) == [1, 3]  # 0.5 + 0.3 already reaches 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [1, 2, 3]
    assert kept(filter_logits(logits, top_p=0.3)) == [1]  # the most likely token always stays
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_k=3, top_p=0.5)) == [1]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    batch = torch.stack([logits, logits.flip(0)])
    assert kept(filter_logits(batch, top_p=0.7)[1]) == [0, 2]


def test_eos_stops_and_context_limit(model, cfg):
    first = generate(model, PROMPT, 40, temperature=1.0, seed=4)
    stop = next(i for i in range(1, 40) if first[i] not in first[:i])
    out = generate(model, PROMPT, 40, temperature=1.0, seed=4, eos_id=first[stop])
    assert out == first[: stop + 1]  # the EOS itself is returned, nothing after it
    limit = cfg.model.max_position_embeddings
    long_prompt = list(range(1, 90)) * 3  # 267 tokens > 256 positions
    assert len(generate(model, long_prompt, 10, temperature=0.0)) == 1
    with pytest.raises(LmforgeError, match="prompt is empty"):
        generate(model, [], 3)
    assert len(generate(model, [1] * (limit - 4), 10, temperature=0.0)) == 4


def test_windows_cover_every_target_once():
    assert windows(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert windows(9, 3) == [(0, 4), (4, 8)]  # a 1-token tail has nothing to predict


@torch.no_grad()
def test_perplexity_is_exp_of_token_weighted_mean(model):
    stream = np.random.default_rng(0).integers(0, 97, size=203)
    result = evaluate(model, stream, seq_len=16, batch_size=4)
    total, count = 0.0, 0
    for a, b in windows(len(stream), 16):
        ids = torch.from_numpy(stream[a:b]).long()[None]
        logits = model(ids[:, :-1]).logits[0]
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += b - a - 1
    assert result["tokens"] == count == 203 - len(windows(203, 16))
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    half = evaluate(model, stream, seq_len=16, batch_size=4, max_batches=1)
    assert half["tokens"] == 4 * 16


def test_evaluate_accepts_loader_batches(model):
    ids = torch.randint(0, 97, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = evaluate(model, iter([{"input_ids": ids, "labels": labels}]))
    logits = model(ids).logits
    ref = F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    assert out["tokens"] == 15 and out["loss"] == pytest.approx(ref.item(), rel=1e-6)


def test_perplexity_matches_transformers_on_export(model, cfg, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.interop import export_hf

    stream = np.random.default_rng(1).integers(0, 97, size=150)
    ours = evaluate(model, stream, seq_len=16, batch_size=3)
    export_hf(model, cfg.model, tmp_path / "hf", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in windows(len(stream), 16):
            ids = torch.from_numpy(stream[a:b]).long()[None]
            logits = hf(input_ids=ids[:, :-1]).logits[0].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += b - a - 1
    assert ours["tokens"] == count
    assert abs(ours["loss"] - total / count) <= 1e-4
    assert abs(math.log(ours["ppl"]) - math.log(math.exp(total / count))) <= 1e-4
    # ...and the HF folder loads back for inference with identical greedy output.
    back, back_cfg, _ = load_model_for_inference(tmp_path / "hf")
    assert back_cfg.hidden_size == cfg.model.hidden_size
    assert generate(back, PROMPT, 8, temperature=0.0) == generate(model, PROMPT, 8, temperature=0.0)


def test_weights_export_round_trip_and_errors(model, cfg, tmp_path):
    out = save_weights(model.state_dict(), cfg, tmp_path / "w", dtype="float32")
    back, back_cfg, tok = load_model_for_inference(out)
    assert back_cfg == cfg.model and tok is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    state, _, _ = load_weights(out / "model.safetensors")  # the file form, config.yaml beside it
    assert set(state) == set(model.state_dict())

    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model_for_inference(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_model_for_inference(tmp_path / "junk")
    wider = cfg.model_copy(update={"model": cfg.model.model_copy(update={"hidden_size": 128})})
    (out / "config.yaml").write_text(wider.to_yaml())
    with pytest.raises(CheckpointError, match=r"weights do not fit the model config \(checkpoint vs config: .* vs"):
        load_model_for_inference(out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_model_for_inference(out)
    (out / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no config.yaml beside it"):
        load_model_for_inference(out)


def test_training_checkpoint_loads_through_latest(model, cfg, tmp_path):
    from lmforge.weights.checkpoint import save_checkpoint

    clone = Transformer(cfg.model)
    clone.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(clone.parameters(), lr=1e-3)
    root = tmp_path / "run" / "checkpoints"
    save_checkpoint(root, 3, clone, opt, {"config": cfg.model_dump(mode="json")}, {}, keep=2)
    for path in (root, root / "step_3", tmp_path / "run", root / "latest"):  # the pointer file too
        back, back_cfg, _ = load_model_for_inference(path)
        assert back_cfg == cfg.model
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # One rule with training: `latest` naming a missing folder falls back to the newest complete one.
    (root / "latest").write_text("step_9\n")
    back, _, _ = load_model_for_inference(root)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    (root / "step_3" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="names no complete checkpoint"):
        load_model_for_inference(root)


def test_consolidated_checkpoint_file_loads(model, cfg, tmp_path):
    """`lmforge checkpoint consolidate` output: one .safetensors with a model-only config.yaml."""
    from lmforge.weights.checkpoint import save_checkpoint
    from lmforge.weights.files import consolidate

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path / "ck", 1, model, opt, {"config": cfg.model_dump(mode="json")}, {}, keep=1)
    out = consolidate(tmp_path / "ck", tmp_path / "flat" / "weights.safetensors", dtype="float32")
    back, back_cfg, _ = load_model_for_inference(out)
    assert back_cfg == cfg.model
    assert generate(back, PROMPT, 6, temperature=0.0) == generate(model, PROMPT, 6, temperature=0.0)
