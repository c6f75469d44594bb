"""The model-in-the-loop step of a merge: a method with ``needs_probes`` fits on the experts' probe sets (its
:meth:`~sens_peft.methods.MergeMethod.fit` hook) before any tensor is merged, and its table replaces the plan's.

The entry points build the :class:`~sens_peft.methods.FitProblem` (their deltas, their model); this module holds
what they share: the forward pass of a model with deltas added to some weights, and the plan update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from ..errors import MergeError
from ..methods import FitProblem
from .plan import MergePlan

logger = logging.getLogger(__name__)

__all__ = ["delta_logits", "fit_plan", "fitting_mode"]


def delta_logits(root: torch.nn.Module, paths: Mapping[str, str]):
    """``logits(deltas, batch)`` of ``root`` with ``deltas`` (tensor name → delta) added to the weights at
    ``paths`` (tensor name → parameter path in ``root``), via ``torch.func.functional_call``: the other weights are
    used in place, and the base weights are never copied (only ``W + ΔW`` of the replaced ones is formed)."""
    from torch.func import functional_call

    params = dict(root.named_parameters(remove_duplicate=False))
    missing = sorted(set(paths.values()) - set(params))
    if missing:
        raise MergeError(f"the model has no parameter(s) {missing[:3]} to add merged deltas to")

    def logits(deltas: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        replaced = {}
        for name, delta in deltas.items():
            weight = params[paths[name]]
            replaced[paths[name]] = weight + delta.to(device=weight.device, dtype=weight.dtype)
        return functional_call(root, replaced, args=(), kwargs=dict(batch)).logits

    return logits


@contextlib.contextmanager
def fitting_mode(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """``model`` in eval mode on ``device``, its weights frozen (only the coefficients get gradients), for the fit;
    its mode, device and ``requires_grad`` flags are restored afterwards."""
    was_training = model.training
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    home = params[0].device if params else device
    try:
        if home != device:
            logger.info("moving the model from %s to %s for the probe fit", home, device)
            model.to(device)
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        if home != device:
            model.to(home)
        model.train(was_training)


def fit_plan(plan: MergePlan, problem: FitProblem) -> MergePlan:
    """The plan with the method's fitted coefficient table and its report."""
    result = plan.method.fit(problem)
    if list(result.table.experts) != list(plan.experts):
        raise MergeError(f"method {plan.config.method!r} fitted a table for experts {result.table.experts}, the "
                         f"merge has {plan.experts}")
    if not torch.isfinite(result.table.values).all():
        raise MergeError(f"method {plan.config.method!r} fitted non-finite coefficients")
    return dataclasses.replace(plan, table=result.table, fit=result.report)


#: Largest in-memory probe fit of full models (the base model plus K parts of every merged tensor, in fp32; refused
#: above), and the largest the default (``method=None``) takes on by itself, LoRA parts included (it falls back to
#: RegMean above). Fixed, not read from the device, so that the default merge does not depend on the machine.
MAX_FULL_FIT_BYTES = 4 * 2**30


def full_fit_bytes(base_src, num_experts: int) -> int:
    """Bytes of an in-memory fit of full models: the base and ``num_experts`` parts of every floating tensor of
    ``base_src`` (a :class:`~sens_peft.sources.TensorSource`), in fp32; read from the file headers."""
    numel = sum(math.prod(base_src.shape(n)) for n in base_src.names() if base_src.dtype(n).is_floating_point)
    return (num_experts + 1) * 4 * numel


def default_may_fit(need: int, what: str) -> bool:
    """Whether ``method=None`` may fit on the probes with ``need`` bytes of fp32 parts (``what`` they are): within
    :data:`MAX_FULL_FIT_BYTES`; above it a warning says that the default falls back."""
    if need <= MAX_FULL_FIT_BYTES:
        return True
    logger.warning("method=None: the experts have probe sets, but the fit would hold %.1f GiB (%s) > the %.0f GiB "
                   "limit (sens_peft.merging.fitting.MAX_FULL_FIT_BYTES); the default does not fit on them (ask for "
                   "method='probe_fit', params={'base_method': 'regmean'} where memory allows)", need / 2**30, what,
                   MAX_FULL_FIT_BYTES / 2**30)
    return False


def fit_full_models(plan: MergePlan, inputs, probes, distributed: bool) -> MergePlan:
    """The plan with the coefficients a ``needs_probes`` method fits, for full fine-tunes (``merge_models``).

    In memory: the base model (fp32, on the merge device) and every expert's parts of every tensor that differs
    from the base; refused above :data:`MAX_FULL_FIT_BYTES` and in distributed merges.
    """
    from transformers import AutoModelForCausalLM

    from ..methods import merge_deltas
    from .plan import load_probes

    method = plan.config.method
    if distributed:
        raise MergeError(f"method {method!r} fits on the probes with the whole model in memory; run it on one "
                         "process (distributed=False)")
    need = full_fit_bytes(inputs.base_src, len(plan.experts))
    if need > MAX_FULL_FIT_BYTES:
        raise MergeError(f"method {method!r} on full models holds the base and {len(plan.experts)} parts of every "
                         f"tensor in memory: {need / 2**30:.1f} GiB > the {MAX_FULL_FIT_BYTES / 2**30:.0f} GiB "
                         "limit (sens_peft.merging.fitting.MAX_FULL_FIT_BYTES); merge LoRA adapters instead")
    root = AutoModelForCausalLM.from_pretrained(str(inputs.base), dtype=torch.float32)
    params = dict(root.named_parameters(remove_duplicate=False))
    names = [n for n in inputs.base_src.names() if n in params and params[n].is_floating_point()]
    probe_sets = load_probes(probes, list(inputs.experts), plan.experts, inputs.base_cfg.get("vocab_size"),
                             purpose=f"method {method!r} fits its coefficients on every expert's probe set")
    device, idx = inputs.device, list(range(len(plan.experts)))
    cache: dict[str, list[Tensor]] = {}

    def deltas(name: str) -> list[Tensor]:
        if name not in cache:  # the parts merge each tensor K times: read it once
            cache.clear()
            base = inputs.base_src.get(name).to(device=device, dtype=torch.float32)
            cache[name] = [src.get(name).to(device=device, dtype=torch.float32) - base for src in inputs.expert_srcs]
        return cache[name]

    def merge(name: str, coeffs: Tensor) -> Tensor:
        return merge_deltas(method, deltas(name), coeffs, scale=1.0, **plan.tensor_kwargs(name, idx, device))

    moved = [n for n in names if any(bool(d.any()) for d in deltas(n))]
    problem = FitProblem(experts=plan.experts, tensors={n: idx for n in moved}, deltas=deltas, merge=merge,
                         coefficients=plan.table.for_name, logits=delta_logits(root, {n: n for n in moved}),
                         probes=probe_sets, params={**plan.params(), "scale": plan.config.scale}, device=device)
    with fitting_mode(root, device):
        return fit_plan(plan, problem)
