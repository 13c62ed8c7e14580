"""Learning mode of bench/cpu_vs_minimind.py: lmforge (packed, padded) against MiniMind's own model and
step, same data, tokenizer and shapes, scored by bench/learning.py's evaluator.

    PYTHONPATH=. python bench/cpu_vs_minimind.py --learn --minimind ../shared/reference/minimind \
        --data runs/demo/raw/demo.jsonl --tokens 400000 --seeds 1,2,3

Every 50th document of --data is held out (MiniMind's format: bos + text + eos, whole, never
truncated); the rest is the training JSONL both read. Phase 1 (equal real tokens): each runner
trains until its batches hold --tokens real (non-pad) target tokens, its schedule spanning exactly
those steps; the three step in turn (one step each per round), so the neighbours' load falls on all
alike, and each one's wall and CPU time is summed. Phase 2 (equal time): lmforge packed and padded
get the steps that fit MiniMind's phase-1 time at their own phase-1 time per step (the ratio is
measured side by side), with their schedules spanning those steps. The time is process CPU time, not
wall-clock: on a shared machine the wall clock mostly measures the neighbours (both are one
process, one thread, so on an idle machine the two are the same); wall seconds are reported too.

Recipes: MiniMind's train_pretrain.py (AdamW lr 5e-4 default betas and weight decay, its
`get_lr` cosine lr/10 + ..., clip 1.0, no accumulation so both take 16 rows per step); lmforge the
demo recipe (lmforge/configs/demo.yaml's optim section, and its data.document_mask for packed rows) on
MiniMind's architecture.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from cpu_vs_minimind import SHAPE, lmforge_runner, minimind_runner, prepare
from learning import documents_loss

VAL_EVERY = 50


def split_corpus(data: str, tmp: Path, tokenizer) -> tuple[str, list[list[int]]]:
    """(training JSONL path, held-out documents as token ids)."""
    train, val = [], []
    for i, line in enumerate(Path(data).read_text(encoding="utf-8").splitlines()):
        (val if i % VAL_EVERY == 0 else train).append(line)
    path = tmp / "train.jsonl"
    path.write_text("\n".join(train) + "\n", encoding="utf-8")
    docs = [
        [tokenizer.bos_token_id]
        + tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids
        + [tokenizer.eos_token_id]
        for line in val
    ]
    return str(path), docs


def real_tokens(labels: torch.Tensor) -> int:
    return int((labels != -100).sum())


def take_tokens(next_batch, count_real, budget: int | None, steps: int | None) -> list:
    """Batches until they hold `budget` real tokens (or exactly `steps` batches)."""
    batches, seen = [], 0
    while (steps is None and seen < budget) or (steps is not None and len(batches) < steps):
        batch = next_batch()
        batches.append(batch)
        seen += count_real(batch)
    return batches


class Runner:
    """One training run: prebuilt batches, its step, its lr rule, its clocks."""

    def __init__(self, name, model, optimizer, step, batches, lr_at):
        self.name, self.model, self.optimizer, self.step_fn = name, model, optimizer, step
        self.batches, self.lr_at = batches, lr_at
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.done, self.tokens, self.wall, self.cpu = 0, 0, 0.0, 0.0

    def step(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = self.lr_at(base, self.done, len(self.batches))
        wall, cpu = time.perf_counter(), time.process_time()
        self.tokens += self.step_fn(self.batches[self.done])
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.done += 1


def lmforge_run(mode, prepared, fp, recipe, seed, budget=None, steps=None) -> Runner:
    from lmforge.train.schedule import lr_multiplier

    parts: dict = {}
    _, step, _ = lmforge_runner(
        mode,
        prepared,
        fp,
        0,
        optim=recipe["optim"],
        seed=seed,
        parts=parts,
        document_mask=recipe["data"].get("document_mask", False),
    )
    batches = take_tokens(lambda: next(parts["loader"]), lambda b: real_tokens(b["labels"]), budget, steps)
    rule = lr_multiplier(parts["cfg"].optim, len(batches))
    return Runner(
        f"lmforge {mode}",
        parts["model"],
        parts["optimizer"],
        step,
        batches,
        lambda base, k, total: base * rule(k),
    )


def minimind_run(root, train_path, seed, lr, budget) -> Runner:
    from trainer.trainer_utils import get_lr  # MiniMind's own schedule, from its checkout

    parts: dict = {}
    _, step, _ = minimind_runner(root, train_path, 0, seed=seed, lr=lr, parts=parts)
    ds, rows = parts["dataset"], iter(parts["order"])

    def next_batch():
        items = [ds[next(rows)] for _ in range(SHAPE["batch"])]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    batches = take_tokens(next_batch, lambda b: real_tokens(b[1][:, 1:]), budget, None)
    return Runner(
        "MiniMind",
        parts["model"],
        parts["optimizer"],
        step,
        batches,
        lambda base, k, total: get_lr(k, total, base),
    )


def interleave(runners: list[Runner]) -> None:
    while any(r.done < len(r.batches) for r in runners):
        for r in runners:
            if r.done < len(r.batches):
                r.step()


def row(budget: str, seed: int, r: Runner, docs) -> dict:
    score = documents_loss(r.model, docs, SHAPE["seq"])
    return {
        "budget": budget,
        "seed": seed,
        "runner": r.name,
        "steps": r.done,
        "real_tokens": r.tokens,
        "wall_s": round(r.wall, 1),
        "cpu_s": round(r.cpu, 1),
        "val_loss": round(score["loss"], 4),
        "val_ppl": round(score["ppl"], 1),
        "val_tokens": score["tokens"],
    }


def show(rows: list[dict]) -> None:
    for r in rows:  # as soon as a phase ends: a long run cut short keeps what it measured
        print("RESULT", json.dumps(r), file=sys.stderr, flush=True)


def learn(args, root: Path) -> int:
    from transformers import AutoTokenizer

    from lmforge.demo import demo_config_tree

    sys.path.insert(0, str(root))
    recipe = demo_config_tree()  # its optim section, and data.document_mask for packed rows
    optim = recipe["optim"]
    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_path, docs = split_corpus(args.data, Path(tmp), tokenizer)
        fp = prepare(train_path, root / "model", Path(tmp) / "prepared")
        prepared = Path(tmp) / "prepared"
        for seed in [int(s) for s in args.seeds.split(",")]:
            first = [
                lmforge_run(m, prepared, fp, recipe, seed, budget=args.tokens) for m in ("packed", "padded")
            ]
            mm = minimind_run(root, train_path, seed, args.minimind_lr, args.tokens)
            interleave(first + [mm])
            rows += [row("equal real tokens", seed, r, docs) for r in first + [mm]]
            show(rows[-3:])
            timed = [
                lmforge_run(
                    r.name.split()[1],
                    prepared,
                    fp,
                    recipe,
                    seed,
                    steps=max(1, round(mm.cpu / (r.cpu / r.done))),
                )
                for r in first
            ]
            interleave(timed)
            rows += [row("equal CPU time (MiniMind's)", seed, r, docs) for r in timed]
            rows.append(row("equal CPU time (MiniMind's)", seed, mm, docs))
            show(rows[-3:])
    print(
        f"optim (lmforge): {json.dumps(optim)}; MiniMind lr {args.minimind_lr}; {len(docs)} held-out docs; "
        f"shape {SHAPE}; torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        "| budget | runner | seeds | steps | real tokens | wall s | CPU s | val loss median (range) | val ppl |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in dict.fromkeys((r["budget"], r["runner"]) for r in rows):
        rs = [r for r in rows if (r["budget"], r["runner"]) == key]
        loss = [r["val_loss"] for r in rs]
        med = statistics.median
        print(
            f"| {key[0]} | {key[1]} | {','.join(str(r['seed']) for r in rs)} | {med(r['steps'] for r in rs):.0f} | "
            f"{med(r['real_tokens'] for r in rs):,.0f} | {med(r['wall_s'] for r in rs):.0f} | "
            f"{med(r['cpu_s'] for r in rs):.0f} | {med(loss):.4f} ({min(loss):.4f}-{max(loss):.4f}) | "
            f"{med(r['val_ppl'] for r in rs):.1f} |"
        )
    return 0
