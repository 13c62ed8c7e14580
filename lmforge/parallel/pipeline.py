"""Pipeline parallel: a plain `Transformer` split by layers into stage modules, built on meta.

Layout. `parallel.pp` ranks along the outermost mesh axis each run `pp_virtual_stages` stages
(1 for gpipe/1f1b, >= 2 for interleaved_1f1b/zero_bubble, 2 for zbv), S = pp x v stages in all.
Stage 0 holds the embedding, stage S-1 the final norm, the output projection and the loss. Stage
s runs on rank s % pp (looped schedules) or, for zbv, on rank s for s < pp and 2pp-1-s after
(the "V": rank 0 holds the first and the last stage).

Balance (`split_layers`). Blocks cost one unit each; the output projection costs V*h / P_block
units (a matmul with V*h weights per token, like a block's P_block) and the embedding half of
that (its parameters, gradients and optimizer state, but no matmul). Each stage gets at least one
block and the remaining blocks go one at a time to the cheapest stage, so the first and last
stages carry fewer blocks. `parallel.pp_layers` overrides it with an explicit count per stage.

Names. A stage module has the plain model's attribute names (`tok_embeddings`, `layers` as a
ModuleDict keyed by the global layer index, `norm`, `output`), and `PipelineModel`, the object
the trainer, the optimizer and checkpoints see, holds the same submodules under the same names:
its state dict keys are exactly `layers.{i}...` of the plain model, so DCP checkpoints reshard
between pipeline and non-pipeline layouts.

Tied embeddings. The last stage keeps its own copy of the embedding table under the same name
`tok_embeddings.weight` (used as the output projection). The copy starts equal to stage 0's, their
gradients are summed between the first- and last-stage ranks of each (dp, tp) coordinate after
backward, so both take identical optimizer steps; the gradient norm counts the table once, and a
checkpoint stores it once (DCP deduplicates equal keys at equal offsets).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError, LmforgeError
from lmforge.model.transformer import init_decoder_parts
from lmforge.parallel.sharding import init_seed, init_weights_seeded, shard_module


def split_layers(num_layers: int, num_stages: int, embed_cost: float, output_cost: float) -> list[int]:
    """Blocks per stage balancing `1 per block + embed_cost on stage 0 + output_cost on the last`."""
    if num_layers < num_stages:
        raise ConfigError(
            f"parallel.pp: {num_stages} pipeline stages but model.num_layers is {num_layers}; "
            "every stage needs at least one block, lower parallel.pp or pp_virtual_stages"
        )
    counts = [1] * num_stages
    extra = [0.0] * num_stages
    extra[0] += embed_cost
    extra[-1] += output_cost
    for _ in range(num_layers - num_stages):
        # The cheapest stage takes the next block (the first of equals); with identical blocks
        # this minimises the most expensive stage, e.g. Llama3-70B on 8 stages: 10,11,10,...,10,9.
        costs = [c + e for c, e in zip(counts, extra)]
        counts[costs.index(min(costs))] += 1
    return counts


def end_costs(model_cfg) -> tuple[float, float]:
    """(embedding, output) cost in blocks for `split_layers`."""
    from lmforge.model.flops import count_params

    counts = count_params(model_cfg)
    vh = model_cfg.vocab_size * model_cfg.hidden_size
    untied_out = 0 if model_cfg.tie_embeddings else vh
    block = (counts["active"] - counts["embedding"] - untied_out) / model_cfg.num_layers
    block = max(block, 1.0)
    return 0.5 * vh / block, vh / block


def stage_layout(pcfg, model_cfg) -> list[list[int]]:
    """Global layer indices of each stage, stage 0 first."""
    stages = pcfg.pp * pcfg.pp_virtual_stages
    if pcfg.pp_layers is not None:
        if sum(pcfg.pp_layers) != model_cfg.num_layers:
            raise ConfigError(
                f"parallel.pp_layers: {pcfg.pp_layers} sums to {sum(pcfg.pp_layers)} but model.num_layers "
                f"is {model_cfg.num_layers}; make the counts add up"
            )
        counts = list(pcfg.pp_layers)
    else:
        counts = split_layers(model_cfg.num_layers, stages, *end_costs(model_cfg))
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def stages_of_rank(schedule: str, pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Stage indices run by `pp_rank`, in schedule order."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: blocks `layer_ids`, plus the embedding (first stage)
    or final norm + output projection (last stage). Input/output: token ids -> hidden states ->
    logits; MoE models also carry the running aux-loss sum ([1]) from stage to stage."""

    def __init__(self, model, layer_ids: list[int], first: bool, last: bool, tp: int):
        super().__init__()
        cfg = model.cfg
        self.cfg = cfg
        self.first, self.last = first, last
        self.carry_aux = cfg.moe is not None
        self.seq_factor = tp  # hidden states between stages hold T / tp positions (sequence parallel)
        self.tok_embeddings = model.tok_embeddings if first else None
        self.dropout = model.dropout if first else None
        if last and cfg.tie_embeddings and not first:
            with torch.device("meta"):
                self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        table = (cfg.max_position_embeddings, cfg.resolved_head_dim)
        self.register_buffer("rope_cos", torch.empty(table, device="meta"), persistent=False)
        self.register_buffer("rope_sin", torch.empty(table, device="meta"), persistent=False)

    def init_weights(self) -> None:
        """The plain model's init rule (lmforge.model.Transformer.init_weights) on this stage's parts."""
        init_decoder_parts(self.cfg, self, self.layers.values())

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None):
        if self.first:
            h = self.dropout(self.tok_embeddings(x))
            seq = x.shape[1]
        else:
            h = x
            seq = x.shape[1] * self.seq_factor
        cos = self.rope_cos[:seq].to(h.dtype)
        sin = self.rope_sin[:seq].to(h.dtype)
        if self.carry_aux and aux is None:
            aux = torch.zeros(1, device=h.device, dtype=torch.float32)
        for layer in self.layers.values():
            h, layer_aux = layer(h, cos, sin)
            if layer_aux is not None:
                aux = aux + layer_aux.float().reshape(1)
        if self.last:
            h = self.norm(h)
            h = self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)
        return (h, aux) if self.carry_aux else h


class PipelineModel(nn.Module):
    """This rank's share of a pipelined model: the union of its stages' submodules under the plain
    model's names (what optimizers, `state_dict` and DCP see), plus the stages themselves and
    their schedule. Train it with `pipeline_step.pipeline_gradients`, not by calling it."""

    is_pipeline = True

    def __init__(self, cfg, stages: list[StageModule], stage_ids: list[int], num_stages: int):
        super().__init__()
        self.cfg = cfg.model
        for name in ("tok_embeddings", "norm", "output"):
            mods = [getattr(s, name) for s in stages if getattr(s, name) is not None]
            setattr(self, name, mods[0] if mods else None)
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
        # Kept out of the module tree so names stay plain.
        self.__dict__["stages"] = stages
        self.stage_ids, self.num_stages = stage_ids, num_stages
        self.has_first = 0 in stage_ids
        self.has_last = num_stages - 1 in stage_ids
        # The last stage's tied table is a copy of stage 0's (see the module docstring).
        self.tied_copy = cfg.model.tie_embeddings and self.has_last and not self.has_first
        self.tied_group = None

    def train(self, mode: bool = True):
        super().train(mode)
        for s in self.stages:
            s.train(mode)
        return self

    def forward(self, *args, **kwargs):
        raise LmforgeError(
            "a pipeline-parallel model runs through its schedule (lmforge.parallel.pipeline_step); "
            "consolidate the checkpoint to evaluate or generate with the whole model"
        )

    def norm_parameters(self) -> list[nn.Parameter]:
        """Parameters that count toward the global gradient norm (the tied copy counts once)."""
        skip = {id(self.tok_embeddings.weight)} if self.tied_copy else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def sync_tied_grads(self) -> None:
        """Sum the tied table's gradient between the first- and last-stage ranks."""
        if self.tied_group is None or self.tok_embeddings is None:
            return
        weight = self.tok_embeddings.weight
        grad = weight.grad
        if grad is None:  # no microbatch touched it: keep both replicas' updates equal anyway
            grad = weight.grad = torch.zeros_like(weight)
        if hasattr(grad, "placements") and grad.placements != weight.placements:
            # A tensor-parallel embedding's backward can leave a partial or replicated gradient;
            # both sides must hold the parameter's shard to add them up.
            grad = weight.grad = grad.redistribute(placements=weight.placements)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self.tied_group)

    @torch.no_grad()
    def copy_tied_weight(self) -> None:
        """Make the last stage's table equal stage 0's (after init)."""
        if self.tied_group is None or self.tok_embeddings is None:
            return
        weight = self.tok_embeddings.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        if self.tied_copy:
            local.zero_()
        dist.all_reduce(local, group=self.tied_group)


def _tied_groups(ctx):
    """For each (dp, tp) coordinate, the group {its rank on pp stage 0, its rank on the last pp
    rank}; every rank creates every group. Returns this rank's group or None."""
    per_stage = ctx.shape.dp_size * ctx.shape.tp
    mine = None
    for c in range(per_stage):
        ranks = [c, (ctx.pp_size - 1) * per_stage + c]
        group = dist.new_group(ranks=ranks)
        if ctx.rank in ranks:
            mine = group
    return mine


def build_pipeline_model(cfg, ctx) -> PipelineModel:
    """This rank's stages: built on meta, each sharded like a model (TP -> AC -> compile -> FSDP),
    then materialised and initialised (ddp replicates through FSDP2, see sharding.shard_module)."""
    from lmforge.model import Transformer

    pcfg, shape = cfg.parallel, ctx.shape
    if cfg.model.tie_embeddings and pcfg.pp_schedule == "zbv":
        raise ConfigError(
            "parallel.pp_schedule: zbv puts the first and last stage on one rank, which tied embeddings "
            "do not support yet; set model.tie_embeddings false or use interleaved_1f1b"
        )
    layout = stage_layout(pcfg, cfg.model)
    num_stages = len(layout)
    ids = stages_of_rank(pcfg.pp_schedule, ctx.pp_rank, shape.pp, pcfg.pp_virtual_stages)
    with torch.device("meta"):
        full = Transformer(cfg.model)
    stages = []
    for s in ids:
        stage = StageModule(full, layout[s], s == 0, s == num_stages - 1, shape.tp)
        offload = shard_module(stage, cfg, ctx, local_logits=True)
        stage.to_empty(device=torch.device("cpu") if offload else ctx.device)
        init_weights_seeded(stage, init_seed(cfg.run.seed, ctx) + 7919 * (s + 1), ctx.device)
        if offload:
            for name in ("rope_cos", "rope_sin"):
                stage._buffers[name] = stage._buffers[name].to(ctx.device)
        stages.append(stage)
    del full
    model = PipelineModel(cfg, stages, ids, num_stages)
    model.__dict__.update(run_cfg=cfg, ctx=ctx)  # for the step and the clip, outside the module tree
    if cfg.model.tie_embeddings:
        model.tied_group = _tied_groups(ctx)
        model.copy_tied_weight()
    return model
