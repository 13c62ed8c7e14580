"""Pipeline layout without processes: the stage balance rule, explicit pp_layers, which stages a
rank runs per schedule, the pp x dp x tp mesh arithmetic, and one-line errors for layouts that
cannot run."""

from __future__ import annotations

import pytest

from lmforge.config import config_from_dict
from lmforge.errors import ConfigError
from lmforge.parallel.mesh import resolve_mesh_shape
from lmforge.parallel.pipeline import end_costs, split_layers, stage_layout, stages_of_rank
from lmforge.parallel.pipeline_step import available_schedules, microbatches


def _cfg(model=None, **parallel):
    tree = {
        "model": {"vocab_size": 256, "hidden_size": 64, "num_layers": 8, "num_heads": 4, **(model or {})},
        "data": {"seq_len": 16},
        "train": {"device": "cpu", "global_batch_size": 8},
        "parallel": parallel,
    }
    return config_from_dict(tree, "<test>")


def test_split_balances_by_cost_and_keeps_a_block_per_stage():
    # 80 blocks on 8 stages, embedding worth 0.6 blocks and output 1.2 (Llama3-70B's ratios):
    counts = split_layers(80, 8, 0.6, 1.2)
    assert sum(counts) == 80 and min(counts) >= 1
    assert counts[0] <= counts[3] and counts[-1] < counts[3]  # ends carry less
    costs = [c + e for c, e in zip(counts, [0.6, 0, 0, 0, 0, 0, 0, 1.2])]
    assert max(costs) - min(costs) <= 1.0  # no stage a whole block heavier than another
    # A huge output projection empties the last stage down to its one guaranteed block.
    assert split_layers(6, 3, 0.0, 10.0) == [3, 2, 1]
    with pytest.raises(ConfigError, match="num_layers"):
        split_layers(3, 4, 0.0, 0.0)


def test_end_costs_follow_vocab_and_tying():
    untied = end_costs(_cfg({"tie_embeddings": False}).model)
    assert untied[1] == pytest.approx(2 * untied[0])
    big_vocab = end_costs(_cfg({"vocab_size": 4096, "tie_embeddings": False}).model)
    assert big_vocab[1] == pytest.approx(16 * untied[1], rel=1e-6)


def test_explicit_pp_layers_and_layer_ids():
    cfg = _cfg(pp=2, pp_layers=[3, 5])
    assert stage_layout(cfg.parallel, cfg.model) == [[0, 1, 2], [3, 4, 5, 6, 7]]
    with pytest.raises(ConfigError, match="pp_layers"):
        _cfg(pp=2, pp_layers=[3, 4])


def test_stages_of_rank_per_schedule():
    assert stages_of_rank("1f1b", 1, 4, 1) == [1]
    assert stages_of_rank("interleaved_1f1b", 1, 4, 2) == [1, 5]
    assert stages_of_rank("zbv", 0, 4, 2) == [0, 7]  # the V: rank 0 holds the first and last stage
    assert stages_of_rank("zbv", 3, 4, 2) == [3, 4]


def test_mesh_puts_pp_outermost():
    shape = resolve_mesh_shape(_cfg(pp=2, strategy="fsdp+tp", tp=2).parallel, 8)
    assert (shape.pp, shape.dp_replicate, shape.dp_shard, shape.tp) == (2, 1, 2, 2)
    assert shape.world_size == 8
    assert resolve_mesh_shape(_cfg(pp=2).parallel, 2).strategy == "single"
    with pytest.raises(ConfigError, match="parallel.pp"):
        resolve_mesh_shape(_cfg(pp=3, strategy="ddp").parallel, 4)


def _micro(dp_size=1, **parallel):
    cfg = _cfg(**parallel)
    return microbatches(cfg.parallel, cfg.train, dp_size)


def test_microbatch_rules():
    assert _micro(pp=2, pp_microbatches=4) == 4
    with pytest.raises(ConfigError, match="at least one per stage"):
        _micro(pp=4)  # 1f1b with one microbatch for 4 stages
    with pytest.raises(ConfigError, match="multiple"):
        _micro(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2, pp_microbatches=3)
    with pytest.raises(ConfigError, match="zbv"):
        _micro(pp=2, pp_schedule="zbv", pp_virtual_stages=2, pp_microbatches=2)
    assert _micro(pp=2, pp_schedule="gpipe") == 1
    # The schedule cuts a rank's share of the global batch (8 sequences / dp 2 = 4) into them:
    # the batch rule of config.batch_split_error, in one line naming what to change.
    assert _micro(2, pp=2, pp_microbatches=4) == 4
    with pytest.raises(ConfigError, match=r"train.global_batch_size 8 is not divisible by data-parallel size x "
                       r"pp_microbatches = 2 x 8; change parallel.pp_microbatches"):
        _micro(2, pp=2, pp_microbatches=8)
    assert {"gpipe", "1f1b", "interleaved_1f1b"} <= set(available_schedules())
    # The schedule names have one home (config.PP_SCHEDULES); the class table covers exactly them.
    from lmforge.config import PP_MULTI_STAGE_SCHEDULES, PP_SCHEDULES
    from lmforge.parallel.pipeline_step import SCHEDULES

    assert set(SCHEDULES) == set(PP_SCHEDULES) and set(PP_MULTI_STAGE_SCHEDULES) <= set(PP_SCHEDULES)
