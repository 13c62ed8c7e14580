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

Stages. A stage is the plain `lmforge.model.Transformer` (the same forward) with the parts it
does not own set to None and `layers` a ModuleDict keyed by the global layer index: stage 0 keeps
the embedding, the last stage the final norm and the output projection. `PipelineModel`, the
object the trainer, the optimizer and checkpoints see, holds the same submodules under the same
names: its state dict keys are exactly `layers.{i}...` of the plain model, so DCP checkpoints
reshard between pipeline and non-pipeline layouts.

Tied embeddings. When the first and the last stage sit on one rank (zbv: the V puts both on rank
0) they share the one embedding module. Otherwise the last stage keeps its own copy of the table
under the same name `tok_embeddings.weight` (used as the output projection): the copy starts equal
to stage 0's, their gradients are summed between the first- and last-stage ranks of each (dp, tp)
coordinate after backward, so both take identical optimizer steps; the gradient norm counts the
table once, and a checkpoint stores it once (DCP deduplicates equal keys at equal offsets).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError, LmforgeError
from lmforge.model import Transformer, build
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


def stage_module(model_cfg, layer_ids: list[int], first: bool, last: bool) -> Transformer:
    """The Transformer of one stage, on meta: blocks `layer_ids` (global indices), the embedding
    on the first stage, the final norm and output projection on the last (and, tied, the table
    the output projection reads)."""
    stage = build(model_cfg)
    stage.layers = nn.ModuleDict({str(i): stage.layers[i] for i in layer_ids})
    keeps_table = first or (last and model_cfg.tie_embeddings)
    if not keeps_table:
        stage.tok_embeddings = None
    if not last:
        stage.norm = stage.output = None
    return stage


class PipelineModel(nn.Module):
    """This rank's share of a pipelined model: the union of its stages' submodules under the plain
    model's names (what optimizers, `state_dict` and DCP see), plus the stages themselves. It is
    trained through `pipeline_step.PipelineSchedule`, not called."""

    def __init__(self, model_cfg, stages: list[Transformer], stage_ids: list[int], num_stages: int, ctx):
        super().__init__()
        self.cfg = model_cfg
        for name in ("tok_embeddings", "norm", "output"):
            mods = [getattr(s, name) for s in stages if getattr(s, name) is not None]
            setattr(self, name, mods[0] if mods else None)
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})
        # A tuple, not a ModuleList: the stages' parameters are registered once, under plain names.
        self.stages = tuple(stages)
        self.stage_ids, self.num_stages = stage_ids, num_stages
        self.pp_group = ctx.pp_group
        self.has_first = 0 in stage_ids
        self.has_last = num_stages - 1 in stage_ids
        # The last stage's tied table is a copy of stage 0's held by another rank (module docstring).
        self.tied_copy = model_cfg.tie_embeddings and self.has_last and not self.has_first
        self.tied_group = None
        # Whether rank 0 of the job collects this rank's tensors (full_state_dict with cpu_offload).
        self.feeds_rank0 = ctx.dp_rank == 0 and ctx.tp_rank == 0
        self.is_rank0 = ctx.rank == 0

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


def build_pipeline_model(model_cfg, pcfg, ctx, *, seed: int, seq_len: int) -> PipelineModel:
    """This rank's stages of `model_cfg` under `pcfg` (cfg.parallel): built on meta, each sharded
    like a model (TP -> AC -> compile -> FSDP), then materialised and initialised from `seed`
    (ddp replicates through FSDP2, see sharding.shard_module)."""
    shape = ctx.shape
    layout = stage_layout(pcfg, model_cfg)
    num_stages = len(layout)
    ids = stages_of_rank(pcfg.pp_schedule, ctx.pp_rank, shape.pp, pcfg.pp_virtual_stages)
    # Tied and the last stage on rank 0 with the first (zbv): one table, no copy (the same on every rank).
    rank0 = stages_of_rank(pcfg.pp_schedule, 0, shape.pp, pcfg.pp_virtual_stages)
    shared_table = model_cfg.tie_embeddings and num_stages - 1 in rank0
    if shared_table and shape.fsdp_wrapped:
        raise ConfigError(
            f"parallel.pp_schedule: {pcfg.pp_schedule} puts the first and last stage on one rank, whose "
            "shared tied embedding FSDP cannot wrap in two stages; set parallel.strategy single (pp alone), "
            "model.tie_embeddings false, or use interleaved_1f1b"
        )
    stages = []
    for s in ids:
        stage = stage_module(model_cfg, layout[s], s == 0, s == num_stages - 1)
        if shared_table and s == num_stages - 1:  # stage 0 is built first on its rank
            stage.tok_embeddings = stages[ids.index(0)].tok_embeddings  # one table (zbv's V)
        offload = shard_module(stage, pcfg, ctx, seq_len=seq_len, local_logits=True)
        stage.to_empty(device=torch.device("cpu") if offload else ctx.device)
        init_weights_seeded(stage, init_seed(seed, ctx) + 7919 * (s + 1), ctx.device)
        if offload:
            for name in ("rope_cos", "rope_sin"):
                stage._buffers[name] = stage._buffers[name].to(ctx.device)
        stages.append(stage)
    model = PipelineModel(model_cfg, stages, ids, num_stages, ctx)
    if model_cfg.tie_embeddings and not shared_table:
        model.tied_group = _tied_groups(ctx)
        model.copy_tied_weight()
    return model
