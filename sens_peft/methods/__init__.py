"""Merge methods: one file per method behind a registry, plus the kernels they share.

Every method combines ``K`` deltas of one tensor with per-expert scalar coefficients ``c_k`` (the Sens-Merging
coefficients of that tensor's group, already multiplied by the user weights) and returns ``scale * combined``. The
math runs in fp32 (fp64 inputs stay fp64) and the result has the dtype of ``deltas[0]``.

Layout (a newcomer finds every formula in one file):

* ``base.py``: :class:`MergeMethod` (declarations and hooks), :class:`MergeContext`, :class:`Param`.
* ``registry.py``: :func:`register_method`, :func:`get_method`, :func:`available_methods`.
* ``task_arithmetic.py``, ``ties.py``, ``dare.py`` (``dare_linear``, ``dare_ties``), ``importance.py``,
  ``ties_frequency.py``, ``regmean.py``, ``fisher.py``, ``della.py`` (``della``, ``della_linear``),
  ``della_sensitivity.py``, ``breadcrumbs.py`` (``breadcrumbs``, ``breadcrumbs_ties``), ``slerp.py``,
  ``model_stock.py``, ``probe_fit.py``: the methods.
* ``dense.py``: :func:`merge_deltas` (whole tensors); ``streamed.py``: :func:`merge_streamed` (chunked, full
  models) and its kernels; ``selection.py``: TIES's exact trim, sign election, disjoint mean; ``rng.py``: DARE's
  masks; ``bits.py``: bit-packed masks drawn ahead; ``common.py``: small shared helpers; ``drops.py``: the rank-based
  drops (MagPrune, outlier trim) and their chunk kernel; ``rowstats.py``: per-row inner products (SLERP, Model Stock).

A new method is one new module here, imported below (or by the user before merging): it appears in
:func:`available_methods`, ``MergeConfig``, YAML recipes, merge cards and ``sens-peft merge --help``.
"""

from __future__ import annotations

from . import (  # noqa: F401  (register)
    breadcrumbs,
    dare,
    della,
    della_sensitivity,
    fisher,
    importance,
    model_stock,
    probe_fit,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    ties_frequency,
)
from .base import FitProblem, FitResult, MergeContext, MergeMethod, Param
from .bits import dare_masks, pack_bits, unpack_bits
from .common import DEFAULT_CHUNK
from .dense import TRIM_BY, merge_deltas
from .registry import available_methods, get_method, register_method
from .rng import DARE_RNGS, counter_keep, dare_keep_mask, dare_mask, stable_seed
from .selection import MAJORITY_SIGN_METHODS, disjoint_mean, elect_sign, magnitude_trim_mask, trim_thresholds
from .streamed import StreamJob, merge_streamed

__all__ = [
    "DARE_RNGS",
    "DEFAULT_CHUNK",
    "FitProblem",
    "FitResult",
    "MAJORITY_SIGN_METHODS",
    "MergeContext",
    "MergeMethod",
    "Param",
    "StreamJob",
    "TRIM_BY",
    "available_methods",
    "counter_keep",
    "dare_keep_mask",
    "dare_mask",
    "dare_masks",
    "disjoint_mean",
    "elect_sign",
    "get_method",
    "magnitude_trim_mask",
    "merge_deltas",
    "merge_streamed",
    "pack_bits",
    "register_method",
    "stable_seed",
    "trim_thresholds",
    "unpack_bits",
]
