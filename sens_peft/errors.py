"""The library's exception hierarchy: every error sens-peft raises on bad input is a :class:`SensPeftError`.

The CLI catches :class:`SensPeftError` and prints it as one line (exit code 2); ``--debug`` shows the traceback.
Each subclass also derives from the built-in type callers caught before the hierarchy existed (``ValueError``,
``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "SensPeftError",
    "MergeError",
    "SidecarError",
    "RecipeError",
    "UnsupportedSetupError",
    "InputTypeError",
    "DataError",
]


class SensPeftError(Exception):
    """Base class of every error sens-peft raises on bad input or an unsupported setup."""


class MergeError(SensPeftError, ValueError):
    """Bad merge inputs: incompatible experts, missing tensors or sidecars, unsafe output folder, ..."""


class SidecarError(SensPeftError, ValueError):
    """A sidecar file is missing, unreadable, of another format/version, or inconsistent."""


class RecipeError(SensPeftError, ValueError):
    """A merge recipe is malformed: unknown key, wrong type, missing path."""


class UnsupportedSetupError(SensPeftError, RuntimeError):
    """The training setup cannot be scored correctly (raised instead of writing wrong scores)."""


class InputTypeError(SensPeftError, TypeError):
    """An argument has the wrong type (e.g. one string where a list of folders is expected)."""


class DataError(SensPeftError, ValueError):
    """Calibration or probe data the model cannot take (token ids outside its vocabulary, ...)."""
