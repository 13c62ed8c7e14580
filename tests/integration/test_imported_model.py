"""An imported Hugging Face model as a user meets it (issue 9 items 6 and 7): BOS follows the
tokenizer's own rule as transformers applies it, generate and eval agree with transformers, the
README's finetune command works on the import, and an fp32 import exports in fp32."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hf_tokenizer_folders import TEXT, llama_style, smollm2_style
from jobs import run_reaped

from lmforge import cli
from lmforge.infer.bos import use_bos
from lmforge.infer.generate import encode_prompt
from lmforge.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# transformers 5 keeps a tokenizer.json post-processor even against add_bos_token: the third
# case checks that lmforge does what transformers does, not what the key alone says.
def _with_config(folder: Path, **keys) -> Path:
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))
    return folder


@pytest.mark.parametrize("style", ["smollm2", "llama", "llama_add_bos_false", "smollm2_add_bos_true"])
def test_prompt_ids_match_autotokenizer(tmp_path, style):
    folder = {
        "smollm2": lambda: smollm2_style(tmp_path / "t"),
        "llama": lambda: llama_style(tmp_path / "t"),
        "llama_add_bos_false": lambda: llama_style(tmp_path / "t", add_bos_token=False),
        "smollm2_add_bos_true": lambda: _with_config(smollm2_style(tmp_path / "t"), add_bos_token=True),
    }[style]()
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(str(folder))
    for prompt in ["the cat", "the dog ran <|im_end|> to"]:
        bos = use_bos(ours, None, None)  # an imported model: the tokenizer's rule
        assert encode_prompt(ours, prompt, bos) == theirs(prompt)["input_ids"], (style, prompt)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random fp32 Llama saved by transformers with a SmolLM2-style tokenizer, imported by the CLI."""
    root = tmp_path_factory.mktemp("imp")
    hf = smollm2_style(root / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(hf)
    out = root / "weights"
    assert cli.main(["import", "--hf", str(hf), "--out", str(out)]) == 0
    return root, hf, out, tok, model


def test_generate_and_eval_agree_with_transformers(imported, capsys):
    root, _, weights, tok, model = imported
    prompt = "the cat sat"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = prompt + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert cli.main(["generate", "--checkpoint", str(weights), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == expected.strip()

    doc = "the dog ran to the park and the cat sat on the mat."
    (root / "doc.txt").write_text(doc + "\n")
    full = torch.tensor([tok(doc)["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        reference = model(full, labels=full).loss.item()
    assert cli.main(["eval", "--checkpoint", str(weights), "--data", str(root / "doc.txt"), "--seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    loss = float(printed.split()[1])
    assert loss == pytest.approx(reference, abs=1e-4)
    assert "1 documents, each tokens + EOS; BOS not included (the tokenizer's own rule)" in printed
    assert cli.main(["eval", "--checkpoint", str(weights), "--data", str(root / "doc.txt"), "--bos"]) == 0
    assert "each BOS + tokens + EOS; BOS included (--bos)" in capsys.readouterr().out


def test_readme_finetune_command_and_fp32_export(imported, tmp_path, capsys):
    root, _, weights, _, _ = imported
    from lmforge.data.prepare import prepare_dataset

    records = [json.dumps({"text": TEXT[i : i + 80]}) for i in range(0, 800, 40)]
    (tmp_path / "text.jsonl").write_text("\n".join(records) + "\n")
    prepare_dataset([str(tmp_path / "text.jsonl")], str(weights), str(tmp_path / "data"), val_fraction=0.2)
    capsys.readouterr()
    # The README's command, as written there (plus a tiny budget for the test).
    argv = ["train", "--config", str(weights / "config.yaml"), "--run_mode", "finetune",
            f"data.train=[{tmp_path / 'data'}]", f"run.out_dir={tmp_path / 'runs'}", "train.max_steps=2",
            "train.global_batch_size=2", "data.seq_len=32", "train.device=cpu", "log.plots=false",
            "log.tensorboard=false", "train.eval_batches=1"]  # fmt: skip
    proc = run_reaped([sys.executable, "-m", "lmforge", *argv], timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "finetuning from" in proc.stdout and "done: 2/2 steps" in proc.stdout

    # fp32 in, fp32 out unless asked otherwise.
    from safetensors import safe_open

    assert cli.main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "hf_out")]) == 0
    files = list((tmp_path / "hf_out").glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118 - not a dict
    assert cli.main(["export", "--checkpoint", str(weights), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    with safe_open(str(next((tmp_path / "bf").glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 - not a dict
