"""YAML merge recipes: parse, validate (before any heavy work) and run.

A recipe, in the spirit of mergekit's YAML::

    base_model: runs/base            # folder or hub id of the shared base model
    experts:                         # LoRA adapter folders or full model folders (not mixed)
      - path: runs/math
        weight: 1.0                  # optional user weight w_k
        density: 0.5                 # optional per-expert density (ties / dare_linear / dare_ties)
      - path: runs/code
    method: ties                     # any registered method (default: MergeConfig's, ties)
    parameters:                      # shared settings (MergeConfig fields) and the method's own parameters
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

Every key is checked: unknown keys, wrong types and missing paths raise :class:`RecipeError` naming the key. The keys
are derived from :class:`~sens_peft.config.MergeConfig`'s fields and the registered methods' parameters
(:func:`recipe_schema` lists them); unset keys take MergeConfig's defaults. An expert's ``density`` sets
``MergeConfig.densities`` (experts without one take ``parameters.density``).

A mergekit recipe (``merge_method``, ``models:``...) is recognised by its keys and read by
:mod:`sens_peft.mergekit_recipe` with mergekit's meaning.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import MergeConfig
from .errors import RecipeError  # noqa: F401  (re-exported: defined in sens_peft.errors)

EXPERT_KEYS = {"path", "weight", "density"}
_NONE_WORDS = (None, "none")  # `sens: {mode: none}` means the plain method


def _layout() -> dict[str, dict[str, dataclasses.Field]]:
    """Recipe section → key → the MergeConfig field it sets (from the fields' ``recipe`` metadata): the recipe
    keys are derived from MergeConfig, never typed twice. Section ``""`` holds the top-level keys."""
    layout: dict[str, dict[str, dataclasses.Field]] = {}
    for f in dataclasses.fields(MergeConfig):
        section, key = f.metadata["recipe"]
        layout.setdefault(section, {})[key] = f
    return layout


def _kind(f: dataclasses.Field) -> tuple[tuple, str]:
    """The YAML types a field accepts and their description, from its annotation."""
    hint = typing.get_type_hints(MergeConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union \
        else [hint]
    base = args[0] if len(args) == 1 else hint
    if base is bool:
        return (bool,), "true or false"
    if base is float:
        return (int, float), "a number"
    if base is int:
        return (int,), "an integer"
    return (str,), "a string"


def _method_params(method: Any) -> dict[str, Any]:
    """The recipe-visible parameters of a registered method, by name (none for an unknown method)."""
    from .methods import available_methods, get_method

    return {p.name: p for p in get_method(method).parameters} if method in available_methods() else {}


def recipe_schema() -> dict[str, Any]:
    """Every recipe key by section, with what it takes, and each registered method's own parameters."""
    from .methods import available_methods, get_method

    schema: dict[str, Any] = {"": {"base_model": "a path or hub id",
                                   "experts": "a list of {path, weight, density} (density: ties / dare_* only)",
                                   "expert_type": "'lora' or 'full' (default: detected)"}}
    for section, fields in _layout().items():
        if section == "experts":
            continue
        for key, f in fields.items():
            if key != "*":
                schema.setdefault(section, {})[key] = _kind(f)[1]
    schema["methods"] = {name: {p.name: p.describe() for p in get_method(name).parameters}
                         for name in available_methods()}
    return schema


@dataclass
class ExpertSpec:
    path: str
    weight: float = 1.0
    density: Optional[float] = None


@dataclass
class MergeRecipe:
    """A validated merge recipe.

    Attributes:
        recipe_format: ``"sens-peft"`` (this module's schema) or ``"mergekit"``.
        notes: For a mergekit recipe, each of its fields and how the merge honours it.
    """

    base_model: str
    experts: list[ExpertSpec]
    config: MergeConfig
    output_path: Optional[str] = None
    expert_type: str = "lora"
    source: dict[str, Any] = field(default_factory=dict)
    recipe_format: str = "sens-peft"
    notes: dict[str, str] = field(default_factory=dict)


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
    from .mergekit_recipe import is_mergekit_recipe, parse_mergekit_recipe

    if is_mergekit_recipe(data):
        return parse_mergekit_recipe(data, source=source, check_paths=check_paths)
    where = str(source) if source else "recipe"
    layout = _layout()
    _check_keys(data, {"base_model", "expert_type", *layout[""], *(k for k in layout if k)}, where)
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
        raise RecipeError(f"{where}: 'experts' must be a non-empty list of {{path, weight, density}} entries")
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
        density = entry.get("density")
        if density is not None:
            density = float(_typed(density, (int, float), _where(source, f"{key}.density"), "a number in (0, 1]"))
        experts.append(ExpertSpec(path=path, weight=weight, density=density))
    paths = [e.path for e in experts]
    if len(set(paths)) != len(paths):
        raise RecipeError(f"{where}: the same expert folder is listed twice: {paths}")

    kwargs = _config_kwargs(data, source)
    kwargs["weights"] = [e.weight for e in experts]
    if any(e.density is not None for e in experts):
        fallback = kwargs.get("density", MergeConfig.density)
        kwargs["densities"] = [fallback if e.density is None else e.density for e in experts]
    output = data.get("output") or {}
    out_path = output.get("path")
    if out_path is not None:
        out_path = resolve(_typed(out_path, (str,), _where(source, "output.path"), "a path"))

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


def _section_kwargs(section: str, values: dict, source, method: Any) -> dict[str, Any]:
    """MergeConfig keyword arguments from one recipe section (keys and types from the fields; a method's own
    parameters, under ``parameters:``, go to ``params``)."""
    fields = {k: f for k, f in _layout()[section].items() if k != "*"}
    own = _method_params(method) if section == "parameters" else {}
    where = _where(source, section)
    _check_keys(values, set(fields) | set(own) | ({"path"} if section == "output" else set()), where)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key == "path":
            continue  # output.path: where the merge goes, not a setting
        if key in own:
            kwargs.setdefault("params", {})[key] = value  # checked by MergeConfig against the declaration
            continue
        f = fields[key]
        if f.name == "sens" and value in _NONE_WORDS:
            kwargs["sens"] = None
            continue
        if value is None and f.default is None:
            kwargs[f.name] = None
            continue
        types, what = _kind(f)
        value = _typed(value, types, f"{where}.{key}", what)
        kwargs[f.name] = float(value) if float in types else value
    return kwargs


def _config_kwargs(data: dict[str, Any], source) -> dict[str, Any]:
    """MergeConfig keyword arguments from a recipe mapping (every section but ``experts``)."""
    top = _layout()[""]
    kwargs: dict[str, Any] = {}
    for key, f in top.items():
        if data.get(key) is not None:
            types, what = _kind(f)
            kwargs[f.name] = _typed(data[key], types, _where(source, key), what)
    method = kwargs.get("method", MergeConfig.method)
    if "sens" in data and data["sens"] is None:
        kwargs["sens"] = None
    for section in ("parameters", "sens", "output"):
        if section == "sens" and data.get("sens") is None:
            continue
        kwargs.update(_section_kwargs(section, data.get(section) or {}, source, method))
    return kwargs


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
    allow_pickle: bool = False,
):
    """Run a validated recipe; returns the :class:`~sens_peft.merging.MergeReport`.

    The recipe itself is copied into the output folder as ``sens_peft_recipe.yaml``. ``allow_pickle`` accepts
    ``.bin`` weight files (base, adapters, experts): unpickling an untrusted file can run code, so it is off.
    """
    from .merging import merge_adapters, merge_models  # heavy imports only when a merge runs
    from .validation import check_pretrained_source

    out = out_dir or recipe.output_path
    if out is None:
        raise RecipeError("no output folder: pass --out (a mergekit recipe names none), or set output.path in a "
                          "sens-peft recipe")
    config = recipe.config if device is None else dataclasses.replace(recipe.config, device=device)
    paths = [e.path for e in recipe.experts]
    # the recipe is written inside the merge's atomic output folder, so it is there iff the merge is; its paths
    # are reduced to folder names (the copy travels with the merge)
    if recipe.recipe_format == "mergekit":
        from .mergekit_recipe import portable_recipe

        extra = {"mergekit_config.yml": yaml.safe_dump(portable_recipe(recipe.source), sort_keys=False)}
        if recipe.expert_type == "lora":  # as mergekit, the base's tokenizer goes with the merged model
            extra.update(_tokenizer_files(recipe.base_model))
    else:
        extra = {"sens_peft_recipe.yaml": yaml.safe_dump(_portable_source(recipe.source), sort_keys=False)}
    if recipe.expert_type == "full":
        return merge_models(recipe.base_model, paths, out, config=config, overwrite=overwrite, extra_files=extra,
                            allow_pickle=allow_pickle)
    from transformers import AutoModelForCausalLM

    # from_pretrained would unpickle a .bin
    check_pretrained_source(recipe.base_model, "recipe: base_model", allow_pickle=allow_pickle)
    base = AutoModelForCausalLM.from_pretrained(recipe.base_model, use_safetensors=not allow_pickle or None)
    return merge_adapters(base, paths, config=config, save_to=out, overwrite=overwrite, extra_files=extra,
                          allow_pickle=allow_pickle)


def _portable_source(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a sens-peft recipe whose paths (base, experts, output) name folders, not this machine's paths."""
    from .names import portable_name

    out = dict(data)
    if isinstance(out.get("base_model"), str):
        out["base_model"] = portable_name(out["base_model"])
    if isinstance(out.get("experts"), list):
        out["experts"] = [{**e, "path": portable_name(e.get("path"))} if isinstance(e, dict) else portable_name(e)
                          for e in out["experts"]]
    if isinstance(out.get("output"), dict) and out["output"].get("path"):
        out["output"] = {**out["output"], "path": portable_name(out["output"]["path"])}
    return out


def _tokenizer_files(base: str) -> dict[str, str]:
    """The base folder's text tokenizer files (name → content) for a full model merged from adapters (a binary
    ``tokenizer.model`` is left out: the output folder's extra files are text)."""
    from .model_files import COPY_FILES

    out = {}
    for name in COPY_FILES:
        path = Path(base) / name
        if name not in ("config.json", "generation_config.json", "tokenizer.model") and path.is_file():
            out[name] = path.read_text()
    return out
