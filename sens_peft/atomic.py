"""Atomic output folders: a merge writes into a temporary sibling and renames it into place at the end.

An exclusive claim (a lock file beside the output) keeps two merges from writing the same folder; temporary
folders left by killed merges carry their process id and are removed by the next merge to the same output.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from .errors import MergeError
from .model_files import PathLike

logger = logging.getLogger(__name__)


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

