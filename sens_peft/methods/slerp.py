"""SLERP: spherical linear interpolation between the full weights of exactly two experts, per tensor, as mergekit's
``slerp`` (``t = 0`` gives the first expert, ``t = 1`` the second).

Over each whole tensor: with ``a``, ``b`` the two experts' tensors (flattened) and ``d`` the cosine of their angle
(norms below 1e-8 read as 1), the merge is ``sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b`` with ``θ = acos d``, or
the linear ``(1-t) a + t b`` where ``|d| > dot_threshold`` (colinear or opposite tensors). The base model is not
part of the formula, and weights, ``scale`` and Sens coefficients do not apply.

``t`` is a mergekit setting (:mod:`sens_peft.tensor_settings`, the one implementation of its semantics): a
number; a list interpolated over the layers as mergekit's gradients are (layer ``i`` of ``num_layers`` reads the
list at ``x = i / (num_layers - 1)``; tensors outside the layers, such as embeddings, final norm and head, read it
at ``x = 0``); or ``{filter, value}`` conditions, the first whose ``filter`` is absent, ``"*"`` or a substring of the
tensor name giving the (number or list) value. ``num_layers`` left at 0 is read from the base model's
``config.json`` by :func:`~sens_peft.merging.merge_models` when ``t`` holds a list.

Full weights only: a LoRA merge (``merge_adapters``) is refused, since its experts' full weights are not formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..groups import canonical_name
from ..model_files import LAYER_COUNT_KEYS, layer_count
from ..tensor_settings import check_setting, evaluate_setting, has_gradient, layer_index, layer_position
from .base import MergeContext, MergeMethod, Param
from .common import chunks
from .registry import register_method
from .rowstats import row_grams, row_of
from .streamed import StreamJob

__all__ = ["Slerp", "needs_layer_count", "slerp_coefficients", "t_of"]


@dataclass(frozen=True)
class _Setting(Param):
    """A float parameter that may also be a per-layer gradient list or a list of ``{filter, value}`` conditions
    (a mergekit setting, checked by :func:`~sens_peft.tensor_settings.check_setting`)."""

    def check(self, value: Any) -> Any:
        if isinstance(value, (int, float)) or value is None:
            return Param.check(self, value)
        try:
            setting = check_setting(value, f"parameter {self.name!r}")
        except ValueError as err:
            raise ValueError(str(err)) from None
        if all(isinstance(v, float) for v in setting):
            return tuple(setting)
        return tuple({"filter": c["filter"], "value": tuple(c["value"]) if isinstance(c["value"], list) else
                      c["value"]} for c in setting)

    def describe(self) -> str:
        return (f"{self.name} (float, per-layer list of floats, or {{filter, value}} conditions, default "
                f"{self.default!r}): {self.help}")


def needs_layer_count(params: Mapping[str, Any]) -> bool:
    """Whether ``t`` holds a per-layer list (its value then depends on the number of layers)."""
    t = params["t"]
    return not isinstance(t, (int, float)) and has_gradient(list(t))


def t_of(name: str, params: Mapping[str, Any]) -> float:
    """The interpolation factor of tensor ``name``: ``t`` read for the tensor (its filter, its layer)."""
    t = params["t"]
    if isinstance(t, (int, float)):
        return float(t)
    name = canonical_name(name)  # filters match the weight's name as mergekit writes it, without PEFT prefixes
    layers = int(params.get("num_layers") or 0)
    index = layer_index(name)
    if needs_layer_count(params) and index is not None:
        if layers < 1:
            raise ValueError(f"slerp: t holds a per-layer list {list(t)}, so num_layers (the base model's number of "
                             f"layers, config.num_hidden_layers) must be known; tensor {name!r} is in a layer. "
                             "merge_models reads it from the base model's config.json; elsewhere set num_layers")
        if index >= layers:
            raise ValueError(f"slerp: tensor {name!r} is in layer {index}, but num_layers={layers}")
    value = evaluate_setting(list(t), name, layer_position(name, max(layers, 1)))
    if value is None:
        raise ValueError(f"slerp: no t for tensor {name!r}: none of the conditions {list(t)} matches it (end the "
                         "list with a condition without filter, as mergekit recipes do)")
    return value


def slerp_coefficients(grams: Tensor, t: float, dot_threshold: float) -> tuple[Tensor, Tensor]:
    """``(coef_a, coef_b)`` (float64 ``[rows]``) from the Gram matrices ``[rows, 2, 2]`` of the two inputs (one row:
    the whole tensor)."""
    norms = torch.diagonal(grams, dim1=1, dim2=2).clamp(min=0).sqrt()
    norms = torch.where(norms > 1e-8, norms, torch.ones_like(norms))
    dot = (grams[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1.0, 1.0)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    safe = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    coef_a = torch.where(linear, torch.full_like(dot, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    coef_b = torch.where(linear, torch.full_like(dot, t), torch.sin(t * theta) / safe)
    return coef_a, coef_b


@register_method
class Slerp(MergeMethod):
    """SLERP of the full weights of two experts (``merge_models`` only)."""

    name = "slerp"
    description = ("SLERP: spherical interpolation of two experts' full weights per tensor (t: number, per-layer "
                   "list or mergekit's filter conditions); full-model merges only")
    reference = "Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985; mergekit's slerp"
    parameters = (
        _Setting("t", float, 0.5, "0: the first expert, 1: the second; a list is read over the layers, "
                 "conditions by tensor name (mergekit's t)"),
        Param("num_layers", int, 0, "the base model's number of layers for a per-layer t (0: read from the base "
              "model's config.json by merge_models)", low=0),
        Param("dot_threshold", float, 0.9995, "|cos| above which rows are interpolated linearly", low=0.0, high=1.0),
    )
    full_weights = True

    def model_settings(self, params: Mapping[str, Any], model_config: Mapping[str, Any]) -> dict[str, Any]:
        if int(params.get("num_layers") or 0) > 0 or not needs_layer_count(params):
            return {}
        layers = layer_count(model_config)
        if layers is None:
            raise ValueError(f"slerp's t is a per-layer list, and the config states no layer count (none of "
                             f"{list(LAYER_COUNT_KEYS)}); set parameters.num_layers")
        return {"num_layers": layers}

    def combine(self, stacked: Tensor, coefficients: Tensor, ctx: MergeContext) -> Tensor:
        raise ValueError(f"method 'slerp' interpolates the experts' full weights, not their deltas (tensor "
                         f"{ctx.name!r}): merge with merge_models (or merge_streamed, which gets the base)")

    def _check(self, job: StreamJob) -> None:
        if job.num != 2:
            raise ValueError(f"method 'slerp' interpolates exactly 2 experts; got {job.num} (tensor {job.name!r})")
        if any(abs(c - 1.0) > 1e-12 for c in job.coeffs):
            raise ValueError(f"method 'slerp' takes no weights, scale or Sens coefficients (t sets the mix); tensor "
                             f"{job.name!r} got coefficients {job.coeffs}")

    def stream(self, job: StreamJob) -> bool:
        self._check(job)
        p = job.params
        numel = job.base.numel()
        first, second = job.experts

        def pair(s: int, e: int) -> Tensor:
            return torch.stack([first[s:e].to(torch.float32), second[s:e].to(torch.float32)])

        t = t_of(job.name, p)
        coef_a, coef_b = slerp_coefficients(row_grams(pair, numel, 1, job.chunk, job.device), t,
                                            float(p["dot_threshold"]))
        check = torch.zeros((), dtype=torch.float32, device=job.device)
        for s, e in chunks(job.stop, job.chunk, job.first):
            merged = row_of(coef_a, s, e, numel) * first[s:e].to(torch.float32) \
                + row_of(coef_b, s, e, numel) * second[s:e].to(torch.float32)
            check += merged.sum()
            job.out[s:e].copy_(merged)
        return bool(torch.isfinite(check)) and math.isfinite(float(coef_a.sum() + coef_b.sum()))
