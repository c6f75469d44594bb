"""Smoke tests of the quality benchmark's fast path (benchmarks/quality_lib.py): scoring, merges, statistics."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality_lib as ql  # noqa: E402

from sens_peft.testing import toy  # noqa: E402


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the true next token, except at chosen (row, position) pairs."""

    def __init__(self, batch, vocab: int, wrong: set[tuple[int, int]], pad_at_eos: bool = False, eos: int = 2,
                 pad: int = 0):
        super().__init__()
        self.batch, self.vocab, self.wrong, self.pad_at_eos, self.eos, self.pad = batch, vocab, wrong, pad_at_eos, eos, pad

    def forward(self, input_ids, attention_mask):
        labels = self.batch["labels"]
        n, t = input_ids.shape
        logits = torch.zeros(n, t, self.vocab)
        nxt = torch.cat([labels[:, 1:], torch.full((n, 1), -100)], 1)
        for i in range(n):
            for j in range(t):
                target = int(nxt[i, j])
                if target < 0:
                    continue
                if (i, j) in self.wrong:
                    target = (target + 1) % self.vocab
                elif self.pad_at_eos and target == self.eos:
                    target = self.pad
                logits[i, j, target] = 5.0
        return SimpleNamespace(logits=logits)


def test_scorer_teacher_forced_exact_match():
    tok = toy.build_tokenizer()
    scorer = ql.Scorer(tok, [toy.TASK_NAMES[0]], "validation", n=6)
    batch = scorer.batches[toy.TASK_NAMES[0]][0]
    vocab = len(tok)
    first_answer = int((batch["labels"][1] != -100).nonzero()[0]) - 1  # logit position predicting it
    res = scorer.score(_Oracle(batch, vocab, wrong={(1, first_answer)}))[toy.TASK_NAMES[0]]
    assert res["correct"].tolist() == [True, False, True, True, True, True]
    assert res["loglik"] < 0
    # predicting pad instead of EOS ends the answer too (decode stops at pad)
    res = scorer.score(_Oracle(batch, vocab, set(), pad_at_eos=True, eos=tok.eos_token_id,
                               pad=tok.pad_token_id))[toy.TASK_NAMES[0]]
    assert res["correct"].all()


def test_paired_bootstrap_known_intervals():
    # every item differs by the same amount -> the interval is that point, exactly
    a = [{"x": np.ones(100, bool)}]
    b = [{"x": np.array([1, 1, 1, 0] * 25, bool)}]
    ci = ql.paired_bootstrap(a, b, [{"x": 0.5}], resamples=500)
    assert ci["diff"] == pytest.approx(50.0)  # 25 points of accuracy ÷ expert accuracy 0.5
    same = ql.paired_bootstrap(a, a, [{"x": 1.0}], resamples=100)
    assert same["lo"] == same["hi"] == same["diff"] == 0
    const = ql.paired_bootstrap([{"x": np.ones(40, bool)}], [{"x": np.zeros(40, bool)}], [{"x": 0.8}], resamples=50)
    assert const["lo"] == pytest.approx(125.0) and const["hi"] == pytest.approx(125.0)
    # d = +1 on a fraction p of n items, else 0: the 95% interval is ~ p ± 1.96 sqrt(p (1 - p) / n)
    n, p = 400, 0.25
    d = [{"x": np.arange(n) < p * n}]
    ci = ql.paired_bootstrap(d, [{"x": np.zeros(n, bool)}], [{"x": 1.0}], resamples=4000, seed=1)
    half = 100 * 1.96 * np.sqrt(p * (1 - p) / n)
    assert ci["diff"] == pytest.approx(25.0)
    assert ci["lo"] == pytest.approx(25.0 - half, abs=0.6) and ci["hi"] == pytest.approx(25.0 + half, abs=0.6)
    assert ci["p_le0"] == 0.0


def test_paired_bootstrap_mean_of_suite_means():
    # suite s1 has two cells (+100 and +0 points), suite s2 one cell (+50): mean of suite means = (50 + 50) / 2
    one, zero = np.ones(10, bool), np.zeros(10, bool)
    a = [{"t": one}, {"t": zero}, {"t": np.arange(10) < 5}]
    b = [{"t": zero}, {"t": zero}, {"t": zero}]
    norms = [{"t": 1.0}] * 3
    grouped = ql.paired_bootstrap(a, b, norms, groups=["s1", "s1", "s2"], resamples=200)
    assert grouped["diff"] == pytest.approx(50.0)
    pooled = ql.paired_bootstrap(a, b, norms, resamples=200)  # one group: mean over cells
    assert pooled["diff"] == pytest.approx(50.0)
    skewed = ql.paired_bootstrap(a, b, norms, groups=["s1", "s2", "s2"], resamples=200)
    assert skewed["diff"] == pytest.approx((100 + 25) / 2)
    with pytest.raises(ValueError):
        ql.paired_bootstrap(a, b[:2], norms)


def test_method_list_shares_one_grid_budget():
    import quality

    methods = quality.with_controls(quality.METHODS)
    for grid in quality.GRIDS.values():
        quality.check_budget(methods, grid)
        for m in methods:
            settings = m.grid(grid)
            assert len({ql.setting_key(s) for s in settings}) == len(settings), m.name  # no duplicate points
    names = [m.name for m in methods]
    for m in methods:  # every data-aware method is followed by its control, with the same grid
        if m.uses:
            ctrl = methods[names.index(m.name) + 1]
            assert ctrl.control_of == m.name and ctrl.grid is m.grid and not ctrl.uses


@pytest.fixture(scope="module")
def tiny_seed():
    from peft import get_peft_model

    from sens_peft.sensitivity.calibrate import compute_sensitivity

    tok = toy.build_tokenizer()
    base = toy.build_model(toy.ToySettings(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1), tok).eval()
    tasks = toy.TASK_NAMES[:3]
    peft = None
    records = []
    for k, task in enumerate(tasks):
        torch.manual_seed(k)
        one = get_peft_model(copy.deepcopy(base), toy.lora_config(r=4, alpha=8))
        for name, p in one.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        data = toy.task_dataset(task, "train", tok, n=8)
        records.append(compute_sensitivity(one, data, weight_source="theta", calibration_samples=4,
                                           store_probe=False))
        state = {n.replace(".default.", f".{task}."): p for n, p in one.state_dict().items() if "lora_" in n}
        if peft is None:
            peft = get_peft_model(copy.deepcopy(base), toy.lora_config(r=4, alpha=8), adapter_name=task)
        else:
            peft.add_adapter(task, toy.lora_config(r=4, alpha=8))
        peft.load_state_dict(state, strict=False)
    deltas = ql.lib_lora_deltas(peft, tasks)
    transfer = torch.tensor([[1.0, 0.2, 0.5], [0.3, 1.0, 0.1], [0.6, 0.4, 1.0]])
    cell = ql.Cell("maps", "B", "lora", 0, tasks, base, deltas, records, {"cosine": transfer}, peft)
    return base, cell


def test_shuffled_statistics_keep_values_and_break_alignment(tiny_seed):
    _, cell = tiny_seed
    name = next(iter(cell.deltas))
    maps = cell.stat("element_maps", name)
    ctrl = cell.with_shuffled(["element_maps"])
    assert cell.with_shuffled(["element_maps"]) is ctrl  # one control view per cell
    shuffled = ctrl.stat("element_maps", name)
    for m, s in zip(maps, shuffled):
        assert torch.equal(m.flatten().sort().values, s.flatten().sort().values) and not torch.equal(m, s)
    assert torch.equal(ctrl.stat("element_maps", name)[0], shuffled[0])  # a control is a fixed draw
    key = '{"T": 1.0, "alignment": "cosine", "granularity": "layer", "normalization": "mean1", ' \
          '"sens": "task+cross", "tau_norm": "exp_z"}'
    values, groups = cell.stat("sens_table", key)
    rand, groups2 = cell.with_shuffled(["sens_table"]).stat("sens_table", key)
    assert groups2 == groups
    assert torch.equal(values.sort(0).values, rand.sort(0).values)  # per group, the same K values
    assert not torch.equal(values, rand)


@pytest.mark.parametrize("method,density", [("task_arithmetic", 1.0), ("ties", 0.5), ("dare_ties", 0.5)])
def test_fast_path_equals_merge_adapters_full(tiny_seed, method, density):
    from sens_peft.merge import merge_adapters

    base, cell = tiny_seed
    setting = {"coef": "sens", "method": method, "lam": 0.7, "density": density, "T": 1.0, "sens": "task+cross",
               "normalization": "mean1", "alignment": "cosine", "tau_norm": "exp_z", "granularity": "layer"}
    merged, spread = ql.merge_fast(setting, cell)
    assert spread["c_max"] > 1.01 or spread["c_min"] < 0.99  # c is not uniform
    peft = copy.deepcopy(cell.peft)
    report = merge_adapters(peft, cell.tasks, method=method, density=density, scale=0.7, sens="task+cross",
                            temperature=1.0, normalization="mean1", tau_normalization="exp_z", trim_by="magnitude",
                            output="full", sensitivities=cell.records,
                            transferability=cell.transfer["cosine"], seed=0, device="cpu")
    params, w0 = dict(report.model.named_parameters()), dict(base.named_parameters())
    for name, d in merged.items():
        torch.testing.assert_close(params[name].detach(), w0[name].detach() + d, atol=1e-6, rtol=0)
    # and the reusable evaluation model receives exactly W0 + ΔW
    mm = ql.MergedModel(base, list(merged))
    model = mm.load(merged)
    name = next(iter(merged))
    torch.testing.assert_close(dict(model.named_parameters())[name].detach(), w0[name].detach() + merged[name])


def test_lowrank_gram_statistic_is_the_sketch_the_callback_stores(tiny_seed, monkeypatch):
    """The "RegMean, rank-k Gram sketch" row reads each expert's Gram as gram="lowrank" stores it: exact
    diagonal, rank-k off-diagonal part (Nystrom of G @ omega), and the full Gram when k >= the width."""
    _, cell = tiny_seed
    name = next(n for n in cell.deltas if cell.stat("gram", n) is not None)
    full = cell.stat("gram", name)
    sketched = ql._load_lowrank_grams(cell, name)
    k = ql.GRAM_SKETCH_RANK
    from sens_peft.regmean import nystrom_factor

    for g, s in zip(full, sketched):
        assert g.shape[0] > k
        torch.testing.assert_close(torch.diagonal(s), torch.diagonal(g), rtol=1e-5, atol=1e-6)
        # the callback's test matrix: seeded Gaussian [in, k], seed * 1_000_003 + width
        omega = torch.randn(g.shape[0], k, generator=torch.Generator().manual_seed(cell.seed * 1_000_003 + g.shape[0]))
        factor = nystrom_factor(g @ omega, omega)
        off = ~torch.eye(g.shape[0], dtype=torch.bool)
        torch.testing.assert_close(s[off], (factor @ factor.T).float()[off], rtol=1e-4, atol=1e-5)
        err, size = float((g - s)[off].norm()), float(g[off].norm())
        assert 0 < err < size  # a sketch: keeps part of the off-diagonal mass, not all of it
    monkeypatch.setattr(ql, "GRAM_SKETCH_RANK", 10_000)  # inputs no wider than k are kept full, as in the callback
    for g, s in zip(full, ql._load_lowrank_grams(cell, name)):
        assert torch.equal(g, s)


def test_reference_scores_are_cached_per_item_count(tiny_seed, tmp_path):
    """A run with other --val-n/--test-n never normalises by another item count's expert scores."""
    _, cell = tiny_seed
    tok = toy.build_tokenizer()
    small = {"validation": ql.Scorer(tok, cell.tasks, "validation", 3), "test": ql.Scorer(tok, cell.tasks, "test", 4)}
    big = {"validation": ql.Scorer(tok, cell.tasks, "validation", 5), "test": ql.Scorer(tok, cell.tasks, "test", 6)}
    cache = tmp_path / "ref.json"
    ql._reference_scores(cell, cache, small)
    assert len(cell.expert_scores["test"][cell.tasks[0]]["correct"]) == 4
    ql._reference_scores(cell, cache, big)
    assert len(cell.expert_scores["validation"][cell.tasks[0]]["correct"]) == 5
    assert len(cell.expert_scores["test"][cell.tasks[0]]["correct"]) == 6
    ql._reference_scores(cell, cache, small)
    assert len(cell.expert_scores["test"][cell.tasks[0]]["correct"]) == 4


def test_sketched_gram_row_feeds_regmean(tiny_seed):
    """The sketched-Gram row really merges with the sketch (not the plain-average fallback), and its control
    with the permuted sketch; with k >= every width it is RegMean with full Grams."""
    _, cell = tiny_seed
    setting = {"coef": "plain", "method": "regmean", "lam": 1.0, "shrinkage": 1.0}
    full, _ = ql.merge_fast(setting, cell)
    sketched, _ = ql.merge_fast({**setting, "gram_stat": "gram_lowrank"}, cell)
    control, _ = ql.merge_fast({**setting, "gram_stat": "gram_lowrank"}, cell.with_shuffled(["gram_lowrank"]))
    average, _ = ql.merge_fast({"coef": "plain", "method": "task_arithmetic", "lam": 1.0 / len(cell.tasks)}, cell)
    name = next(n for n in cell.deltas if cell.stat("gram", n) is not None)
    assert not torch.allclose(sketched[name], average[name], atol=1e-6)
    assert not torch.allclose(sketched[name], control[name], atol=1e-6)
    assert not torch.allclose(sketched[name], full[name], atol=1e-6)


def test_sub_cell_merges_only_its_experts(tiny_seed):
    """Regime A2's pair cell: RegMean / TA on the sub-cell equal the same merges computed from those two experts'
    ΔW and Grams alone (a hand computation), and its scorer scores only the pair's tasks."""
    _, cell = tiny_seed
    sub = ql.sub_cell(cell, (0, 2), "A2")
    assert sub.tasks == [cell.tasks[0], cell.tasks[2]] and sub.label() == "maps/A2/lora/seed0.p02"
    assert torch.equal(sub.transfer["cosine"], torch.tensor([[1.0, 0.5], [0.6, 1.0]]))
    ta, _ = ql.merge_fast({"coef": "plain", "method": "task_arithmetic", "lam": 0.7}, sub)
    reg, _ = ql.merge_fast({"coef": "plain", "method": "regmean", "lam": 1.0, "shrinkage": 1.0}, sub)
    for name, deltas in cell.deltas.items():
        torch.testing.assert_close(ta[name], 0.7 * (deltas[0] + deltas[2]))
    name = next(n for n in cell.deltas if cell.stat("gram", n) is not None)
    grams = [cell.stat("gram", name)[k] for k in (0, 2)]
    want = ql.lib_merge_tensor("regmean", [cell.deltas[name][k] for k in (0, 2)], torch.ones(2), density=1.0,
                               scale=1.0, seed=0, name=name, statistics={"gram": grams}, shrinkage=1.0)
    assert torch.equal(reg[name], want)
    three = ql.lib_merge_tensor("regmean", cell.deltas[name], torch.ones(3), density=1.0, scale=1.0, seed=0,
                                name=name, statistics={"gram": cell.stat("gram", name)}, shrinkage=1.0)
    assert not torch.allclose(reg[name], three, atol=1e-4)  # the third expert really is left out
    tok = toy.build_tokenizer()
    scorer = ql.Scorer(tok, cell.tasks, "test", 3).subset(sub.tasks)
    assert scorer.tasks == sub.tasks and set(scorer.batches) == set(sub.tasks) and scorer.n_items == 3


def test_method_selection_keeps_controls_and_references():
    import quality

    methods = quality.select_methods(quality.with_controls(quality.METHODS), ["RegMean"])
    names = [m.name for m in methods]
    assert "RegMean" in names and "RegMean [control: permuted Grams]" in names
    assert {quality.REFERENCE, quality.DEFAULT, quality.BASE} <= set(names) and "Fisher" not in names
    with pytest.raises(SystemExit, match="unknown"):
        quality.select_methods(methods, ["NoSuchMethod"])


def _fake_cell(label: str, ta: list[int], x: list[int]) -> dict:
    def row(bits_):
        arr = np.array(bits_, dtype=bool)
        return {"test": {"avg_norm": float(arr.mean()), "loglik": -1.0}, "items": {"t": ql.bits(arr)},
                "setting": {"lam": 1.0}, "lam_at_grid_edge": False}

    return {"cell": label, "methods": {"TA": row(ta), "X": row(x)}, "expert_acc": {"test": {"t": 1.0}},
            "base_acc": {"test": {"t": 0.0}}}


def test_per_regime_means_and_worst_suite():
    """Each regime's row is the mean of its own suites only, and names the suite where the gain is lowest."""
    import quality

    methods = [quality.Method("TA", lambda g: [], ql.merge_fast), quality.Method("X", lambda g: [], ql.merge_fast)]
    cells = [_fake_cell("maps/B/lora/seed0", [1, 0, 0, 0], [1, 1, 1, 0]),      # X +50 points
             _fake_cell("recall/B/lora/seed0", [1, 1, 0, 0], [1, 1, 0, 0]),    # X +0
             _fake_cell("maps/A2/lora/seed0.p01", [0, 0, 0, 0], [1, 0, 0, 0])]  # X +25
    out = quality.per_regime(cells, methods, resamples=50)
    assert set(out) == {"A2", "B"}
    b = out["B"]["methods"]["X"]
    assert b["test"] == pytest.approx((0.75 + 0.5) / 2) and b["vs_TA"]["diff"] == pytest.approx(25.0)
    assert b["worst_suite"] == "recall/B/lora" and b["worst_vs_TA"]["diff"] == pytest.approx(0.0)
    assert out["A2"]["methods"]["X"]["vs_TA"]["diff"] == pytest.approx(25.0)
    assert quality.per_regime(cells[:2], methods, resamples=50) == {}  # one regime: the overall mean says it
