"""merge_models under torchrun (2 CPU processes, gloo): byte-identical to a single-process merge; an error on one
rank leaves no output (nor temporary) folder on any rank and hangs nobody. Also the shard plan and its rank
assignment, and the single-process guards of the ``distributed`` argument."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hash_tree, make_full_expert, save_model, tiny_llama, write_sidecars

from sens_peft.io import MergeError, plan_shards
from sens_peft.merge import merge_models

WORKER = Path(__file__).parent / "scripts" / "merge_dist_worker.py"
ROOT = Path(__file__).resolve().parents[1]

# (tag, kwargs, failure injected on rank 1); "existing_group" runs in a default group the worker initialised
# itself (the merge then works in a gloo subgroup it creates and destroys)
CASES = [
    ("dare_task", dict(method="dare_ties", density=0.6, seed=5, sens="task", max_shard_size="16KB"), None),
    ("ta_bf16", dict(method="task_arithmetic", sens=None, weights=[0.5, 0.3, 0.2], dtype="bfloat16",
                     max_shard_size="9KB"), None),
    ("ta_cross", dict(method="task_arithmetic", sens="task+cross", temperature=0.5, max_shard_size="30KB"),
     None),
    ("one_shard", dict(method="ties", density=0.5, sens=None), None),  # rank 1 has nothing to write
    ("fail_write", dict(method="dare_ties", density=0.5, sens=None, max_shard_size="8KB"), "write"),
    ("fail_validate", dict(method="dare_ties", density=0.5, sens="task", max_shard_size="8KB"), "validate"),
    ("existing_group", dict(method="dare_ties", density=0.5, seed=9, sens=None, max_shard_size="12KB",
                            distributed="auto"), None),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = tiny_llama(seed=0)
    experts = []
    for k, scores in enumerate([[3.0, 1.0], [1.0, 2.0], [0.5, 4.0]]):
        folder = make_full_expert(base, root / f"e{k}", seed=40 + k, skip=("norm",))
        write_sidecars(folder, scores, probe_seed=k)
        experts.append(folder)
    save_model(base, root / "base")
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return {"root": root, "base": root / "base", "experts": experts}


@pytest.fixture(scope="module")
def launched(inputs):
    """One torchrun launch runs every case (process start-up dominates); returns the per-rank results."""
    root = inputs["root"]
    spec = {"results": str(root), "cases": [
        {"tag": tag, "base": str(inputs["base"]), "experts": [str(e) for e in inputs["experts"]],
         "out": str(root / "dist" / tag / "merged"), "kwargs": kwargs, "fail": fail,
         "init_group": tag == "existing_group"}
        for tag, kwargs, fail in CASES]}
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(root / "spec.json")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("tag", [tag for tag, _, fail in CASES if fail is None])
def test_two_ranks_byte_identical_to_one_process(inputs, launched, tag):
    kwargs = dict(next(kw for t, kw, _ in CASES if t == tag))
    for rank in range(2):
        assert launched[rank][tag]["ok"], launched[rank][tag]
    single = inputs["root"] / "single" / tag / "merged"
    report = merge_models(inputs["base"], inputs["experts"], single, device="cpu", progress=False, **kwargs)
    dist_out = inputs["root"] / "dist" / tag / "merged"
    a, b = hash_tree(single), hash_tree(dist_out)
    assert sorted(a) == sorted(b)
    assert a == b, [name for name in a if a[name] != b[name]]
    shards = report.details["shards"]
    d0, d1 = launched[0][tag]["details"], launched[1][tag]["details"]
    # both ranks report the whole merge; each wrote its own shards, together all of them, none twice
    for d in (d0, d1):
        assert d["shards"] == shards and d["world_size"] == 2
        assert (d["merged_tensors"], d["copied_tensors"]) == (report.details["merged_tensors"],
                                                              report.details["copied_tensors"])
    assert sorted(d0["rank_shards"] + d1["rank_shards"]) == sorted(shards)
    assert not set(d0["rank_shards"]) & set(d1["rank_shards"])
    if len(shards) > 1:
        assert d0["rank_shards"] and d1["rank_shards"]
    else:
        assert d1["rank_shards"] == []
    # nothing else next to the output (no temporary folders left)
    assert [p.name for p in dist_out.parent.iterdir()] == ["merged"]


@pytest.mark.distributed
def test_several_shards_really_were_split(launched):
    # the worker's own default group survived the merge's subgroup
    assert launched[0]["default_group_world_size"] == launched[1]["default_group_world_size"] == 2
    assert len(launched[0]["dare_task"]["details"]["shards"]) >= 4
    assert len(launched[0]["ta_bf16"]["details"]["shards"]) >= 4


@pytest.mark.distributed
@pytest.mark.parametrize("tag", ["fail_write", "fail_validate"])
def test_error_on_one_rank_leaves_nothing_and_does_not_hang(inputs, launched, tag):
    r0, r1 = launched[0][tag], launched[1][tag]
    assert not r0["ok"] and not r1["ok"]
    if tag == "fail_write":
        assert r1["type"] == "RuntimeError" and "disk full on rank 1" in r1["message"]
        assert r0["type"] == "RuntimeError" and "rank 1" in r0["message"] and "disk full" in r0["message"]
    else:
        assert r1["type"] == "MergeError" and "unreadable on rank 1" in r1["message"]
        assert r0["type"] == "MergeError" and "reported by rank 1" in r0["message"]
    # returned promptly, long before the 40 s collective timeout
    assert r0["seconds"] < 20 and r1["seconds"] < 20
    parent = inputs["root"] / "dist" / tag
    assert not parent.exists() or list(parent.iterdir()) == []


def test_plan_matches_greedy_writer_and_assignment_is_balanced():
    entries = [("a", 10), ("b", 10), ("c", 25), ("d", 5), ("e", 5), ("f", 40)]
    plan = plan_shards(entries, 20)
    assert plan.shards == (("a", "b"), ("c",), ("d", "e"), ("f",))
    assert plan.sizes == (20, 25, 10, 40) and plan.total_bytes == 95
    assert plan.files[0] == "model-00001-of-00004.safetensors"
    # in order, to the least-loaded rank: 0←20, 1←25, 0←10 (30), 1←40
    assert plan.assign(2) == [[0, 2], [1, 3]]
    assert plan.assign(1) == [[0, 1, 2, 3]]
    assert plan.assign(8)[5:] == [[], [], []]
    single = plan_shards([("x", 100)], 20)
    assert single.files == ["model.safetensors"] and single.write_index("/nonexistent") is None
    with pytest.raises(MergeError, match="more than once"):
        plan_shards([("x", 1), ("x", 1)], 20)


def test_distributed_argument_in_a_single_process(inputs, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    kw = dict(method="ties", density=0.5, sens=None, device="cpu", progress=False, max_shard_size="16KB")
    with pytest.raises(MergeError, match="distributed=True.*torchrun"):
        merge_models(inputs["base"], inputs["experts"], tmp_path / "t", distributed=True, **kw)
    with pytest.raises(MergeError, match="distributed must be"):
        merge_models(inputs["base"], inputs["experts"], tmp_path / "t", distributed="yes", **kw)
    assert not (tmp_path / "t").exists()
    merge_models(inputs["base"], inputs["experts"], tmp_path / "auto", distributed="auto", **kw)
    merge_models(inputs["base"], inputs["experts"], tmp_path / "plain", **kw)
    assert hash_tree(tmp_path / "auto") == hash_tree(tmp_path / "plain")
    shutil.rmtree(tmp_path / "auto")
