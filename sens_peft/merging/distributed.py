"""Distributed full-model merges (torchrun / accelerate launch): the few collectives they need, over a gloo group."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

from ..errors import MergeError

logger = logging.getLogger(__name__)

__all__ = ["Comm"]

def error_info(err: BaseException) -> tuple[bool, str, str]:
    return isinstance(err, MergeError), type(err).__name__, str(err)


def remote_error(rank: int, info: tuple[bool, str, str]) -> BaseException:
    """The error another rank reported, for the ranks that did not fail themselves."""
    is_merge_error, type_name, message = info
    if is_merge_error:
        return MergeError(f"{message} (reported by rank {rank})")
    return RuntimeError(f"merge failed on rank {rank}: {type_name}: {message}")


_GROUP_SERIAL = itertools.count()


class Comm:
    """The collectives a distributed merge needs, over a gloo group; with ``world_size == 1`` every method is a
    plain local call (the single-process merge runs exactly as without it).

    Args:
        group: The process group (None: the default group).
        rank: This process's rank in ``group``.
        world_size: Number of processes in ``group``.
        owns_group: Destroy ``group`` in :meth:`close` (a gloo group created for this merge).
        owns_default: Destroy the default group in :meth:`close` (initialised from torchrun's variables).
    """

    def __init__(self, group=None, rank: int = 0, world_size: int = 1, *, owns_group: bool = False,
                 owns_default: bool = False) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self._owns_group = owns_group
        self._owns_default = owns_default

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def open(cls, distributed: Union[bool, str, None], timeout_s: float) -> Comm:
        """Join (or create) the process group a distributed merge runs in.

        ``False``/``None``: one process, whatever groups exist. ``"auto"``: the default group when one is
        initialised with more than one process, else a gloo group from torchrun's ``WORLD_SIZE``/``RANK``/
        ``MASTER_ADDR``/``MASTER_PORT`` when ``WORLD_SIZE > 1``, else one process. ``True``: like ``"auto"``,
        but an error when the process was neither launched by torchrun nor joined a group.
        """
        if distributed is None or distributed is False:
            return cls()
        if distributed is not True and distributed != "auto":
            raise MergeError(f"distributed must be True, False or 'auto', got {distributed!r}")
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=float(timeout_s))
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() == 1:
                return cls()
            # A gloo group of its own: the default group may be NCCL (no CPU collectives), and the merge's
            # error exchange should time out on the merge's terms.
            group = dist.new_group(backend="gloo", timeout=timeout)
            return cls(group, dist.get_rank(group), dist.get_world_size(group), owns_group=True)
        launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        world = int(os.environ.get("WORLD_SIZE", "1") or 1) if launched else 1
        if world > 1:
            if not dist.is_available():
                raise MergeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
            # A fresh key prefix per merge: torchrun's agent store outlives the groups, and a re-created default
            # group would otherwise find the previous one's rendezvous keys (and connect to dead peers). Every
            # rank makes the same sequence of merge_models calls, so the counters agree.
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            prefix = f"sens_peft/merge_models/{next(_GROUP_SERIAL)}"
            dist.init_process_group(backend="gloo", store=dist.PrefixStore(prefix, store), rank=rank,
                                    world_size=world, timeout=timeout)
            return cls(None, dist.get_rank(), dist.get_world_size(), owns_default=True)
        if distributed is True and not launched:
            raise MergeError(
                "distributed=True, but no process group is initialised and WORLD_SIZE/RANK are not set: launch "
                "with torchrun / accelerate launch, or call torch.distributed.init_process_group first"
            )
        return cls()

    def close(self) -> None:
        if not (self._owns_group or self._owns_default):
            return
        import torch.distributed as dist

        try:
            if self._owns_group:
                dist.destroy_process_group(self.group)
            elif dist.is_initialized():
                dist.destroy_process_group()
        except Exception as err:  # never mask the merge's own result or error
            logger.warning("could not destroy the merge's process group: %s", err)

    def check(self, err: Optional[BaseException], counts: Sequence[int] = ()) -> list[int]:
        """Every rank reports its error (or None) and counts; if any rank failed, every rank raises (its own
        error, or the first failing rank's). Returns the counts summed over ranks."""
        if not self.distributed:
            if err is not None:
                raise err
            return list(counts)
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        mine = (None if err is None else error_info(err), [int(c) for c in counts])
        dist.all_gather_object(gathered, mine, group=self.group)
        if err is not None:
            raise err
        for rank, (info, _) in enumerate(gathered):
            if info is not None:
                raise remote_error(rank, info)
        return [sum(c[i] for _, c in gathered) for i in range(len(counts))]

    @contextlib.contextmanager
    def step(self):
        """A block every rank runs; an error on any rank is raised on all of them at the end of the block."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except BaseException as err:
            self.check(err)
            raise
        self.check(None)

    def root_call(self, fn):
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        result, err = None, None
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as e:
                err = e
        box = [(result, None if err is None else error_info(err))]
        # group rank 0 is global rank 0: the merge's groups span all processes in order
        dist.broadcast_object_list(box, src=0, group=self.group)
        if err is not None:
            raise err
        result, info = box[0]
        if info is not None:
            raise remote_error(0, info)
        return result
