"""Fused CPU loops for the streamed TIES / DARE-TIES merge, compiled from C on first use.

On the CPU, :func:`sens_peft.methods.merge_streamed` spends most of a TIES or DARE-TIES merge in ~30 element-wise
torch ops per chunk, each its own pass over memory, and :func:`sens_peft.methods.trim_thresholds` in ~8 more per
expert. ``_fused/ties_merge.c`` does the same arithmetic entry by entry in one pass, in the same order and with
the same roundings (no fused multiply-adds), so it gives the same bits; tests/test_fused.py checks that against
the torch path. A 542M-parameter TIES merge on 2 cores went from ~8 to ~3 CPU-seconds (benchmarks/README.md).

The C file is compiled once per machine with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
a cache folder (``$SENS_PEFT_CACHE/kernels``, else ``~/.cache/sens_peft/kernels``) and loaded with :mod:`ctypes`;
the build takes about a second. Without a compiler, or if the build fails, the merge runs the
torch ops (same results, slower) and this is logged once. ``SENS_PEFT_FUSED=0`` turns the fused loops off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["available", "count_scores", "library", "supports", "ties_merge", "MAX_EXPERTS"]

MAX_EXPERTS = 16  # the C file's MAX_EXPERTS
_SOURCE = Path(__file__).resolve().parent / "_fused" / "ties_merge.c"
# -ffp-contract=off: a compiler may otherwise fuse a product and a sum into one rounding, and the results would
# no longer be the torch path's bits.
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
_NATIVE = ("-march=native",)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_DROP = {"none": 0, "trim": 1, "counter": 2, "packed": 3, "importance": 4}

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # empty until the first load attempt


def _cache_dir() -> Path:
    """``$SENS_PEFT_CACHE/kernels`` or ``~/.cache/sens_peft/kernels`` (next to the toy model's cache)."""
    root = os.environ.get("SENS_PEFT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "sens_peft") / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a library built on one CPU may not run on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()} {platform.processor()} {flags}"


def _build(cc: str, out_dir: Path) -> Path:
    """Compile the C file into ``out_dir`` (if not there yet) and return the shared library's path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = _SOURCE.read_bytes()
    for extra in (_NATIVE, ()):  # some compilers (or targets) refuse -march=native: build generic code then
        key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS + extra).encode(), version.encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        target = out_dir / f"ties_merge-{key}.so"
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        # build under a temporary name, then rename: another process may be loading the same target
        fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=out_dir)
        os.close(fd)
        try:
            done = subprocess.run([cc, *_FLAGS, *extra, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                logger.info("compiled the fused merge loops into %s", target)
                return target
            error = done.stderr.strip()[-2000:]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"{cc} could not compile {_SOURCE}: {error}")


def _load() -> ctypes.CDLL | None:
    if os.environ.get("SENS_PEFT_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("no C compiler found ($CC, cc, gcc, clang): TIES/DARE-TIES merges on the CPU run the "
                       "slower torch ops (same results)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc, _cache_dir())))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("the fused merge loops are unavailable (%s): TIES/DARE-TIES merges on the CPU run the "
                       "slower torch ops (same results)", exc)
        return None
    fn = lib.sp_ties_merge
    fn.restype = ctypes.c_int64
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [i64, i64, ptr, i32, i32, ptr, ptr, ptr, i32,  # span, base, experts, out
                   ptr, ptr, ptr, i32,  # coefficients, vote weights, vote signs, count votes
                   i32, ptr, ptr, ptr,  # drop, trim bounds, tie ends
                   ctypes.c_double, ptr, i64, i64, i64, ctypes.c_int32, ptr,  # DARE density, keys, masks
                   ptr]  # importance maps
    fn = lib.sp_count_scores
    fn.restype = ctypes.c_int64
    fn.argtypes = [i64, ptr, i32, ptr, i32, i64, ctypes.c_double, ctypes.c_double, i32,  # inputs, chunk, band
                   ptr, ptr, ptr, ptr, i64, ptr]  # per chunk, upper, lower, gathered, cap, top
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded fused library, or None when it is off or could not be built (tried once per process)."""
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_load())
    return _loaded[0]


def available() -> bool:
    """Whether :func:`ties_merge` can run here."""
    return library() is not None


def supports(base: Tensor, experts: list[Tensor], out: Tensor) -> bool:
    """Whether these flat tensors can go through :func:`ties_merge` (CPU, contiguous, fp32/bf16, at most
    :data:`MAX_EXPERTS` experts)."""
    tensors = [base, out, *experts]
    return (0 < len(experts) <= MAX_EXPERTS and all(t.device.type == "cpu" and t.dtype in _DTYPES
                                                     and t.is_contiguous() for t in tensors))


def _array(ctype, values) -> ctypes.Array:
    values = list(values)
    return (ctype * max(1, len(values)))(*values)


def ties_merge(start: int, stop: int, base: Tensor, experts: list[Tensor], out: Tensor, *,
               coefficients: list[float], vote_weight: list[float], vote_sign: list[int], count_votes: bool,
               drop: str, trims: list[tuple[float, float, int]] | None = None, density: float = 1.0,
               keys: Tensor | None = None, first_block: int = 0, block_size: int = 1 << 24, keep_threshold: int = 0,
               masks: list[Tensor] | None = None, importance: list[Tensor] | None = None) -> int:
    """Entries ``start:stop`` of :func:`sens_peft.methods.merge_streamed`'s TIES / DARE-TIES loop, into ``out``.

    ``base``, ``experts`` and ``out`` are flat tensors accepted by :func:`supports`. ``drop``: ``"none"``,
    ``"trim"`` (with ``trims``: per expert ``(above, at_least, tie_end)``, on ``|delta|``), ``"importance"`` (the
    same on the flat fp32 ``importance`` maps, which :func:`supports` must accept), ``"counter"`` (DARE masks hashed
    inline: ``keys`` int32 ``[K, blocks, 2]`` for the counter blocks ``first_block...`` of ``block_size``
    positions, and ``keep_threshold``) or
    ``"packed"`` (``masks``: K bit-packed masks). Returns the number of non-finite values seen (results, and deltas
    before a DARE drop).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the fused merge loops are not available")
    num = len(experts)
    trims = trims or [(-1.0, -1.0, 0)] * num
    if keys is not None:
        keys = keys.to(torch.int32).contiguous()
    bad = lib.sp_ties_merge(
        int(start), int(stop) - int(start), base.data_ptr(), _DTYPES[base.dtype], num,
        _array(ctypes.c_void_p, (e.data_ptr() for e in experts)), _array(ctypes.c_int, (_DTYPES[e.dtype]
                                                                                         for e in experts)),
        out.data_ptr(), _DTYPES[out.dtype],
        _array(ctypes.c_double, coefficients), _array(ctypes.c_double, vote_weight),
        _array(ctypes.c_int, vote_sign), int(count_votes), _DROP[drop],
        _array(ctypes.c_double, (t[0] for t in trims)), _array(ctypes.c_double, (t[1] for t in trims)),
        _array(ctypes.c_int64, (t[2] for t in trims)), float(density),
        keys.data_ptr() if keys is not None else None, int(first_block),
        keys.shape[1] if keys is not None else 0, int(block_size), int(keep_threshold),
        _array(ctypes.c_void_p, (m.data_ptr() for m in masks)) if masks is not None else None,
        _array(ctypes.c_void_p, (m.data_ptr() for m in importance)) if importance is not None else None)
    if bad < 0:
        raise RuntimeError(f"the fused merge loops refused {num} experts (at most {MAX_EXPERTS})")
    return int(bad)


def count_scores(base: Tensor | None, expert: Tensor, *, chunk: int, hi: float, lo: float, band: bool, cap: int
                 ) -> tuple[int, int, Tensor, Tensor | None, int]:
    """One expert's counting pass of :func:`sens_peft.methods.trim_thresholds` (sampled selection) over the scores
    ``|expert - base|`` of the flat tensors (accepted by :func:`supports`), per chunk of ``chunk`` entries. With
    ``base=None``, ``expert`` holds the fp32 scores themselves (an importance map).

    Returns ``(upper, lower, per_chunk, band_values, top)``. Tie mode (``band=False``): ``upper`` scores above
    ``hi``, ``lower`` at or above it, ``per_chunk`` int64 counts of the scores equal to it. Band mode: ``upper``
    scores at or above ``hi``, ``band_values`` the int32 bit patterns of the scores inside ``(lo, hi)`` in index
    order (None when more than ``cap``), ``per_chunk`` how many each chunk holds. ``top``: the largest score bit
    pattern (NaN/Inf included).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the fused merge loops are not available")
    numel = expert.numel()
    per_chunk = torch.zeros(max(1, -(-numel // chunk)), dtype=torch.int64)
    counts = torch.zeros(2, dtype=torch.int64)  # upper, lower
    top = torch.zeros(1, dtype=torch.int32)
    gathered = torch.empty(cap if band else 0, dtype=torch.int32)
    inside = lib.sp_count_scores(numel, None if base is None else base.data_ptr(),
                                 0 if base is None else _DTYPES[base.dtype], expert.data_ptr(),
                                 _DTYPES[expert.dtype], int(chunk), float(hi), float(lo), int(band),
                                 per_chunk.data_ptr(), counts[0:].data_ptr(), counts[1:].data_ptr(),
                                 gathered.data_ptr() if band else None, int(cap) if band else 0,
                                 top.data_ptr())
    values = gathered[:inside] if band and inside <= cap else None
    return int(counts[0]), int(counts[1]), per_chunk[: -(-numel // chunk)], values, int(top)
