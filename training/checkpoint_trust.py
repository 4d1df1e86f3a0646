"""Checkpoint trust: the sha256 manifest of a training checkpoint, checked before anything in
it is unpickled, and DeepSpeed's resume loading with ``torch.load(weights_only=True)``.

A Ray Train checkpoint of a run (``{run}/{stage}/checkpoint_*`` in the runs bucket) holds
DeepSpeed's files: ``state/mp_rank_00_model_states.pt``, one ``*_optim_states.pt`` per rank
(``torch.save`` pickles), ``latest`` and DeepSpeed's recovery scripts. Resume reads them back.

- Save: once every rank has written its files, the ranks' sha256 sums and sizes (paths
  relative to the checkpoint) are gathered and rank 0 writes them, last, to
  ``smartpath-checkpoint-sums.json`` (:data:`MANIFEST_NAME`) in its part of the checkpoint.
  Ray Train merges the ranks' parts into one folder, so the manifest lists every file.
- Restore: :func:`verify_checkpoint` runs before DeepSpeed (or anything) opens a file. Every
  listed file must be there with its size and sha256, and no unlisted file may be (Ray Train's
  own ``.metadata.json``, JSON, excepted); a missing or malformed manifest, a missing, changed
  or extra file raises :class:`CheckpointIntegrityError` (a ``ValueError``) naming the files by
  their path in the checkpoint, and the run fails instead of loading.
- Loading: DeepSpeed's ``load_checkpoint`` has no ``weights_only`` switch (its
  ``TorchCheckpointEngine.load`` calls ``torch.load(..., weights_only=False)``).
  :func:`use_weights_only_loading` swaps in an engine whose ``load`` calls
  ``torch.load(..., weights_only=True)`` with only DeepSpeed's plain-data classes allowed
  (:func:`deepspeed_safe_globals`: the loss scaler, ZeRO's stage enum, the fragment address):
  the pickles can build tensors, containers and those classes, and call nothing else.
- Trust: the runs bucket is trusted and must be writable only by the training job. The sums
  catch a torn upload, a file changed or dropped in afterwards, and files mixed from two
  checkpoints; they are not a signature (whoever can rewrite a file can rewrite the manifest).
  Weights-only loading is what keeps a forged checkpoint from running code; the exported model
  (``{run}/{stage}/model``) is safetensors only and never unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MANIFEST_NAME",
    "CheckpointIntegrityError",
    "FileSum",
    "deepspeed_safe_globals",
    "file_sums",
    "merge_sums",
    "read_manifest",
    "use_weights_only_loading",
    "verify_checkpoint",
    "write_manifest",
]

MANIFEST_NAME = "smartpath-checkpoint-sums.json"
MANIFEST_FORMAT = "smartpath-checkpoint-sums/1"
IGNORED_UNLISTED = frozenset({".metadata.json"})
"""Files a checkpoint may hold without being listed: Ray Train's checkpoint metadata (JSON,
written into the stored checkpoint after the upload; nothing here reads it)."""
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
"""Suffixes of files ``torch.load``/pickle would open (named in the errors for unlisted files)."""
CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointIntegrityError(ValueError):
    """A checkpoint does not match its manifest (or has none): nothing in it was loaded.

    ``files`` are the offending paths relative to the checkpoint folder."""

    def __init__(self, message: str, files: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.files = tuple(files)


@dataclass(frozen=True)
class FileSum:
    """A file's sha256 (hex) and size in bytes."""

    sha256: str
    size: int


def _sum_file(path: Path) -> FileSum:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileSum(digest.hexdigest(), size)


def _walk(folder: Path) -> Iterable[tuple[str, Path]]:
    """(relative POSIX path, path) of every entry under ``folder`` that is not a directory
    (links included, not followed), the manifest excepted, sorted."""
    entries = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        dirs.sort()
        # A link to a directory is listed as an entry (os.walk does not descend into it).
        names = files + [d for d in dirs if (base / d).is_symlink()]
        for name in names:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                entries.append((rel, path))
    return sorted(entries)


def file_sums(folder: str | Path) -> dict[str, FileSum]:
    """sha256 and size of every file under ``folder`` (the manifest excepted), keyed by its
    POSIX path relative to ``folder``."""
    folder = Path(folder)
    sums = {}
    for rel, path in _walk(folder):
        if path.is_symlink() or not path.is_file():
            raise CheckpointIntegrityError(f"checkpoint entry {rel!r} is not a regular file", [rel])
        sums[rel] = _sum_file(path)
    return sums


def merge_sums(parts: Iterable[Mapping[str, FileSum]]) -> dict[str, FileSum]:
    """The union of the ranks' sums (each rank's files go to the same checkpoint folder); a
    path two ranks wrote with different bytes is an error."""
    merged: dict[str, FileSum] = {}
    for part in parts:
        for rel, entry in part.items():
            if merged.setdefault(rel, entry) != entry:
                raise CheckpointIntegrityError(
                    f"checkpoint file {rel!r} was written by two ranks with different bytes", [rel]
                )
    return dict(sorted(merged.items()))


def write_manifest(folder: str | Path, sums: Mapping[str, FileSum] | None = None) -> Path:
    """Write :data:`MANIFEST_NAME` into ``folder`` listing ``sums`` (default: every file in
    ``folder`` now); call it after every other file of the checkpoint is written."""
    folder = Path(folder)
    if sums is None:
        sums = file_sums(folder)
    for rel in sums:
        _check_relative(rel)
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {rel: {"sha256": s.sha256, "size": s.size} for rel, s in sorted(sums.items())},
    }
    path = folder / MANIFEST_NAME
    partial = folder / f".{MANIFEST_NAME}.partial"
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path


def _check_relative(rel: str) -> None:
    if (
        not isinstance(rel, str)
        or not rel
        or "\\" in rel
        or "\0" in rel
        or rel.startswith("/")
        or any(p in ("", ".", "..") for p in rel.split("/"))
        or rel == MANIFEST_NAME
    ):
        raise CheckpointIntegrityError(
            f"{MANIFEST_NAME} lists {rel!r}, which is not a plain relative path in the checkpoint"
        )


def read_manifest(folder: str | Path) -> dict[str, FileSum]:
    """The sums :data:`MANIFEST_NAME` in ``folder`` records; CheckpointIntegrityError when it
    is missing or malformed."""
    path = Path(folder) / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise CheckpointIntegrityError(
            f"checkpoint has no {MANIFEST_NAME}: refusing to load an unverified checkpoint",
            [MANIFEST_NAME],
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointIntegrityError(
            f"{MANIFEST_NAME} is not valid JSON: {err}", [MANIFEST_NAME]
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointIntegrityError(
            f"{MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest", [MANIFEST_NAME]
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointIntegrityError(f"{MANIFEST_NAME} lists no files", [MANIFEST_NAME])
    sums = {}
    for rel, entry in files.items():
        _check_relative(rel)
        sha, size = (entry.get("sha256"), entry.get("size")) if isinstance(entry, dict) else (0, 0)
        if (
            not isinstance(sha, str)
            or not _SHA256.fullmatch(sha)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
        ):
            raise CheckpointIntegrityError(
                f"{MANIFEST_NAME} has no valid sha256 and size for {rel!r}", [MANIFEST_NAME]
            )
        sums[rel] = FileSum(sha, size)
    return sums


def verify_checkpoint(folder: str | Path) -> dict[str, FileSum]:
    """Check ``folder`` against its :data:`MANIFEST_NAME` without opening anything else as
    more than bytes: every listed file present with its size and sha256, no unlisted file
    (:data:`IGNORED_UNLISTED` excepted), no links. Returns the verified sums; raises
    CheckpointIntegrityError naming every offending file (relative paths) otherwise."""
    folder = Path(folder)
    expected = read_manifest(folder)
    problems: list[tuple[str, str]] = []
    present = dict(_walk(folder))
    for rel in present:
        if rel in expected or rel in IGNORED_UNLISTED:
            continue
        kind = "pickle file" if rel.lower().endswith(PICKLE_SUFFIXES) else "file"
        problems.append((rel, f"unlisted {kind} {rel!r}"))
    for rel, want in expected.items():
        path = present.get(rel)
        if path is None:
            problems.append((rel, f"{rel!r} is listed but missing"))
            continue
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            problems.append((rel, f"{rel!r} is not a regular file"))
        elif (size := path.stat().st_size) != want.size:
            problems.append((rel, f"{rel!r} has {size} bytes, the manifest records {want.size}"))
        elif _sum_file(path).sha256 != want.sha256:
            problems.append((rel, f"{rel!r} does not match its recorded sha256"))
    if problems:
        problems.sort()
        shown = "; ".join(p for _, p in problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointIntegrityError(
            f"checkpoint does not match {MANIFEST_NAME}, refusing to load it: {shown}{more}",
            [rel for rel, _ in problems],
        )
    return expected


# ---------------------------------------------------------------------------------------------
# Weights-only loading inside DeepSpeed


def deepspeed_safe_globals() -> list[Any]:
    """The only classes besides torch's that :func:`use_weights_only_loading` lets DeepSpeed's
    pickles name: plain data (the loss scaler's scale, ZeRO's stage enum, a parameter's
    fragment address)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@functools.cache
def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyTorchCheckpointEngine


def use_weights_only_loading(engine: Any) -> None:
    """Make the DeepSpeed ``engine`` load its checkpoints with ``torch.load(weights_only=True)``
    (DeepSpeed's own engine passes ``weights_only=False``); RuntimeError when it uses a
    checkpoint engine other than the plain torch one."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    cls = _weights_only_engine_class()
    if isinstance(current, cls):
        return
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(
            f"DeepSpeed's checkpoint engine is {type(current).__name__}, not "
            "TorchCheckpointEngine: resume could not load with weights_only=True"
        )
    replacement = cls.__new__(cls)
    replacement.__dict__.update(current.__dict__)
    engine.checkpoint_engine = replacement
