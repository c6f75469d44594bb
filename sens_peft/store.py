"""Reading and writing the sidecar files stored next to an expert.

``sensitivity.safetensors`` holds per-group and per-tensor scores plus metadata; ``probe.safetensors`` holds a
few token sequences of the expert's data for the cross-task score. Both are versioned (``format_version``)
and validated on load: a bad file raises :class:`SidecarError` naming the file and what is wrong. Writes are
atomic (temporary file + ``os.replace``), so a crash never leaves a half-written sidecar.

Sensitivity format versions (this sens-peft writes version 2 and reads 1 and 2):

* 1: ``group_scores``, ``tensor_scores``, optional ``signed_scores``, ``element.<name>`` maps, extras.
* 2: adds the data-aware merge statistics of the calibration pass, all optional:

  - ``gram.<name>``: the input Gram ``G = sum x x^T`` of the Linear whose weight is ``<name>`` (canonical base
    name, e.g. ``model.layers.0.self_attn.q_proj.weight``), ``[in, in]`` (full) or ``[in]`` (its diagonal),
    float32 or bfloat16; sums over tokens, not means. Modules reading the same input tensor (q/k/v, gate/up) store
    it once: metadata ``gram_aliases`` maps each other name to the stored one; ``gram_tokens`` holds each stored
    Gram's token count (so ``G / tokens`` is the mean).
  - ``gram_factor.<name>``: with ``gram="lowrank"``, a Nystrom factor ``F [in, k]`` next to the exact diagonal
    ``gram.<name> [in]``: ``G ~= F F^T + diag(d - rowsum(F^2))``.
  - ``fisher.<name>``: the diagonal empirical Fisher ``E[g^2]`` per element (shape of the scored tensor, float32);
    metadata ``fisher_samples`` / ``fisher_estimator`` say from what.

  :meth:`SensitivityRecord.statistic` reads any of them by the base weight's name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SidecarError  # noqa: F401  (re-exported: defined in sens_peft.errors)
from .groups import canonical_name
from .names import portable_name

SENSITIVITY_FILE = "sensitivity.safetensors"
PROBE_FILE = "probe.safetensors"
SENSITIVITY_FORMAT = "sens-peft/sensitivity"
PROBE_FORMAT = "sens-peft/probe"
FORMAT_VERSION = 2  # of sensitivity.safetensors (see the module docstring)
READ_VERSIONS = (1, 2)
PROBE_FORMAT_VERSION = 1
STATISTIC_KINDS = ("element_maps", "gram", "gram_factor", "fisher")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}

PathLike = Union[str, os.PathLike]

# Metadata keys every sensitivity file carries (values are strings in the file).
REQUIRED_SENSITIVITY_META = ("format", "format_version", "groups", "tensor_names", "estimator", "weight_source", "mode")


@dataclass
class SensitivityRecord:
    """Sensitivity scores of one expert.

    Attributes:
        groups: Layer groups in model order (see :mod:`sens_peft.groups`).
        group_scores: fp32 ``[G]``: mean over samples (or steps) of the summed ``|w * g|`` of each group.
        tensor_names: Canonical names of the scored tensors (see :func:`sens_peft.groups.canonical_name`).
        tensor_scores: fp32 ``[P]``: the same per tensor.
        signed_scores: Optional fp32 ``[P]``: the signed ``<w, g>`` per tensor (for LoRA ``<A, dL/dA>``,
            which equals ``<dW, dL/dW>``: the first-order loss change from scaling the module's delta).
        element_maps: Optional per-element importance maps keyed by tensor name.
        grams: Input Gram sums of Linear modules keyed by the canonical weight name of the module that owns the
            stored copy: ``[in, in]`` (full) or ``[in]`` (diagonal only). In a loaded record this and ``fisher``
            are read-only mappings that read each tensor from the file on access (see :func:`load_sensitivity`).
        gram_aliases: ``{weight name: owner name}`` for modules whose input is the same tensor as the owner's.
        gram_tokens: ``{owner name: tokens summed into its Gram}``.
        fisher: Diagonal empirical Fisher maps ``E[g^2]`` keyed by tensor name (shape of the tensor).
        gram_factors: Low-rank Nystrom factors ``[in, k]`` of Grams whose ``grams`` entry is the diagonal.
        extra: Other named tensors (e.g. ``during.tensor_scores`` when ``mode="both"``).
        metadata: String-valued metadata (estimator, weight_source, mode, num_samples, ...).
    """

    groups: list[str]
    group_scores: torch.Tensor
    tensor_names: list[str]
    tensor_scores: torch.Tensor
    signed_scores: Optional[torch.Tensor] = None
    element_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    gram_aliases: dict[str, str] = field(default_factory=dict)
    gram_tokens: dict[str, int] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    gram_factors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def task(self) -> Optional[str]:
        return self.metadata.get("task") or None

    @property
    def expert_type(self) -> Optional[str]:
        return self.metadata.get("expert_type") or None

    def group_dict(self) -> dict[str, float]:
        return {g: float(s) for g, s in zip(self.groups, self.group_scores.tolist())}

    def tensor_dict(self) -> dict[str, float]:
        return {n: float(s) for n, s in zip(self.tensor_names, self.tensor_scores.tolist())}

    def check_statistics(self) -> None:
        """Read every Gram and Fisher tensor once so that a bad value raises now (loaded records check lazily)."""
        for mapping in (self.grams, self.fisher, self.gram_factors):
            for name in mapping:
                mapping[name]

    def gram_owner(self, tensor_name: str) -> Optional[str]:
        """The name under which ``tensor_name``'s input Gram is stored (itself, its alias target, or None)."""
        name = canonical_name(tensor_name)
        owner = self.gram_aliases.get(name, name)
        return owner if owner in self.grams else None

    def statistic(self, kind: str, tensor_name: str) -> Optional[torch.Tensor]:
        """One stored statistic of the tensor ``tensor_name`` (a canonical base name such as
        ``model.layers.0.self_attn.q_proj.weight``; PEFT names are canonicalised), as float32, or None if absent.

        Args:
            kind: ``"element_maps"`` (``mean |w * g|``, the tensor's shape), ``"gram"`` (the input Gram sum of the
                Linear owning that weight, shared aliases resolved: ``dim() == 2`` is the full ``[in, in]``
                matrix, dense ``F F^T + diag(residual)`` for a low-rank one; ``dim() == 1`` its diagonal only),
                ``"gram_factor"`` (the low-rank factor ``F [in, k]`` alone, for Woodbury-style solves; None unless
                stored low-rank), or ``"fisher"`` (``E[g^2]``, the tensor's shape).
            tensor_name: The weight's name.
        """
        if kind not in STATISTIC_KINDS:
            raise ValueError(f"unknown statistic kind {kind!r}; expected one of {list(STATISTIC_KINDS)}")
        name = canonical_name(tensor_name)
        if kind in ("gram", "gram_factor"):
            owner = self.gram_owner(name)
            factor = None if owner is None or owner not in self.gram_factors else self.gram_factors[owner].float()
            if kind == "gram_factor":
                return factor
            value = None if owner is None else self.grams[owner]
            if factor is not None:
                from .regmean import lowrank_gram  # local: regmean is pure math and imports nothing from here

                return lowrank_gram(factor, value.float())
        else:
            value = (self.element_maps if kind == "element_maps" else self.fisher).get(name)
        return None if value is None else value.float()

    def statistic_count(self, kind: str, tensor_name: Optional[str] = None) -> Optional[int]:
        """How many tokens (``"gram"``, per module) or samples (``"fisher"``, ``"element_maps"``) a statistic
        averages; divide a Gram by its count for the mean ``E[x x^T]``. None when unknown or absent."""
        if kind not in STATISTIC_KINDS:
            raise ValueError(f"unknown statistic kind {kind!r}; expected one of {list(STATISTIC_KINDS)}")
        if kind in ("gram", "gram_factor"):
            owner = self.gram_owner(tensor_name) if tensor_name is not None else None
            return None if owner is None else self.gram_tokens.get(owner)
        key = "fisher_samples" if kind == "fisher" else "num_samples"
        value = self.metadata.get(key)
        return int(value) if value is not None and value.isdigit() else None


@dataclass
class ProbeSet:
    """A few tokenised sequences of an expert's data (``labels == -100`` where a token is not scored)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _resolve(path: PathLike, filename: str) -> Path:
    path = Path(path)
    return path / filename if path.is_dir() else path


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        # clone: safetensors refuses tensors sharing storage (e.g. group_scores built as a view of tensor_scores)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _stringify(metadata: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in metadata.items():
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _read(path: Path, kind: str, lazy_prefixes: tuple[str, ...] = ()
          ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; keys starting with ``lazy_prefixes`` are not read: their
    entries are ``torch.empty`` tensors on the meta device with the stored shape and dtype."""
    if not path.exists():
        raise SidecarError(f"{kind} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {}
            for key in handle.keys():
                if lazy_prefixes and key.startswith(lazy_prefixes):
                    part = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.uint8)
                    tensors[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
                else:
                    tensors[key] = handle.get_tensor(key)
    except SidecarError:
        raise
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise SidecarError(f"{kind} file {path} cannot be read as safetensors (truncated or corrupt?): {err}") from err
    return tensors, metadata


def _check_header(path: Path, metadata: dict[str, str], expected_format: str,
                  versions: tuple[int, ...] = (PROBE_FORMAT_VERSION,)) -> int:
    found = metadata.get("format")
    if found != expected_format:
        raise SidecarError(f"{path}: metadata 'format' is {found!r}, expected {expected_format!r}")
    version = metadata.get("format_version")
    if version is None:
        raise SidecarError(f"{path}: metadata 'format_version' is missing")
    try:
        version_int = int(version)
    except ValueError as err:
        raise SidecarError(f"{path}: metadata 'format_version' is {version!r}, expected an integer") from err
    if version_int not in versions:
        raise SidecarError(
            f"{path}: format_version {version_int} is not supported by this sens-peft "
            f"(reads versions {list(versions)}); upgrade sens-peft or recompute the sidecar"
        )
    return version_int


def _json_list(path: Path, metadata: dict[str, str], key: str) -> list[str]:
    if key not in metadata:
        raise SidecarError(f"{path}: metadata {key!r} is missing")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise SidecarError(f"{path}: metadata {key!r} is not valid JSON") from err
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SidecarError(f"{path}: metadata {key!r} must be a JSON list of strings")
    return value


def _check_scores(path: Path, name: str, tensor: torch.Tensor, length: int, allow_negative: bool = False) -> None:
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise SidecarError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, expected [{length}]")
    if not torch.isfinite(tensor).all():
        raise SidecarError(f"{path}: tensor {name!r} contains NaN or Inf")
    if not allow_negative and (tensor < 0).any():
        raise SidecarError(f"{path}: tensor {name!r} has negative entries; |w*g| scores must be >= 0")


def save_sensitivity(record: SensitivityRecord, path: PathLike) -> Path:
    """Write ``record`` to ``path`` (a folder, or a file name) atomically. Returns the file written."""
    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / SENSITIVITY_FILE
    tensors: dict[str, torch.Tensor] = {
        "group_scores": record.group_scores.float(),
        "tensor_scores": record.tensor_scores.float(),
    }
    if record.signed_scores is not None:
        tensors["signed_scores"] = record.signed_scores.float()
    for name, value in record.element_maps.items():
        tensors[f"element.{name}"] = value.float()
    for name, value in record.extra.items():
        tensors[name] = value
    tensors.update(_statistic_tensors(record))
    metadata = dict(record.metadata)
    metadata.update(_statistic_metadata(record))
    metadata.update(
        format=SENSITIVITY_FORMAT,
        format_version=str(FORMAT_VERSION),
        groups=json.dumps(list(record.groups)),
        tensor_names=json.dumps(list(record.tensor_names)),
    )
    metadata.setdefault("estimator", "taylor_abs")
    metadata.setdefault("weight_source", "theta")
    metadata.setdefault("mode", "after")
    if metadata.get("base_model"):  # the sidecar travels to the hub with the adapter: no local paths in it
        metadata["base_model"] = portable_name(metadata["base_model"])
    return _atomic_save(tensors, _stringify(metadata), target)


def load_sensitivity(path: PathLike) -> SensitivityRecord:
    """Read and validate ``sensitivity.safetensors`` (``path`` may be the expert's folder).

    The Gram and Fisher tensors (format 2) can be as large as the model, so they are read from the file when
    accessed (``record.grams[name]``, :meth:`SensitivityRecord.statistic`), one at a time and not cached; their
    names, shapes, dtypes, aliases and token counts are checked here, their values (finite, non-negative
    diagonal / entries, symmetric) on access (:meth:`SensitivityRecord.check_statistics` checks all now).
    """
    file = _resolve(path, SENSITIVITY_FILE)
    tensors, metadata = _read(file, "sensitivity", (_GRAM_PREFIX, _FISHER_PREFIX, _FACTOR_PREFIX))
    _check_header(file, metadata, SENSITIVITY_FORMAT, READ_VERSIONS)
    for key in REQUIRED_SENSITIVITY_META:
        if key not in metadata:
            raise SidecarError(f"{file}: metadata {key!r} is missing")
    groups = _json_list(file, metadata, "groups")
    names = _json_list(file, metadata, "tensor_names")
    for key in ("group_scores", "tensor_scores"):
        if key not in tensors:
            raise SidecarError(f"{file}: tensor {key!r} is missing")
    _check_scores(file, "group_scores", tensors["group_scores"], len(groups))
    _check_scores(file, "tensor_scores", tensors["tensor_scores"], len(names))
    signed = tensors.get("signed_scores")
    if signed is not None:
        _check_scores(file, "signed_scores", signed, len(names), allow_negative=True)
    element_maps = {k[len("element.") :]: v for k, v in tensors.items() if k.startswith("element.")}
    for name, value in element_maps.items():
        if not torch.isfinite(value).all():
            raise SidecarError(f"{file}: tensor 'element.{name}' contains NaN or Inf")
    known = {"group_scores", "tensor_scores", "signed_scores"}
    grams, aliases, gram_tokens, fisher = _load_statistics(file, tensors, metadata)
    factors = _load_factors(file, tensors)
    extra = {k: v for k, v in tensors.items()
             if k not in known and not k.startswith(("element.", _GRAM_PREFIX, _FISHER_PREFIX, _FACTOR_PREFIX))}
    return SensitivityRecord(
        groups=groups,
        group_scores=tensors["group_scores"].float(),
        tensor_names=names,
        tensor_scores=tensors["tensor_scores"].float(),
        signed_scores=None if signed is None else signed.float(),
        element_maps=element_maps,
        extra=extra,
        metadata=metadata,
        grams=grams,
        gram_aliases=aliases,
        gram_tokens=gram_tokens,
        fisher=fisher,
        gram_factors=factors,
    )


# ---------------------------------------------------------------------------------------------- v2 statistics
_GRAM_PREFIX = "gram."
_FISHER_PREFIX = "fisher."
_FACTOR_PREFIX = "gram_factor."
_GRAM_DTYPES = (torch.float32, torch.bfloat16)
# Relative asymmetry tolerated in a stored Gram (bf16 storage of a symmetric fp32 matrix stays symmetric; this
# only guards against a transposed or foreign tensor).
_SYMMETRY_TOL = 1e-3


def _statistic_tensors(record: SensitivityRecord) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, value in record.grams.items():
        if value.dtype not in _GRAM_DTYPES:
            value = value.float()
        tensors[_GRAM_PREFIX + name] = value
    for name, value in record.fisher.items():
        tensors[_FISHER_PREFIX + name] = value.float()
    for name, value in record.gram_factors.items():
        tensors[_FACTOR_PREFIX + name] = value if value.dtype in _GRAM_DTYPES else value.float()
    return tensors


def _statistic_metadata(record: SensitivityRecord) -> dict[str, str]:
    if not record.grams:
        return {}
    missing = sorted(set(record.grams) - set(record.gram_tokens))
    if missing:
        raise ValueError(f"SensitivityRecord: Grams {missing[:3]} have no token count in gram_tokens")
    lonely = sorted(n for n in record.gram_factors if n not in record.grams or record.grams[n].dim() != 1)
    if lonely:
        raise ValueError(f"SensitivityRecord: gram_factors {lonely[:3]} need their diagonal [in] in grams")
    dangling = sorted(n for n, owner in record.gram_aliases.items() if owner not in record.grams)
    if dangling:
        raise ValueError(f"SensitivityRecord: gram_aliases {dangling[:3]} point at Grams that are not stored")
    return {
        "gram_aliases": json.dumps(dict(sorted(record.gram_aliases.items()))),
        "gram_tokens": json.dumps({k: int(v) for k, v in sorted(record.gram_tokens.items())}),
    }


def _json_dict(path: Path, metadata: dict[str, str], key: str, value_type: type) -> dict[str, Any]:
    if key not in metadata:
        return {}
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise SidecarError(f"{path}: metadata {key!r} is not valid JSON") from err
    if not isinstance(value, dict) or not all(isinstance(v, value_type) for v in value.values()):
        raise SidecarError(f"{path}: metadata {key!r} must be a JSON object of {value_type.__name__} values")
    return value


def _check_gram_structure(path: Path, name: str, value: torch.Tensor) -> None:
    key = _GRAM_PREFIX + name
    if not value.is_floating_point():
        raise SidecarError(f"{path}: tensor {key!r} has dtype {value.dtype}, expected float32 or bfloat16")
    if value.dim() not in (1, 2) or (value.dim() == 2 and value.shape[0] != value.shape[1]):
        raise SidecarError(f"{path}: tensor {key!r} has shape {list(value.shape)}, expected [in, in] or [in]")


def _check_gram(path: Path, name: str, value: torch.Tensor) -> None:
    key = _GRAM_PREFIX + name
    _check_gram_structure(path, name, value)
    if not torch.isfinite(value).all():
        raise SidecarError(f"{path}: tensor {key!r} contains NaN or Inf")
    diag = value if value.dim() == 1 else torch.diagonal(value)
    if (diag < 0).any():
        raise SidecarError(f"{path}: tensor {key!r} has negative diagonal entries; a Gram matrix x x^T cannot")
    if value.dim() == 2:
        scale = float(diag.float().max()) if diag.numel() else 0.0
        asym = float((value.float() - value.float().T).abs().max()) if value.numel() else 0.0
        if asym > _SYMMETRY_TOL * max(scale, 1e-30):
            raise SidecarError(f"{path}: tensor {key!r} is not symmetric (max |G - G^T| = {asym:.3g})")


def _load_statistics(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
                     ) -> tuple[Mapping[str, torch.Tensor], dict[str, str], dict[str, int], Mapping[str, torch.Tensor]]:
    """The v2 statistics of a sensitivity file: structure checked now, values lazily (a v1 file has none)."""
    grams = {k[len(_GRAM_PREFIX):]: v for k, v in tensors.items() if k.startswith(_GRAM_PREFIX)}
    for name, value in grams.items():
        _check_gram_structure(path, name, value)
    aliases = _json_dict(path, metadata, "gram_aliases", str)
    tokens = _json_dict(path, metadata, "gram_tokens", int)
    for name, owner in aliases.items():
        if owner not in grams:
            raise SidecarError(f"{path}: metadata 'gram_aliases' maps {name!r} to {owner!r}, which has no tensor "
                               f"'{_GRAM_PREFIX}{owner}'")
    for name in grams:
        if tokens.get(name, -1) < 0:
            raise SidecarError(f"{path}: tensor '{_GRAM_PREFIX}{name}' has no token count in metadata 'gram_tokens'")
    fisher = {k[len(_FISHER_PREFIX):]: v for k, v in tensors.items() if k.startswith(_FISHER_PREFIX)}
    for name, value in fisher.items():
        if not value.is_floating_point():
            raise SidecarError(f"{path}: tensor '{_FISHER_PREFIX}{name}' has dtype {value.dtype}, expected a float dtype")
    return (LazyTensors(path, _GRAM_PREFIX, sorted(grams), _check_gram), aliases,
            {k: int(v) for k, v in tokens.items()}, LazyTensors(path, _FISHER_PREFIX, sorted(fisher), _check_fisher))


def _load_factors(path: Path, tensors: dict[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Low-rank Gram factors: each ``[in, k]`` next to a stored diagonal ``gram.<name>`` of length ``in``."""
    shapes = {k[len(_FACTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(_FACTOR_PREFIX)}
    diag_shapes = {k[len(_GRAM_PREFIX):]: v.shape for k, v in tensors.items() if k.startswith(_GRAM_PREFIX)}
    for name, value in shapes.items():
        key = _FACTOR_PREFIX + name
        if not value.is_floating_point():
            raise SidecarError(f"{path}: tensor {key!r} has dtype {value.dtype}, expected float32 or bfloat16")
        diag = diag_shapes.get(name)
        if diag is None or len(diag) != 1 or value.dim() != 2 or value.shape[0] != diag[0]:
            raise SidecarError(f"{path}: tensor {key!r} has shape {list(value.shape)}; expected [in, k] next to a "
                               f"diagonal '{_GRAM_PREFIX}{name}' of shape [in] (found {None if diag is None else list(diag)})")
    return LazyTensors(path, _FACTOR_PREFIX, sorted(shapes), _check_finite)


def _check_finite(path: Path, name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise SidecarError(f"{path}: tensor '{_FACTOR_PREFIX}{name}' contains NaN or Inf")


def _check_fisher(path: Path, name: str, value: torch.Tensor) -> None:
    key = _FISHER_PREFIX + name
    if not torch.isfinite(value).all():
        raise SidecarError(f"{path}: tensor {key!r} contains NaN or Inf")
    if (value < 0).any():
        raise SidecarError(f"{path}: tensor {key!r} has negative entries; E[g^2] must be >= 0")


class LazyTensors(Mapping):
    """Read-only ``{name: tensor}`` view of ``<prefix><name>`` tensors in a safetensors file, each read and
    value-checked when accessed (never cached: a 7B model's Grams do not fit in memory at once)."""

    def __init__(self, path: Path, prefix: str, names: list[str], check: Callable[[Path, str, torch.Tensor], None]):
        self.path, self.prefix, self.names, self.check = path, prefix, list(names), check

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                value = handle.get_tensor(self.prefix + name)
        except Exception as err:
            raise SidecarError(f"{self.path}: tensor '{self.prefix}{name}' cannot be read (file changed since "
                               f"it was loaded?): {err}") from err
        self.check(self.path, name, value)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return f"LazyTensors({str(self.path)!r}, {len(self.names)} x {self.prefix}*)"


def save_probe(probe: ProbeSet, path: PathLike) -> Path:
    """Write a probe set to ``path`` (a folder, or a file name) atomically."""
    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / PROBE_FILE
    if probe.input_ids.shape != probe.attention_mask.shape or probe.input_ids.shape != probe.labels.shape:
        raise ValueError(
            "probe input_ids, attention_mask and labels must share one shape, got "
            f"{list(probe.input_ids.shape)}, {list(probe.attention_mask.shape)}, {list(probe.labels.shape)}"
        )
    metadata = dict(probe.metadata)
    metadata.update(format=PROBE_FORMAT, format_version=str(PROBE_FORMAT_VERSION))
    if metadata.get("tokenizer"):  # travels with the adapter: a hub id, or a local folder's name only
        metadata["tokenizer"] = portable_name(metadata["tokenizer"])
    tensors = {
        "input_ids": probe.input_ids.long(),
        "attention_mask": probe.attention_mask.long(),
        "labels": probe.labels.long(),
    }
    return _atomic_save(tensors, _stringify(metadata), target)


def load_probe(path: PathLike, vocab_size: Optional[int] = None) -> ProbeSet:
    """Read and validate ``probe.safetensors``; with ``vocab_size``, token ids must be below it."""
    file = _resolve(path, PROBE_FILE)
    tensors, metadata = _read(file, "probe")
    _check_header(file, metadata, PROBE_FORMAT)
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in tensors:
            raise SidecarError(f"{file}: tensor {key!r} is missing")
        if tensors[key].dim() != 2:
            raise SidecarError(f"{file}: tensor {key!r} has shape {list(tensors[key].shape)}, expected [N, T]")
    shape = tensors["input_ids"].shape
    for key in ("attention_mask", "labels"):
        if tensors[key].shape != shape:
            raise SidecarError(
                f"{file}: tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(shape)} like input_ids"
            )
    ids = tensors["input_ids"]
    if ids.numel() and int(ids.min()) < 0:
        raise SidecarError(f"{file}: tensor 'input_ids' has negative token ids")
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise SidecarError(
            f"{file}: tensor 'input_ids' has token id {int(ids.max())}, outside the model's vocabulary of {vocab_size}"
        )
    return ProbeSet(tensors["input_ids"].long(), tensors["attention_mask"].long(), tensors["labels"].long(), metadata)
