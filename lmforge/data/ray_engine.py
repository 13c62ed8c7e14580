"""`lmforge prepare --engine ray`: the same work units as the local engine, run as Ray Data map
tasks on a Ray cluster (or a local Ray started for the command).

Each task loads the tokenizer once (an actor per concurrency slot), encodes whole units with
`encode.encode_unit` and writes their shard files straight into the output folder, then returns
the unit's record; the driver shows progress as records arrive and writes the one meta.json.
The output folder, the inputs and the tokenizer must be on a filesystem every node sees (NFS,
Lustre, a FUSE-mounted bucket) under the same paths. The bytes equal the local engine's.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lmforge.errors import DataError


class _EncodeUnits:
    """Ray Data callable class: one tokenizer per actor, one record per unit row."""

    def __init__(self, job: dict[str, Any]):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"  # one CPU per actor, as Ray schedules it
        from lmforge.data.encode import load_checked_tokenizer

        self.job = job
        self.error = None
        try:
            self.tok = load_checked_tokenizer(job)
        except Exception as exc:  # noqa: BLE001 - reported per row, re-raised by the driver
            self.error = str(exc)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from lmforge.data.encode import encode_unit

        if self.error is not None:
            return {"record": json.dumps({"error": self.error})}
        try:
            record = encode_unit(json.loads(row["unit"]), self.job, self.tok)
        except DataError as exc:  # a user-side problem: one line on the driver, not a task traceback
            return {"record": json.dumps({"error": str(exc)})}
        return {"record": json.dumps(record)}


def run_ray(todo: list[dict], job: dict[str, Any], workers: int, address: str | None, progress) -> list[dict]:
    """Encode `todo` units with Ray Data using `workers` concurrent tasks; returns their records."""
    try:
        import ray
    except ImportError:
        raise DataError("engine ray: Ray is not installed; pip install 'lmforge[ray]' (or use the local engine)") from None
    if not todo:
        return []
    import logging

    for name in ("ray", "ray.data"):  # lmforge prints its own progress; keep Ray's INFO lines out
        logging.getLogger(name).setLevel(logging.WARNING)
    started = not ray.is_initialized()
    if started:
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:  # a local Ray for this command only, with as many CPUs as workers
                ray.init(num_cpus=workers, **kwargs)
        except Exception as exc:  # noqa: BLE001 - unreachable cluster, bad address
            raise DataError(
                f"engine ray: cannot connect to Ray at {address or 'a new local instance'} ({exc}); "
                "start the cluster with `ray start --head` or drop --address"
            ) from None
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver prints lmforge's own progress
        ctx.execution_options.preserve_order = False
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in todo], override_num_blocks=len(todo))
        actors = max(1, min(workers, len(todo)))
        ds = ds.map(
            _EncodeUnits,
            fn_constructor_kwargs={"job": job},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
        )
        records = []
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            if "error" in record:
                raise DataError(record["error"])
            records.append(record)
            progress.update(record["unit"]["bytes"], record["tokens"])
            progress.unit_done(record)
        return records
    finally:
        if started:
            ray.shutdown()
