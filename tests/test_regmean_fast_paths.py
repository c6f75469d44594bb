"""RegMean speed work (issue 18) must not change a bit: the solves against the previous formulation (shrunk Gram
built with :func:`shrink_gram`, then the same sums and Cholesky solve), compared with ``torch.equal``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sens_peft.regmean import _cholesky_with_ridge, regmean_lora_factors, regmean_merge, shrink_gram


def _grams(n: int, k: int, seed: int, rank: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randn(rank * n, n, generator=gen) * torch.linspace(0.1, 3.0, n)
        out.append((x.T @ x).float())
    return out


def _previous_merge(weights, grams, alpha, dtype=torch.float64):
    total, rhs = None, None
    for w, gram in zip(weights, grams):
        g = shrink_gram(gram.to(dtype), alpha)
        total = g.clone() if total is None else total.add_(g)
        term = w.to(dtype) @ g
        rhs = term if rhs is None else rhs.add_(term)
    factor, lam = _cholesky_with_ridge(total)
    if lam:
        rhs = rhs + lam * torch.stack([w.to(dtype) for w in weights]).mean(0)
    return torch.cholesky_solve(rhs.T, factor).T.to(weights[0].dtype)


@pytest.mark.parametrize("alpha", [1.0, 0.99, 0.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regmean_merge_bit_identical_to_previous(alpha, dtype):
    grams = [g.to(dtype) for g in _grams(24, 3, seed=1)]
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(10, 24, generator=gen).to(dtype) for _ in range(3)]
    kept = [g.clone() for g in grams]
    assert torch.equal(regmean_merge(weights, grams, alpha), _previous_merge(weights, grams, alpha))
    assert all(torch.equal(a, b) for a, b in zip(grams, kept))  # the caller's Grams are untouched


def test_regmean_merge_ridge_path_bit_identical():
    grams = _grams(16, 2, seed=3)
    for g in grams:  # an input feature no expert's data excites: singular sum, the ridge ladder runs
        g[5, :] = 0
        g[:, 5] = 0
    weights = [torch.randn(4, 16), torch.randn(4, 16)]
    assert torch.equal(regmean_merge(weights, grams, 1.0), _previous_merge(weights, grams, 1.0))


def test_regmean_lora_factors_bit_identical_to_previous():
    grams = _grams(20, 3, seed=4)
    gen = torch.Generator().manual_seed(5)
    As = [torch.randn(r, 20, generator=gen) for r in (2, 4, 3)]
    Bs = [torch.randn(7, r, generator=gen) for r in (2, 4, 3)]
    scalings = [0.5, 2.0, 1.0]
    a, b = regmean_lora_factors(As, Bs, scalings, grams, 0.9)
    total = None
    for gram in grams:
        g = shrink_gram(gram.double(), 0.9)
        total = g.clone() if total is None else total.add_(g)
    factor, lam = _cholesky_with_ridge(total)
    assert lam == 0.0
    parts = [torch.cholesky_solve((s * x.double() @ shrink_gram(g.double(), 0.9)).T, factor).T
             for x, s, g in zip(As, scalings, grams)]
    assert torch.equal(a, torch.cat(parts, 0).float()) and torch.equal(b, torch.cat(Bs, 1))


def test_merge_models_statistics_read_ahead_is_byte_identical(tmp_path, monkeypatch):
    """merge_models reads RegMean's / Fisher's statistics on the reader thread, ahead of the solve; the output
    files must be the bytes of the merge that reads them on the main thread (the previous path)."""
    from helpers import make_full_expert, save_model, tiny_llama
    from transformers import AutoModelForCausalLM

    from sens_peft import compute_sensitivity
    from sens_peft.merge import merge_models
    from sens_peft.merging import streaming

    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    from sens_toys import TokenData

    base_model = tiny_llama(seed=0)
    base = save_model(base_model, tmp_path / "base")
    experts = []
    for k in range(2):
        folder = make_full_expert(base_model, tmp_path / f"x{k}", seed=k + 1)
        compute_sensitivity(AutoModelForCausalLM.from_pretrained(str(folder)), TokenData(n=4, length=8, seed=k),
                            save_to=folder, calibration_samples=4, gram="full", fisher=True, store_probe=False)
        experts.append(folder)
    calls = []
    original = streaming.ShardMerger.load_statistics

    def counted(self, name):
        calls.append(name)
        return original(self, name)

    outputs = {}
    for mode in ("ahead", "main thread"):
        if mode == "ahead":
            monkeypatch.setattr(streaming.ShardMerger, "load_statistics", counted)
        else:
            monkeypatch.setattr(streaming.ShardMerger, "load_statistics", lambda self, name: None)
        for method in ("regmean", "fisher"):
            out = tmp_path / f"{method}_{mode}"
            merge_models(base, experts, out, method=method, sens=None, device="cpu", progress=False)
            outputs[method, mode] = (out / "model.safetensors").read_bytes()
    assert calls  # the read-ahead ran
    for method in ("regmean", "fisher"):
        assert outputs[method, "ahead"] == outputs[method, "main thread"], method
