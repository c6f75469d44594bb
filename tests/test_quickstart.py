"""The quick start (README's first command): its table rows and a small end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from sens_peft import MergeConfig
from sens_peft.demo import PAPER_SENS, main, merge_runs


def test_merge_runs_rows():
    runs = merge_runs(4, seed=3, temperature=0.5)
    labels = [label for label, _ in runs]
    assert labels == ["Avg", "TA", "Sens-TA", "TIES", "Sens-TIES", "DARE-TIES", "Sens-DARE-TIES", "RegMean",
                      "Fisher", "SensTrim-TIES", "ProbeFit-TA", "MergeConfig()"]
    configs = dict(runs)
    assert all(isinstance(c, MergeConfig) and c.seed == 3 for c in configs.values())
    assert configs["Avg"].method == "task_arithmetic" and configs["Avg"].scale == pytest.approx(0.25)
    for plain in ("TA", "TIES", "DARE-TIES"):  # each Sens row is its plain row plus the paper's coefficients
        sens = configs[f"Sens-{plain}"]
        assert configs[plain].sens is None and sens.temperature == 0.5
        assert (sens.method, sens.scale, sens.density) == (configs[plain].method, configs[plain].scale,
                                                           configs[plain].density)
        assert {k: getattr(sens, k) for k in PAPER_SENS} == PAPER_SENS
    assert configs["RegMean"].params == {"shrinkage": 1.0}
    assert configs["SensTrim-TIES"].trim_by == "sensitivity"
    assert configs["ProbeFit-TA"].method == "probe_fit"
    assert configs["MergeConfig()"] == MergeConfig(seed=3)


@pytest.mark.slow
def test_quickstart_small_run(tmp_path, monkeypatch, capsys):
    from sens_peft.testing import toy

    monkeypatch.setenv("SENS_PEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(toy, "pretrain_loop", None)  # the shipped base is used: pre-training would fail here
    threads = torch.get_num_threads()
    try:
        main(["--output-dir", str(tmp_path / "run"), "--tasks", "inc", "cipher", "--steps", "4", "--n-test", "8"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for label, _ in merge_runs(2):
        assert label in results["normalized"] and f"\n{label} " in out
    assert results["best"] in results["normalized"]
    assert (tmp_path / "run" / "merged" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "base" / "config.json").is_file()
    for task in ("inc", "cipher"):
        assert (tmp_path / "run" / "experts" / task / "sensitivity.safetensors").is_file()
