"""Property tests (hypothesis) of the merge methods and the coefficients."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sens_peft.coefficients import compute_coefficients, normalize_scores, transfer_scores
from sens_peft.methods import merge_deltas
from sens_peft.store import SensitivityRecord

# the formula as the paper writes it (unbounded softmax)
PAPER = dict(sens="task+cross", normalization="mean1", tau_normalization="exp_z", max_ratio=None)


def coefficients(*args, **kwargs):
    """compute_coefficients in the paper's reading (sens="task+cross", mean1 / exp_z) unless a test sets otherwise:
    the settings these tests were written for (the library's defaults are MergeConfig's)."""
    return compute_coefficients(*args, **{**PAPER, **kwargs})


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False, width=32)
positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def experts(draw, max_k=4, max_n=12):
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))
    deltas = [torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float64) for _ in range(k)]
    coeffs = torch.tensor(draw(st.lists(st.floats(0.05, 3.0), min_size=k, max_size=k)), dtype=torch.float64)
    return deltas, coeffs


# ---------------------------------------------------------------- methods


@SETTINGS
@given(experts(), st.sampled_from(["task_arithmetic", "ties", "importance"]), st.sampled_from([0.3, 0.5, 1.0]),
       st.randoms(use_true_random=False))
def test_permutation_invariance(data, method, density, rnd):
    deltas, c = data
    perm = list(range(len(deltas)))
    rnd.shuffle(perm)
    imp = [d.abs() for d in deltas]
    a = merge_deltas(method, deltas, c, density=density, importance=imp)
    b = merge_deltas(method, [deltas[p] for p in perm], c[perm], density=density, importance=[imp[p] for p in perm])
    # TIES trimming of a tensor does not depend on the others; ties at the trim threshold are per tensor
    assert torch.allclose(a, b, atol=1e-9)


@SETTINGS
@given(experts(), st.floats(-5, 5), st.floats(-5, 5))
def test_task_arithmetic_is_linear(data, a, b):
    deltas, c = data
    other = [d.flip(0) for d in deltas]
    lhs = merge_deltas("task_arithmetic", [a * x + b * y for x, y in zip(deltas, other)], c)
    rhs = a * merge_deltas("task_arithmetic", deltas, c) + b * merge_deltas("task_arithmetic", other, c)
    assert torch.allclose(lhs, rhs, atol=1e-9)
    assert torch.allclose(merge_deltas("task_arithmetic", deltas, c, scale=a),
                          a * merge_deltas("task_arithmetic", deltas, c), atol=1e-9)


@SETTINGS
@given(experts(), st.sampled_from(["ties", "dare_ties"]), st.floats(0.1, 4.0))
def test_ties_unit_coefficients_and_positive_scaling(data, method, s):
    """c ≡ s (equal, positive) gives s × the plain method: the election is unchanged by a common factor."""
    deltas, _ = data
    k = len(deltas)
    plain = merge_deltas(method, deltas, torch.ones(k, dtype=torch.float64), density=0.5, seed=1, name="p")
    scaled = merge_deltas(method, deltas, torch.full((k,), s, dtype=torch.float64), density=0.5, seed=1, name="p")
    assert torch.allclose(scaled, s * plain, atol=1e-9)


@SETTINGS
@given(experts(), st.sampled_from([("dare_linear", "task_arithmetic"), ("dare_ties", "ties")]), st.integers(0, 99))
def test_density_one_dare_is_base(data, pair, seed):
    deltas, c = data
    assert torch.equal(merge_deltas(pair[0], deltas, c, density=1.0, seed=seed), merge_deltas(pair[1], deltas, c))


@SETTINGS
@given(experts(), st.sampled_from(["dare_linear", "dare_ties"]), st.floats(0.1, 0.9), st.integers(0, 2**31))
def test_dare_reproducible(data, method, density, seed):
    deltas, c = data
    a = merge_deltas(method, deltas, c, density=density, seed=seed, name="t")
    torch.rand(3)  # moving the global RNG must not matter
    assert torch.equal(a, merge_deltas(method, deltas, c, density=density, seed=seed, name="t"))


@SETTINGS
@given(experts())
def test_ties_result_within_expert_range(data):
    """The disjoint mean of same-sign entries lies between the smallest and largest scaled entry."""
    deltas, c = data
    out = merge_deltas("ties", deltas, c)
    scaled = torch.stack(deltas) * c[:, None]
    assert (out <= scaled.max(0).values + 1e-9).all() and (out >= scaled.min(0).values - 1e-9).all()


# ---------------------------------------------------------------- coefficients


def _rec(scores):
    groups = [f"layers.{i}" for i in range(len(scores))]
    t = torch.tensor(scores, dtype=torch.float32)
    return SensitivityRecord(groups=groups, group_scores=t, tensor_names=[f"model.{g}.mlp.w.weight" for g in groups],
                             tensor_scores=t)


@st.composite
def coefficient_inputs(draw):
    k = draw(st.integers(1, 4))
    g = draw(st.integers(1, 6))
    scores = [draw(st.lists(positive, min_size=g, max_size=g)) for _ in range(k)]
    transfer = torch.tensor(draw(st.lists(st.lists(st.floats(-1, 1), min_size=k, max_size=k), min_size=k,
                                          max_size=k)))
    return k, scores, transfer


@SETTINGS
@given(coefficient_inputs(), st.sampled_from(["task+cross", "task", "cross", None]),
       st.sampled_from(["mean1", "l2", "sum1", "zscore"]), st.floats(0.05, 20.0))
def test_factors_have_mean_one_and_are_positive(inputs, sens, normalization, temperature):
    k, scores, transfer = inputs
    table = coefficients([_rec(s) for s in scores], transfer, expert_names=[f"e{i}" for i in range(k)],
                                 sens=sens, normalization=normalization, temperature=temperature)
    assert torch.allclose(table.factors.double().mean(0), torch.ones(table.factors.shape[1], dtype=torch.float64),
                          atol=1e-5)
    assert (table.factors >= 0).all() and (table.factors <= k + 1e-5).all()


@SETTINGS
@given(coefficient_inputs(), st.lists(positive, min_size=4, max_size=4), st.sampled_from(["mean1", "l2", "sum1",
                                                                                          "zscore"]))
def test_expert_scale_invariance(inputs, factors, normalization):
    k, scores, transfer = inputs
    names = [f"e{i}" for i in range(k)]
    t1 = coefficients([_rec(s) for s in scores], transfer, expert_names=names, normalization=normalization)
    rescaled = [[v * factors[i] for v in s] for i, s in enumerate(scores)]
    t2 = coefficients([_rec(s) for s in rescaled], transfer, expert_names=names, normalization=normalization)
    assert torch.allclose(t1.values, t2.values, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 6), positive, st.floats(-1, 1), st.floats(0.05, 20.0),
       st.sampled_from(["mean1", "l2", "sum1", "zscore"]))
def test_equal_inputs_give_exactly_one(k, g, level, align, temperature, normalization):
    profile = [level * (1 + i) for i in range(g)]
    transfer = torch.full((k, k), align)
    table = coefficients([_rec([p * 10.0**i for p in profile]) for i in range(k)], transfer,
                                 expert_names=[f"e{i}" for i in range(k)], temperature=temperature,
                                 normalization=normalization)
    assert torch.equal(table.values, torch.ones(k, g))


@SETTINGS
@given(coefficient_inputs(), st.lists(st.floats(-2, 2), min_size=4, max_size=4), st.floats(-3, 3))
def test_weights_and_scale_multiply(inputs, weights, scale):
    k, scores, transfer = inputs
    names = [f"e{i}" for i in range(k)]
    records = [_rec(s) for s in scores]
    base = coefficients(records, transfer, expert_names=names)
    table = coefficients(records, transfer, expert_names=names, weights=weights[:k], scale=scale)
    expected = base.values.double() * torch.tensor(weights[:k], dtype=torch.float64)[:, None] * scale
    assert torch.allclose(table.values.double(), expected, atol=1e-5)


@SETTINGS
@given(st.lists(positive, min_size=1, max_size=10), positive)
def test_normalizations_scale_invariant(scores, factor):
    s = torch.tensor(scores, dtype=torch.float64)
    for method in ("mean1", "l2", "sum1", "zscore"):
        assert torch.allclose(normalize_scores(s * factor, method), normalize_scores(s, method), atol=1e-9)


@SETTINGS
@given(st.integers(1, 5).flatmap(lambda k: st.lists(st.lists(st.floats(-1, 1), min_size=k, max_size=k),
                                                      min_size=k, max_size=k)))
def test_tau_mean_one_and_monotone(rows):
    a = torch.tensor(rows, dtype=torch.float64)
    tau = transfer_scores(a)
    assert float(tau.mean()) == __import__("pytest").approx(1.0)
    k = a.shape[0]
    if k > 1:
        r = (a.sum(1) - a.diagonal()) / (k - 1)
        order = torch.argsort(r)
        assert (tau[order].diff() >= -1e-9).all()  # larger row mean → larger τ


# ---------------------------------------------------------------- added: homogeneity, permutation of coefficients


@SETTINGS
@given(experts(), st.sampled_from(["task_arithmetic", "ties", "dare_linear", "dare_ties"]), st.floats(0.1, 8.0),
       st.integers(0, 999))
def test_positive_homogeneity(data, method, s, seed):
    """Scaling every task vector by s > 0 scales the merge by s: TIES trimming/election and DARE masks (drawn from
    the seed, not the values) do not change."""
    deltas, c = data
    a = merge_deltas(method, [s * d for d in deltas], c, density=0.5, seed=seed, name="h")
    b = s * merge_deltas(method, deltas, c, density=0.5, seed=seed, name="h")
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(experts(), st.sampled_from(["task_arithmetic", "ties", "dare_linear", "dare_ties"]), st.integers(0, 999))
def test_unit_coefficients_are_the_plain_method(data, method, seed):
    """c ≡ 1 (what Sens gives for equal inputs) is the base method with weights 1, bit for bit."""
    deltas, _ = data
    k = len(deltas)
    ones = merge_deltas(method, deltas, torch.ones(k, dtype=torch.float64), density=0.6, seed=seed, name="u")
    if method == "task_arithmetic":
        assert torch.allclose(ones, torch.stack(deltas).sum(0), atol=1e-12)
    assert torch.equal(ones, merge_deltas(method, deltas, torch.ones(k, dtype=torch.float64), density=0.6,
                                          seed=seed, name="u"))


@SETTINGS
@given(coefficient_inputs(), st.sampled_from(["task+cross", "task", "cross", None]), st.randoms(use_true_random=False))
def test_coefficients_permute_with_experts(inputs, sens, rnd):
    """Reordering the experts (records, transfer rows and columns, names) reorders the rows of c, nothing else."""
    k, scores, transfer = inputs
    perm = list(range(k))
    rnd.shuffle(perm)
    names = [f"e{i}" for i in range(k)]
    t1 = coefficients([_rec(s) for s in scores], transfer, expert_names=names, sens=sens)
    p = torch.tensor(perm)
    t2 = coefficients([_rec(scores[i]) for i in perm], transfer[p][:, p], expert_names=[names[i] for i in perm],
                              sens=sens)
    assert t2.experts == [names[i] for i in perm]
    assert torch.allclose(t2.values, t1.values[p], atol=1e-5)


@SETTINGS
@given(coefficient_inputs(), st.sampled_from(["task+cross", "task", "cross"]))
def test_high_temperature_tends_to_plain_method(inputs, sens):
    """T → ∞ flattens the softmax: c → 1 (the plain method)."""
    k, scores, transfer = inputs
    table = coefficients([_rec(s) for s in scores], transfer, expert_names=[f"e{i}" for i in range(k)],
                                 sens=sens, temperature=1e7)
    assert torch.allclose(table.values, torch.ones_like(table.values), atol=1e-4)


@SETTINGS
@given(coefficient_inputs())
def test_no_sens_is_weights_times_scale(inputs):
    k, scores, transfer = inputs
    weights = [0.5 + i for i in range(k)]
    table = coefficients([_rec(s) for s in scores], transfer, expert_names=[f"e{i}" for i in range(k)],
                                 sens=None, weights=weights, scale=0.7)
    expected = (torch.tensor(weights) * 0.7)[:, None].expand_as(table.values)
    assert torch.allclose(table.values, expected.to(table.values.dtype), atol=1e-6)
