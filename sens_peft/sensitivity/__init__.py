"""Sensitivity capture: estimators (pure math), the accumulator, the Trainer callback and the calibration pass."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SensitivityCallback": "sens_peft.sensitivity.callback",
    "compute_sensitivity": "sens_peft.sensitivity.calibrate",
    "SensitivityAccumulator": "sens_peft.sensitivity.accumulator",
    "UnsupportedSetupError": "sens_peft.sensitivity.distributed",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sens_peft.sensitivity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
