"""MiniMind checkpoints both ways, against MiniMind's own model code (shared/reference/minimind,
commit d65ef2c, imported from where it lies, never copied)."""

import json
import sys

import pytest
import torch
from paths import MINIMIND

from lmforge.errors import LmforgeError
from lmforge.interop.minimind import export_minimind, import_minimind
from lmforge.model import Transformer

if not (MINIMIND / "model" / "model_minimind.py").is_file():
    pytest.skip(f"MiniMind reference source not found at {MINIMIND}", allow_module_level=True)
pytest.importorskip("transformers")
sys.path.insert(0, str(MINIMIND))
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CASES = {
    # MiniMind's current defaults (hidden 768, 8 heads / 4 KV, FFN ceil(768*pi/64)*64 = 2432), 2 layers
    "default-dense": dict(num_hidden_layers=2),
    # MiniMind2-26M: 512 wide, 8 layers, 8 heads / 2 KV, FFN 1408, vocab 6400
    "minimind2-26m": dict(
        hidden_size=512, num_hidden_layers=8, num_key_value_heads=2, intermediate_size=1408
    ),
    # current MoE defaults: 4 experts, top-1, renormalised
    "default-moe": dict(num_hidden_layers=2, use_moe=True),
    # MiniMind2-MoE widths (640 wide, 8/2 heads, experts 1728 wide, top-2), 2 layers
    "minimind2-moe": dict(
        hidden_size=640,
        num_hidden_layers=2,
        num_key_value_heads=2,
        intermediate_size=1728,
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=2,
    ),
}


def _minimind(case, seed=0):
    torch.manual_seed(seed)
    cfg = MiniMindConfig(**CASES[case], max_position_embeddings=512)
    model = MiniMindForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped or unused norm shows in the logits
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def _save_like_trainer(model, path):
    # trainer/train_pretrain.py: torch.save({k: v.half().cpu() for k, v in state_dict.items()}, ckp)
    torch.save({k: v.half().cpu() for k, v in model.state_dict().items()}, str(path))
    # MiniMind's own forward on the weights it saved (fp16 values, fp32 compute).
    model.load_state_dict({k: v.float() for k, v in torch.load(str(path), weights_only=True).items()})


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_minimind_and_export_loads_strictly(tmp_path, case):
    mm = _minimind(case)
    _save_like_trainer(mm, tmp_path / "pretrain.pth")
    mm.config.save_pretrained(str(tmp_path / "cfg"))
    with_json = case.startswith("minimind2-moe")  # top_k 2 is only in config.json; shapes give the rest
    state, cfg = import_minimind(
        tmp_path / "pretrain.pth", tmp_path / "cfg" / "config.json" if with_json else None
    )
    assert cfg.qk_norm and cfg.tie_embeddings and cfg.norm_eps == 1e-6 and cfg.rope_theta == 1e6
    assert (cfg.moe is not None) == bool(mm.config.use_moe)
    saved = torch.load(str(tmp_path / "pretrain.pth"), weights_only=True)
    assert torch.equal(state["layers.0.attention.wq.weight"], saved["model.layers.0.self_attn.q_proj.weight"])
    assert all(v.dtype == torch.float16 for v in state.values())  # kept as MiniMind saved them
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, mm.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = mm(ids).logits
        assert (ours(ids).logits - want).abs().max().item() < 1e-5

    pth = export_minimind(ours, cfg, tmp_path / "out")
    assert pth.name == f"pretrain_{mm.config.hidden_size}{'_moe' if mm.config.use_moe else ''}.pth"
    back = MiniMindForCausalLM(MiniMindConfig.from_pretrained(str(tmp_path / "out"))).eval()
    back.load_state_dict(torch.load(str(pth), weights_only=True), strict=True)
    back.float()
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max().item() < 1e-5


def test_moe_load_balancing_loss_matches_minimind(tmp_path):
    mm = _minimind("minimind2-moe")
    _save_like_trainer(mm, tmp_path / "p.pth")
    mm.config.save_pretrained(str(tmp_path / "cfg"))
    state, cfg = import_minimind(tmp_path / "p.pth", tmp_path / "cfg" / "config.json")
    assert cfg.moe.top_k == 2 and cfg.moe.aux_loss_coef == pytest.approx(2 * mm.config.router_aux_loss_coef)
    ours = Transformer(cfg)
    ours.load_state_dict(state)
    ids = torch.randint(0, mm.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    mm.train()  # MiniMind computes its aux loss only in training mode (dropout is 0)
    with torch.no_grad():
        theirs, mine = mm(ids).aux_loss, ours.train()(ids).aux_loss
    assert theirs.item() > 0 and abs(theirs.item() - mine.item()) < 1e-7


def test_untied_bf16_checkpoint_and_config_checks(tmp_path):
    torch.manual_seed(0)
    mm = MiniMindForCausalLM(
        MiniMindConfig(
            hidden_size=64,
            num_hidden_layers=1,
            vocab_size=300,
            tie_word_embeddings=False,
            max_position_embeddings=64,
        )
    ).eval()
    # a bf16 checkpoint this time (fp16 is what MiniMind's trainer writes)
    torch.save({k: v.bfloat16() for k, v in mm.state_dict().items()}, str(tmp_path / "p.pth"))
    mm.load_state_dict(
        {k: v.float() for k, v in torch.load(str(tmp_path / "p.pth"), weights_only=True).items()}
    )
    mm.config.save_pretrained(str(tmp_path / "cfg"))
    state, cfg = import_minimind(tmp_path / "p.pth", tmp_path / "cfg" / "config.json")
    assert not cfg.tie_embeddings and cfg.max_position_embeddings == 64
    assert state["output.weight"].dtype == torch.bfloat16
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (ours(ids).logits - mm(ids).logits).abs().max().item() < 1e-5
    wrong = json.loads((tmp_path / "cfg" / "config.json").read_text())
    wrong["num_key_value_heads"] = 8
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(LmforgeError, match="num_key_value_heads=8 but the weights have 4"):
        import_minimind(tmp_path / "p.pth", tmp_path / "wrong.json")
    wrong["num_key_value_heads"], wrong["inference_rope_scaling"] = 4, True
    (tmp_path / "yarn.json").write_text(json.dumps(wrong))
    with pytest.raises(LmforgeError, match="YaRN"):
        import_minimind(tmp_path / "p.pth", tmp_path / "yarn.json")


def test_refusals(tmp_path):
    import argparse  # any class outside torch's weights-only allow-list stands for arbitrary code

    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2, 2), "x": argparse.Namespace(a=1)},
        str(tmp_path / "evil.pth"),
    )
    with pytest.raises(LmforgeError, match="refused as a MiniMind checkpoint: it holds pickled objects"):
        import_minimind(tmp_path / "evil.pth")
    with pytest.raises(LmforgeError, match="no such file"):
        import_minimind(tmp_path / "missing.pth")
    from lmforge.config import ModelConfig

    plain = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    with pytest.raises(LmforgeError, match="always applies QK-norm"):
        export_minimind(Transformer(plain), plain, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imported_folder_generates_like_minimind(tmp_path):
    from lmforge.config import load_config
    from lmforge.infer.generate import generate
    from lmforge.interop import import_minimind_to_folder
    from lmforge.interop.loading import load_model_for_inference

    mm = _minimind("default-dense")
    _save_like_trainer(mm, tmp_path / "pretrain_768.pth")
    out = import_minimind_to_folder(
        tmp_path / "pretrain_768.pth", tmp_path / "w", tokenizer=MINIMIND / "model"
    )
    run_cfg = load_config(out / "config.yaml")
    assert run_cfg.train.load_checkpoint == str(out) and run_cfg.checkpoint.export_dtype == "float16"
    model, _, tok = load_model_for_inference(out)
    prompt = [tok.bos_id, *tok.encode("你好，MiniMind")]
    ours = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        theirs = mm.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert ours == theirs[0, len(prompt) :].tolist()


def test_script_differences_name_what_minimind_trainers_would_not_build(tmp_path):
    from lmforge.interop.minimind import minimind_script_differences

    for case, want in (
        ("default-dense", []),
        ("minimind2-26m", ["num_key_value_heads=2", "intermediate_size=1408"]),
    ):
        mm = MiniMindForCausalLM(MiniMindConfig(**CASES[case]))
        torch.save(mm.state_dict(), str(tmp_path / "p.pth"))
        _, cfg = import_minimind(tmp_path / "p.pth")
        got = minimind_script_differences(cfg)
        assert [d.split(" ")[0] for d in got] == want, got


def test_cli_import_and_export_minimind(tmp_path):
    from lmforge.cli import main

    mm = _minimind("default-dense")
    _save_like_trainer(mm, tmp_path / "pretrain_768.pth")
    args = [
        "import",
        "--minimind",
        str(tmp_path / "pretrain_768.pth"),
        "--tokenizer",
        str(MINIMIND / "model"),
    ]
    assert main([*args, "--out", str(tmp_path / "w")]) == 0
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "w"),
                "--format",
                "minimind",
                "--out",
                str(tmp_path / "mm"),
            ]
        )
        == 0
    )
    back = MiniMindForCausalLM(MiniMindConfig.from_pretrained(str(tmp_path / "mm"))).eval()
    saved = torch.load(str(tmp_path / "mm" / "pretrain_768.pth"), weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved.values())
    back.load_state_dict(saved, strict=True)
    ids = torch.randint(0, 6400, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back.float()(ids).logits - mm(ids).logits).abs().max().item() < 1e-5
