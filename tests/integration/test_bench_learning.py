"""bench/learning.py's recipe specs and its held-out evaluator (the one every recipe and MiniMind's
model are scored by)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from paths import REPO

from lmforge.config import ModelConfig
from lmforge.model import Transformer

_SPEC = importlib.util.spec_from_file_location(
    "bench_learning", REPO / "bench" / "learning.py"
)
learning = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(learning)


def test_recipe_spec_adds_dotted_overrides_to_the_named_recipe():
    tree = learning.recipe_tree("muon+optim.muon_lr=0.04+train.global_batch_size=32+optim.schedule=wsd")
    assert tree["optim"]["name"] == "muon"
    assert tree["optim"]["muon_lr"] == 0.04
    assert tree["optim"]["schedule"] == "wsd"
    assert tree["train"] == {"global_batch_size": 32}
    assert learning.recipe_tree("adamw+data.document_mask=true") == {"data": {"document_mask": True}}
    assert "train" not in learning.RECIPES["muon"]  # the table itself is not modified


def test_documents_loss_equals_scoring_each_window_alone():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2))
    docs = [torch.randint(0, 50, (n,)).tolist() for n in (3, 9, 17, 2, 12)]
    seq_len = 8
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            for s in range(0, len(doc) - 1, seq_len):
                w = torch.tensor(doc[s : s + seq_len + 1])
                logits = model(w[None, :-1]).logits[0]
                total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
                count += len(w) - 1
    got = learning.documents_loss(model, docs, seq_len, batch_size=3)  # batches mix window lengths
    assert got["tokens"] == count == sum(len(d) - 1 for d in docs)
    assert abs(got["loss"] - total / count) < 1e-5
    assert model.training  # the evaluator restores the mode it found
