"""merge_adapters: equality with PEFT's exact merge types, single-expert identity, union of targets, reload,
full output, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapted_modules, lora_delta, make_lora_adapter, tiny_gpt2, tiny_llama

from sens_peft.io import MergeError
from sens_peft.merge import merge_adapters

NAMES = ["math", "code", "qa"]
WEIGHTS = [0.7, 0.3, 0.5]


def _base():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        # different ranks, alphas, rsLoRA and a per-module alpha: PEFT's `cat` handles all of them exactly
        "math": make_lora_adapter(_base, root / "math", r=4, alpha=8, seed=1),
        "code": make_lora_adapter(_base, root / "code", r=8, alpha=16, seed=2, use_rslora=True),
        "qa": make_lora_adapter(_base, root / "qa", r=4, alpha=4, seed=3,
                                target_modules=("q_proj", "v_proj", "up_proj"),
                                alpha_pattern={"up_proj": 12}),
        "mlp": make_lora_adapter(_base, root / "mlp", r=2, alpha=4, seed=4, target_modules=("up_proj", "down_proj")),
    }


def _loaded(adapter_dirs, names=NAMES):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(), str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference(model, names, weights, module):
    return sum(w * lora_delta(model, n, module) for n, w in zip(names, weights)
               if module in adapted_modules(model, n))


def test_task_arithmetic_equals_peft_cat(adapter_dirs):
    model = _loaded(adapter_dirs)
    report = merge_adapters(model, NAMES, method="task_arithmetic", sens=None, weights=WEIGHTS,
                            adapter_name="ours", device="cpu", progress=False)
    model.add_weighted_adapter(NAMES, WEIGHTS, "peft_cat", combination_type="cat")
    cfg = model.peft_config["ours"]
    assert cfg.r == cfg.lora_alpha and not cfg.use_rslora and not cfg.rank_pattern and not cfg.alpha_pattern
    modules = adapted_modules(model, "ours")
    assert set(modules) == set(adapted_modules(model, "peft_cat")) and len(modules) == 6  # q, v, up × 2 layers
    for module in modules:
        ours = lora_delta(model, "ours", module)
        assert _rel(ours, lora_delta(model, "peft_cat", module)) <= 1e-6, module
        assert _rel(ours, _reference(model, NAMES, WEIGHTS, module)) <= 1e-6, module
    assert report.adapter_name == "ours" and report.experts == NAMES and report.model is model
    # Σ r where all three adapt (4 + 8 + 4); up_proj has only qa's 4 (zero-padded)
    assert cfg.r == 16 and report.details["rank"] == 16


def test_ties_equals_peft_ties_svd_full_rank(adapter_dirs):
    model = _loaded(adapter_dirs)
    # PEFT elects TIES signs on the unscaled trimmed deltas; our default elects on the scaled ones
    # (methods.py docstring). weighted_election=False selects PEFT's rule; with equal weights both agree.
    merge_adapters(model, NAMES, method="ties", density=0.4, sens=None, weights=WEIGHTS, rank=32,
                   adapter_name="ours", device="cpu", weighted_election=False, progress=False)
    model.add_weighted_adapter(NAMES, WEIGHTS, "peft", combination_type="ties_svd", density=0.4, svd_rank=32)
    merge_adapters(model, NAMES, method="ties", density=0.4, sens=None, rank=32, adapter_name="ours_eq",
                   device="cpu", progress=False)
    model.add_weighted_adapter(NAMES, [1.0, 1.0, 1.0], "peft_eq", combination_type="ties_svd", density=0.4,
                               svd_rank=32)
    for module in adapted_modules(model, "ours"):
        assert _rel(lora_delta(model, "ours", module), lora_delta(model, "peft", module)) <= 1e-5, module
        assert _rel(lora_delta(model, "ours_eq", module), lora_delta(model, "peft_eq", module)) <= 1e-5, module


def test_dare_ties_against_peft(adapter_dirs):
    """DARE vs PEFT. At density 1 nothing is dropped and the two are equal. Below 1 the masks differ by design:
    PEFT draws from the global RNG in module order (so a module's mask depends on everything drawn before),
    we seed a generator per tensor from (seed, name). Drawing PEFT's masks from that same state
    (torch.manual_seed(stable_seed(seed, name))) makes PEFT's own merge_utils.dare_ties equal to ours."""
    from peft.utils.merge_utils import dare_ties

    from sens_peft.methods import merge_deltas, stable_seed

    model = _loaded(adapter_dirs)
    merge_adapters(model, NAMES, method="dare_ties", density=1.0, sens=None, weights=WEIGHTS, rank=32,
                   adapter_name="ours1", device="cpu", weighted_election=False, progress=False)
    model.add_weighted_adapter(NAMES, WEIGHTS, "peft1", combination_type="dare_ties_svd", density=1.0,
                               svd_rank=32)
    merge_adapters(model, NAMES, method="dare_ties", density=0.5, seed=7, sens=None, weights=WEIGHTS, rank=32,
                   adapter_name="ours5", device="cpu", weighted_election=False, progress=False,
                   dare_rng="torch")
    # the default "counter" masks: the in-memory merge_deltas with the same seed draws the same
    merge_adapters(model, NAMES, method="dare_ties", density=0.5, seed=7, sens=None, weights=WEIGHTS, rank=32,
                   adapter_name="ours6", device="cpu", weighted_election=False, progress=False)
    for module in adapted_modules(model, "ours1"):
        assert _rel(lora_delta(model, "ours1", module), lora_delta(model, "peft1", module)) <= 1e-5, module
        present = [(n, w) for n, w in zip(NAMES, WEIGHTS) if module in adapted_modules(model, n)]
        deltas = [lora_delta(model, n, module).float() for n, _ in present]
        weights = torch.tensor([w for _, w in present])
        torch.manual_seed(stable_seed(7, f"{module}.weight"))
        ref = dare_ties(deltas, weights, 0.5, "total")
        ours = lora_delta(model, "ours5", module)
        assert _rel(ours, ref) <= 1e-5, module
        assert _rel(ours, lora_delta(model, "ours1", module)) > 0.05  # the drop really happened
        ref = merge_deltas("dare_ties", deltas, weights, density=0.5, seed=7, name=f"{module}.weight",
                           weighted_election=False)
        assert _rel(lora_delta(model, "ours6", module), ref) <= 1e-5, module
        assert _rel(lora_delta(model, "ours6", module), ours) > 0.05  # other masks than the "torch" draws


@pytest.mark.parametrize("expert", ["math", "code", "qa"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_single_expert_weight_one_is_identity(adapter_dirs, expert, method):
    model = _loaded(adapter_dirs, [expert])
    merge_adapters(model, [expert], method=method, density=1.0, sens=None, adapter_name="one", device="cpu",
                   progress=False)
    assert model.peft_config["one"].lora_alpha == model.peft_config["one"].r
    for module in adapted_modules(model, expert):
        assert _rel(lora_delta(model, "one", module), lora_delta(model, expert, module)) <= 1e-6, module


def test_single_expert_identity_gpt2_fan_in_fan_out(tmp_path):
    from peft import PeftModel

    folder = make_lora_adapter(tiny_gpt2, tmp_path / "gpt", r=4, alpha=32, seed=5, use_rslora=True,
                               target_modules=("c_attn", "c_fc"), fan_in_fan_out=True)
    model = PeftModel.from_pretrained(tiny_gpt2(), str(folder), adapter_name="gpt")
    merge_adapters(model, ["gpt"], method="task_arithmetic", sens=None, adapter_name="one", device="cpu",
                   progress=False)
    merge_adapters(model, ["gpt"], method="ties", density=1.0, sens=None, adapter_name="one_svd", device="cpu",
                   progress=False)
    modules = adapted_modules(model, "gpt")
    assert len(modules) == 4
    expected = {m: lora_delta(model, "gpt", m) for m in modules}
    for module in modules:
        assert _rel(lora_delta(model, "one", module), expected[module]) <= 1e-6, module
        assert _rel(lora_delta(model, "one_svd", module), expected[module]) <= 1e-5, module
    # output="full": the base Conv1D weights ([in, out] layout) gain exactly ΔW
    base_before = {m: tiny_gpt2().get_submodule(m).weight.detach().double() for m in modules}
    full = merge_adapters(PeftModel.from_pretrained(tiny_gpt2(), str(folder), adapter_name="gpt"), ["gpt"],
                          method="task_arithmetic", sens=None, output="full", device="cpu", progress=False).model
    for module in modules:
        got = full.get_submodule(module).weight.detach().double()
        assert _rel(got - base_before[module], expected[module]) <= 1e-5, module


def test_union_of_targets_save_and_reload(adapter_dirs, tmp_path):
    from peft import PeftModel

    names, weights = ["math", "mlp"], [1.0, 0.5]
    model = _loaded(adapter_dirs, names)
    report = merge_adapters(model, names, method="task_arithmetic", sens=None, weights=weights, adapter_name="merged",
                            save_to=tmp_path / "out", device="cpu", progress=False)
    modules = adapted_modules(model, "merged")
    assert set(modules) == set(adapted_modules(model, "math")) | set(adapted_modules(model, "mlp"))
    for module in modules:
        assert _rel(lora_delta(model, "merged", module), _reference(model, names, weights, module)) <= 1e-6
    out = report.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "library_name: peft" in card and "- sens-peft" in card
    record = json.loads((out / "merge_config.json").read_text())
    assert [e["name"] for e in record["experts"]] == names and record["config"]["weights"] == weights
    assert not list(tmp_path.glob(".out.tmp-*"))

    reloaded = PeftModel.from_pretrained(_base(), str(out))
    for module in modules:
        assert torch.equal(lora_delta(reloaded, "default", module), lora_delta(model, "merged", module)), module
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    model.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_from_folders_full_output_saved(adapter_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    folders = [adapter_dirs["math"], adapter_dirs["qa"]]
    ref_model = _loaded(adapter_dirs, ["math", "qa"])
    expected = {m: _reference(ref_model, ["math", "qa"], [0.6, 0.4], m)
                for m in set(adapted_modules(ref_model, "math")) | set(adapted_modules(ref_model, "qa"))}
    report = merge_adapters(_base(), folders, method="task_arithmetic", sens=None, weights=[0.6, 0.4], output="full",
                            save_to=tmp_path / "full", device="cpu", progress=False)
    assert report.experts == ["math", "qa"] and report.adapter_name is None
    base = _base()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    for module, delta in expected.items():
        got = loaded.get_submodule(module).weight.double() - base.get_submodule(module).weight.double()
        assert _rel(got, delta) <= 1e-5, module
    assert "library_name: transformers" in (tmp_path / "full" / "README.md").read_text()


def test_folder_names_are_deduplicated(adapter_dirs, tmp_path):
    import shutil

    other = tmp_path / "x" / "math"
    shutil.copytree(adapter_dirs["math"], other)
    report = merge_adapters(_base(), [adapter_dirs["math"], other], sens=None, device="cpu", progress=False)
    assert report.experts == ["math", "math_2"]


def test_errors(adapter_dirs, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    with pytest.raises(MergeError, match="no adapters"):
        merge_adapters(_loaded(adapter_dirs, ["math"]), [], sens=None)
    model = _loaded(adapter_dirs, ["math", "code"])
    with pytest.raises(MergeError, match="more than once"):
        merge_adapters(model, ["math", "math"], sens=None)
    with pytest.raises(MergeError, match="not loaded"):
        merge_adapters(model, ["math", "nope"], sens=None)
    with pytest.raises(MergeError, match="already exists"):
        merge_adapters(model, ["math", "code"], sens=None, adapter_name="code")
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        merge_adapters(model, ["math", "code"], sens=None, save_to=tmp_path / "taken")
    # sens requested but no sidecars: name the expert and the missing file
    with pytest.raises(MergeError, match=r"expert 'math'.*sensitivity\.safetensors is missing"):
        merge_adapters(_base(), [adapter_dirs["math"], adapter_dirs["code"]], sens="task")
    with pytest.raises(MergeError, match="pass sensitivities="):
        merge_adapters(model, ["math", "code"], sens="task")
    assert set(model.peft_config) == {"math", "code"}  # failed merges leave no adapter behind
    # DoRA refused
    dora = get_peft_model(_base(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(MergeError, match="DoRA"):
        merge_adapters(dora, ["default"], sens=None)
    assert isinstance(dora, PeftModel)
    with pytest.raises(MergeError, match="weights has 1 entries"):
        merge_adapters(model, ["math", "code"], sens=None, weights=[1.0])


@pytest.fixture(scope="session")
def sens_dirs(adapter_dirs, tmp_path_factory):
    import shutil

    from helpers import write_sidecars

    root = tmp_path_factory.mktemp("sens")
    out = {}
    for i, (name, scores) in enumerate({"math": [3.0, 1.0], "code": [1.0, 2.0], "qa": [0.5, 4.0]}.items()):
        out[name] = root / name
        shutil.copytree(adapter_dirs[name], out[name])
        write_sidecars(out[name], scores, probe_seed=i)
    return out


@pytest.mark.parametrize("sens", ["task", "task+cross"])
def test_sens_coefficients_map_to_modules(adapter_dirs, sens_dirs, sens):
    """Each module's merged ΔW is Σ_k c_k[group of the module] ΔW_k with the report's table, and the layers
    really get different coefficients."""
    report = merge_adapters(_base(), [sens_dirs[n] for n in NAMES], method="task_arithmetic", sens=sens,
                            temperature=0.5, normalization="mean1", tau_normalization="exp_z", max_ratio=None, device="cpu",
                            progress=False)
    table, model = report.coefficients, report.model
    assert table.experts == NAMES
    c0, c1 = table.for_group("layers.0"), table.for_group("layers.1")
    assert not torch.allclose(c0, c1)
    assert (report.transfer is not None) == (sens == "task+cross")
    if report.transfer is not None:
        assert tuple(report.transfer.shape) == (3, 3)
    for module in adapted_modules(model, "merged"):
        c = table.for_name(f"{module}.weight").tolist()
        assert _rel(lora_delta(model, "merged", module), _reference(model, NAMES, c, module)) <= 1e-6, module


def test_explicit_sensitivities_for_loaded_adapters(adapter_dirs, sens_dirs):
    from sens_peft.store import load_sensitivity

    model = _loaded(adapter_dirs)
    records = [load_sensitivity(sens_dirs[n]) for n in NAMES]
    explicit = merge_adapters(model, NAMES, sens="task", sensitivities=records, temperature=0.5, device="cpu",
                              progress=False)
    from_folders = merge_adapters(_base(), [sens_dirs[n] for n in NAMES], sens="task", temperature=0.5,
                                  device="cpu", progress=False)
    torch.testing.assert_close(explicit.coefficients.values, from_folders.coefficients.values)


def test_modules_to_save_and_foreign_base(adapter_dirs, tmp_path):
    from peft import PeftModel

    owner = make_lora_adapter(_base, tmp_path / "owner", r=4, alpha=8, seed=6, modules_to_save=["lm_head"])
    other = make_lora_adapter(_base, tmp_path / "other", r=4, alpha=8, seed=7, modules_to_save=["lm_head"])
    model = PeftModel.from_pretrained(_base(), str(owner), adapter_name="owner")
    model.load_adapter(str(adapter_dirs["math"]), adapter_name="math")
    report = merge_adapters(model, ["owner", "math"], sens=None, save_to=tmp_path / "out", device="cpu",
                            progress=False)
    heads = model.base_model.model.lm_head.modules_to_save
    assert torch.equal(heads["merged"].weight, heads["owner"].weight)  # taken whole from its one owner
    reloaded = PeftModel.from_pretrained(_base(), str(report.output_dir))
    assert torch.equal(reloaded.base_model.model.lm_head.modules_to_save["default"].weight, heads["owner"].weight)
    model.load_adapter(str(other), adapter_name="other")
    with pytest.raises(MergeError, match="modules_to_save"):
        merge_adapters(model, ["owner", "other"], sens=None, adapter_name="m2")
    # an adapter trained on a base of another size
    wide = make_lora_adapter(lambda: tiny_llama(seed=0, hidden_size=48), tmp_path / "wide", seed=8)
    with pytest.raises(MergeError, match=r"adapter 'wide'.*does not fit the base model"):
        merge_adapters(_base(), [adapter_dirs["math"], wide], sens=None)
