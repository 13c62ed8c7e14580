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
    tree["train"]["fused_loss"] = sc.get("fused", True)
    return tree


def _batches(vocab: int, padded: bool, docs: bool) -> dict[str, torch.Tensor]:
    """[STEPS, 8, 16] input_ids and labels (-100 after a random length per row when padded), with
    doc_ids / position_ids of random document boundaries when `docs` (data.document_mask and
    reset_positions)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (STEPS, 8, 17), generator=gen)
    labels = ids[:, :, 1:].clone()
    if padded:
        keep = torch.randint(1, 17, (STEPS, 8, 1), generator=gen)
        labels[torch.arange(16).expand_as(labels) >= keep] = -100
    out = {"input_ids": ids[:, :, :-1].contiguous(), "labels": labels}
    if docs:
        starts = torch.rand(STEPS, 8, 16, generator=gen) < 0.2
        starts[:, :, 0] = False
        doc_ids = starts.long().cumsum(-1)
        pos = torch.arange(16).expand_as(doc_ids)
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values
        out.update(doc_ids=doc_ids, position_ids=pos - first)
    return out


def run_layout(sc: dict, init: dict) -> list[float]:
    """Train STEPS steps of one layout through the trainer's step (build_train_step); returns the
    logged (dp-mean) loss of each step. With sc["eval"], also the validation loss of the first
    step's batches after training, appended (the step's forward-only eval_sums)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lmforge.config import config_from_dict
    from lmforge.parallel import build_parallel_model, full_state_dict, init_distributed, load_full_state_dict
    from lmforge.train.schedule import LrSchedule
    from lmforge.train.step import build_train_step

    cfg = config_from_dict(_tree(sc), "<pipeline parity>")
    ctx = init_distributed(cfg.parallel, cfg.train.device)
    model = build_parallel_model(cfg.model, cfg.parallel, ctx, seed=cfg.run.seed, seq_len=cfg.data.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    constant = LrSchedule(opt, lambda _: 1.0)
    step_fn = build_train_step(cfg, ctx, model, opt, constant, amp=contextlib.nullcontext())
    load_full_state_dict(model, init)
    fused_seen = torch.zeros(())  # whether the last stage handed the loss hidden states (fused loss)
    if ctx.pp_size > 1 and model.has_last:

        def seen(module, args, out):  # returns None: the output stays what the stage returned
            fused_seen.fill_(float(len(out) == 3))

        model.stages[-1].register_forward_hook(seen)
    data = _batches(cfg.model.vocab_size, sc.get("padded", False), sc.get("docs", False))
    start = 0
    if sc.get("resume_from"):
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=sc["resume_from"])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = sc["resume_step"]
    accum = cfg.train.grad_accum_steps
    rows = 8 // ctx.dp_size
    micro = rows // accum

    def batches_of(step):
        mine = {k: v[step, ctx.dp_rank * rows : (ctx.dp_rank + 1) * rows] for k, v in data.items()}
        return [{k: v[i * micro : (i + 1) * micro] for k, v in mine.items()} for i in range(accum)]

    losses = []
    for step in range(start, STEPS):
        if sc.get("save_at") == step:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=sc["save_to"])
        losses.append(step_fn.step(batches_of(step)).loss.item())
    if sc.get("eval"):
        model.eval()
        ce, n = step_fn.eval_sums(batches_of(0))
        losses.append((ctx.reduce_sum(ce) / ctx.reduce_sum(n)).item())
    if ctx.pp_size > 1:
        sc["fused_seen"] = ctx.reduce_max(fused_seen).item()
    if sc.get("check_full_state"):  # what an export of the live model would write (rank 0)
        sc["full_state"] = {k: list(v.shape) for k, v in full_state_dict(model).items()}
    ctx.barrier()  # the process group is kept for the next layout (re-creating it on one store hangs)
    return losses


def _inits(tmp: Path) -> dict:
    from safetensors.torch import save_file

    from lmforge.config import config_from_dict
    from lmforge.model import Transformer

    paths = {}
    for name, extra in {"tied": {}, "moe": {**MOE, **UNTIED}}.items():
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
        for key in ("full_state", "fused_seen"):
            if key in sc:
                results[f"{name}:{key}"] = sc[key]
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
    """(4-process scenarios, 2-process scenarios). Every one uses the fused loss (train.fused_loss)
    unless it says fused False; tensor-parallel output layers take the logits path anyway."""
    two = {}
    for sched in _schedules():  # tied embeddings with every schedule (zbv: one table on rank 0)
        two[f"pp2_{sched}"] = {"parallel": _pp(sched), "accum": 4 if sched == "zbv" else 2,
                               "check_full_state": sched in ("1f1b", "zbv")}
    # Padded batches (unequal target counts per microbatch) with full activation checkpointing,
    # through the plain logits loss.
    two["pp2_1f1b_accum4_padded"] = {
        "parallel": _pp("1f1b", activation_checkpoint="full"), "accum": 4, "padded": True, "fused": False,
    }
    two["pp2_gpipe_moe"] = {"parallel": _pp("gpipe"), "accum": 2, "init": "moe", "model": {**MOE, **UNTIED}}
    # Fused loss, document masking + reset positions, compile per block, and validation.
    two["pp2_docs_compile_eval"] = {"parallel": _pp("1f1b", compile=True), "accum": 2, "docs": True, "eval": True}
    four = {
        "pp2xdp2_ddp": {"parallel": _pp("1f1b", strategy="ddp"), "accum": 2, "save_at": 3, "save_to": ckpt},
        "pp2xfsdp2": {"parallel": _pp("1f1b", strategy="fsdp"), "accum": 2, "check_full_state": True, "eval": True},
        "pp2xhsdp": {"parallel": _pp("interleaved_1f1b", strategy="hsdp", dp_replicate=2, dp_shard=1), "accum": 2},
        "pp2xtp2": {"parallel": _pp("1f1b", strategy="fsdp+tp", tp=2, dp_shard=1), "accum": 2},
        "pp2xtp2_lossparallel": {
            "parallel": _pp("1f1b", strategy="fsdp+tp", tp=2, dp_shard=1, loss_parallel=True), "accum": 2,
            "eval": True,
        },
        # Vocab-parallel loss without a pipeline: the trainer's step under torch's loss_parallel().
        "fsdp2xtp2_lossparallel": {"parallel": {"strategy": "fsdp+tp", "tp": 2, "loss_parallel": True}, "accum": 2},
        "pp2xdp2_resume": {"parallel": _pp("1f1b", strategy="ddp"), "accum": 2,
                           "resume_from": ckpt, "resume_step": 3},
        "pp1xdp4_resume": {"parallel": {"strategy": "fsdp"}, "accum": 1,
                           "resume_from": ckpt, "resume_step": 3},
    }
    return four, two


EIGHT = {  # the 8-process layouts (slow)
    "pp2xtp2xfsdp2": {"parallel": _pp("1f1b", strategy="fsdp+tp", tp=2, dp_shard=2), "accum": 2, "eval": True},
    "pp2xhsdp2x2": {"parallel": _pp("1f1b", strategy="hsdp", dp_replicate=2, dp_shard=2), "accum": 2},
}


def _torchrun(tmp: Path, nproc: int, inits: dict, group: dict) -> dict:
    from jobs import run_reaped

    spec = {"inits": inits, "out": str(tmp / f"out{nproc}.json"), "scenarios": group}
    (tmp / f"spec{nproc}.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", __file__, str(tmp / f"spec{nproc}.json")]
    # One inductor compile thread per process: a pool of compile workers costs more than it saves.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = run_reaped(cmd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(Path(spec["out"]).read_text())


def _single_references(inits: dict) -> dict:
    """One-process losses (and the validation loss after training, key ':eval') per reference."""
    from safetensors.torch import load_file

    out = {}
    for name, extra in {"tied": {}, "moe": {**MOE, **UNTIED}}.items():
        for accum, padded, docs, fused in (
            (2, False, False, True), (4, True, False, True), (1, False, False, True), (2, False, True, True),
            (2, False, False, False),
        ):
            if name == "moe" and (padded or docs or accum != 2 or not fused):
                continue
            sc = {"model": extra, "accum": accum, "padded": padded, "docs": docs, "eval": True, "fused": fused}
            losses = run_layout(sc, load_file(inits[name]))
            key = f"single_{name}_a{accum}_p{int(padded)}" + ("_docs" if docs else "") + ("" if fused else "_plain")
            out[key], out[f"{key}:eval"] = losses[:-1], losses[-1]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_intra_op_thread):
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("pipeline")
    inits = _inits(tmp)
    ckpt = str(tmp / "ckpt_pp2xdp2_step3")
    four, two = scenarios(ckpt)
    results = {}
    for nproc, group in ((4, four), (2, two)):
        results.update(_torchrun(tmp, nproc, inits, group))
    results.update(_single_references(inits))
    results["inits"] = inits
    results["single_resume"] = run_layout(
        {"resume_from": ckpt, "resume_step": 3, "accum": 2}, load_file(inits["tied"])
    )
    return results


def _max_rel(losses, ref) -> float:
    assert len(losses) == len(ref) > 0
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref))


def _reference(name: str) -> str:
    if "moe" in name:
        return "single_moe_a2_p0"
    if "padded" in name:
        return "single_tied_a4_p1"
    if "docs" in name:
        return "single_tied_a2_p0_docs"
    if "tp2" in name:  # a tensor-parallel output layer takes the logits path even with fused_loss
        return "single_tied_a2_p0_plain"
    return "single_tied_a2_p0"


def _check(runs: dict, name: str, sc: dict) -> None:
    got, ref = runs[name], runs[_reference(name)]
    if sc.get("eval"):  # the validation loss after training, then the training losses
        assert abs(got[-1] - runs[_reference(name) + ":eval"]) / got[-1] < RTOL, (name, got[-1])
        got = got[:-1]
    assert _max_rel(got, ref) < RTOL, (name, got, ref)


def test_every_available_schedule_is_covered():
    assert {"gpipe", "1f1b", "interleaved_1f1b"} <= set(_schedules())


@pytest.mark.parametrize("sched", ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv"])
def test_pp2_schedule_matches_single_process(runs, sched):
    if sched not in _schedules():
        pytest.skip(f"torch {torch.__version__} has no {sched} schedule")
    _check(runs, f"pp2_{sched}", {})


@pytest.mark.parametrize(
    "name",
    [
        "pp2xdp2_ddp",
        "pp2xfsdp2",
        "pp2xhsdp",
        "pp2xtp2",
        "pp2xtp2_lossparallel",
        "fsdp2xtp2_lossparallel",
        "pp2_1f1b_accum4_padded",
        "pp2_gpipe_moe",
        "pp2_docs_compile_eval",
    ],
)
def test_pp_layouts_match_single_process(runs, name):
    four, two = scenarios("")
    _check(runs, name, {**four, **two}[name])


def test_the_last_stage_feeds_the_fused_loss_unless_tensor_parallel_or_turned_off(runs):
    four, two = scenarios("")
    for name, sc in {**four, **two}.items():
        if sc["parallel"].get("pp", 1) > 1 and "resume" not in name:
            want = sc.get("fused", True) and sc["parallel"].get("tp", 1) == 1
            assert runs[f"{name}:fused_seen"] == float(want), name


def test_losses_move_and_padding_and_documents_matter(runs):
    ref = runs["single_tied_a2_p0"]
    assert max(ref) - min(ref) > 1e-3
    assert _max_rel(runs["single_tied_a1_p0"], ref) < RTOL  # accumulation does not change the step
    assert abs(runs["single_tied_a4_p1"][0] - ref[0]) > 1e-3  # the padded run is a different run
    assert abs(runs["single_tied_a2_p0_docs"][0] - ref[0]) > 1e-3  # so is the document-masked one


@pytest.mark.parametrize("name", ["pp2xfsdp2", "pp2_1f1b", "pp2_zbv"])
def test_full_state_dict_of_a_pipeline_is_the_whole_model(runs, name):
    from safetensors.torch import load_file

    init = load_file(runs["inits"]["tied"])
    assert runs[f"{name}:full_state"] == {k: list(v.shape) for k, v in init.items()}


def test_pp_checkpoint_resumes_bitwise_and_reshards(runs):
    full = runs["pp2xdp2_ddp"]
    assert runs["pp2xdp2_resume"] == full[3:]  # same layout: bit for bit
    assert _max_rel(runs["pp1xdp4_resume"], full[3:]) < RTOL
    assert _max_rel(runs["single_resume"], full[3:]) < RTOL


@pytest.mark.slow
def test_eight_process_layouts_match_single_process(tmp_path, one_intra_op_thread):
    """PP 2 x TP 2 x FSDP 2 (with validation) and PP 2 x HSDP 2 x 2 on 8 gloo processes."""
    from safetensors.torch import load_file

    inits = _inits(tmp_path)
    runs = _torchrun(tmp_path, 8, inits, EIGHT)
    for key, fused in (("single_tied_a2_p0", True), ("single_tied_a2_p0_plain", False)):
        losses = run_layout({"accum": 2, "eval": True, "fused": fused}, load_file(inits["tied"]))
        runs[key], runs[f"{key}:eval"] = losses[:-1], losses[-1]
    for name, sc in EIGHT.items():
        _check(runs, name, sc)


if __name__ == "__main__":
    _worker(sys.argv[1])
