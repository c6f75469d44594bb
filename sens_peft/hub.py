"""Pushing experts and merged folders to the Hugging Face Hub, through ``huggingface_hub``.

The sidecars (``sensitivity.safetensors``, ``probe.safetensors``) are ordinary files of an expert's folder, so
they travel with it. ``probe.safetensors`` holds token ids of the expert's *training data*: pushing it publishes
that text, so :func:`push_to_hub` warns, and refuses when ``include_probe=False``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .store import PROBE_FILE, SENSITIVITY_FILE

logger = logging.getLogger(__name__)

_IGNORED = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "sensitivity_state.safetensors")
# pickles: whoever downloads them would run them on load; the docstring promised they stay home
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class UploadPlan:
    """What :func:`push_to_hub` uploads: files (relative paths), the card's front matter, and warnings."""

    folder: Path
    files: list[str]
    card_metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_card_metadata(folder: os.PathLike) -> dict[str, Any]:
    """The YAML front matter of ``folder/README.md`` (empty when there is none)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    return yaml.safe_load(text[3:end]) or {}


def plan_upload(folder: os.PathLike, include_probe: bool = True) -> UploadPlan:
    """List what would be uploaded from ``folder``, without any network access.

    Checkpoint-only files (optimizer state, RNG state, the callback's resume state) and pickles are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = []
    pickles = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel.split("/")[0].startswith(".") or path.name in _IGNORED:
            continue
        if path.suffix in _PICKLE_SUFFIXES:
            pickles.append(rel)
            continue
        if path.name == PROBE_FILE and not include_probe:
            continue
        files.append(rel)
    notes = []
    if PROBE_FILE in files:
        notes.append(
            f"{folder / PROBE_FILE} holds token ids of the expert's training data and will be public if the repo "
            "is; pass include_probe=False to leave it out (merges can take probes= at merge time instead)"
        )
    if pickles:
        notes.append(f"{folder}: pickle files {pickles} are not uploaded (loading a pickle can run code); convert "
                     "them to safetensors to publish them")
    if any(Path(f).name == SENSITIVITY_FILE for f in files):
        logger.info("uploading %s with the expert", SENSITIVITY_FILE)
    return UploadPlan(folder, files, read_card_metadata(folder), notes)


def push_to_hub(
    folder: os.PathLike,
    repo_id: str,
    *,
    include_probe: bool = True,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    api: Any = None,
    dry_run: bool = False,
) -> UploadPlan:
    """Upload an expert (adapter/model + sidecars) or a merged folder to the Hub.

    Args:
        folder: The folder to upload.
        repo_id: Target repository, e.g. ``"me/llama-merged"``.
        include_probe: Upload ``probe.safetensors`` (training text) too. A warning is emitted when it is.
        private: Create the repository as private.
        token: Hub token (default: the logged-in user's).
        commit_message: Commit message (default names the folder).
        api: A ``huggingface_hub.HfApi``-like object (for tests); default a new ``HfApi``.
        dry_run: Only return the plan.

    Returns:
        The :class:`UploadPlan` that was (or would be) uploaded.

    Example:
        >>> plan = push_to_hub("runs/merged", "me/merged", dry_run=True)  # doctest: +SKIP
        >>> plan.files  # doctest: +SKIP
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'merge_config.json']
    """
    plan = plan_upload(folder, include_probe=include_probe)
    for note in plan.warnings:
        warnings.warn(note, UserWarning, stacklevel=2)
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(plan.folder),
        repo_id=repo_id,
        allow_patterns=plan.files,
        commit_message=commit_message or f"Upload {plan.folder.name} with sens-peft",
    )
    return plan
