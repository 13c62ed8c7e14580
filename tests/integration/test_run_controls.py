"""train.max_time: the run stops at its time budget with a checkpoint, and resuming continues it."""

import torch
from jobs import make_dataset, tiny_config

from lmforge.train import trainer


def test_max_time_stops_with_a_checkpoint_and_the_run_resumes(tmp_path, capsys):
    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "data")
    kw = dict(run__name="t", train__max_steps=6, checkpoint__interval=0)
    stopped = trainer.run_training(tiny_config(tmp_path, data, train__max_time=1e-6, **kw))
    assert stopped["preempted"] and stopped["steps"] == 1 and stopped["checkpoint"].endswith("step_1")
    assert "stopped by train.max_time" in capsys.readouterr().out
    resumed = trainer.run_training(tiny_config(tmp_path, data, **kw))
    assert resumed["resumed_from"].endswith("step_1") and resumed["steps"] == 6 and not resumed["preempted"]
