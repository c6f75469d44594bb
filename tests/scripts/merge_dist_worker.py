"""Run merge_models(distributed=True) cases under torchrun; every rank records what happened.

Usage: merge_dist_worker.py SPEC_JSON. SPEC_JSON holds {"results": folder, "cases": [{"tag", "base", "experts",
"out", "kwargs", "fail", "init_group"}]}; ``init_group`` initialises the default process group (gloo) before the
case, as a training script would have, and destroys it after all cases; ``fail`` injects an error on rank 1 only: "write" (its second shard write raises) or
"validate" (reading an expert's config.json raises a MergeError). Each rank writes <results>/rank<r>.json with,
per case, "ok" (and the report's details) or the error type and message, and the seconds the call took.
Exceptions are caught so that one launch runs every case.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

import sens_peft.merging.models as merge_mod
from sens_peft.io import MergeError, ShardWriter, read_model_config
from sens_peft.merge import merge_models


def _inject(fail: str | None, rank: int):
    """Install the failure of a case on rank 1; returns an undo function."""
    if fail is None or rank != 1:
        return lambda: None
    if fail == "write":
        original = ShardWriter.write_shard
        calls = []

        def failing(self, tensors, path):
            calls.append(path)
            if len(calls) == 2:
                raise RuntimeError("disk full on rank 1 (simulated)")
            original(self, tensors, path)

        ShardWriter.write_shard = failing
        return lambda: setattr(ShardWriter, "write_shard", original)
    if fail == "validate":
        def broken(folder, label="model"):
            if label.startswith("expert"):
                raise MergeError(f"{label}: config.json unreadable on rank 1 (simulated)")
            return read_model_config(folder, label)

        merge_mod.read_model_config = broken
        return lambda: setattr(merge_mod, "read_model_config", read_model_config)
    raise ValueError(fail)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    results = {}
    for case in spec["cases"]:
        if case.get("init_group") and not dist.is_initialized():
            dist.init_process_group("gloo")
        undo = _inject(case.get("fail"), rank)
        start = time.monotonic()
        try:
            kwargs = {"distributed": True, **case["kwargs"]}
            report = merge_models(case["base"], case["experts"], case["out"], distributed_timeout=40,
                                  device="cpu", progress=False, **kwargs)
            results[case["tag"]] = {"ok": True, "details": {k: v for k, v in report.details.items()
                                                            if k != "device"}}
        except Exception as err:
            results[case["tag"]] = {"ok": False, "type": type(err).__name__, "message": str(err)}
        finally:
            undo()
        results[case["tag"]]["seconds"] = time.monotonic() - start
    if dist.is_initialized():
        results["default_group_world_size"] = dist.get_world_size()
        dist.destroy_process_group()
    out = Path(spec["results"]) / f"rank{rank}.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
