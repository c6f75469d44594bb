"""Distributed helpers: which backend trains the model, local shards, and the one small all-reduce.

* DDP: gradients are averaged and identical on every rank before ``on_pre_optimizer_step``; nothing to reduce.
* FSDP1 (``use_orig_params=True``) and FSDP2 / DTensor: each rank holds a slice of every parameter and of its
  gradient. ``sum |w * g|`` over the local slices, summed over the shard group, is the exact total, so one
  ``all_reduce`` of the per-tensor vector (a few KB) per measured step suffices.
* DeepSpeed ZeRO: the engine steps and zeroes gradients inside ``accelerator.backward``, so no Trainer event sees
  them; :func:`wrap_deepspeed_step` wraps the ZeRO optimizer's ``step`` instead (research/training.md §2.8).

FSDP and DeepSpeed need GPUs and are not exercised by the CPU test suite; the pieces they share with the tested
paths (the estimator, the accumulator, the shard sums of :func:`local_view`) are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import torch.distributed as dist
from torch import Tensor, nn

from ..errors import UnsupportedSetupError  # noqa: F401  (re-exported: defined in sens_peft.errors)

logger = logging.getLogger(__name__)

__all__ = ["detect_backend", "local_view", "all_reduce_sum", "wrap_deepspeed_step", "UnsupportedSetupError"]


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def detect_backend(args: Any, model: nn.Module, optimizer: Any = None) -> str:
    """``"single"``, ``"ddp"``, ``"fsdp"`` or ``"deepspeed"`` for a Trainer run (``args``: TrainingArguments)."""
    if getattr(args, "deepspeed", None) or type(getattr(optimizer, "optimizer", None)).__module__.startswith(
        "deepspeed"
    ) or type(optimizer).__name__ == "DeepSpeedOptimizerWrapper":
        return "deepspeed"
    if getattr(args, "fsdp", None) or type(model).__name__ == "FullyShardedDataParallel" or any(
        _is_dtensor(p) for p in model.parameters()
    ):
        return "fsdp"
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return "ddp" if world > 1 else "single"


def local_view(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2/TP), else the tensor (FSDP1 orig params are already local views)."""
    return t.to_local() if _is_dtensor(t) else t


def all_reduce_sum(vec: Tensor, group: Optional[Any] = None) -> Tensor:
    """Sum ``vec`` over ``group`` in place (no-op without an initialised process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
    return vec


def wrap_deepspeed_step(
    optimizer: Any,
    measure: Callable[..., Optional[Callable[[bool], None]]],
    *,
    zero_stage: int,
) -> Callable[[], None]:
    """Wrap the ZeRO optimizer's ``step`` so ``measure`` sees the gradients before they are consumed.

    Args:
        optimizer: The Trainer's optimizer (accelerate's ``DeepSpeedOptimizerWrapper``; its ``.optimizer`` is the
            ZeRO optimizer that the engine steps).
        measure: Called at the entry of every step as ``measure(get_grad, get_weight, loss_scale)``; it computes
            the sums and returns a ``commit(overflow: bool)`` callable (or None), which the wrapper calls after
            the original step with ``zero_opt.overflow`` so overflow steps are dropped. ``get_grad(p)`` /
            ``get_weight(p)`` return the rank's local fp32 slices (ZeRO-3) or the full tensors (ZeRO-0/1/2,
            through DeepSpeed's collective ``safe_get_full_*`` calls, fine for LoRA-sized sets).
        zero_stage: The ZeRO stage.

    Returns:
        A function that restores the original ``step``.
    """
    zero_opt = getattr(optimizer, "optimizer", optimizer)
    try:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_grad,
            safe_get_local_fp32_param,
            safe_get_local_grad,
        )
    except ImportError as err:  # pragma: no cover - only with DeepSpeed runs
        raise UnsupportedSetupError("DeepSpeed is enabled but deepspeed.utils cannot be imported") from err
    if zero_stage >= 3:
        get_grad, get_weight = safe_get_local_grad, safe_get_local_fp32_param
    else:
        get_grad, get_weight = safe_get_full_grad, safe_get_full_fp32_param
    original = zero_opt.step

    def step(*args: Any, **kwargs: Any) -> Any:
        commit = measure(get_grad, get_weight, float(getattr(zero_opt, "loss_scale", 1.0) or 1.0))
        result = original(*args, **kwargs)
        if commit is not None:
            commit(bool(getattr(zero_opt, "overflow", False)))
        return result

    zero_opt.step = step

    def restore() -> None:
        zero_opt.step = original

    return restore
