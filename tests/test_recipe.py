import json

import pytest
import yaml

from sens_peft.recipe import RecipeError, load_recipe


def _lora_dir(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return path


def _full_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def _write(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def experts(tmp_path):
    base = _full_dir(tmp_path / "base")
    return base, _lora_dir(tmp_path / "math"), _lora_dir(tmp_path / "code")


def test_valid_recipe(tmp_path, experts):
    base, a, b = experts
    path = _write(tmp_path, {
        "base_model": "base",
        "experts": [{"path": "math", "weight": 0.7}, "code"],
        "method": "ties",
        "parameters": {"density": 0.4, "scale": 1.2, "seed": 3, "dare_rng": "torch"},
        "sens": {"mode": "task", "temperature": 2, "alignment": "neg_l2"},
        "output": {"type": "lora", "path": "out", "rank": 8},
    })
    recipe = load_recipe(path)
    assert recipe.base_model == str(base)
    assert [e.path for e in recipe.experts] == [str(a), str(b)]
    assert recipe.config.weights == [0.7, 1.0]
    assert (recipe.config.method, recipe.config.density, recipe.config.scale, recipe.config.seed) == ("ties", 0.4, 1.2, 3)
    assert recipe.config.dare_rng == "torch"
    assert (recipe.config.sens, recipe.config.temperature, recipe.config.alignment) == ("task", 2.0, "neg_l2")
    assert recipe.config.rank == 8 and recipe.output_path == str(tmp_path / "out")
    assert recipe.expert_type == "lora"


def test_sens_null_is_plain_method(tmp_path, experts):
    path = _write(tmp_path, {"base_model": "base", "experts": ["math", "code"], "sens": None})
    assert load_recipe(path).config.sens is None


def test_full_experts_default_to_full_output(tmp_path):
    _full_dir(tmp_path / "base"), _full_dir(tmp_path / "f1"), _full_dir(tmp_path / "f2")
    recipe = load_recipe(_write(tmp_path, {"base_model": "base", "experts": ["f1", "f2"]}))
    assert recipe.expert_type == "full" and recipe.config.output == "full"


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"methd": "ties"}, r"unknown key\(s\) \['methd'\]"),
        ({"parameters": {"densty": 0.5}}, r"parameters: unknown key\(s\) \['densty'\]"),
        ({"sens": {"temp": 1}}, r"sens: unknown key\(s\) \['temp'\]"),
        ({"parameters": {"density": "half"}}, r"parameters.density must be a number"),
        ({"parameters": {"density": 1.5}}, r"density must be in \(0, 1\]"),
        ({"parameters": {"dare_rng": "philox"}}, r"dare_rng"),
        ({"sens": {"temperature": 0}}, r"temperature must be > 0"),
        ({"method": "nuslerp"}, r"unknown merge method 'nuslerp'"),
        ({"experts": []}, r"'experts' must be a non-empty list"),
        ({"experts": ["math", "missing"]}, r"experts\[1\].path .*missing does not exist"),
        ({"experts": ["math", "math"]}, r"listed twice"),
        ({"experts": [{"path": "math", "weight": "x"}]}, r"experts\[0\].weight must be a number"),
        ({"output": {"rank": 0}}, r"rank must be a positive integer"),
        ({"base_model": "./nope"}, r"base_model path './nope' does not exist"),
    ],
)
def test_bad_recipes(tmp_path, experts, patch, message):
    data = {"base_model": "base", "experts": ["math", "code"]}
    data.update(patch)
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, data))


def test_mixed_expert_types(tmp_path, experts):
    _full_dir(tmp_path / "full1")
    with pytest.raises(RecipeError, match="mix LoRA adapters and full models"):
        load_recipe(_write(tmp_path, {"base_model": "base", "experts": ["math", "full1"]}))


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
