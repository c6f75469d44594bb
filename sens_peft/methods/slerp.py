"""SLERP: spherical linear interpolation between the full weights of exactly two experts, per tensor, as mergekit's
``slerp`` (``t = 0`` gives the first expert, ``t = 1`` the second).

Over each whole tensor: with ``a``, ``b`` the two experts' tensors (flattened) and ``d`` the cosine of their angle
(norms below 1e-8 read as 1), the merge is ``sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b`` with ``θ = acos d``, or
the linear ``(1-t) a + t b`` where ``|d| > dot_threshold`` (colinear or opposite tensors). The base model is not
part of the formula, and weights, ``scale`` and Sens coefficients do not apply.

``t`` is a number, or a list interpolated over the layers as mergekit's gradients are: layer ``i`` of
``num_layers`` reads the list at ``x = i / (num_layers - 1)``; tensors outside the layers (embeddings, final
norm, head) read it at ``x = 0``.

Full weights only: a LoRA merge (``merge_adapters``) is refused, since its experts' full weights are not formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..groups import layer_group
from .base import MergeContext, MergeMethod, Param
from .common import chunks
from .registry import register_method
from .rowstats import row_grams, row_of
from .streamed import StreamJob

__all__ = ["Slerp", "slerp_coefficients", "t_of"]


@dataclass(frozen=True)
class _NumberOrList(Param):
    """A float parameter that may also be a non-empty list of floats (a per-layer gradient)."""

    def check(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"parameter {self.name!r} must be a number or a non-empty list, got []")
            return tuple(Param.check(self, v) for v in value)
        return Param.check(self, value)

    def describe(self) -> str:
        return f"{self.name} (float or list of floats, default {self.default!r}): {self.help}"


def t_of(name: str, params: Mapping[str, Any]) -> float:
    """The interpolation factor of tensor ``name``: ``t``, or the list ``t`` read at the tensor's layer."""
    t = params["t"]
    if not isinstance(t, (list, tuple)):
        return float(t)
    group = layer_group(name)
    x = 0.0
    if group.startswith("layers."):
        layers = int(params["num_layers"])
        if layers < 1:
            raise ValueError(f"slerp: t is a per-layer list {list(t)}, so num_layers (the base model's number of "
                             f"layers, e.g. config.num_hidden_layers) must be set; tensor {name!r} is in a layer")
        index = int(group.split(".")[1])
        if index >= layers:
            raise ValueError(f"slerp: tensor {name!r} is in layer {index}, but num_layers={layers}")
        x = index / (layers - 1) if layers > 1 else 1.0
    scaled = x * (len(t) - 1)
    low = int(scaled)
    high = min(len(t) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * float(t[low]) + frac * float(t[high])


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
    description = ("SLERP: spherical interpolation of two experts' full weights per tensor (t: number or "
                   "per-layer list); full-model merges only")
    reference = "Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985; mergekit's slerp"
    parameters = (
        _NumberOrList("t", float, 0.5, "0: the first expert, 1: the second; a list is read over the layers"),
        Param("num_layers", int, 0, "the base model's number of layers (needed when t is a list)", low=0),
        Param("dot_threshold", float, 0.9995, "|cos| above which rows are interpolated linearly", low=0.0, high=1.0),
    )
    full_weights = True

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
