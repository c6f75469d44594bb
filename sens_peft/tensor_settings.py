"""Per-tensor values of per-expert settings: mergekit's gradient lists and ``filter:`` conditions.

A *setting* is what a mergekit recipe writes for a parameter (its semantics, in code of our own):

* a number: that value everywhere;
* a list of numbers: a *gradient* over the transformer blocks. Block ``i`` of ``L`` sits at ``t = i / (L - 1)``
  (``t = 1`` when ``L == 1``), every other tensor (embeddings, final norm, head) at ``t = 0``; the value is the
  linear interpolation of the list at ``t * (len - 1)``;
* a list of ``{filter, value}`` conditions: the first whose ``filter`` is absent, ``"*"`` or a substring of the
  tensor name gives the (number or gradient) value; when none matches the setting says nothing for that tensor.

:class:`MergeConfig.tensor_settings <sens_peft.config.MergeConfig>` holds, per key (``"weight"``, ``"density"``),
one list of settings per expert, tried in order (the model's own, then the recipe-wide one), and the key's default
when none says anything. ``"normalize"`` divides each tensor's weights by their sum (plus ``"base_weight"``, the
weight of a base model that takes part in a linear merge without being an expert).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .groups import canonical_name

__all__ = ["check_setting", "check_tensor_settings", "evaluate_setting", "has_gradient", "layer_index", "layer_position",
           "tensor_values"]

KEYS = ("weight", "density")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_TOP_KEYS = {"num_layers", "weight", "density", "defaults", "normalize", "base_weight"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_setting(setting: Any, where: str) -> Any:
    """``setting`` if it is a number, a non-empty list of numbers, or a list of ``{filter, value}`` conditions;
    ValueError naming ``where`` otherwise."""
    if setting is None or _is_number(setting):
        return setting
    if isinstance(setting, Mapping):
        setting = [setting]  # one condition
    if not isinstance(setting, Sequence) or isinstance(setting, (str, bytes)) or not setting:
        raise ValueError(f"{where} must be a number, a non-empty list of numbers (a gradient over the layers) or "
                         f"a list of {{filter, value}} conditions, got {setting!r}")
    if all(_is_number(v) for v in setting):
        return [float(v) for v in setting]
    out = []
    for i, cond in enumerate(setting):
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ValueError(f"{where}[{i}] must be a number (all entries) or a {{filter, value}} condition, "
                             f"got {cond!r}")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise ValueError(f"{where}[{i}].filter must be a string, got {cond['filter']!r}")
        value = check_setting(cond["value"], f"{where}[{i}].value")
        if isinstance(value, list) and value and isinstance(value[0], dict):
            raise ValueError(f"{where}[{i}].value must be a number or a gradient list, not more conditions")
        out.append({"filter": cond.get("filter"), "value": value})
    return out


def check_tensor_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of ``MergeConfig.tensor_settings``."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"tensor_settings must be a mapping, got {type(settings).__name__}")
    unknown = sorted(set(settings) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"tensor_settings: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    layers = settings.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"tensor_settings.num_layers must be a positive integer, got {layers!r}")
    out: dict[str, Any] = {"num_layers": layers, "normalize": bool(settings.get("normalize", False)),
                           "defaults": dict(settings.get("defaults") or {})}
    for key in KEYS:
        if key in settings:
            per_expert = settings[key]
            if not isinstance(per_expert, Sequence) or isinstance(per_expert, (str, bytes)):
                raise ValueError(f"tensor_settings.{key} must be a list (per expert) of lists of settings")
            out[key] = [[check_setting(s, f"tensor_settings.{key}[{k}]") for s in sources]
                        for k, sources in enumerate(per_expert)]
    if settings.get("base_weight") is not None:
        out["base_weight"] = [check_setting(s, "tensor_settings.base_weight") for s in settings["base_weight"]]
    return out


def layer_index(name: str) -> Optional[int]:
    """The transformer block a tensor belongs to (``layers.3.`` → 3), or None outside the blocks."""
    match = _BLOCK_RE.search(canonical_name(name))
    return None if match is None else int(match.group(1))


def has_gradient(setting: Any) -> bool:
    """Whether a checked setting holds a gradient list anywhere (its value then depends on the layer count)."""
    if setting is None or _is_number(setting):
        return False
    if all(_is_number(v) for v in setting):
        return True
    return any(has_gradient(cond["value"]) for cond in setting)


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's ``t`` of a tensor: ``i / (L - 1)`` for block ``i`` of ``L`` (1 when ``L == 1``), else 0."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: Any, name: str, t: float) -> Optional[float]:
    """The value of one setting for tensor ``name`` at layer position ``t`` (None: it says nothing here)."""
    if setting is None or _is_number(setting):
        return None if setting is None else float(setting)
    if all(_is_number(v) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1.0 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        flt = cond["filter"]
        if flt is None or flt == "*" or flt in name:
            return evaluate_setting(cond["value"], name, t)
    return None


def _first(sources: Sequence[Any], name: str, t: float) -> Optional[float]:
    for setting in sources:
        value = evaluate_setting(setting, name, t)
        if value is not None:
            return value
    return None


def tensor_values(settings: Mapping[str, Any], name: str, idx: Sequence[int]) -> dict[str, Optional[list[float]]]:
    """The per-expert ``weights`` and ``densities`` of tensor ``name`` for the experts ``idx`` (None for a key the
    settings do not hold). ValueError naming the tensor and expert when a value is missing or out of range."""
    name = canonical_name(name)
    t = layer_position(name, settings["num_layers"])
    defaults = settings.get("defaults", {})
    out: dict[str, Optional[list[float]]] = {"weights": None, "densities": None}
    for key, label in (("weight", "weights"), ("density", "densities")):
        if key not in settings:
            continue
        values = []
        for k in idx:
            value = _first(settings[key][k], name, t)
            if value is None:
                value = defaults.get(key)
            if value is None:
                raise ValueError(f"no {key} for expert #{k} on tensor {name!r}: no setting (model or recipe-wide) "
                                 "matches it and the key has no default")
            if key == "density" and not 0.0 < value <= 1.0:
                raise ValueError(f"density {value!r} of expert #{k} on tensor {name!r} is outside (0, 1]")
            values.append(float(value))
        out[label] = values
    if settings.get("normalize") and out["weights"] is not None:
        extra = _first(settings.get("base_weight") or [], name, t) or 0.0
        total = math.fsum(out["weights"]) + extra
        if abs(total) >= 1e-8:  # mergekit leaves a (near) zero sum alone
            out["weights"] = [w / total for w in out["weights"]]
    return out
