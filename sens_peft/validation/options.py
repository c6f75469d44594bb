"""Option checks: options that cannot apply to this merge or this sensitivity pass are said so (a warning), not
silently ignored."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Optional

logger = logging.getLogger(__name__)


def check_rank(rank: Optional[int], modules: Iterable[Any]) -> None:
    """A merged LoRA rank above ``min(out, in)`` of a module is padded with zero rows: say so."""
    if rank is None:
        return
    small = []
    for module in modules:
        shape = tuple(module.base_weight().shape)
        if len(shape) == 2 and rank > min(shape):
            small.append(f"{module.name} {list(shape)}")
    if small:
        logger.warning("rank=%d exceeds min(out, in) of %d module(s) (e.g. %s); their factors are zero-padded to "
                       "that rank (no information is added, the file is larger)", rank, len(small), small[0])


def warn_unused_options(config: Any, *, sensitivities: Any = None, probes: Any = None, transferability: Any = None,
                        kind: str = "lora") -> None:
    """Log a warning for each given option the merge will not use.

    ``kind``: ``"lora"`` / ``"full"`` (merge_adapters' output) or ``"models"`` (merge_models).
    """
    sens = getattr(config, "sens", None)
    need_cross = sens in ("cross", "task+cross")
    if sensitivities is not None and not uses_sensitivities(config):
        logger.warning("sensitivities= is ignored: sens=%r and trim_by=%r use no sensitivity scores, and method=%r "
                       "reads no captured statistics", sens, getattr(config, "trim_by", None),
                       getattr(config, "method", None))
    if probes is not None and not uses_probes(config, transferability=transferability):
        why = "transferability= is given" if transferability is not None else f"sens={sens!r} has no cross term"
        logger.warning("probes= is ignored: %s", why)
    if transferability is not None and not need_cross:
        logger.warning("transferability= is ignored: sens=%r has no cross term", sens)
    if kind == "lora" and getattr(config, "dtype", None) is not None:
        logger.warning("dtype=%r is ignored for output='lora' (it sets the dtype of output='full' weights)",
                       config.dtype)
    if kind in ("full", "models") and getattr(config, "rank", None) is not None:
        logger.warning("rank=%r is ignored: it sets the rank of a merged LoRA adapter, and this merge writes full "
                       "weights", config.rank)
    if kind in ("full", "models") and getattr(config, "factorization", "randomized") != "randomized":
        logger.warning("factorization=%r is ignored: it factorises a merged LoRA adapter, and this merge writes full "
                       "weights", config.factorization)
    _warn_changed_but_unused(config)


def uses_sensitivities(config: Any) -> bool:
    """Whether a merge with ``config`` reads the sensitivity sidecars (``sensitivities=``): for Sens-Merging's task
    term, a trim by the element maps, or a method's captured statistics (RegMean's Grams, Fisher's E[g²])."""
    sens, trim_by = getattr(config, "sens", None), getattr(config, "trim_by", None)
    auto_trim = trim_by == "auto" and getattr(config, "method", None) == "ties"  # may trim by the element maps
    need_task = sens in ("task", "task+cross") or trim_by == "sensitivity" or auto_trim
    return need_task or _method_reads_statistics(config)


def uses_probes(config: Any, *, transferability: Any = None) -> bool:
    """Whether a merge with ``config`` reads the probe sets (``probes=``): for Sens-Merging's cross term (unless
    ``transferability`` is given), a method fitted on them (``probe_fit``), or the default (``method=None``), whose
    first choice is fitted on them."""
    need_cross = getattr(config, "sens", None) in ("cross", "task+cross") and transferability is None
    if getattr(config, "method", "unset") is None:  # the default fits on them when every expert has one
        return True
    return need_cross or _method_needs_probes(getattr(config, "method", None))


def _method_reads_statistics(config: Any) -> bool:
    """Whether the merge method reads captured statistics from the sidecars (``sensitivities=``); the default
    (``method=None``) reads them to choose between probe-fitted RegMean, RegMean and TA."""
    from ..methods import available_methods, get_method

    method = getattr(config, "method", None)
    if method is None:
        return True
    if method not in available_methods() or not hasattr(config, "method_params"):
        return False
    return bool(get_method(method).needed_statistics(config.method_params()))


def _method_needs_probes(method: Any) -> bool:
    from ..methods import available_methods, get_method

    return method in available_methods() and get_method(method).needs_probes


# Method-dependent MergeConfig fields: each method declares the ones it reads (MergeMethod.uses).
_METHOD_FIELDS = ("density", "majority_sign_method", "trim_by", "weighted_election", "seed", "dare_rng")
# Sens fields: field -> (applies?, why not)
_SENS_ONLY = {
    "temperature": (lambda c: c.sens is not None, "sens=None uses no Sens-Merging coefficients"),
    "max_ratio": (lambda c: c.sens is not None, "sens=None uses no Sens-Merging coefficients"),
    "normalization": (lambda c: c.sens in ("task", "task+cross"), "no task term (sens has no 'task')"),
    "granularity": (lambda c: c.sens is not None, "sens=None uses no Sens-Merging coefficients"),
    "tau_normalization": (lambda c: c.sens in ("cross", "task+cross"), "no cross term (sens has no 'cross')"),
    "alignment": (lambda c: c.sens in ("cross", "task+cross"), "no cross term (sens has no 'cross')"),
}


def _warn_changed_but_unused(config: Any) -> None:
    """Warn for each option set away from its default that this method / sens mode does not read."""
    import dataclasses

    from ..methods import get_method

    if not dataclasses.is_dataclass(config) or not hasattr(config, "method"):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    changed = [n for n in defaults if getattr(config, n) != defaults[n]]
    from ..config import AUTO_METHODS

    # None: whichever it resolves to
    candidates = [name for name, _ in AUTO_METHODS] if config.method is None else [config.method]
    uses = set.intersection(*(set(get_method(name).uses) for name in candidates))
    for name in changed:
        if name in _METHOD_FIELDS and name not in uses:
            logger.warning("%s=%r is ignored with method=%r, sens=%r: the method does not read it (it reads %s)",
                           name, getattr(config, name), config.method, config.sens, sorted(uses) or "none of them")
        elif name in _SENS_ONLY and not _SENS_ONLY[name][0](config):
            logger.warning("%s=%r is ignored with method=%r, sens=%r: %s", name, getattr(config, name),
                           config.method, config.sens, _SENS_ONLY[name][1])


def warn_unused_sensitivity_options(config: Any) -> None:
    """compute_sensitivity runs the calibration pass only: options of the during-training mode do nothing."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    for name in ("mode", "ema", "every_n_steps"):
        if name in defaults and getattr(config, name) != defaults[name]:
            logger.warning("compute_sensitivity: %s=%r is ignored (it applies to SensitivityCallback during "
                           "training; compute_sensitivity always runs the calibration pass)", name,
                           getattr(config, name))
