"""Running sums of per-tensor sensitivity scores, kept on the training device.

The step path never synchronises with the host: a non-finite step (fp16 overflow, a NaN batch) is dropped on the
device with ``ok = isfinite(scores).all(); acc += where(ok, scores, 0); count += ok``. Host values are read only
when a record or a state dict is built (at save time).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .._version import __version__
from ..groups import group_names
from ..store import SensitivityRecord

logger = logging.getLogger(__name__)

__all__ = ["SensitivityAccumulator", "STATE_VERSION"]

STATE_VERSION = 1


class SensitivityAccumulator:
    """Per-tensor running sums of ``|w * g|`` and ``w * g`` (float64 on ``device``).

    Args:
        names: Canonical tensor names (one score each), in a fixed order.
        device: Where the sums live (the gradients' device).
        ema: Optional EMA factor ``beta``; when set, records use the bias-corrected EMA of the per-update scores
            instead of the plain mean (the mean is kept in ``extra["mean.tensor_scores"]``).
        element_shapes: Optional ``{name: shape}`` for per-element maps (fp32 sums of ``|w * g|``).
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        device: torch.device | str | None = None,
        ema: Optional[float] = None,
        element_shapes: Optional[dict[str, Sequence[int]]] = None,
    ) -> None:
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"SensitivityAccumulator: duplicate tensor names {dup[:5]}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ema = ema
        self.element_shapes = {k: tuple(v) for k, v in (element_shapes or {}).items()}
        self.reset()

    def reset(self) -> None:
        """Zero every sum and counter."""
        p, dev, f64 = len(self.names), self.device, torch.float64
        self.abs_sum = torch.zeros(p, dtype=f64, device=dev)
        self.signed_sum = torch.zeros(p, dtype=f64, device=dev)
        self.ema_abs = torch.zeros(p, dtype=f64, device=dev) if self.ema is not None else None
        self.count = torch.zeros((), dtype=torch.int64, device=dev)  # accepted updates
        self.seen = torch.zeros((), dtype=torch.int64, device=dev)  # all updates, skipped included
        self.samples = torch.zeros((), dtype=f64, device=dev)
        self.tokens = torch.zeros((), dtype=f64, device=dev)
        self.elements = {
            n: torch.zeros(shape, dtype=torch.float32, device=dev) for n, shape in self.element_shapes.items()
        }

    # ------------------------------------------------------------------ step path (no host sync)
    def update(
        self,
        abs_scores: Tensor,
        signed_scores: Optional[Tensor] = None,
        *,
        elements: Optional[dict[str, Tensor]] = None,
        samples: float | Tensor = 0.0,
        tokens: float | Tensor = 0.0,
    ) -> Tensor:
        """Add one update (one optimizer step, or one calibration sample/batch) unless it is non-finite.

        Args:
            abs_scores: ``[P]`` per-tensor ``sum |w * g|`` for this update.
            signed_scores: Optional ``[P]`` per-tensor ``sum w * g``.
            elements: Optional per-element maps for the names given as ``element_shapes``.
            samples: Number of examples behind this update (counted only if accepted).
            tokens: Number of scored tokens behind this update (counted only if accepted).

        Returns:
            A 0-d bool tensor on the device: whether the update was accepted.
        """
        if abs_scores.shape != self.abs_sum.shape:
            raise ValueError(
                f"SensitivityAccumulator.update: got {list(abs_scores.shape)} scores for {len(self.names)} tensors"
            )
        abs64 = abs_scores.detach().to(self.device, torch.float64)
        ok = torch.isfinite(abs64).all()
        if signed_scores is not None:
            signed64 = signed_scores.detach().to(self.device, torch.float64)
            ok = ok & torch.isfinite(signed64).all()
        if elements:
            for value in elements.values():
                # a finite sum has no NaN/Inf term (an overflowing sum of finite terms is rejected too: harmless),
                # and summing does not allocate a bool copy of the map like isfinite().all()
                ok = ok & torch.isfinite(value.sum())
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.abs_sum.add_(torch.where(ok, abs64, zero))
        if signed_scores is not None:
            self.signed_sum.add_(torch.where(ok, signed64, zero))
        if self.ema_abs is not None:
            beta = float(self.ema)
            self.ema_abs.copy_(torch.where(ok, beta * self.ema_abs + (1.0 - beta) * abs64, self.ema_abs))
        # On the CPU the gate is a plain branch (reading ``ok`` costs nothing there, while ``where`` is a slow
        # kernel); on accelerators ``where`` keeps the step free of a host sync.
        gate_on_device = self.device.type != "cpu"
        if elements and (gate_on_device or bool(ok)):
            for name, value in elements.items():
                acc = self.elements.get(name)
                if acc is None:
                    raise KeyError(f"SensitivityAccumulator: no element map registered for {name!r}")
                value = value.detach().to(acc.device, torch.float32)
                acc.add_(torch.where(ok, value, 0.0) if gate_on_device else value)
        self.count.add_(ok.to(torch.int64))
        self.seen.add_(1)
        self.samples.add_(torch.where(ok, torch.as_tensor(samples, dtype=torch.float64, device=self.device), zero))
        self.tokens.add_(torch.where(ok, torch.as_tensor(tokens, dtype=torch.float64, device=self.device), zero))
        return ok

    def merge_(self, other: SensitivityAccumulator) -> None:
        """Add another accumulator's sums (same names) into this one (e.g. per-rank partials)."""
        if other.names != self.names:
            raise ValueError("SensitivityAccumulator.merge_: the tensor names differ")
        for attr in ("abs_sum", "signed_sum", "count", "seen", "samples", "tokens"):
            getattr(self, attr).add_(getattr(other, attr).to(self.device))
        for name, value in other.elements.items():
            self.elements[name].add_(value.to(self.device))

    # ------------------------------------------------------------------ host side
    @property
    def num_updates(self) -> int:
        return int(self.count.item())

    def state_dict(self) -> dict[str, Tensor]:
        """CPU copies of every sum and counter (names go in :meth:`state_metadata`)."""
        out = {
            "abs_sum": self.abs_sum,
            "signed_sum": self.signed_sum,
            "count": self.count,
            "seen": self.seen,
            "samples": self.samples,
            "tokens": self.tokens,
        }
        if self.ema_abs is not None:
            out["ema_abs"] = self.ema_abs
        for name, value in self.elements.items():
            out[f"element.{name}"] = value
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def state_metadata(self) -> dict[str, str]:
        return {
            "state_version": str(STATE_VERSION),
            "tensor_names": json.dumps(self.names),
            "ema": json.dumps(self.ema),
        }

    def load_state_dict(self, state: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
        """Restore sums saved by :meth:`state_dict`; with ``metadata`` the tensor names must match."""
        if metadata is not None and "tensor_names" in metadata:
            names = json.loads(metadata["tensor_names"])
            if names != self.names:
                missing = sorted(set(self.names) - set(names))[:3]
                extra = sorted(set(names) - set(self.names))[:3]
                raise ValueError(
                    "sensitivity state does not match the model's trainable tensors "
                    f"(missing {missing}, unexpected {extra}, {len(names)} vs {len(self.names)} tensors)"
                )
        for attr in ("abs_sum", "signed_sum", "count", "seen", "samples", "tokens"):
            if attr not in state:
                raise KeyError(f"sensitivity state is missing {attr!r}")
            target = getattr(self, attr)
            if state[attr].shape != target.shape:
                raise ValueError(f"sensitivity state {attr!r} has shape {list(state[attr].shape)}")
            target.copy_(state[attr].to(target.device, target.dtype))
        if self.ema_abs is not None and "ema_abs" in state:
            self.ema_abs.copy_(state["ema_abs"].to(self.device, torch.float64))
        for name, value in self.elements.items():
            key = f"element.{name}"
            if key in state:
                value.copy_(state[key].to(value.device, value.dtype))

    def mean_scores(self) -> tuple[Tensor, Tensor]:
        """Mean per-update ``(abs, signed)`` scores on the CPU in float64 (zeros before the first update)."""
        n = max(self.num_updates, 1)
        return self.abs_sum.detach().cpu() / n, self.signed_sum.detach().cpu() / n

    def to_record(
        self,
        *,
        metadata: Optional[dict[str, Any]] = None,
        extra: Optional[dict[str, Tensor]] = None,
        include_signed: bool = True,
        element_maps: bool = True,
    ) -> SensitivityRecord:
        """Build a :class:`SensitivityRecord`: per-tensor means, per-layer-group sums of those means.

        Args:
            metadata: Extra metadata (estimator, weight_source, mode, expert_type, task, base_model, ...); the
                counters (``num_steps``, ``num_samples``, ``num_tokens``, ``num_skipped``) and
                ``library_version`` are added here.
            extra: Extra tensors for ``SensitivityRecord.extra``.
            include_signed: Store ``signed_scores``.
            element_maps: Store the per-element maps (means) if any were accumulated.
        """
        n = self.num_updates
        if n == 0:
            logger.warning("sensitivity record built from 0 accepted updates: every score is 0")
        mean_abs, mean_signed = self.mean_scores()
        extra = dict(extra or {})
        scores = mean_abs
        if self.ema_abs is not None and n > 0:
            extra["mean.tensor_scores"] = mean_abs.float()
            scores = self.ema_abs.detach().cpu() / (1.0 - float(self.ema) ** n)
        groups, index = group_names(self.names, "layer")
        group_scores = torch.zeros(len(groups), dtype=torch.float64)
        group_scores.index_add_(0, torch.tensor(index, dtype=torch.long), scores)
        meta: dict[str, str] = {}
        for key, value in (metadata or {}).items():
            if value is not None:
                meta[key] = value if isinstance(value, str) else json.dumps(value)
        seen = int(self.seen.item())
        meta.update(
            num_steps=str(n),
            num_skipped=str(seen - n),
            num_samples=str(int(round(float(self.samples.item())))),
            num_tokens=str(int(round(float(self.tokens.item())))),
            library_version=__version__,
        )
        if self.ema is not None:
            meta["ema"] = json.dumps(self.ema)
        maps = {}
        if element_maps and n > 0:
            maps = {k: (v.detach().cpu() / n).float() for k, v in self.elements.items()}
        return SensitivityRecord(
            groups=groups,
            group_scores=group_scores.float(),
            tensor_names=list(self.names),
            tensor_scores=scores.float(),
            signed_scores=mean_signed.float() if include_signed else None,
            element_maps=maps,
            extra=extra,
            metadata=meta,
        )
