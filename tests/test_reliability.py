"""Issue 17, reliability and security round two: each family of wrong answers, through the public entry points.

Every refusal must be a :class:`SensPeftError` naming the file/tensor/expert, leave no output (nor a temporary
sibling) and leave every input byte-identical.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    VOCAB,
    hash_tree,
    make_full_expert,
    make_lora_adapter,
    save_model,
    tiny_llama,
    write_sidecars,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sens_peft import merge_adapters, merge_models
from sens_peft.errors import SensPeftError
from sens_peft.store import ProbeSet, SensitivityRecord, save_sensitivity

ROOT = Path(__file__).resolve().parents[1]
KW = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliab")
    base = tiny_llama(seed=0)
    w = {"root": root, "base": save_model(base, root / "base")}
    w["experts"] = [make_full_expert(base, root / f"e{k}", seed=40 + k) for k in range(2)]
    w["loras"] = [make_lora_adapter(tiny_llama, root / f"lora{k}", seed=50 + k) for k in range(2)]
    for k, folder in enumerate([*w["experts"], *w["loras"]]):
        write_sidecars(folder, [2.0 + k, 1.0], probe_seed=k)
    return w


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _refused(call, match: str, out: Path, inputs: list[Path]):
    before = {str(p): hash_tree(p) for p in inputs}
    with pytest.raises(SensPeftError, match="(?s)" + match) as info:
        call()
    assert not out.exists(), "a refused merge left an output folder"
    assert _leftovers(out.parent, out.name) == [] if out.parent.exists() else True
    assert {str(p): hash_tree(p) for p in inputs} == before, "an input was modified"
    assert "\n" not in str(info.value).strip(), "the error is not one line"
    return info.value


# ---------------------------------------------------------------------------------------------- 1. lost output

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import sens_peft.card as card
    from sens_peft import merge_models
    base, out, go, *experts = sys.argv[1:]
    slow = card.write_card
    def write_card(*a, **k):  # a slow merge: both processes are inside the merge at the same time
        time.sleep(2.0)
        return slow(*a, **k)
    card.write_card = write_card
    while not Path(go).exists():
        time.sleep(0.005)
    try:
        merge_models(base, experts, out, sens=None, device="cpu", progress=False)
    except Exception as err:
        print("FAILED", type(err).__name__, err)
        sys.exit(3)
    print("OK")
    """
)


def test_two_processes_one_output_exactly_one_wins(world, tmp_path):
    out = tmp_path / "out"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    experts = [str(e) for e in world["experts"]]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(world["base"]), str(out), str(go), *order],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for order in (experts, experts[::-1])]
    time.sleep(8)  # both children import torch and wait at the barrier
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    text = "\n".join(o + e[-1500:] for o, e in results)
    assert codes == [0, 3], text
    assert "already exists" in text
    assert out.is_dir() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, "out") == []
    state = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_output_created_meanwhile_is_not_replaced(world, tmp_path, monkeypatch):
    """Something else creates the output folder while the merge runs: the merge fails, the folder stays."""
    import sens_peft.card as card

    out = tmp_path / "out"
    original = card.write_card

    def write_card(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("not yours")
        return original(*args, **kwargs)

    monkeypatch.setattr(card, "write_card", write_card)
    with pytest.raises(SensPeftError, match="already exists"):
        merge_models(world["base"], world["experts"], out, sens=None, **KW)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------------------------------------- 2. pickles


def _pickle_adapter(src: Path, dst: Path) -> Path:
    _copy(src, dst)
    torch.save(load_file(str(dst / "adapter_model.safetensors")), dst / "adapter_model.bin")
    (dst / "adapter_model.safetensors").unlink()
    return dst


def _pickle_model(src: Path, dst: Path) -> Path:
    _copy(src, dst)
    torch.save(load_file(str(dst / "model.safetensors")), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def test_pickle_merge_adapters(world, tmp_path):
    bad = _pickle_adapter(world["loras"][0], tmp_path / "pk")
    out = tmp_path / "out"
    _refused(lambda: merge_adapters(tiny_llama(), [bad, world["loras"][1]], save_to=out, sens=None, **KW),
             "pickle.*allow_pickle=True", out, [bad])
    report = merge_adapters(tiny_llama(), [bad, world["loras"][1]], save_to=out, sens=None, allow_pickle=True, **KW)
    assert report.output_dir == out.resolve()


def test_pickle_merge_models(world, tmp_path):
    bad = _pickle_model(world["experts"][0], tmp_path / "pk")
    out = tmp_path / "out"
    _refused(lambda: merge_models(world["base"], [bad, world["experts"][1]], out, sens=None, **KW),
             "pickle.*allow_pickle=True", out, [bad])


def test_pickle_compute_sensitivity(world, tmp_path):
    from sens_peft import compute_sensitivity

    bad = _pickle_adapter(world["loras"][0], tmp_path / "pk")
    data = [{"input_ids": torch.arange(1, 9)} for _ in range(4)]
    before = hash_tree(bad)
    with pytest.raises(SensPeftError, match="(?s)adapter_model.bin.*allow_pickle=True"):
        compute_sensitivity(bad, data, base_model=tiny_llama(), calibration_samples=2, save_to=tmp_path / "s")
    assert hash_tree(bad) == before and not (tmp_path / "s").exists()
    # a full model folder with only pytorch_model.bin, and a pickle-only base_model folder, likewise
    with pytest.raises(SensPeftError, match="pytorch_model.bin"):
        compute_sensitivity(_pickle_model(world["base"], tmp_path / "pkm"), data, calibration_samples=2)
    with pytest.raises(SensPeftError, match="base_model.*pytorch_model.bin"):
        compute_sensitivity(world["loras"][0], data, base_model=tmp_path / "pkm", calibration_samples=2)
    record = compute_sensitivity(bad, data, base_model=tiny_llama(), calibration_samples=2, allow_pickle=True)
    assert len(record.tensor_names) > 0


def test_pickle_merge_on_train_end(world, tmp_path):
    from sens_peft import MergeOnTrainEnd

    bad = _pickle_adapter(world["loras"][0], tmp_path / "pk")
    with pytest.raises(SensPeftError, match="(?s)adapter_model.bin.*allow_pickle=True"):
        MergeOnTrainEnd([bad], tmp_path / "out", sens=None)
    with pytest.raises(SensPeftError, match="pytorch_model.bin"):
        MergeOnTrainEnd([world["experts"][0]], tmp_path / "out", base_model=_pickle_model(world["base"], tmp_path / "b"),
                        sens=None)
    callback = MergeOnTrainEnd([bad], tmp_path / "out", sens=None, allow_pickle=True)
    assert callback.allow_pickle is True


def _recipe(tmp_path: Path, base: Path, experts: list[Path], out: Path, method: str = "task_arithmetic") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"base_model": str(base), "experts": [{"path": str(e)} for e in experts],
                                "method": method, "sens": None, "output": {"path": str(out)}}))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sens_peft.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_pickle_cli_base_model(world, tmp_path):
    """The CLI loads a LoRA recipe's base with from_pretrained, which would unpickle pytorch_model.bin."""
    base = _pickle_model(world["base"], tmp_path / "pkbase")
    out = tmp_path / "out"
    before = hash_tree(base)
    done = _cli("merge", str(_recipe(tmp_path, base, world["loras"], out)), "--device", "cpu")
    assert done.returncode != 0, done.stdout
    assert "pytorch_model.bin" in done.stderr and "allow_pickle" in done.stderr
    assert not out.exists() and hash_tree(base) == before
    assert "Traceback" not in done.stderr  # one line, exit code 2
    assert done.returncode == 2
    # with consent, the same recipe merges
    allowed = _cli("merge", str(_recipe(tmp_path, base, world["loras"], out)), "--device", "cpu", "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file() and hash_tree(base) == before


def test_pickle_callback_resume_state(tmp_path):
    """Resuming from a checkpoint whose state file is a pickle: a clear error, nothing unpickled."""
    from sens_peft import SensitivityCallback

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    torch.save({"abs_sum": torch.ones(3)}, ckpt / "sensitivity_state.safetensors")
    callback = SensitivityCallback(mode="during")
    model = tiny_llama()
    args = SimpleNamespace(resume_from_checkpoint=str(ckpt), output_dir=str(tmp_path), deepspeed=None, fsdp=None)
    state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    loaded = []
    original = torch.load
    torch.load = lambda *a, **k: loaded.append(a) or original(*a, **k)
    try:
        with pytest.raises(SensPeftError, match="sensitivity_state.safetensors.*never unpickled"):
            callback.on_train_begin(args, state, SimpleNamespace(), model=model)
    finally:
        torch.load = original
        callback.detach()
    assert loaded == []


# ---------------------------------------------------------------------------------------------- 3. output in input


def test_merge_adapters_output_inside_base_folder(world, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = _copy(world["base"], tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    out = base_dir / "merged"
    _refused(lambda: merge_adapters(base, world["loras"], save_to=out, sens=None, **KW), "overlaps the input folder",
             out, [base_dir, *world["loras"]])


def test_recipe_output_inside_base_folder(world, tmp_path):
    from sens_peft.recipe import load_recipe, run_recipe

    base_dir = _copy(world["base"], tmp_path / "base")
    for experts in (world["loras"], world["experts"]):
        out = base_dir / "merged"
        recipe = load_recipe(_recipe(tmp_path, base_dir, experts, out))
        _refused(lambda recipe=recipe: run_recipe(recipe, device="cpu"), "overlaps the input folder", out, [base_dir, *experts])


def test_merge_on_train_end_output_inside_expert(world, tmp_path):
    from sens_peft import MergeOnTrainEnd

    expert = _copy(world["loras"][0], tmp_path / "lora")
    with pytest.raises(SensPeftError, match="overlaps the input folder"):
        MergeOnTrainEnd([expert], expert / "merged", sens=None)


# ---------------------------------------------------------------------------------------------- 4. dtypes


def test_int32_element_maps_refused(world, tmp_path):
    experts = [_copy(e, tmp_path / e.name) for e in world["experts"]]
    names = ["model.layers.0.self_attn.q_proj.weight"]
    shape = tuple(load_file(str(world["base"] / "model.safetensors"))[names[0]].shape)
    for k, folder in enumerate(experts):
        record = SensitivityRecord(["layers.0"], torch.tensor([1.0 + k]), names, torch.tensor([1.0 + k]),
                                   element_maps={names[0]: torch.rand(shape)})
        file = save_sensitivity(record, folder)
        tensors = load_file(str(file))
        if k == 1:
            tensors[f"element.{names[0]}"] = (tensors[f"element.{names[0]}"] * 100).to(torch.int32)
        with safe_open(str(file), "pt") as fh:
            meta = fh.metadata()
        save_file(tensors, str(file), metadata=meta)
    out = tmp_path / "out"
    err = _refused(lambda: merge_models(world["base"], experts, out, method="ties", sens="task",
                                        trim_by="sensitivity", **KW),
                   "element.model.layers.0.self_attn.q_proj.weight.*int32", out, experts)
    assert "e1" in str(err) and "sensitivity.safetensors" in str(err)


def test_int32_expert_tensor_refused(world, tmp_path):
    expert = _copy(world["experts"][1], tmp_path / "e1")
    tensors = load_file(str(expert / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = (tensors[name] * 1e9).to(torch.int32)
    save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    err = _refused(lambda: merge_models(world["base"], [world["experts"][0], expert], out, sens=None, **KW),
                   f"{name}.*int32.*float32", out, [expert])
    assert "model.safetensors" in str(err)


@pytest.mark.parametrize("dtype", ["int8", "int32", "bool"])
def test_integer_output_dtype_refused(world, tmp_path, dtype):
    out = tmp_path / "out"
    _refused(lambda: merge_models(world["base"], world["experts"], out, sens=None, dtype=dtype, **KW),
             f"dtype='{dtype}' is not a floating-point dtype", out, world["experts"])


# ---------------------------------------------------------------------------------------------- 5. incomplete/repeated


def test_adapter_missing_lora_b_refused(world, tmp_path):
    bad = _copy(world["loras"][0], tmp_path / "lora0")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    _refused(lambda: merge_adapters(tiny_llama(), [bad, world["loras"][1]], save_to=out, sens=None, **KW),
             "adapter_model.safetensors has no lora_B for module 'model.layers.1.self_attn.v_proj'", out, [bad])


def test_same_adapter_twice_through_symlink_or_spelling(world, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(world["loras"][0], target_is_directory=True)
    spelled = world["loras"][0].parent / "." / world["loras"][0].name
    out = tmp_path / "out"
    for second in (link, spelled, str(world["loras"][0]) + "/"):
        _refused(lambda second=second: merge_adapters(tiny_llama(), [world["loras"][0], second], save_to=out, sens=None, **KW),
                 "more than once", out, [world["loras"][0]])
    (tmp_path / "e0link").symlink_to(world["experts"][0], target_is_directory=True)
    _refused(lambda: merge_models(world["base"], [world["experts"][0], tmp_path / "e0link"], out, sens=None, **KW),
             "more than once", out, [world["experts"][0]])


def test_record_object_gets_the_sidecar_checks(world, tmp_path):
    names = ["model.layers.0.self_attn.q_proj.weight"]
    shape = tuple(load_file(str(world["base"] / "model.safetensors"))[names[0]].shape)
    emap = torch.rand(shape)
    emap[0, 0] = float("nan")
    good = SensitivityRecord(["layers.0"], torch.tensor([1.0]), names, torch.tensor([1.0]),
                             element_maps={names[0]: torch.rand(shape)})
    bad = SensitivityRecord(["layers.0"], torch.tensor([1.0]), names, torch.tensor([1.0]),
                            element_maps={names[0]: emap})
    out = tmp_path / "out"
    err = _refused(lambda: merge_models(world["base"], world["experts"], out, method="ties", sens="task",
                                        trim_by="sensitivity", sensitivities=[good, bad], **KW),
                   "NaN", out, world["experts"])
    assert "e1" in str(err) and "sensitivities[1]" in str(err)
    wrong_shape = SensitivityRecord(["layers.0"], torch.tensor([1.0]), names, torch.tensor([1.0]),
                                    element_maps={names[0]: torch.rand(3, 3)})
    _refused(lambda: merge_models(world["base"], world["experts"], out, method="ties", sens="task",
                                  trim_by="sensitivity", sensitivities=[good, wrong_shape], **KW),
             r"expert 'e1'.*element.model.layers.0.self_attn.q_proj.weight.*shape \[3, 3\]", out, world["experts"])
    negative = SensitivityRecord(["layers.0"], torch.tensor([-1.0]), names, torch.tensor([1.0]))
    _refused(lambda: merge_models(world["base"], world["experts"], out, sens="task",
                                  sensitivities=[good, negative], **KW), "group_scores.*negative", out, world["experts"])


# ---------------------------------------------------------------------------------------------- unclear errors


def test_corrupt_adapter_file_names_the_file(world, tmp_path):
    bad = _copy(world["loras"][0], tmp_path / "lora0")
    file = bad / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    out = tmp_path / "out"
    err = _refused(lambda: merge_adapters(tiny_llama(), [bad, world["loras"][1]], save_to=out, sens=None, **KW),
                   "truncated or corrupt", out, [bad])
    assert str(file) in str(err)


def test_corrupt_model_shard_names_the_file(world, tmp_path):
    bad = _copy(world["experts"][0], tmp_path / "e0")
    file = bad / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[10:14] = b"\xff\xfe\x00\x01"  # inside the JSON header
    file.write_bytes(bytes(data))
    out = tmp_path / "out"
    err = _refused(lambda: merge_models(world["base"], [bad, world["experts"][1]], out, sens=None, **KW),
                   "model.safetensors", out, [bad])
    assert str(bad) in str(err)


def test_out_of_vocabulary_probe_object(world, tmp_path):
    ids = torch.full((2, 6), VOCAB + 5)
    probe = ProbeSet(ids, torch.ones_like(ids), ids.clone())
    good = ProbeSet(ids % VOCAB, torch.ones_like(ids), ids % VOCAB)
    out = tmp_path / "out"
    err = _refused(lambda: merge_adapters(tiny_llama(), world["loras"], save_to=out, sens="cross",
                                          probes=[good, probe], **KW),
                   f"token id {VOCAB + 5}.*vocabulary of {VOCAB}", out, world["loras"])
    assert "lora1" in str(err) and "probes[1]" in str(err)


def test_out_of_vocabulary_calibration_data(world):
    from sens_peft import compute_sensitivity

    data = [{"input_ids": torch.tensor([1, 2, VOCAB + 3, 4])} for _ in range(2)]
    with pytest.raises(SensPeftError, match=f"calibration data.*token id {VOCAB + 3}.*vocabulary of {VOCAB}"):
        compute_sensitivity(tiny_llama(), data, calibration_samples=2)


def test_experts_as_one_string_is_a_type_error(world, tmp_path):
    with pytest.raises(TypeError, match=r"must be a list.*pass \["):
        merge_models(world["base"], str(world["experts"][0]), tmp_path / "out", sens=None, **KW)
    with pytest.raises(TypeError, match="must be a list"):
        merge_adapters(tiny_llama(), str(world["loras"][0]), save_to=tmp_path / "out", sens=None, **KW)
    from sens_peft import MergeOnTrainEnd

    with pytest.raises(TypeError, match="must be a list"):
        MergeOnTrainEnd(world["loras"][0], tmp_path / "out", sens=None)
    with pytest.raises(TypeError, match="sensitivities must be a list"):
        merge_models(world["base"], world["experts"], tmp_path / "out", sens="task",
                     sensitivities=str(world["experts"][0] / "sensitivity.safetensors"), **KW)
    assert not (tmp_path / "out").exists()


def test_factors_outside_target_modules_refused(world, tmp_path):
    bad = _copy(world["loras"][0], tmp_path / "lora0")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # the file also holds v_proj factors, which PEFT would drop
    (bad / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _refused(lambda: merge_adapters(tiny_llama(), [bad, world["loras"][1]], save_to=out, sens=None, **KW),
             "v_proj.*outside the config's target_modules", out, [bad])


def test_rank_larger_than_module_warns(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        merge_adapters(tiny_llama(), world["loras"], method="ties", density=0.5, rank=64, sens=None, **KW)
    assert any("rank=64 exceeds min(out, in)" in r.getMessage() for r in caplog.records)


def test_all_zero_sidecar_of_a_diverged_run_refused(world, tmp_path):
    experts = [_copy(e, tmp_path / e.name) for e in world["experts"]]
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    save_sensitivity(SensitivityRecord(["layers.0", "layers.1"], torch.zeros(2), names, torch.zeros(2),
                                       metadata={"num_steps": "0", "num_skipped": "12"}), experts[1])
    out = tmp_path / "out"
    _refused(lambda: merge_models(world["base"], experts, out, sens="task", **KW),
             "expert 'e1'.*every sensitivity score is 0.*num_skipped=12.*diverged", out, experts)


# ---------------------------------------------------------------------------------------------- unused options


@pytest.mark.parametrize("kwargs, message", [
    (dict(sens="task", method="task_arithmetic", probes="PROBES"), "probes= is ignored"),
    (dict(sens=None, method="task_arithmetic", sensitivities="SENS"), "sensitivities= is ignored"),
    (dict(sens="task", transferability=torch.eye(2)), "transferability= is ignored"),
    (dict(sens=None, dtype="bfloat16"), "dtype='bfloat16' is ignored for output='lora'"),
])
def test_options_that_cannot_apply_warn_merge_adapters(world, caplog, kwargs, message):
    folders = world["loras"]
    kwargs = {k: ([f / "probe.safetensors" for f in folders] if v == "PROBES" else
                  [f / "sensitivity.safetensors" for f in folders] if v == "SENS" else v) for k, v in kwargs.items()}
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        merge_adapters(tiny_llama(), folders, **kwargs, **KW)
    assert any(message in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_rank_for_full_models_warns(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        merge_models(world["base"], world["experts"], tmp_path / "out", sens=None, rank=4, **KW)
    assert any("rank=4 is ignored" in r.getMessage() for r in caplog.records)


def test_push_to_hub_leaves_pickles_out(world, tmp_path):
    """plan_upload's docstring promised that pickles stay home; adapter_model.bin was uploaded."""
    from sens_peft.hub import plan_upload

    folder = _pickle_adapter(world["loras"][0], tmp_path / "pk")
    plan = plan_upload(folder)
    assert "adapter_model.bin" not in plan.files and "adapter_config.json" in plan.files
    assert any("adapter_model.bin" in note and "not uploaded" in note for note in plan.warnings)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="task_arithmetic", density=0.7), "density=0.7 is ignored with method='task_arithmetic'"),
    (dict(method="task_arithmetic", majority_sign_method="frequency"), "majority_sign_method='frequency' is ignored"),
    (dict(method="ties", seed=3), "seed=3 is ignored with method='ties'"),
    (dict(method="ties", sens=None, temperature=2.0), "temperature=2.0 is ignored"),
    (dict(method="ties", sens="task", alignment="neg_kl"), "alignment='neg_kl' is ignored"),
    (dict(method="dare_linear", trim_by="sensitivity"), "trim_by='sensitivity' is ignored with method='dare_linear'"),
    (dict(method="task_arithmetic", factorization="exact"), "factorization='exact' is ignored"),
])
def test_options_that_cannot_apply_warn_merge_models(world, tmp_path, caplog, kwargs, message):
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        merge_models(world["base"], world["experts"], tmp_path / "out", **kwargs, **KW)
    assert any(message in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_compute_sensitivity_warns_about_during_only_options(caplog):
    from sens_peft import compute_sensitivity

    data = [{"input_ids": torch.arange(1, 9)} for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        compute_sensitivity(tiny_llama(), data, calibration_samples=2, ema=0.9)
    assert any("ema=0.9 is ignored" in r.getMessage() for r in caplog.records)


def test_float16_overflow_is_refused_not_written(world, tmp_path):
    """Inputs are finite and the math is float32; the cast to float16 (max 65504) can still make Inf."""
    out = tmp_path / "out"
    _refused(lambda: merge_models(world["base"], world["experts"], out, sens=None, method="task_arithmetic",
                                  weights=[1e7, 1e7], dtype="float16", **KW), "overflows float16", out, world["experts"])
    _refused(lambda: merge_adapters(tiny_llama(), world["loras"], save_to=out, sens=None, method="task_arithmetic",
                                    output="full", weights=[1e9, 1e9], dtype="float16", **KW),
             "overflows float16", out, world["loras"])
    report = merge_models(world["base"], world["experts"], out, sens=None, method="task_arithmetic",
                          weights=[1e7, 1e7], dtype="bfloat16", **KW)  # bfloat16 has float32's range
    assert report.output_dir == out.resolve()


@pytest.mark.parametrize("fields, warns", [
    (dict(method="regmean"), False),  # reads the Grams in those sidecars
    (dict(method="fisher"), False),
    (dict(), False),  # the default reads them to choose RegMean or TA
    (dict(method="ties", trim_by="sensitivity"), False),
    (dict(method="task_arithmetic"), True),
    (dict(method="ties", trim_by="magnitude"), True),
])
def test_sensitivities_of_a_method_that_reads_statistics_are_not_called_ignored(caplog, fields, warns):
    """RegMean / Fisher read their statistics from the files given as ``sensitivities=``: warning that those are
    ignored (as the quick start's log did for every RegMean row) told the user the opposite of what happens."""
    from sens_peft.config import MergeConfig
    from sens_peft.validation.options import warn_unused_options

    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        warn_unused_options(MergeConfig(sens=None, **fields), sensitivities=["a", "b"])
    assert any("sensitivities= is ignored" in r.getMessage() for r in caplog.records) == warns


def test_default_without_grams_warns_that_it_falls_back(world, caplog):
    """``MergeConfig()`` asks for the default (probe-fitted RegMean); sidecars without Grams get task arithmetic, which
    is said as a warning naming the missing statistic, not only at INFO level."""
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        report = merge_adapters(tiny_llama(), world["loras"], **KW)
    assert report.config.method == "task_arithmetic"
    messages = [r.getMessage() for r in caplog.records]
    assert any("merging with task_arithmetic, not the default probe_fit (base_method='regmean')" in m
               and "'gram' statistics" in m and "sum of the task vectors" in m for m in messages), messages
