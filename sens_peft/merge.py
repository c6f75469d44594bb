"""Compatibility shim: the merge entry points now live in :mod:`sens_peft.merging`."""

from __future__ import annotations

from .errors import MergeError
from .merging import MergePlan, MergeReport, merge_adapters, merge_models, plan_merge

__all__ = ["MergeError", "MergePlan", "MergeReport", "merge_adapters", "merge_models", "plan_merge"]
