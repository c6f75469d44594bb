"""mergekit YAML recipes: detected by their keys, validated before anything loads, mapped onto sens-peft's methods.

A mergekit recipe (``merge_method``, ``models:`` of ``{model, parameters}``, ``base_model``, ``parameters``,
``dtype``...) runs here for the methods both libraries have, with mergekit's meaning (read from mergekit 0.1.5's
``generalized_task_arithmetic.py``, ``linear.py``, ``config.py`` and ``plan.py``):

* ``linear``: ``Σ w_k θ_k / Σ w_k`` over the listed models (and ``base_model`` when given, with the recipe-wide
  weight, as mergekit adds it). Merged as the base plus ``Σ (w_k / Σ w) δ_k``, which is the same sum.
* ``task_arithmetic`` / ``dare_linear``: ``θ₀ + λ Σ w_k δ_k`` (divided by ``Σ w_k`` with ``normalize: true``).
* ``ties`` / ``dare_ties``: each delta trimmed to its top-``density`` entries by magnitude (TIES) or dropped at
  random with keep probability ``density`` (DARE), weighted, a sign elected on the weighted deltas (``"sum"``),
  then the agreeing entries summed and divided by the sum of the agreeing experts' weights (``normalize: true``,
  TIES's default) or not divided (``normalize: false``, DARE-TIES's default), times ``λ``.
* Per-model ``weight`` and ``density``; numbers, gradient lists over the layers (block ``i`` of ``L`` at
  ``t = i / (L - 1)``, other tensors at ``t = 0``, linear interpolation) and ``{filter, value}`` conditions; a
  model's own setting first, then the recipe-wide ``parameters:``.
* ``della`` / ``della_linear`` (``generalized_task_arithmetic.py``, ``sparsify.della_magprune``): each delta
  dropped at random with a keep probability rising with the entry's magnitude rank in its row (``density ±
  epsilon``), rescaled to its L1 norm (``rescale: true``, the default) or not, then weighted and sign-elected
  (``della``: the agreeing entries divided by their weights' sum with ``normalize: true``, the default) or summed
  (``della_linear``), times ``λ``. sens-peft's ``della`` / ``della_linear`` with ``rescale: l1`` / ``none``.
* ``breadcrumbs`` / ``breadcrumbs_ties`` (``sparsify.magnitude_outliers``): the ``gamma`` fraction of largest
  entries and the smallest dropped (``density`` kept), then summed or sign-elected as above (``normalize``
  defaults to false for both).
* ``slerp`` (``slerp.py``): exactly two inputs, ``base_model`` (``t = 0``) and one other model (``t = 1``), the
  base listed under ``models:`` or not; ``t`` (required, recipe-wide: a number, a per-layer gradient list or
  ``{filter, value}`` conditions) is sens-peft's slerp ``t``, whose per-layer lists are spread over the base
  model's layers (its ``config.json``) when the merge runs.
* ``model_stock`` (``model_stock.py``): at least two models besides ``base_model``; ``filter_wise`` honoured; mergekit
  takes no per-model parameters here (every model counts equally), so none are accepted.
* ``dtype`` / ``out_dtype``: the output dtype (the math runs in fp32; mergekit computes in ``dtype``).

Refused with an error naming the key: ``int8_mask: true`` (a memory option of mergekit's mask that sens-peft has no
counterpart for), ``rescale: true`` for TIES (mergekit's L1-norm rescale of the trimmed deltas), ``rescale: false``
for DARE (sens-peft's DARE always rescales), ``lambda`` other than 1 with a weight-normalised TIES/DARE-TIES
(the weighted mean cancels sens-peft's scale; also for ``della`` / ``breadcrumbs_ties``), ``rescale: true`` for
breadcrumbs (mergekit's L1 rescale of the kept entries), per-model values of ``density``, ``epsilon`` and ``gamma``
that differ between models or are lists / filters for DELLA and breadcrumbs (sens-peft takes one value each),
per-model ``parameters`` for ``slerp`` and ``model_stock``, ``slerp`` with other than two inputs or with
``model+lora`` references, ``model_stock`` with fewer than two models besides the base, a ``slerp`` without ``t``
or without ``base_model`` (mergekit refuses both too), ``normalize: false`` for ``linear``, ``slices`` / ``modules``,
``tokenizer_source`` other than ``base``, ``tokenizer``, ``chat_template``, ``model+lora`` references whose model
is not the base model, hub ids (local folders only) and every other method. ``base+lora`` references (every model
the base with an adapter) merge the adapters' ``ΔW`` onto the base, as mergekit does after applying each adapter;
the output is a full model. Where results still differ: DARE draws other random masks
(sens-peft's seeded counter masks) and rescales by ``1/density`` (mergekit 0.1.5 matches the delta's L1 norm:
the same in expectation); DELLA draws other random masks (the same probabilities); a TIES trim keeps
``int(density * n)`` entries (mergekit at least one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from .config import SHARED_METHOD_FIELDS, MergeConfig
from .errors import RecipeError
from .methods import get_method
from .model_files import layer_count
from .names import portable_name
from .tensor_settings import check_setting

__all__ = ["MERGEKIT_METHODS", "is_mergekit_recipe", "parse_mergekit_recipe"]

#: mergekit method → (sens-peft method, does it take a base model, its ``normalize`` default, ``rescale`` default;
#: None: not a parameter of that method)
MERGEKIT_METHODS = {
    "linear": ("task_arithmetic", False, True, None),
    "task_arithmetic": ("task_arithmetic", True, False, None),
    "ties": ("ties", True, True, False),
    "dare_linear": ("dare_linear", True, False, True),
    "dare_ties": ("dare_ties", True, False, True),
    "della": ("della", True, True, True),
    "della_linear": ("della_linear", True, False, True),
    "breadcrumbs": ("breadcrumbs", True, False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", True, False, False),
    "slerp": ("slerp", True, None, None),
    "model_stock": ("model_stock", True, None, None),
}
_TOP_KEYS = {"merge_method", "models", "base_model", "dtype", "out_dtype", "parameters", "tokenizer_source",
             "tokenizer", "chat_template", "slices", "modules"}
_SHARED = {"normalize", "lambda", "int8_mask", "rescale"}
_PER_MODEL = {"weight", "density"}
#: mergekit's per-model parameters beyond weight and density, with mergekit's defaults (sens-peft takes one value)
_ONE_VALUE = {"della": {"epsilon": 0.15}, "della_linear": {"epsilon": 0.15}, "breadcrumbs": {"gamma": 0.01},
              "breadcrumbs_ties": {"gamma": 0.01}}
#: Methods that interpolate whole models: their recipe-wide parameters, and no per-model ones
_GEOMETRIC = {"slerp": {"t"}, "model_stock": {"filter_wise"}}
#: Methods with a per-model density in sens-peft (``MergeConfig.densities`` / per-tensor settings)
_PER_EXPERT_DENSITY = ("ties", "dare_linear", "dare_ties")
#: Methods whose non-elected sum is divided by the weights' sum with ``normalize: true``
_WEIGHT_NORMALIZED = ("linear", "task_arithmetic", "dare_linear", "della_linear", "breadcrumbs")
#: Sign-electing methods whose ``normalize: true`` divides by the agreeing entries' weights (λ then cancels here)
_ELECTED = ("ties", "dare_ties", "della", "breadcrumbs_ties")
_DTYPES = ("float32", "float16", "bfloat16")


def _keys(method: str) -> tuple[set[str], set[str]]:
    """``(recipe-wide-only keys, per-model keys)`` of a mergekit method (a per-model key may be set recipe-wide)."""
    if method in _GEOMETRIC:
        return set(_GEOMETRIC[method]), set()
    shared = {"normalize"} if method == "linear" else set(_SHARED)
    return shared, _PER_MODEL | set(_ONE_VALUE.get(method, {}))


def is_mergekit_recipe(data: Any) -> bool:
    """Whether a loaded YAML mapping is a mergekit recipe (``merge_method``, or ``models:`` / ``slices:`` without
    sens-peft's ``experts:``)."""
    return isinstance(data, Mapping) and "experts" not in data and (
        "merge_method" in data or "models" in data or "slices" in data)


def _fail(where: str, key: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: mergekit recipe: {key}: {message}")


def _check_top(data: Mapping[str, Any], where: str) -> str:
    """The mergekit method name, after the top-level keys are checked."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(where, ", ".join(unknown), f"unknown key(s); a mergekit recipe has {sorted(_TOP_KEYS)}")
    for key, why in (("slices", "layer slices (frankenmerges) are not supported; one slice whose sources all span "
                      "every layer is read as models:, else list whole models under models:"),
                     ("modules", "per-module definitions are not supported; list whole models under models:"),
                     ("tokenizer", "tokenizer surgery is not supported; the base model's tokenizer is copied"),
                     ("chat_template", "is not supported; the base model's tokenizer files are copied")):
        if data.get(key) is not None:
            raise _fail(where, key, why)
    method = data.get("merge_method")
    if method is None:
        raise _fail(where, "merge_method", f"is required (one of {sorted(MERGEKIT_METHODS)})")
    if method not in MERGEKIT_METHODS:
        raise _fail(where, "merge_method", f"{method!r} is not supported; sens-peft runs {sorted(MERGEKIT_METHODS)} "
                    "from a mergekit recipe (its other methods: write a sens-peft recipe)")
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        raise _fail(where, "tokenizer_source", f"{source!r} is not supported; only 'base' (the base model's "
                    "tokenizer, which the merge copies) is")
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and value not in _DTYPES:
            raise _fail(where, key, f"{value!r} is not one of {list(_DTYPES)}")
    return method


_SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}


def _slices_as_models(data: Mapping[str, Any], where: str, root: Path, check_paths: bool) -> Mapping[str, Any]:
    """``data`` with one ``slices:`` entry whose sources all span every layer (mergekit's SLERP examples) rewritten
    as the ``models:`` it equals in mergekit (same layer positions for gradients; the slice's ``parameters`` between
    the models' own and the recipe-wide ones, so a key set at both levels is refused). Other slices are refused."""
    slices = data.get("slices")
    if slices is None or data.get("models") is not None or data.get("modules") is not None:
        return data
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        count = len(slices) if isinstance(slices, list) else slices
        raise _fail(where, "slices", f"{count!r} slices: layer slices (frankenmerges) are not supported; one slice "
                    "whose sources all span every layer is (read as models:)")
    out_slice = slices[0]
    unknown = sorted(set(out_slice) - _SLICE_KEYS)
    if unknown:
        raise _fail(where, "slices[0]", f"unknown key(s) {unknown}; a slice has {sorted(_SLICE_KEYS)}")
    for key, why in (("base_model", "set base_model at the top level"),
                     ("residual_weight", "mergekit's residual mix of a slice has no counterpart here")):
        if out_slice.get(key) is not None:
            raise _fail(where, f"slices[0].{key}", f"is not supported: {why}")
    sources = out_slice.get("sources")
    if not isinstance(sources, list) or not sources:
        raise _fail(where, "slices[0].sources", "must be a non-empty list of {model, layer_range, parameters}")
    models = [_slice_source(src, i, where, root, check_paths) for i, src in enumerate(sources)]
    wide, own = data.get("parameters") or {}, out_slice.get("parameters") or {}
    for key, value in (("parameters", wide), ("slices[0].parameters", own)):
        if not isinstance(value, Mapping):
            raise _fail(where, key, f"must be a mapping, got {value!r}")
    both = sorted(set(own) & set(wide))
    if both:
        raise _fail(where, "slices[0].parameters", f"{both} set both here and in the top-level parameters: (mergekit "
                    "falls back from one to the other per tensor); set each key once")
    out = {k: v for k, v in data.items() if k != "slices"}
    out["models"] = models
    if own or wide:
        out["parameters"] = {**wide, **own}
    return out


def _slice_source(src: Any, i: int, where: str, root: Path, check_paths: bool) -> dict[str, Any]:
    """``{model, parameters}`` of ``slices[0].sources[i]``, whose ``layer_range`` must span all the model's layers."""
    key = f"slices[0].sources[{i}]"
    if not isinstance(src, Mapping) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
        raise _fail(where, key, f"must be a mapping with model, layer_range and optional parameters, got {src!r}")
    span = src.get("layer_range")
    if (not isinstance(span, (list, tuple)) or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
        raise _fail(where, f"{key}.layer_range", f"must be [first, end] (two integers), got {span!r}")
    layers = None
    folder = Path(_folder(str(src["model"]).split("+")[0], where, f"{key}.model", root, check_paths))
    if (folder / "config.json").is_file():
        try:
            layers = layer_count(json.loads((folder / "config.json").read_text()))
        except (OSError, ValueError):
            layers = None
    if span[0] != 0 or (layers is not None and span[1] != layers) or (layers is None and check_paths):
        whole = f"[0, {layers}]" if layers is not None else "[0, number of layers] (its config.json states none)"
        raise _fail(where, f"{key}.layer_range", f"{list(span)} is not the whole model {whole}: layer slices "
                    "(frankenmerges) are not supported")
    return {"model": src["model"], **({"parameters": src["parameters"]} if src.get("parameters") else {})}


def _folder(ref: str, where: str, key: str, root: Path, check_paths: bool) -> str:
    """A model or adapter reference as a local folder (mergekit resolves against the working folder; the recipe's
    folder is tried next)."""
    for candidate in (Path(os.path.expanduser(ref)), root / os.path.expanduser(ref)):
        if candidate.is_dir():
            return str(candidate.resolve())
    if check_paths:
        raise _fail(where, key, f"{ref!r} is not a local folder (hub ids are not fetched; download the model first)")
    return ref


def _model_ref(ref: Any, where: str, key: str, root: Path, check_paths: bool) -> tuple[str, Optional[str]]:
    """``(model folder, LoRA adapter folder or None)`` of a reference (``model`` or mergekit's ``model+lora``)."""
    if not isinstance(ref, str) or not ref:
        raise _fail(where, key, f"must be a model folder (a string, or model+lora), got {ref!r}")
    parts = ref.split("+")
    if len(parts) > 2 or not all(parts):
        raise _fail(where, key, f"{ref!r} must be a model folder or model+lora_adapter_folder")
    model = _folder(parts[0], where, key, root, check_paths)
    if len(parts) == 1:
        return model, None
    lora = _folder(parts[1], where, key, root, check_paths)
    if check_paths and not (Path(lora) / "adapter_config.json").is_file():
        raise _fail(where, key, f"{parts[1]!r} (after '+') holds no adapter_config.json: not a LoRA adapter")
    return model, lora


def _inputs(entries: list, base_ref: Any, method: str, where: str, root: Path, check_paths: bool
            ) -> tuple[str, list[tuple[str, dict]], bool, bool]:
    """``(base folder, [(expert folder, settings)], expert type is LoRA, the base takes part as an input)``.

    With ``model+lora`` references every model part must be the base model: mergekit applies each adapter to its
    model and merges the results, i.e. ``base + merge(ΔW_k)``, which sens-peft merges from the adapters."""
    refs = [_model_ref(ref, where, f"models[{i}].model", root, check_paths) for i, (ref, _) in enumerate(entries)]
    if base_ref is not None:
        base, base_lora = _model_ref(base_ref, where, "base_model", root, check_paths)
        if base_lora is not None:
            raise _fail(where, "base_model", f"{base_ref!r}: a LoRA-applied base model is not supported")
    else:  # linear without a base: the first model's (its own delta is zero) or the one all adapters apply to
        base = refs[0][0]
    loras = [lora is not None for _, lora in refs]
    if any(loras):
        for i, (model, _) in enumerate(refs):
            if model != base:
                raise _fail(where, f"models[{i}].model", f"{entries[i][0]!r}: with LoRA references every model must "
                            f"be the base model {base_ref or entries[0][0]!r} (+ an adapter); mixing other full "
                            "models with adapters is not supported")
    keys = [lora or model for model, lora in refs]
    for i, key in enumerate(keys):
        if keys.index(key) != i:
            raise _fail(where, f"models[{i}].model", f"{entries[i][0]!r} is listed twice")
    takes_part = any(lora is None and model == base for model, lora in refs) or (
        method == "linear" and base_ref is not None)
    experts = [(key, settings) for key, (_, settings), (model, lora) in zip(keys, entries, refs)
               if lora is not None or model != base]
    return base, experts, any(loras), takes_part


def _shared(params: Mapping[str, Any], method: str, where: str) -> dict[str, Any]:
    """The recipe-wide shared parameters (normalize, lambda, int8_mask, rescale), checked, with mergekit's
    defaults."""
    _, _, normalize, rescale = MERGEKIT_METHODS[method]
    allowed = _keys(method)[0]
    values = {"normalize": normalize, "lambda": 1.0, "int8_mask": False, "rescale": rescale}
    for key in _SHARED & set(params):
        if key not in allowed:
            raise _fail(where, f"parameters.{key}", f"is not a parameter of mergekit's {method}")
        value = params[key]
        kind = (int, float) if key == "lambda" else bool
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise _fail(where, f"parameters.{key}", f"must be {'a number' if key == 'lambda' else 'true or false'} "
                        f"(one value for the whole merge), got {value!r}")
        values[key] = float(value) if key == "lambda" else value
    if values["int8_mask"]:
        raise _fail(where, "parameters.int8_mask", "true is refused: it is a memory option of mergekit's sign mask "
                    "with no counterpart here (sens-peft's masks are packed bits or fp32); remove it")
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties") and values["rescale"]:
        raise _fail(where, "parameters.rescale", "true (mergekit's L1-norm rescale of the trimmed deltas) is not "
                    f"supported for {method}")
    if method.startswith("dare") and not values["rescale"]:
        raise _fail(where, "parameters.rescale", "false is not supported: sens-peft's DARE always rescales the kept "
                    "entries by 1/density")
    if method == "linear" and not values["normalize"]:
        raise _fail(where, "parameters.normalize", "false is not supported for linear (an unnormalised sum of whole "
                    "models); use task_arithmetic for a sum of deltas")
    if method in _ELECTED and values["normalize"] and values["lambda"] != 1.0:
        raise _fail(where, "parameters.lambda", f"{values['lambda']} with normalize: true is not supported (the "
                    "weighted mean of the agreeing entries cancels sens-peft's scale); use lambda: 1 or normalize: "
                    "false")
    return values


def _setting(value: Any, where: str, key: str) -> Any:
    try:
        return check_setting(value, key)
    except ValueError as err:
        raise _fail(where, key, str(err)) from err


def _per_model(entry: Any, i: int, where: str, method: str) -> tuple[Any, dict[str, Any]]:
    """``(model reference, {weight, density... settings})`` of ``models[i]``."""
    key = f"models[{i}]"
    allowed = _keys(method)[1]
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
        raise _fail(where, key, f"must be a mapping with 'model' and optional 'parameters', got {entry!r}")
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise _fail(where, f"{key}.parameters", f"must be a mapping, got {params!r}")
    unknown = sorted(set(params) - allowed)
    if unknown and method in _GEOMETRIC:
        raise _fail(where, f"{key}.parameters", f"{unknown}: mergekit's {method} takes no per-model parameters "
                    f"(its {sorted(_GEOMETRIC[method])} are recipe-wide: set them under the top-level parameters:)")
    if unknown:
        raise _fail(where, f"{key}.parameters", f"unknown or unsupported per-model key(s) {unknown}; supported for "
                    f"{method}: {sorted(allowed)}")
    return entry["model"], {k: _setting(v, where, f"{key}.parameters.{k}") for k, v in params.items()}


def _num_layers(base: str) -> int:
    """The number of transformer blocks (for gradient lists), from the base's config.json (1 when unknown)."""
    path = Path(base) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return 1
    return layer_count(cfg) or 1


def _scalars(sources: list[list[Any]]) -> Optional[list[float]]:
    """Each expert's value when every expert's first setting is a plain number, else None."""
    firsts = [next((s for s in per if s is not None), None) for per in sources]
    if all(isinstance(v, float) for v in firsts):
        return firsts  # type: ignore[return-value]
    return None


def parse_mergekit_recipe(data: Mapping[str, Any], source: Optional[os.PathLike] = None, check_paths: bool = True):
    """Validate a mergekit recipe mapping and build a :class:`~sens_peft.recipe.MergeRecipe`: full models, or LoRA
    adapters of the base model given as mergekit's ``base+adapter`` references (merged into a full model)."""
    from .recipe import ExpertSpec, MergeRecipe

    where = str(source) if source else "recipe"
    root = Path(source).parent if source else Path.cwd()
    original, data = data, _slices_as_models(data, where, root, check_paths)
    method = _check_top(data, where)
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise _fail(where, "parameters", f"must be a mapping, got {params!r}")
    shared_keys, model_keys = _keys(method)
    unknown = sorted(set(params) - shared_keys - model_keys)
    if unknown:
        raise _fail(where, "parameters", f"unknown or unsupported key(s) {unknown}; supported for {method}: "
                    f"{sorted(shared_keys | model_keys)}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise _fail(where, "models", "must be a non-empty list of {model, parameters} entries")
    entries = [_per_model(entry, i, where, method) for i, entry in enumerate(models)]
    base_ref = data.get("base_model")
    if base_ref is None and MERGEKIT_METHODS[method][1]:
        why = "the t = 0 end of the interpolation" if method == "slerp" else "the deltas are taken from it"
        raise _fail(where, "base_model", f"is required by {method} ({why})")
    base, experts, lora, takes_part = _inputs(entries, base_ref, method, where, root, check_paths)
    if method in _GEOMETRIC:
        experts, config, notes = _geometric(method, params, base, experts, lora, data, where)
    else:
        config, notes = _task_arithmetic_family(method, params, entries, base_ref, base, experts, takes_part, data,
                                                where)
    if lora:
        notes["models[].model"] = "model+lora: the adapters' ΔW merged onto the base (output: a full model)"
    if data is not original:
        notes["slices"] = ("one slice whose sources span every layer: read as models: (the same layer positions; "
                           "its parameters between each source's own and the top-level ones)")
    return MergeRecipe(base_model=base, experts=[ExpertSpec(path=p) for p, _ in experts], config=config,
                       output_path=None, expert_type="lora" if lora else "full", source=dict(original),
                       recipe_format="mergekit", notes=notes)


def _task_arithmetic_family(method: str, params: Mapping[str, Any], entries: list, base_ref: Any, base: str,
                            experts: list, takes_part: bool, data: Mapping[str, Any], where: str
                            ) -> tuple[MergeConfig, dict[str, str]]:
    """The config of mergekit's generalized task arithmetic methods (and linear): weights, densities, λ..."""
    shared = _shared(params, method, where)
    wide = {k: _setting(params[k], where, f"parameters.{k}") for k in _keys(method)[1] & set(params)}
    if method == "linear" and "density" in wide:
        raise _fail(where, "parameters.density", "is not a parameter of mergekit's linear")
    for i, (_, settings) in enumerate(entries):
        if method == "linear" and "density" in settings:
            raise _fail(where, f"models[{i}].parameters.density", "is not a parameter of mergekit's linear")
    if not experts:
        raise _fail(where, "models", "lists no model besides the base model: nothing to merge")
    for folder, settings in experts:
        if "weight" not in settings and "weight" not in wide:
            raise _fail(where, "parameters.weight", f"model {portable_name(folder)!r} has none (mergekit requires a "
                        "weight per model, or parameters.weight)")
    base_weight = None
    if method == "linear" and takes_part:
        own = [s for (ref, s) in entries if ref == base_ref or (base_ref is None and ref == entries[0][0])]
        base_weight = [(own[0] if own else {}).get("weight"), wide.get("weight")]
        if all(s is None for s in base_weight):
            raise _fail(where, "base_model", "takes part in a linear merge and has no weight (give it one in "
                        "models: or set parameters.weight)")
    one = _one_values(method, entries, experts, wide, where) if method in _ONE_VALUE else {}
    return _config(method, shared, wide, experts, base_weight, base, data, one)


def _one_values(method: str, entries: list, experts: list, wide: dict, where: str) -> dict[str, float]:
    """density, epsilon / gamma of a DELLA or breadcrumbs recipe: one number each, the same for every model (what
    sens-peft's method takes), mergekit's defaults when unset; checked against mergekit's rules."""
    out: dict[str, float] = {}
    for key, default in {"density": 1.0, **_ONE_VALUE[method]}.items():
        values = {}
        for folder, settings in experts:
            i = next(i for i, (_, s) in enumerate(entries) if s is settings)
            field = f"models[{i}].parameters.{key}" if key in settings else f"parameters.{key}"
            value = settings.get(key, wide.get(key, default))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _fail(where, field, f"{value!r}: per-layer lists and filters are not supported for {method}'s "
                            f"{key} (sens-peft's {method} takes one {key} for the whole merge); give a number")
            values[portable_name(folder)] = float(value)
        if len(set(values.values())) > 1:
            raise _fail(where, f"models[].parameters.{key}", f"differs between models ({values}); sens-peft's "
                        f"{method} takes one {key} for every model")
        out[key] = next(iter(values.values()))
    if not 0.0 < out["density"] <= 1.0:
        raise _fail(where, "parameters.density", f"{out['density']} is outside (0, 1]")
    eps = out.get("epsilon")
    if eps is not None and out["density"] < 1.0 and not (out["density"] - eps > 0.0 and out["density"] + eps < 1.0):
        raise _fail(where, "parameters.epsilon", f"{eps} with density {out['density']}: mergekit requires density ± "
                    "epsilon inside (0, 1)")
    if not 0.0 <= out.get("gamma", 0.0) <= 1.0:
        raise _fail(where, "parameters.gamma", f"{out['gamma']} is outside [0, 1]")
    return out


def _geometric(method: str, params: Mapping[str, Any], base: str, experts: list, lora: bool,
               data: Mapping[str, Any], where: str) -> tuple[list, MergeConfig, dict[str, str]]:
    """``(experts, config, notes)`` of a slerp or model_stock recipe."""
    if method == "slerp":
        if lora:
            raise _fail(where, "models", "slerp interpolates full weights; model+lora references are not supported "
                        "(merge the adapters into full models first)")
        if len(experts) != 1:
            raise _fail(where, "models", f"slerp interpolates exactly 2 models, base_model (t = 0) and one other "
                        f"(t = 1); this recipe has {len(experts)} model(s) besides base_model "
                        f"{[portable_name(p) for p, _ in experts]}")
        if params.get("t") is None:
            raise _fail(where, "parameters.t", "is required by slerp (mergekit has no default): a number, a "
                        "per-layer list or {filter, value} conditions")
        own = {"t": _setting(params["t"], where, "parameters.t")}
        experts = [(base, {})] + experts  # the base is the t = 0 input (our slerp's first expert)
    else:
        if len(experts) < 2:
            raise _fail(where, "models", f"model_stock needs at least 2 models besides base_model (mergekit: at least "
                        f"3 inputs with the base); this recipe has {len(experts)}")
        value = params.get("filter_wise", False)
        if not isinstance(value, bool):
            raise _fail(where, "parameters.filter_wise", f"must be true or false, got {value!r}")
        own = {"filter_wise": value}
    notes = _geometric_notes(method, own, data)
    kwargs: dict[str, Any] = dict(method=MERGEKIT_METHODS[method][0], sens=None, output="full", params=own,
                                  dtype=data.get("out_dtype") or data.get("dtype"),
                                  origin={"format": "mergekit", "merge_method": method, "fields": notes})
    try:
        return experts, MergeConfig(**kwargs), notes
    except ValueError as err:
        raise RecipeError(f"{where}: mergekit recipe: {err}") from err


def _geometric_notes(method: str, own: dict, data: Mapping[str, Any]) -> dict[str, str]:
    """mergekit field → how a slerp / model_stock merge honoured it."""
    notes = {"merge_method": f"{method} (sens-peft {MERGEKIT_METHODS[method][0]})"}
    if method == "slerp":
        notes["base_model"] = "honoured: the t = 0 end of the interpolation (the other model is t = 1)"
        notes["parameters.t"] = (f"honoured ({_plain(own['t'])}: numbers, per-layer lists spread over the base "
                                 "model's layers as its config.json states them, filters by tensor name)")
    else:
        notes["base_model"] = "honoured (the origin of the deltas; weight 1 - t in each tensor)"
        notes["parameters.filter_wise"] = f"honoured ({own['filter_wise']})"
    notes["models[].parameters"] = f"none (mergekit's {method} takes no per-model parameters)"
    _common_notes(notes, data)
    return notes


def _plain(value: Any) -> str:
    """A setting as a short JSON text for the card."""
    return json.dumps(value)


def _common_notes(notes: dict[str, str], data: Mapping[str, Any]) -> None:
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None:
            notes[key] = f"{data[key]} (output dtype; the math runs in fp32)"
    if data.get("tokenizer_source") is not None:
        notes["tokenizer_source"] = "base (the base model's tokenizer files are copied)"


def _method_params(method: str, shared: dict, one: dict) -> dict[str, Any]:
    """Our method's own parameters for a generalized task arithmetic mergekit method."""
    ours = MERGEKIT_METHODS[method][0]
    params: dict[str, Any] = {}
    if ours in ("ties", "dare_ties"):
        params["divisor"] = "weights" if shared["normalize"] else "none"
    if method in ("della", "breadcrumbs_ties"):
        params["normalize"] = shared["normalize"]
        if shared["normalize"]:
            params["divisor"] = "weights"  # mergekit divides by the agreeing entries' weights, not their count
    if method.startswith("della"):
        params.update(epsilon=one["epsilon"], rescale="l1" if shared["rescale"] else "none")
    if method.startswith("breadcrumbs"):
        params["gamma"] = one["gamma"]
    return params


def _config(method: str, shared: dict, wide: dict, experts: list, base_weight: Optional[list], base: str,
            data: Mapping[str, Any], one: dict) -> tuple[MergeConfig, dict[str, str]]:
    """The MergeConfig of a checked mergekit recipe, and what each mergekit field became (for the card)."""
    weights = [[s.get("weight"), wide.get("weight")] for _, s in experts]
    densities = [[s.get("density"), wide.get("density")] for _, s in experts]
    per_expert = method in _PER_EXPERT_DENSITY
    has_density = per_expert and any(d is not None for per in densities for d in per)
    normalize_weights = shared["normalize"] and method in _WEIGHT_NORMALIZED
    settings: dict[str, Any] = {"num_layers": _num_layers(base), "weight": weights, "normalize": normalize_weights,
                                "defaults": {"density": 1.0}}
    if base_weight is not None:
        settings["base_weight"] = base_weight
    if has_density:
        settings["density"] = densities
    kwargs: dict[str, Any] = dict(method=MERGEKIT_METHODS[method][0], sens=None, output="full",
                                  trim_by="magnitude", weighted_election=True, majority_sign_method="total",
                                  scale=shared["lambda"], density=one.get("density", 1.0),
                                  dtype=data.get("out_dtype") or data.get("dtype"))
    uses = get_method(kwargs["method"]).uses  # only the shared fields the method reads (no "ignored" warnings)
    kwargs = {k: v for k, v in kwargs.items() if k not in SHARED_METHOD_FIELDS or k in uses}
    own = _method_params(method, shared, one)
    if own:
        kwargs["params"] = own
    plain_w, plain_d = _scalars(weights), _scalars(densities) if has_density else None
    if plain_w is not None and not normalize_weights:
        kwargs["weights"] = plain_w
        settings.pop("weight")
    if plain_d is not None:
        kwargs["densities"] = plain_d
        settings.pop("density", None)
    if "weight" in settings or "density" in settings:
        kwargs["tensor_settings"] = settings
    notes = _notes(method, shared, data, has_density, one)
    kwargs["origin"] = {"format": "mergekit", "merge_method": method, "fields": notes}
    try:
        return MergeConfig(**kwargs), notes
    except ValueError as err:
        raise RecipeError(f"mergekit recipe: {err}") from err


def _notes(method: str, shared: dict, data: Mapping[str, Any], has_density: bool, one: dict) -> dict[str, str]:
    """mergekit field → how this merge honoured it (the card lists them)."""
    notes = {"merge_method": f"{method} (sens-peft {MERGEKIT_METHODS[method][0]})",
             "models[].parameters.weight": "honoured (numbers, gradient lists, filters)",
             "base_model": "honoured (the origin of the deltas)" if method != "linear" else
             "honoured (an input of the linear mean when given, as in mergekit)"}
    if method in _PER_EXPERT_DENSITY:
        notes["models[].parameters.density"] = "honoured" if has_density else "honoured (default 1: nothing dropped)"
    elif method in _ONE_VALUE:
        for key, value in one.items():
            notes[f"models[].parameters.{key}"] = f"honoured ({value}, one value for every model and tensor)"
    elif method == "task_arithmetic":
        notes["models[].parameters.density"] = "no effect (as in mergekit: task arithmetic does not sparsify)"
    notes["parameters.normalize"] = f"honoured ({shared['normalize']})"
    if method != "linear":
        notes["parameters.lambda"] = f"honoured ({shared['lambda']})"
        notes["parameters.int8_mask"] = "false (true is refused)"
        if method.startswith("dare"):
            notes["parameters.rescale"] = "true: kept entries rescaled by 1/density (mergekit 0.1.5: to the L1 norm)"
        elif method.startswith("della"):
            notes["parameters.rescale"] = (f"honoured ({shared['rescale']}: " + (
                "kept entries rescaled to the delta's L1 norm, as mergekit)" if shared["rescale"] else "no rescale)"))
        else:
            notes["parameters.rescale"] = f"honoured ({shared['rescale']})"
    _common_notes(notes, data)
    if method.startswith("dare") or method.startswith("della"):
        notes["random masks"] = "sens-peft's seeded counter masks (mergekit draws torch.bernoulli)"
    return notes


def portable_recipe(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a mergekit recipe whose model references name folders, not this machine's paths."""
    out = dict(data)
    if out.get("base_model"):
        out["base_model"] = portable_name(out["base_model"])
    models = []
    for entry in out.get("models") or []:
        if isinstance(entry, Mapping):
            entry = {**entry, "model": portable_name(entry.get("model"))}
        elif isinstance(entry, str):
            entry = portable_name(entry)
        models.append(entry)
    if models:
        out["models"] = models
    if isinstance(out.get("slices"), list):
        out["slices"] = [{**piece, "sources": [{**src, "model": portable_name(src.get("model"))}
                                               if isinstance(src, Mapping) else src
                                               for src in piece.get("sources") or []]}
                         if isinstance(piece, Mapping) else piece for piece in out["slices"]]
    return out
