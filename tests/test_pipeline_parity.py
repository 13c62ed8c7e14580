"""Pipeline parallel trains like one process: PP 2 with every schedule the installed torch has,
PP 2 x DP 2 (DDP and FSDP2), PP 2 x TP 2 (gathered and vocab-parallel loss), gradient
accumulation, padded batches (unequal target counts, with activation checkpointing) and an MoE model
(aux loss carried across stages) give the one-process losses of
AdamW steps on fixed random batches; a DCP checkpoint saved under PP 2 x DP 2 resumes bitwise on the
same layout and within tolerance on PP 1 x DP 4 and in one process.

The layouts run in two torchruns (4 and 2 gloo processes; this file is also the worker script),
each going through its scenarios on one process group. Tolerance: the parity tests' relative 1e-5
per step's loss.
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

RTOL = 1e-5
STEPS = 6
TINY = {
    "model": {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_position_embeddings": 64,
    },
    "data": {"seq_len": 16},
    "train": {"device": "cpu", "global_batch_size": 8},
}
UNTIED = {"tie_embeddings": False, "qk_norm": True}
MOE = {"moe": {"num_experts": 4, "top_k": 2}}


def _tree(sc: dict) -> dict:
    tree = json.loads(json.dumps(TINY))
    tree["model"].update(sc.get("model", {}))
    tree["parallel"] = dict(sc.get("parallel", {}))
    tree["train"]["grad_accum_steps"] = sc.get("accum", 1)
    return tree


def _batches(vocab: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[STEPS, 8, 17] token ids and labels (-100 after a random length per row when padded)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (STEPS, 8, 17), generator=gen)
    labels = ids[:, :, 1:].clone()
    if padded:
        keep = torch.randint(1, 17, (STEPS, 8, 1), generator=gen)
        labels[torch.arange(16).expand_as(labels) >= keep] = -100
    return ids[:, :, :-1].contiguous(), labels


def run_layout(sc: dict, init: dict) -> list[float]:
    """Train STEPS steps of one layout; returns the logged (dp-mean) loss of each step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lmforge.config import config_from_dict
    from lmforge.parallel import (
        build_parallel_model,
        clip_grad_norm,
        full_state_dict,
        init_distributed,
        load_full_state_dict,
    )
    from lmforge.train.step import accumulate_gradients

    cfg = config_from_dict(_tree(sc), "<pipeline parity>")
    ctx = init_distributed(cfg)
    model = build_parallel_model(cfg, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    load_full_state_dict(model, init)
    ids, labels = _batches(cfg.model.vocab_size, sc.get("padded", False))
    start = 0
    if sc.get("resume_from"):
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=sc["resume_from"])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = sc["resume_step"]
    accum = cfg.train.grad_accum_steps
    rows = 8 // ctx.dp_size
    losses = []
    for step in range(start, STEPS):
        if sc.get("save_at") == step:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=sc["save_to"])
        mine = slice(ctx.dp_rank * rows, (ctx.dp_rank + 1) * rows)
        micro = rows // accum
        batches = [
            {"input_ids": ids[step, mine][i * micro : (i + 1) * micro], "labels": labels[step, mine][i * micro : (i + 1) * micro]}
            for i in range(accum)
        ]
        amp = contextlib.nullcontext()
        loss, _ = accumulate_gradients(model, batches, ctx, amp)  # dispatches to pipeline_gradients under pp
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ctx.reduce_mean(loss).item())
    if sc.get("check_full_state"):  # what an export of the live model would write (rank 0)
        sc["full_state"] = {k: list(v.shape) for k, v in full_state_dict(model).items()}
    ctx.barrier()  # the process group is kept for the next layout (re-creating it on one store hangs)
    return losses


def _inits(tmp: Path) -> dict:
    from safetensors.torch import save_file

    from lmforge.config import config_from_dict
    from lmforge.model import Transformer

    paths = {}
    for name, extra in {"tied": {}, "untied": UNTIED, "moe": {**MOE, **UNTIED}}.items():
        torch.manual_seed(0)
        sd = Transformer(config_from_dict(_tree({"model": extra})).model).state_dict()
        paths[name] = str(tmp / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, paths[name])
    return paths


def _worker(spec_path: str) -> None:
    import faulthandler

    faulthandler.enable()  # a gloo abort in C++ still shows where Python was
    from safetensors.torch import load_file

    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for name, sc in spec["scenarios"].items():
        results[name] = run_layout(sc, load_file(spec["inits"][sc.get("init", "tied")]))
        if "full_state" in sc:
            results[f"{name}:full_state"] = sc["full_state"]
    torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = Path(spec["out"] + ".tmp")
        tmp.write_text(json.dumps(results))
        os.replace(tmp, spec["out"])


def _schedules() -> list[str]:
    from lmforge.parallel.pipeline_step import available_schedules

    return available_schedules()


def _pp(schedule: str, **extra) -> dict:
    virtual = {"interleaved_1f1b": 2, "zero_bubble": 2, "zbv": 2}.get(schedule, 1)
    return {"strategy": "single", "pp": 2, "pp_schedule": schedule, "pp_virtual_stages": virtual, **extra}


def scenarios(ckpt: str) -> tuple[dict, dict]:
    """(4-process scenarios, 2-process scenarios)."""
    two = {}
    for sched in _schedules():
        init = "untied" if sched == "zbv" else "tied"
        two[f"pp2_{sched}"] = {"parallel": _pp(sched), "accum": 4 if sched == "zbv" else 2, "init": init,
                               "model": UNTIED if init == "untied" else {}, "check_full_state": True}
    # Padded batches (unequal target counts per microbatch) with full activation checkpointing.
    two["pp2_1f1b_accum4_padded"] = {
        "parallel": _pp("1f1b", activation_checkpoint="full"), "accum": 4, "padded": True,
    }
    two["pp2_gpipe_moe"] = {"parallel": _pp("gpipe"), "accum": 2, "init": "moe", "model": {**MOE, **UNTIED}}
    four = {
        "pp2xdp2_ddp": {"parallel": _pp("1f1b", strategy="ddp"), "accum": 2, "save_at": 3, "save_to": ckpt},
        "pp2xfsdp2": {"parallel": _pp("1f1b", strategy="fsdp"), "accum": 2, "check_full_state": True},
        "pp2xtp2": {"parallel": _pp("1f1b", strategy="fsdp+tp", tp=2, dp_shard=1), "accum": 2},
        "pp2xtp2_lossparallel": {
            "parallel": _pp("1f1b", strategy="fsdp+tp", tp=2, dp_shard=1, loss_parallel=True), "accum": 2,
        },
        # Vocab-parallel loss without a pipeline: the trainer's step under torch's loss_parallel().
        "fsdp2xtp2_lossparallel": {"parallel": {"strategy": "fsdp+tp", "tp": 2, "loss_parallel": True}, "accum": 2},
        "pp2xdp2_resume": {"parallel": _pp("1f1b", strategy="ddp"), "accum": 2,
                           "resume_from": ckpt, "resume_step": 3},
        "pp1xdp4_resume": {"parallel": {"strategy": "fsdp"}, "accum": 1,
                           "resume_from": ckpt, "resume_step": 3},
    }
    return four, two


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_intra_op_thread):
    from test_train_utils import run_reaped

    tmp = tmp_path_factory.mktemp("pipeline")
    inits = _inits(tmp)
    ckpt = str(tmp / "ckpt_pp2xdp2_step3")
    four, two = scenarios(ckpt)
    results = {}
    for nproc, group in ((4, four), (2, two)):
        spec = {"inits": inits, "out": str(tmp / f"out{nproc}.json"), "scenarios": group}
        (tmp / f"spec{nproc}.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", __file__, str(tmp / f"spec{nproc}.json")]
        proc = run_reaped(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400)
        assert proc.returncode == 0, proc.stderr[-6000:]
        results.update(json.loads(Path(spec["out"]).read_text()))
    from safetensors.torch import load_file

    for name, extra in {"tied": {}, "untied": UNTIED, "moe": {**MOE, **UNTIED}}.items():
        for accum, padded in ((2, False), (4, True), (1, False)):
            sc = {"model": extra, "accum": accum, "padded": padded}
            results[f"single_{name}_a{accum}_p{int(padded)}"] = run_layout(sc, load_file(inits[name]))
    results["inits"] = inits
    results["single_resume"] = run_layout(
        {"resume_from": ckpt, "resume_step": 3, "accum": 2}, load_file(inits["tied"])
    )
    return results


def _max_rel(losses, ref) -> float:
    assert len(losses) == len(ref) > 0
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref))


def _reference(runs, name: str) -> list[float]:
    if "moe" in name:
        return runs["single_moe_a2_p0"]
    if "padded" in name:
        return runs["single_tied_a4_p1"]
    if "untied" in name or "zbv" in name:
        return runs["single_untied_a2_p0"]
    return runs["single_tied_a2_p0"]


def test_every_available_schedule_is_covered():
    assert {"gpipe", "1f1b", "interleaved_1f1b"} <= set(_schedules())


@pytest.mark.parametrize("sched", ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv"])
def test_pp2_schedule_matches_single_process(runs, sched):
    if sched not in _schedules():
        pytest.skip(f"torch {torch.__version__} has no {sched} schedule")
    name = f"pp2_{sched}"
    assert _max_rel(runs[name], _reference(runs, name)) < RTOL, (runs[name], _reference(runs, name))


@pytest.mark.parametrize(
    "name",
    [
        "pp2xdp2_ddp",
        "pp2xfsdp2",
        "pp2xtp2",
        "pp2xtp2_lossparallel",
        "fsdp2xtp2_lossparallel",
        "pp2_1f1b_accum4_padded",
        "pp2_gpipe_moe",
    ],
)
def test_pp_layouts_match_single_process(runs, name):
    ref = _reference(runs, name)
    assert _max_rel(runs[name], ref) < RTOL, (runs[name], ref)


def test_losses_move_and_padding_matters(runs):
    ref = runs["single_tied_a2_p0"]
    assert max(ref) - min(ref) > 1e-3
    assert _max_rel(runs["single_tied_a1_p0"], ref) < RTOL  # accumulation does not change the step
    assert abs(runs["single_tied_a4_p1"][0] - ref[0]) > 1e-3  # the padded run is a different run


@pytest.mark.parametrize("name", ["pp2xfsdp2", "pp2_1f1b", "pp2_zbv"])
def test_full_state_dict_of_a_pipeline_is_the_whole_model(runs, name):
    from safetensors.torch import load_file

    init = load_file(runs["inits"]["untied" if "zbv" in name else "tied"])
    assert runs[f"{name}:full_state"] == {k: list(v.shape) for k, v in init.items()}


def test_pp_checkpoint_resumes_bitwise_and_reshards(runs):
    full = runs["pp2xdp2_ddp"]
    assert runs["pp2xdp2_resume"] == full[3:]  # same layout: bit for bit
    assert _max_rel(runs["pp1xdp4_resume"], full[3:]) < RTOL
    assert _max_rel(runs["single_resume"], full[3:]) < RTOL


if __name__ == "__main__":
    _worker(sys.argv[1])
