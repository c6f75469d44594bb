"""probe_fit: coefficients c[k][group] on a base method's parts, fitted on the experts' probe sets.

The toy: a tiny Llama, a "good" LoRA expert and a "noise" expert (random factors of the same size); both probe
sets are labelled by the good expert's own greedy predictions, so the noise expert's delta can only hurt: the fit
must lower the held-out loss and the noise expert's coefficients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

from sens_peft import merge_adapters
from sens_peft.errors import MergeError
from sens_peft.methods import merge_deltas
from sens_peft.probe_fitting import FitPart, ProbeObjective, fit_coefficients, merged_deltas, split_rows
from sens_peft.store import PROBE_FILE, ProbeSet, save_probe

TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")
NAMES = ("good", "noise")


def _expert(root: Path, name: str, seed: int, scale: float = 0.8):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=list(TARGETS),
                                                    init_lora_weights=False), adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    for param_name, param in model.named_parameters():
        if "lora_" in param_name:
            param.data = torch.randn(param.shape, generator=gen) * scale
    model.save_pretrained(str(root), selected_adapters=[name])
    return model


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    """Two adapter folders with probe sets labelled by the good expert's greedy next tokens."""
    root = tmp_path_factory.mktemp("probe_fit")
    teacher = _expert(root, "good", 1)
    _expert(root, "noise", 2)
    gen = torch.Generator().manual_seed(5)
    for name in NAMES:
        ids = torch.randint(0, 96, (12, 16), generator=gen)
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = logits[:, :-1].argmax(-1)
        save_probe(ProbeSet(ids, torch.ones_like(ids), labels, {"task": name}), root / name)
    return {name: root / name for name in NAMES}


def _merge(experts, **kwargs):
    kwargs.setdefault("device", "cpu")
    return merge_adapters(tiny_llama(), [experts[n] for n in NAMES], progress=False, **kwargs)


def _factors(report) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in report.model.named_parameters() if ".merged." in n}


def _weights(report) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in report.model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# the pure math
# ------------------------------------------------------------------------------------------------------------


def test_split_rows_is_a_seeded_partition():
    fit, held = split_rows(12, 0.25, seed=3)
    assert sorted(fit + held) == list(range(12)) and len(held) == 3 and not set(fit) & set(held)
    assert (fit, held) == split_rows(12, 0.25, seed=3)
    assert split_rows(12, 0.25, seed=4) != (fit, held)
    assert split_rows(2, 0.01, seed=0)[1] and split_rows(2, 0.99, seed=0)[0]  # one row on each side at least
    assert split_rows(1, 0.5, seed=0) == ([0], [0])


def test_merged_deltas_by_hand():
    parts = [FitPart("a", 1, (0, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])), FitPart("b", 0, (1,), torch.ones(1, 3))]
    values = torch.tensor([[10.0, 0.5], [2.0, 7.0], [9.0, -1.0]])
    out = merged_deltas(values, parts)
    assert torch.equal(out["a"], 0.5 * torch.tensor([1.0, 2.0]) - torch.tensor([3.0, 4.0]))
    assert torch.equal(out["b"], torch.full((3,), 2.0))


def test_fit_recovers_a_known_linear_answer():
    """A linear 'model' logits = x·(W0 + c0·P0 + c1·P1) with labels made by c = (1, 0): c1 goes to ~0."""
    gen = torch.Generator().manual_seed(0)
    w0, p0, p1 = (torch.randn(6, 6, generator=gen) for _ in range(3))
    emb = torch.randn(6, 6, generator=gen)

    def logits(deltas, batch):
        return emb[batch["input_ids"]] @ (w0 + deltas["w"])

    ids = torch.randint(0, 6, (16, 8), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = (emb[ids] @ (w0 + p0))[:, :-1].argmax(-1)
    probe = ProbeSet(ids, torch.ones_like(ids), labels)
    parts = [FitPart("w", 0, (0, 1), torch.stack([p0, p1]))]
    objective = ProbeObjective([probe, probe], holdout=0.25, seed=0, device=torch.device("cpu"))
    out = fit_coefficients(torch.ones(2, 1), parts, objective, logits, steps=60, lr=0.1)
    assert out.held_after < out.held_before and out.fit_after < out.fit_before
    assert float(out.values[1, 0]) < 0.5 < float(out.values[0, 0])
    assert out.best_step > 0 and out.steps_run == 60 and len(out.history) == 60
    still = fit_coefficients(torch.ones(2, 1), parts, objective, logits, steps=0, lr=0.1)
    assert torch.equal(still.values, torch.ones(2, 1)) and still.held_after == still.held_before


# ------------------------------------------------------------------------------------------------------------
# merge_adapters
# ------------------------------------------------------------------------------------------------------------


def test_default_start_scale():
    from sens_peft.config import MergeConfig

    assert MergeConfig(method="probe_fit").resolved_scale() == 0.5  # a sum of K deltas starts at λ = 0.5
    assert MergeConfig(method="probe_fit", params={"base_method": "ties"}).resolved_scale() == 1.0  # TIES's own


def test_zero_steps_is_task_arithmetic_exactly(experts):
    fitted = _merge(experts, method="probe_fit", scale=0.7, params={"steps": 0})
    plain = _merge(experts, method="task_arithmetic", scale=0.7)
    a, b = _factors(fitted), _factors(plain)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fitted.coefficients.values.eq(0.7).all()


@pytest.mark.parametrize("base", ["ties", "dare_ties"])
def test_zero_steps_is_its_base_method_exactly(experts, base):
    """Full output (no SVD in between): the merged weights equal the base method's bit for bit."""
    fitted = _merge(experts, method="probe_fit", density=0.5, output="full", params={"steps": 0, "base_method": base})
    plain = _merge(experts, method=base, density=0.5, output="full")
    a, b = _weights(fitted), _weights(plain)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_lowers_held_out_loss_and_the_noise_expert(experts):
    report = _merge(experts, method="probe_fit", scale=1.0, params={"steps": 30, "lr": 0.1})
    fit, table = report.config, report.coefficients
    assert fit.method == "probe_fit"
    assert table.groups == ["layers.0", "layers.1"] and table.experts == list(NAMES)
    good, noise = table.values[0], table.values[1]
    assert (noise < 0.5).all() and (good > noise).all()  # the useless delta is turned down in every layer
    # the merged adapter is exactly Σ_k c[k][layer] s_k B_k A_k (exact factors for a TA base)
    model = report.model
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    want = sum(float(table.values[k, 1]) * layer.get_delta_weight(n) for k, n in enumerate(NAMES))
    torch.testing.assert_close(layer.get_delta_weight("merged"), want, rtol=1e-5, atol=1e-6)


def test_fit_report_and_determinism(experts, tmp_path):
    kwargs = dict(method="probe_fit", scale=1.0, params={"steps": 12, "lr": 0.1, "granularity": "module_type"})
    one = _merge(experts, save_to=tmp_path / "one", **kwargs)
    two = _merge(experts, **kwargs)
    assert torch.equal(one.coefficients.values, two.coefficients.values)
    assert one.coefficients.groups == ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]
    fit = json.loads((tmp_path / "one" / "merge_config.json").read_text())["fit"]
    assert fit["held_out_loss_after"] < fit["held_out_loss_before"]
    assert fit["steps_run"] <= 12 and 0 < fit["best_step"] <= fit["steps_run"]
    assert fit["samples"]["good"] == {"fit": 9, "held_out": 3, "fit_tokens": 135, "held_out_tokens": 45}
    other = _merge(experts, **{**kwargs, "seed": 7})
    assert not torch.equal(one.coefficients.values, other.coefficients.values)  # another split


def test_ties_fit_keeps_the_selection_fixed(experts):
    """The fitted TIES merge is Σ_k c[k][g] · part_k with the parts of the unweighted election."""
    report = _merge(experts, method="probe_fit", density=0.5, output="full", scale=1.0,
                    params={"steps": 10, "lr": 0.1, "base_method": "ties"})
    table = report.coefficients
    assert not torch.equal(table.values, torch.ones_like(table.values))
    from peft import PeftModel

    peft = PeftModel.from_pretrained(tiny_llama(), str(experts["good"]), adapter_name="good")
    peft.load_adapter(str(experts["noise"]), adapter_name="noise")
    name = "model.layers.0.mlp.down_proj"
    layer = peft.base_model.model.get_submodule(name)
    deltas = [layer.get_delta_weight(n).float() for n in NAMES]
    parts = [merge_deltas("ties", deltas, torch.eye(2)[k], density=0.5, weighted_election=False) for k in range(2)]
    want = layer.get_base_layer().weight + sum(float(table.values[k, 0]) * parts[k] for k in range(2))
    torch.testing.assert_close(report.model.get_submodule(name).weight, want, rtol=1e-5, atol=1e-6)


def test_probes_passed_at_merge_time(experts, tmp_path):
    import shutil

    from sens_peft.store import load_probe

    bare = {}
    for name in NAMES:
        bare[name] = tmp_path / name
        shutil.copytree(experts[name], bare[name])
        (bare[name] / PROBE_FILE).unlink()
    probes = [load_probe(experts[n]) for n in NAMES]
    report = merge_adapters(tiny_llama(), [bare[n] for n in NAMES], method="probe_fit", scale=1.0, probes=probes,
                            params={"steps": 3}, device="cpu", progress=False)
    assert report.coefficients.groups == ["layers.0", "layers.1"]
    with pytest.raises(MergeError, match=r"expert 'good'.*probe\.safetensors is missing.*'probe_fit' fits"):
        merge_adapters(tiny_llama(), [bare[n] for n in NAMES], method="probe_fit", device="cpu", progress=False)


def test_card_and_inspect_show_the_fit(experts, tmp_path, capsys):
    from sens_peft.cli import main

    out = tmp_path / "merged"
    _merge(experts, method="probe_fit", scale=1.0, params={"steps": 8, "lr": 0.1}, save_to=out)
    card = (out / "README.md").read_text()
    record = json.loads((out / "merge_config.json").read_text())
    fit = record["fit"]
    assert f"held-out loss {fit['held_out_loss_before']:.4f} -> {fit['held_out_loss_after']:.4f}" in card
    assert f"{fit['steps_run']} of 8 run" in card and f"step {fit['best_step']} kept" in card
    assert "good: 9 / 3 rows, 135 / 45 tokens" in card
    assert "Coefficients fitted by probe_fit (granularity=layer" in card
    assert "DARE masks" not in card  # a TA base draws no masks
    value = record["coefficients"]["values"][1][0]  # noise, layers.0
    assert f"{value:.4f}" in card
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "method: probe_fit" in shown and f"{fit['held_out_loss_after']:.4f}" in shown and f"{value:.4f}" in shown


def test_card_names_the_mask_generator_only_for_a_dare_base():
    from sens_peft.card import _dare_note

    assert _dare_note({"method": "probe_fit", "dare_rng": "counter", "params": {}}) == ""
    assert _dare_note({"method": "probe_fit", "dare_rng": "counter", "params": {"base_method": "ties"}}) == ""
    assert "counter" in _dare_note({"method": "probe_fit", "dare_rng": "counter",
                                    "params": {"base_method": "dare_ties"}})
    assert "counter" in _dare_note({"method": "dare_ties", "dare_rng": "counter"})
    assert "counter" in _dare_note({"method": "della", "dare_rng": "counter"})  # DELLA draws its own masks
    assert _dare_note({"method": "ties", "dare_rng": "counter"}) == ""


# ------------------------------------------------------------------------------------------------------------
# merge_models (full experts, in memory)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_experts(experts, tmp_path_factory) -> dict[str, Path]:
    """The two LoRA experts merged into full models, with their probe sets, and the base model."""
    import shutil

    from helpers import save_model
    from peft import PeftModel

    root = tmp_path_factory.mktemp("probe_fit_full")
    out = {"base": save_model(tiny_llama(), root / "base")}
    for name in NAMES:
        model = PeftModel.from_pretrained(tiny_llama(), str(experts[name])).merge_and_unload()
        out[name] = save_model(model, root / name)
        shutil.copy(experts[name] / PROBE_FILE, out[name] / PROBE_FILE)
    return out


def test_full_models_zero_steps_and_fit(full_experts, tmp_path):
    from helpers import read_state

    from sens_peft import merge_models

    experts = [full_experts[n] for n in NAMES]
    merge_models(full_experts["base"], experts, tmp_path / "ta", method="task_arithmetic", scale=0.6, device="cpu")
    merge_models(full_experts["base"], experts, tmp_path / "zero", method="probe_fit", scale=0.6,
                 params={"steps": 0}, device="cpu")
    a, b = read_state(tmp_path / "ta"), read_state(tmp_path / "zero")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = merge_models(full_experts["base"], experts, tmp_path / "fit", method="probe_fit", scale=1.0,
                          params={"steps": 20, "lr": 0.1}, device="cpu")
    table = report.coefficients
    assert table.groups == ["layers.0", "layers.1"]  # only the adapted blocks differ from the base
    assert (table.values[1] < 0.5).all() and (table.values[0] > table.values[1]).all()
    fit = json.loads((tmp_path / "fit" / "merge_config.json").read_text())["fit"]
    assert fit["held_out_loss_after"] < fit["held_out_loss_before"]
    merged, base = read_state(tmp_path / "fit"), read_state(full_experts["base"])
    name = "model.layers.1.self_attn.q_proj.weight"
    want = base[name] + sum(float(table.values[k, 1]) * (read_state(full_experts[n])[name] - base[name])
                            for k, n in enumerate(NAMES))
    torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6)
    (full_experts["noise"] / PROBE_FILE).rename(tmp_path / "moved.safetensors")
    try:
        with pytest.raises(MergeError, match=r"expert 'noise'.*probe\.safetensors is missing"):
            merge_models(full_experts["base"], experts, tmp_path / "none", method="probe_fit", device="cpu")
    finally:
        (tmp_path / "moved.safetensors").rename(full_experts["noise"] / PROBE_FILE)


# ------------------------------------------------------------------------------------------------------------
# the quality benchmark's entry
# ------------------------------------------------------------------------------------------------------------


def test_benchmark_entry_matches_merge_adapters_and_its_control_shuffles_answers(experts):
    import sys

    from peft import PeftModel

    from sens_peft.store import load_probe

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality_lib as ql

    peft = PeftModel.from_pretrained(tiny_llama(), str(experts["good"]), adapter_name="good")
    peft.load_adapter(str(experts["noise"]), adapter_name="noise")
    probes = [load_probe(experts[n]) for n in NAMES]
    cell = ql.Cell("maps", "B", "lora", 0, list(NAMES), tiny_llama(), ql.lib_lora_deltas(peft, NAMES), [], {}, peft)
    cell._stats[("probes", "all")] = probes
    merged, spread = ql.merge_probe_fit({"method": "probe_fit", "lam": 1.0, "steps": 5, "lr": 0.1}, cell)
    report = merge_adapters(peft, list(NAMES), method="probe_fit", scale=1.0, params={"steps": 5, "lr": 0.1},
                            output="full", probes=probes, device="cpu", progress=False)
    assert spread["c_min"] < 1.0 < spread["c_max"]
    params, w0 = dict(report.model.named_parameters()), dict(tiny_llama().named_parameters())
    for name, delta in merged.items():
        torch.testing.assert_close(params[name], w0[name] + delta, atol=1e-5, rtol=1e-5)
    # the benchmark's control: the same fitted values, permuted over (expert, group)
    permuted, spread_p = ql.merge_probe_fit_permuted({"method": "probe_fit", "lam": 1.0, "steps": 5, "lr": 0.1}, cell)
    assert spread_p == spread and any(not torch.allclose(permuted[n], merged[n]) for n in merged)
    control = ql._shuffle_probe_answers(probes, seed=3)
    for probe, shuffled in zip(probes, control):  # same prompts, answers moved between rows
        scored = probe.labels != -100
        assert torch.equal(probe.input_ids[~scored], shuffled.input_ids[~scored])
        assert torch.equal(shuffled.labels[scored], shuffled.input_ids[scored])
    pooled = torch.cat([p.labels[p.labels != -100].view(len(p), -1) for p in probes])
    moved = torch.cat([p.labels[p.labels != -100].view(len(p), -1) for p in control])
    assert sorted(map(tuple, pooled.tolist())) == sorted(map(tuple, moved.tolist())) and not torch.equal(pooled, moved)
