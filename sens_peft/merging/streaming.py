"""The full-model engine: tensors streamed from disk to disk. A reader thread (:class:`Prefetcher`) memory-maps
the next tensors while one is merged, two workers run the method's preparation jobs (TIES thresholds, DARE masks),
and :class:`ShardMerger` merges each tensor with the method's chunked hook (or its dense hook, on the whole tensor)
and hands it to the shard writer (:mod:`sens_peft.io`)."""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import MergeError
from ..io import BackgroundWriter, BufferPool, ShardPlan, ShardWriter, TensorSource
from ..methods import DEFAULT_CHUNK, merge_deltas, merge_streamed
from ..validation import check_finite, check_merged_finite
from .plan import MergePlan, progress_bar

logger = logging.getLogger(__name__)

__all__ = ["Prefetcher", "ShardMerger", "check_tensors", "chunk_for", "out_nbytes"]

_DONE = object()
# The input bytes the reader may hold ahead of the merge (see _Prefetcher).
READ_AHEAD_BYTES = 512 * 2**20


class Prefetcher:
    """Background reader: yields ``[name, base_tensor, [expert tensors], prepared, alone, extra]`` with a read-ahead of
    ``depth`` tensors. ``prepare(name, base, experts, parts)`` returns the jobs (zero-argument callables, about
    ``parts`` of them) that prepare a tensor, or None; they run on two worker threads and ``prepared`` is the list
    of their results (None without jobs). ``alone`` is True for a tensor that little else can overlap with (what
    fits in memory beside it is under a quarter of its size, e.g. it is the last one, or the next one does not fit),
    so its preparation and merge are worth splitting (``parts`` is 2 for it).
    ``extra(name)``, when given, runs on the reader thread for each floating-point tensor and its result is
    ``extra`` (else None): the statistics a dense data-aware merge reads (Gram matrices), loaded and checked while
    the tensor before is being solved; ``extra_bytes(name)`` is what that result holds in memory.
    The consumer should clear each list when done with it, so that the tensors go at once.

    Memory is bounded in bytes too: the tensors read and not yet finished by the consumer (the one it is merging
    included, until it asks for the next) stay within ``max_bytes``, except that one tensor alone may exceed it; so
    a vocabulary-sized tensor is read only once the consumer is done with everything before it.
    """

    def __init__(self, names: list[str], base: TensorSource, experts: list[TensorSource], depth: int = 2,
                 max_bytes: int = READ_AHEAD_BYTES, pool: Optional[BufferPool] = None, mapped: bool = True,
                 prepare: Optional[Callable[[str, torch.Tensor, list[torch.Tensor], int],
                                            Optional[list[Callable[[], Any]]]]] = None,
                 prepare_bytes: Optional[Callable[[int], int]] = None,
                 extra: Optional[Callable[[str], Any]] = None, extra_bytes: Optional[Callable[[str], int]] = None
                 ) -> None:
        self.pool = pool
        self._extra, self._extra_bytes = extra, extra_bytes
        self.mapped = mapped
        # work done ahead for each tensor (drawing DARE masks, selecting TIES thresholds), on worker threads;
        # prepare_bytes(numel) is what its results hold in memory
        self._prepare = prepare
        self._prepare_bytes = prepare_bytes
        # Two workers: the tensors' preparations are independent (each has its own generator), so while the
        # consumer merges one tensor, the next two are prepared side by side.
        self._workers = ThreadPoolExecutor(2, thread_name_prefix="sens-peft-prepare") if prepare else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._names = names
        self._base = base
        self._experts = experts
        self._max_bytes = max_bytes
        self._queued = 0  # bytes read and not yet finished by the consumer
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sens-peft-prefetch", daemon=True)
        self._thread.start()

    def _nbytes(self, name: str) -> int:
        extra = self._prepare_bytes(numel_of(self._base, name)) if self._prepare_bytes is not None else 0
        extra += self._extra_bytes(name) if self._extra_bytes is not None else 0
        return extra + sum(out_nbytes(src, name, None) for src in (self._base, *self._experts))

    def _alone(self, sizes: list[int], i: int) -> bool:
        """Whether what can be read while tensor ``i`` is in flight (the tensors after it, up to the first that
        does not fit beside it) is under a quarter of its size: too little to overlap with its work."""
        room = self._max_bytes - sizes[i]
        beside = 0
        for size in sizes[i + 1:]:
            if beside + size > room:
                break
            beside += size
        return beside * 4 < sizes[i]

    def _put(self, item, nbytes: int = 0) -> bool:
        with self._cond:
            self._queued += nbytes
        while not self._stop.is_set():
            try:
                self._queue.put((item, nbytes), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            sizes = [self._nbytes(name) for name in self._names]
            for i, name in enumerate(self._names):
                nbytes = sizes[i]
                with self._cond:  # wait for room before reading, so the bound holds for what is in memory
                    while self._queued and self._queued + nbytes > self._max_bytes and not self._stop.is_set():
                        self._cond.wait(timeout=0.1)
                if self._stop.is_set():
                    return
                base_t = self._base.get(name, self.pool, mapped=self.mapped)
                experts = [e.get(name, self.pool, mapped=self.mapped) for e in self._experts]
                alone = self._alone(sizes, i)
                ready = None
                if self._workers is not None and base_t.is_floating_point():
                    jobs = self._prepare(name, base_t, experts, 2 if alone else 1)
                    if jobs:
                        ready = [self._workers.submit(job) for job in jobs]
                extra = self._extra(name) if self._extra is not None and base_t.is_floating_point() else None
                item = (name, base_t, experts, ready, alone, extra)
                if not self._put(item, nbytes):
                    return
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._put(err)

    def __iter__(self):
        while True:
            item, nbytes = self._queue.get()
            try:
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                name, base_t, experts, ready, alone, extra = item
                # a list, so that the consumer can drop every reference (tqdm's included) by clearing it
                entry = [name, base_t, experts, None if ready is None else [f.result() for f in ready], alone, extra]
                item = base_t = experts = ready = extra = None
                yield entry
            finally:  # the consumer is done with this tensor (it asked for the next one, or stopped)
                with self._cond:
                    self._queued -= nbytes
                    self._cond.notify_all()

    def recycle(self, *tensors: torch.Tensor) -> None:
        """Hand the buffers of tensors the consumer is done with back to the pool (no other view may remain)."""
        if self.pool is not None:
            for tensor in tensors:
                self.pool.give(tensor)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._workers is not None:
            self._workers.shutdown(wait=True, cancel_futures=True)
        if self.pool is not None:
            self.pool.clear()


def check_tensors(base: TensorSource, experts: list[TensorSource], names: list[str]) -> None:
    base_names = set(base.names())
    for name, src in zip(names, experts):
        expert_names = set(src.names())
        missing = sorted(base_names - expert_names)
        if missing:
            raise MergeError(
                f"expert {name!r} ({src.folder}) lacks tensor {missing[0]!r} of the base (in "
                f"{base.file_of(missing[0]).name}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}"
            )
        extra = sorted(expert_names - base_names)
        if extra:
            raise MergeError(
                f"expert {name!r} has tensor {extra[0]!r} (in {src.file_of(extra[0])}) that the base "
                f"({base.folder}) lacks{f', and {len(extra) - 1} more' if len(extra) > 1 else ''}"
            )
        for tensor in base.names():
            if src.shape(tensor) != base.shape(tensor):
                raise MergeError(
                    f"expert {name!r}: tensor {tensor!r} in {src.file_of(tensor)} has shape "
                    f"{list(src.shape(tensor))}, the base ({base.file_of(tensor)}) has {list(base.shape(tensor))}"
                )


def chunk_for(device: torch.device) -> int:
    """Entries per chunk of the streamed merge: cache-sized on the CPU; on an accelerator, large enough that a
    chunk's ~50 element-wise kernels are not dominated by their launch cost."""
    return DEFAULT_CHUNK if device.type == "cpu" else 1 << 24


def numel_of(src: TensorSource, name: str) -> int:
    return math.prod(src.shape(name))


def out_nbytes(src: TensorSource, name: str, out_dtype: Optional[torch.dtype]) -> int:
    """Bytes of tensor ``name`` in the output: ``out_dtype`` for floating-point tensors, else the base dtype."""
    dtype = src.dtype(name)
    if out_dtype is not None and dtype.is_floating_point:
        dtype = out_dtype
    return math.prod(int(s) for s in src.shape(name)) * dtype.itemsize


class ShardMerger:
    """Merges and writes the tensors of some shards of a plan (one rank's share of a merge).

    Args:
        folder: Output (temporary) folder. shards: The shard plan. shard_ids: The shards written here.
        base: Base folder (for messages). base_src, expert_srcs: The inputs. plan: The merge plan.
        device: Math device. out_dtype: Output dtype of float tensors (None: the base's). prefetch: Read-ahead.
    """

    def __init__(self, folder: Path, shards: ShardPlan, shard_ids: list[int], base: Path, base_src: TensorSource,
                 expert_srcs: list[TensorSource], plan: MergePlan, device: torch.device,
                 out_dtype: Optional[torch.dtype], prefetch: int) -> None:
        self.base, self.base_src, self.expert_srcs, self.plan = base, base_src, expert_srcs, plan
        self.device, self.out_dtype = device, out_dtype
        self.method, self.params = plan.method, plan.params()
        self.everyone = list(range(len(plan.experts)))
        self.tensor_names = [name for i in shard_ids for name in shards.shards[i]]
        specs = {}
        for name in self.tensor_names:
            dtype = base_src.dtype(name)
            specs[name] = (base_src.shape(name), out_dtype if out_dtype is not None and dtype.is_floating_point
                           else dtype)
        self.writer = ShardWriter(folder, max(shards.sizes), plan=shards, shard_ids=shard_ids, specs=specs)
        # Buffers are recycled, and writes moved to a thread of their own, only when the writer writes each tensor
        # as it comes (a writer that gathers whole shards keeps references to them).
        self.pool = BufferPool() if self.writer.streams else None
        self.sink = BackgroundWriter(self.writer, self.pool) if self.writer.streams else None
        streamed_cpu = self.method.chunked(self.params) and device.type == "cpu"
        # A tensor that little else overlaps with (see Prefetcher) is merged in two halves on two threads.
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="sens-peft-merge") if streamed_cpu else None
        # the method's work ahead (TIES thresholds, DARE masks) runs on the reader's two workers
        ahead = streamed_cpu and self.method.prepares(self.params)
        # a dense method's statistics (RegMean's Grams) are read and checked on the reader thread, ahead
        stats_ahead = not self.method.chunked(self.params) and bool(plan.needs)
        self.reader = Prefetcher(self.tensor_names, base_src, expert_srcs, depth=prefetch,
                                 max_bytes=READ_AHEAD_BYTES, pool=self.pool,
                                 prepare=self.prepare if ahead else None,
                                 prepare_bytes=self.prepare_bytes if ahead else None,
                                 extra=self.load_statistics if stats_ahead else None,
                                 extra_bytes=self.statistics_bytes if stats_ahead else None)

    def prepare_bytes(self, numel: int) -> int:
        return self.method.prepare_bytes(numel, len(self.expert_srcs), self.params, self.device)

    def load_statistics(self, name: str) -> Optional[dict[str, list[torch.Tensor]]]:
        """The statistics the method reads for tensor ``name`` (on the reader thread), or None when they cannot
        be had: then the merge asks again when (and only if) it merges the tensor, and raises there, so a tensor
        that turns out to be copied never fails for lack of statistics."""
        try:
            return self.plan.statistics(name, self.everyone)
        except Exception:  # noqa: BLE001 - re-raised by the consumer's own call, with its context
            return None

    def statistics_bytes(self, name: str) -> int:
        """An upper bound of the bytes :meth:`load_statistics` holds for ``name`` (fp32; a full Gram per expert
        for a 2-D weight, per-element maps otherwise), counted against the reader's memory bound."""
        shape = self.base_src.shape(name)
        numel = math.prod(int(s) for s in shape)
        per_expert = sum(int(shape[-1]) ** 2 if kind == "gram" and len(shape) == 2 else
                         0 if kind == "gram" else numel for kind in self.plan.needs)
        return 4 * per_expert * len(self.expert_srcs)

    def prepare(self, name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor], parts: int
                ) -> Optional[list[Callable[[], Any]]]:
        """The method's preparation jobs for one tensor (on the reader thread; the jobs run on the workers). The
        slowest steps of DARE and TIES on the CPU (drawing masks, selecting thresholds) so overlap with the merge of
        the tensor before (torch releases the GIL inside its ops)."""
        if all(torch.equal(base_t, t) for t in expert_ts):
            return None  # copied, not merged
        return self.method.stream_prepare(base_t, expert_ts, self.plan.tensor_params(name, self.everyone), name, self.plan.statistics(name, self.everyone),
                                          parts, self.device, self.out_dtype or base_t.dtype)

    def emit(self, name: str, tensor: torch.Tensor, done: tuple[torch.Tensor, ...] = ()) -> None:
        """Write ``tensor``; the buffers of ``done`` go back to the pool once it is written."""
        check_merged_finite(name, tensor)
        if self.sink is None:
            self.writer.add(name, tensor)
        else:
            self.sink.add(name, tensor, done)

    def check_inputs(self, name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor]) -> None:
        """MergeError naming the input (base or expert) and file of tensor ``name`` that holds a NaN/Inf."""
        check_finite(base_t, f"base ({self.base})", name, self.base_src.file_of(name))
        for label, src, t in zip(self.plan.experts, self.expert_srcs, expert_ts):
            check_finite(t, f"expert {label!r}", name, src.file_of(name))

    def copy(self, name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor]) -> None:
        """A tensor equal in the base and every expert: written as it is (in the output dtype)."""
        # Inf == Inf, so a copied tensor is checked here; NaN never compares equal and is caught when merged.
        check_finite(base_t, f"base ({self.base})", name, self.base_src.file_of(name))
        self.reader.recycle(*expert_ts)
        written = base_t.to(self.out_dtype or base_t.dtype) if base_t.is_floating_point() else base_t
        if written is base_t:
            self.emit(name, base_t, (base_t,))
        else:
            self.reader.recycle(base_t)
            self.emit(name, written)

    def merge_chunked(self, name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor], ready, alone: bool
                      ) -> None:
        """The method's chunked hook. The non-finite check rides on the merge's own passes; only when it trips
        are the inputs checked one by one, to name the broken one."""
        dtype, device = self.out_dtype or base_t.dtype, self.device
        out = None
        if self.pool is not None and device.type == "cpu":
            out = self.pool.take(base_t.numel() * dtype.itemsize).view(dtype).view(base_t.shape)
        kwargs = dict(out_dtype=dtype, chunk=chunk_for(device), **self.plan.tensor_kwargs(name, self.everyone),
                      **(self.method.prepared(ready) if ready is not None else {}))
        inputs = (self.plan.config.method, base_t.to(device), [t.to(device) for t in expert_ts],
                  self.plan.coefficients(name))
        numel, chunk = base_t.numel(), kwargs["chunk"]
        # halves on chunk borders (on the CPU, where the method's preparation, if any, was done ahead for both)
        if self.helper is not None and alone and numel >= 2 * chunk:
            if out is None:
                out = torch.empty(base_t.shape, dtype=dtype)
            mid = numel // 2 // chunk * chunk
            second = self.helper.submit(merge_streamed, *inputs, out=out, span=(mid, numel), **kwargs)
            try:
                merged, finite = merge_streamed(*inputs, out=out, span=(0, mid), **kwargs)
            finally:  # never leave the helper writing into a buffer that is about to be recycled
                wait([second])
            finite = second.result()[1] and finite
        else:
            merged, finite = merge_streamed(*inputs, out=out, **kwargs)
        if not finite:  # raises on a NaN/Inf input; a finite overflow is written as computed
            self.check_inputs(name, base_t, expert_ts)
        self.reader.recycle(base_t, *expert_ts)
        self.emit(name, merged.cpu(), (merged,) if out is not None else ())

    def merge_dense(self, name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor],
                    statistics: Optional[dict[str, list[torch.Tensor]]] = None) -> None:
        """A method without a chunked hook: the whole tensor's deltas through its dense hook (``statistics``:
        the method's statistics of this tensor when the reader loaded them already)."""
        self.check_inputs(name, base_t, expert_ts)
        device = self.device
        base_f = base_t.to(device=device, dtype=torch.float32)
        deltas = [t.to(device=device, dtype=torch.float32) - base_f for t in expert_ts]
        coeffs = self.plan.coefficients(name).to(device=device, dtype=torch.float32)
        merged = base_f + merge_deltas(self.plan.config.method, deltas, coeffs, scale=1.0,
                                       **self.plan.tensor_kwargs(name, self.everyone, device, statistics))
        self.reader.recycle(base_t, *expert_ts)
        self.emit(name, merged.to(self.out_dtype or base_t.dtype).cpu())

    def merge_tensor(self, name: str, base_t: torch.Tensor, expert_ts: list[torch.Tensor], ready, alone: bool,
                     statistics: Optional[dict[str, list[torch.Tensor]]] = None) -> bool:
        """Merge (or copy) one tensor and queue it for writing; True if merged, False if copied."""
        # torch.equal stops at the first difference, so for merged tensors this costs next to nothing.
        if all(torch.equal(base_t, t) for t in expert_ts):
            self.copy(name, base_t, expert_ts)
            return False
        if not base_t.is_floating_point():
            raise MergeError(f"tensor {name!r} is not floating point ({base_t.dtype}) and differs between "
                             "the base and an expert; it cannot be merged")
        if self.method.chunked(self.params):
            self.merge_chunked(name, base_t, expert_ts, ready, alone)
        else:
            self.merge_dense(name, base_t, expert_ts, statistics)
        return True

    def run(self, progress: Optional[bool]) -> tuple[int, int]:
        """Merge and write every tensor; returns (merged, copied)."""
        merged_count = copied_count = 0
        try:
            for item in progress_bar(self.reader, len(self.tensor_names), "merging tensors", progress):
                if self.merge_tensor(*item):
                    merged_count += 1
                else:
                    copied_count += 1
                # the tensors go now, not when the next item arrives (the reader counts them as finished then)
                item.clear()
        except BaseException:
            (self.sink or self.writer).abort()
            raise
        finally:
            self.reader.close()
            if self.helper is not None:
                self.helper.shutdown(wait=True)
        (self.sink or self.writer).close()
        return merged_count, copied_count
