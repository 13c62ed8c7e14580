"""CPU cost of a training step (forward + backward) of minimind2-moe-shaped layers: the MoE
dispatch before (per-expert loop with host-side counts), after (auto: per-expert slices on the
CPU; and the sync-free tiled dispatch that accelerators without grouped GEMM use), and the dense
model with the same active parameters per token.

    python bench/moe_step.py [--layers 2] [--seq 256] [--batch 4] [--rounds 5]

minimind2-moe: hidden 640, 4 routed experts top-2 + 1 shared expert, each of the dense width
(minimind rule: 1728). Dense with equal active parameters: one FFN of width 3 x 1728. CPU-seconds
via time.process_time, one thread, interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.model import moe as moe_module
from lmforge.model.moe import MoEFeedForward, load_balancing_loss
from lmforge.model.presets import get_preset


def loop_dispatch(self, x):
    """The dispatch before the sync-free one (commit 2b2f05f): per-expert gather, counts on the host."""
    shape = x.shape
    x_flat = x.reshape(-1, shape[-1])
    probs, weights, idx = self.route(x_flat)
    flat_idx = idx.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    token_of, weight_of = order // self.top_k, weights.reshape(-1)[order]
    counts = torch.bincount(flat_idx, minlength=self.num_experts).tolist()
    out, start = torch.zeros_like(x_flat), 0
    for expert, count in zip(self.experts, counts):
        tokens = token_of[start : start + count]
        out.index_add_(0, tokens, expert(x_flat[tokens]) * weight_of[start : start + count, None])
        start += count
    for shared in self.shared_experts:
        out = out + shared(x_flat)
    aux = load_balancing_loss(probs, idx, self.num_experts, self.aux_loss_coef)
    return self.dropout(out.view(shape)), aux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per runner per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = get_preset("minimind2-moe")
    preset.update(num_layers=args.layers, max_position_embeddings=args.seq)
    moe_cfg = ModelConfig(**preset)
    moe_model = Transformer(moe_cfg)
    width = moe_model.layers[0].feed_forward.experts[0].w1.out_features
    dense_cfg = ModelConfig(**{**preset, "moe": None, "intermediate_size": 3 * width})
    dense_model = Transformer(dense_cfg)
    ids = torch.randint(0, moe_cfg.vocab_size, (args.batch, args.seq))
    after = MoEFeedForward.forward

    def step(model, dispatch=None, mode="auto"):
        if dispatch is not None:
            MoEFeedForward.forward = dispatch
        moe_module.DISPATCH = mode
        try:
            out = model(ids)
            (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
            model.zero_grad(set_to_none=True)
        finally:
            MoEFeedForward.forward = after
            moe_module.DISPATCH = "auto"

    runners = {
        "MoE, loop dispatch (before)": lambda: step(moe_model, loop_dispatch),
        "MoE, after: auto (CPU: per-expert slices)": lambda: step(moe_model),
        "MoE, after: tiled sync-free (accelerator fallback)": lambda: step(moe_model, mode="tiled"),
        "dense, equal active params": lambda: step(dense_model),
    }
    rounds = {k: [] for k in runners}
    for r in range(args.rounds + 1):
        for name, run in runners.items():
            start = time.process_time()
            for _ in range(args.steps):
                run()
            if r:
                rounds[name].append((time.process_time() - start) / args.steps)
    print(f"minimind2-moe shape, {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32, 1 thread; "
          f"active params: MoE {moe_model.num_active_params() / 1e6:.1f}M, dense {dense_model.num_params() / 1e6:.1f}M")
    print("| layers | CPU-s / step (median) | vs dense |")
    print("|---|---|---|")
    dense = statistics.median(rounds["dense, equal active params"])
    for name, times in rounds.items():
        print(f"| {name} | {statistics.median(times):.3f} | {statistics.median(times) / dense:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
