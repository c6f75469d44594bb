"""``sens-peft demo``: run the quick-start recipe (``recipes/quickstart.py``) on the built-in tiny model."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Optional

_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.py"


def run_demo(output_dir: str = "runs/quickstart", quick: bool = False, recipe: Optional[Path] = None) -> None:
    """Run the quick-start recipe in this process, as ``python recipes/quickstart.py`` would.

    Raises:
        FileNotFoundError: the recipe is not next to the package (a wheel install without the repository).
    """
    recipe = Path(recipe or _RECIPE)
    if not recipe.is_file():
        raise FileNotFoundError(
            f"the quick-start recipe {recipe} is not here: `sens-peft demo` runs recipes/quickstart.py from a "
            "clone of the repository (pip install -e .)"
        )
    argv = [str(recipe), "--output-dir", output_dir] + (["--quick"] if quick else [])
    saved = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(recipe), run_name="__main__")
    finally:
        sys.argv = saved
