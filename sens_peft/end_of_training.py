"""Merge at the end of training: a fine-tune that ends with a merged model.

:class:`MergeOnTrainEnd` runs after :class:`~sens_peft.SensitivityCallback` has scored the just-trained expert,
merges it with earlier experts (folders) and writes the merged adapter or model into ``output_dir``, on the main
process only. The trained model is left as it was, so ``trainer.save_model()`` afterwards saves the expert
itself, not the merge.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from transformers import TrainerCallback

from .config import MergeConfig
from .errors import MergeError
from .store import PROBE_FILE, SENSITIVITY_FILE
from .validation import (
    check_adapter_files,
    check_distinct_inputs,
    check_model_folder,
    check_output_location,
    check_path_list,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class MergeOnTrainEnd(TrainerCallback):
    """Merge the expert being trained with earlier experts when training ends.

    Args:
        experts: Folders of the earlier experts (LoRA adapters of the same base, or full models), each with
            its ``sensitivity.safetensors`` / ``probe.safetensors`` when ``sens`` needs them.
        output_dir: Where the merged adapter (``output="lora"``) or model (``output="full"``) is written.
        config: A :class:`~sens_peft.MergeConfig`; keyword arguments override its fields.
        base_model: For full fine-tunes: the base model folder (the task vectors are ``expert - base``).
        overwrite: Replace an existing ``output_dir``.
        allow_pickle: Accept earlier experts stored only as pickles (``adapter_model.bin`` / ``pytorch_model.bin``;
            only for files you trust). By default such folders are refused when the callback is created.
        **merge_kwargs: :class:`~sens_peft.MergeConfig` fields (``method``, ``density``, ``sens``, ...).

    Put it *after* ``SensitivityCallback`` in ``callbacks=[...]``: callbacks run in that order, and the merge
    needs the just-trained expert's scores.

    Example:
        >>> callbacks = [SensitivityCallback(task="code"),  # doctest: +SKIP
        ...              MergeOnTrainEnd(["runs/math", "runs/chat"], "runs/merged", method="ties", density=0.5)]

    Attributes:
        report: The :class:`~sens_peft.merge.MergeReport` of the merge, once it ran.
    """

    def __init__(
        self,
        experts: Sequence[PathLike],
        output_dir: PathLike,
        *,
        config: Optional[MergeConfig] = None,
        base_model: Optional[PathLike] = None,
        overwrite: bool = False,
        allow_pickle: bool = False,
        **merge_kwargs: Any,
    ) -> None:
        self.experts = [Path(e) for e in check_path_list(experts, "MergeOnTrainEnd: experts")]
        missing = [str(e) for e in self.experts if not e.is_dir()]
        if missing:
            raise MergeError(f"MergeOnTrainEnd: expert folders {missing} do not exist")
        check_distinct_inputs(self.experts, "MergeOnTrainEnd: experts")
        self.allow_pickle = bool(allow_pickle)
        for folder in self.experts:
            # checked now, not after hours of training; load_adapter would unpickle adapter_model.bin silently
            if (folder / "adapter_config.json").is_file():
                check_adapter_files(folder, f"MergeOnTrainEnd: expert {folder.name!r}", allow_pickle=allow_pickle)
            else:
                check_model_folder(folder, f"MergeOnTrainEnd: expert {folder.name!r}", allow_pickle=allow_pickle)
        if base_model is not None and Path(base_model).is_dir():
            check_model_folder(base_model, "MergeOnTrainEnd: base_model", allow_pickle=allow_pickle)
        self.output_dir = Path(output_dir)
        check_output_location(self.output_dir, [*self.experts, base_model])
        self.base_model = base_model
        self.overwrite = overwrite
        if config is None:
            self.config = MergeConfig(**merge_kwargs)
        else:
            import dataclasses

            self.config = dataclasses.replace(config, **merge_kwargs) if merge_kwargs else config
        self.report = None

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if not state.is_world_process_zero or model is None:
            return
        scratch = Path(tempfile.mkdtemp(prefix=".sens_peft_eot-", dir=self.output_dir.parent if self.output_dir.parent.exists() else None))
        try:
            # save_pretrained is wrapped by SensitivityCallback while it is attached, so the sidecars land here
            model.save_pretrained(scratch)
            if self.config.sens is not None and not (scratch / SENSITIVITY_FILE).is_file():
                raise MergeError(
                    f"MergeOnTrainEnd: the trained expert has no {SENSITIVITY_FILE}; add SensitivityCallback to "
                    "callbacks *before* MergeOnTrainEnd, or use sens=None"
                )
            from peft import PeftModel

            if isinstance(model, PeftModel):
                self.report = self._merge_lora(model, scratch)
            else:
                self.report = self._merge_full(scratch)
            logger.info("merged the trained expert with %d earlier experts into %s", len(self.experts),
                        self.output_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _merge_lora(self, model, scratch: Path):
        from .merging import merge_adapters
        from .merging.plan import records_wanted

        trained = model.active_adapter
        target = copy.deepcopy(model) if self.config.output == "full" else model
        loaded = []
        try:
            for i, folder in enumerate(self.experts):
                name = f"eot_expert_{i}"
                check_adapter_files(folder, f"MergeOnTrainEnd: expert {folder.name!r}", allow_pickle=self.allow_pickle)
                target.load_adapter(str(folder), adapter_name=name)
                loaded.append(name)
            folders = [scratch, *self.experts]
            sensitivities = [f / SENSITIVITY_FILE for f in folders]
            return merge_adapters(
                target,
                [trained, *loaded],
                config=self.config,
                adapter_name="eot_merged",
                save_to=self.output_dir,
                overwrite=self.overwrite,
                allow_pickle=self.allow_pickle,
                # the adapters are passed by name, so their sidecars are named here whenever the merge reads them
                # (the coefficients, or the method's statistics such as importance's element maps)
                sensitivities=sensitivities if records_wanted(self.config, sensitivities) else None,
                probes=self._probes(folders),
            )
        finally:
            if target is model:
                for name in (*loaded, "eot_merged"):
                    if name in model.peft_config:
                        model.delete_adapter(name)
                model.set_adapter(trained)

    def _probes(self, folders: list[Path]) -> Optional[list[Path]]:
        """The probe files where the merge reads them; for the default (``method=None``, which fits on them when
        every expert has one) only when every folder has one, so that a missing file is a fallback, not an error."""
        from .validation.options import uses_probes

        files = [f / PROBE_FILE for f in folders]
        if self.config.method is None:
            return files if all(f.is_file() for f in files) else None
        return files if uses_probes(self.config) else None

    def _merge_full(self, scratch: Path):
        from .merging import merge_models

        if self.base_model is None:
            raise MergeError("MergeOnTrainEnd: a full fine-tune needs base_model= (the folder the task vectors "
                             "are measured from)")
        return merge_models(self.base_model, [scratch, *self.experts], self.output_dir, config=self.config,
                            overwrite=self.overwrite, allow_pickle=self.allow_pickle)
