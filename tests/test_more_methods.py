"""DELLA (and its sensitivity-ranked variant), Model Breadcrumbs, SLERP and Model Stock: each against a float64
hand computation written here from the papers' / mergekit's formulas, their edge cases, determinism, clear errors,
streamed == dense, and (when mergekit is installed in its own venv, as for the speed benchmark) against mergekit's
own merges of a tiny Llama to 1e-6.

DELLA's masks are random; its hand computations replace the draw (``counter_keep_probs``) on both sides by the
deterministic ``u(position) < p`` with a fixed low-discrepancy ``u``, so that ranks, probabilities, rescale and
election are all checked exactly; the real draw is checked separately (epsilon = 0 is DARE mask for mask; keep
rates by rank match the probabilities; same seed, same bits).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_full_expert, read_state, tiny_llama  # noqa: E402

from sens_peft.errors import MergeError  # noqa: E402
from sens_peft.methods import drops, merge_deltas, merge_streamed  # noqa: E402

GOLDEN = 0.6180339887498949


def fake_draw(probs: torch.Tensor, start: int, seed: int, name: str, expert: int) -> torch.Tensor:
    """A deterministic stand-in for the random keep draw: keep where u(position) < p."""
    pos = torch.arange(start, start + probs.numel(), dtype=torch.float64)
    u = torch.remainder(pos * GOLDEN + 0.1234 * expert, 1.0)
    return (u < probs.reshape(-1).double()).float()


def hand_u(numel: int, expert: int) -> torch.Tensor:
    return torch.remainder(torch.arange(numel, dtype=torch.float64) * GOLDEN + 0.1234 * expert, 1.0)


# ------------------------------------------------------------------------------------------------ hand math


def hand_probs(scores: torch.Tensor, density: float, eps: float) -> torch.Tensor:
    """MagPrune: per row (dim 1; a 1-D tensor is one row), ascending rank r in 0..n-1 -> d - eps + 2 eps r/(n-1)."""
    rows = scores.reshape(1, -1) if scores.dim() == 1 else scores
    out = torch.empty(rows.shape, dtype=torch.float64)
    for i in range(rows.shape[0]):
        values = rows[i].tolist()
        order = sorted(range(len(values)), key=lambda j: (values[j], j))
        for rank, j in enumerate(order):
            out[i, j] = density - eps + 2 * eps * rank / (len(values) - 1)
    return out.reshape(scores.shape)


def hand_elect(kept: torch.Tensor, c: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES: weighted deltas, sign of their sum (ties +1), mean (or sum) of the entries of that sign."""
    weighted = kept * c.reshape(-1, *([1] * (kept.dim() - 1)))
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(weighted) == sign).double()
    total = (weighted * agree).sum(0)
    return total / agree.sum(0).clamp(min=1) if normalize else total


def hand_della(deltas, c, density, eps, rescale="inverse", consensus=True, scores=None):
    kept = []
    for k, d in enumerate(deltas):
        d = d.double()
        p = hand_probs((d.abs() if scores is None else scores[k].double()), density, eps)
        keep = (hand_u(d.numel(), k).reshape(d.shape) < p).double()
        if rescale == "inverse":
            kept.append(d * keep / p)
        elif rescale == "l1":
            m = d * keep
            kept.append(m * (d.abs().sum() / m.abs().sum()))
        else:
            kept.append(d * keep)
    kept = torch.stack(kept)
    c = torch.tensor(c, dtype=torch.float64)
    return hand_elect(kept, c) if consensus else (kept * c.reshape(-1, *([1] * (kept.dim() - 1)))).sum(0)


def hand_breadcrumbs(deltas, c, density, gamma, consensus=False):
    kept = []
    for d in deltas:
        d = d.double()
        n = d.numel()
        flat = d.reshape(-1).tolist()
        # descending |d|, equal values in index order
        order = sorted(range(n), key=lambda j: (-abs(flat[j]), j))
        keep_n, top = int(density * n), int(gamma * n)
        bottom = max(0, n - keep_n - top)
        skip = n - bottom - keep_n
        mask = torch.zeros(n, dtype=torch.float64)
        for j in order[skip: skip + keep_n]:
            mask[j] = 1.0
        kept.append(d * mask.reshape(d.shape))
    kept = torch.stack(kept)
    c = torch.tensor(c, dtype=torch.float64)
    return hand_elect(kept, c, normalize=False) if consensus else (kept * c.reshape(-1, *([1] * (kept.dim() - 1)))).sum(0)


def hand_model_stock(deltas, c=None, filter_wise=False):
    k = len(deltas)
    shape = deltas[0].shape
    flat = [d.double().reshape(-1, shape[-1]) if filter_wise else d.double().reshape(1, -1) for d in deltas]
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            cos.append((flat[i] * flat[j]).sum(-1) / (flat[i].norm(dim=-1) * flat[j].norm(dim=-1)))
    cos = torch.stack(cos).mean(0)
    t = k * cos / (1 + (k - 1) * cos)
    c = [1.0] * k if c is None else c
    mean = sum(ci * f for ci, f in zip(c, flat)) / k
    return (t[:, None] * mean).reshape(shape)


def hand_slerp(a, b, t):
    """Over the whole tensor (mergekit's slerp: its batch axis is over tensors, not rows)."""
    a2, b2 = a.double().reshape(1, -1), b.double().reshape(1, -1)
    out = torch.empty_like(a2)
    for i in range(a2.shape[0]):
        x, y = a2[i], b2[i]
        dot = float((x / x.norm()) @ (y / y.norm()))
        if abs(dot) > 0.9995:
            out[i] = (1 - t) * x + t * y
        else:
            th = math.acos(dot)
            out[i] = math.sin((1 - t) * th) / math.sin(th) * x + math.sin(t * th) / math.sin(th) * y
    return out.reshape(a.shape)


@pytest.fixture
def tensors():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(6, 11, generator=gen, dtype=torch.float64)
    experts = [base + 0.1 * torch.randn(6, 11, generator=gen, dtype=torch.float64) for _ in range(3)]
    maps = [torch.rand(6, 11, generator=gen, dtype=torch.float64) for _ in range(3)]
    return base, experts, [e - base for e in experts], maps


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, err


# ------------------------------------------------------------------------------------------------ DELLA


@pytest.mark.parametrize("method,consensus", [("della", True), ("della_linear", False)])
@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_della_matches_hand(tensors, monkeypatch, method, consensus, rescale):
    monkeypatch.setattr(drops, "counter_keep_probs", fake_draw)
    base, experts, deltas, _ = tensors
    c = [1.0, 0.625, 1.25]  # exact in fp32 (merge_deltas reads coefficients as fp32)
    got = merge_deltas(method, deltas, c, density=0.5, name="w", epsilon=0.2, rescale=rescale)
    want = hand_della(deltas, c, 0.5, 0.2, rescale, consensus)
    close(got, want, 1e-12)
    # streamed: rows scored again around every chunk, chunks cut through rows, two spans
    for chunk in (7, 11, 64, 1 << 18):
        out = torch.empty(base.numel(), dtype=torch.float32)
        for span in ((0, 24), (24, 66)):
            merge_streamed(method, base.float(), [e.float() for e in experts], c, density=0.5, name="w",
                           epsilon=0.2, rescale=rescale, chunk=chunk, out=out, span=span)
        close(out.reshape(base.shape), base + want, 1e-5)


def test_della_sensitivity_ranks_by_maps(tensors, monkeypatch):
    monkeypatch.setattr(drops, "counter_keep_probs", fake_draw)
    base, experts, deltas, maps = tensors
    c = [1.0, 1.0, 1.0]
    got = merge_deltas("della_sensitivity", deltas, c, density=0.4, name="w", importance=maps, epsilon=0.3)
    close(got, hand_della(deltas, c, 0.4, 0.3, scores=maps), 1e-12)
    by_magnitude = merge_deltas("della", deltas, c, density=0.4, name="w", epsilon=0.3)
    assert not torch.allclose(got, by_magnitude)
    merged, _ = merge_streamed("della_sensitivity", base.float(), [e.float() for e in experts], c, density=0.4,
                               name="w", importance=[m.float() for m in maps], epsilon=0.3, chunk=13)
    close(merged, base + got, 1e-5)


def test_della_one_dim_and_three_dim(monkeypatch):
    monkeypatch.setattr(drops, "counter_keep_probs", fake_draw)
    gen = torch.Generator().manual_seed(3)
    for shape in ((40,), (3, 5, 4)):
        base = torch.randn(shape, generator=gen, dtype=torch.float64)
        deltas = [0.1 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
        got = merge_deltas("della_linear", deltas, [1.0, 1.0], density=0.5, name="b", epsilon=0.1)
        if len(shape) == 1:
            want = hand_della(deltas, [1.0, 1.0], 0.5, 0.1, consensus=False)
        else:  # dim 1 is ranked for every (i, :, j), as mergekit's argsort(dim=1)
            want = torch.zeros(shape, dtype=torch.float64)
            for k, d in enumerate(deltas):
                p = torch.empty(shape, dtype=torch.float64)
                for i in range(shape[0]):
                    for j in range(shape[2]):
                        p[i, :, j] = hand_probs(d[i, :, j].abs(), 0.5, 0.1)
                keep = (hand_u(d.numel(), k).reshape(shape) < p).double()
                want += d * keep / p
        close(got, want, 1e-12)
        merged, _ = merge_streamed("della_linear", base.float(), [(base + d).float() for d in deltas], [1.0, 1.0],
                                   density=0.5, name="b", epsilon=0.1, chunk=8)
        close(merged, base + want, 1e-5)


@pytest.mark.parametrize("method,dare", [("della", "dare_ties"), ("della_linear", "dare_linear"),
                                         ("della_sensitivity", "dare_ties")])
def test_zero_epsilon_is_dare_mask_for_mask(tensors, method, dare):
    """With no spread, MagPrune's per-entry draw is DARE's counter mask at the same seed: the same merge."""
    base, experts, deltas, maps = tensors
    deltas = [d.float() for d in deltas]
    kw = dict(importance=[m.float() for m in maps]) if method == "della_sensitivity" else {}
    for seed in (0, 5):
        got = merge_deltas(method, deltas, [1.0, 0.5, 2.0], density=0.3, seed=seed, name="w", epsilon=0.0, **kw)
        want = merge_deltas(dare, deltas, [1.0, 0.5, 2.0], density=0.3, seed=seed, name="w")
        assert torch.equal(got, want)


def test_della_keep_rates_follow_ranks():
    """The real draw: in a 400 x 500 delta, the keep rate of each rank band is its MagPrune probability."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(400, 500, generator=gen)
    merged = merge_deltas("della_linear", [delta], [1.0], density=0.5, name="big", epsilon=0.3, rescale="none",
                          seed=11)
    kept = (merged != 0).float()
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / 499
    for lo in (0.0, 0.45, 0.9):
        band = (ranks >= lo) & (ranks < lo + 0.1)
        expected = 0.2 + 0.6 * (lo + 0.05)
        assert abs(kept[band].mean().item() - expected) < 0.01
    assert abs(kept.mean().item() - 0.5) < 0.005


def test_della_deterministic_and_seeded(tensors):
    _, _, deltas, _ = tensors
    a = merge_deltas("della", deltas, [1.0] * 3, density=0.5, seed=1, name="w")
    b = merge_deltas("della", deltas, [1.0] * 3, density=0.5, seed=1, name="w")
    c = merge_deltas("della", deltas, [1.0] * 3, density=0.5, seed=2, name="w")
    d = merge_deltas("della", deltas, [1.0] * 3, density=0.5, seed=1, name="other")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    t1 = merge_deltas("della", deltas, [1.0] * 3, density=0.5, seed=1, name="w", dare_rng="torch")
    t2 = merge_deltas("della", deltas, [1.0] * 3, density=0.5, seed=1, name="w", dare_rng="torch")
    assert torch.equal(t1, t2)


def test_density_one_is_ta_or_ties(tensors):
    _, _, deltas, maps = tensors
    c = [1.0, 0.5, 2.0]
    ta = merge_deltas("task_arithmetic", deltas, c)
    ties = merge_deltas("ties", deltas, c, density=1.0)
    for method in ("della_linear", "breadcrumbs"):
        close(merge_deltas(method, deltas, c, density=1.0, name="w"), ta, 1e-12)
    close(merge_deltas("della", deltas, c, density=1.0, name="w"), ties, 1e-12)
    close(merge_deltas("della_sensitivity", deltas, c, density=1.0, name="w", importance=maps), ties, 1e-12)
    close(merge_deltas("breadcrumbs_ties", deltas, c, density=1.0, name="w"),
          hand_elect(torch.stack(deltas), torch.tensor(c, dtype=torch.float64), normalize=False), 1e-12)


def test_della_errors(tensors):
    _, _, deltas, _ = tensors
    with pytest.raises(ValueError, match=r"della for tensor 'w'.*epsilon"):
        merge_deltas("della", deltas, [1.0] * 3, density=0.9, name="w", epsilon=0.15)
    with pytest.raises(ValueError, match="rescale"):
        merge_deltas("della", deltas, [1.0] * 3, density=0.5, rescale="l2")
    with pytest.raises(ValueError, match="della_sensitivity.*element maps"):
        merge_deltas("della_sensitivity", deltas, [1.0] * 3, density=0.5, name="w")


# ------------------------------------------------------------------------------------------------ breadcrumbs


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.0), (0.8, 0.4), (0.05, 0.02)])
def test_breadcrumbs_matches_hand(tensors, method, consensus, density, gamma):
    base, experts, deltas, _ = tensors
    c = [1.0, 0.75, 1.5]
    got = merge_deltas(method, deltas, c, density=density, gamma=gamma, name="w")
    close(got, hand_breadcrumbs(deltas, c, density, gamma, consensus), 1e-12)
    for chunk in (5, 64):
        merged, _ = merge_streamed(method, base.float(), [e.float() for e in experts], c, density=density,
                                   gamma=gamma, chunk=chunk)
        close(merged, base + got, 1e-5)


def test_breadcrumbs_ties_in_index_order():
    """Equal magnitudes: the first in index order count as larger, in the dense and the streamed merge alike."""
    base = torch.zeros(4, 25)
    values = torch.tensor([0.5, -0.5, 0.25, 1.0, -1.0]).repeat(20).reshape(4, 25)
    experts = [values, values.flip(1)]
    got = merge_deltas("breadcrumbs", [e - base for e in experts], [1.0, 1.0], density=0.3, gamma=0.1)
    close(got, hand_breadcrumbs([e - base for e in experts], [1.0, 1.0], 0.3, 0.1), 0)
    for chunk in (8, 64):
        merged, _ = merge_streamed("breadcrumbs", base, experts, [1.0, 1.0], density=0.3, gamma=0.1, chunk=chunk)
        assert torch.equal(merged, got)


# ------------------------------------------------------------------------------------------------ model stock


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_hand(tensors, filter_wise):
    base, experts, deltas, _ = tensors
    got = merge_deltas("model_stock", deltas, [1.0] * 3, filter_wise=filter_wise)
    want = hand_model_stock(deltas, filter_wise=filter_wise)
    close(got, want, 1e-12)
    close(merge_deltas("model_stock", deltas, [1.0, 2.0, 0.5], filter_wise=filter_wise),
          hand_model_stock(deltas, [1.0, 2.0, 0.5], filter_wise=filter_wise), 1e-12)
    for chunk in (4, 9, 1 << 18):
        merged, _ = merge_streamed("model_stock", base.float(), [e.float() for e in experts], [1.0] * 3,
                                   chunk=chunk, filter_wise=filter_wise)
        close(merged, base + want, 1e-5)


def test_model_stock_edges(tensors):
    base, _, deltas, _ = tensors
    same = [deltas[0]] * 3
    close(merge_deltas("model_stock", same, [1.0] * 3), deltas[0], 1e-12)  # cos 1: t = 1, the expert itself
    # orthogonal deltas: cos 0, t = 0, the base
    a, b = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    a[0, 0], b[1, 1] = 1.0, 2.0
    close(merge_deltas("model_stock", [a, b], [1.0, 1.0]), torch.zeros(2, 4), 0)
    # opposite deltas of two experts: 1 + cos = 0, no estimate, the base (mergekit)
    close(merge_deltas("model_stock", [a, -a], [1.0, 1.0]), torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="model_stock.*at least 2 experts"):
        merge_deltas("model_stock", deltas[:1], [1.0], name="w")


# ------------------------------------------------------------------------------------------------ SLERP


def test_slerp_matches_hand(tensors):
    base, experts, _, _ = tensors
    a, b = experts[0], experts[1]
    for t in (0.0, 0.3, 0.8, 1.0):
        merged, finite = merge_streamed("slerp", base, [a, b], [1.0, 1.0], t=t, chunk=7)
        assert finite
        close(merged, hand_slerp(a, b, t), 1e-6)
    close(merge_streamed("slerp", base, [a, b], [1.0, 1.0], t=0.0)[0], a, 1e-6)
    close(merge_streamed("slerp", base, [a, b], [1.0, 1.0], t=1.0)[0], b, 1e-6)
    # spans (a full-model merge cuts big tensors in two): the angle is still the whole tensor's
    out = torch.empty(base.shape, dtype=torch.float64)
    for span in ((0, 32), (32, 66)):
        merge_streamed("slerp", base, [a, b], [1.0, 1.0], t=0.3, chunk=16, out=out, span=span)
    close(out, hand_slerp(a, b, 0.3), 1e-6)


def test_slerp_colinear_and_opposite():
    a = torch.randn(3, 8, dtype=torch.float64)
    for b in (3.0 * a, -0.5 * a):  # colinear / opposite tensors: linear interpolation
        merged, _ = merge_streamed("slerp", torch.zeros(3, 8), [a.float(), b.float()], [1.0, 1.0], t=0.25)
        close(merged, 0.75 * a + 0.25 * b, 1e-6)
    b = torch.randn(3, 8, dtype=torch.float64)
    merged, _ = merge_streamed("slerp", torch.zeros(3, 8), [a.float(), b.float()], [1.0, 1.0], t=0.25)
    close(merged, hand_slerp(a, b, 0.25), 1e-6)
    assert (merged.double() - (0.75 * a + 0.25 * b)).abs().max() > 1e-3  # not the linear mix
    # a zero tensor: its norm reads as 1, the cosine as 0 (mergekit)
    merged, _ = merge_streamed("slerp", torch.zeros(3, 8), [a.float(), torch.zeros(3, 8)], [1.0, 1.0], t=0.5)
    close(merged, math.sin(math.pi / 4) * a, 1e-6)


def test_slerp_layer_gradient():
    from sens_peft.methods.slerp import t_of

    params = {"t": (0.0, 0.5, 1.0), "num_layers": 4}
    assert t_of("model.embed_tokens.weight", params) == 0.0
    for i, want in enumerate((0.0, 1 / 3, 2 / 3, 1.0)):
        assert abs(t_of(f"model.layers.{i}.mlp.up_proj.weight", params) - want) < 1e-12
    assert t_of("model.layers.2.x.weight", {"t": 0.7, "num_layers": 0}) == 0.7
    with pytest.raises(ValueError, match="num_layers"):
        t_of("model.layers.1.mlp.up_proj.weight", {"t": (0.0, 1.0), "num_layers": 0})


def test_slerp_errors(tensors):
    base, experts, deltas, _ = tensors
    with pytest.raises(ValueError, match="exactly 2 experts; got 3"):
        merge_streamed("slerp", base, experts, [1.0] * 3)
    with pytest.raises(ValueError, match="no weights, scale"):
        merge_streamed("slerp", base, experts[:2], [1.0, 0.5])
    with pytest.raises(ValueError, match="full weights.*merge_models"):
        merge_deltas("slerp", deltas[:2], [1.0, 1.0], name="w")


# ------------------------------------------------------------------------------------------------ entry points


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("more_methods")
    base = tiny_llama(seed=0, num_hidden_layers=4)
    base.save_pretrained(str(root / "base"))
    experts = [make_full_expert(base, root / f"e{k}", seed=10 + k, sigma=0.02) for k in range(3)]
    return root / "base", experts


def test_merge_models_slerp_and_model_stock(llama_models, tmp_path):
    from sens_peft import merge_models

    base, experts = llama_models
    out = merge_models(base, experts[:2], tmp_path / "slerp", method="slerp", params={"t": [0.0, 1.0],
                       "num_layers": 4})
    merged, e0, e1 = read_state(out.output_dir), read_state(experts[0]), read_state(experts[1])
    close(merged["model.embed_tokens.weight"], e0["model.embed_tokens.weight"], 1e-6)  # outside layers: t[0]
    close(merged["model.layers.3.mlp.up_proj.weight"], e1["model.layers.3.mlp.up_proj.weight"], 1e-6)
    name = "model.layers.1.self_attn.q_proj.weight"
    close(merged[name], hand_slerp(e0[name], e1[name], 1 / 3), 1e-6)
    with pytest.raises(Exception, match="exactly 2 experts"):
        merge_models(base, experts, tmp_path / "slerp3", method="slerp")
    report = merge_models(base, experts, tmp_path / "stock", method="model_stock")
    merged, b = read_state(report.output_dir), read_state(base)
    close(merged[name], b[name] + hand_model_stock([read_state(e)[name] - b[name] for e in experts]), 1e-6)


def test_merge_adapters_refuses_slerp(tmp_path):
    from helpers import make_lora_adapter

    from sens_peft import merge_adapters

    folders = [make_lora_adapter(tiny_llama, tmp_path / f"a{k}", seed=k + 1) for k in range(2)]
    with pytest.raises(MergeError, match="'slerp' combines the experts' full weights"):
        merge_adapters(tiny_llama(), folders, method="slerp")
    # Model Stock on the ΔW: exact factors (per-tensor t), equal to the dense formula on PEFT's ΔW
    from peft import PeftModel

    report = merge_adapters(tiny_llama(), folders, method="model_stock", sens=None, progress=False)
    assert report.details["rank"] == 8  # 4 + 4, concatenated
    model = PeftModel.from_pretrained(tiny_llama(), str(folders[0]), adapter_name="e0")
    model.load_adapter(str(folders[1]), adapter_name="e1")
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    deltas = [layer.get_delta_weight(f"e{k}").detach().double() for k in range(2)]
    merged = report.model.base_model.model.model.layers[1].self_attn.v_proj.get_delta_weight(report.adapter_name)
    close(merged, hand_model_stock(deltas), 1e-6)
    assert hand_model_stock(deltas).abs().max() > 1e-3


def test_merge_adapters_sensitivity_ranked_drop_reads_the_maps(tmp_path):
    """LoRA experts with element maps in their sidecars: merge_adapters ranks each ΔW by the stored maps (the same
    merge as merge_deltas with those maps, fp32 rounding apart); an expert without maps is refused by name."""
    from peft import PeftModel
    from test_importance_entry_points import Q0, _lora_experts

    from sens_peft import merge_adapters
    from sens_peft.store import load_sensitivity

    folders = _lora_experts(tmp_path)
    kw = dict(method="della_sensitivity", density=0.5, seed=4, sens=None, device="cpu", progress=False)
    report = merge_adapters(tiny_llama(seed=0), folders, output="full", **kw)
    model = PeftModel.from_pretrained(tiny_llama(seed=0), str(folders[0]), adapter_name="e0")
    model.load_adapter(str(folders[1]), adapter_name="e1")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    deltas = [layer.get_delta_weight(f"e{k}").detach() for k in range(2)]
    maps = [load_sensitivity(f).element_maps[Q0] for f in folders]
    want = merge_deltas("della_sensitivity", deltas, [1.0, 1.0], density=0.5, seed=4, name=Q0, importance=maps)
    got = report.model.state_dict()[Q0] - tiny_llama(seed=0).state_dict()[Q0]
    close(got, want, 1e-5)
    assert (want - merge_deltas("della", deltas, [1.0, 1.0], density=0.5, seed=4, name=Q0)).abs().max() > 1e-3
    without = _lora_experts(tmp_path / "no_maps", maps=(True, False))
    with pytest.raises(MergeError, match=r"della_sensitivity.*element_maps.*expert 'e1'"):
        merge_adapters(tiny_llama(seed=0), without, **kw)


# ------------------------------------------------------------------------------------------------ mergekit


MK_PYTHON = Path(os.environ.get("SENS_PEFT_MERGEKIT_PYTHON", "/work/mk-venv/bin/python"))

# mergekit run with torch.bernoulli replaced by the same deterministic draw as fake_draw (one call per expert
# and tensor; the expert index is unknown there, so the draw ignores it: tests pass expert-independent u)
MK_RUNNER = '''
import sys, torch, yaml
if sys.argv[3] == "fake":
    def bernoulli(p, *args, **kwargs):
        pos = torch.arange(p.numel(), dtype=torch.float64)
        u = torch.remainder(pos * 0.6180339887498949, 1.0).reshape(p.shape)
        return (u < p.double()).to(p.dtype)
    torch.bernoulli = bernoulli
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(cfg, sys.argv[2], options=MergeOptions(device="cpu", copy_tokenizer=False, lazy_unpickle=False))
'''


def _mergekit_available() -> bool:
    if not MK_PYTHON.exists():
        return False
    return subprocess.run([str(MK_PYTHON), "-c", "import mergekit"], capture_output=True).returncode == 0


def _run_mergekit(tmp_path: Path, recipe: dict, name: str, fake: bool = False) -> dict[str, torch.Tensor]:
    runner, cfg, out = tmp_path / "mk_run.py", tmp_path / f"{name}.yml", tmp_path / f"mk_{name}"
    runner.write_text(MK_RUNNER)
    cfg.write_text(json.dumps(recipe))  # JSON is YAML
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run([str(MK_PYTHON), str(runner), str(cfg), str(out), "fake" if fake else "-"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_state(out)


def _fake_draw_no_expert(probs, start, seed, name, expert):
    return fake_draw(probs, start, seed, name, 0)


MK_CASES = [
    # (name, mergekit method, its parameters, ours, our params, experts, fake draw)
    ("slerp", "slerp", {"t": 0.3}, "slerp", {"t": 0.3}, 2, False),
    ("slerp_gradient", "slerp", {"t": [0.0, 0.5, 1.0]}, "slerp", {"t": [0.0, 0.5, 1.0], "num_layers": 4}, 2, False),
    ("model_stock", "model_stock", {}, "model_stock", {}, 3, False),
    ("model_stock_fw", "model_stock", {"filter_wise": True}, "model_stock", {"params": {"filter_wise": True}}, 3,
     False),
    ("breadcrumbs", "breadcrumbs", {"density": 0.5, "gamma": 0.1}, "breadcrumbs",
     {"density": 0.5, "params": {"gamma": 0.1}}, 3, False),
    ("breadcrumbs_ties", "breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, "breadcrumbs_ties",
     {"density": 0.5, "params": {"gamma": 0.1}}, 3, False),
    ("della", "della", {"density": 0.5, "epsilon": 0.2}, "della",
     {"density": 0.5, "params": {"epsilon": 0.2, "rescale": "l1"}}, 3, True),
    ("della_norescale", "della", {"density": 0.5, "epsilon": 0.2, "rescale": False}, "della",
     {"density": 0.5, "params": {"epsilon": 0.2, "rescale": "none"}}, 3, True),
    ("della_linear", "della_linear", {"density": 0.4, "epsilon": 0.1}, "della_linear",
     {"density": 0.4, "params": {"epsilon": 0.1, "rescale": "l1"}}, 3, True),
    ("della_density1", "della", {"density": 1.0}, "della", {"density": 1.0}, 3, False),
]


@pytest.mark.skipif(not _mergekit_available(), reason="mergekit is not installed in its own venv (see benchmarks/speed.py)")
@pytest.mark.parametrize("case", MK_CASES, ids=[c[0] for c in MK_CASES])
def test_equals_mergekit(llama_models, tmp_path, monkeypatch, case):
    """Our merge_models and mergekit's run_merge on the same tiny Llama: every tensor within 1e-6. DELLA's random
    draw is replaced on both sides by the same deterministic u(position) < p."""
    from sens_peft import merge_models

    label, mk_method, mk_params, method, ours, num, fake = case
    base, experts = llama_models
    experts = experts[:num]
    if mk_method == "slerp":  # mergekit's t = 0 end is its base model: the first expert
        recipe = {"merge_method": "slerp", "base_model": str(experts[0]),
                  "models": [{"model": str(e)} for e in experts], "parameters": mk_params, "dtype": "float32"}
    else:
        per_model = {k: v for k, v in mk_params.items() if k in ("density", "gamma", "epsilon")}
        shared = {k: v for k, v in mk_params.items() if k not in per_model}
        recipe = {"merge_method": mk_method, "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(e), "parameters": {"weight": 1.0, **per_model}} for e in experts],
                  "parameters": shared}
    theirs = _run_mergekit(tmp_path, recipe, label, fake)
    if fake:
        monkeypatch.setattr(drops, "counter_keep_probs", _fake_draw_no_expert)
    kwargs = {k: v for k, v in ours.items() if k != "t" and k != "num_layers"}
    if method == "slerp":
        kwargs["params"] = {k: v for k, v in ours.items() if k in ("t", "num_layers")}
    report = merge_models(base, experts, tmp_path / f"ours_{label}", method=method, **kwargs)
    mine = read_state(report.output_dir)
    assert set(mine) == set(theirs)
    worst = max((mine[n].double() - theirs[n].double()).abs().max().item() for n in mine)
    print(f"mergekit {label}: max |ours - mergekit| = {worst:.2e}")
    assert worst <= 1e-6
    if ours.get("density", 1.0) < 1.0:  # the drop did drop: not the same merge without it
        name = "model.layers.1.mlp.up_proj.weight"
        b = read_state(base)[name]
        undropped = merge_deltas(method, [read_state(e)[name] - b for e in experts], [1.0] * num, density=1.0,
                                 **ours.get("params", {}))
        assert (theirs[name] - b - undropped).abs().max() > 1e-3
