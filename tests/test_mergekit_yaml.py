"""mergekit YAML recipes through `sens-peft merge`: mergekit's documented examples (written out here) parsed and merged
on tiny models, checked against a float64 hand computation of mergekit's semantics (and, when mergekit is installed
in its own venv, against mergekit's own output); refusals before anything is written; per-expert density."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_full_expert, make_lora_adapter, save_model, tiny_llama
from safetensors.torch import load_file

from sens_peft.cli import main
from sens_peft.errors import RecipeError
from sens_peft.recipe import load_recipe, run_recipe

LAYERS = 3
MK_PYTHON = Path(os.environ.get("SENS_PEFT_MERGEKIT_PYTHON", "/work/mk-venv/bin/python"))


# -- mergekit's README examples, in the folders of this test (dtype float32: both sides then compute alike) ------

TIES_DOC = """
models:
  - model: e1
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: e2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: e3
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

DARE_TIES_DOC = """
models:
  - model: base
    # no parameters necessary for base model
  - model: e1
    parameters:
      density: 0.53
      weight: 0.4
  - model: e2
    parameters:
      density: 0.53
      weight: 0.3
  - model: e3
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: base
parameters:
  int8_mask: true
dtype: bfloat16
"""

LINEAR_DOC = """
models:
  - model: e1
    parameters:
      weight: 1.0
  - model: e2
    parameters:
      weight: 0.5
  - model: e3
    parameters:
      weight: 0.3
merge_method: linear
dtype: float32
"""

TASK_ARITHMETIC = """
models:
  - model: e1
    parameters:
      weight: 0.7
  - model: e2
    parameters:
      weight: [0.2, 1.0]
merge_method: task_arithmetic
base_model: base
parameters:
  lambda: 0.8
dtype: float32
"""


def _ties_doc_runnable(normalize: bool = True) -> dict:
    """The TIES example without the refused int8_mask, in float32."""
    data = yaml.safe_load(TIES_DOC)
    data["parameters"] = {"normalize": normalize}
    data["dtype"] = "float32"
    return data


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base = tiny_llama(seed=0, num_hidden_layers=LAYERS)
    save_model(base, root / "base")
    for k in (1, 2, 3):
        make_full_expert(base, root / f"e{k}", seed=k, sigma=0.05)
    return root


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}


# -- the hand computation: mergekit's semantics in float64, from its code's formulas ----------------------------


def _t(name: str) -> float:
    parts = name.split(".")
    if "layers" in parts:
        i = int(parts[parts.index("layers") + 1])
        return i / (LAYERS - 1) if LAYERS > 1 else 1.0
    return 0.0


def _value(setting, name: str):
    """mergekit's evaluate_setting for numbers, gradients and filters (written out again, simply)."""
    if setting is None or isinstance(setting, (int, float)):
        return setting
    if all(isinstance(v, (int, float)) for v in setting):
        x = _t(name) * (len(setting) - 1)
        lo = math.floor(x)
        hi = min(len(setting) - 1, lo + 1)
        return setting[lo] * (1 - (x - lo)) + setting[hi] * (x - lo)
    for cond in setting:
        if cond.get("filter") in (None, "*") or cond["filter"] in name:
            return _value(cond["value"], name)
    return None


def _param(entry: dict, data: dict, key: str, name: str, default=None):
    for source in ((entry.get("parameters") or {}), (data.get("parameters") or {})):
        if key in source:
            value = _value(source[key], name)
            if value is not None:
                return value
    return default


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().reshape(-1).argsort(descending=True)[:k]] = True
    return delta * keep.reshape(delta.shape)


def mergekit_reference(data: dict, root: Path) -> dict[str, torch.Tensor]:
    """What mergekit computes for a linear / task_arithmetic / ties recipe (dare methods at density 1)."""
    method = data["merge_method"]
    base_name = data.get("base_model")
    inputs = [e for e in data["models"] if e["model"] != base_name]
    sds = [_sd(root / e["model"]) for e in inputs]
    params = data.get("parameters") or {}
    out = {}
    if method == "linear":
        entries = list(data["models"])
        if base_name and all(e["model"] != base_name for e in entries):
            entries.append({"model": base_name})
        all_sds = [_sd(root / e["model"]) for e in entries]
        for name in all_sds[0]:
            w = [_param(e, data, "weight", name) for e in entries]
            out[name] = sum(wk * sd[name] for wk, sd in zip(w, all_sds)) / sum(w)
        return out
    base = _sd(root / base_name)
    normalize = params.get("normalize", method == "ties")
    lam = params.get("lambda", 1.0)
    for name, b in base.items():
        w = torch.tensor([_param(e, data, "weight", name) for e in inputs], dtype=torch.float64)
        deltas = torch.stack([_trim(sd[name] - b, _param(e, data, "density", name, 1.0) if method == "ties" else 1.0)
                              for e, sd in zip(inputs, sds)])
        weighted = deltas * w.reshape(-1, *([1] * b.dim()))
        if method in ("ties", "dare_ties"):
            elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
            agree = weighted.sign() == elected
            mixed = (weighted * agree).sum(0)
            divisor = (w.reshape(-1, *([1] * b.dim())) * agree).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(0)
            divisor = w.sum()
            divisor = divisor if abs(float(divisor)) >= 1e-8 else torch.tensor(1.0, dtype=torch.float64)
        if normalize:
            mixed = mixed / divisor
        out[name] = b + lam * mixed
    return out


def _merge(root: Path, data: dict, out: str) -> Path:
    recipe = root / f"{out}.yml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)  # mergekit resolves model references against the working folder
    try:
        assert main(["merge", str(recipe), str(root / out), "--device", "cpu"]) == 0
    finally:
        os.chdir(cwd)
    return root / out


def _assert_close(got: dict, want: dict, atol: float = 2e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        assert err <= atol, f"{name}: max |diff| {err:.3g} > {atol}"


# -- documented examples against the hand computation --------------------------------------------------------------


@pytest.mark.parametrize("example", ["ties", "linear", "task_arithmetic"])
def test_documented_examples_match_hand_computation(models, example):
    data = {"ties": _ties_doc_runnable(), "linear": yaml.safe_load(LINEAR_DOC),
            "task_arithmetic": yaml.safe_load(TASK_ARITHMETIC)}[example]
    out = _merge(models, data, f"out_{example}")
    _assert_close(_sd(out), mergekit_reference(data, models))
    card = (out / "README.md").read_text()
    assert "From a mergekit recipe" in card and f"merge_method `{example}`" in card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == example
    assert json.loads((out / "merge_config.json").read_text())["config"]["origin"]["format"] == "mergekit"


def test_ties_gradient_and_filter_reach_each_layer(models):
    """The weight gradient [0, .3, .7, 1] over 3 layers is 0 / .5 / 1 at layers 0 / 1 / 2 (mergekit's interpolation),
    and the filtered weight is 0.5 on MLP tensors only: checked on the loaded recipe's per-tensor values."""
    from sens_peft.tensor_settings import tensor_values

    recipe = load_recipe(_write(models, _ties_doc_runnable(), "grad"))
    settings = recipe.config.tensor_settings
    for layer, want in ((0, 0.0), (1, 0.5), (2, 1.0)):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert tensor_values(settings, name, [0, 1, 2])["weights"] == pytest.approx([1.0, want, 0.0])
    assert tensor_values(settings, "model.layers.1.mlp.up_proj.weight", [0, 1, 2])["weights"][2] == 0.5
    assert tensor_values(settings, "model.layers.2.mlp.up_proj.weight", [0])["densities"] == pytest.approx([0.1])
    assert tensor_values(settings, "model.embed_tokens.weight", [0, 1])["densities"] == pytest.approx([1.0, 0.5])


def _write(root: Path, data: dict, stem: str) -> Path:
    path = root / f"{stem}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_ties_normalize_false_sums_the_agreeing_entries(models):
    data = _ties_doc_runnable(normalize=False)
    summed = _sd(_merge(models, data, "out_ties_sum"))
    _assert_close(summed, mergekit_reference(data, models))
    averaged = _sd(models / "out_ties") if (models / "out_ties").exists() else \
        _sd(_merge(models, _ties_doc_runnable(), "out_ties"))
    name = "model.layers.2.mlp.down_proj.weight"
    assert (summed[name] - averaged[name]).abs().max() > 1e-3


def test_dare_ties_example_at_density_1_is_deterministic_and_matches(models):
    """The DARE-TIES example is refused as written (int8_mask); at density 1 nothing is drawn, and the result is
    mergekit's sign election with the sum of the agreeing entries (dare_ties's normalize default is false)."""
    data = yaml.safe_load(DARE_TIES_DOC)
    with pytest.raises(RecipeError, match="int8_mask"):
        load_recipe(_write(models, data, "dare_doc"))
    data["parameters"] = {}
    data["dtype"] = "float32"
    for entry in data["models"][1:]:
        entry["parameters"]["density"] = 1.0
    _assert_close(_sd(_merge(models, data, "out_dare_ties")), mergekit_reference(data, models))


def test_dare_per_model_density_is_honoured(models):
    """dare_linear with one expert per density: each keeps about its density of the entries, rescaled by 1/density."""
    data = {"merge_method": "dare_linear", "base_model": "base", "dtype": "float32",
            "models": [{"model": "e1", "parameters": {"weight": 1.0, "density": 0.2}},
                       {"model": "e2", "parameters": {"weight": 0.0, "density": 0.9}}]}
    merged = _sd(_merge(models, data, "out_dare"))
    base, e1 = _sd(models / "base"), _sd(models / "e1")
    name = "model.layers.1.mlp.gate_proj.weight"
    diff, delta = merged[name] - base[name], e1[name] - base[name]
    kept = diff.abs() > 0
    assert abs(kept.double().mean().item() - 0.2) < 0.03
    torch.testing.assert_close(diff[kept], delta[kept] / 0.2, rtol=1e-5, atol=1e-6)


# -- refusals before anything is written -------------------------------------------------------------------------


@pytest.mark.parametrize("change, key", [
    ({"parameters": {"int8_mask": True}}, "int8_mask"),
    ({"merge_method": "nuslerp"}, "merge_method"),
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"slices": [{"sources": []}]}, "slices"),
    ({"parameters": {"rescale": True}}, "rescale"),
    ({"parameters": {"epsilon": 0.1}}, "epsilon"),
    ({"dtype": "float8"}, "dtype"),
    ({"base_model": None}, "base_model"),
    ({"models": [{"model": "e1", "parameters": {"weight": 1, "gamma": 0.1}}]}, "gamma"),
    ({"models": [{"model": "e1+e2", "parameters": {"weight": 1}}]}, "adapter_config"),
    ({"models": [{"model": "e1", "parameters": {"density": 0.5}}]}, "weight"),
    ({"models": [{"model": "e1", "parameters": {"weight": "high"}}]}, "weight"),
    ({"merge_method": "linear", "parameters": {}}, "density"),
    ({"models": [{"model": "no/such/model", "parameters": {"weight": 1}}]}, "not a local folder"),
])
def test_refused_with_a_clear_error_before_anything_is_written(models, change, key, capsys):
    data = {**_ties_doc_runnable(), **change}
    if data.get("base_model") is None:
        data.pop("base_model")
    path = _write(models, data, "bad")
    cwd = os.getcwd()
    os.chdir(models)
    try:
        assert main(["merge", str(path), str(models / "never")]) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "mergekit recipe" in err and __import__("re").search(key, err), err
    assert not (models / "never").exists()


def test_detection_by_keys(models):
    import sens_peft
    from sens_peft.mergekit_recipe import is_mergekit_recipe

    assert sens_peft.load_recipe is load_recipe  # the public entry reads both schemas

    assert is_mergekit_recipe(yaml.safe_load(LINEAR_DOC))
    assert not is_mergekit_recipe({"base_model": "b", "experts": ["e1"], "method": "ties"})


# -- per-expert density in sens-peft's own schema -----------------------------------------------------------------


def test_own_schema_per_expert_density_matches_hand_computation(models):
    """experts[i].density (TIES, full models, streamed) equals the hand computation; other densities, other result."""
    own = {"base_model": "base", "method": "ties",
           "experts": [{"path": "e1", "weight": 1.0, "density": 0.2}, {"path": "e2", "weight": 0.5, "density": 0.8},
                       {"path": "e3", "weight": 1.0}],
           "parameters": {"density": 0.5, "trim_by": "magnitude", "scale": 1.0},
           "sens": None, "output": {"type": "full", "path": "out_own"}}
    path = _write(models, own, "own")
    recipe = load_recipe(path)
    assert recipe.config.densities == [0.2, 0.8, 0.5]
    run_recipe(recipe, device="cpu")
    got = _sd(models / "out_own")
    base = _sd(models / "base")
    experts = [_sd(models / f"e{k}") for k in (1, 2, 3)]
    w = torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    for name, b in base.items():
        trimmed = torch.stack([_trim(sd[name] - b, d) for sd, d in zip(experts, (0.2, 0.8, 0.5))])
        weighted = trimmed * w.reshape(-1, *([1] * b.dim()))
        agree = weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        want = b + (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)  # sens-peft's count divisor
        assert (got[name] - want).abs().max() <= 2e-6, name
    uniform = {**own, "experts": [{"path": e["path"], "weight": e["weight"]} for e in own["experts"]],
               "output": {"type": "full", "path": "out_uniform"}}
    run_recipe(load_recipe(_write(models, uniform, "uniform")), device="cpu")
    name = "model.layers.0.self_attn.o_proj.weight"
    assert (got[name] - _sd(models / "out_uniform")[name]).abs().max() > 1e-3
    assert "Per-expert density: [0.2, 0.8, 0.5]" in (models / "out_own" / "README.md").read_text()


def test_per_expert_density_refused_by_methods_that_ignore_it():
    from sens_peft.config import MergeConfig

    with pytest.raises(ValueError, match="per-expert densities"):
        MergeConfig(method="task_arithmetic", densities=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"densities\[1\]"):
        MergeConfig(method="ties", densities=[0.5, 1.5])
    with pytest.raises(ValueError, match="divisor='weights'"):
        MergeConfig(method="ties", scale=2.0, params={"divisor": "weights"})


def test_per_expert_density_dense_equals_streamed():
    from sens_peft.methods import merge_deltas, merge_streamed

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(24, 40, generator=gen)
    experts = [base + torch.randn(24, 40, generator=gen) for _ in range(3)]
    for method, extra in (("ties", {"divisor": "weights"}), ("ties", {}), ("dare_ties", {"divisor": "none"}),
                          ("dare_linear", {})):
        dense = base + merge_deltas(method, [e - base for e in experts], [0.5, 1.0, 2.0], density=0.5,
                                    densities=[0.3, 0.6, 1.0], name="w", **extra)
        streamed, _ = merge_streamed(method, base, experts, [0.5, 1.0, 2.0], density=0.5, densities=[0.3, 0.6, 1.0],
                                     name="w", **extra)
        torch.testing.assert_close(streamed, dense, rtol=0, atol=1e-6)


def test_mergekit_recipe_copy_and_card_hold_no_local_paths(models, tmp_path):
    """Absolute model paths in a mergekit recipe do not reach any written file (portable metadata)."""
    data = yaml.safe_load(LINEAR_DOC)
    for entry in data["models"]:
        entry["model"] = str(models / entry["model"])
    data["base_model"] = str(models / "base")
    data["parameters"] = {"weight": 0.1}
    out = tmp_path / "merged"
    assert main(["merge", str(_write(tmp_path, data, "abs")), str(out)]) == 0
    leaks = [str(f) for f in out.rglob("*") if f.is_file() and str(models).encode() in f.read_bytes()]
    assert leaks == []


# -- LoRA adapters as mergekit's base+adapter references ------------------------------------------------------

LORA_TIES = """
models:
  - model: lbase+a1
    parameters:
      weight: 1.0
      density: 0.3
  - model: lbase+a2
    parameters:
      weight: [0.2, 0.9]
      density: 0.7
merge_method: ties
base_model: lbase
dtype: float32
"""


@pytest.fixture(scope="module")
def adapters(models):
    save_model(tiny_llama(seed=0), models / "lbase")
    for k in (1, 2):
        make_lora_adapter(lambda: tiny_llama(seed=0), models / f"a{k}", seed=10 + k,
                          target_modules=("q_proj", "v_proj", "down_proj"))
    return models


def _lora_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha / r) B @ A per adapted weight (canonical names), float64, from the adapter's files."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = {k: v.double() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            out[name] = cfg["lora_alpha"] / cfg["r"] * (b @ a)
    return out


def test_lora_references_merge_the_adapters_like_mergekit(adapters):
    """base+adapter references (mergekit applies each adapter, then merges): base + TIES of the ΔW, with per-model
    densities and a weight gradient, against the float64 hand computation on the adapters' ΔW."""
    data = yaml.safe_load(LORA_TIES)
    recipe = load_recipe(_write(adapters, data, "lora_ties"))
    assert recipe.expert_type == "lora" and recipe.config.output == "full"
    got = _sd(_merge(adapters, data, "out_lora_ties"))
    base = _sd(adapters / "lbase")
    deltas = [_lora_deltas(adapters / f"a{k}") for k in (1, 2)]
    for name, b in base.items():
        if name not in deltas[0]:
            assert torch.equal(got[name], b), name  # untouched by every adapter: the base
            continue
        t = int(name.split(".")[2])  # layers.N, two layers: t = N
        w = torch.tensor([1.0, 0.2 + 0.7 * t], dtype=torch.float64)
        trimmed = torch.stack([_trim(d[name], dens) for d, dens in zip(deltas, (0.3, 0.7))])
        weighted = trimmed * w.reshape(-1, 1, 1)
        agree = weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
        divisor = (w.reshape(-1, 1, 1) * agree).sum(0)
        divisor[divisor == 0] = 1
        want = b + (weighted * agree).sum(0) / divisor
        assert (got[name] - want).abs().max() <= 2e-6, name


def test_shipped_example_recipe_runs_on_the_quick_start_layout(tmp_path, capsys):
    """recipes/mergekit_ties.yml on the folders the quick start writes (runs/quickstart/base, experts/<task>
    adapters), run from the repository root as the recipe says."""
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "mergekit_ties.yml"
    from sens_peft.testing.toy_tasks import build_tokenizer

    quick = tmp_path / "runs" / "quickstart"
    save_model(tiny_llama(seed=0), quick / "base")
    build_tokenizer().save_pretrained(str(quick / "base"))
    for k, task in enumerate(("inc", "cipher", "rcipher")):
        make_lora_adapter(lambda: tiny_llama(seed=0), quick / "experts" / task, seed=k + 1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["merge", str(shipped), "runs/merged_mergekit"]) == 0
    finally:
        os.chdir(cwd)
    out = tmp_path / "runs" / "merged_mergekit"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "From a mergekit recipe (merge_method `ties`)" in card and "model+lora" in card
    assert (out / "tokenizer_config.json").read_text() == (quick / "base" / "tokenizer_config.json").read_text()
    assert "mergekit recipe: ties" in capsys.readouterr().out


# -- mergekit itself, when installed in its own venv ---------------------------------------------------------------

MK_RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(cfg, sys.argv[2], options=MergeOptions(device="cpu", copy_tokenizer=False, lazy_unpickle=False,
                                               write_model_card=False, lora_merge_cache=sys.argv[2] + "_lora"))
"""


@pytest.mark.skipif(not MK_PYTHON.exists(), reason=f"mergekit venv {MK_PYTHON} not installed")
@pytest.mark.parametrize("example", ["ties", "ties_sum", "linear", "task_arithmetic", "dare_ties_d1", "lora_ties"])
def test_same_output_as_mergekit(adapters, example):
    models = adapters
    data = {"ties": _ties_doc_runnable(), "ties_sum": _ties_doc_runnable(normalize=False),
            "linear": yaml.safe_load(LINEAR_DOC), "task_arithmetic": yaml.safe_load(TASK_ARITHMETIC),
            "lora_ties": yaml.safe_load(LORA_TIES)}.get(example)
    if example == "dare_ties_d1":
        data = yaml.safe_load(DARE_TIES_DOC)
        data["parameters"], data["dtype"] = {}, "float32"
        for entry in data["models"][1:]:
            entry["parameters"]["density"] = 1.0
    ours = _sd(_merge(models, data, f"ours_{example}"))
    recipe = _write(models, data, f"mk_{example}")
    runner = models / "mk_runner.py"
    runner.write_text(MK_RUNNER)
    proc = subprocess.run([str(MK_PYTHON), str(runner), str(recipe), str(models / f"mk_{example}")], cwd=models,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = {}
    for f in sorted((models / f"mk_{example}").glob("*.safetensors")):
        theirs.update({k: v.double() for k, v in load_file(str(f)).items()})
    common = set(ours) & set(theirs)
    assert common and set(theirs) <= set(ours), sorted(set(theirs) ^ set(ours))
    worst = max((ours[n] - theirs[n]).abs().max().item() for n in common)
    print(f"mergekit {example}: {len(common)} tensors, max |ours - mergekit| = {worst:.3g}", file=sys.stderr)
    assert worst <= 1e-6
