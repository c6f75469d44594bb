"""YAML merge recipes: parse, validate (before any heavy work) and run.

A recipe, in the spirit of mergekit's YAML::

    base_model: runs/base            # folder or hub id of the shared base model
    experts:                         # LoRA adapter folders or full model folders (not mixed)
      - path: runs/math
        weight: 1.0                  # optional user weight w_k
      - path: runs/code
    method: ties                     # task_arithmetic | ties | dare_linear | dare_ties | importance
    parameters:                      # the method's parameters (MergeConfig fields)
      density: 0.5
      scale: 1.0
      seed: 0
      dare_rng: counter              # DARE masks: counter (default, same on CPU/GPU) | torch (PEFT's draws)
    sens:                            # Sens-Merging settings; `sens: null` for the plain method
      mode: task+cross
      temperature: 1.0
      normalization: mean1
      alignment: cosine
      granularity: layer
    output:
      type: lora                     # lora (LoRA experts only) | full
      path: runs/merged
      rank: 16                       # SVD rank of the LoRA output for TIES/DARE
      dtype: bfloat16
    device: cpu                      # optional; default CUDA when available

Every key is checked: unknown keys, wrong types and missing paths raise :class:`RecipeError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import MergeConfig
from .errors import RecipeError  # noqa: F401  (re-exported: defined in sens_peft.errors)

TOP_KEYS = {"base_model", "experts", "method", "parameters", "sens", "output", "device", "expert_type"}
EXPERT_KEYS = {"path", "weight"}
PARAMETER_KEYS = {"density", "scale", "majority_sign_method", "seed", "trim_by", "dare_rng"}
SENS_KEYS = {"mode", "temperature", "normalization", "tau_normalization", "alignment", "granularity"}
OUTPUT_KEYS = {"type", "path", "rank", "dtype"}


@dataclass
class ExpertSpec:
    path: str
    weight: float = 1.0


@dataclass
class MergeRecipe:
    """A validated merge recipe."""

    base_model: str
    experts: list[ExpertSpec]
    config: MergeConfig
    output_path: Optional[str] = None
    expert_type: str = "lora"
    source: dict[str, Any] = field(default_factory=dict)


def _where(path: Optional[os.PathLike], key: str) -> str:
    return f"{path}: {key}" if path else key


def _check_keys(section: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(section, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return section


def _typed(value: Any, types: tuple, where: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in types:
        raise RecipeError(f"{where} must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise RecipeError(f"{where} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def _detect_expert_type(path: Path) -> str:
    if (path / "adapter_config.json").is_file():
        return "lora"
    if (path / "config.json").is_file():
        return "full"
    raise RecipeError(f"expert folder {path} holds neither adapter_config.json (LoRA) nor config.json (full model)")


def parse_recipe(data: dict[str, Any], source: Optional[os.PathLike] = None, check_paths: bool = True) -> MergeRecipe:
    """Validate a recipe mapping and build a :class:`MergeRecipe`.

    Args:
        data: The recipe as loaded from YAML.
        source: The recipe file (for error messages and relative paths).
        check_paths: Check that expert folders exist (and the base model, when it is a local path).
    """
    where = str(source) if source else "recipe"
    _check_keys(data, TOP_KEYS, where)
    root = Path(source).parent if source else Path.cwd()

    def resolve(p: str) -> str:
        path = Path(os.path.expanduser(p))
        return str(path if path.is_absolute() else (root / path))

    if "base_model" not in data:
        raise RecipeError(f"{where}: 'base_model' is required")
    base = _typed(data["base_model"], (str,), _where(source, "base_model"), "a path or hub id")
    base_local = resolve(base)
    if Path(base_local).exists():
        base = base_local
    elif check_paths and (base.startswith((".", "/", "~")) or os.sep in base.strip("/").split("/", 1)[-1]):
        raise RecipeError(f"{where}: base_model path {base!r} does not exist")

    experts_raw = data.get("experts")
    if not isinstance(experts_raw, list) or not experts_raw:
        raise RecipeError(f"{where}: 'experts' must be a non-empty list of {{path, weight}} entries")
    experts: list[ExpertSpec] = []
    for i, entry in enumerate(experts_raw):
        key = f"experts[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        _check_keys(entry, EXPERT_KEYS, _where(source, key))
        if "path" not in entry:
            raise RecipeError(f"{where}: {key}.path is required")
        path = resolve(_typed(entry["path"], (str,), _where(source, f"{key}.path"), "a path"))
        if check_paths and not Path(path).is_dir():
            raise RecipeError(f"{where}: {key}.path {path} does not exist or is not a folder")
        weight = float(_typed(entry.get("weight", 1.0), (int, float), _where(source, f"{key}.weight"), "a number"))
        experts.append(ExpertSpec(path=path, weight=weight))
    paths = [e.path for e in experts]
    if len(set(paths)) != len(paths):
        raise RecipeError(f"{where}: the same expert folder is listed twice: {paths}")

    kwargs: dict[str, Any] = {}
    method = data.get("method", "task_arithmetic")
    kwargs["method"] = _typed(method, (str,), _where(source, "method"), "a method name")
    params = _check_keys(data.get("parameters") or {}, PARAMETER_KEYS, _where(source, "parameters"))
    for key, value in params.items():
        if key in ("density", "scale"):
            value = float(_typed(value, (int, float), _where(source, f"parameters.{key}"), "a number"))
        elif key == "seed":
            value = _typed(value, (int,), _where(source, "parameters.seed"), "an integer")
        else:
            value = _typed(value, (str,), _where(source, f"parameters.{key}"), "a string")
        kwargs[key] = value

    if "sens" in data and data["sens"] is None:
        kwargs["sens"] = None
    else:
        sens = _check_keys(data.get("sens") or {}, SENS_KEYS, _where(source, "sens"))
        for key, value in sens.items():
            if key == "temperature":
                kwargs["temperature"] = float(_typed(value, (int, float), _where(source, "sens.temperature"), "a number"))
            elif key == "mode":
                kwargs["sens"] = None if value in (None, "none") else _typed(value, (str,), _where(source, "sens.mode"), "a string")
            else:
                kwargs[key] = _typed(value, (str,), _where(source, f"sens.{key}"), "a string")

    output = _check_keys(data.get("output") or {}, OUTPUT_KEYS, _where(source, "output"))
    out_path = output.get("path")
    if out_path is not None:
        out_path = resolve(_typed(out_path, (str,), _where(source, "output.path"), "a path"))
    if "type" in output:
        kwargs["output"] = _typed(output["type"], (str,), _where(source, "output.type"), "'lora' or 'full'")
    if "rank" in output:
        kwargs["rank"] = _typed(output["rank"], (int,), _where(source, "output.rank"), "a positive integer")
    if "dtype" in output:
        kwargs["dtype"] = _typed(output["dtype"], (str,), _where(source, "output.dtype"), "a dtype name")
    if data.get("device") is not None:
        kwargs["device"] = _typed(data["device"], (str,), _where(source, "device"), "a device string")
    kwargs["weights"] = [e.weight for e in experts]

    try:
        config = MergeConfig(**kwargs)
    except ValueError as err:
        raise RecipeError(f"{where}: {err}") from err

    expert_type = data.get("expert_type")
    if expert_type is None:
        kinds = {_detect_expert_type(Path(e.path)) for e in experts} if check_paths else {"lora"}
        if len(kinds) > 1:
            raise RecipeError(f"{where}: experts mix LoRA adapters and full models: {paths}")
        expert_type = kinds.pop()
    elif expert_type not in ("lora", "full"):
        raise RecipeError(f"{where}: expert_type must be 'lora' or 'full', got {expert_type!r}")
    if expert_type == "full" and config.output == "lora":
        if "type" in output:
            raise RecipeError(f"{where}: output.type 'lora' needs LoRA experts; these are full models")
        config = dataclasses.replace(config, output="full")
    return MergeRecipe(base, experts, config, out_path, expert_type, dict(data))


def load_recipe(path: os.PathLike, check_paths: bool = True) -> MergeRecipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty")
    return parse_recipe(data, source=path, check_paths=check_paths)


def run_recipe(
    recipe: MergeRecipe,
    out_dir: Optional[os.PathLike] = None,
    device: Optional[str] = None,
    overwrite: bool = False,
):
    """Run a validated recipe; returns the :class:`~sens_peft.merge.MergeReport`.

    The recipe itself is copied into the output folder as ``sens_peft_recipe.yaml``.
    """
    from .merge import merge_adapters, merge_models  # heavy imports only when a merge runs
    from .validation import check_pretrained_source

    out = out_dir or recipe.output_path
    if out is None:
        raise RecipeError("no output folder: set output.path in the recipe or pass --out")
    config = recipe.config if device is None else dataclasses.replace(recipe.config, device=device)
    paths = [e.path for e in recipe.experts]
    # the recipe is written inside the merge's atomic output folder, so it is there iff the merge is
    extra = {"sens_peft_recipe.yaml": yaml.safe_dump(recipe.source, sort_keys=False)}
    if recipe.expert_type == "full":
        return merge_models(recipe.base_model, paths, out, config=config, overwrite=overwrite, extra_files=extra)
    from transformers import AutoModelForCausalLM

    check_pretrained_source(recipe.base_model, "recipe: base_model")  # from_pretrained would unpickle a .bin
    base = AutoModelForCausalLM.from_pretrained(recipe.base_model)
    return merge_adapters(base, paths, config=config, save_to=out, overwrite=overwrite, extra_files=extra)
