"""sens-peft: sensitivity-guided merging (Sens-Merging) for Hugging Face fine-tunes.

Public API (imported lazily so that ``import sens_peft`` stays cheap)::

    from sens_peft import SensitivityCallback, SensitivityConfig, compute_sensitivity, load_sensitivity
    from sens_peft import merge_adapters, merge_models, MergeConfig
    from sens_peft import load_recipe, run_recipe     # sens-peft or mergekit YAML recipes
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_LAZY = {
    "SensitivityConfig": "sens_peft.config",
    "MergeConfig": "sens_peft.config",
    "SensitivityRecord": "sens_peft.store",
    "ProbeSet": "sens_peft.store",
    "SensPeftError": "sens_peft.errors",
    "SidecarError": "sens_peft.errors",
    "RecipeError": "sens_peft.errors",
    "load_sensitivity": "sens_peft.store",
    "save_sensitivity": "sens_peft.store",
    "load_probe": "sens_peft.store",
    "save_probe": "sens_peft.store",
    "layer_group": "sens_peft.groups",
    "SensitivityCallback": "sens_peft.sensitivity.callback",
    "compute_sensitivity": "sens_peft.sensitivity.calibrate",
    "CoefficientTable": "sens_peft.coefficients",
    "compute_coefficients": "sens_peft.coefficients",
    "transferability_matrix": "sens_peft.transfer",
    "merge_adapters": "sens_peft.merging",
    "merge_models": "sens_peft.merging",
    "MergeReport": "sens_peft.merging",
    "MergeError": "sens_peft.errors",
    "MergeOnTrainEnd": "sens_peft.end_of_training",
    "MergeMethod": "sens_peft.methods",
    "available_methods": "sens_peft.methods",
    "register_method": "sens_peft.methods",
    "load_recipe": "sens_peft.recipe",
    "run_recipe": "sens_peft.recipe",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sens_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

