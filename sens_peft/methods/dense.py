"""The dense engine: :func:`merge_deltas` merges whole task vectors of one tensor with a registered method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ..config import TRIM_BY as _TRIM_SETTINGS
from .base import MergeContext
from .common import compute_dtype
from .registry import get_method
from .rng import DARE_RNGS, keep_drawer
from .selection import MAJORITY_SIGN_METHODS, check_densities, expert_densities

__all__ = ["PER_ELEMENT_STATISTICS", "TRIM_BY", "merge_deltas"]

TRIM_BY = tuple(t for t in _TRIM_SETTINGS if t != "auto")  # "auto" is resolved before a tensor is merged
#: Statistic kinds with one value per weight entry (the deltas' shape); others (e.g. "gram") are only stacked.
PER_ELEMENT_STATISTICS = ("element_maps", "fisher")


def _check_deltas(deltas: list, where: str) -> Tensor:
    if not deltas:
        raise ValueError(f"merge_deltas{where}: need at least one delta, got none")
    first = deltas[0]
    for k, delta in enumerate(deltas):
        if not isinstance(delta, Tensor):
            raise TypeError(f"merge_deltas{where}: delta {k} is {type(delta).__name__}, expected a Tensor")
        if delta.shape != first.shape:
            raise ValueError(f"merge_deltas{where}: delta {k} has shape {tuple(delta.shape)}, "
                             f"expected {tuple(first.shape)} (the shape of delta 0)")
        if delta.device != first.device:
            raise ValueError(f"merge_deltas{where}: delta {k} is on {delta.device}, delta 0 on {first.device}")
        if not delta.is_floating_point():
            raise ValueError(f"merge_deltas{where}: delta {k} has dtype {delta.dtype}, expected a float dtype")
    return first


def _stack_statistics(statistics: Mapping[str, Optional[Sequence[Tensor]]], first: Tensor, num: int,
                      dtype: torch.dtype, where: str) -> dict[str, Tensor]:
    """Each given statistic kind stacked ``[K, ...]`` on the deltas' device, checked."""
    stacked = {}
    for kind, items in statistics.items():
        if items is None:
            continue
        items = list(items)
        label = "importance map" if kind == "element_maps" else f"{kind} statistic"
        if len(items) != num:
            raise ValueError(f"merge_deltas{where}: got {len(items)} {label}s for {num} deltas")
        if kind in PER_ELEMENT_STATISTICS:
            for k, item in enumerate(items):
                if tuple(item.shape) != tuple(first.shape):
                    raise ValueError(f"merge_deltas{where}: {label} {k} has shape {tuple(item.shape)}, "
                                     f"expected {tuple(first.shape)}")
        value = torch.stack([item.to(device=first.device, dtype=dtype) for item in items])
        if kind in PER_ELEMENT_STATISTICS and (value < 0).any():
            raise ValueError(f"merge_deltas{where}: {label}s must be non-negative")
        stacked[kind] = value
    return stacked


def merge_deltas(method: str, deltas: Sequence[Tensor], coefficients: Tensor | Sequence[float], *,
                 density: float = 1.0, majority_sign_method: str = "total", scale: float = 1.0,
                 seed: int | None = 0, name: str = "", importance: Sequence[Tensor] | None = None,
                 trim_by: str = "magnitude", weighted_election: bool = True, dare_rng: str = "counter",
                 statistics: Mapping[str, Sequence[Tensor]] | None = None,
                 densities: Sequence[float] | None = None, **params: Any) -> Tensor:
    """Merge the task vectors of one tensor.

    Args:
        method: A registered method name (see :func:`~sens_peft.methods.available_methods`).
        deltas: ``K >= 1`` task vectors of the same shape (any float dtype; all on one device).
        coefficients: ``[K]`` per-expert scalars for this tensor (Sens-Merging ``c_k`` times user weights).
        density: Fraction kept by TIES trimming / DARE's keep probability, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES / DARE-TIES sign election).
        scale: Global coefficient ``lambda`` applied to the combined delta.
        seed: DARE seed: each tensor's masks are a function of ``(seed, name)`` (and the expert's index), so they
            are reproducible and independent of merge order. ``None`` takes them from torch's global RNG
            instead (PEFT's behaviour).
        name: Tensor name (seeds DARE; used in error messages).
        importance: Optional ``K`` non-negative element maps with the deltas' shape (the ``"element_maps"``
            statistic): the weights of ``importance``, the trim scores of ``ties`` with ``trim_by="sensitivity"``.
        trim_by: ``"magnitude"`` (``|delta|``) or ``"sensitivity"`` (``importance``) for TIES trimming.
        weighted_election: Elect TIES signs on the coefficient-scaled deltas (default) or, as PEFT does,
            on the unscaled ones.
        dare_rng: How DARE draws its masks (:data:`~sens_peft.methods.DARE_RNGS`): ``"counter"`` (default; the
            same masks on every device) or ``"torch"`` (``torch.bernoulli`` from a generator seeded with
            :func:`~sens_peft.methods.stable_seed` of ``(seed, name)``: PEFT's masks at that generator state).
        statistics: Other captured statistics by kind (``K`` tensors each), for methods that need them. A method
            missing a statistic it needs raises (or, like ``importance``, documents its fallback); the merge
            entry points check every expert has what the method declares before any tensor is merged.
        densities: Per-expert ``density`` (``K`` values in (0, 1]) for the methods that honour it (TIES, DARE);
            None: ``density`` for every expert.
        **params: The method's own parameters (its declared defaults otherwise).

    Returns:
        The merged delta, ``scale * combined``, with the shape and dtype of ``deltas[0]``, on its device.

    Raises:
        ValueError: on an unknown method, no deltas, mismatched shapes/devices, a wrong number of
            coefficients or importance maps, or an out-of-range option.
    """
    impl = get_method(method)
    where = f" for tensor {name!r}" if name else ""
    deltas = list(deltas)
    first = _check_deltas(deltas, where)
    num = len(deltas)
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"merge_deltas{where}: density must be in (0, 1], got {density!r}")
    for key, value, allowed in (("majority_sign_method", majority_sign_method, MAJORITY_SIGN_METHODS),
                                ("trim_by", trim_by, TRIM_BY), ("dare_rng", dare_rng, DARE_RNGS)):
        if value not in allowed:
            raise ValueError(f"merge_deltas{where}: {key}={value!r} is not one of {list(allowed)}")
    values = dict(density=float(density), majority_sign_method=majority_sign_method, trim_by=trim_by,
                  weighted_election=weighted_election, seed=seed, dare_rng=dare_rng,
                  densities=check_densities(densities, num, f"merge_deltas{where}"))
    values.update({p.name: p.default for p in impl.parameters})
    values.update(impl.check_params(params))

    dtype = compute_dtype(first.dtype)
    device = first.device
    coeffs = torch.as_tensor(coefficients).to(device=device, dtype=dtype).reshape(-1)
    if coeffs.numel() != num:
        raise ValueError(f"merge_deltas{where}: got {coeffs.numel()} coefficients for {num} deltas "
                         "(expected one scalar per expert)")
    if not torch.isfinite(coeffs).all():
        raise ValueError(f"merge_deltas{where}: coefficients must be finite, got {coeffs.tolist()}")
    stats = _stack_statistics({**(statistics or {}), "element_maps": importance}, first, num, dtype, where)
    stacked = torch.stack([delta.to(dtype) for delta in deltas])
    keep_probs = values["densities"] if values["densities"] is not None else float(density)
    draw_keep = keep_drawer(dare_rng, seed, name, first.shape, keep_probs, device) \
        if impl.random and min(expert_densities(values, num)) < 1.0 else None
    ctx = MergeContext(name=name, params=values, statistics=stats, draw_keep=draw_keep, device=device)
    combined = impl.combine(stacked, coeffs, ctx=ctx)
    if scale != 1.0:
        combined = combined * scale
    return combined.to(first.dtype)
