"""Sharded safetensors writing: the shard plan, the streaming shard writer and its background thread.

:func:`plan_shards` decides which tensor goes into which shard from names and sizes alone (the same plan in every
process of a distributed merge); :class:`ShardWriter` streams each tensor to its offset in its shard, so a merge
holds only the tensors it is combining; :class:`BackgroundWriter` runs those writes on a thread of their own.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file

from .errors import MergeError
from .model_files import SAFE_INDEX, SAFE_SINGLE, PathLike
from .sources import _ST_DTYPES, BufferPool, _numel

logger = logging.getLogger(__name__)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)


def parse_size(size: Union[int, str]) -> int:
    """``"2GB"`` → 2·10⁹ bytes, ``"500MiB"`` → 500·2²⁰, ints pass through."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = _SIZE_RE.match(str(size))
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size like '2GB', '500MB' or an integer byte count")
    value, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.replace("I", "").replace("B", "") or ""]
    result = int(value * base**power)
    if result <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return result


def shard_file_name(index: int, count: int) -> str:
    """Final file name of shard ``index`` (0-based) out of ``count``: ``model.safetensors`` for a single shard."""
    return SAFE_SINGLE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class ShardPlan:
    """Which output tensor goes into which shard file, decided before anything is written.

    Built by :func:`plan_shards` from tensor names and output sizes only, so every process of a distributed merge
    computes the same plan without talking to the others.

    Attributes:
        shards: Tensor names of each shard, in write order.
        sizes: Bytes of each shard.
    """

    shards: tuple[tuple[str, ...], ...]
    sizes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def files(self) -> list[str]:
        return [shard_file_name(i, len(self.shards)) for i in range(len(self.shards))]

    def weight_map(self) -> dict[str, str]:
        """Tensor name → shard file, sorted by name (as in the index file)."""
        files = self.files
        return dict(sorted((name, files[i]) for i, names in enumerate(self.shards) for name in names))

    def assign(self, world_size: int) -> list[list[int]]:
        """Shard indices per rank, balanced by bytes.

        Shards are taken in order and each goes to the rank with the fewest bytes so far (ties: the lowest
        rank), which is round robin when the shards are equal in size. Deterministic in the plan alone.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        loads = [0] * world_size
        out: list[list[int]] = [[] for _ in range(world_size)]
        for i, size in enumerate(self.sizes):
            rank = min(range(world_size), key=lambda r: (loads[r], r))
            out[rank].append(i)
            loads[rank] += size
        return out

    def write_index(self, folder: PathLike) -> Optional[Path]:
        """Write ``model.safetensors.index.json`` into ``folder`` (nothing for a single shard)."""
        if len(self.shards) == 1:
            return None
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map()}
        path = Path(folder) / SAFE_INDEX
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path


def plan_shards(entries: Sequence[tuple[str, int]], max_shard_bytes: int) -> ShardPlan:
    """Split ``(name, nbytes)`` entries, in order, into shards of at most ``max_shard_bytes``.

    Greedy in order, like filling shards as tensors arrive: a shard is closed when the next tensor would push it
    over the limit; a tensor larger than the limit gets a shard of its own.

    Raises:
        MergeError: no entries, or a name listed twice.
    """
    if not entries:
        raise MergeError("no tensors were written")
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise MergeError(f"tensor names are listed more than once: {dupes[:5]}")
    shards: list[tuple[str, ...]] = []
    sizes: list[int] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in entries:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(tuple(current))
            sizes.append(current_bytes)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += int(nbytes)
    shards.append(tuple(current))
    sizes.append(current_bytes)
    return ShardPlan(tuple(shards), tuple(sizes))


_WRITTEN = object()

# safetensors' dtype codes in the order its serializer sorts tensors by (descending), before the name.
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64")
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items() if code in _DTYPE_ORDER}


def _safetensors_header(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]
                        ) -> tuple[bytes, dict[str, int]]:
    """The header ``safetensors.torch.save_file`` writes for these tensors, and each tensor's absolute offset.

    Same layout as the reference serializer (tensors by descending dtype code, then name; compact JSON; header
    padded with spaces to a multiple of 8), so a streamed shard has the bytes save_file would produce.
    """
    order = sorted(specs, key=lambda n: (-_DTYPE_ORDER.index(_ST_CODES[specs[n][1]]), n))
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    rel = {}
    for name in order:
        shape, dtype = specs[name]
        size = _numel(shape) * dtype.itemsize
        entries[name] = {"dtype": _ST_CODES[dtype], "shape": [int(x) for x in shape],
                         "data_offsets": [offset, offset + size]}
        rel[name] = offset
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + off for name, off in rel.items()}


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class ShardWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` as they fill.

    Shards are written under temporary names and renamed to ``model-0000i-of-0000N.safetensors`` by
    :meth:`close`, which also writes ``model.safetensors.index.json``; a single shard becomes
    ``model.safetensors`` and no index is written. A tensor larger than the limit gets a shard of its own.

    With ``plan`` (a :class:`ShardPlan`) the shard boundaries come from the plan instead, and the writer handles
    only the shards listed in ``shard_ids`` (default: all): tensors must arrive in the plan's order, a shard is
    written as soon as its last tensor arrives, :meth:`close` renames this writer's shards to their final names
    and writes no index (:meth:`ShardPlan.write_index` does, once, for all writers of a distributed merge).
    """

    def __init__(
        self,
        folder: PathLike,
        max_shard_bytes: int,
        metadata: Optional[dict[str, str]] = None,
        *,
        plan: Optional[ShardPlan] = None,
        shard_ids: Optional[Sequence[int]] = None,
        specs: Optional[dict[str, tuple[tuple[int, ...], torch.dtype]]] = None,
    ) -> None:
        self.folder = Path(folder)
        # With a plan and every tensor's (shape, dtype) known up front, a shard's header is written when its first
        # tensor arrives and each tensor goes straight to its offset: no shard is held in memory. A subclass that
        # overrides (or patches) write_shard gets the buffered path (whole shards handed to write_shard).
        self._specs = specs
        self._stream: Optional[tuple[int, dict[str, int], Path]] = None  # (fd, offsets, temporary path)
        self._streamed = (
            plan is not None and specs is not None and type(self).write_shard is _DEFAULT_WRITE_SHARD
            and sys.byteorder == "little" and all(dtype in _ST_CODES for _, dtype in specs.values())
        )
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file, names)
        self.total_bytes = 0
        self.plan = plan
        if plan is not None:
            ids = list(range(len(plan.shards))) if shard_ids is None else [int(i) for i in shard_ids]
            bad = [i for i in ids if not 0 <= i < len(plan.shards)]
            if bad:
                raise ValueError(f"shard ids {bad} are outside the plan's {len(plan.shards)} shards")
            self._queue = ids  # shards still to fill, in order
            self._done: list[int] = []
        elif shard_ids is not None:
            raise ValueError("shard_ids needs a plan")

    @property
    def streams(self) -> bool:
        """True when each tensor is written to disk by the time :meth:`add` returns (the caller may reuse it)."""
        return self._streamed

    def _planned_names(self) -> tuple[str, ...]:
        return self.plan.shards[self._queue[0]] if self._queue else ()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.plan is not None:
            names = self._planned_names()
            position = len(self._pending)
            if position >= len(names) or names[position] != name:
                expected = names[position] if position < len(names) else None
                raise MergeError(
                    f"internal error: tensor {name!r} arrived out of the shard plan's order (expected {expected!r})"
                )
            if self._streamed:
                self._stream_add(name, names, tensor)
            else:
                self._pending[name] = tensor.detach().to("cpu").contiguous()
            self._pending_bytes += nbytes
            self.total_bytes += nbytes
            if len(self._pending) == len(names):
                index = self._queue[0]
                if self._pending_bytes != self.plan.sizes[index]:
                    raise MergeError(
                        f"internal error: shard {index + 1} holds {self._pending_bytes} bytes, the plan has "
                        f"{self.plan.sizes[index]} (a tensor's output dtype differs from the planned one)"
                    )
                self._flush_as(index)
                self._queue.pop(0)
            return
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def abort(self) -> None:
        """Close a shard being streamed (after an error; the caller removes the folder)."""
        if self._stream is not None:
            os.close(self._stream[0])
            self._stream = None

    def _stream_add(self, name: str, names: tuple[str, ...], tensor: torch.Tensor) -> None:
        shape, dtype = self._specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise MergeError(f"internal error: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, the shard "
                             f"plan expects {dtype} {list(shape)}")
        if self._stream is None:
            path = self.folder / f".shard-{self._queue[0]:05d}.tmp"
            header, offsets = _safetensors_header({n: self._specs[n] for n in names}, self.metadata)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._stream = (fd, offsets, path)
            _pwrite_all(fd, header, 0)
        fd, offsets, _ = self._stream
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            _pwrite_all(fd, memoryview(data.numpy()), offsets[name])
        self._pending[name] = _WRITTEN  # only the name is kept

    def _flush_as(self, index: int) -> None:
        tmp_name = f".shard-{index:05d}.tmp"
        if self._stream is not None:
            fd, _, path = self._stream
            self._stream = None
            os.close(fd)
            self._written.append((path.name, list(self._pending)))
            self._done.append(index)
            self._pending = {}
            self._pending_bytes = 0
            return
        self.write_shard(self._pending, self.folder / tmp_name)
        self._written.append((tmp_name, list(self._pending)))
        if self.plan is not None:
            self._done.append(index)
        logger.debug("wrote shard %d with %d tensors (%.1f MB)", index + 1, len(self._pending),
                     self._pending_bytes / 1e6)
        self._pending = {}
        self._pending_bytes = 0

    def flush(self) -> None:
        if not self._pending:
            return
        if self.plan is not None:
            raise MergeError(
                f"internal error: shard {self._queue[0] + 1} is incomplete ({len(self._pending)} of "
                f"{len(self._planned_names())} tensors)"
            )
        self._flush_as(len(self._written))

    def write_shard(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Write one shard (separate so tests can make it fail)."""
        save_file(tensors, str(path), metadata=self.metadata)

    def close(self) -> list[str]:
        """Flush, rename the shards to their final names and write the index. Returns the shard file names.

        With a plan: renames this writer's shards and returns their names; writes no index.
        """
        self.flush()
        if self.plan is not None:
            if self._queue:
                raise MergeError(f"internal error: shards {[i + 1 for i in self._queue]} of the plan were not "
                                 "written")
            files = self.plan.files
            out = []
            for (tmp_name, _), index in zip(self._written, self._done):
                os.replace(self.folder / tmp_name, self.folder / files[index])
                out.append(files[index])
            return out
        count = len(self._written)
        if count == 0:
            raise MergeError("no tensors were written")
        if count == 1:
            os.replace(self.folder / self._written[0][0], self.folder / SAFE_SINGLE)
            return [SAFE_SINGLE]
        weight_map: dict[str, str] = {}
        files = []
        for i, (tmp_name, names) in enumerate(self._written):
            final = shard_file_name(i, count)
            os.replace(self.folder / tmp_name, self.folder / final)
            files.append(final)
            for name in names:
                weight_map[name] = final
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


_DEFAULT_WRITE_SHARD = ShardWriter.write_shard  # replaced (tests, subclasses) -> whole shards go through it


class BackgroundWriter:
    """Runs a streaming :class:`ShardWriter`'s writes on a thread of their own, so the next tensor is merged while
    the previous one is written (``pwrite`` releases the GIL).

    :meth:`add` queues a tensor (at most ``depth`` wait; then it blocks); ``recycle`` lists tensors whose buffers go
    back to ``pool`` once the write is done. A write error is raised by the next :meth:`add` or by :meth:`close`.
    """

    def __init__(self, writer: ShardWriter, pool: Optional[BufferPool] = None, depth: int = 2) -> None:
        self.writer = writer
        self.pool = pool
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sens-peft-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, tensor, recycle = item
            if self._error is not None:
                continue  # drain after a failure; the consumer raises it
            try:
                self.writer.add(name, tensor)
            except BaseException as err:  # handed to the consumer
                self._error = err
                continue
            if self.pool is not None:
                for t in recycle:
                    self.pool.give(t)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def add(self, name: str, tensor: torch.Tensor, recycle: Sequence[torch.Tensor] = ()) -> None:
        self._raise()
        self._queue.put((name, tensor, tuple(recycle)))

    def _join(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def close(self) -> list[str]:
        """Wait for the queued writes, then close the writer (see :meth:`ShardWriter.close`)."""
        self._join()
        self._raise()
        return self.writer.close()

    def abort(self) -> None:
        """Stop after the write in progress and abort the writer (the caller removes the folder)."""
        while True:  # drop what is still queued
            try:
                self._queue.get_nowait()
            except Exception:
                break
        self._join()
        self.writer.abort()
