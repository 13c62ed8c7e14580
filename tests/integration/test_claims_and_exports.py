"""Sizes a file claims are checked before they are allocated (issue 22 item 3), an HF export of a
trained model tokenizes as training did (item 2), and written files honour the umask (item 6)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from paths import REPO

from lmforge.config import config_from_dict
from lmforge.errors import CheckpointError
from lmforge.model import Transformer
from lmforge.train.optim import build_optimizer
from lmforge.weights import checkpoint as ckpt
from lmforge.weights import files
from lmforge.weights.safe_meta import read_metadata, vetted_metadata

HUGE = 1 << 20  # hidden 1,048,576: the claimed model is tens of TB


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("claims")
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 16}})
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    model(torch.randint(0, 512, (1, 8))).logits.mean().backward()
    opt.step()
    state = {"config": cfg.model_dump(mode="json"), "scheduler": {}}
    return ckpt.save_checkpoint(tmp / "ck", 1, model, opt, state, {"rng": torch.get_rng_state()}, 2)


def _generate_with_rss(target: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    code = (
        # VmHWM is this process's own peak; ru_maxrss would include the forking pytest's.
        "import sys, atexit\n"
        "hwm = lambda: [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "atexit.register(lambda: print('MAXRSS_KB', hwm(), file=sys.stderr))\n"
        "from lmforge.cli import main\n"
        f"sys.exit(main(['generate', '--checkpoint', {str(target)!r}, '--prompt', 'x']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    return proc, rss[0] / 1024**2, time.monotonic() - start


def _one_line(proc, match):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-3000:]


def test_export_config_claiming_a_huge_model_is_refused_without_allocating_it(step, tmp_path):
    out = files.consolidate(step, tmp_path / "w")
    tree = yaml.safe_load((out / "config.yaml").read_text())
    tree["model"]["hidden_size"] = HUGE
    (out / "config.yaml").write_text(yaml.safe_dump(tree))
    proc, rss_gib, seconds = _generate_with_rss(out)
    _one_line(proc, "weights do not fit the model config")
    assert rss_gib < 1.5, f"peak RSS {rss_gib:.2f} GiB: the claimed model was allocated"


def test_state_json_claiming_a_huge_model_is_refused_without_allocating_it(step, tmp_path):
    import shutil

    bad = tmp_path / "step_1"
    shutil.copytree(step, bad)
    state = json.loads((bad / "state.json").read_text())
    state["config"]["model"]["hidden_size"] = HUGE
    (bad / "state.json").write_text(json.dumps(state))
    proc, rss_gib, _ = _generate_with_rss(bad)
    _one_line(proc, "weights do not fit its recorded model config")
    assert rss_gib < 1.5, f"peak RSS {rss_gib:.2f} GiB: the claimed model was allocated"
    with pytest.raises(CheckpointError, match="do not fit"):
        files.load_model_state(bad)


def test_index_claiming_more_than_its_data_files_hold_is_refused(step, tmp_path):
    import shutil

    bad = tmp_path / "step_1"
    shutil.copytree(step, bad)
    meta = read_metadata(bad)
    item = meta.state_dict_metadata["model.norm.weight"]
    item.size = torch.Size([10**12])
    item.chunks[0].sizes = torch.Size([10**12])
    (bad / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    with pytest.raises(
        CheckpointError, match="'model.norm.weight' claims \\(1000000000000,\\) but its data files hold less"
    ):
        vetted_metadata(bad)
    (bad / "__0_0.distcp").write_bytes(b"")  # a truncated copy
    with pytest.raises(CheckpointError, match="shorter than its index says"):
        vetted_metadata(bad)


def test_optimizer_moments_of_another_shape_are_refused_on_resume(step):
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 16}})
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    meta = read_metadata(step)
    key = next(k for k in meta.state_dict_metadata if k.startswith("optim.") and k.endswith(".exp_avg"))
    original = meta.state_dict_metadata[key].size
    meta.state_dict_metadata[key].size = torch.Size([original[0] + 1, *original[1:]])
    path = step / ".metadata"
    saved = path.read_bytes()
    try:
        path.write_bytes(pickle.dumps(meta, protocol=4))
        with pytest.raises(CheckpointError, match="this run's optimizer state"):
            ckpt.load_checkpoint(step, model, opt)
    finally:
        path.write_bytes(saved)


def test_no_checkpoint_file_is_a_pickle_but_the_index(step):
    meta = read_metadata(step)
    assert all(type(v).__name__ == "TensorStorageMetadata" for v in meta.state_dict_metadata.values())
    assert (step / "rank_0.safetensors").is_file() and not (step / "rank_0.pt").exists()
    with pytest.raises(TypeError, match="not a tensor"):
        ckpt._refuse_non_tensors({"optim": {"state": {"w": {"step": 3}}}}, "")


def test_written_files_honour_the_umask(step, tmp_path):
    from lmforge.interop import export_hf

    before = os.umask(0o022)
    try:
        out = files.consolidate(step, tmp_path / "w")
        single = files.consolidate(step, tmp_path / "f" / "model.safetensors")
        sd, cfg = files.load_model_state(step)
        hf = export_hf(sd, cfg.model, tmp_path / "hf")
    finally:
        os.umask(before)
    written = [p for d in (out, single.parent, hf, step) for p in Path(d).iterdir() if p.is_file()]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {"0o644"}, modes


def test_hf_export_of_a_trained_model_tokenizes_as_training_did(tmp_path):
    # prepare stores each document as [bos] + ids + [eos]; a prompt is that prefix without the
    # closing eos, which is what transformers must produce from the exported files, and what
    # lmforge's own BOS rule must give again after `lmforge import --hf`.
    import numpy as np
    from transformers import AutoTokenizer

    from lmforge.data.encode import _encode
    from lmforge.infer.bos import use_bos
    from lmforge.interop.loading import find_tokenizer, load_weights
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    docs = ["The cat sat on the mat.", "Hello world, again and again!", "Numbers 123 and <|im_end|> text."]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 20))
    tok_dir = train_tokenizer([str(corpus)], 300, tmp_path / "tok")
    cfg = config_from_dict(
        {
            "model": {"preset": "tiny", "vocab_size": 300},
            "data": {"train": [str(tmp_path / "d")], "seq_len": 32},
        }
    )
    files.save_weights(Transformer(cfg.model).state_dict(), cfg, tmp_path / "w", tokenizer_src=tok_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for args in (
        ["export", "--checkpoint", str(tmp_path / "w"), "--out", str(tmp_path / "hf")],
        ["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    tok = load_tokenizer(tok_dir)
    flat, lengths = _encode(tok, docs, np.int64)
    trained = [list(map(int, d))[:-1] for d in np.split(flat, np.cumsum(lengths)[:-1])]  # without eos
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert [auto(d).input_ids for d in docs] == trained
    assert trained[0][0] == tok.bos_id
    _, back_cfg, folder = load_weights(tmp_path / "back")
    assert not back_cfg.data.train  # an imported model: the tokenizer's own rule decides
    assert use_bos(find_tokenizer(folder, back_cfg), back_cfg, None)
