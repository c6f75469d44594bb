"""Argument checks: a list of folders (not one string), no input twice, no output inside an input."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from ..errors import InputTypeError, MergeError
from ..model_files import PathLike


def check_path_list(items: Any, what: str) -> list[Any]:
    """``items`` as a list; one string/path instead of a list is an error, not a list of characters."""
    if isinstance(items, (str, bytes, os.PathLike)):
        raise InputTypeError(
            f"{what} must be a list (of folders, one entry per expert), got the single {type(items).__name__} "
            f"{os.fsdecode(items)!r}; pass [{os.fsdecode(items)!r}]"
        )
    try:
        return list(items)
    except TypeError as err:
        raise InputTypeError(f"{what} must be a list (of folders, one entry per expert), got "
                             f"{type(items).__name__}") from err


def _identity(item: Any) -> str:
    """A folder's resolved path (symlinks and spellings agree), anything else its string."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if path.exists():
            return str(path.resolve())
    return str(item)


def check_distinct_inputs(items: Iterable[Any], what: str) -> None:
    """MergeError when one input is listed twice, through a symlink or another spelling of its path included."""
    seen: dict[str, Any] = {}
    for item in items:
        key = _identity(item)
        if key in seen:
            same = "" if str(seen[key]) == str(item) else f" (as {str(seen[key])!r} and {str(item)!r})"
            raise MergeError(f"{what} are listed more than once: [{key!r}]{same}; each expert may be merged only "
                             "once (symlinks and other spellings of a path are resolved)")
        seen[key] = item


def check_output_location(out: PathLike, inputs: Iterable[Optional[PathLike]]) -> None:
    """MergeError when the output folder is an input folder, lies inside one, or contains one."""
    out_path = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp_path = Path(inp).expanduser().resolve()
        if not inp_path.exists():
            continue  # an adapter name, not a folder
        if out_path == inp_path or out_path.is_relative_to(inp_path) or inp_path.is_relative_to(out_path):
            raise MergeError(
                f"output folder {out_path} overlaps the input folder {inp_path}; choose an output outside the inputs "
                "(the base model's folder is an input too)"
            )


def model_source_folder(model: Any) -> Optional[Path]:
    """The local folder a transformers model (or a PeftModel's base) was loaded from, when there is one."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        for attr in ("name_or_path",):
            value = getattr(model, attr, None)
            if isinstance(value, str) and value and Path(value).expanduser().is_dir():
                return Path(value).expanduser().resolve()
        config = getattr(model, "config", None)
        value = getattr(config, "_name_or_path", None)
        if isinstance(value, str) and value and Path(value).expanduser().is_dir():
            return Path(value).expanduser().resolve()
        inner = getattr(model, "base_model", None)
        model = getattr(inner, "model", None) if inner is not None and inner is not model else None
    return None
