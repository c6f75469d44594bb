"""Names that may leave this machine: hub ids stay, local paths become their folder's name.

Sidecars and merge cards travel with adapters to the hub, so they must not record ``/home/alice/runs/...``: a
local path is reduced to its last component (enough to recognise the model), a hub id (``org/name``, which is
not an existing local path and not absolute) is kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["portable_name"]


def portable_name(value: Optional[Union[str, os.PathLike]], fallback: Optional[Union[str, os.PathLike]] = None
                  ) -> Optional[str]:
    """``value`` as it may be shared: a hub id unchanged, a local path (absolute, relative and existing, or
    starting with ``.``/``~``) reduced to its folder name; ``fallback`` (treated the same way) when ``value`` is
    empty."""
    if not value:
        return portable_name(fallback) if fallback else None
    text = str(value)
    path = Path(text).expanduser()
    local = path.is_absolute() or text.startswith((".", "~")) or path.exists() or "\\" in text
    return path.name or text if local else text
