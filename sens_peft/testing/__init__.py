"""Test and benchmark fixtures shipped with the package (not public API).

Like ``accelerate.test_utils``: importable so that the quick start, the recipes, the test suite and the quality
benchmark share one synthetic suite, but nothing here is covered by the library's compatibility promise.

* :mod:`sens_peft.testing.toy` -- the character-level toy suite (tokenizer, tasks, a tiny Llama base pre-trained
  on demand, LoRA/full expert training, evaluation); its data live in :mod:`~sens_peft.testing.toy_tasks`
  (tokenizer, tasks, splits, datasets) and its evaluation in :mod:`~sens_peft.testing.toy_eval`, both re-exported
  by ``toy``.
* :mod:`sens_peft.testing.families` -- task families over that suite (``maps``, ``recall``, ``conflict``), each in
  two regimes (``B``: the base half-knows every task; ``A``: it knows none), for ``benchmarks/quality.py``.
"""
