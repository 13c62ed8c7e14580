"""optim.name muon under DDP, FSDP2 (Shard(0) DTensors), TP 2 and PP 2 gives the one-process losses
(Newton-Schulz sees each whole matrix), a 2-rank FSDP2 checkpoint (momentum buffers as DCP state)
resumes bitwise on the same layout and within tolerance in one process, and the bytes Muon
gathers per step are what the sharding implies (0 for DDP and PP, which hold whole matrices).

One torchrun of 2 gloo processes runs every layout (this file is also its worker script).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lmforge.parallel.distributed import _free_port

pytestmark = pytest.mark.slow
RTOL = 1e-5
STEPS = 5
TREE = {
    "model": {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_position_embeddings": 64,
        "tie_embeddings": False,
    },
    "data": {"seq_len": 16},
    "train": {"device": "cpu", "global_batch_size": 8, "grad_accum_steps": 2},
    "optim": {"name": "muon", "lr": 3e-3, "muon_lr": 0.03, "fused": "foreach"},
}


def run_layout(parallel: dict, init: dict, save: tuple | None = None, resume: tuple | None = None) -> dict:
    """STEPS Muon steps of one layout on fixed batches -> {"losses", "comm_bytes_per_step"}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lmforge.config import config_from_dict
    from lmforge.parallel import build_parallel_model, init_distributed, load_full_state_dict
    from lmforge.train.optim import build_optimizer
    from lmforge.train.schedule import LrSchedule
    from lmforge.train.step import build_train_step

    tree = json.loads(json.dumps(TREE))
    tree["parallel"] = parallel
    cfg = config_from_dict(tree, "<muon parity>")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    opt = build_optimizer(model, cfg.optim)
    load_full_state_dict(model, init)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (STEPS, 8, 17), generator=gen)  # 16 of 256 ids: learnable in a few steps
    start = 0
    if resume:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=resume[0])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = resume[1]
    constant = LrSchedule(opt, lambda _: 1.0)
    train_step = build_train_step(cfg, ctx, model, opt, constant, amp=contextlib.nullcontext())
    rows, accum = 8 // ctx.dp_size, 2
    losses, bytes_before = [], opt.comm_bytes
    for step in range(start, STEPS):
        if save and save[1] == step:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=save[0])
        mine = ids[step, ctx.dp_rank * rows : (ctx.dp_rank + 1) * rows]
        micro = rows // accum
        batches = [
            {
                "input_ids": mine[i * micro : (i + 1) * micro, :-1].contiguous(),
                "labels": mine[i * micro : (i + 1) * micro, 1:].contiguous(),
            }
            for i in range(accum)
        ]
        losses.append(train_step.step(batches).loss.item())
    ctx.barrier()
    return {"losses": losses, "comm_bytes_per_step": (opt.comm_bytes - bytes_before) / (STEPS - start)}


def _worker(spec_path: str) -> None:
    from safetensors.torch import load_file

    spec = json.loads(Path(spec_path).read_text())
    init = load_file(spec["init"])
    ckpt = spec["ckpt"]
    results = {
        "ddp": run_layout({"strategy": "ddp"}, init),
        "fsdp": run_layout({"strategy": "fsdp"}, init, save=(ckpt, 3)),
        "fsdp_resume": run_layout({"strategy": "fsdp"}, init, resume=(ckpt, 3)),
        "tp2": run_layout({"strategy": "fsdp+tp", "tp": 2, "dp_shard": 1}, init),
        "pp2": run_layout({"strategy": "single", "pp": 2, "pp_schedule": "1f1b"}, init),
    }
    torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = Path(spec["out"] + ".tmp")
        tmp.write_text(json.dumps(results))
        os.replace(tmp, spec["out"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from jobs import run_reaped
    from safetensors.torch import save_file

    from lmforge.config import config_from_dict
    from lmforge.model import Transformer

    tmp = tmp_path_factory.mktemp("muon")
    torch.manual_seed(0)
    sd = Transformer(config_from_dict(TREE).model).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "init.safetensors"))
    spec = {
        "init": str(tmp / "init.safetensors"),
        "ckpt": str(tmp / "ckpt_fsdp2_step3"),
        "out": str(tmp / "out.json"),
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={_free_port()}",
        __file__,
        str(tmp / "spec.json"),
    ]
    proc = run_reaped(cmd, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(Path(spec["out"]).read_text())
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results["single"] = run_layout({}, sd)
        results["single_from_fsdp"] = run_layout({}, sd, resume=(spec["ckpt"], 3))
    finally:
        torch.set_num_threads(before)
    results["params"] = {k: v.numel() for k, v in sd.items()}
    return results


def _max_rel(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["ddp", "fsdp", "tp2", "pp2"])
def test_layout_matches_one_process(runs, name):
    ref = runs["single"]["losses"]
    assert ref[-1] < ref[0] - 0.1  # Muon learns the fixed batches
    assert _max_rel(runs[name]["losses"], ref) < RTOL, (runs[name]["losses"], ref)


def test_fsdp_checkpoint_resumes_bitwise_on_its_layout_and_in_one_process(runs):
    assert runs["fsdp_resume"]["losses"] == runs["fsdp"]["losses"][3:]
    assert _max_rel(runs["single_from_fsdp"]["losses"], runs["fsdp"]["losses"][3:]) < RTOL


def test_gathered_bytes_are_the_missing_halves_of_the_sharded_matrices(runs):
    hidden = sum(n for k, n in runs["params"].items() if ".attention.w" in k or ".feed_forward.w" in k)
    assert runs["ddp"]["comm_bytes_per_step"] == 0 and runs["pp2"]["comm_bytes_per_step"] == 0
    assert runs["fsdp"]["comm_bytes_per_step"] == hidden * 4 / 2  # fp32, half of each matrix fetched
    # TP shards the attention and MLP matrices across 2 ranks as well
    assert runs["tp2"]["comm_bytes_per_step"] == hidden * 4 / 2


if __name__ == "__main__":
    _worker(sys.argv[1])
