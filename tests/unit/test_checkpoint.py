"""Checkpoint folders: round trip, atomic publish, keep-last-K, `latest`, bad and hostile inputs."""

import errno
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import config_for_model, config_from_dict, load_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import Transformer
from lmforge.train.optim import build_optimizer
from lmforge.weights import checkpoint as ckpt
from lmforge.weights import files


def _model(hidden=64, seed=0):
    cfg = config_from_dict({"model": {"preset": "tiny", "hidden_size": hidden}, "data": {"seq_len": 16}})
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    x = torch.randint(0, 512, (2, 16))
    model(x).logits.float().mean().backward()
    opt.step()
    opt.zero_grad()
    return cfg, model, opt


def _save(root, step, cfg, model, opt, keep=3, rng=None):
    state = {"tokens": step * 10, "config": cfg.model_dump(mode="json"), "scheduler": {}}
    rng = torch.get_rng_state() if rng is None else rng
    return ckpt.save_checkpoint(root, step, model, opt, state, {"rng": rng}, keep)


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path):
    cfg, model, opt = _model(seed=0)
    rng = torch.get_rng_state()
    path = _save(tmp_path, 5, cfg, model, opt, rng=rng)
    assert path.name == "step_5" and (path / "state.json").is_file() and (path / "config.yaml").is_file()
    assert (tmp_path / "latest").read_text().strip() == "step_5"
    _, model2, opt2 = _model(seed=1)
    state, rank_state = ckpt.load_checkpoint(path, model2, opt2, cfg.model.model_dump(mode="json"))
    assert state["step"] == 5 and state["tokens"] == 50
    assert torch.equal(rank_state["rng"], rng)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert s1["param_groups"][0]["betas"] == s2["param_groups"][0]["betas"]


def test_keep_last_k_latest_and_temporaries(tmp_path):
    cfg, model, opt = _model()
    (tmp_path / "step_9.tmp-123-abc").mkdir(parents=True)  # a crash leftover
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, cfg, model, opt, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_3", "step_4"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_4"
    # latest names a folder that is gone -> newest complete one
    (tmp_path / "latest").write_text("step_99\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_4"
    # a complete folder newer than `latest` (crash between rename and pointer update) wins
    (tmp_path / "latest").write_text("step_3\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_4"
    (tmp_path / "latest").unlink()
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_4"
    assert ckpt.resolve_resume("never", tmp_path) is None
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


def test_disk_full_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch):
    cfg, model, opt = _model()
    _save(tmp_path, 1, cfg, model, opt)
    before = sorted(p.name for p in tmp_path.iterdir())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2, cfg, model, opt)
    msg = str(err.value)
    assert "\n" not in msg and "step_2" in msg and "no space left" in msg and "free disk space" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folder left behind
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    monkeypatch.undo()
    _, model2, opt2 = _model(seed=3)
    ckpt.load_checkpoint(tmp_path / "step_1", model2, opt2)  # still loadable


def test_changed_model_shape_names_the_keys(tmp_path):
    cfg, model, opt = _model(hidden=64)
    path = _save(tmp_path, 1, cfg, model, opt)
    cfg32, model32, opt32 = _model(hidden=32)
    with pytest.raises(
        CheckpointError, match=r"model\.hidden_size \(64 in checkpoint, 32 now\).*train\.resume=never"
    ):
        ckpt.load_checkpoint(path, model32, opt32, cfg32.model.model_dump(mode="json"))
    # without configs, the tensor shapes alone still catch it, by parameter name
    with pytest.raises(
        CheckpointError, match=r"attention\.wq\.weight \(64, 64\) vs \(32, 32\).* and \d+ more"
    ):
        ckpt.load_checkpoint(path, model32, opt32)


def test_missing_and_unreadable_checkpoints_are_one_line_errors(tmp_path):
    _, model, opt = _model()
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "step_7", model, opt)
    (tmp_path / "step_7").mkdir()
    with pytest.raises(CheckpointError, match="no state.json"):
        ckpt.load_checkpoint(tmp_path / "step_7", model, opt)
    with pytest.raises(CheckpointError, match="train.resume"):
        ckpt.resolve_resume(str(tmp_path / "elsewhere"), tmp_path)


class _Evil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('echo pwned')",))


def test_hostile_metadata_is_refused_before_dcp_unpickles_it(tmp_path):
    cfg, model, opt = _model()
    path = _save(tmp_path, 1, cfg, model, opt)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="refusing to load builtins.eval"):
        ckpt.load_checkpoint(path, model, opt)


def test_consolidate_and_export_weights(tmp_path):
    cfg, model, opt = _model()
    _save(tmp_path / "ck", 3, cfg, model, opt)
    out = files.consolidate(tmp_path / "ck", tmp_path / "out" / "model.safetensors")
    tensors = load_file(str(out))
    ref = model.state_dict()
    assert set(tensors) == set(ref)
    assert all(torch.equal(tensors[k], ref[k]) for k in ref)
    assert "hidden_size: 64" in (tmp_path / "out" / "config.yaml").read_text()
    # The config beside the file loads as it stands (the default seq_len 512 would not fit).
    assert cfg.model.max_position_embeddings < 512
    assert load_config(tmp_path / "out" / "config.yaml").model_dump() == cfg.model_dump()
    half = files.consolidate(tmp_path / "ck" / "step_3", tmp_path / "half.safetensors", dtype="float16")
    assert load_file(str(half))["norm.weight"].dtype == torch.float16
    around = config_for_model(cfg.model.model_dump(mode="json"))  # the run config a bare model gets
    exported = files.write_weights_file(model.state_dict(), around, tmp_path / "exp" / "w.safetensors", "bfloat16")
    got = load_file(str(exported))
    beside = load_config(tmp_path / "exp" / "config.yaml")
    assert beside.model == cfg.model and beside.data.seq_len == cfg.model.max_position_embeddings
    assert got["tok_embeddings.weight"].dtype == torch.bfloat16
    assert torch.equal(got["tok_embeddings.weight"], ref["tok_embeddings.weight"].to(torch.bfloat16))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        files.consolidate(tmp_path / "exp", tmp_path / "x.safetensors")
    assert json.loads((tmp_path / "ck" / "step_3" / "state.json").read_text())["world_size"] == 1


def test_a_config_key_that_did_nothing_is_gone():
    """checkpoint.async_save was accepted and ignored; it is now an unknown key, one line."""
    with pytest.raises(ConfigError, match=r"run.yaml: checkpoint.async_save: unknown key"):
        config_from_dict({"checkpoint": {"async_save": True}}, "run.yaml")
