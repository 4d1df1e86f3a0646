"""JSONL training manifests: one sample per line, ROI or WSI, validated on read and write.

Design decisions:

- One JSON object per line, discriminated by ``scale`` (``"roi"`` or ``"wsi"``); models forbid
  unknown keys so that typos (``"lables"``) fail loudly instead of silently training without
  labels. Blank lines are skipped; every error names the manifest and the 1-based line.
- ``target`` is the canonical answer text exactly as :func:`smartpath.model.grammar.format_answer`
  writes it (the inside of the ``<answer>`` block). Every sample's target must parse for its
  task with :func:`smartpath.model.grammar.parse_answer`, constrained by its ``labels`` (and
  ``options`` for closed VQA), so a manifest never carries a target the reward would score 0.
- ``prompt`` None means "use the task's default prompt template" (``smartpath.model.prompts``);
  a string is the question (VQA) or a custom instruction.
- Refs: ``s3://bucket/key``, an absolute path (or ``file:///abs``), or a path relative to the
  manifest's folder. Relative refs in an ``s3://`` manifest resolve to keys in the same bucket
  (``..`` allowed as long as it stays inside the bucket), so a dataset folder can be copied
  between a disk and a bucket unchanged.
- Local writes are atomic (temp file in the same folder, then ``os.replace``); ``s3://`` goes
  through an :class:`~smartpath.core.storage.ObjectStore` (a whole-object put is atomic).
- Ids must be unique within a manifest (checked by :func:`read_manifest`/:func:`iter_manifest`
  and :func:`write_manifest`).
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from smartpath.core.storage import ObjectRef, ObjectStore, parse_slide_ref
from smartpath.core.storage.refs import key_problem
from smartpath.model.constrained import Constraint, text_chars_for
from smartpath.model.grammar import (
    Answer,
    Task,
    Unparseable,
    format_completion,
    parse_answer,
)

__all__ = [
    "ManifestError",
    "RoiSample",
    "Sample",
    "WsiSample",
    "iter_manifest",
    "load_roi_image",
    "parse_target",
    "read_manifest",
    "resolve_ref",
    "sample_task",
    "write_manifest",
]

TaskName = Literal["classification", "detection", "segmentation", "vqa"]
WsiTaskName = Literal["classification", "vqa"]
Split = Literal["train", "val", "test"]
Location = str | Path

MANIFEST_CONTENT_TYPE = "application/x-ndjson"
FEATURE_SUFFIXES = (".safetensors", ".npz")


class ManifestError(ValueError):
    """A manifest that cannot be read or written; the message names the file and line."""


class _SampleBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Unique id of the sample within its manifest.")
    prompt: str | None = Field(
        None,
        description="The question (VQA) or a custom instruction; None uses the task's default "
        "prompt template.",
    )
    labels: list[str] | None = Field(
        None,
        description="Allowed class names (classification; also constrains detection and "
        "segmentation labels). None leaves labels unconstrained.",
    )
    options: list[str] | None = Field(
        None,
        description="Answer options of a closed VQA question (at most 26); None for open VQA.",
    )
    target: str = Field(
        description="The canonical answer text as smartpath.model.grammar.format_answer writes "
        "it (inside of the <answer> block); must parse for the task.",
    )
    split: Split = Field("train", description="Dataset split: train, val or test.")
    source: str | None = Field(
        None, description="Where the sample came from (dataset name, converter, generator)."
    )
    mpp: float | None = Field(
        None, gt=0, description="Microns per pixel of the image or slide level 0, if known."
    )

    def _check_target(self, task: str) -> None:
        answer = _parse(task, self.target, self.labels, self.options)
        if isinstance(answer, Unparseable):
            raise ValueError(f"target does not parse for task {task!r}: {answer.reason}")


class RoiSample(_SampleBase):
    """A region-of-interest sample: one image, one task, one target."""

    scale: Literal["roi"] = Field("roi", description="Discriminator: an ROI (image) sample.")
    image: str = Field(
        min_length=1,
        description="Image ref: s3://bucket/key, an absolute path, or a path relative to the "
        "manifest's folder.",
    )
    task: TaskName = Field(description="Task: classification, detection, segmentation or vqa.")

    @model_validator(mode="after")
    def _valid_target(self) -> RoiSample:
        self._check_target(self.task)
        return self


class WsiSample(_SampleBase):
    """A whole-slide sample: a slide (or its precomputed features), one task, one target."""

    scale: Literal["wsi"] = Field("wsi", description="Discriminator: a whole-slide sample.")
    slide: str | None = Field(
        None,
        description="Slide ref (s3://, absolute or manifest-relative); exactly one of slide "
        "and features.",
    )
    features: str | None = Field(
        None,
        description="Ref of a precomputed feature file (.safetensors or .npz); exactly one of "
        "slide and features.",
    )
    task: WsiTaskName = Field(description="Task: classification or vqa (slide-level).")

    @model_validator(mode="after")
    def _valid(self) -> WsiSample:
        if (self.slide is None) == (self.features is None):
            raise ValueError("a WSI sample needs exactly one of 'slide' and 'features'")
        for name in ("slide", "features"):
            if getattr(self, name) == "":
                raise ValueError(f"'{name}' must not be empty")
        if self.features is not None and not self.features.lower().endswith(FEATURE_SUFFIXES):
            raise ValueError(
                f"'features' must name a {' or '.join(FEATURE_SUFFIXES)} file, got "
                f"{self.features[:120]!r}"
            )
        self._check_target(self.task)
        return self


Sample = Annotated[RoiSample | WsiSample, Field(discriminator="scale")]
_SAMPLE = TypeAdapter(Sample)


def _parse(task: str, target: str, labels: list[str] | None, options: list[str] | None) -> Answer:
    try:
        completion = format_completion("", target)
    except ValueError as e:  # the target contains a grammar tag
        return Unparseable(str(e), target[:200])
    return parse_answer(Task[task.upper()], completion, labels, options=options)


def sample_task(sample: RoiSample | WsiSample) -> Task:
    """The sample's task as a :class:`~smartpath.model.grammar.Task`."""
    return Task[sample.task.upper()]


def sample_constraint(sample: RoiSample | WsiSample, max_new_tokens: int) -> Constraint:
    """The grammar a completion of at most ``max_new_tokens`` for the sample is decoded
    within (its labels and options)."""
    labels = tuple(sample.labels) if sample.labels else None
    options = tuple(sample.options) if sample.options else None
    return Constraint(sample_task(sample), labels, options, text_chars_for(max_new_tokens))


def parse_target(sample: RoiSample | WsiSample) -> Answer:
    """The sample's target as a typed answer (never Unparseable for a validated sample)."""
    return _parse(sample.task, sample.target, sample.labels, sample.options)


# ---------------------------------------------------------------------------------------------
# Refs


def _is_s3(location: Location) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def _s3_ref(uri: str) -> ObjectRef:
    ref = parse_slide_ref(uri)
    if not isinstance(ref, ObjectRef) or ref.is_folder:
        raise ManifestError(f"{uri!r} does not name an object (s3://bucket/key)")
    return ref


def resolve_ref(sample_ref: str, manifest_location: Location) -> ObjectRef | Path:
    """Where a sample's ref points: an :class:`ObjectRef` or an absolute local ``Path``.

    ``s3://`` and absolute refs stand alone; relative refs are joined to the manifest's folder
    (a key prefix for an ``s3://`` manifest, where they must stay inside the bucket).
    """
    if not sample_ref:
        raise ManifestError("empty ref")
    if sample_ref.startswith(("s3://", "file://")) or sample_ref.startswith("/"):
        return parse_slide_ref(sample_ref)
    if _is_s3(manifest_location):
        manifest = _s3_ref(str(manifest_location))
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(manifest.key), sample_ref))
        problem = key_problem(joined)
        if problem or joined.startswith("../") or joined == "..":
            raise ManifestError(
                f"ref {sample_ref!r} relative to {manifest.uri} leaves the bucket or is not a "
                f"valid key ({problem or 'escapes the bucket root'})"
            )
        return ObjectRef(manifest.bucket, joined)
    base = Path(manifest_location).expanduser().absolute().parent
    return Path(os.path.normpath(base / sample_ref))


def _read_bytes(ref: ObjectRef | Path, store: ObjectStore | None) -> bytes:
    if isinstance(ref, ObjectRef):
        if store is None:
            raise ManifestError(f"reading {ref.uri} needs an ObjectStore (store=...)")
        return store.get_bytes(ref)
    return ref.read_bytes()


def load_roi_image(
    sample: RoiSample, manifest_location: Location, store: ObjectStore | None = None
) -> np.ndarray:
    """The sample's image as an ``(H, W, 3)`` uint8 RGB array (local file or object store)."""
    data = _read_bytes(resolve_ref(sample.image, manifest_location), store)
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------
# Reading and writing


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _lines(uri_or_path: Location, store: ObjectStore | None) -> Iterator[str]:
    if _is_s3(uri_or_path):
        ref = _s3_ref(str(uri_or_path))
        if store is None:
            raise ManifestError(f"reading {ref.uri} needs an ObjectStore (store=...)")
        yield from store.get_bytes(ref).decode("utf-8").splitlines()
        return
    with open(Path(uri_or_path).expanduser(), encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\r\n")


def iter_manifest(
    uri_or_path: Location, store: ObjectStore | None = None
) -> Iterator[RoiSample | WsiSample]:
    """Samples of a JSONL manifest, line by line; ManifestError names the line that is wrong."""
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_lines(uri_or_path, store), start=1):
        if not line.strip():
            continue
        where = f"{uri_or_path}:{lineno}"
        try:
            sample = _SAMPLE.validate_json(line)
        except ValidationError as e:
            raise ManifestError(f"{where}: invalid sample: {_describe(e)}") from None
        if sample.id in seen:
            raise ManifestError(
                f"{where}: duplicate id {sample.id!r} (first on line {seen[sample.id]})"
            )
        seen[sample.id] = lineno
        yield sample


def read_manifest(
    uri_or_path: Location, store: ObjectStore | None = None
) -> list[RoiSample | WsiSample]:
    """All samples of a JSONL manifest (see :func:`iter_manifest`)."""
    return list(iter_manifest(uri_or_path, store))


def _dump(samples: Iterable[RoiSample | WsiSample | dict[str, Any]]) -> bytes:
    out: list[str] = []
    seen: set[str] = set()
    for i, s in enumerate(samples):
        try:
            sample = _SAMPLE.validate_python(s.model_dump() if isinstance(s, BaseModel) else s)
        except ValidationError as e:
            raise ManifestError(f"sample {i}: invalid: {_describe(e)}") from None
        if sample.id in seen:
            raise ManifestError(f"sample {i}: duplicate id {sample.id!r}")
        seen.add(sample.id)
        out.append(sample.model_dump_json(exclude_none=True) + "\n")
    return "".join(out).encode("utf-8")


def write_manifest(
    samples: Iterable[RoiSample | WsiSample],
    uri_or_path: Location,
    store: ObjectStore | None = None,
) -> None:
    """Write ``samples`` as JSONL (re-validated; None fields omitted).

    Local paths are replaced atomically; ``s3://bucket/key`` is written through ``store``.
    """
    data = _dump(samples)
    if _is_s3(uri_or_path):
        ref = _s3_ref(str(uri_or_path))
        if store is None:
            raise ManifestError(f"writing {ref.uri} needs an ObjectStore (store=...)")
        store.put_bytes(ref, data, MANIFEST_CONTENT_TYPE)
        return
    path = Path(uri_or_path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
