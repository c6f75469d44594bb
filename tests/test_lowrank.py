"""The randomized rank-r factorisation of merged LoRA deltas (sens_peft.lowrank)."""

import torch

from sens_peft.lora import svd_factors
from sens_peft.lowrank import randomized_factors, truncation_error


def _ties_like(out_f: int, in_f: int, r: int, seed: int) -> torch.Tensor:
    """A TIES merge of three rank-r deltas: trimmed and sign-elected, so no longer low rank."""
    g = torch.Generator().manual_seed(seed)
    st = torch.stack([torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g) for _ in range(3)])
    kth = st.abs().flatten(1).kthvalue(out_f * in_f // 2, dim=1).values
    st = st * (st.abs() >= kth[:, None, None])
    agree = st.sign() == st.sum(0).sign()
    return (st * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_exact_on_low_rank_input():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(96, 8, generator=g) @ torch.randn(8, 200, generator=g)).double()
    A, B = randomized_factors(x, 8)
    assert A.shape == (8, 200) and B.shape == (96, 8)
    assert truncation_error(x, A, B) <= 1e-4 * float(x.norm())
    # orthonormal rows of A, singular values on B (the layout svd_factors writes)
    torch.testing.assert_close(A.double() @ A.double().T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)


def test_error_within_one_percent_of_exact_truncation():
    x = _ties_like(256, 704, 16, seed=2)
    exact = truncation_error(x, *svd_factors(x, 16))
    ours = truncation_error(x, *randomized_factors(x, 16))
    assert exact <= ours <= 1.01 * exact


def test_deterministic_given_seed_and_independent_of_global_rng():
    x = _ties_like(64, 160, 4, seed=3)
    torch.manual_seed(0)
    a1, b1 = randomized_factors(x, 4, seed=5, name="m.weight")
    torch.manual_seed(123)
    a2, b2 = randomized_factors(x, 4, seed=5, name="m.weight")
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    a3, _ = randomized_factors(x, 4, seed=6, name="m.weight")
    assert not torch.equal(a1, a3)


def test_rank_above_dimension_pads_with_zeros():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    A, B = randomized_factors(x, 9)
    assert A.shape == (9, 7) and B.shape == (5, 9)
    assert torch.count_nonzero(A[5:]) == 0 and torch.count_nonzero(B[:, 5:]) == 0
    assert truncation_error(x, A, B) <= 1e-5
