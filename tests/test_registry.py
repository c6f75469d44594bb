"""The method registry as the one place that knows the methods: a method added in one file (streamed, with a
parameter of its own) appears in available_methods(), MergeConfig, the recipe schema, the merge card and
``sens-peft merge --help``; and every entry point resolves the same default settings."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from sens_peft.cli import build_parser
from sens_peft.config import MergeConfig
from sens_peft.methods import available_methods, get_method, merge_deltas, merge_streamed
from sens_peft.recipe import parse_recipe, recipe_schema

METHOD_FILE = '''
"""A test-local method: task arithmetic times a gain of its own."""
from sens_peft.methods import MergeMethod, Param, register_method
from sens_peft.methods.streamed import linear_kernel


@register_method
class GainedSum(MergeMethod):
    name = "gained_sum_test"
    description = "Gained sum (test): gain * sum_k c_k delta_k"
    reference = "tests/test_registry.py"
    parameters = (Param("gain", float, 1.0, "factor on the weighted sum", low=0.0, high=10.0),)

    def combine(self, stacked, coefficients, ctx):
        view = coefficients.reshape(coefficients.shape + (1,) * (stacked.dim() - 1))
        return ctx.params["gain"] * (stacked * view).sum(dim=0)

    def stream(self, job):
        job.coeffs = [c * job.params["gain"] for c in job.coeffs]
        return linear_kernel(job)
'''


@pytest.fixture
def one_file_method(tmp_path, monkeypatch):
    """Register the method by importing one new module (nothing else is edited), and unregister it after."""
    from sens_peft.methods import registry

    (tmp_path / "gained_sum_test_method.py").write_text(textwrap.dedent(METHOD_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("gained_sum_test_method")
    yield module.GainedSum.name
    registry._REGISTRY.pop(module.GainedSum.name, None)
    sys.modules.pop("gained_sum_test_method", None)


def test_method_in_one_file_appears_everywhere(one_file_method, capsys):
    name = one_file_method
    assert name in available_methods()
    # MergeConfig validates its parameter against the declaration
    assert MergeConfig(method=name, params={"gain": 2.0}).method_params()["gain"] == 2.0
    with pytest.raises(ValueError, match="gain"):
        MergeConfig(method=name, params={"gain": 11.0})
    with pytest.raises(ValueError, match="no parameter"):
        MergeConfig(method=name, params={"nope": 1})
    # the recipe schema lists it with its parameter, and a recipe sets it under `parameters:`
    assert "gain" in recipe_schema()["methods"][name]
    recipe = parse_recipe({"base_model": "b", "experts": ["x"], "method": name, "parameters": {"gain": 3}},
                          check_paths=False)
    assert recipe.config.method == name and recipe.config.params == {"gain": 3.0}
    # the merge card describes it and shows the parameter
    from sens_peft.card import merge_record, render_card

    card = render_card(merge_record(recipe.config.to_dict(), ["x"], ["x"], None, kind="full", base_model=None),
                       None, library_name="transformers")
    assert "Gained sum (test)" in card and "gain `3.0`" in card and "tests/test_registry.py" in card
    # sens-peft merge --help lists it with its parameter
    from sens_peft.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    merge_help = capsys.readouterr().out
    assert name in merge_help and "gain (float in [0.0, 10.0], default 1.0)" in merge_help
    # it merges, dense and streamed (its chunked hook), with the same result
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, generator=gen)
    experts = [base + 0.1 * torch.randn(300, generator=gen) for _ in range(2)]
    coeffs = torch.tensor([0.5, 1.5])
    dense = base + merge_deltas(name, [e - base for e in experts], coeffs, gain=2.0)
    reference = base + 2.0 * (0.5 * (experts[0] - base) + 1.5 * (experts[1] - base))
    torch.testing.assert_close(dense, reference, rtol=0, atol=1e-6)
    streamed, finite = merge_streamed(name, base, experts, coeffs, gain=2.0, chunk=64)
    assert finite
    torch.testing.assert_close(streamed, reference, rtol=0, atol=1e-6)


def test_example_method_file_ties_frequency():
    """The shipped one-file example: at min_agree=1 it is TIES with a frequency election, dense and streamed."""
    assert "ties_frequency" in available_methods()
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=gen)
    experts = [base + 0.1 * torch.randn(40, 30, generator=gen) for _ in range(3)]
    deltas = [e - base for e in experts]
    coeffs = torch.tensor([0.9, -0.4, 1.3])
    ties = merge_deltas("ties", deltas, coeffs, density=0.5, majority_sign_method="frequency")
    assert torch.equal(merge_deltas("ties_frequency", deltas, coeffs, density=0.5), ties)
    streamed, _ = merge_streamed("ties_frequency", base, experts, coeffs, density=0.5, chunk=256)
    reference, _ = merge_streamed("ties", base, experts, coeffs, density=0.5, majority_sign_method="frequency",
                                  chunk=256)
    assert torch.equal(streamed, reference)
    # a floor of 3 agreeing experts keeps only entries where all three agree with the elected sign
    strict = merge_deltas("ties_frequency", deltas, coeffs, density=1.0, min_agree=3)
    agree = torch.stack([(c * d).sign() for c, d in zip(coeffs, deltas)])
    unanimous = (agree == agree[0]).all(dim=0)
    assert bool((strict[~unanimous] == 0).all()) and bool((strict[unanimous] != 0).any())
    streamed_strict, _ = merge_streamed("ties_frequency", base, experts, coeffs, density=1.0, min_agree=3)
    torch.testing.assert_close(streamed_strict, base + strict, rtol=0, atol=1e-6)


def test_every_entry_point_resolves_the_same_defaults(tmp_path):
    """MergeConfig(), a recipe with no settings, MergeOnTrainEnd with none, the CLI's coefficient options and the
    coefficients a merge computes all use MergeConfig's defaults."""
    from sens_peft.coefficients import compute_coefficients
    from sens_peft.end_of_training import MergeOnTrainEnd

    default = MergeConfig()
    recipe = parse_recipe({"base_model": "b", "experts": ["x"]}, check_paths=False).config
    assert {**recipe.to_dict(), "weights": None} == default.to_dict()
    assert MergeOnTrainEnd([], tmp_path / "out").config.to_dict() == default.to_dict()
    inspect = build_parser().parse_args(["inspect", "x"])
    assert (inspect.temperature, inspect.normalization, inspect.granularity) == \
        (default.temperature, default.normalization, default.granularity)
    table = compute_coefficients(None, None, expert_names=["a", "b"], config=default)
    bare = compute_coefficients(None, None, expert_names=["a", "b"])  # no settings at all
    for key in ("sens", "temperature", "normalization", "tau_normalization", "granularity"):
        assert table.settings[key] == bare.settings[key] == getattr(default, key)
    assert table.settings["scale"] == default.resolved_scale()
    # the method owns its default scale: TIES trimmed by sensitivity 1.5, else 1.0
    assert MergeConfig(method="ties", trim_by="sensitivity").resolved_scale() == 1.5 == get_method("ties").default_scale(
        {"trim_by": "sensitivity"})
    assert MergeConfig(method="task_arithmetic", trim_by="sensitivity").resolved_scale() == 1.0


def test_weighted_election_is_a_field():
    assert MergeConfig(weighted_election=False).method_params()["weighted_election"] is False
    assert not hasattr(MergeConfig(), "extra")
    recipe = parse_recipe({"base_model": "b", "experts": ["x"], "parameters": {"weighted_election": False}},
                          check_paths=False)
    assert recipe.config.weighted_election is False
