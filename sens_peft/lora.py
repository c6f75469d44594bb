"""The one PEFT inspection layer: what a (wrapped) PeftModel holds, for the capture side and the merge side.

Capture side: canonical parameter names (:func:`clean_param_name`), the expert type and active adapter, the
parameters a calibration pass scores, and the LoRA linear modules it scores in weight space
(:func:`scorable_lora_modules`, :class:`LoraModuleInfo`).

Merge side: access to the LoRA factors of a PeftModel, one module at a time, in a layout-independent form
(:func:`lora_modules`, :class:`LoraModule`, :class:`LoraFactors`).

For each adapted module we work with the *product* ``P = B @ A`` (shape ``[out, in]`` for Linear, ``[dim, vocab]``
for Embedding) and the delta in the base weight's own layout, ``ΔW = s * P`` or ``s * P.T`` for
``fan_in_fan_out`` (GPT-2 ``Conv1D``) and Embedding layers, exactly as PEFT's ``get_delta_weight`` computes it,
but in fp32 on the merge device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .errors import MergeError
from .groups import canonical_name
from .names import portable_name

logger = logging.getLogger(__name__)

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_param_name(name: str, adapter: Optional[str] = None) -> str:
    """Canonical base-model name of a parameter, also stripping FSDP / checkpoint / compile wrappers."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith("module."):
        name = name[len("module.") :]
    if adapter is not None:
        name = name.replace(f".modules_to_save.{adapter}.", ".")
    return canonical_name(name, adapter)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
        "DistributedDataParallel",
        "DataParallel",
    ):
        model = model.module
    return model


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def detect_expert_type(model: nn.Module) -> str:
    """``"lora"`` if the model holds PEFT LoRA layers, else ``"full"``."""
    return "lora" if any(is_lora_layer(m) for m in unwrap_model(model).modules()) else "full"


def active_adapter_name(model: nn.Module) -> Optional[str]:
    """The active adapter of a PEFT model (the first one if several are active), or None."""
    model = unwrap_model(model)
    name = getattr(model, "active_adapter", None)
    if isinstance(name, str):
        return name
    if isinstance(name, (list, tuple)) and name:
        return str(name[0])
    for module in model.modules():
        if is_lora_layer(module) and module.active_adapters:
            return module.active_adapters[0]
    return None


@dataclass
class LoraModuleInfo:
    """A LoRA-adapted linear module and what the weight-space gradient needs."""

    name: str  # canonical name of the module's weight, e.g. "model.layers.0.self_attn.q_proj.weight"
    module: nn.Module
    adapter: str

    @property
    def base_weight(self) -> Tensor:
        return self.module.get_base_layer().weight

    @property
    def lora_A(self) -> Tensor:
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> Tensor:
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.module, "fan_in_fan_out", False))


def scorable_lora_modules(model: nn.Module, adapter: Optional[str] = None) -> list[LoraModuleInfo]:
    """The LoRA linear modules of ``adapter`` (default: the active one) that the calibration pass scores in weight
    space, checked for the hook-formed ``G`` (the merge side reads factors with :func:`lora_modules`).

    Raises:
        ValueError: for adapters the ``theta``/``delta`` calibration cannot score exactly (merged adapters, DoRA,
            non-linear LoRA layers such as embeddings or convolutions).
    """
    model = unwrap_model(model)
    adapter = adapter or active_adapter_name(model)
    out = []
    for name, module in model.named_modules():
        if not is_lora_layer(module) or adapter not in getattr(module, "lora_A", {}):
            continue
        base = module.get_base_layer()
        kind = type(base).__name__
        if not (isinstance(base, nn.Linear) or kind == "Conv1D"):
            raise ValueError(
                f"module {name!r} adapts a {kind}; weight_source 'theta'/'delta' supports LoRA on Linear/Conv1D "
                "layers only; use weight_source='adapter'"
            )
        if getattr(module, "merged", False):
            raise ValueError(f"module {name!r} has its adapter merged into the base weight; unmerge it first")
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(f"module {name!r} uses DoRA; weight_source 'theta'/'delta' needs plain LoRA ('adapter' works)")
        out.append(LoraModuleInfo(clean_param_name(f"{name}.weight", adapter), module, adapter))
    if not out:
        raise ValueError(f"no LoRA module of adapter {adapter!r} found in the model")
    return out


def adapter_parameters(model: nn.Module, adapter: Optional[str] = None) -> list[tuple[str, nn.Parameter]]:
    """``(canonical name, parameter)`` of the adapter's own tensors (LoRA factors, DoRA magnitudes)."""
    model = unwrap_model(model)
    adapter = adapter or active_adapter_name(model)
    out, seen = [], set()
    for name, param in model.named_parameters():
        if "lora_" not in name or f".{adapter}." not in f"{name}.":
            continue
        if id(param) in seen:
            continue
        seen.add(id(param))
        out.append((clean_param_name(name, adapter), param))
    if not out:
        raise ValueError(f"no LoRA parameters of adapter {adapter!r} found in the model")
    return out


def trainable_parameters(model: nn.Module, adapter: Optional[str] = None) -> list[tuple[str, nn.Parameter]]:
    """``(canonical name, parameter)`` of the trainable tensors (tied tensors once)."""
    return [
        (clean_param_name(n, adapter), p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad
    ]


def base_model_name(model: nn.Module) -> Optional[str]:
    """The base model's hub id (or a local folder's name, never its path), from the adapter or model config."""
    model = unwrap_model(model)
    config = getattr(model, "peft_config", None)
    adapter = active_adapter_name(model)
    if isinstance(config, dict) and adapter in config:
        name = getattr(config[adapter], "base_model_name_or_path", None)
        if name:
            return portable_name(name)
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return portable_name(name)


def model_dtype(model: nn.Module) -> str:
    """The dtype of the model's first floating parameter, as a name (``"float32"``)."""
    for p in unwrap_model(model).parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "unknown"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for p in unwrap_model(model).parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- data



@dataclass
class LoraFactors:
    """One adapter's factors on one module.

    Attributes:
        A: ``[r, in]`` (Embedding: ``[r, vocab]``).
        B: ``[out, r]`` (Embedding: ``[dim, r]``).
        scaling: The layer's effective scaling for this adapter (``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA,
            per-module values from ``rank_pattern``/``alpha_pattern``), read from ``layer.scaling``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoraModule:
    """An adapted module of the base model.

    Attributes:
        name: Module name in the base model (``model.layers.0.self_attn.q_proj``).
        layer: The PEFT LoRA layer.
        transposed: Whether ΔW in the weight's layout is ``P.T`` (fan_in_fan_out or Embedding).
        embedding: Whether this is an Embedding LoRA (factors are parameters, not Linear modules).
    """

    name: str
    layer: torch.nn.Module
    transposed: bool
    embedding: bool

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    def adapters(self) -> list[str]:
        if self.embedding:
            return list(self.layer.lora_embedding_A.keys())
        return list(self.layer.lora_A.keys())

    def factors(self, adapter: str) -> Optional[LoraFactors]:
        """The adapter's factors on this module, or None when the adapter does not adapt it."""
        if self.embedding:
            if adapter not in self.layer.lora_embedding_A:
                return None
            A, B = self.layer.lora_embedding_A[adapter], self.layer.lora_embedding_B[adapter]
        else:
            if adapter not in self.layer.lora_A:
                return None
            A, B = self.layer.lora_A[adapter].weight, self.layer.lora_B[adapter].weight
        return LoraFactors(A.detach(), B.detach(), float(self.layer.scaling[adapter]))

    def base_weight(self) -> torch.nn.Parameter:
        return self.layer.get_base_layer().weight

    def set_factors(self, adapter: str, A: torch.Tensor, B: torch.Tensor, frozen: bool = False) -> None:
        """Copy ``A``/``B`` into the (already created) adapter's factors, keeping their device and dtype
        (``frozen``: and set their ``requires_grad`` to False)."""
        if self.embedding:
            pa, pb = self.layer.lora_embedding_A[adapter], self.layer.lora_embedding_B[adapter]
        else:
            pa, pb = self.layer.lora_A[adapter].weight, self.layer.lora_B[adapter].weight
        if tuple(pa.shape) != tuple(A.shape) or tuple(pb.shape) != tuple(B.shape):
            raise MergeError(
                f"{self.name}: merged factors have shapes A{list(A.shape)} B{list(B.shape)}, the new adapter expects "
                f"A{list(pa.shape)} B{list(pb.shape)}"
            )
        with torch.no_grad():
            pa.copy_(A.to(device=pa.device, dtype=pa.dtype))
            pb.copy_(B.to(device=pb.device, dtype=pb.dtype))
        if frozen:
            pa.requires_grad_(False)
            pb.requires_grad_(False)

    def assign_factors(self, adapter: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Make ``A``/``B`` the adapter's factor parameters themselves (frozen), replacing placeholders of the
        same shapes (e.g. created on the meta device); the caller has put them on the right device and dtype."""
        if self.embedding:
            holders = ((self.layer.lora_embedding_A, adapter), (self.layer.lora_embedding_B, adapter))
            current = (self.layer.lora_embedding_A[adapter], self.layer.lora_embedding_B[adapter])
        else:
            holders = ((self.layer.lora_A[adapter], "weight"), (self.layer.lora_B[adapter], "weight"))
            current = (self.layer.lora_A[adapter].weight, self.layer.lora_B[adapter].weight)
        if tuple(current[0].shape) != tuple(A.shape) or tuple(current[1].shape) != tuple(B.shape):
            raise MergeError(
                f"{self.name}: merged factors have shapes A{list(A.shape)} B{list(B.shape)}, the new adapter expects "
                f"A{list(current[0].shape)} B{list(current[1].shape)}"
            )
        for (holder, key), value in zip(holders, (A, B)):
            param = torch.nn.Parameter(value.detach(), requires_grad=False)
            if self.embedding:
                holder[key] = param
            else:
                setattr(holder, key, param)


def lora_modules(peft_model: torch.nn.Module) -> list[LoraModule]:
    """All LoRA layers of a PeftModel in model order, named by their base-model module name.

    Raises:
        MergeError: a LoRA layer type whose delta is not a plain ``B @ A`` (Conv, quantized layers, ...).
    """
    from peft.tuners.lora import Embedding, LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    out = []
    root = peft_model.base_model.model if hasattr(peft_model, "base_model") else peft_model
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, Embedding):
            out.append(LoraModule(name, module, transposed=True, embedding=True))
        elif type(module) is LoraLinear:
            out.append(LoraModule(name, module, transposed=bool(module.fan_in_fan_out), embedding=False))
        else:
            out.append(LoraModule(name, module, transposed=False, embedding=None))  # type: ignore[arg-type]
    return out


def product(f: LoraFactors, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """``scale * s * B @ A`` in fp32 on ``device`` (the product layout ``[out, in]``)."""
    A = f.A.to(device=device, dtype=torch.float32)
    B = f.B.to(device=device, dtype=torch.float32)
    return (B @ A) * (f.scaling * scale)


def delta_weight(module: LoraModule, f: LoraFactors, device: torch.device) -> torch.Tensor:
    """ΔW in the base weight's layout (equals PEFT ``get_delta_weight`` computed in fp32)."""
    p = product(f, device)
    return p.T if module.transposed else p


# Above this smaller dimension the float64 Gram route of svd_factors costs about as much as a float32 thin SVD.
GRAM_MAX_DIM = 2048


def svd_factors(delta_product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a ``[out, in]`` product into ``B = U_r·diag(S_r)`` ``[out, rank]``, ``A = Vh_r`` ``[rank, in]``.

    The split puts all singular values on B (as PEFT's ``*_svd`` types do), so A has orthonormal rows; the new
    adapter's scaling is 1, so ``B @ A`` is the best rank-``rank`` approximation of the merged delta. When
    ``rank`` exceeds ``min(out, in)`` the extra rows/columns are zero.
    """
    out_f, in_f = delta_product.shape
    device = delta_product.device
    B = torch.zeros(out_f, rank, dtype=torch.float32, device=device)
    A = torch.zeros(rank, in_f, dtype=torch.float32, device=device)
    if min(out_f, in_f) <= GRAM_MAX_DIM:
        # Only the top ``rank`` singular pairs are needed. From the eigenvectors V of the Gram matrix (float64, so
        # squaring the singular values loses nothing that matters): B = X V_r, A = V_r^T, i.e. B @ A = X V_r V_r^T,
        # the projection onto the top right-singular subspace. 1.5-2.5x faster than a thin SVD on the CPU here.
        x = delta_product.to(torch.float64)
        wide = out_f < in_f
        gram = x @ x.T if wide else x.T @ x
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
        k = min(rank, vecs.shape[1])
        top = vecs[:, -k:].flip(1)  # descending
        if wide:  # top left-singular vectors U_r: X = U S V^T, B = U_r (U_r^T X) = U_r S_r V_r^T split as below
            proj = top.T @ x  # S_r V_r^T, [k, in]
            norms = proj.norm(dim=1, keepdim=True)
            A[:k] = (proj / norms.clamp_min(torch.finfo(torch.float64).tiny)).to(torch.float32)
            B[:, :k] = (top * norms.T).to(torch.float32)
        else:
            A[:k] = top.T.to(torch.float32)
            B[:, :k] = (x @ top).to(torch.float32)
        return A, B
    U, S, Vh = torch.linalg.svd(delta_product.to(torch.float32), full_matrices=False)
    k = min(rank, S.shape[0])
    B[:, :k] = U[:, :k] * S[:k]
    A[:k] = Vh[:k]
    return A, B
