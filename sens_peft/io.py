"""File handling for merges: errors, atomic output folders, streamed safetensors reading and sharded writing.

Nothing here does merge math. The reader parses each shard's header and hands out one tensor at a time, read with
``pread`` (optionally into recycled buffers of a :class:`BufferPool`); the writer streams each tensor to its offset in
its output shard, so a merge holds only the tensors it is combining.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import queue
import re
import shutil
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import MergeError  # noqa: F401  (re-exported: defined in sens_peft.errors)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Files copied from the base folder into a merged full model (when present).
COPY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# config.json keys that must agree between a base model and its experts for a merge to make sense.
CONFIG_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "tie_word_embeddings",
)


# --------------------------------------------------------------------------------------------------------------
# atomic output folder


def _is_relative_to(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or we cannot tell: keep its folder
    return True


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings of ``out`` left by dead processes.

    A merge killed with SIGKILL (or a power cut) cannot clean up; its temporary folder carries its pid, so a later
    merge to the same output removes it once that process is gone. Folders of live processes (a concurrent merge)
    and folders without a pid are left alone. Returns the folders removed.
    """
    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-")
    if not out.parent.is_dir():
        return removed
    for sibling in out.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
            logger.info("removed %s, left by an interrupted merge (process %s)", sibling, match.group(1))
    return removed


_RENAME_NOREPLACE = 1  # linux/fs.h


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError when ``dst`` exists, decided by the kernel.

    Uses ``renameat2(RENAME_NOREPLACE)`` where libc has it (Linux); elsewhere ``os.rename``, which still refuses a
    non-empty destination folder (a merged folder is never empty), so a concurrent writer is never overwritten.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # flag unsupported here: fall back
            raise OSError(err, os.strerror(err), str(src))
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from err
        raise


def claim_path(out: Path) -> Path:
    """The lock file that claims ``out`` for one writer: ``<parent>/.<name>.lock``."""
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def claim_output(out: Path) -> Iterator[None]:
    """Hold an exclusive claim on the output path ``out`` for the duration of the block.

    The claim is an ``flock`` on ``<parent>/.<name>.lock``, taken without waiting: a second writer to the same
    output (another process or thread) fails at once instead of racing the first one to the final rename. The
    kernel drops the lock when its holder dies, so a killed merge leaves no stale claim. Where ``fcntl`` is
    missing, the claim is the lock file itself, created with ``O_EXCL``.

    Raises:
        MergeError: another writer holds the claim.
    """
    lock = claim_path(out)
    busy = MergeError(f"output folder {out} already exists or is being written by another merge right now "
                      f"(its claim {lock} is held); wait for it or choose another output folder")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise busy from None
        try:
            yield
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)
        return
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise busy from None
        # The previous holder unlinks the file when it releases it: the lock must be on the file now at ``lock``.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: PathLike, overwrite: bool = False, inputs: Optional[list[PathLike]] = None
) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out_dir`` only if the block finishes.

    The temporary folder is ``<parent>/.<name>.tmp-<pid>-XXXX``; on success it is renamed to ``out_dir`` (replacing
    an existing folder when ``overwrite``), on any exception it is removed, so an interrupted merge never leaves a
    partial output. A process killed outright (SIGKILL, power loss) leaves its hidden temporary folder behind;
    the next merge to the same ``out_dir`` removes it (see :func:`clean_stale_temps`).

    Two merges to one ``out_dir`` never both succeed: the whole block holds an exclusive claim on the output path
    (:func:`claim_output`), the existence check is made under it, and without ``overwrite`` the final rename is
    one that fails when ``out_dir`` exists (:func:`_rename_noreplace`), so a folder created meanwhile by anything
    else is not replaced either.

    Args:
        out_dir: Final output folder.
        overwrite: Replace an existing ``out_dir``. Without it an existing ``out_dir`` is an error.
        inputs: Input folders; ``out_dir`` may not be one of them or lie inside one (it would be read while
            written, and ``overwrite`` could delete an input).

    Raises:
        MergeError: ``out_dir`` exists (without ``overwrite``), is being written by another merge, or is or lies
            inside an input folder.
    """
    from .validation import check_output_location

    out = Path(out_dir).expanduser().resolve()
    check_output_location(out, inputs or [])
    if out.exists() and not overwrite:
        raise MergeError(f"output folder {out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim_output(out):
        # decided again under the claim: the check above may be stale
        if out.exists() and not overwrite:
            raise MergeError(f"output folder {out} already exists; pass overwrite=True to replace it")
        if out.exists() and not out.is_dir():
            raise MergeError(f"output path {out} exists and is not a folder")
        clean_stale_temps(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            if out.exists() and overwrite:
                # Move the old folder aside first so a failure between the two renames loses nothing.
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                old.rmdir()
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    _rename_noreplace(tmp, out)
                except FileExistsError:
                    raise MergeError(f"output folder {out} already exists (created while this merge ran); "
                                     "nothing was replaced. Pass overwrite=True to replace it") from None
            os.chmod(out, 0o755)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# --------------------------------------------------------------------------------------------------------------
# reading


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


# --------------------------------------------------------------------------------------------------------------
# writing


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


# --------------------------------------------------------------------------------------------------------------
# configs


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


def read_model_config(folder: PathLike, label: str = "model") -> dict[str, Any]:
    """``config.json`` of a model folder as a dict (MergeError if missing or unreadable)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MergeError(f"{label}: {path} does not exist; a full model folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MergeError(f"{label}: cannot read {path}: {err}") from err


def check_config_compatible(base: dict[str, Any], other: dict[str, Any], label: str, base_label: str = "base") -> None:
    """Raise MergeError when ``other`` is not the same architecture and size as ``base``.

    Compares :data:`CONFIG_KEYS` (architecture names, hidden and intermediate sizes, layer and head counts,
    vocabulary size, embedding tying) and names every differing key with both values.
    """
    diffs = []
    for key in CONFIG_KEYS:
        if key in base or key in other:
            a, b = base.get(key), other.get(key)
            if a != b:
                diffs.append(f"{key}: {base_label}={a!r}, {label}={b!r}")
    if diffs:
        hint = ""
        if any(d.startswith("vocab_size") for d in diffs):
            hint = (" (different vocabulary sizes usually mean added tokens; resize the embeddings of the base"
                    " and every expert to the same tokenizer first)")
        raise MergeError(f"{label} does not match {base_label}: " + "; ".join(diffs) + hint)


def copy_model_files(src: PathLike, dst: PathLike, files: tuple[str, ...] = COPY_FILES) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``src`` into ``dst``."""
    copied = []
    for name in files:
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied
