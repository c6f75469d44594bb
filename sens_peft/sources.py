"""Streamed reading of a model folder's weights, one tensor at a time.

:class:`TensorSource` parses each shard's header and reads a tensor with ``pread`` (optionally into recycled
buffers of a :class:`BufferPool`) or as a copy-on-write memory map of its byte range alone.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from .errors import MergeError
from .model_files import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, PathLike

# Copy-on-write memory maps of byte ranges (POSIX); elsewhere tensors are read with pread into buffers.
CAN_MAP = hasattr(mmap, "MAP_PRIVATE")


class BufferPool:
    """Recycled byte buffers, handed out by exact size.

    Reading a tensor into freshly allocated memory costs a page fault per 4 KiB page, and large allocations go back
    to the operating system when freed, so a streamed merge would fault in every byte it reads (measured here: a
    ``pread`` of 400 MB into fresh memory took 4x as long as into a reused buffer). The tensors of a model come in a
    handful of sizes, so a free list per size lets the reader and the merge reuse the same pages. Idle buffers are
    kept up to ``max_idle_bytes`` (the least recently returned size goes first). Thread-safe.
    """

    def __init__(self, max_idle_bytes: int = 64 * 2**20) -> None:
        self.max_idle_bytes = int(max_idle_bytes)
        self._free: dict[int, list[torch.Tensor]] = {}
        self._idle = 0
        self._lock = threading.Lock()
        self._owned: dict[int, int] = {}  # data pointer -> size of the buffers this pool allocated

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of ``nbytes`` (contents undefined)."""
        with self._lock:
            bucket = self._free.get(nbytes)
            if bucket:
                buf = bucket.pop()
                if not bucket:
                    del self._free[nbytes]
                self._idle -= nbytes
                return buf
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._owned[buf.data_ptr()] = nbytes
        return buf

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor whose storage came from :meth:`take`; the caller must hold no other view of it."""
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        with self._lock:
            if self._owned.get(storage.data_ptr()) != nbytes or nbytes == 0:
                return
            if nbytes > self.max_idle_bytes:
                del self._owned[storage.data_ptr()]
                return
            while self._idle + nbytes > self.max_idle_bytes and self._free:
                size = next(iter(self._free))  # oldest size first
                dropped = self._free[size].pop()
                if not self._free[size]:
                    del self._free[size]
                self._idle -= size
                self._owned.pop(dropped.data_ptr(), None)
            buf = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))
            self._free.setdefault(nbytes, []).append(buf)
            self._idle += nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._owned.clear()
            self._idle = 0


class TensorSource:
    """Read-only, tensor-at-a-time access to a model folder's weights.

    Handles ``model.safetensors``, ``model.safetensors.index.json`` (sharded) and, with ``allow_pickle=True``,
    ``pytorch_model.bin`` / its index (loaded with ``torch.load(weights_only=True, mmap=True)``).

    Args:
        folder: Model folder.
        allow_pickle: Accept ``.bin`` pickle checkpoints.
        label: Name used in error messages (e.g. ``"expert 'math'"``).
    """

    def __init__(self, folder: PathLike, *, allow_pickle: bool = False, label: str = "model") -> None:
        self.folder = Path(folder)
        self.label = label
        self._handles: dict[str, Any] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}
        if not self.folder.is_dir():
            raise MergeError(f"{label}: folder {self.folder} does not exist")
        self.pickle = False
        if (self.folder / SAFE_INDEX).is_file():
            self.weight_map = self._read_index(self.folder / SAFE_INDEX)
        elif (self.folder / SAFE_SINGLE).is_file():
            self.weight_map = {}
            self._single(SAFE_SINGLE)
        elif (self.folder / PICKLE_INDEX).is_file() or (self.folder / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise MergeError(
                    f"{label}: {self.folder} holds only pickle checkpoints (pytorch_model.bin); loading them can run "
                    "arbitrary code. Convert them to safetensors, or pass allow_pickle=True if you trust the files"
                )
            self.pickle = True
            if (self.folder / PICKLE_INDEX).is_file():
                self.weight_map = self._read_index(self.folder / PICKLE_INDEX)
            else:
                self.weight_map = {}
                self._single(PICKLE_SINGLE)
        else:
            raise MergeError(
                f"{label}: no weights found in {self.folder} (expected {SAFE_SINGLE} or {SAFE_INDEX})"
            )
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in sorted(set(self.weight_map.values())):
            for name, meta in self._file_meta(file).items():
                self._meta[name] = meta
        missing = sorted(set(self.weight_map) - set(self._meta))
        if missing:
            raise MergeError(f"{label}: the index of {self.folder} lists tensors its shards lack: {missing[:5]}")
        # The metadata is read; tensors are read with pread (see get), so the memory maps can go.
        self._handles.clear()

    def _single(self, filename: str) -> None:
        for name in self._file_keys(filename):
            self.weight_map[name] = filename

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            data = json.loads(path.read_text())
            weight_map = dict(data["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MergeError(f"{self.label}: cannot read the shard index {path}: {err}") from err
        for file in set(weight_map.values()):
            if not (self.folder / file).is_file():
                raise MergeError(f"{self.label}: shard {self.folder / file} listed in {path.name} does not exist")
        return weight_map

    def _handle(self, filename: str):
        if filename not in self._handles:
            try:
                self._handles[filename] = safe_open(str(self.folder / filename), framework="pt", device="cpu")
            except Exception as err:
                raise MergeError(f"{self.label}: cannot open {self.folder / filename}: {err}") from err
        return self._handles[filename]

    def _pickled_file(self, filename: str) -> dict[str, torch.Tensor]:
        if filename not in self._pickled:
            self._pickled[filename] = torch.load(
                self.folder / filename, map_location="cpu", weights_only=True, mmap=True
            )
        return self._pickled[filename]

    def _file_keys(self, filename: str) -> list[str]:
        if filename.endswith(".bin"):
            return list(self._pickled_file(filename).keys())
        return list(self._handle(filename).keys())

    def _file_meta(self, filename: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {}
        if filename.endswith(".bin"):
            for name, tensor in self._pickled_file(filename).items():
                out[name] = (tuple(tensor.shape), tensor.dtype)
            return out
        handle = self._handle(filename)
        for name in handle.keys():
            sl = handle.get_slice(name)
            out[name] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
        return out

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard)."""
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def file_of(self, name: str) -> Path:
        return self.folder / self.weight_map[name]

    def _offsets(self, filename: str) -> dict[str, tuple[int, int]]:
        """Absolute byte ranges of the tensors of a safetensors file, from its header (read once)."""
        if filename not in self._ranges:
            path = self.folder / filename
            try:
                with open(path, "rb") as fh:
                    (size,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(size))
                start = 8 + size
                self._ranges[filename] = {
                    name: (start + int(info["data_offsets"][0]), start + int(info["data_offsets"][1]))
                    for name, info in header.items() if name != "__metadata__"
                }
            except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
                raise MergeError(f"{self.label}: cannot read the header of {path}: {err}") from err
        return self._ranges[filename]

    def get(self, name: str, pool: Optional[BufferPool] = None, *, mapped: bool = False) -> torch.Tensor:
        """Read one tensor as a CPU tensor of its own.

        By default the bytes are read with ``pread`` into a buffer (from ``pool`` when given). With
        ``mapped=True`` the tensor's byte range alone is memory-mapped copy-on-write and its pages are mapped in
        up front (``MAP_POPULATE`` on Linux): no copy is made, writes to the tensor never reach the file, and the
        mapping goes away with the last reference to the tensor. Either way a streamed merge holds only the
        tensors in flight, not the touched pages of every input file.
        """
        if name not in self.weight_map:
            raise MergeError(f"{self.label}: tensor {name!r} is not in {self.folder}")
        filename = self.weight_map[name]
        if filename.endswith(".bin"):
            return self._pickled_file(filename)[name].clone()
        shape, dtype = self._meta[name]
        start, end = self._offsets(filename)[name]
        nbytes = end - start
        if nbytes != _numel(shape) * dtype.itemsize or sys.byteorder != "little":
            return self._handle(filename).get_tensor(name)  # let safetensors handle (or reject) the odd case
        if nbytes and mapped and CAN_MAP:
            return self._map(filename, name, start, nbytes).view(dtype).reshape(shape)
        buf = pool.take(nbytes) if pool is not None and nbytes else torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            fd = os.open(self.folder / filename, os.O_RDONLY)
            try:
                view = memoryview(buf.numpy()).cast("B")
                done = 0
                while done < nbytes:
                    got = os.preadv(fd, [view[done:]], start + done)
                    if got <= 0:
                        raise MergeError(f"{self.label}: {self.folder / filename} ended inside tensor {name!r}")
                    done += got
            finally:
                os.close(fd)
        return buf.view(dtype).reshape(shape)

    def _map(self, filename: str, name: str, start: int, nbytes: int) -> torch.Tensor:
        path = self.folder / filename
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if start + nbytes > size:  # touching a page past the end would raise SIGBUS, not an error
                raise MergeError(f"{self.label}: {path} ended inside tensor {name!r}")
            # MAP_POPULATE would break copy-on-write on every page of a private writable map (a full copy);
            # the pages are faulted in by reading one byte of each instead.
            region = mmap.mmap(fh.fileno(), start + nbytes - aligned, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
        # the tensor keeps the mmap alive through the buffer it was made from; the mapping closes with it
        tensor = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=start - aligned)
        tensor[::mmap.PAGESIZE].sum()
        return tensor

    def total_bytes(self) -> int:
        return sum(
            _numel(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in self._meta.values()
        )

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# float8 codes only where this torch has the dtypes (an unknown code would give a wrong element size for the
# shard plan, which must match the tensors actually written).
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_code] = getattr(torch, _attr)


def _st_dtype(code: str) -> torch.dtype:
    if code in _ST_DTYPES:
        return _ST_DTYPES[code]
    return getattr(torch, code.lower(), torch.float32)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n

