"""RegMean and Fisher as registered methods: the dense hook against float64 references, and every entry point
(merge_adapters to LoRA and full weights, merge_models) against the same references built from the experts'
captured sidecars."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import make_full_expert, make_lora_adapter, save_model, tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from sens_toys import TokenData  # noqa: E402

from sens_peft import compute_sensitivity, merge_adapters, merge_models  # noqa: E402
from sens_peft.errors import MergeError  # noqa: E402
from sens_peft.methods import available_methods, merge_deltas  # noqa: E402
from sens_peft.store import load_sensitivity  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj.weight"


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(3 * n, n, generator=gen, dtype=torch.float64)
    return x.T @ x / (3 * n)


def _regmean_reference(deltas, grams, coeffs, shrink: float = 1.0) -> torch.Tensor:
    shrunk = [shrink * g + (1 - shrink) * torch.diag(torch.diagonal(g)) for g in grams]
    rhs = sum(c * d.double() @ g for c, d, g in zip(coeffs, deltas, shrunk))
    return rhs @ torch.linalg.inv(sum(shrunk))


def test_registered():
    assert {"regmean", "fisher"} <= set(available_methods())


@pytest.mark.parametrize("shrink", [1.0, 0.5])
def test_regmean_dense_hook_matches_float64(shrink):
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    grams = [_spd(7, gen) for _ in range(3)]
    coeffs = [0.5, 1.0, 2.0]
    merged = merge_deltas("regmean", deltas, torch.tensor(coeffs), statistics={"gram": grams},
                          shrinkage=shrink)
    torch.testing.assert_close(merged.double(), _regmean_reference(deltas, grams, coeffs, shrink), rtol=1e-4,
                               atol=1e-5)


def test_regmean_with_equal_grams_or_none_is_the_average():
    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    gram = _spd(6, gen)
    average = sum(deltas) / 3
    equal = merge_deltas("regmean", deltas, torch.ones(3), statistics={"gram": [gram] * 3})
    torch.testing.assert_close(equal, average, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merge_deltas("regmean", deltas, torch.ones(3)), average)


def test_fisher_dense_hook():
    gen = torch.Generator().manual_seed(2)
    deltas = [torch.randn(4, 6, generator=gen) for _ in range(2)]
    fishers = [torch.rand(4, 6, generator=gen) for _ in range(2)]
    coeffs = torch.tensor([1.0, 3.0])
    merged = merge_deltas("fisher", deltas, coeffs, statistics={"fisher": fishers})
    reference = (fishers[0] * deltas[0] + 3 * fishers[1] * deltas[1]) / (fishers[0] + fishers[1])
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-6)
    # equal Fisher: the coefficient-weighted average, i.e. task arithmetic with λ/K
    same = merge_deltas("fisher", deltas, coeffs, statistics={"fisher": [fishers[0]] * 2})
    torch.testing.assert_close(same, merge_deltas("task_arithmetic", deltas, coeffs, scale=0.5), rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------- entry points


@pytest.fixture(scope="module")
def lora_experts(tmp_path_factory):
    """Two LoRA experts on q/v with sidecars captured by compute_sensitivity (full Grams + Fisher)."""
    root = tmp_path_factory.mktemp("regmean_lora")
    folders = []
    for k in range(2):
        folder = make_lora_adapter(tiny_llama, root / f"e{k}", seed=k + 1)
        compute_sensitivity(str(folder), TokenData(n=6, length=9, seed=30 + k), base_model=tiny_llama(seed=0),
                            save_to=folder, calibration_samples=6, gram="full", fisher=True, store_probe=False)
        folders.append(folder)
    return folders


def _lora_deltas(folders, name: str = Q0) -> list[torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(seed=0), str(folders[0]), adapter_name="e0")
    for k, folder in enumerate(folders[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"e{k}")
    module = dict(model.base_model.model.named_modules())[name.removesuffix(".weight")]
    return [module.get_delta_weight(f"e{k}").detach() for k in range(len(folders))]


def _mean_grams(folders, name: str = Q0) -> list[torch.Tensor]:
    records = [load_sensitivity(f) for f in folders]
    return [r.statistic("gram", name).double() / r.statistic_count("gram", name) for r in records]


@pytest.mark.parametrize("output", ["lora", "full"])
def test_merge_adapters_regmean(lora_experts, output):
    report = merge_adapters(tiny_llama(seed=0), lora_experts, method="regmean", output=output, sens=None,
                            device="cpu", progress=False)
    reference = _regmean_reference(_lora_deltas(lora_experts), _mean_grams(lora_experts), [1.0, 1.0], 0.99)
    if output == "full":
        merged = report.model.state_dict()[Q0] - tiny_llama(seed=0).state_dict()[Q0]
    else:
        module = dict(report.model.base_model.model.named_modules())[Q0.removesuffix(".weight")]
        merged = module.get_delta_weight(report.adapter_name)
        assert report.details["rank"] == 8  # exact factors: the sum of the experts' ranks
    torch.testing.assert_close(merged.double(), reference, rtol=1e-4, atol=1e-6)
    average = sum(_lora_deltas(lora_experts)) / 2
    assert not torch.allclose(merged, average, atol=1e-4)  # the Grams matter here


def test_merge_adapters_fisher(lora_experts):
    report = merge_adapters(tiny_llama(seed=0), lora_experts, method="fisher", output="full", sens=None,
                            device="cpu", progress=False)
    deltas = _lora_deltas(lora_experts)
    fishers = [load_sensitivity(f).statistic("fisher", Q0) for f in lora_experts]
    reference = (fishers[0] * deltas[0] + fishers[1] * deltas[1]) / (fishers[0] + fishers[1])
    merged = report.model.state_dict()[Q0] - tiny_llama(seed=0).state_dict()[Q0]
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-6)


def test_regmean_without_grams_is_refused(tmp_path):
    folders = []
    for k in range(2):
        folder = make_lora_adapter(tiny_llama, tmp_path / f"e{k}", seed=k + 1)
        compute_sensitivity(str(folder), TokenData(n=4, length=8, seed=k), base_model=tiny_llama(seed=0),
                            save_to=folder, calibration_samples=4, gram="none", fisher=False, store_probe=False)
        folders.append(folder)
    with pytest.raises(MergeError, match=r"regmean.*'gram'.*gram="):
        merge_adapters(tiny_llama(seed=0), folders, method="regmean", sens=None, device="cpu", progress=False)


def _full_experts(tmp_path, rows: int, data_seed: int, store_probe: bool):
    """A saved tiny base and two full experts of it with Grams captured on ``rows`` calibration rows."""
    from transformers import AutoModelForCausalLM

    base_model = tiny_llama(seed=0)
    base = save_model(base_model, tmp_path / "base")
    experts = []
    for k in range(2):
        folder = make_full_expert(base_model, tmp_path / f"x{k}", seed=k + 1)
        expert = AutoModelForCausalLM.from_pretrained(str(folder))
        compute_sensitivity(expert, TokenData(n=rows, length=9, seed=data_seed + k), save_to=folder,
                            calibration_samples=rows, gram="full", fisher=False, store_probe=store_probe)
        experts.append(folder)
    return base_model, base, experts


def test_merge_models_regmean(tmp_path):
    base_model, base, experts = _full_experts(tmp_path, rows=5, data_seed=40, store_probe=False)
    merge_models(base, experts, tmp_path / "out", method="regmean", sens=None, device="cpu", progress=False)
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base_state = base_model.state_dict()
    states = [load_file(str(f / "model.safetensors")) for f in experts]
    deltas = [s[Q0] - base_state[Q0] for s in states]
    reference = base_state[Q0].double() + _regmean_reference(deltas, _mean_grams(experts), [1.0, 1.0], 0.99)
    torch.testing.assert_close(out[Q0].double(), reference, rtol=1e-4, atol=1e-6)
    # a tensor no Linear reads (the embedding) is averaged
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(out[emb], (states[0][emb] + states[1][emb]) / 2, rtol=1e-5, atol=1e-6)


def test_default_without_probes_is_regmean_else_task_arithmetic(lora_experts, tmp_path, caplog):
    """MergeConfig() with Grams but no probe sets: RegMean (the best merge that does not run the model), with a
    warning naming what the preferred probe-fitted RegMean lacked; without Grams either: TA."""
    import logging

    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        report = merge_adapters(tiny_llama(seed=0), lora_experts, output="full", device="cpu", progress=False)
    assert report.config.method == "regmean" and report.config.method_params()["shrinkage"] == 0.99
    assert any("merging with regmean, not the default probe_fit (base_method='regmean')" in r.getMessage()
               and "probe sets" in r.getMessage() for r in caplog.records)
    reference = _regmean_reference(_lora_deltas(lora_experts), _mean_grams(lora_experts), [1.0, 1.0], 0.99)
    merged = report.model.state_dict()[Q0] - tiny_llama(seed=0).state_dict()[Q0]
    torch.testing.assert_close(merged.double(), reference, rtol=1e-4, atol=1e-6)
    plain = [make_lora_adapter(tiny_llama, tmp_path / f"p{k}", seed=k + 1) for k in range(2)]  # no sidecars
    report = merge_adapters(tiny_llama(seed=0), plain, output="full", device="cpu", progress=False)
    assert report.config.method == "task_arithmetic"
    merged = report.model.state_dict()[Q0] - tiny_llama(seed=0).state_dict()[Q0]
    torch.testing.assert_close(merged, sum(_lora_deltas(plain)), rtol=1e-5, atol=1e-6)


def test_regmean_refuses_conv1d_lora(tmp_path):
    """GPT-2's Conv1D weights are [in, out]: RegMean's [in, in] Grams would be applied the wrong way round."""
    from helpers import tiny_gpt2

    folders = []
    for k in range(2):
        folder = make_lora_adapter(tiny_gpt2, tmp_path / f"g{k}", seed=k + 1, target_modules=("c_attn",),
                                   fan_in_fan_out=True)
        compute_sensitivity(str(folder), TokenData(n=4, length=8, seed=k), base_model=tiny_gpt2(), save_to=folder,
                            calibration_samples=4, gram="full", fisher=False, store_probe=False)
        folders.append(folder)
    with pytest.raises(MergeError, match="Conv1D"):
        merge_adapters(tiny_gpt2(), folders, method="regmean", sens=None, device="cpu", progress=False)
    # the default does not pick RegMean there: task arithmetic, with a warning
    report = merge_adapters(tiny_gpt2(), folders, sens=None, device="cpu", progress=False)
    assert report.config.method == "task_arithmetic"


def test_factorization_ignored_for_exact_factors_warns(lora_experts, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        merge_adapters(tiny_llama(seed=0), lora_experts, method="task_arithmetic", factorization="exact",
                       sens=None, device="cpu", progress=False)
    assert any("factorization='exact' is ignored" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- probe_fit on RegMean


def test_probe_fit_regmean_base_is_linear_in_the_coefficients():
    """RegMean weights the deltas, not the Grams: the merge is Σ_k c_k part_k with part_k = ΔW_k G_k (Σ G)⁻¹, which
    is what probe_fit needs; with c ≡ 1 it is RegMean itself (float64 reference)."""
    gen = torch.Generator().manual_seed(3)
    deltas = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    grams = [_spd(7, gen) for _ in range(3)]
    coeffs = [0.5, 1.0, 2.0]
    kw = dict(statistics={"gram": grams}, base_method="regmean", shrinkage=0.9)
    merged = merge_deltas("probe_fit", deltas, torch.tensor(coeffs), **kw)
    torch.testing.assert_close(merged.double(), _regmean_reference(deltas, grams, coeffs, 0.9), rtol=1e-4,
                               atol=1e-5)
    parts = [merge_deltas("probe_fit", deltas, torch.eye(3)[k], **kw) for k in range(3)]
    total = torch.stack(grams).sum(0) * 0.9 + 0.1 * torch.diag(torch.diagonal(torch.stack(grams).sum(0)))
    shrunk = 0.9 * grams[1] + 0.1 * torch.diag(torch.diagonal(grams[1]))
    torch.testing.assert_close(parts[1].double(), deltas[1].double() @ shrunk @ torch.linalg.inv(total), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(sum(c * p for c, p in zip(coeffs, parts)), merged, rtol=1e-4, atol=1e-5)


def test_probe_fit_shrinkage_needs_the_regmean_base():
    from sens_peft.config import MergeConfig

    with pytest.raises(ValueError, match="base_method='regmean' only"):
        MergeConfig(method="probe_fit", params={"shrinkage": 0.5})
    assert MergeConfig(method="probe_fit", params={"base_method": "regmean", "shrinkage": 0.5}).params == {
        "base_method": "regmean", "shrinkage": 0.5}
    # RegMean averages: the fit starts from c ≡ 1, RegMean itself
    assert MergeConfig(method="probe_fit", params={"base_method": "regmean"}).resolved_scale() == 1.0


@pytest.fixture(scope="module")
def lora_experts_with_probes(tmp_path_factory):
    """As ``lora_experts`` with probe sets, and 8 calibration rows: with 6, the held-out loss did not improve in
    15 steps (the fit kept c ≡ 1) and the test could not see the coefficients move."""
    root = tmp_path_factory.mktemp("regmean_probe_fit")
    folders = []
    for k in range(2):
        folder = make_lora_adapter(tiny_llama, root / f"e{k}", seed=k + 1)
        compute_sensitivity(str(folder), TokenData(n=8, length=9, seed=40 + k), base_model=tiny_llama(seed=0),
                            save_to=folder, calibration_samples=8, gram="full")
        folders.append(folder)
    return folders


def test_merge_adapters_probe_fit_on_regmean(lora_experts_with_probes, tmp_path):
    import json

    folders = lora_experts_with_probes
    kw = dict(output="full", sens=None, device="cpu", progress=False)
    plain = merge_adapters(tiny_llama(seed=0), folders, method="regmean", **kw)
    still = merge_adapters(tiny_llama(seed=0), folders, method="probe_fit",
                           params={"base_method": "regmean", "steps": 0}, **kw)
    a, b = plain.model.state_dict(), still.model.state_dict()
    torch.testing.assert_close(a[Q0], b[Q0], rtol=1e-5, atol=1e-6)  # no steps: RegMean itself
    assert still.coefficients.values.eq(1.0).all()
    fitted = merge_adapters(tiny_llama(seed=0), folders, method="probe_fit", save_to=tmp_path / "fitted",
                            params={"base_method": "regmean", "steps": 15, "lr": 0.1}, **kw)
    fit = json.loads((tmp_path / "fitted" / "merge_config.json").read_text())["fit"]
    assert fit["base_method"] == "regmean"
    assert fit["held_out_loss_after"] <= fit["held_out_loss_before"]
    assert fit["best_step"] > 0 and not fitted.coefficients.values.eq(1.0).all()  # the fit moved c
    # the merged weight is Σ_k c[k][layer 0] · part_k, the parts being RegMean's shares of the experts
    deltas, grams = _lora_deltas(folders), _mean_grams(folders)
    parts = [_regmean_reference(deltas, grams, [float(k == j) for j in range(2)], 0.99) for k in range(2)]
    values = fitted.coefficients.values
    want = sum(float(values[k, 0]) * parts[k] for k in range(2))
    got = fitted.model.state_dict()[Q0] - tiny_llama(seed=0).state_dict()[Q0]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_merge_models_probe_fit_on_regmean(tmp_path):
    """Full experts, streamed: probe_fit on RegMean takes the dense path (RegMean has no chunked hook); no steps
    is RegMean itself, and a fit writes Σ_k c[k][layer] · part_k."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_model = tiny_llama(seed=0)
    base = save_model(base_model, tmp_path / "base")
    experts = []
    for k in range(2):
        folder = make_full_expert(base_model, tmp_path / f"x{k}", seed=k + 1)
        compute_sensitivity(AutoModelForCausalLM.from_pretrained(str(folder)), TokenData(n=8, length=9, seed=50 + k),
                            save_to=folder, calibration_samples=8, gram="full")
        experts.append(folder)
    kw = dict(method="probe_fit", sens=None, device="cpu", progress=False)
    merge_models(base, experts, tmp_path / "plain", method="regmean", sens=None, device="cpu", progress=False)
    merge_models(base, experts, tmp_path / "still", params={"base_method": "regmean", "steps": 0}, **kw)
    plain, still = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "still"))
    assert plain.keys() == still.keys() and all(torch.equal(plain[k], still[k]) for k in plain)
    merge_models(base, experts, tmp_path / "fit", params={"base_method": "regmean", "steps": 10, "lr": 0.1}, **kw)
    record = json.loads((tmp_path / "fit" / "merge_config.json").read_text())
    assert record["fit"]["held_out_loss_after"] <= record["fit"]["held_out_loss_before"]
    # (random experts and random-token probes: the held-out loss may keep the start, c ≡ 1)
    values = record["coefficients"]["values"]
    assert record["coefficients"]["groups"][1] == "layers.0"
    out = load_file(str(tmp_path / "fit" / "model.safetensors"))
    base_state = base_model.state_dict()
    deltas = [load_file(str(f / "model.safetensors"))[Q0] - base_state[Q0] for f in experts]
    parts = [_regmean_reference(deltas, _mean_grams(experts), [float(k == j) for j in range(2)], 0.99)
             for k in range(2)]
    want = base_state[Q0].double() + sum(float(values[k][1]) * parts[k] for k in range(2))
    torch.testing.assert_close(out[Q0].double(), want, rtol=1e-4, atol=1e-5)


def test_default_with_grams_and_probes_is_probe_fitted_regmean(lora_experts_with_probes, caplog):
    """MergeConfig() where every expert has Grams and a probe set: probe_fit on RegMean with its declared
    defaults, the same merge as asking for it by name (the benchmark's choice, benchmarks/README.md)."""
    import logging

    folders = lora_experts_with_probes
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        default = merge_adapters(tiny_llama(seed=0), folders, output="full", device="cpu", progress=False)
    assert not any("method=None" in r.getMessage() for r in caplog.records)  # no fallback to report
    assert default.config.method == "probe_fit" and default.config.params["base_method"] == "regmean"
    assert default.config.method_params()["steps"] == 30 and default.config.scale == 1.0
    named = merge_adapters(tiny_llama(seed=0), folders, output="full", method="probe_fit",
                           params={"base_method": "regmean"}, device="cpu", progress=False)
    assert torch.equal(default.coefficients.values, named.coefficients.values)
    assert torch.equal(default.model.state_dict()[Q0], named.model.state_dict()[Q0])


def test_merge_models_default_fits_on_probes_within_the_memory_limit(tmp_path, monkeypatch, caplog):
    """merge_models with method=None: probe-fitted RegMean when the in-memory fit fits, else RegMean with a
    warning that says why (the limit, not a silent change)."""
    import logging

    from sens_peft.merging import fitting

    _, base, experts = _full_experts(tmp_path, rows=8, data_seed=50, store_probe=True)
    kw = dict(device="cpu", progress=False)
    fitted = merge_models(base, experts, tmp_path / "default", **kw)
    assert fitted.config.method == "probe_fit" and fitted.config.params["base_method"] == "regmean"
    named = merge_models(base, experts, tmp_path / "named", method="probe_fit", params={"base_method": "regmean"},
                         **kw)
    assert torch.equal(fitted.coefficients.values, named.coefficients.values)
    monkeypatch.setattr(fitting, "MAX_FULL_FIT_BYTES", 1024)
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        fallback = merge_models(base, experts, tmp_path / "fallback", **kw)
    assert fallback.config.method == "regmean"
    messages = [r.getMessage() for r in caplog.records]
    assert any("probe sets, but the fit would hold" in m and "limit" in m for m in messages), messages
    from safetensors.torch import load_file

    plain = merge_models(base, experts, tmp_path / "plain", method="regmean", sens=None, **kw)
    assert plain.config.method == "regmean"
    a = load_file(str(tmp_path / "fallback" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_merge_adapters_default_falls_back_above_the_fit_limit(lora_experts_with_probes, monkeypatch, caplog):
    """The default's fit materialises one fp32 delta per expert and adapted module: above the limit it merges
    with RegMean instead and says so (the same merge as RegMean by name)."""
    import logging

    from sens_peft.merging import fitting

    monkeypatch.setattr(fitting, "MAX_FULL_FIT_BYTES", 1024)
    kw = dict(output="full", device="cpu", progress=False)
    with caplog.at_level(logging.WARNING, logger="sens_peft"):
        default = merge_adapters(tiny_llama(seed=0), lora_experts_with_probes, **kw)
    assert default.config.method == "regmean"
    messages = [r.getMessage() for r in caplog.records]
    assert any("one fp32 delta per expert and adapted module" in m and "limit" in m for m in messages), messages
    named = merge_adapters(tiny_llama(seed=0), lora_experts_with_probes, method="regmean", **kw)
    assert torch.equal(default.model.state_dict()[Q0], named.model.state_dict()[Q0])
