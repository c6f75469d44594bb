"""element_maps="auto": per-element |theta * G| maps are kept for small scored sets, dropped above the budget."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData, lora, tiny_llama  # noqa: E402

import sens_peft.config as config_module  # noqa: E402
from sens_peft.config import wants_element_maps  # noqa: E402
from sens_peft.sensitivity.calibrate import compute_sensitivity  # noqa: E402


def test_wants_element_maps():
    assert wants_element_maps("auto", config_module.ELEMENT_MAP_BUDGET)
    assert not wants_element_maps("auto", config_module.ELEMENT_MAP_BUDGET + 1)
    assert wants_element_maps(True, 10**12) and not wants_element_maps(False, 1)


def test_auto_maps_for_lora_theta(monkeypatch):
    model = lora(tiny_llama(seed=0), init_random=True)
    data = TokenData(n=4, length=10, seed=1)
    rec = compute_sensitivity(model, data, calibration_samples=3)
    assert set(rec.element_maps) == set(rec.tensor_names)  # one map per scored base weight
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    emap = rec.element_maps["model.layers.0.self_attn.q_proj.weight"]
    assert emap.shape == q.shape and (emap >= 0).all()
    # the per-tensor score is the sum of the map (both are means over the samples)
    idx = rec.tensor_names.index("model.layers.0.self_attn.q_proj.weight")
    torch.testing.assert_close(emap.double().sum(), rec.tensor_scores[idx].double(), rtol=1e-4, atol=0)

    import sens_peft.sensitivity.calibrate as calibrate

    monkeypatch.setattr(calibrate, "wants_element_maps", lambda setting, numel: setting is True)
    assert compute_sensitivity(model, data, calibration_samples=3).element_maps == {}


def test_ties_auto_trim_is_by_sensitivity_when_maps_exist(tmp_path):
    """TIES with trim_by="auto" (the default of that field) trims by the stored maps when every expert has them.
    (Until the multi-suite benchmark, this was also the default method; MergeConfig() now picks RegMean.)"""
    from safetensors.torch import load_file

    from sens_peft import merge_adapters

    folders = []
    for i in range(2):
        model = lora(tiny_llama(seed=0), init_random=True)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.2)
        folder = tmp_path / f"e{i}"
        model.save_pretrained(folder)
        compute_sensitivity(model, TokenData(n=4, length=10, seed=i), calibration_samples=3, save_to=folder)
        folders.append(folder)

    auto = merge_adapters(tiny_llama(seed=0), folders, method="ties", save_to=tmp_path / "auto", device="cpu")
    assert (auto.config.method, auto.config.trim_by, auto.config.sens) == ("ties", "sensitivity", None)
    assert auto.config.scale == 1.5  # the sensitivity trim's default lambda
    merge_adapters(tiny_llama(seed=0), folders, method="ties", trim_by="sensitivity", save_to=tmp_path / "explicit",
                   device="cpu")
    merge_adapters(tiny_llama(seed=0), folders, method="ties", trim_by="magnitude", save_to=tmp_path / "magnitude",
                   device="cpu")
    a, b, c = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("auto", "explicit", "magnitude"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # the sensitivity trim keeps other entries

    # an expert without element maps: "auto" falls back to the magnitude trim
    (folders[1] / "sensitivity.safetensors").unlink()
    fallback = merge_adapters(tiny_llama(seed=0), folders, method="ties", device="cpu")
    assert fallback.config.trim_by == "magnitude" and fallback.config.scale == 1.0
