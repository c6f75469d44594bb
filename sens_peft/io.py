"""File handling for merges: errors, atomic output folders, streamed safetensors reading and sharded writing.

Nothing here does merge math. This module gathers the public names of the modules that do the work, so
``from sens_peft.io import ...`` keeps working:

- :mod:`sens_peft.model_files`: weight file names, files copied into a merged model, config.json checks;
- :mod:`sens_peft.atomic`: atomic output folders (claim, temporary sibling, rename into place);
- :mod:`sens_peft.sources`: :class:`TensorSource` reads one tensor at a time (``pread`` or a mapped byte range),
  :class:`BufferPool` recycles its buffers;
- :mod:`sens_peft.shards`: :func:`plan_shards` / :class:`ShardPlan`, the streaming :class:`ShardWriter` and the
  :class:`BackgroundWriter` thread.
"""

from __future__ import annotations

from .atomic import atomic_output_dir, claim_output, claim_path, clean_stale_temps
from .errors import MergeError
from .model_files import (
    CONFIG_KEYS,
    COPY_FILES,
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    PathLike,
    check_config_compatible,
    copy_model_files,
    read_model_config,
)
from .shards import BackgroundWriter, ShardPlan, ShardWriter, parse_size, plan_shards, shard_file_name
from .sources import CAN_MAP, BufferPool, TensorSource

__all__ = [
    "BackgroundWriter",
    "BufferPool",
    "CAN_MAP",
    "CONFIG_KEYS",
    "COPY_FILES",
    "MergeError",
    "PICKLE_INDEX",
    "PICKLE_SINGLE",
    "PathLike",
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "ShardPlan",
    "ShardWriter",
    "TensorSource",
    "atomic_output_dir",
    "check_config_compatible",
    "claim_output",
    "claim_path",
    "clean_stale_temps",
    "copy_model_files",
    "parse_size",
    "plan_shards",
    "read_model_config",
    "shard_file_name",
]
