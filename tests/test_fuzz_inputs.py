"""Fuzzing the merge inputs (issue 17): random truncations, byte flips and header edits of sidecar, adapter and model
files. Every outcome must be a merge (finite output) or a clear :class:`SensPeftError`; never another exception from
deep inside torch or safetensors, never a partial output, never a modified input."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import hash_tree, make_full_expert, make_lora_adapter, save_model, tiny_llama, write_sidecars
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from sens_peft import merge_adapters, merge_models
from sens_peft.errors import SensPeftError

KW = dict(device="cpu", progress=False)
FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = tiny_llama(seed=0)
    w = {"base": save_model(base, root / "base"),
         "experts": [make_full_expert(base, root / f"e{k}", seed=60 + k) for k in range(2)],
         "loras": [make_lora_adapter(tiny_llama, root / f"lora{k}", seed=70 + k) for k in range(2)]}
    for k, folder in enumerate([*w["experts"], *w["loras"]]):
        write_sidecars(folder, [2.0 + k, 1.0], probe_seed=k)
    return w


# ---------------------------------------------------------------------------------------------- mutations

HEADER_EDITS = ("dtype", "shape", "offset", "rename", "drop", "length")
mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("flip"), st.floats(0.0, 0.999), st.integers(0, 7)),
    st.tuples(st.just("header"), st.sampled_from(HEADER_EDITS), st.integers(0, 10_000),
              st.sampled_from(["I32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX"])),
)


def mutate(file: Path, mutation: tuple) -> None:
    data = bytearray(file.read_bytes())
    kind = mutation[0]
    if kind == "truncate":
        file.write_bytes(bytes(data[: int(len(data) * mutation[1])]))
        return
    if kind == "flip":
        pos = int(len(data) * mutation[1])
        data[pos] ^= 1 << mutation[2]
        file.write_bytes(bytes(data))
        return
    _, edit, pick, dtype = mutation
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    names = sorted(k for k in header if k != "__metadata__")
    name = names[pick % len(names)]
    info = header[name]
    if edit == "dtype":
        info["dtype"] = dtype
    elif edit == "shape":
        info["shape"] = list(reversed(info["shape"])) if pick % 2 else [*info["shape"][:-1], info["shape"][-1] + 1]
    elif edit == "offset":
        info["data_offsets"] = [info["data_offsets"][0] + 4, info["data_offsets"][1] + 4 * (pick % 2)]
    elif edit == "rename":
        header[name.replace("layers.0", "layers.7") if "layers.0" in name else name + "x"] = header.pop(name)
    elif edit == "drop":
        header.pop(name)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    size = len(text) + (8 * (pick % 3 + 1) if edit == "length" else 0)
    file.write_bytes(struct.pack("<Q", size) + text + bytes(body))


def check_outcome(call, out: Path, inputs: list[Path]) -> str:
    """Run ``call``: a merge or a SensPeftError, nothing partial, inputs unchanged. Returns the outcome kind."""
    before = {str(p): hash_tree(p) for p in inputs}
    try:
        call()
        outcome = "merged"
    except SensPeftError as err:
        assert str(err).strip(), "empty error message"
        assert not out.exists(), f"partial output after: {err}"
        outcome = "refused"
    assert {str(p): hash_tree(p) for p in inputs} == before, "an input was modified"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == [], "leftovers"
    if outcome == "merged":
        files = sorted(out.glob("*.safetensors"))
        assert files, "a merge without weights"
        for f in files:
            assert all(torch.isfinite(t).all() for t in load_file(str(f)).values() if t.is_floating_point())
    return outcome


@FUZZ
@given(mutation=mutations)
def test_fuzz_sidecar(world, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        expert = Path(shutil.copytree(world["experts"][0], tmp / "e0"))
        mutate(expert / "sensitivity.safetensors", mutation)
        out = tmp / "out"
        check_outcome(lambda: merge_models(world["base"], [expert, world["experts"][1]], out, sens="task",
                                           method="task_arithmetic", **KW), out, [expert, *world["experts"][1:]])


@FUZZ
@given(mutation=mutations)
def test_fuzz_adapter(world, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter = Path(shutil.copytree(world["loras"][0], tmp / "lora0"))
        mutate(adapter / "adapter_model.safetensors", mutation)
        out = tmp / "out"
        check_outcome(lambda: merge_adapters(tiny_llama(), [adapter, world["loras"][1]], save_to=out, sens=None,
                                             method="task_arithmetic", **KW), out, [adapter, world["loras"][1]])


@FUZZ
@given(mutation=mutations)
def test_fuzz_model_shard(world, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        expert = Path(shutil.copytree(world["experts"][0], tmp / "e0"))
        mutate(expert / "model.safetensors", mutation)
        out = tmp / "out"
        check_outcome(lambda: merge_models(world["base"], [expert, world["experts"][1]], out, sens=None,
                                           method="ties", density=0.5, **KW), out, [expert, world["experts"][1]])


@FUZZ
@given(mutation=mutations)
def test_fuzz_probe(world, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter = Path(shutil.copytree(world["loras"][0], tmp / "lora0"))
        mutate(adapter / "probe.safetensors", mutation)
        out = tmp / "out"
        check_outcome(lambda: merge_adapters(tiny_llama(), [adapter, world["loras"][1]], save_to=out, sens="cross",
                                             method="task_arithmetic", **KW), out, [adapter, world["loras"][1]])
