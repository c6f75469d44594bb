"""The validation layer: every input of a merge or a sensitivity pass goes through these checks, whatever its form
(folder, file, record object, tensor), so that nothing can give a silently wrong result.

Every check raises a :class:`~sens_peft.errors.SensPeftError` (mostly :class:`~sens_peft.errors.MergeError`) naming
the expert, the file or tensor, and what was expected. The checks are cheap (headers, names, one ``isfinite`` per
tensor already in memory) so they run on every merge. This package gathers them; each submodule has one job:

* :mod:`.paths` - :func:`check_path_list`, :func:`check_distinct_inputs`, :func:`check_output_location`: the shape
  of the arguments: a list of folders (not one string), no input twice (symlinks and spellings resolved), no output
  inside an input (the base model included, see :func:`model_source_folder`).
* :mod:`.weights` - :func:`check_model_folder`, :func:`read_safetensors_header`, :func:`check_adapter_contents`,
  :func:`check_source_dtypes`, :func:`check_output_dtype`: safetensors only unless ``allow_pickle``, a readable
  header, both LoRA factors of every module, nothing outside ``target_modules``, float dtypes.
  :func:`check_adapter_files`: an adapter folder holds safetensors weights; pickled ``adapter_model.bin`` is refused
  unless ``allow_pickle=True`` (unpickling untrusted files can run code). :func:`check_finite`: expert (or base)
  weights contain no NaN/Inf.
* :mod:`.sidecars` - :func:`check_record`, :func:`check_probe`: dtypes, shapes, finiteness, a record that is not
  all zeros (a diverged run). :func:`check_record_matches`: a sensitivity sidecar belongs to this expert: every
  scored tensor exists in it (and, for LoRA, is one of the adapter's modules), and the base-model fingerprint stored
  by the capture side (:data:`FINGERPRINT_KEY`) agrees with the base being merged.
* :mod:`.data` - :func:`check_token_batches`: token ids inside the model's vocabulary.
* :mod:`.options` - :func:`check_rank`, :func:`warn_unused_options`: options that cannot apply are said so, not
  silently ignored.
"""

from __future__ import annotations

from ..errors import DataError, InputTypeError, MergeError
from ..model_files import PathLike
from .data import check_token_batches, vocab_size_of
from .options import check_rank, warn_unused_options, warn_unused_sensitivity_options
from .paths import check_distinct_inputs, check_output_location, check_path_list, model_source_folder
from .sidecars import (
    FINGERPRINT_FIELDS,
    FINGERPRINT_KEY,
    check_fingerprint,
    check_probe,
    check_record,
    check_record_matches,
    model_fingerprint,
    module_of,
    read_state_file,
)
from .weights import (
    check_adapter_contents,
    check_adapter_files,
    check_adapters_loaded,
    check_finite,
    check_merged_finite,
    check_model_finite,
    check_model_folder,
    check_output_dtype,
    check_pretrained_source,
    check_sensitivity_inputs,
    check_source_dtypes,
    read_safetensors_header,
)

__all__ = [
    "DataError",
    "FINGERPRINT_FIELDS",
    "FINGERPRINT_KEY",
    "InputTypeError",
    "MergeError",
    "PathLike",
    "check_adapter_contents",
    "check_adapter_files",
    "check_adapters_loaded",
    "check_distinct_inputs",
    "check_fingerprint",
    "check_finite",
    "check_merged_finite",
    "check_model_finite",
    "check_model_folder",
    "check_output_dtype",
    "check_output_location",
    "check_path_list",
    "check_pretrained_source",
    "check_probe",
    "check_rank",
    "check_record",
    "check_record_matches",
    "check_sensitivity_inputs",
    "check_source_dtypes",
    "check_token_batches",
    "model_fingerprint",
    "model_source_folder",
    "module_of",
    "read_safetensors_header",
    "read_state_file",
    "vocab_size_of",
    "warn_unused_options",
    "warn_unused_sensitivity_options",
]
