"""``SensitivityCallback``: measure an expert's sensitivity while (or right after) it trains.

Modes (``SensitivityConfig.mode``):

* ``"after"`` (default): at ``on_train_end`` a calibration pass over ``calibration_samples`` examples of the
  expert's own training data (or ``calibration_data=``) with per-sample gradients (the paper's estimator; see
  :mod:`sens_peft.sensitivity.calibrate`).
* ``"during"``: once per optimizer step in ``on_pre_optimizer_step`` (gradients summed over gradient
  accumulation, averaged over DDP ranks, unscaled and clipped, weights not yet updated): ``sum |w * g|`` per
  trainable tensor with a few foreach kernels, float64 sums on the device, non-finite steps dropped on the device.
  LoRA experts score the adapter factors (``weight_source="adapter"``); full fine-tunes ``theta`` (or ``delta``
  against a snapshot of the weights taken at train start).
* ``"both"``: the ``after`` scores are primary; the ``during`` ones go to ``extra["during.tensor_scores"]`` /
  ``extra["during.group_scores"]`` (names and groups in the ``during.*`` metadata).

Data-aware merge statistics (``SensitivityConfig.gram`` / ``fisher``; :mod:`sens_peft.sensitivity.stats`): the
input Gram matrices (RegMean) and diagonal Fisher maps are captured by the calibration pass only, so in ``"after"``
and ``"both"`` mode, from the final weights. ``"during"`` mode captures neither: the activations and gradients of
earlier steps come from weights that have since changed, and RegMean's objective is to reproduce the final
expert's outputs on its inputs, so a running sum over training would mix in stale models.

Where the files go (main process only):

* wherever the model is saved while the callback is attached: ``model.save_pretrained`` is wrapped, so
  ``trainer.save_model(dir)``, ``model.save_pretrained(dir)`` and every ``checkpoint-N/`` get
  ``sensitivity.safetensors`` (+ ``probe.safetensors``) next to the adapter / model weights, with the latest
  scores. :meth:`SensitivityCallback.detach` restores the original method; :meth:`save` writes explicitly.
* checkpoints also get ``sensitivity_state.safetensors`` (the accumulator: sums and counters) so that
  ``trainer.train(resume_from_checkpoint=...)`` continues the sums; a resumed run gives the same scores as an
  uninterrupted one. This works with default ``TrainingArguments`` (the state is found in
  ``args.resume_from_checkpoint`` or ``output_dir/checkpoint-<global_step>``).
* checkpoint policy in ``"after"`` mode: the calibration pass needs the final weights, so intermediate checkpoints
  hold the probe and the state file only, unless ``calibrate_checkpoints=True`` (a calibration pass at every
  save). At ``on_train_end`` the after-scores are also written into the checkpoint that holds the final weights
  (the last ``checkpoint-<global_step>``, or the best one with ``load_best_model_at_end``). In ``"during"`` /
  ``"both"`` mode every checkpoint holds the during-scores accumulated so far.

Logs (``SensitivityConfig.log_scores``, on by default): the per-group scores join the Trainer's logs as
``sensitivity/<group>`` so every ``report_to`` integration shows them: the running values at each logging step in
``during``/``both`` mode (``sensitivity/during/<group>`` in ``both``), and the final scores once at the end of
training, through the Trainer's log path (``state.log_history`` and every integration's ``on_log``). The Trainer
hands its callbacks one ``logs`` dict in list order, integrations first, so the callback moves itself before the
first integration callback (it finds the Trainer's callback handler on the call stack; callbacks get no reference
to it). Under ``report_to="tensorboard"`` the final alpha per group is also drawn as an image.

Data and loss: ``"during"`` scores the gradients of whatever loss the trainer optimises (SFT, DPO, KTO, GRPO, ...).
The ``after`` pass differentiates a calibration loss chosen at train start from the data's columns and the trainer
(:mod:`~sens_peft.sensitivity.calibration_loss`; the trainer is found on the call stack, like the callback
handler): the LM loss of tokenised examples (``input_ids`` [+ ``labels``]; the trainer's own collator is used when
it yields ``input_ids``, tokenised rows it does not collate are padded here); for TRL's preference pairs
(``DPOTrainer``) the DPO loss per pair against the trainer's reference, or the chosen completions' LM loss where
that cannot be computed (a warning and ``calibration_loss_reason`` in the metadata); for KTO's unpaired rows the
desirable completions' LM loss. The sidecar's ``calibration_loss`` metadata says which (absent: the LM loss), and
``trainer`` names the trainer class. Preference data's probe set is the chosen completions. Prompt-only data (TRL's
``GRPOTrainer``) has nothing to score: ``mode="after"``/``"both"`` raise at train start, ``"during"`` skips the probe
with a warning (pass ``probes=`` at merge time).

Distributed: DDP needs no reduction (save on rank 0); FSDP sums local shards and all-reduces the per-tensor vector;
DeepSpeed has its ZeRO optimizer's ``step`` wrapped (no Trainer event sees its gradients). The ``after`` pass is
not supported under FSDP/DeepSpeed (the model is sharded): that raises at train start; run
:func:`~sens_peft.sensitivity.calibrate.compute_sensitivity` on the saved expert instead. Optimizers that consume
gradients inside backward hooks (layer-wise GaLore, LOMO) leave no gradient to read and raise as well.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..config import SensitivityConfig
from ..lora import active_adapter_name, base_model_name, clean_param_name, detect_expert_type
from ..lora import model_dtype as _model_dtype
from ..lora import unwrap_model as _unwrap
from ..store import PROBE_FILE, ProbeSet, SensitivityRecord, save_probe, save_sensitivity
from ..store import _atomic_save as _atomic_save_tensors
from ..validation import FINGERPRINT_KEY, model_fingerprint, read_state_file
from . import estimators as est
from .accumulator import SensitivityAccumulator
from .calibrate import build_probe, run_calibration
from .calibrate import pad_id_of as _pad_id
from .calibration_data import unusable_data_reason
from .calibration_loss import CALIBRATION_LOSSES, CalibrationLoss, select_calibration_loss
from .distributed import (
    UnsupportedSetupError,
    all_reduce_sum,
    detect_backend,
    local_view,
    wrap_deepspeed_step,
)

logger = logging.getLogger(__name__)

__all__ = ["SensitivityCallback", "STATE_FILE", "UnsupportedSetupError"]

STATE_FILE = "sensitivity_state.safetensors"


class SensitivityCallback(TrainerCallback):
    """Records an expert's sensitivity scores and writes them next to the expert wherever it is saved.

    Args:
        config: Sensitivity settings (default :class:`~sens_peft.config.SensitivityConfig`).
        calibration_data: Data for the ``after`` pass and the probe set (a dataset of tokenised dicts or a
            DataLoader); default: the trainer's training data, collated by its data collator.
        calibrate_checkpoints: In ``after``/``both`` mode, also run the calibration pass at every checkpoint save
            (costs ``calibration_samples`` forward+backward passes per save).
        calibration_loss: What the ``after`` pass differentiates (see
            :mod:`~sens_peft.sensitivity.calibration_loss`): ``"auto"`` (the LM loss for SFT data; for TRL's
            preference pairs the trainer's DPO loss against its reference model, or the chosen completions' LM
            loss where that cannot be computed; for KTO's unpaired rows the desirable completions' LM loss),
            ``"preference"`` (the DPO loss, or an error at train start) or ``"completion"`` (the chosen /
            desirable completions' LM loss).
        **config_kwargs: Fields of :class:`~sens_peft.config.SensitivityConfig` (e.g. ``task="math"``).

    Attributes:
        record: The latest :class:`~sens_peft.store.SensitivityRecord` (after ``on_train_end``; during training,
            :meth:`current_record` builds one from the running sums).
        probe: The probe set, once built.
    """

    def __init__(
        self,
        config: Optional[SensitivityConfig] = None,
        *,
        calibration_data: Any = None,
        calibrate_checkpoints: bool = False,
        calibration_loss: str = "auto",
        **config_kwargs: Any,
    ) -> None:
        if calibration_loss not in CALIBRATION_LOSSES:
            raise ValueError(f"calibration_loss={calibration_loss!r} is not one of {list(CALIBRATION_LOSSES)}")
        config = config or SensitivityConfig()
        if config_kwargs:
            config = dataclasses.replace(config, **config_kwargs)
        self.config = config
        self.calibration_data = calibration_data
        self.calibrate_checkpoints = calibrate_checkpoints
        self.calibration_loss = calibration_loss
        self._loss: Optional[CalibrationLoss] = None
        self._trainer_name: Optional[str] = None
        self.record: Optional[SensitivityRecord] = None
        self.probe: Optional[ProbeSet] = None
        self.accumulator: Optional[SensitivityAccumulator] = None
        self._during = config.mode in ("during", "both")
        self._after = config.mode in ("after", "both")
        self._model: Optional[nn.Module] = None
        self._restore_save: Optional[Any] = None
        self._restore_ds: Optional[Any] = None
        self._params: list[nn.Parameter] = []
        self._names: list[str] = []
        self._initial: Optional[dict[str, Tensor]] = None
        self._is_main = True
        self._args: Any = None
        self._state: Any = None
        self._train_dataloader: Any = None
        self._tokenizer: Any = None
        self._expert_type: Optional[str] = None
        self._backend = "single"
        self._during_source: Optional[str] = None
        self._saved_checkpoints: set[str] = set()
        self._warned_none = False
        self._resumed_without_state: Optional[int] = None
        self._handler: Optional[CallbackHandler] = None
        self._probe_disabled = False
        self._emitting = False

    # ------------------------------------------------------------------ attach / detach save_pretrained
    def _attach(self, model: Optional[nn.Module]) -> None:
        if model is None:
            return
        target = _unwrap(model)
        if self._model is target:
            return
        self.detach()
        original = target.save_pretrained
        had_own = "save_pretrained" in target.__dict__

        @functools.wraps(original)
        def save_pretrained(save_directory: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True) and self._is_main:
                try:
                    self._write_sidecars(self._sidecar_dir(target, save_directory))
                except Exception:  # the model itself is saved; a sidecar failure must say so loudly
                    logger.exception("SensitivityCallback: writing sidecars to %s failed", save_directory)
                    raise
            return result

        object.__setattr__(target, "save_pretrained", save_pretrained)

        def restore() -> None:
            if had_own:
                object.__setattr__(target, "save_pretrained", original)
            else:
                target.__dict__.pop("save_pretrained", None)

        self._model = target
        self._restore_save = restore

    def detach(self) -> None:
        """Restore the model's original ``save_pretrained`` (and a wrapped DeepSpeed step)."""
        if self._restore_save is not None:
            self._restore_save()
        if self._restore_ds is not None:
            self._restore_ds()
        self._restore_save = self._restore_ds = None
        self._model = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter teardown
        try:
            self.detach()
        except Exception:
            pass

    @staticmethod
    def _sidecar_dir(model: nn.Module, directory: Any) -> Path:
        """PEFT saves a non-default adapter in ``<dir>/<adapter>``: put the sidecars next to its weights."""
        directory = Path(os.fspath(directory))
        adapter = active_adapter_name(model) if detect_expert_type(model) == "lora" else None
        if adapter and adapter != "default" and (directory / adapter / "adapter_config.json").is_file():
            return directory / adapter
        return directory

    # ------------------------------------------------------------------ records
    def _base_metadata(self) -> dict[str, Any]:
        model = self._model
        return {
            "expert_type": self._expert_type,
            "base_model": base_model_name(model) if model is not None else None,
            "task": self.config.task,
            "torch_dtype": _model_dtype(model) if model is not None else None,
            FINGERPRINT_KEY: model_fingerprint(getattr(model, "config", None)) or None if model is not None else None,
            "config": self.config.to_dict(),
            "trainer": self._trainer_name,
        }

    def _during_record(self) -> Optional[SensitivityRecord]:
        if self.accumulator is None:
            return None
        meta = self._base_metadata()
        meta.update(
            estimator="taylor_abs",
            weight_source=self._during_source,
            mode="during",
            signed_estimator=f"{self._during_source}_dot_grad",
            every_n_steps=self.config.every_n_steps,
            backend=self._backend,
        )
        if self._args is not None:
            meta["max_grad_norm"] = getattr(self._args, "max_grad_norm", None)
            meta["gradient_accumulation_steps"] = getattr(self._args, "gradient_accumulation_steps", None)
        record = self.accumulator.to_record(metadata=meta)
        tokens = getattr(self._state, "num_input_tokens_seen", 0) if self._state is not None else 0
        if tokens:
            record.metadata["num_tokens"] = str(int(tokens))
        if self._resumed_without_state is not None:
            record.metadata["resumed_without_state"] = str(self._resumed_without_state)
        return record

    def current_record(self) -> Optional[SensitivityRecord]:
        """The after-pass record if it ran, else the during-scores accumulated so far, else None."""
        if self.record is not None:
            return self.record
        return self._during_record()

    def _get_probe(self) -> Optional[ProbeSet]:
        if not self.config.store_probe or self.config.probe_samples == 0:
            return None
        if self.probe is None and not self._probe_disabled:
            data = self._data()
            if data is None:
                return None
            model = self._model
            vocab = getattr(getattr(model, "config", None), "vocab_size", None) if model is not None else None
            name = getattr(self._tokenizer, "name_or_path", None) or None
            try:
                self.probe = build_probe(self._get_loss().probe_data(data), self.config, pad_id=_pad_id(model, self._tokenizer),
                                         vocab_size=vocab, tokenizer_name=name)
            except Exception as err:  # the probe is optional: it must never make the user's save_model fail
                self._skip_probe(f"{type(err).__name__}: {err}")
        return self.probe

    def _skip_probe(self, reason: str) -> None:
        self._probe_disabled = True
        logger.warning(
            "SensitivityCallback: no probe.safetensors will be written (%s). The sensitivity scores are saved as "
            "usual; for the merge's cross-task term pass probes= to the merge (tokenised examples of this task), "
            "or calibration_data= (tokenised input_ids [+ labels]) to the callback.", reason,
        )

    def _data(self) -> Any:
        return self.calibration_data if self.calibration_data is not None else self._train_dataloader

    def _get_loss(self) -> CalibrationLoss:
        """The calibration loss chosen at train start (or, outside a Trainer, from the data alone)."""
        if self._loss is None:
            self._loss = select_calibration_loss(self._data(), model=self._model, expert_type=self._expert_type,
                                                 choice=self.calibration_loss)
        return self._loss

    def _find_trainer(self) -> Any:
        """The Trainer running this callback (found on the call stack; callbacks get no reference to it).

        Only its preference-loss settings and reference model are read (TRL's DPOTrainer), for the after pass.
        """
        frame = sys._getframe(1)
        for _ in range(10):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            handler = getattr(owner, "callback_handler", None)
            if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                return owner
            frame = frame.f_back
        return None

    def _choose_loss(self, model: nn.Module) -> None:
        """Pick the calibration loss from the data's columns and the trainer; say so when it is a stand-in."""
        self._loss = None
        trainer = self._find_trainer()
        self._trainer_name = type(trainer).__name__ if trainer is not None else None
        if self._data() is None:
            return
        self._loss = select_calibration_loss(self._data(), trainer=trainer, model=model,
                                             expert_type=self._expert_type, choice=self.calibration_loss)
        if self._after and self._loss.reason and self.calibration_loss == "auto":
            logger.warning("SensitivityCallback: the calibration pass will score the %s loss, not the trainer's "
                           "own: %s (metadata calibration_loss_reason)", self._loss.name, self._loss.reason)
        elif self._after:
            logger.info("SensitivityCallback: the calibration pass scores the %s loss", self._loss.name)

    def _write_sidecars(self, directory: Any) -> bool:
        record = self.current_record()
        directory = Path(os.fspath(directory))
        wrote = False
        if record is not None:
            save_sensitivity(record, directory)
            wrote = True
        probe = self._get_probe()
        if probe is not None and (record is not None or not (directory / PROBE_FILE).exists()):
            save_probe(probe, directory)
        if not wrote:
            logger.debug("SensitivityCallback: no scores yet, %s gets no sensitivity.safetensors", directory)
        return wrote

    def save(self, directory: Any) -> None:
        """Write ``sensitivity.safetensors`` (+ ``probe.safetensors``) into ``directory``.

        Raises:
            RuntimeError: if there are no scores yet (``after`` mode before the end of training).
        """
        if self.current_record() is None:
            raise RuntimeError(
                "SensitivityCallback.save: no scores yet (mode='after' computes them at the end of training)"
            )
        self._write_sidecars(directory)

    # ------------------------------------------------------------------ state for resume
    def _state_path_candidates(self, args: Any, state: Any) -> list[Path]:
        out = []
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str) and resume:
            out.append(Path(resume))
        out.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return [p / STATE_FILE for p in out]

    def _save_state(self, directory: Path, global_step: int) -> None:
        meta = {"global_step": str(global_step), "mode": self.config.mode}
        tensors: dict[str, Tensor] = {"marker": torch.zeros(1)}
        if self.accumulator is not None:
            meta.update(self.accumulator.state_metadata())
            tensors.update(self.accumulator.state_dict())
        _atomic_save_tensors(tensors, meta, directory / STATE_FILE)

    def _load_state(self, args: Any, state: Any) -> None:
        if self.accumulator is None:
            return
        for path in self._state_path_candidates(args, state):
            if not path.is_file():
                continue
            tensors, meta = read_state_file(path)
            if int(meta.get("global_step", -1)) != int(state.global_step):
                logger.warning("%s is from step %s, not the resumed step %s; ignored", path,
                               meta.get("global_step"), state.global_step)
                continue
            if "abs_sum" not in tensors:
                logger.warning("%s holds no during-mode sums (mode was %r); starting from 0", path, meta.get("mode"))
                return
            self.accumulator.load_state_dict(tensors, meta)
            logger.info("SensitivityCallback: resumed sensitivity sums from %s", path)
            return
        logger.warning(
            "SensitivityCallback: training resumes at step %d but no %s was found (looked in %s); the during-scores "
            "cover only the steps from here on (metadata resumed_without_state)",
            state.global_step, STATE_FILE, [str(p.parent) for p in self._state_path_candidates(args, state)],
        )
        self._resumed_without_state = int(state.global_step)

    # ------------------------------------------------------------------ logs (report_to integrations)
    def _find_handler(self) -> Optional[CallbackHandler]:
        """The Trainer's ``CallbackHandler`` that is calling this event (found on the call stack), if any.

        Callbacks get no reference to the trainer or its handler, and the handler passes one ``logs`` dict to
        its callbacks in list order, the ``report_to`` integrations (added by the Trainer before the user's
        callbacks) first. So entries added in ``on_log`` reach the integrations only if this callback runs before
        them, and the final scores (known only in ``on_train_end``) need the handler to be logged at all.
        """
        frame = sys._getframe(1)
        for _ in range(8):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is self for cb in owner.callbacks):
                return owner
            frame = frame.f_back
        return None

    def _hook_logs(self) -> None:
        """Remember the handler and move this callback before the first ``report_to`` integration callback."""
        if not self.config.log_scores:
            return
        handler = self._find_handler()
        if handler is None:
            return
        self._handler = handler
        try:
            from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        except ImportError:  # pragma: no cover - moved in a future transformers
            return
        kinds = tuple(INTEGRATION_TO_CALLBACK.values())
        callbacks = handler.callbacks
        first = next((i for i, cb in enumerate(callbacks) if isinstance(cb, kinds)), None)
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        if first is not None and first < mine:
            # Moving an entry to an earlier index leaves every later entry where it was, so the handler's loop
            # over this list (running right now) neither skips nor repeats a callback.
            callbacks.insert(first, callbacks.pop(mine))

    def _score_logs(self, record: SensitivityRecord, prefix: str) -> dict[str, float]:
        return {f"{prefix}{group}": float(value) for group, value in record.group_dict().items()}

    def _running_logs(self) -> dict[str, float]:
        acc = self.accumulator
        if acc is None or acc.num_updates == 0:
            return {}
        record = acc.to_record(include_signed=False, element_maps=False)
        return self._score_logs(record, "sensitivity/during/" if self.config.mode == "both" else "sensitivity/")

    def _log_final(self, args: Any, state: Any, control: Any) -> None:
        """Send the final per-group scores through the trainer's log path once (log history + every integration)."""
        record = self.current_record()
        if not self.config.log_scores or record is None:
            return
        if self._handler is None:
            logger.info("SensitivityCallback: no Trainer callback handler found; final scores not logged")
            return
        logs: dict[str, float] = {}
        if self.config.mode == "both" and record.metadata.get("mode") == "during":  # the after pass failed
            logs.update(self._score_logs(record, "sensitivity/during/"))
        else:
            logs.update(self._score_logs(record, "sensitivity/"))
            if self.config.mode == "both":
                logs.update(self._running_logs())
        # What Trainer.log does, minus its epoch / token counters (the trainer itself is out of reach)
        state.log_history.append({**logs, "step": state.global_step})
        self._emitting = True
        try:
            self._handler.on_log(args, state, control, logs)
        finally:
            self._emitting = False
        try:
            self._log_alpha_image(record, int(state.global_step))
        except Exception:  # a picture must not stop training from returning (and the user's save_model after it)
            logger.warning("SensitivityCallback: drawing the alpha heatmap into TensorBoard failed", exc_info=True)

    def _log_alpha_image(self, record: SensitivityRecord, step: int) -> None:
        """Draw the expert's alpha per group (the merge's default normalisation) into TensorBoard, if it reports there.

        Other integrations get the scalars only: the Trainer's log path carries numbers, not images.
        """
        try:
            from transformers.integrations import TensorBoardCallback
        except ImportError:  # pragma: no cover - moved in a future transformers
            return
        writers = [cb.tb_writer for cb in self._handler.callbacks
                   if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None]
        if not writers:
            return
        try:
            from matplotlib.figure import Figure
        except ImportError:
            logger.info("SensitivityCallback: matplotlib is not installed; no alpha heatmap in TensorBoard")
            return
        from ..coefficients import normalize_scores
        from ..config import MergeConfig

        method = MergeConfig().normalization
        alpha = normalize_scores(record.group_scores, method).float().numpy()[:, None]  # [G, 1]
        fig = Figure(figsize=(3.0, 1.5 + 0.3 * len(record.groups)))
        ax = fig.add_subplot()
        image = ax.imshow(alpha, aspect="auto", cmap="viridis")
        ax.set_title(f"alpha ({method})")
        ax.set_xticks([0], [self.config.task or "expert"])
        ax.set_yticks(range(len(record.groups)), record.groups)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        for writer in writers:
            writer.add_figure("sensitivity/alpha", fig, global_step=step, close=False)
            writer.flush()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any):
        if self._emitting or not self.config.log_scores or logs is None or not self._during:
            return
        logs.update(self._running_logs())

    # ------------------------------------------------------------------ events
    def on_init_end(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        self._attach(model)
        self._hook_logs()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       optimizer: Any = None, train_dataloader: Any = None, processing_class: Any = None,
                       **kwargs: Any):
        if model is None:
            raise UnsupportedSetupError("SensitivityCallback needs the model in the callback kwargs")
        self._attach(model)
        self._hook_logs()
        self._args, self._state = args, state
        self._is_main = bool(state.is_world_process_zero)
        self._train_dataloader = train_dataloader
        self._tokenizer = processing_class
        self.record = None
        self._backend = detect_backend(args, model, optimizer)
        self._expert_type = detect_expert_type(model)
        if self._after and self._backend in ("fsdp", "deepspeed"):
            raise UnsupportedSetupError(
                f"SensitivityCallback(mode={self.config.mode!r}) cannot run the calibration pass under "
                f"{self._backend} (sharded model). Use mode='during', or compute_sensitivity() on the saved expert "
                "on one device."
            )
        if self._after and self._data() is None:
            raise UnsupportedSetupError("mode='after' needs training data or calibration_data= for the pass")
        self._choose_loss(model)
        self._check_data()
        unwrapped = _unwrap(model)
        adapter = active_adapter_name(unwrapped) if self._expert_type == "lora" else None
        named = [(clean_param_name(n, adapter), p) for n, p in unwrapped.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if not self._params:
            raise UnsupportedSetupError("SensitivityCallback: the model has no trainable parameters")
        needs_initial = self._expert_type == "full" and (
            (self._during and self.config.resolve_weight_source("full", "during") == "delta")
            or (self._after and self.config.resolve_weight_source("full", "after") == "delta")
        )
        if needs_initial:
            if state.global_step > 0:
                raise UnsupportedSetupError(
                    "weight_source='delta' for a full fine-tune needs the weights at step 0, which a resumed run "
                    "does not have; use weight_source='theta' or compute_sensitivity(..., base_model=...) later"
                )
            # During mode reads the snapshot every step (kept on the device); the after pass once (kept on CPU).
            where = None if self._during else "cpu"
            self._initial = {n: local_view(p).detach().clone().to(where or p.device) for n, p in named}
        if self._during:
            self._during_source = self.config.resolve_weight_source(self._expert_type, "during")
            element_shapes = None
            # "auto" maps are an after-pass feature: in during mode they cost a map-sized buffer all run long
            if self.config.element_maps is True:
                if self._backend == "fsdp":
                    logger.warning("element_maps are not supported in during mode under FSDP; skipped")
                else:
                    element_shapes = {n: tuple(p.shape) for n, p in named}
            device = self._params[0].device
            self.accumulator = SensitivityAccumulator(self._names, device=device, ema=self.config.ema,
                                                      element_shapes=element_shapes)
            self._resumed_without_state = None
            if state.global_step > 0:
                self._load_state(args, state)
            if self._backend == "deepspeed":
                self._install_deepspeed(args, optimizer)

    def _check_data(self) -> None:
        """Refuse an ``after`` pass on data it cannot score; skip the probe (with a warning) where it cannot be built."""
        data = self._data()
        wants_probe = self.config.store_probe and self.config.probe_samples > 0
        self._probe_disabled = False
        if data is None or not (self._after or wants_probe):
            return
        pad = _pad_id(self._model, self._tokenizer)
        loss = self._get_loss()
        if self._after:
            reason = loss.unusable_reason(data, self.config, pad)
            if reason is not None:
                raise UnsupportedSetupError(
                    f"SensitivityCallback(mode={self.config.mode!r}) cannot run its calibration pass: {reason}. "
                    "Use mode='during' (scores the gradients of whatever loss the trainer optimises), or pass "
                    "calibration_data= with tokenised prompt+completion examples."
                )
        if wants_probe:
            reason = unusable_data_reason(loss.probe_data(data), self.config, pad_id=pad)
            if reason is not None:
                self._skip_probe(reason)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any):
        if not self._during or self._backend == "deepspeed" or self.accumulator is None:
            return
        if state.global_step % self.config.every_n_steps != 0:
            return
        self._maybe_unscale(args, optimizer)
        self._measure()

    def on_save(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        if not state.is_world_process_zero:
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not directory.is_dir():
            return
        self._saved_checkpoints.add(str(directory))
        self._save_state(directory, state.global_step)
        if self._after and self.calibrate_checkpoints and model is not None:
            record = self._run_after(model)
            self._write_record(record, directory)
        else:
            self._write_sidecars(directory)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any):
        self._state = state
        if self._after and state.is_world_process_zero and model is not None:
            try:
                self.record = self._run_after(model)
            except Exception as err:
                # Training itself succeeded: raising here would skip the user's save_model() and lose the expert.
                # Keep going without after-scores (no sidecar is written for them) and say how to get them.
                self.record = None
                fallback = (" The during-scores are saved instead (mode='during' in the sidecar)."
                            if self.config.mode == "both" else " No sensitivity.safetensors will be written.")
                logger.error(
                    "SensitivityCallback: the calibration pass at the end of training failed (%s: %s); the trained "
                    "model is unaffected and can be saved as usual.%s Compute the scores afterwards with "
                    "sens_peft.compute_sensitivity(<saved expert>, <its training data>, save_to=<expert folder>"
                    "[, base_model=<base> for an adapter folder]).",
                    type(err).__name__, err, fallback, exc_info=True,
                )
        elif not self._after:
            self.record = self._during_record()
        self._log_final(args, state, control)
        if not state.is_world_process_zero or self.record is None:
            return
        target = None
        if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint:
            target = Path(state.best_model_checkpoint)
        else:
            last = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if str(last) in self._saved_checkpoints:
                target = last
        if target is not None and target.is_dir():
            self._write_sidecars(target)

    # ------------------------------------------------------------------ the after pass
    def _run_after(self, model: nn.Module) -> SensitivityRecord:
        data = self._data()
        trainable = self._names if self._expert_type == "full" else None
        record = run_calibration(model, data, self.config, expert_type=self._expert_type,
                                 initial_weights=self._initial, trainable_names=trainable,
                                 pad_id=_pad_id(model, self._tokenizer), loss=self._get_loss())
        meta = self._base_metadata()
        meta.pop("expert_type", None)
        for key, value in meta.items():
            if value is not None and key not in record.metadata:
                record.metadata[key] = value if isinstance(value, str) else json.dumps(value)
        if self.config.mode == "both":
            during = self._during_record()
            if during is not None:
                record.extra["during.tensor_scores"] = during.tensor_scores
                record.extra["during.group_scores"] = during.group_scores
                if during.signed_scores is not None:
                    record.extra["during.signed_scores"] = during.signed_scores
                record.metadata["during.tensor_names"] = json.dumps(during.tensor_names)
                record.metadata["during.groups"] = json.dumps(during.groups)
                for key in ("weight_source", "num_steps", "num_skipped", "num_samples", "ema"):
                    if key in during.metadata:
                        record.metadata[f"during.{key}"] = during.metadata[key]
                record.metadata["mode"] = "after"
                record.metadata["modes"] = "both"
        return record

    def _write_record(self, record: SensitivityRecord, directory: Path) -> None:
        save_sensitivity(record, directory)
        probe = self._get_probe()
        if probe is not None:
            save_probe(probe, directory)

    # ------------------------------------------------------------------ the during step
    @staticmethod
    def _maybe_unscale(args: Any, optimizer: Any) -> None:
        """transformers < 5.3 unscales fp16 gradients only when it clips; do it here otherwise."""
        scaler = getattr(optimizer, "scaler", None)
        if scaler is None or (getattr(args, "max_grad_norm", 0) or 0) > 0:
            return
        import transformers
        from packaging import version

        if version.parse(transformers.__version__) < version.parse("5.3.0"):
            try:
                scaler.unscale_(optimizer.optimizer)
            except RuntimeError:  # already unscaled this step
                pass

    def _weights(self, params: list[Tensor], names: list[str]) -> list[Tensor]:
        ws = [local_view(p).detach() for p in params]
        if self._during_source == "delta" and self._initial is not None:
            return torch._foreach_sub(ws, [self._initial[n] for n in names])
        return ws

    def _measure(self) -> None:
        acc = self.accumulator
        grads = [p.grad for p in self._params]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            raise UnsupportedSetupError(
                "SensitivityCallback(mode='during'): no trainable tensor has a gradient at on_pre_optimizer_step. "
                "Optimizers that step inside backward hooks (layer-wise GaLore, LOMO) are not supported; use "
                "mode='after'."
            )
        if len(present) == len(grads):
            params, names, gs = self._params, self._names, grads
        else:
            if not self._warned_none:
                logger.info("%d trainable tensors have no gradient this step; scored 0", len(grads) - len(present))
                self._warned_none = True
            params = [self._params[i] for i in present]
            names = [self._names[i] for i in present]
            gs = [grads[i] for i in present]
        gs = [local_view(g) for g in gs]
        ws = self._weights(params, names)
        maps = None
        if acc.element_shapes:
            abs_part, signed_part, maps = est.taylor_scores_and_maps(ws, gs)
        else:
            abs_part, signed_part = est.taylor_scores(ws, gs)
        if len(present) != len(grads):
            idx = torch.tensor(present, device=abs_part.device)
            full_abs = abs_part.new_zeros(len(grads)).index_copy_(0, idx, abs_part)
            full_signed = signed_part.new_zeros(len(grads)).index_copy_(0, idx, signed_part)
            abs_part, signed_part = full_abs, full_signed
        if self._backend == "fsdp":
            vec = all_reduce_sum(torch.cat([abs_part, signed_part]))
            abs_part, signed_part = vec[: len(grads)], vec[len(grads) :]
        elements = dict(zip(names, maps)) if maps is not None else None
        acc.update(abs_part, signed_part, elements=elements, samples=float(self._samples_per_step()))

    def _samples_per_step(self) -> int:
        args = self._args
        if args is None:
            return 0
        world = getattr(args, "world_size", 1) or 1
        return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(world)

    def _install_deepspeed(self, args: Any, optimizer: Any) -> None:
        """Wrap the ZeRO optimizer's step; untested here (needs GPUs + DeepSpeed)."""
        if optimizer is None:
            raise UnsupportedSetupError("DeepSpeed run without an optimizer in the callback kwargs")
        zero_opt = getattr(optimizer, "optimizer", optimizer)
        stage = 3 if type(zero_opt).__name__.startswith("DeepSpeedZeroOptimizer_Stage3") else 2
        params = self._params

        def measure(get_grad, get_weight, loss_scale):
            if self.state_step() % self.config.every_n_steps != 0:
                return None
            ws, gs, keep = [], [], []
            for i, p in enumerate(params):
                g = get_grad(p)
                w = get_weight(p)
                if g is None or w is None:
                    continue
                if self._during_source == "delta" and self._initial is not None:
                    raise UnsupportedSetupError("weight_source='delta' is not supported under DeepSpeed")
                ws.append(w)
                gs.append(g)
                keep.append(i)
            abs_part = torch.zeros(len(params), dtype=torch.float32, device=params[0].device)
            signed_part = torch.zeros_like(abs_part)
            if keep:
                a, s = est.taylor_scores(ws, gs)
                idx = torch.tensor(keep, device=abs_part.device)
                abs_part.index_copy_(0, idx, a.to(abs_part.device))
                signed_part.index_copy_(0, idx, s.to(abs_part.device))
            if stage >= 3:
                vec = all_reduce_sum(torch.cat([abs_part, signed_part]))
                abs_part, signed_part = vec[: len(params)], vec[len(params) :]
            abs_part, signed_part = abs_part / loss_scale, signed_part / loss_scale

            def commit(overflow: bool) -> None:
                if overflow:
                    return
                clip = float(getattr(args, "max_grad_norm", 0) or 0)
                norm = getattr(zero_opt, "_global_grad_norm", None)
                factor = 1.0
                if clip > 0 and norm is not None:
                    factor = 1.0 / max(1.0, (float(norm) + 1e-6) / clip)  # what the optimizer consumed
                self.accumulator.update(abs_part * factor, signed_part * factor,
                                        samples=float(self._samples_per_step()))

            return commit
        self._restore_ds = wrap_deepspeed_step(optimizer, measure, zero_stage=stage)

    def state_step(self) -> int:
        return int(getattr(self._state, "global_step", 0) or 0)

