"""RegMean / Fisher merge math against float64 references written from the definitions."""

from __future__ import annotations

import pytest
import torch

from sens_peft.regmean import (
    fisher_merge,
    regmean_lora_factors,
    regmean_merge,
    regmean_merge_diag,
    shrink_gram,
)


def _case(seed: int, k: int = 3, out: int = 5, fan_in: int = 6, tokens: int = 20):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out, fan_in, generator=g, dtype=torch.float64) for _ in range(k)]
    xs = [torch.randn(tokens, fan_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, fan_in,
                                                                                        dtype=torch.float64)
          for _ in range(k)]
    grams = [x.T @ x for x in xs]
    return weights, xs, grams


def _reference(weights, grams, alpha):
    """W = (sum W_k G~_k)(sum G~_k)^-1 by an explicit inverse in float64."""
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    return sum(w @ g for w, g in zip(weights, shrunk)) @ torch.linalg.inv(sum(shrunk))


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_regmean_equals_float64_reference(alpha, seed):
    weights, _, grams = _case(seed)
    merged = regmean_merge(weights, grams, alpha)
    torch.testing.assert_close(merged, _reference(weights, grams, alpha), rtol=1e-9, atol=1e-9)


def test_regmean_minimises_the_regression_objective():
    """The solution is the least-squares fit of every expert's outputs on its own inputs (the paper's objective)."""
    weights, xs, grams = _case(3)
    merged = regmean_merge(weights, grams, 1.0)
    x = torch.cat(xs)
    y = torch.cat([xi @ w.T for xi, w in zip(xs, weights)])
    lstsq = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(merged, lstsq, rtol=1e-8, atol=1e-8)


def test_regmean_float32_inputs_and_dtype():
    weights, _, grams = _case(4)
    merged = regmean_merge([w.float() for w in weights], [g.float() for g in grams], 0.9)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged.double(), _reference(weights, grams, 0.9), rtol=1e-4, atol=1e-4)


def test_equal_grams_reduce_to_plain_average():
    weights, _, grams = _case(5)
    same = [grams[0]] * len(weights)
    kept = grams[0].clone()
    for alpha in (1.0, 0.7):
        torch.testing.assert_close(regmean_merge(weights, same, alpha), torch.stack(weights).mean(0), rtol=1e-9,
                                   atol=1e-9)
        a, b = regmean_lora_factors(weights, [torch.eye(5, dtype=torch.float64)] * 3, [1.0] * 3, same, alpha)
        torch.testing.assert_close(b @ a, torch.stack(weights).mean(0), rtol=1e-9, atol=1e-9)
    assert torch.equal(grams[0], kept)  # the inputs are not modified


def test_task_vector_identity():
    """regmean(W0 + D_k) = W0 + regmean(D_k): the base cancels."""
    weights, _, grams = _case(6)
    base = torch.randn_like(weights[0])
    full = regmean_merge([base + d for d in weights], grams, 0.8)
    torch.testing.assert_close(full, base + regmean_merge(weights, grams, 0.8), rtol=1e-9, atol=1e-9)


def test_diag_variant_equals_reference_with_diagonal_grams():
    weights, _, grams = _case(7)
    diags = [torch.diagonal(g).clone() for g in grams]
    reference = _reference(weights, [torch.diag(d) for d in diags], 1.0)
    torch.testing.assert_close(regmean_merge_diag(weights, diags), reference, rtol=1e-10, atol=1e-10)
    # 1-D Grams dispatch to the diagonal form; alpha=0 on full Grams is the same merge
    torch.testing.assert_close(regmean_merge(weights, diags, 0.3), reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(regmean_merge(weights, grams, 0.0), reference, rtol=1e-9, atol=1e-9)


def test_dead_input_column_keeps_average():
    """An input feature no expert's data excites: the ridge pulls that column to the plain average, not to 0."""
    weights, xs, _ = _case(8)
    for x in xs:
        x[:, 2] = 0.0
    grams = [x.T @ x for x in xs]
    merged = regmean_merge(weights, grams, 1.0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, 2], torch.stack(weights).mean(0)[:, 2], rtol=1e-6, atol=1e-6)
    # the other columns: the reference restricted to the live features
    live = [0, 1, 3, 4, 5]
    ref = _reference([w[:, live] for w in weights], [g[live][:, live] for g in grams], 1.0)
    torch.testing.assert_close(merged[:, live], ref, rtol=1e-5, atol=1e-5)
    diag = regmean_merge_diag(weights, [torch.diagonal(g) for g in grams])
    torch.testing.assert_close(diag[:, 2], torch.stack(weights).mean(0)[:, 2])


def test_lora_factor_form_equals_dense_form():
    g = torch.Generator().manual_seed(9)
    out, fan_in, ranks, scalings = 7, 6, [2, 3, 1], [2.0, 0.5, 1.5]
    As = [torch.randn(r, fan_in, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(out, r, generator=g, dtype=torch.float64) for r in ranks]
    _, _, grams = _case(10, k=3, fan_in=fan_in)
    dense = regmean_merge([s * b @ a for a, b, s in zip(As, Bs, scalings)], grams, 0.9)
    a, b = regmean_lora_factors(As, Bs, scalings, grams, 0.9)
    assert a.shape == (sum(ranks), fan_in) and b.shape == (out, sum(ranks))
    torch.testing.assert_close(b @ a, dense, rtol=1e-9, atol=1e-9)
    # with a singular sum (few tokens) the ridge path must still match the dense form
    low = [x[:1].T @ x[:1] for x in (torch.randn(4, fan_in, generator=g, dtype=torch.float64) for _ in ranks)]
    dense = regmean_merge([s * b @ a for a, b, s in zip(As, Bs, scalings)], low, 1.0)
    a, b = regmean_lora_factors(As, Bs, scalings, low, 1.0)
    torch.testing.assert_close(b @ a, dense, rtol=1e-7, atol=1e-7)


def test_shrink_gram():
    _, _, grams = _case(11)
    g = grams[0]
    shrunk = shrink_gram(g, 0.25)
    torch.testing.assert_close(torch.diagonal(shrunk), torch.diagonal(g))
    off = ~torch.eye(g.shape[0], dtype=torch.bool)
    torch.testing.assert_close(shrunk[off], 0.25 * g[off])
    with pytest.raises(ValueError, match="alpha"):
        shrink_gram(g, 1.5)


def test_fisher_equal_maps_is_weighted_average():
    g = torch.Generator().manual_seed(12)
    deltas = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    fisher = torch.rand(4, 5, generator=g, dtype=torch.float64)
    coeffs = [0.5, 1.0, 2.5]
    expected = sum(c * d for c, d in zip(coeffs, deltas)) / sum(coeffs)
    torch.testing.assert_close(fisher_merge(deltas, [fisher] * 3, coeffs), expected, rtol=1e-12, atol=1e-12)


def test_fisher_reference_and_zero_fisher():
    g = torch.Generator().manual_seed(13)
    deltas = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2)]
    fishers = [torch.rand(6, generator=g, dtype=torch.float64) for _ in range(2)]
    fishers[0][0] = fishers[1][0] = 0.0
    merged = fisher_merge(deltas, fishers, [1.0, 3.0])
    for i in range(1, 6):
        num = 1.0 * fishers[0][i] * deltas[0][i] + 3.0 * fishers[1][i] * deltas[1][i]
        den = 1.0 * fishers[0][i] + 3.0 * fishers[1][i]
        assert merged[i].item() == pytest.approx((num / den).item(), rel=1e-12)
    assert merged[0].item() == pytest.approx(((deltas[0][0] + 3 * deltas[1][0]) / 4).item(), rel=1e-12)


def test_shape_errors_name_the_expert():
    weights, _, grams = _case(14)
    with pytest.raises(ValueError, match="Gram 1"):
        regmean_merge(weights, [grams[0], grams[1][:3, :3], grams[2]])
    with pytest.raises(ValueError, match="expert 1"):
        fisher_merge([torch.zeros(3), torch.zeros(4)], [torch.ones(3), torch.ones(4)])


def _psd(seed: int, n: int, rank: int, decay: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0][:, :rank]
    return (q * decay ** torch.arange(rank, dtype=torch.float64)) @ q.T * 100.0


def test_nystrom_exact_when_rank_fits():
    from sens_peft.regmean import lowrank_gram, nystrom_factor

    gram = _psd(20, 24, rank=5)
    omega = torch.randn(24, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factor = nystrom_factor(gram @ omega, omega)
    assert factor.shape == (24, 8)
    torch.testing.assert_close(factor @ factor.T, gram, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lowrank_gram(factor, torch.diagonal(gram)), gram, rtol=1e-4, atol=1e-4)


def test_nystrom_below_g_and_better_than_diagonal():
    from sens_peft.regmean import lowrank_gram, nystrom_factor

    gram = _psd(21, 32, rank=32, decay=0.6)
    omega = torch.randn(32, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    factor = nystrom_factor(gram @ omega, omega)
    assert float(torch.linalg.eigvalsh(gram - factor @ factor.T).min()) > -1e-6 * float(gram.norm())
    approx = lowrank_gram(factor, torch.diagonal(gram))
    torch.testing.assert_close(torch.diagonal(approx), torch.diagonal(gram))
    diag_only = torch.diag(torch.diagonal(gram))
    assert float((approx - gram).norm()) < 0.2 * float((diag_only - gram).norm())
