"""method="importance" gets the experts' element maps from every entry point (merge_adapters, merge_models,
MergeOnTrainEnd, a YAML recipe), or a MergeError naming the expert without them. Before the registry owned the
method's needs, these entry points silently merged by plain task arithmetic."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import make_full_expert, make_lora_adapter, read_state, save_model, tiny_llama

from sens_peft import MergeOnTrainEnd, merge_adapters, merge_models
from sens_peft.errors import MergeError
from sens_peft.methods import merge_deltas
from sens_peft.recipe import load_recipe, run_recipe
from sens_peft.store import SensitivityRecord, load_sensitivity, save_sensitivity

Q0 = "model.layers.0.self_attn.q_proj.weight"


def _record(shapes: dict[str, tuple], seed: int, maps: bool = True) -> SensitivityRecord:
    """A sidecar scoring ``shapes`` with seeded positive element maps (clearly unequal between experts)."""
    gen = torch.Generator().manual_seed(seed)
    names = sorted(shapes)
    element = {n: torch.rand(shapes[n], generator=gen) ** 4 for n in names} if maps else {}
    scores = torch.ones(len(names))
    return SensitivityRecord(groups=["layers.0"], group_scores=torch.ones(1), tensor_names=names,
                             tensor_scores=scores, element_maps=element,
                             metadata={"estimator": "taylor_abs", "weight_source": "theta", "mode": "after"})


def _lora_experts(root, maps=(True, True)):
    base = tiny_llama(seed=0)
    shapes = {f"model.layers.{i}.self_attn.{p}.weight": tuple(getattr(base.model.layers[i].self_attn, p).weight.shape)
              for i in range(2) for p in ("q_proj", "v_proj")}
    folders = []
    for k, with_maps in enumerate(maps):
        folder = make_lora_adapter(tiny_llama, root / f"e{k}", seed=k + 1)
        save_sensitivity(_record(shapes, seed=10 + k, maps=with_maps), folder)
        folders.append(folder)
    return folders


def _lora_reference(folders, name: str = Q0) -> torch.Tensor:
    """Σ_k I_k ΔW_k / mean_k I_k for one module, with PEFT's ΔW_k and the maps read back from the sidecars."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(seed=0), str(folders[0]), adapter_name="e0")
    for k, folder in enumerate(folders[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"e{k}")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    deltas = [layer.get_delta_weight(f"e{k}").detach() for k in range(len(folders))]
    maps = [load_sensitivity(f).element_maps[name] for f in folders]
    merged = merge_deltas("importance", deltas, torch.ones(len(folders)), importance=maps)
    plain = merge_deltas("task_arithmetic", deltas, torch.ones(len(folders)))
    assert not torch.allclose(merged, plain, atol=1e-4)  # the maps matter here: TA would not pass for it
    return merged


def _q0_delta(model_or_state) -> torch.Tensor:
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    return state[Q0] - tiny_llama(seed=0).state_dict()[Q0]


def test_merge_adapters_uses_the_maps(tmp_path):
    folders = _lora_experts(tmp_path)
    report = merge_adapters(tiny_llama(seed=0), folders, method="importance", sens=None, output="full",
                            device="cpu", progress=False)
    torch.testing.assert_close(_q0_delta(report.model), _lora_reference(folders), rtol=1e-5, atol=1e-6)


def test_merge_adapters_refuses_an_expert_without_maps(tmp_path):
    folders = _lora_experts(tmp_path, maps=(True, False))
    with pytest.raises(MergeError, match=r"importance.*element_maps.*expert 'e1'"):
        merge_adapters(tiny_llama(seed=0), folders, method="importance", sens=None, device="cpu", progress=False)


def test_recipe_uses_the_maps(tmp_path):
    folders = _lora_experts(tmp_path)
    save_model(tiny_llama(seed=0), tmp_path / "base")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base_model": "base", "experts": [f.name for f in folders],
                                    "method": "importance", "sens": None,
                                    "output": {"type": "full", "path": "out"}, "device": "cpu"}))
    run_recipe(load_recipe(path))
    torch.testing.assert_close(_q0_delta(read_state(tmp_path / "out")), _lora_reference(folders), rtol=1e-5,
                               atol=1e-6)


def test_merge_on_train_end_uses_the_maps(tmp_path):
    """The trained adapter reaches the merge by name (no folder): its sidecar and the earlier experts' must still
    be read for the maps."""
    from peft import PeftModel

    folders = _lora_experts(tmp_path / "in")
    trained = PeftModel.from_pretrained(tiny_llama(seed=0), str(folders[0]), is_trainable=True)
    save = trained.save_pretrained

    def save_with_sidecar(folder, **kwargs):  # what SensitivityCallback's wrapper does at the end of training
        save(folder, **kwargs)
        save_sensitivity(load_sensitivity(folders[0]), folder)

    trained.save_pretrained = save_with_sidecar
    eot = MergeOnTrainEnd(folders[1:], tmp_path / "merged", method="importance", sens=None, output="full")
    eot.on_train_end(None, SimpleNamespace(is_world_process_zero=True), None, model=trained)
    torch.testing.assert_close(_q0_delta(read_state(tmp_path / "merged")), _lora_reference(folders), rtol=1e-5,
                               atol=1e-6)


def test_merge_models_uses_the_maps(tmp_path):
    base = tiny_llama(seed=0)
    save_model(base, tmp_path / "base")
    shapes = {n: tuple(p.shape) for n, p in base.state_dict().items() if p.is_floating_point()}
    experts = []
    for k in range(2):
        folder = make_full_expert(base, tmp_path / f"f{k}", seed=k + 1)
        save_sensitivity(_record(shapes, seed=20 + k), folder)
        experts.append(folder)
    merge_models(tmp_path / "base", experts, tmp_path / "out", method="importance", sens=None, device="cpu",
                 progress=False)
    merged, base_state = read_state(tmp_path / "out"), base.state_dict()
    deltas = [read_state(f)[Q0] - base_state[Q0] for f in experts]
    maps = [load_sensitivity(f).element_maps[Q0] for f in experts]
    reference = base_state[Q0] + merge_deltas("importance", deltas, torch.ones(2), importance=maps)
    torch.testing.assert_close(merged[Q0], reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged[Q0], base_state[Q0] + sum(deltas), atol=1e-4)
    # an expert without maps: a MergeError naming it, before anything is written
    save_sensitivity(_record(shapes, seed=30, maps=False), experts[1])
    with pytest.raises(MergeError, match=r"expert 'f1'"):
        merge_models(tmp_path / "base", experts, tmp_path / "out2", method="importance", sens=None, device="cpu",
                     progress=False)
    assert not (tmp_path / "out2").exists()
    assert json.loads((tmp_path / "out" / "merge_config.json").read_text())["config"]["method"] == "importance"
