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


def test_paired_bootstrap_and_random_coefficients():
    a = [{"x": np.array([1, 1, 1, 1] * 25, bool)}]
    b = [{"x": np.array([1, 1, 1, 0] * 25, bool)}]
    ci = ql.paired_bootstrap(a, b, [{"x": 0.5}], resamples=500)
    assert ci["diff"] == pytest.approx(50.0)  # 25 points of accuracy ÷ expert accuracy 0.5
    assert ci["lo"] > 0 and ci["hi"] < 100
    same = ql.paired_bootstrap(a, a, [{"x": 1.0}], resamples=100)
    assert same["lo"] == same["hi"] == 0
    c = ql.random_coefficients(4, ["layers.0", "layers.1"], 1.0, draw_seed=3)
    assert torch.allclose(torch.stack(list(c.values())).sum(1), torch.full((2,), 4.0))
    again = ql.random_coefficients(4, ["layers.0", "layers.1"], 1.0, draw_seed=3)
    assert all(again[g].equal(c[g]) for g in c)  # a draw is a function of its seed
    assert not ql.random_coefficients(4, ["layers.0", "layers.1"], 1.0, draw_seed=4)["layers.0"].equal(c["layers.0"])


@pytest.fixture(scope="module")
def tiny_seed():
    from peft import get_peft_model

    from sens_peft.lora import delta_weight, lora_modules
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
    deltas = {m.weight_name: [delta_weight(m, m.factors(t), torch.device("cpu")) for t in tasks]
              for m in lora_modules(peft)}
    transfer = torch.tensor([[1.0, 0.2, 0.5], [0.3, 1.0, 0.1], [0.6, 0.4, 1.0]])
    data = ql.SeedData(0, tasks, peft, deltas, {("theta", "after"): records}, [], {"cosine": transfer})
    return base, data


@pytest.mark.parametrize("method,density", [("task_arithmetic", 1.0), ("ties", 0.5), ("dare_ties", 0.5)])
def test_fast_path_equals_merge_adapters_full(tiny_seed, method, density):
    from sens_peft.merge import merge_adapters

    base, data = tiny_seed
    setting = {"coef": "sens", "method": method, "lam": 0.7, "density": density, "T": 1.0, "sens": "task+cross",
               "normalization": "mean1", "alignment": "cosine", "tau_norm": "exp_z", "source": "theta",
               "mode": "after", "granularity": "layer"}
    merged, spread = ql.merged_deltas(setting, data)
    assert spread["max"] > 1.01 * 0.7 or spread["min"] < 0.99 * 0.7 or spread["max"] > 1.01  # c is not uniform
    peft = copy.deepcopy(data.peft)
    report = merge_adapters(peft, data.tasks, method=method, density=density, scale=0.7, sens="task+cross",
                            temperature=1.0, normalization="mean1", tau_normalization="exp_z", trim_by="magnitude",
                            output="full", sensitivities=data.records[("theta", "after")],
                            transferability=data.transfer["cosine"], seed=0, device="cpu")
    params, w0 = dict(report.model.named_parameters()), dict(base.named_parameters())
    for name, d in merged.items():
        torch.testing.assert_close(params[name].detach(), w0[name].detach() + d, atol=1e-6, rtol=0)
    # and the reusable evaluation model receives exactly W0 + ΔW
    mm = ql.MergedModel(base, list(merged))
    model = mm.load(merged)
    name = next(iter(merged))
    torch.testing.assert_close(dict(model.named_parameters())[name].detach(), w0[name].detach() + merged[name])
