"""Merge orchestration: which tensors meet, on which device, in which dtype, and where the result goes.

* ``plan.py``: :func:`plan_merge`, the frozen :class:`MergePlan` every merge is run from (resolved settings,
  records, transferability, coefficients), and :func:`statistic_of`, the one door to captured statistics.
* ``adapters.py``: :func:`merge_adapters` (LoRA adapters inside one PeftModel).
* ``models.py``: :func:`merge_models` (full fine-tunes, disk to disk); ``streaming.py``: its reader, workers and
  per-tensor engine; ``distributed.py``: its collectives under torchrun.

The math lives in :mod:`sens_peft.coefficients` (coefficients per expert and layer group) and
:mod:`sens_peft.methods` (combining task vectors). How coefficients map to modules: for every adapted module (LoRA)
or tensor (full model) the coefficient vector is ``table.for_name(<canonical weight name>)``; the table's values
already include the per-expert user ``weights`` and the global ``scale``, so the methods are called with
``scale=1``. Where only some LoRA experts adapt a module, only they take part, with their own coefficients.
"""

from __future__ import annotations

from .adapters import merge_adapters
from .models import merge_models
from .plan import MergePlan, MergeReport, plan_merge, statistic_of

__all__ = ["MergePlan", "MergeReport", "merge_adapters", "merge_models", "plan_merge", "statistic_of"]
