"""`lmforge eval --tasks` and train.eval_tasks through lm-evaluation-harness.

The task set in tests/fixtures/lm_eval_tasks (lm-eval's YAML format over local JSONL: multiple
choice, generation, rolling log-likelihood) is scored by lmforge's LM and by lm-eval's own `hf`
backend on the same weights: per-item log-likelihoods within 1e-4 (fp32), the same greedy
generations and the same metrics, for an imported HF folder, a GGUF import and a sharded FSDP
training checkpoint. No network: lm-eval reads the JSONL files (paths relative to the working
directory, lm-eval's rule, so the tests run from the fixtures folder).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from paths import FIXTURES

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
from hf_tokenizer_folders import llama_style  # noqa: E402
from jobs import run_reaped, tiny_config, write_jsonl  # noqa: E402

from lmforge import cli  # noqa: E402

FIX = FIXTURES / "lm_eval_tasks"
TASKS = "lmforge_tiny"  # the group: lmforge_mc, lmforge_gen, lmforge_text
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def in_fixtures():
    before = os.getcwd()
    os.chdir(FIX)
    try:
        yield
    finally:
        os.chdir(before)


def hf_backend(folder: Path, tasks=TASKS, batch_size=4, limit=None) -> dict:
    """lm-eval's own `hf` backend on a Hugging Face folder, fp32 on the CPU."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with in_fixtures():
        return lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={folder},dtype=float32",
            tasks=tasks.split(","),
            task_manager=TaskManager(include_path=str(FIX), include_defaults=False),
            batch_size=batch_size,
            device="cpu",
            limit=limit,
            log_samples=True,
        )


def lmforge_eval(checkpoint: Path, out: Path, tasks=TASKS, batch_size=4, limit=None) -> dict:
    args = ["eval", "--checkpoint", str(checkpoint), "--tasks", tasks, "--include-path", str(FIX)]
    args += ["--batch-size", str(batch_size), "--out", str(out), "--log-samples", "--device", "cpu"]
    args += ["--limit", str(limit)] if limit else []
    with in_fixtures():
        assert cli.main(args) == 0
    return json.loads(out.read_text())


def compare(ours: dict, theirs: dict) -> dict:
    """Largest per-item log-likelihood difference per task; asserts every item and metric agrees."""
    worst = {}
    for task, items in theirs["samples"].items():
        mine = {s["doc_id"]: s for s in ours["samples"][task]}
        assert len(mine) == len(items) > 0, task
        diffs = [0.0]
        for theirs_item in items:
            ours_item = mine[theirs_item["doc_id"]]
            for a, b in zip(ours_item["resps"], theirs_item["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):  # generate_until: the same greedy text
                    assert a == b, (task, theirs_item["doc_id"], a, b)
                elif isinstance(b, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                    diffs.append(abs(a[0] - b[0]))
                    assert bool(a[1]) == bool(b[1]), (task, theirs_item["doc_id"])
                else:  # loglikelihood_rolling
                    diffs.append(abs(a - b))
        worst[task] = max(diffs)
        assert worst[task] < 1e-4, (task, worst[task])
        for key, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6), (task, key)
    print("largest per-item |log-likelihood difference|:", worst)
    return worst


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random fp32 Llama saved by transformers with a Llama-style (BOS-adding) tokenizer, its
    lmforge import, and lm-eval's hf backend on it."""
    root = tmp_path_factory.mktemp("lmeval")
    hf = llama_style(root / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(hf)
    imported = root / "imported"
    assert cli.main(["import", "--hf", str(hf), "--out", str(imported)]) == 0
    return root, hf, imported, hf_backend(hf)


def test_imported_hf_folder_matches_lm_eval_hf_backend(tiny_hf, tmp_path):
    root, hf, imported, reference = tiny_hf
    ours = lmforge_eval(imported, tmp_path / "results.json")
    compare(ours, reference)
    assert set(ours["results"]) == {"lmforge_mc", "lmforge_gen", "lmforge_text", "lmforge_tiny"}
    assert len(ours["samples"]["lmforge_mc"]) == 32 and len(ours["samples"]["lmforge_gen"]) == 32


def test_batch_size_does_not_change_scores(tiny_hf, tmp_path):
    """Batched by length with right padding: batch 1 and batch 8 give the same per-item scores."""
    _, _, imported, _ = tiny_hf
    one = lmforge_eval(
        imported, tmp_path / "b1.json", tasks="lmforge_mc,lmforge_text", batch_size=1, limit=12
    )
    eight = lmforge_eval(
        imported, tmp_path / "b8.json", tasks="lmforge_mc,lmforge_text", batch_size=8, limit=12
    )
    assert max(compare(eight, one).values()) < 1e-4


def test_gguf_import_matches_lm_eval_hf_backend(tiny_hf, tmp_path):
    _, hf, imported, reference = tiny_hf
    gguf = tmp_path / "tiny.gguf"
    assert (
        cli.main(
            [
                "export",
                "--checkpoint",
                str(imported),
                "--format",
                "gguf",
                "--dtype",
                "f32",
                "--out",
                str(gguf),
            ]
        )
        == 0
    )
    folder = tmp_path / "from_gguf"
    assert cli.main(["import", "--gguf", str(gguf), "--out", str(folder)]) == 0
    compare(lmforge_eval(folder, tmp_path / "results.json"), reference)


def test_missing_extra_unknown_task_and_missing_dataset_are_one_line(tiny_hf, tmp_path, monkeypatch, capsys):
    _, hf, imported, _ = tiny_hf
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = (FIX / "lmforge_mc.yaml").read_text().replace("task: lmforge_mc", "task: needs_data")
    (tasks / "needs_data.yaml").write_text(yaml.replace("mc.jsonl", str(tmp_path / "absent.jsonl")))
    base = ["eval", "--checkpoint", str(imported), "--include-path", str(tasks), "--tasks"]
    assert cli.main([*base, "needs_data"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: task needs_data: its dataset could not be loaded") and "--include-path" in err
    )
    assert len(err.splitlines()) == 1
    assert cli.main([*base, "no_such_task"]) == 2
    assert "unknown task no_such_task" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert cli.main([*base, "needs_data"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: lm-eval is not installed; pip install 'lmforge[eval]' (lm-evaluation-harness 0.4.x) to run --tasks"
    )


# -- trained models: train.eval_tasks during training, and a sharded FSDP checkpoint --------------
def _training_inputs(root: Path, tok_folder: Path) -> Path:
    from lmforge.data.prepare import prepare_dataset

    texts = [json.loads(line)["text"] for line in (FIX / "text.jsonl").read_text().splitlines()]
    corpus = write_jsonl(root / "corpus.jsonl", texts * 20)
    prepare_dataset([str(corpus)], str(tok_folder), root / "data", val_fraction=0.1, progress=False)
    return root / "data"


def _run_cfg(root, data, tok_folder, name, **kw):
    keys = dict(
        run__name=name,
        model__dropout=0.0,
        model__vocab_size=285,
        tokenizer__path=str(tok_folder),
        train__max_steps=4,
        train__eval_tasks=["lmforge_mc"],
        train__eval_tasks_interval=2,
        train__eval_tasks_limit=8,
        train__eval_tasks_include_path=[str(FIX)],
    )
    return tiny_config(root, data, **{**keys, **kw})


def test_train_eval_tasks_logs_metric_at_interval_and_report_plots_it(tiny_hf, tmp_path):
    from lmforge.train.report import report
    from lmforge.train.trainer import run_training

    root, hf, _, _ = tiny_hf
    data = _training_inputs(tmp_path, hf)
    with in_fixtures():
        run_training(_run_cfg(tmp_path, data, hf, "tasks"))
    run_dir = tmp_path / "runs" / "tasks"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tasks = [r for r in records if "val_lmforge_mc_acc" in r]
    assert [r["step"] for r in tasks] == [2, 4]
    assert all(0.0 <= r["val_lmforge_mc_acc"] <= 1.0 and r["tokens"] > 0 for r in tasks)
    assert tasks[1]["tokens"] == 2 * tasks[0]["tokens"]
    summary = report(run_dir)
    assert (run_dir / "plots" / "tasks.png").stat().st_size > 1000
    assert "task lmforge_mc_acc" in summary


TORCHRUN_SCRIPT = """
import os, sys
os.chdir(sys.argv[2])
from lmforge.config import load_config
from lmforge.train.trainer import run_training
run_training(load_config(sys.argv[1]))
"""


@pytest.mark.slow
def test_fsdp_checkpoint_matches_lm_eval_hf_backend_on_its_export(tiny_hf, tmp_path):
    """2 gloo ranks train with FSDP2 and train.eval_tasks (every rank runs the forwards, rank 0
    logs); the sharded DCP checkpoint then scores like lm-eval's hf backend on its HF export."""
    root, hf, _, _ = tiny_hf
    data = _training_inputs(tmp_path, hf)
    cfg = _run_cfg(
        tmp_path, data, hf, "fsdp", train__max_steps=2, parallel__strategy="fsdp", checkpoint__interval=2
    )
    cfg_path = tmp_path / "fsdp.yaml"
    cfg.save(cfg_path)
    (tmp_path / "main.py").write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = run_reaped(
        [*cmd, str(tmp_path / "main.py"), str(cfg_path), str(FIX)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fsdp"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_lmforge_mc_acc" in r] == [2]  # logged once, by rank 0
    step = run_dir / "checkpoints" / "step_2"
    assert (step / "rank_1.safetensors").is_file()  # saved by two ranks: sharded
    export = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(step), "--out", str(export), "--dtype", "float32"]) == 0
    compare(lmforge_eval(step, tmp_path / "results.json"), hf_backend(export))
