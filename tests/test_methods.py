"""Merge methods: hand computations, equality with PEFT's merge_utils, reproducibility."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from sens_peft.methods import (
    MergeMethod,
    available_methods,
    dare_keep_mask,
    dare_mask,
    get_method,
    merge_deltas,
    register_method,
    stable_seed,
)

T = torch.tensor


def _deltas(k=3, shape=(6, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]


# ---------------------------------------------------------------- registry


def test_registry_lists_builtin_methods():
    assert {"task_arithmetic", "ties", "dare_linear", "dare_ties", "importance"} <= set(available_methods())
    assert get_method("ties").name == "ties"
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        get_method("nope")


def test_register_custom_method():
    @register_method("first_only_test")
    class FirstOnly(MergeMethod):
        def combine(self, stacked, coefficients, **_):
            return stacked[0] * coefficients[0]

    assert "first_only_test" in available_methods()
    out = merge_deltas("first_only_test", [T([1.0, 2.0]), T([5.0, 5.0])], T([2.0, 1.0]), scale=0.5)
    assert torch.equal(out, T([1.0, 2.0]))
    with pytest.raises(TypeError):
        register_method(int)


# ---------------------------------------------------------------- hand computations


def test_task_arithmetic_hand():
    d1, d2 = T([1.0, -2.0, 3.0]), T([0.5, 0.5, -1.0])
    out = merge_deltas("task_arithmetic", [d1, d2], T([2.0, -1.0]), scale=0.5)
    assert torch.allclose(out, T([0.75, -2.25, 3.5]))


def test_ties_hand_total():
    d1 = T([4.0, -1.0, 0.5, -3.0])
    d2 = T([-2.0, 2.0, 1.0, -0.1])
    # density 0.5 → keep 2 of 4 per tensor: d1 keeps 4, -3; d2 keeps -2, 2
    # c = [1, 3] → scaled: e1 = [4, 0, 0, -3]; e2 = [-6, 6, 0, 0]
    # total sign: [-2 → -, 6 → +, 0 → +, -3 → -]
    # disjoint mean: [-6, 6, 0, -3]
    out = merge_deltas("ties", [d1, d2], T([1.0, 3.0]), density=0.5)
    assert torch.equal(out, T([-6.0, 6.0, 0.0, -3.0]))
    # PEFT-style election on unscaled trimmed deltas: sign [4-2=2 → +, +, +, -] → [4, 6, 0, -3]
    out = merge_deltas("ties", [d1, d2], T([1.0, 3.0]), density=0.5, weighted_election=False)
    assert torch.equal(out, T([4.0, 6.0, 0.0, -3.0]))


def test_ties_hand_frequency_and_mean():
    d = [T([1.0, -1.0]), T([2.0, -5.0]), T([-10.0, 1.0])]
    # frequency: entry 0 → two +, one - → +: mean(1, 2) = 1.5; entry 1 → two -: mean(-1, -5) = -3
    out = merge_deltas("ties", d, T([1.0, 1.0, 1.0]), majority_sign_method="frequency")
    assert torch.equal(out, T([1.5, -3.0]))
    # total: entry 0 sum -7 → -: -10; entry 1 sum -5 → -: -3
    out = merge_deltas("ties", d, T([1.0, 1.0, 1.0]), majority_sign_method="total", scale=2.0)
    assert torch.equal(out, T([-20.0, -6.0]))


def test_ties_trim_by_sensitivity():
    d1 = T([4.0, -1.0, 0.5, -3.0])
    d2 = T([1.0, 2.0, 1.0, 1.0])
    imp = [T([0.0, 3.0, 1.0, 0.0]), T([0.0, 0.0, 0.0, 1.0])]
    # density 0.25 → one entry each, chosen by importance, not |delta|: d1 keeps entry 1 (-1), d2 entry 3 (1)
    out = merge_deltas("ties", [d1, d2], T([1.0, 1.0]), density=0.25, importance=imp, trim_by="sensitivity")
    assert torch.equal(out, T([0.0, -1.0, 0.0, 1.0]))
    # by magnitude instead: d1 keeps 4, d2 keeps 2 (entry 1)
    out = merge_deltas("ties", [d1, d2], T([1.0, 1.0]), density=0.25, importance=imp)
    assert torch.equal(out, T([4.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="needs importance"):
        merge_deltas("ties", [d1, d2], T([1.0, 1.0]), density=0.5, trim_by="sensitivity")


@pytest.mark.parametrize("rng", ["counter", "torch"])
def test_dare_hand_with_known_mask(rng):
    deltas = _deltas(2, (4, 4), seed=3)
    density, seed, name = 0.6, 11, "model.layers.0.mlp.up_proj.weight"
    if rng == "torch":
        gen = torch.Generator().manual_seed(stable_seed(seed, name))
        masks = [dare_mask((4, 4), density, gen) for _ in range(2)]
    else:
        masks = [dare_keep_mask((4, 4), density, seed, name, k) for k in range(2)]
    assert all(0 < int(m.sum()) < 16 for m in masks)  # something dropped, something kept
    c = T([0.7, 1.3])
    expected = sum(c[k] * deltas[k] * masks[k] / density for k in range(2)) * 2.0
    out = merge_deltas("dare_linear", deltas, c, density=density, seed=seed, name=name, scale=2.0, dare_rng=rng)
    assert torch.allclose(out, expected, atol=1e-6)
    # dare_ties: sign election on the scaled, dropped deltas, disjoint mean
    dropped = torch.stack([c[k] * deltas[k] * masks[k] / density for k in range(2)])
    sign = torch.where(dropped.sum(0) >= 0, 1.0, -1.0)
    agree = dropped.sign() == sign
    expected = (dropped * agree).sum(0) / agree.sum(0).clamp(min=1)
    out = merge_deltas("dare_ties", deltas, c, density=density, seed=seed, name=name, dare_rng=rng)
    assert torch.allclose(out, expected, atol=1e-6)


def test_importance_hand_and_fallback():
    d1, d2 = T([1.0, 2.0, 3.0]), T([3.0, -2.0, 1.0])
    i1, i2 = T([1.0, 0.0, 0.0]), T([1.0, 2.0, 0.0])
    c = T([2.0, 1.0])
    # divide by mean importance: entry 0: (2*1*1 + 1*3*1)/1 = 5; entry 1: (0 + -2*2)/1 = -4;
    # entry 2: no importance anywhere → the equal-importance limit, TA: 2*3 + 1*1 = 7
    out = merge_deltas("importance", [d1, d2], c, importance=[i1, i2])
    assert torch.equal(out, T([5.0, -4.0, 7.0]))
    equal = merge_deltas("importance", [d1, d2], c, importance=[T([0.5, 0.5, 0.5])] * 2)
    assert torch.equal(equal, merge_deltas("task_arithmetic", [d1, d2], c))
    ta = merge_deltas("task_arithmetic", [d1, d2], c, scale=0.3)
    assert torch.equal(merge_deltas("importance", [d1, d2], c, scale=0.3), ta)
    with pytest.raises(ValueError, match="non-negative"):
        merge_deltas("importance", [d1, d2], c, importance=[-i1, i2])


# ---------------------------------------------------------------- dtype, validation


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved_and_fp32_math(dtype):
    deltas = _deltas(3, (8,), dtype=dtype)
    out = merge_deltas("ties", deltas, T([1.0, 0.5, 2.0]), density=0.5, scale=0.7)
    assert out.dtype == dtype
    ref = merge_deltas("ties", [d.double() for d in deltas], T([1.0, 0.5, 2.0]), density=0.5, scale=0.7)
    # fp32 math then one rounding: within one ulp of the float64 reference
    eps = torch.finfo(dtype).eps
    assert torch.allclose(out.double(), ref, rtol=eps, atol=eps * ref.abs().max().item())


def test_float64_stays_float64():
    d = [T([1.0 + 1e-12], dtype=torch.float64), T([1.0], dtype=torch.float64)]
    out = merge_deltas("task_arithmetic", d, T([1.0, -1.0]))
    assert out.dtype == torch.float64 and out.item() == pytest.approx(1e-12, rel=1e-3)


def test_inputs_not_modified():
    deltas = _deltas(3)
    copies = [d.clone() for d in deltas]
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        merge_deltas(method, deltas, T([1.0, 2.0, 3.0]), density=0.5)
    assert all(torch.equal(a, b) for a, b in zip(deltas, copies))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(deltas=[], coefficients=T([])), "at least one delta"),
        (dict(deltas=[torch.zeros(2), torch.zeros(3)], coefficients=T([1.0, 1.0])), "delta 1 has shape"),
        (dict(deltas=[torch.zeros(2)] * 2, coefficients=T([1.0])), "1 coefficients for 2 deltas"),
        (dict(deltas=[torch.zeros(2)] * 2, coefficients=T([1.0, 1.0]), density=0.0), "density"),
        (dict(deltas=[torch.zeros(2)] * 2, coefficients=T([1.0, 1.0]), density=1.5), "density"),
        (dict(deltas=[torch.zeros(2)] * 2, coefficients=T([1.0, float("nan")])), "finite"),
        (dict(deltas=[torch.zeros(2)] * 2, coefficients=T([1.0, 1.0]), majority_sign_method="x"), "majority"),
        (dict(deltas=[torch.zeros(2)] * 2, coefficients=T([1.0, 1.0]), trim_by="x"), "trim_by"),
        (dict(deltas=[torch.zeros(2)] * 2, coefficients=T([1.0, 1.0]), importance=[torch.ones(2)]),
         "1 importance maps"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge_deltas("ties", name="w", **kwargs)


def test_error_names_tensor():
    with pytest.raises(ValueError, match="model.layers.3.q.weight"):
        merge_deltas("ties", [torch.zeros(2), torch.zeros(3)], T([1.0, 1.0]), name="model.layers.3.q.weight")


# ---------------------------------------------------------------- equality with PEFT


@pytest.mark.parametrize("k", [1, 2, 4])
def test_task_arithmetic_equals_peft(k):
    deltas, w = _deltas(k, seed=k), torch.linspace(-0.5, 1.5, k)
    assert torch.equal(merge_deltas("task_arithmetic", deltas, w), merge_utils.task_arithmetic(deltas, w))


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_peft(sign_method, density):
    deltas = _deltas(3, (10, 7), seed=1)
    # Equal positive weights: weighted and unweighted election coincide.
    w = torch.full((3,), 0.8)
    ours = merge_deltas("ties", deltas, w, density=density, majority_sign_method=sign_method)
    with pytest.warns(UserWarning) if density >= 1 else _nullcontext():
        theirs = merge_utils.ties(deltas, w, density, sign_method)
    assert torch.equal(ours, theirs)
    # Arbitrary weights: PEFT elects on unscaled deltas → weighted_election=False matches exactly.
    w = T([0.3, 1.7, -0.4])
    ours = merge_deltas("ties", deltas, w, density=density, majority_sign_method=sign_method,
                        weighted_election=False)
    with pytest.warns(UserWarning) if density >= 1 else _nullcontext():
        theirs = merge_utils.ties(deltas, w, density, sign_method)
    assert torch.equal(ours, theirs)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("seed, name", [(0, "a.weight"), (42, "model.layers.1.self_attn.v_proj.weight")])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_equals_peft_with_same_generator_state(seed, name, density):
    """With dare_rng="torch", seeding torch's global RNG with stable_seed(seed, name) makes PEFT draw our masks,
    bit for bit."""
    deltas, w = _deltas(3, (9, 11), seed=5), T([0.5, 1.0, 1.5])
    torch.manual_seed(stable_seed(seed, name))
    theirs = merge_utils.dare_linear(deltas, w, density)
    ours = merge_deltas("dare_linear", deltas, w, density=density, seed=seed, name=name, dare_rng="torch")
    assert torch.equal(ours, theirs)
    torch.manual_seed(stable_seed(seed, name))
    theirs = merge_utils.dare_ties(deltas, w, density, "total")
    ours = merge_deltas("dare_ties", deltas, w, density=density, seed=seed, name=name, weighted_election=False,
                        dare_rng="torch")
    assert torch.equal(ours, theirs)
    # seed=None uses the global RNG, exactly like PEFT
    torch.manual_seed(123)
    theirs = merge_utils.dare_ties(deltas, w, density, "frequency")
    torch.manual_seed(123)
    ours = merge_deltas("dare_ties", deltas, w, density=density, seed=None, majority_sign_method="frequency",
                        weighted_election=False, dare_rng="torch")
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- reductions and reproducibility


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_density_one_dare_equals_base(method):
    deltas, c = _deltas(3), T([0.5, 2.0, 1.0])
    base = "task_arithmetic" if method == "dare_linear" else "ties"
    assert torch.equal(merge_deltas(method, deltas, c, density=1.0, scale=0.4),
                       merge_deltas(base, deltas, c, density=1.0, scale=0.4))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_unit_coefficients_reduce_to_plain_method(method):
    """c ≡ 1 with scale λ equals PEFT's plain method with weights λ... for TA/DARE-linear (linear in w)."""
    deltas = _deltas(3, seed=9)
    ones = torch.ones(3)
    if method in ("task_arithmetic", "dare_linear"):
        a = merge_deltas(method, deltas, ones, density=0.5, scale=0.7, seed=1, name="x")
        b = merge_deltas(method, deltas, ones * 0.7, density=0.5, seed=1, name="x")
        assert torch.allclose(a, b, atol=1e-6)
    else:
        # TIES with equal weights: scale factors out of the disjoint mean
        a = merge_deltas(method, deltas, ones, density=0.5, scale=0.7, seed=1, name="x")
        b = merge_deltas(method, deltas, ones, density=0.5, seed=1, name="x") * 0.7
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "importance"])
def test_permutation_invariance(method):
    deltas, c = _deltas(4, seed=2), T([0.5, 2.0, 1.0, 1.5])
    imp = [d.abs() + 0.1 for d in _deltas(4, seed=8)]
    perm = [2, 0, 3, 1]
    a = merge_deltas(method, deltas, c, density=0.5, importance=imp)
    b = merge_deltas(method, [deltas[p] for p in perm], c[perm], density=0.5, importance=[imp[p] for p in perm])
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("rng", ["counter", "torch"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_reproducible_and_name_dependent(method, rng):
    deltas, c = _deltas(2, (32, 32)), T([1.0, 1.0])
    kw = dict(density=0.5, dare_rng=rng)
    a = merge_deltas(method, deltas, c, seed=3, name="w1", **kw)
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    b = merge_deltas(method, deltas, c, seed=3, name="w1", **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, merge_deltas(method, deltas, c, seed=3, name="w2", **kw))
    assert not torch.equal(a, merge_deltas(method, deltas, c, seed=4, name="w1", **kw))
    # seed=None: from the global RNG, so torch.manual_seed reproduces it
    torch.manual_seed(5)
    x = merge_deltas(method, deltas, c, seed=None, name="w1", **kw)
    torch.manual_seed(5)
    assert torch.equal(x, merge_deltas(method, deltas, c, seed=None, name="w1", **kw))
    assert not torch.equal(x, merge_deltas(method, deltas, c, seed=None, name="w1", **kw))


def test_dare_mask_independent_of_dtype():
    deltas32 = _deltas(2, (16, 16))
    deltas64 = [d.double() for d in deltas32]
    c = T([1.0, 1.0])
    a = merge_deltas("dare_linear", deltas32, c, density=0.4, name="n")
    b = merge_deltas("dare_linear", deltas64, c, density=0.4, name="n")
    assert torch.equal(a != 0, b != 0)
    assert torch.allclose(a.double(), b, atol=1e-5)


def test_stable_seed_is_fixed():
    # A fixed value: the digest must not change between releases or processes.
    assert stable_seed(0, "") == stable_seed(0, "")
    assert stable_seed(0, "a") != stable_seed(1, "a")
    assert 0 <= stable_seed(2**40, "x" * 1000) < 2**63
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"7\x00w").digest()[:8], "little") & (2**63 - 1)
    assert stable_seed(7, "w") == expected


@pytest.mark.parametrize("rng", ["counter", "torch"])
def test_dare_keep_rate(rng):
    d = [torch.ones(200, 200)]
    out = merge_deltas("dare_linear", d, T([1.0]), density=0.3, name="big", dare_rng=rng)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.3))


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (33, 33)])
@pytest.mark.parametrize("rank", [4, 20, 40])
@pytest.mark.parametrize("true_rank", [3, None])
def test_svd_factors_is_best_rank_r(shape, rank, true_rank):
    """svd_factors (Gram route below GRAM_MAX_DIM, thin SVD above) gives B @ A = the best rank-r approximation
    (float64 SVD reference), A with orthonormal rows for the nonzero singular values, zero padding past min dim."""
    import sens_peft.lora as lora

    gen = torch.Generator().manual_seed(shape[0] * 7 + rank)
    if true_rank is None:
        x = torch.randn(shape, generator=gen)
    else:
        x = torch.randn(shape[0], true_rank, generator=gen) @ torch.randn(true_rank, shape[1], generator=gen)
    U, S, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    k = min(rank, S.numel())
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    for gram_max in (lora.GRAM_MAX_DIM, 0):  # the Gram route, then the thin-SVD route
        old = lora.GRAM_MAX_DIM
        lora.GRAM_MAX_DIM = gram_max
        try:
            A, B = lora.svd_factors(x, rank)
        finally:
            lora.GRAM_MAX_DIM = old
        assert A.shape == (rank, shape[1]) and B.shape == (shape[0], rank) and A.dtype == torch.float32
        # float64 Gram: 1e-6; float32 SVD: its subspace error grows as eps / (relative gap of sigma_r, sigma_r+1)
        assert ((B.double() @ A.double()) - best).norm() <= (1e-6 if gram_max else 1e-4) * best.norm()
        nonzero = int((S[:k] > 1e-6 * S[0]).sum())
        gram = A[:nonzero].double() @ A[:nonzero].double().T
        assert torch.allclose(gram, torch.eye(nonzero, dtype=torch.float64), atol=1e-5)
        assert not A[min(shape):].any() and not B[:, min(shape):].any()
