"""Atomic outputs: a merge killed with SIGKILL leaves no output folder and a rerun succeeds; failed writes of
merge_adapters(save_to=) and of sidecars leave nothing half-written (the old sidecar stays intact)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import hash_tree, make_full_expert, make_lora_adapter, read_state, save_model, tiny_llama

from sens_peft.merge import merge_adapters, merge_models

ROOT = Path(__file__).resolve().parents[1]

# Child process: merge tiny full experts into many tiny shards, each write slowed down a little so that the
# parent reliably kills it mid-way (after the temporary folder holds at least one shard, before the rename).
CHILD = textwrap.dedent(
    """
    import sys, time
    from sens_peft.io import ShardWriter
    from sens_peft.merge import merge_models

    original = ShardWriter.write_shard

    def slow(self, tensors, path):
        original(self, tensors, path)
        time.sleep(0.05)

    ShardWriter.write_shard = slow
    base, out, *experts = sys.argv[1:]
    merge_models(base, experts, out, method="dare_ties", density=0.5, sens=None, device="cpu", progress=False,
                 max_shard_size="2KB")
    print("finished")
    """
)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    base = tiny_llama(seed=0)
    return {"base": save_model(base, root / "base"),
            "experts": [make_full_expert(base, root / f"e{k}", seed=30 + k) for k in range(2)]}


def _temps(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


def test_sigkill_mid_merge_leaves_no_output_and_rerun_succeeds(full, tmp_path):
    inputs = [full["base"], *full["experts"]]
    before = {str(p): hash_tree(p) for p in inputs}
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(full["base"]), str(out), *map(str, full["experts"])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        killed_mid_way = False
        while time.monotonic() < deadline and proc.poll() is None:
            temps = _temps(tmp_path, "merged")
            if temps and any(p.name.startswith(".shard-") for p in temps[0].iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_way = True
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert killed_mid_way, f"the merge was not caught mid-way (rc={proc.returncode}): {stderr[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # never a partial output under the final name
    assert len(_temps(tmp_path, "merged")) == 1  # the killed process's temporary folder is all that remains
    # rerun: succeeds, cleans (or at least ignores) the stale temporary folder of the dead process
    report = merge_models(full["base"], full["experts"], out, method="dare_ties", density=0.5, sens=None,
                          device="cpu", progress=False, max_shard_size="2KB")
    assert report.output_dir == out.resolve()
    assert _temps(tmp_path, "merged") == []
    state = read_state(out)
    assert set(state) == set(read_state(full["base"])) and all(torch.isfinite(t).all() for t in state.values())
    assert {str(p): hash_tree(p) for p in inputs} == before


def test_live_temp_folder_of_another_merge_is_kept(full, tmp_path):
    """Only temporary folders of dead processes are cleaned: a concurrent merge's folder is left alone."""
    out = tmp_path / "merged"
    live = tmp_path / f".merged.tmp-{os.getpid()}-abcd"
    live.mkdir()
    merge_models(full["base"], full["experts"][:1], out, sens=None, device="cpu", progress=False)
    assert live.is_dir() and out.is_dir()


def test_merge_adapters_save_to_failure_leaves_nothing(tmp_path, monkeypatch):
    import sens_peft.card as card

    folders = [make_lora_adapter(tiny_llama, tmp_path / "in" / f"a{k}", seed=k + 1) for k in range(2)]
    before = {str(f): hash_tree(f) for f in folders}
    out = tmp_path / "out" / "merged"

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(card, "write_card", boom)
    with pytest.raises(OSError, match="simulated"):
        merge_adapters(tiny_llama(seed=0), folders, save_to=out, sens=None, device="cpu", progress=False)
    assert list(out.parent.iterdir()) == []
    monkeypatch.undo()
    merge_adapters(tiny_llama(seed=0), folders, save_to=out, sens=None, device="cpu", progress=False)
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["merged"]
    assert {str(f): hash_tree(f) for f in folders} == before


def test_failing_sidecar_save_keeps_old_file(tmp_path, monkeypatch):
    import sens_peft.store as store
    from sens_peft.store import SensitivityRecord, load_sensitivity, save_sensitivity

    def record(value):
        t = torch.tensor([value, 2 * value])
        return SensitivityRecord(groups=["layers.0", "layers.1"], group_scores=t,
                                 tensor_names=["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"],
                                 tensor_scores=t)

    path = save_sensitivity(record(1.0), tmp_path)
    old_bytes = path.read_bytes()

    def half_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)  # a partial write, then the crash
        raise OSError("no space left on device (simulated)")

    monkeypatch.setattr(store, "save_file", half_then_crash)
    with pytest.raises(OSError, match="simulated"):
        save_sensitivity(record(5.0), tmp_path)
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left either
    monkeypatch.undo()
    assert load_sensitivity(tmp_path).group_scores.tolist() == [1.0, 2.0]
