"""The quick start (README's first command): its table rows and a small end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from sens_peft import MergeConfig
from sens_peft.demo import PAPER_SENS, main, merge_runs, sidecars
from sens_peft.validation.options import warn_unused_options


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


def test_each_row_gets_only_the_sidecars_it_reads(caplog):
    """The quick start's log has no "is ignored" warning: each merge is passed only the files it reads."""
    dirs = ["experts/a", "experts/b"]
    got = {label: sidecars(config, dirs) for label, config in merge_runs(2)}
    reads = {label: (kw["sensitivities"] is not None, kw["probes"] is not None) for label, kw in got.items()}
    assert reads == {"Avg": (False, False), "TA": (False, False), "TIES": (False, False),
                     "DARE-TIES": (False, False), "Sens-TA": (True, True), "Sens-TIES": (True, True),
                     "Sens-DARE-TIES": (True, True), "RegMean": (True, False), "Fisher": (True, False),
                     "SensTrim-TIES": (True, False), "ProbeFit-TA": (False, True), "MergeConfig()": (True, True)}
    with caplog.at_level("WARNING", logger="sens_peft.validation"):
        for label, config in merge_runs(2):
            warn_unused_options(config, **got[label])
            warn_unused_options(config, sensitivities=dirs, probes=dirs)  # what the demo passed before
    ignored = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    # only the second call of each row warns: sensitivities= for the 5 rows that read no sidecar (Avg, TA, TIES,
    # DARE-TIES, ProbeFit-TA), probes= for the 7 rows with neither a cross term nor a fit (the default fits on them)
    assert sum(m.startswith("sensitivities=") for m in ignored) == 5
    assert sum(m.startswith("probes=") for m in ignored) == 7


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
