"""Sens-Merging coefficients: hand computations, invariants, the useful temperature range, serialisation."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sens_peft.coefficients import (
    ALL_GROUPS,
    CoefficientTable,
    compute_coefficients,
    group_score_matrix,
    normalize_scores,
    transfer_scores,
)
from sens_peft.store import SensitivityRecord

# the formula as the paper writes it (unbounded softmax)
PAPER = dict(sens="task+cross", normalization="mean1", tau_normalization="exp_z", max_ratio=None)


def coefficients(*args, **kwargs):
    """compute_coefficients in the paper's reading (sens="task+cross", mean1 / exp_z) unless a test sets otherwise:
    the settings these tests were written for (the library's defaults are MergeConfig's)."""
    return compute_coefficients(*args, **{**PAPER, **kwargs})


def record(scores, groups=None, tensor_names=None, tensor_scores=None):
    scores = torch.as_tensor(scores, dtype=torch.float32)
    groups = groups or [f"layers.{i}" for i in range(len(scores))]
    if tensor_names is None:
        tensor_names = [f"model.{g}.mlp.up_proj.weight" for g in groups]
        tensor_scores = scores
    return SensitivityRecord(groups=list(groups), group_scores=scores, tensor_names=list(tensor_names),
                             tensor_scores=torch.as_tensor(tensor_scores, dtype=torch.float32))


def uniform_transfer(k, off=0.7, diag=1.0):
    a = torch.full((k, k), off)
    a.fill_diagonal_(diag)
    return a


# ---------------------------------------------------------------- c ≡ 1 and reductions


@pytest.mark.parametrize("normalization", ["mean1", "l2", "sum1", "zscore"])
@pytest.mark.parametrize("sens", ["task+cross", "task", "cross", None])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_equal_scores_give_exactly_one(normalization, sens, k):
    profile = [3.0, 1.0, 0.5, 0.25]
    # Raw sensitivities differ 100x between experts (each expert's loss level); the profiles are equal.
    records = [record([s * 10.0**i for s in profile]) for i in range(k)]
    table = coefficients(records, uniform_transfer(k), expert_names=[f"e{i}" for i in range(k)],
                                 sens=sens, normalization=normalization, temperature=0.37)
    assert torch.equal(table.values, torch.ones(k, 4))


def test_single_expert_gives_weight_times_scale():
    table = coefficients([record([1.0, 5.0])], torch.tensor([[0.3]]), expert_names=["only"],
                                 weights=[0.6], scale=0.5, temperature=0.01)
    assert torch.equal(table.values, torch.full((1, 2), 0.3))
    assert torch.equal(table.tau, torch.ones(1))


def test_sens_none_without_inputs_is_plain_method():
    table = coefficients(None, None, expert_names=["a", "b"], sens=None, weights=[1.0, 2.0], scale=0.5)
    assert table.groups == [ALL_GROUPS]
    assert torch.equal(table.for_name("model.layers.3.mlp.down_proj.weight"), torch.tensor([0.5, 1.0]))


# ---------------------------------------------------------------- hand computation


def test_hand_computed_2x3():
    records = [record([1.0, 2.0, 3.0]), record([5.0, 5.0, 5.0])]
    transfer = torch.tensor([[1.0, 0.8], [0.6, 1.0]])
    temperature = 0.5
    table = coefficients(records, transfer, expert_names=["a", "b"], temperature=temperature,
                                 weights=[1.0, 3.0], scale=0.25)
    alpha = [[0.5, 1.0, 1.5], [1.0, 1.0, 1.0]]  # mean1
    # r = [0.8, 0.6] → z = [1, -1] → τ = exp(z) / mean(exp(z))
    m = (math.e + 1 / math.e) / 2
    tau = [math.e / m, (1 / math.e) / m]
    for g in range(3):
        x = [alpha[k][g] * tau[k] / temperature for k in range(2)]
        soft = [math.exp(v) / sum(math.exp(u) for u in x) for v in x]
        expected = [2 * soft[0] * 1.0 * 0.25, 2 * soft[1] * 3.0 * 0.25]
        assert table.values[:, g].tolist() == pytest.approx(expected, rel=1e-6)
    assert table.tau.tolist() == pytest.approx(tau, rel=1e-6)
    assert table.alpha.tolist() == [pytest.approx(row, rel=1e-6) for row in alpha]
    # factors alone have mean 1 per group
    assert torch.allclose(table.factors.mean(dim=0), torch.ones(3))


def test_task_and_cross_modes_hand():
    records = [record([1.0, 3.0]), record([2.0, 2.0])]
    transfer = torch.tensor([[1.0, 0.9], [0.5, 1.0]])
    task = coefficients(records, None, expert_names=["a", "b"], sens="task")
    # α = [[0.5, 1.5], [1, 1]]
    for g, (a0, a1) in enumerate([(0.5, 1.0), (1.5, 1.0)]):
        expected0 = 2 * math.exp(a0) / (math.exp(a0) + math.exp(a1))
        assert float(task.values[0, g]) == pytest.approx(expected0, rel=1e-6)
    cross = coefficients(None, transfer, expert_names=["a", "b"], sens="cross", temperature=2.0)
    m = (math.e + 1 / math.e) / 2
    t0, t1 = math.e / m, (1 / math.e) / m
    expected0 = 2 * math.exp(t0 / 2) / (math.exp(t0 / 2) + math.exp(t1 / 2))
    assert cross.groups == [ALL_GROUPS]
    assert float(cross.for_group("layers.9")[0]) == pytest.approx(expected0, rel=1e-6)


# ---------------------------------------------------------------- normalisation invariants


def test_normalization_invariants():
    s = torch.tensor([0.3, 2.0, 1.1, 7.5, 0.01])
    assert float(normalize_scores(s, "mean1").mean()) == pytest.approx(1.0)
    assert float(normalize_scores(s, "sum1").sum()) == pytest.approx(1.0)
    assert float(normalize_scores(s, "l2").norm()) == pytest.approx(1.0)
    z = normalize_scores(s, "zscore")
    assert (z >= 0).all()
    # zscore without clipping (no value below mean - std) has mean 1 and unit spread
    s2 = torch.tensor([1.0, 1.0, 1.0, 5.0])
    z2 = normalize_scores(s2, "zscore")
    assert float(z2.mean()) == pytest.approx(1.0) and float(z2.std(unbiased=False)) == pytest.approx(1.0)
    for method in ("mean1", "l2", "sum1", "zscore"):
        assert torch.allclose(normalize_scores(s * 137.0, method), normalize_scores(s, method))
    assert torch.equal(normalize_scores(torch.zeros(4), "mean1"), torch.ones(4, dtype=torch.float64))
    assert torch.equal(normalize_scores(torch.zeros(4), "sum1"), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="normalization"):
        normalize_scores(s, "max")


@pytest.mark.parametrize("normalization", ["mean1", "l2", "sum1", "zscore"])
def test_scale_invariance_per_expert(normalization):
    a, b = [1.0, 4.0, 2.0], [3.0, 1.0, 0.5]
    transfer = torch.tensor([[1.0, 0.2, 0.4], [0.3, 1.0, 0.9], [0.5, 0.1, 1.0]])
    c = [2.0, 2.0, 1.0]
    t1 = coefficients([record(a), record(b), record(c)], transfer, expert_names=list("xyz"),
                              normalization=normalization)
    t2 = coefficients([record([v * 100 for v in a]), record([v * 1e-3 for v in b]), record(c)], transfer,
                              expert_names=list("xyz"), normalization=normalization)
    assert torch.allclose(t1.values, t2.values, atol=1e-6)
    assert not torch.allclose(t1.values, torch.ones_like(t1.values), atol=1e-3)


def test_missing_group_gets_neutral_alpha():
    r1 = record([1.0, 2.0, 3.0])
    r2 = record([4.0, 8.0], groups=["layers.0", "layers.2"])
    table = coefficients([r1, r2], None, expert_names=["a", "b"], sens="task")
    assert table.groups == ["layers.0", "layers.1", "layers.2"]
    # expert b: α over its groups = [4, 8] / 6 = [2/3, 4/3]; layers.1 gets the mean, 1
    assert table.alpha[1].tolist() == pytest.approx([2 / 3, 1.0, 4 / 3])


def test_finer_granularity_regroups_tensor_scores():
    names = ["model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.v_proj.lora_B.weight",
             "model.layers.0.mlp.up_proj.lora_A.weight", "model.layers.1.mlp.down_proj.lora_B.weight"]
    rec = record([3.0, 4.0], tensor_names=names, tensor_scores=[1.0, 2.0, 4.0, 4.0])
    groups, raw, present = group_score_matrix([rec], "module_type")
    assert groups == ["layers.0.attn", "layers.0.mlp", "layers.1.mlp"]
    assert raw[0].tolist() == [3.0, 4.0, 4.0] and present.all()
    groups, raw, _ = group_score_matrix([rec], "projection")
    assert groups == ["layers.0.mlp.up_proj", "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                      "layers.1.mlp.down_proj"]
    table = coefficients([rec, rec], None, expert_names=["a", "b"], sens="task", granularity="module_type")
    assert torch.equal(table.for_name("base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"),
                       torch.ones(2))
    with pytest.raises(ValueError, match="negative or non-finite"):
        group_score_matrix([record([1.0, -2.0])])


# ---------------------------------------------------------------- τ


def test_transfer_scores():
    a = torch.tensor([[9.0, 1.0, 2.0], [4.0, 9.0, 4.0], [0.0, 3.0, 9.0]])  # diagonal ignored: r = [1.5, 4, 1.5]
    tau = transfer_scores(a)
    assert float(tau.mean()) == pytest.approx(1.0)
    assert tau[1] > tau[0] == pytest.approx(float(tau[2]))
    assert transfer_scores(a, "sum1").tolist() == pytest.approx([1.5 / 7, 4 / 7, 1.5 / 7])
    assert transfer_scores(a, "mean1").tolist() == pytest.approx([1.5 * 3 / 7, 12 / 7, 1.5 * 3 / 7])
    zs = transfer_scores(a, "zscore")
    assert (zs >= 0).all() and float(zs[1]) > 1
    # unit-free: affine changes of the alignment scale do not change exp_z / zscore
    assert torch.allclose(transfer_scores(a * 50 - 3), tau)
    with pytest.raises(ValueError, match="positive row means"):
        transfer_scores(-a, "sum1")
    with pytest.raises(ValueError, match="square"):
        transfer_scores(torch.zeros(2, 3))


def test_literal_l2_reading_prefers_distant_expert():
    # literal "l2" alignments are distances: the expert farthest from the others gets the largest τ
    dist = torch.tensor([[0.0, 5.0, 6.0], [5.0, 0.0, 1.0], [6.0, 1.0, 0.0]])
    assert int(transfer_scores(dist, "sum1").argmax()) == 0
    assert int(transfer_scores(-dist).argmax()) != 0


# ---------------------------------------------------------------- the useful temperature range


def _realistic(k=3, layers=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(k):
        depth = torch.exp(-0.2 * torch.arange(layers, dtype=torch.float64))  # all experts fall with depth alike
        noise = torch.exp(0.5 * torch.randn(layers, generator=g, dtype=torch.float64))
        records.append(record((depth * noise * 10.0**i).tolist()))  # raw levels differ 100x
    # cosine alignments of fine-tunes of one base: all close to 1, small differences
    transfer = torch.tensor([[1.0, 0.93, 0.90], [0.95, 1.0, 0.94], [0.88, 0.91, 1.0]])
    return records, transfer


@pytest.mark.parametrize("normalization", ["mean1", "zscore"])
def test_temperature_spans_sharp_to_uniform(normalization):
    records, transfer = _realistic()
    names = ["math", "code", "chat"]
    spreads = {}
    for temperature in (0.1, 1.0, 10.0):
        c = coefficients(records, transfer, expert_names=names, temperature=temperature,
                                 normalization=normalization).values
        spreads[temperature] = (float(c.min()), float(c.max()))
    lo, hi = spreads[0.1]
    assert hi > 2.5 and lo < 0.05  # near hard selection of one expert per layer
    lo, hi = spreads[1.0]
    assert hi > 1.5 and lo < 0.5  # clear preferences
    lo, hi = spreads[10.0]
    assert 0.75 < lo and hi < 1.3  # near uniform
    # monotone: the spread shrinks with T
    assert spreads[0.1][1] - spreads[0.1][0] > spreads[1.0][1] - spreads[1.0][0] > spreads[10.0][1] - spreads[10.0][0]


def test_third_party_scale_collapses_as_documented():
    """l2 α with sum1 τ (the third-party reading) barely moves c even at T = 1 (paper notes §6)."""
    records, transfer = _realistic()
    dist = 2.0 - transfer  # positive, distance-like
    c = coefficients(records, dist, expert_names=list("abc"), normalization="l2",
                             tau_normalization="sum1", temperature=1.0).values
    assert float((c - 1).abs().max()) < 0.1


# ---------------------------------------------------------------- weights, scale, lookups


def test_weights_and_scale_multiply():
    records, transfer = _realistic()
    base = coefficients(records, transfer, expert_names=list("abc"))
    scaled = coefficients(records, transfer, expert_names=list("abc"), weights=[0.5, 2.0, -1.0], scale=0.3)
    expected = base.values * torch.tensor([0.5, 2.0, -1.0])[:, None] * 0.3
    assert torch.allclose(scaled.values, expected, atol=1e-6)
    assert torch.equal(scaled.factors, base.factors)
    # groups absent from the table: weights × scale
    assert torch.allclose(scaled.for_group("lm_head"), torch.tensor([0.15, 0.6, -0.3]))
    assert torch.equal(scaled.for_group("layers.2"), scaled.values[:, 2])
    assert torch.equal(scaled.for_name("base_model.model.model.layers.2.mlp.up_proj.lora_B.default.weight"),
                       scaled.values[:, 2])


def test_json_round_trip_and_printing(caplog):
    records, transfer = _realistic()
    with caplog.at_level(logging.INFO, logger="sens_peft.coefficients"):
        table = coefficients(records, transfer, expert_names=["math", "code", "a_long_expert_name"],
                                     weights=[1.0, 0.5, 2.0], scale=0.7, temperature=2.0)
    assert any("c min" in r.message for r in caplog.records)
    again = CoefficientTable.from_json(table.to_json())
    for attr in ("values", "alpha", "tau", "factors"):
        assert torch.equal(getattr(again, attr), getattr(table, attr))
    assert again.experts == table.experts and again.groups == table.groups and again.settings == table.settings
    summary = table.summary()
    assert summary["min"] <= summary["mean"] <= summary["max"]
    assert set(summary["per_expert"]) == {"math", "code", "a_long_expert_name"}
    assert summary["factors"]["mean"] == pytest.approx(1.0, rel=1e-6)
    text = str(table)
    lines = text.splitlines()
    assert "a_long_expert_name" in lines[1] and len(lines) == 2 + len(table.groups) + 1
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width
    assert lines[2].split()[0] == "layers.0"
    assert f"{float(table.values[0, 0]):.4f}" in lines[2]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(records=None, transfer=torch.eye(2), sens="task"), "needs a sensitivity record"),
        (dict(records=[record([1.0]), None], transfer=torch.eye(2), sens="task+cross"), r"missing for \['b'\]"),
        (dict(records=[record([1.0])] * 2, transfer=None, sens="cross"), "needs a transferability"),
        (dict(records=[record([1.0])], transfer=None, sens=None), "1 sensitivity records for 2"),
        (dict(records=None, transfer=torch.eye(3), sens="cross"), r"shape \(3, 3\)"),
        (dict(records=None, transfer=None, sens=None, weights=[1.0]), "1 weights"),
        (dict(records=None, transfer=None, sens=None, temperature=0.0), "temperature"),
        (dict(records=None, transfer=None, sens="both"), "sens="),
        (dict(records=None, transfer=None, sens=None, normalization="x"), "normalization"),
        (dict(records=None, transfer=None, sens=None, granularity="x"), "granularity"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coefficients(expert_names=["a", "b"], **kwargs)


def test_table_shape_checked():
    with pytest.raises(ValueError, match="expected \\(2, 1\\)"):
        CoefficientTable(experts=["a", "b"], groups=["*"], values=torch.ones(1, 2), alpha=None, tau=None,
                         settings={})


def test_max_ratio_bounds_every_group_and_keeps_the_order():
    """The safety bound: the temperature is raised just enough that no group's coefficients differ by more than
    max_ratio, the experts' order in each group is the paper's, and a bound that is not reached changes nothing."""
    from sens_peft.coefficients import safe_temperature

    arg = torch.tensor([[3.0, 0.1], [0.0, 0.0], [1.0, 0.2]], dtype=torch.float64)
    t = safe_temperature(arg, 1.0, 2.0)
    assert t == pytest.approx(3.0 / math.log(2.0))
    c = 3 * torch.softmax(arg / t, dim=0)
    assert float((c.max(0).values / c.min(0).values).max()) == pytest.approx(2.0)
    assert torch.equal(c.argsort(0), arg.argsort(0))
    assert safe_temperature(arg, 10.0, 2.0) == 10.0  # already within the bound
    assert safe_temperature(arg, 1.0, None) == 1.0
    with pytest.raises(ValueError, match="max_ratio"):
        safe_temperature(arg, 1.0, 1.0)


def test_bounded_table_records_the_temperature_used():
    records = [record([10.0, 0.1]), record([0.1, 10.0])]
    table = compute_coefficients(records, None, expert_names=["a", "b"], sens="task", normalization="mean1",
                                 max_ratio=1.5)
    ratio = table.values.max(0).values / table.values.min(0).values
    assert float(ratio.max()) == pytest.approx(1.5, rel=1e-5)
    assert table.settings["temperature_used"] > 1.0 and table.settings["max_ratio"] == 1.5


def test_table_without_sens_term_is_not_called_sens_merging():
    """A merge without Sens-Merging (sens=None) shows the experts' weights under a heading that says so, not a
    Sens-Merging table with a temperature that played no part."""
    from sens_peft.coefficients import CoefficientTable

    data = {"experts": ["a", "b"], "groups": ["*"], "values": [[1.0], [0.5]], "alpha": None, "tau": None,
            "factors": [[1.0], [1.0]], "settings": {"sens": None, "temperature": 1.0, "granularity": "layer",
                                                    "scale": 1.0}}
    text = str(CoefficientTable.from_dict(data))
    assert text.splitlines()[0].startswith("Coefficients per expert and group (sens=None")
    assert "T=" not in text and "0.5000" in text
    data.update(settings={**data["settings"], "sens": "task"}, alpha=[[1.2], [0.8]])
    assert str(CoefficientTable.from_dict(data)).startswith("Sens-Merging coefficients (sens=task, T=1.0")
