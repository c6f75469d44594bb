"""mergekit recipes for slerp, della, della_linear, breadcrumbs, breadcrumbs_ties and model_stock (recipes written
here after mergekit's documented examples): each merged through `sens-peft merge` equals the same merge through
sens-peft's own API bit for bit, and (when mergekit is installed in its own venv) mergekit's own output on tiny
models to 1e-6; refusals name the file and the field; SLERP's per-layer ``t`` reads the layer count from the base
model's config.json.

DELLA's random drop: both sides replace the draw by the same deterministic ``u(position) < p`` (the trick of
tests/test_more_methods.py: mergekit's ``torch.bernoulli`` and sens-peft's ``drops.counter_keep_probs``), so the
magnitude ranks, probabilities, L1 rescale, weights and election are compared at density < 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_full_expert, make_lora_adapter, read_state, save_model, tiny_llama
from test_more_methods import GOLDEN, fake_draw

from sens_peft import merge_models
from sens_peft.cli import main
from sens_peft.errors import MergeError, RecipeError
from sens_peft.methods import drops
from sens_peft.recipe import load_recipe, run_recipe

LAYERS = 4
MK_PYTHON = Path(os.environ.get("SENS_PEFT_MERGEKIT_PYTHON", "/work/mk-venv/bin/python"))

# mergekit's README SLERP example (its per-filter t gradients), on whole models instead of one full-range slice
SLERP_DOC = """
models:
  - model: e1
  - model: e2
merge_method: slerp
base_model: e1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""

# the same, verbatim as mergekit's README writes it: one slice whose sources span every layer
SLERP_SLICES = f"""
slices:
  - sources:
      - model: e1
        layer_range: [0, {LAYERS}]
      - model: e2
        layer_range: [0, {LAYERS}]
merge_method: slerp
base_model: e1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""

SLERP_SCALAR = """
models:
  - model: e2
merge_method: slerp
base_model: e1
parameters:
  t: 0.3
dtype: float32
"""

DELLA_DOC = """
models:
  - model: e1
    parameters:
      weight: 1.0
      density: 0.5
      epsilon: 0.1
  - model: e2
    parameters:
      weight: 0.5
      density: 0.5
      epsilon: 0.1
  - model: e3
    parameters:
      weight: 0.3
merge_method: della
base_model: base
parameters:
  density: 0.5
  epsilon: 0.1
  normalize: true
dtype: float32
"""

DELLA_LINEAR = """
models:
  - model: e1
    parameters:
      weight: 0.6
  - model: e2
    parameters:
      weight: 0.9
merge_method: della_linear
base_model: base
parameters:
  density: 0.4
  normalize: true
  lambda: 0.8
dtype: float32
"""

BREADCRUMBS = """
models:
  - model: e1
    parameters:
      weight: 1.0
  - model: e2
    parameters:
      weight: 0.5
merge_method: breadcrumbs
base_model: base
parameters:
  density: 0.5
  gamma: 0.1
  lambda: 0.9
dtype: float32
"""

BREADCRUMBS_TIES = """
models:
  - model: e1
    parameters:
      weight: 1.0
      density: 0.6
      gamma: 0.05
  - model: e2
    parameters:
      weight: 0.7
      density: 0.6
      gamma: 0.05
  - model: e3
    parameters:
      weight: 0.4
      density: 0.6
      gamma: 0.05
merge_method: breadcrumbs_ties
base_model: base
parameters:
  normalize: true
dtype: float32
"""

MODEL_STOCK = """
models:
  - model: base
  - model: e1
  - model: e2
  - model: e3
merge_method: model_stock
base_model: base
parameters:
  filter_wise: false
dtype: float32
"""

T_FILTERS = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]

# (name, recipe text, changes to it, our own API's merge_models arguments, experts, DELLA's draw replaced)
CASES = [
    ("slerp", SLERP_DOC, {}, dict(method="slerp", params={"t": T_FILTERS}), ("e1", "e2"), False),
    ("slerp_slices", SLERP_SLICES, {}, dict(method="slerp", params={"t": T_FILTERS}), ("e1", "e2"), False),
    ("slerp_scalar", SLERP_SCALAR, {}, dict(method="slerp", params={"t": 0.3}), ("e1", "e2"), False),
    ("della", DELLA_DOC, {}, dict(method="della", weights=[1.0, 0.5, 0.3], density=0.5, params={
        "epsilon": 0.1, "rescale": "l1", "normalize": True, "divisor": "weights"}), ("e1", "e2", "e3"), True),
    ("della_sum", DELLA_DOC, {"parameters": {"density": 0.5, "epsilon": 0.1, "normalize": False, "lambda": 1.5,
                                             "rescale": False}},
     dict(method="della", weights=[1.0, 0.5, 0.3], density=0.5, scale=1.5, params={
         "epsilon": 0.1, "rescale": "none", "normalize": False}), ("e1", "e2", "e3"), True),
    # normalize: true divides each tensor's weights by their sum: MergeConfig.tensor_settings's "normalize"
    ("della_linear", DELLA_LINEAR, {}, dict(method="della_linear", density=0.4, scale=0.8, tensor_settings={
        "num_layers": LAYERS, "weight": [[0.6], [0.9]], "normalize": True}, params={"epsilon": 0.15, "rescale": "l1"}),
     ("e1", "e2"), True),
    ("breadcrumbs", BREADCRUMBS, {}, dict(method="breadcrumbs", weights=[1.0, 0.5], density=0.5, scale=0.9,
                                          params={"gamma": 0.1}), ("e1", "e2"), False),
    ("breadcrumbs_ties", BREADCRUMBS_TIES, {}, dict(method="breadcrumbs_ties", weights=[1.0, 0.7, 0.4],
                                                    density=0.6, params={"gamma": 0.05, "normalize": True,
                                                                         "divisor": "weights"}),
     ("e1", "e2", "e3"), False),
    ("breadcrumbs_ties_sum", BREADCRUMBS_TIES, {"parameters": {}},
     dict(method="breadcrumbs_ties", weights=[1.0, 0.7, 0.4], density=0.6, params={"gamma": 0.05}),
     ("e1", "e2", "e3"), False),
    ("model_stock", MODEL_STOCK, {}, dict(method="model_stock"), ("e1", "e2", "e3"), False),
    ("model_stock_fw", MODEL_STOCK, {"parameters": {"filter_wise": True}},
     dict(method="model_stock", params={"filter_wise": True}), ("e1", "e2", "e3"), False),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_methods")
    base = tiny_llama(seed=0, num_hidden_layers=LAYERS)
    save_model(base, root / "base")
    for k in (1, 2, 3):
        make_full_expert(base, root / f"e{k}", seed=20 + k, sigma=0.05)
    return root


def _recipe(text: str, changes: dict) -> dict:
    return {**yaml.safe_load(text), **changes}


def _write(root: Path, data: dict, stem: str) -> Path:
    path = root / f"{stem}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _merge(root: Path, data: dict, out: str) -> Path:
    """`sens-peft merge recipe.yml out` from the recipe's folder (mergekit resolves references there)."""
    recipe = _write(root, data, out)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["merge", str(recipe), str(root / out), "--device", "cpu"]) == 0
    finally:
        os.chdir(cwd)
    return root / out


def _fake_draw_no_expert(probs, start, seed, name, expert):
    """The deterministic draw of test_more_methods, expert-independent as mergekit's patched bernoulli is."""
    return fake_draw(probs, start, seed, name, 0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_recipe_equals_own_api(models, case, monkeypatch, tmp_path):
    """The mergekit recipe merges bit for bit as the same merge written with merge_models (DELLA: real seeded
    masks, the same on both sides)."""
    label, text, changes, kwargs, experts, _ = case
    ours = read_state(_merge(models, _recipe(text, changes), f"yaml_{label}"))
    report = merge_models(models / "base", [models / e for e in experts], tmp_path / "api", sens=None,
                          device="cpu", **kwargs)
    own = read_state(report.output_dir)
    assert set(ours) == set(own)
    differing = [n for n in own if not torch.equal(ours[n], own[n])]
    assert differing == []
    base = read_state(models / "base")
    name = "model.layers.2.mlp.up_proj.weight"
    assert (own[name] - base[name]).abs().max() > 1e-3  # not the base: the merge did something


def test_card_notes_cover_the_new_fields(models):
    card = (_merge(models, _recipe(DELLA_DOC, {}), "card_della") / "README.md").read_text()
    assert "merge_method `della`" in card
    for field in ("models[].parameters.density`: honoured (0.5", "models[].parameters.epsilon`: honoured (0.1",
                  "parameters.rescale`: honoured (True: kept entries rescaled to the delta's L1 norm",
                  "parameters.normalize`: honoured (True)", "random masks"):
        assert field in card, field
    card = (_merge(models, _recipe(SLERP_DOC, {}), "card_slerp") / "README.md").read_text()
    assert "`base_model`: honoured: the t = 0 end" in card and "`parameters.t`: honoured ([{" in card
    card = (_merge(models, _recipe(BREADCRUMBS, {}), "card_bc") / "README.md").read_text()
    assert "models[].parameters.gamma`: honoured (0.1" in card and "parameters.lambda`: honoured (0.9)" in card
    card = (_merge(models, _recipe(MODEL_STOCK, {}), "card_stock") / "README.md").read_text()
    assert "parameters.filter_wise`: honoured (False)" in card


def test_slerp_recipe_matches_hand_slerp_per_filter_and_layer(models):
    """mergekit's per-filter gradients over 4 layers: self_attn of layer 1 at x = 1/3 of [0, .5, .3, .7, 1]
    (4/3 → 0.5 + (0.3 - 0.5)/3), mlp of layer 2 at 2/3 of [1, .5, .7, .3, 0] (8/3 → 0.7 + (0.3 - 0.7)·2/3), norms
    0.5 (the last condition), layer 0 at 0 (the base, e1)."""
    from test_more_methods import hand_slerp

    merged = read_state(_merge(models, _recipe(SLERP_DOC, {}), "slerp_hand"))
    e1, e2 = read_state(models / "e1"), read_state(models / "e2")
    for name, t in (("model.layers.1.self_attn.q_proj.weight", 0.5 - 0.2 / 3),
                    ("model.layers.2.mlp.up_proj.weight", 0.7 - 0.4 * 2 / 3),
                    ("model.layers.3.input_layernorm.weight", 0.5), ("model.embed_tokens.weight", 0.5),
                    ("model.layers.0.self_attn.k_proj.weight", 0.0)):
        assert (merged[name].double() - hand_slerp(e1[name], e2[name], t)).abs().max() <= 1e-6, name


# -- SLERP's per-layer t without num_layers ---------------------------------------------------------------------


def test_slerp_layer_count_read_from_the_base_config(models, tmp_path):
    experts = [models / "e1", models / "e2"]
    inferred = merge_models(models / "base", experts, tmp_path / "inferred", method="slerp",
                            params={"t": [0.0, 0.2, 1.0]}, device="cpu")
    assert inferred.config.params["num_layers"] == LAYERS
    explicit = merge_models(models / "base", experts, tmp_path / "explicit", method="slerp",
                            params={"t": [0.0, 0.2, 1.0], "num_layers": LAYERS}, device="cpu")
    a, b = read_state(inferred.output_dir), read_state(explicit.output_dir)
    assert all(torch.equal(a[n], b[n]) for n in a)
    wrong = merge_models(models / "base", experts, tmp_path / "wrong", method="slerp",
                         params={"t": [0.0, 0.2, 1.0], "num_layers": 7}, device="cpu")
    name = "model.layers.2.self_attn.v_proj.weight"
    assert not torch.equal(read_state(wrong.output_dir)[name], a[name])  # the count matters: it was read


def test_slerp_layer_list_in_own_recipe_without_num_layers(models):
    own = {"base_model": "base", "method": "slerp", "experts": [{"path": "e1"}, {"path": "e2"}],
           "parameters": {"t": [0.0, 1.0]}, "output": {"type": "full", "path": "own_slerp"}}
    run_recipe(load_recipe(_write(models, own, "own_slerp")), device="cpu")
    merged, e1, e2 = (read_state(models / f) for f in ("own_slerp", "e1", "e2"))
    name = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(merged[name.format(0)], e1[name.format(0)])  # t = 0: the first expert
    assert (merged[name.format(LAYERS - 1)] - e2[name.format(LAYERS - 1)]).abs().max() <= 1e-6  # t = 1


def test_slerp_without_a_layer_count_in_the_config_is_refused(models, tmp_path):
    for folder in ("base", "e1", "e2"):
        shutil.copytree(models / folder, tmp_path / folder)
        cfg = json.loads((tmp_path / folder / "config.json").read_text())
        del cfg["num_hidden_layers"]
        (tmp_path / folder / "config.json").write_text(json.dumps(cfg))
    experts = [tmp_path / "e1", tmp_path / "e2"]
    with pytest.raises(MergeError, match=r"base \(.*config\.json\): slerp's t is a per-layer list, and the config "
                                         r"states no layer count .*num_hidden_layers.*set parameters\.num_layers"):
        merge_models(tmp_path / "base", experts, tmp_path / "out", method="slerp", params={"t": [0.0, 1.0]})
    assert not (tmp_path / "out").exists()
    merge_models(tmp_path / "base", experts, tmp_path / "scalar", method="slerp", params={"t": 0.4})  # no list
    merge_models(tmp_path / "base", experts, tmp_path / "given", method="slerp",
                 params={"t": [0.0, 1.0], "num_layers": LAYERS})


# -- refusals: file and field named, before anything is written -------------------------------------------------

BAD = [
    ("slerp_three", SLERP_DOC, {"models": [{"model": "e1"}, {"model": "e2"}, {"model": "e3"}]}, "models",
     r"slerp interpolates exactly 2 models.*2 model\(s\) besides base_model \['e2', 'e3'\]"),
    ("slerp_base_not_listed", SLERP_DOC, {"models": [{"model": "e2"}, {"model": "e3"}]}, "models",
     "exactly 2 models"),
    ("slerp_one", SLERP_DOC, {"models": [{"model": "e1"}]}, "models", "0 model"),
    ("slerp_no_t", SLERP_DOC, {"parameters": {}}, "parameters.t", "is required by slerp"),
    ("slerp_t_type", SLERP_DOC, {"parameters": {"t": "high"}}, "parameters.t", "must be a number"),
    ("slerp_t_condition", SLERP_DOC, {"parameters": {"t": [{"filter": "mlp", "value": 0.5, "when": 1}]}},
     r"parameters.t\[0\]", r"\{filter, value\} condition"),
    ("slerp_per_model", SLERP_DOC, {"models": [{"model": "e1"}, {"model": "e2", "parameters": {"weight": 1}}]},
     r"models\[1\].parameters", "mergekit's slerp takes no per-model parameters"),
    ("slerp_unknown", SLERP_DOC, {"parameters": {"t": 0.5, "normalize": True}}, "parameters",
     r"unknown or unsupported key\(s\) \['normalize'\]; supported for slerp: \['t'\]"),
    ("slerp_no_base", SLERP_DOC, {"base_model": None}, "base_model", "is required by slerp"),
    ("slices_part", SLERP_SLICES, {"slices": [{"sources": [{"model": "e1", "layer_range": [0, 2]},
                                                           {"model": "e2", "layer_range": [0, 2]}]}]},
     r"slices\[0\].sources\[0\].layer_range", r"\[0, 2\] is not the whole model \[0, 4\]"),
    ("slices_two", SLERP_SLICES, {"slices": [{"sources": [{"model": "e1", "layer_range": [0, 2]}]},
                                             {"sources": [{"model": "e1", "layer_range": [2, 4]}]}]},
     "slices", "2 slices: layer slices .* not supported"),
    ("slices_twice_t", SLERP_SLICES, {"slices": [{"sources": [{"model": "e1", "layer_range": [0, LAYERS]},
                                                              {"model": "e2", "layer_range": [0, LAYERS]}],
                                                  "parameters": {"t": 0.2}}]},
     r"slices\[0\].parameters", r"\['t'\] set both here and in the top-level parameters"),
    ("slices_residual", SLERP_SLICES, {"slices": [{"sources": [{"model": "e1", "layer_range": [0, LAYERS]}],
                                                   "residual_weight": 0.5}]},
     r"slices\[0\].residual_weight", "is not supported"),
    ("stock_one", MODEL_STOCK, {"models": [{"model": "e1"}]}, "models", "model_stock needs at least 2 models"),
    ("stock_type", MODEL_STOCK, {"parameters": {"filter_wise": "yes"}}, "parameters.filter_wise",
     "must be true or false"),
    ("stock_weight", MODEL_STOCK, {"models": [{"model": "e1", "parameters": {"weight": 0.5}}, {"model": "e2"}]},
     r"models\[0\].parameters", "takes no per-model parameters"),
    ("della_eps_list", DELLA_DOC, {"parameters": {"density": 0.5, "epsilon": [0.1, 0.2]}}, "parameters.epsilon",
     "per-layer lists and filters are not supported for della's epsilon"),
    ("della_density_differs", DELLA_DOC, {"parameters": {"density": 0.3, "epsilon": 0.1}},
     r"models\[\].parameters.density", r"differs between models \(\{'e1': 0.5, 'e2': 0.5, 'e3': 0.3\}\)"),
    ("della_eps_range", DELLA_DOC, {"parameters": {"density": 0.5, "epsilon": 0.1}, "models": [
        {"model": f"e{k}", "parameters": {"weight": 1.0, "epsilon": 0.5}} for k in (1, 2)]},
     "parameters.epsilon", "density ± epsilon inside"),
    ("della_lambda", DELLA_DOC, {"parameters": {"density": 0.5, "epsilon": 0.1, "lambda": 2}}, "parameters.lambda",
     "with normalize: true is not supported"),
    ("della_gamma", DELLA_DOC, {"parameters": {"density": 0.5, "epsilon": 0.1, "gamma": 0.1}}, "parameters",
     r"unknown or unsupported key\(s\) \['gamma'\]"),
    ("della_int8", DELLA_DOC, {"parameters": {"density": 0.5, "epsilon": 0.1, "int8_mask": True}},
     "parameters.int8_mask", "true is refused"),
    ("della_weight_type", DELLA_DOC, {"models": [{"model": "e1", "parameters": {"weight": "1.0"}}]},
     r"models\[0\].parameters.weight", "must be a number"),
    ("breadcrumbs_rescale", BREADCRUMBS, {"parameters": {"density": 0.5, "gamma": 0.1, "rescale": True}},
     "parameters.rescale", "not supported for breadcrumbs"),
    ("breadcrumbs_epsilon", BREADCRUMBS, {"models": [{"model": "e1", "parameters": {"weight": 1, "epsilon": 0.1}}]},
     r"models\[0\].parameters", r"unknown or unsupported per-model key\(s\) \['epsilon'\]; supported for "
     r"breadcrumbs: \['density', 'gamma', 'weight'\]"),
    ("breadcrumbs_gamma_filter", BREADCRUMBS, {"parameters": {"density": 0.5, "gamma": [{"filter": "mlp",
                                                                                         "value": 0.1}]}},
     "parameters.gamma", "per-layer lists and filters are not supported for breadcrumbs's gamma"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_refused_naming_file_and_field(models, case, capsys):
    label, text, changes, field, message = case
    data = _recipe(text, changes)
    if data.get("base_model") is None:
        data.pop("base_model")
    path = _write(models, data, f"bad_{label}")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert text.startswith(f"{path}: mergekit recipe: "), text
    assert re.search(field, text) and re.search(message, text), text
    cwd = os.getcwd()
    os.chdir(models)
    try:
        assert main(["merge", str(path), str(models / "never")]) == 2  # the CLI: one line, exit 2, nothing written
    finally:
        os.chdir(cwd)
    assert "mergekit recipe" in capsys.readouterr().err
    assert not (models / "never").exists()


# -- mergekit itself, when installed in its own venv --------------------------------------------------------------


# mergekit's run_merge; with "fake", torch.bernoulli replaced by fake_draw's u(position) < p (expert-independent:
# mergekit draws once per expert and tensor without saying which expert)
MK_RUNNER = f"""
import sys, torch, yaml
if sys.argv[3] == "fake":
    def bernoulli(p, *args, **kwargs):
        pos = torch.arange(p.numel(), dtype=torch.float64)
        u = torch.remainder(pos * {GOLDEN!r}, 1.0).reshape(p.shape)
        return (u < p.double()).to(p.dtype)
    torch.bernoulli = bernoulli
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(cfg, sys.argv[2], options=MergeOptions(device="cpu", copy_tokenizer=False, lazy_unpickle=False,
                                               write_model_card=False, lora_merge_cache=sys.argv[2] + "_lora"))
"""


def _mergekit(root: Path, data: dict, label: str, fake: bool) -> dict[str, torch.Tensor]:
    runner, recipe, out = root / "mk_methods_run.py", _write(root, data, f"mk_{label}"), root / f"mk_{label}"
    runner.write_text(MK_RUNNER)
    proc = subprocess.run([str(MK_PYTHON), str(runner), str(recipe), str(out), "fake" if fake else "-"], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_state(out)


@pytest.mark.skipif(not MK_PYTHON.exists(), reason=f"mergekit venv {MK_PYTHON} not installed")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_output_as_mergekit(models, case, monkeypatch):
    label, text, changes, _, _, fake = case
    data = _recipe(text, changes)
    theirs = _mergekit(models, data, label, fake)
    if fake:
        monkeypatch.setattr(drops, "counter_keep_probs", _fake_draw_no_expert)
    ours = read_state(_merge(models, data, f"ours_{label}"))
    assert set(ours) == set(theirs)
    worst = max((ours[n].double() - theirs[n].double()).abs().max().item() for n in ours)
    print(f"mergekit {label}: {len(ours)} tensors, max |ours - mergekit| = {worst:.3g}", file=sys.stderr)
    assert worst <= 1e-6


def test_elected_methods_divide_by_the_agreeing_weights():
    """DELLA and breadcrumbs_ties with divisor="weights" (mergekit's normalize: true): the agreeing weighted entries
    divided by the sum of the agreeing experts' weights, not by their count (density 1: nothing dropped)."""
    from sens_peft.methods import merge_deltas

    gen = torch.Generator().manual_seed(5)
    deltas = [torch.randn(6, 9, generator=gen, dtype=torch.float64) for _ in range(3)]
    c = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    weighted = torch.stack(deltas) * c.reshape(-1, 1, 1)
    agree = weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    by_weights = (weighted * agree).sum(0) / (agree * c.reshape(-1, 1, 1)).sum(0)
    by_count = (weighted * agree).sum(0) / agree.sum(0)
    for method, own in (("della", {}), ("breadcrumbs_ties", {"normalize": True})):
        got = merge_deltas(method, deltas, c.tolist(), density=1.0, name="w", divisor="weights", **own)
        assert (got - by_weights).abs().max() <= 1e-12, method
        counted = merge_deltas(method, deltas, c.tolist(), density=1.0, name="w", **own)  # the default: count
        assert (counted - by_count).abs().max() <= 1e-12 and (by_count - by_weights).abs().max() > 1e-2, method


LORA_CASES = [("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, {"weight": 1.0}),
              ("model_stock", {"filter_wise": True}, None)]


@pytest.mark.skipif(not MK_PYTHON.exists(), reason=f"mergekit venv {MK_PYTHON} not installed")
@pytest.mark.parametrize("case", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_lora_references_same_as_mergekit(models, case):
    """base+adapter references (mergekit applies each adapter, then merges): the adapters' ΔW merged onto the base."""
    method, params, per_model = case
    if not (models / "lbase").exists():
        save_model(tiny_llama(seed=0), models / "lbase")
        for k in (1, 2, 3):
            make_lora_adapter(lambda: tiny_llama(seed=0), models / f"a{k}", seed=30 + k,
                              target_modules=("q_proj", "v_proj", "down_proj"))
    data = {"merge_method": method, "base_model": "lbase", "parameters": params, "dtype": "float32",
            "models": [{"model": f"lbase+a{k}", **({"parameters": per_model} if per_model else {})} for k in (1, 2, 3)]}
    theirs = _mergekit(models, data, f"lora_{method}", False)
    ours = read_state(_merge(models, data, f"ours_lora_{method}"))
    assert set(theirs) <= set(ours)
    worst = max((ours[n].double() - theirs[n].double()).abs().max().item() for n in theirs)
    print(f"mergekit lora {method}: {len(theirs)} tensors, max |ours - mergekit| = {worst:.3g}", file=sys.stderr)
    assert worst <= 1e-6
    base = read_state(models / "lbase")
    name = "model.layers.1.self_attn.v_proj.weight"
    assert (ours[name] - base[name]).abs().max() > 1e-4  # the adapters did reach the merge


def test_slices_recipe_copy_holds_no_local_paths(models, tmp_path):
    """A slices recipe with absolute model paths: merged, and no written file names this machine's folders."""
    data = yaml.safe_load(SLERP_SLICES)
    for src in data["slices"][0]["sources"]:
        src["model"] = str(models / src["model"])
    data["base_model"] = str(models / "e1")
    out = tmp_path / "merged"
    assert main(["merge", str(_write(tmp_path, data, "abs_slices")), str(out), "--device", "cpu"]) == 0
    leaks = [str(f) for f in out.rglob("*") if f.is_file() and str(models).encode() in f.read_bytes()]
    assert leaks == []
    copied = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [s["model"] for s in copied["slices"][0]["sources"]] == ["e1", "e2"]
    assert "`slices`: one slice whose sources span every layer: read as models:" in (out / "README.md").read_text()


def test_integer_values_read_as_numbers(models):
    """YAML integers (density: 1, gamma: 0) are numbers like 1.0 and 0.0, as in mergekit."""
    data = _recipe(BREADCRUMBS, {"parameters": {"density": 1, "gamma": 0, "lambda": 2}})
    recipe = load_recipe(_write(models, data, "ints"))
    assert recipe.config.density == 1.0 and recipe.config.params["gamma"] == 0.0 and recipe.config.scale == 2.0
    data = _recipe(SLERP_SCALAR, {"parameters": {"t": 1}})
    assert load_recipe(_write(models, data, "int_t")).config.params["t"] == 1.0
