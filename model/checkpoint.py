"""SmartPath checkpoints: ``model.safetensors`` + ``manifest.json`` + ``tokenizer/``, local or S3.

Layout (a local folder or an ``s3://bucket/prefix/``)::

    manifest.json        format name/version, model config, experts, tokenizer files,
                         weights digest and index, provenance, metrics
    model.safetensors    every tensor SmartPath adds to the base model (experts, router,
                         aggregator, projector, ...); the base stays in its own HF checkpoint
    tokenizer/           tokenizer.save_pretrained() output

Design decisions:

- safetensors only. Nothing here ever calls ``torch.load`` or unpickles: a checkpoint from an
  untrusted bucket cannot run code.
- The manifest is checked before anything else is read: the format name first, then the
  integer ``format_version`` (a newer one is refused with "upgrade smartpath", never half
  read), then the schema. Problems raise :class:`CheckpointFormatError` (a ValueError) that
  says how to fix them. The weights' SHA-256 in the manifest catches truncated or mixed-up
  copies.
- ``manifest.json`` is written last, so a reader that sees it sees a complete checkpoint
  (local files are renamed into place; S3 objects are uploaded in order).
- Loading from S3 downloads exactly the files the manifest names into a local cache folder
  keyed by the manifest's content, so stale objects under the same prefix are never mixed in
  and a second load is free. The same transfer helpers serve HF-format base models
  (:func:`download_prefix`, :func:`upload_folder`).
- Provenance is reproducible and hostname-free: UTC time, git commit when known, versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from smartpath.core.config import StorageConfig
from smartpath.core.config.model import ModelConfig
from smartpath.core.errors import InvalidArgumentError, NotFoundError
from smartpath.core.storage import ObjectRef, ObjectStore, make_store, parse_slide_ref
from smartpath.core.storage.refs import key_problem

FORMAT_NAME = "smartpath-checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
DEFAULT_CACHE_DIR = Path("~/.smartpath/cache/models")
# The published demo model (package data; `smartpath train demo --publish` rebuilds it).
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_COMPLETE = ".smartpath-complete"


class CheckpointFormatError(ValueError):
    """A folder or prefix that is not a checkpoint this version of SmartPath can read."""


# -- manifest -------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertInfo(_Strict):
    """One LoRA expert of the mixture."""

    name: str = Field(..., min_length=1, description="Unique name, e.g. the task it serves.")
    index: int = Field(..., ge=0, description="Position of the expert in the mixture (0..E-1).")
    description: str = Field("", description="What the expert was trained for.")
    tensor_prefix: str | None = Field(
        None,
        description="Prefix of this expert's tensors in model.safetensors, if stored per expert "
        "(checked on save: at least one tensor must start with it).",
    )
    info: dict[str, Any] = Field(
        default_factory=dict, description="Free-form JSON metadata (data, steps, scores)."
    )


class Provenance(_Strict):
    """Where a checkpoint came from (never the host name)."""

    created_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="UTC creation time."
    )
    git_commit: str | None = Field(
        default_factory=lambda: _git_commit(), description="Commit of the code, if known."
    )
    git_dirty: bool | None = Field(
        default_factory=lambda: _git_dirty(),
        description="Whether tracked files differed from git_commit (None: unknown), so a "
        "checkpoint trained on uncommitted code says so.",
    )
    smartpath_version: str = Field(
        default_factory=lambda: _version("smartpath"), description="SmartPath version."
    )
    torch_version: str = Field(default_factory=lambda: torch.__version__, description="torch.")
    transformers_version: str = Field(
        default_factory=lambda: _version("transformers"), description="transformers version."
    )
    python_version: str = Field(
        default_factory=platform.python_version, description="Python version."
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form training provenance: run id, data sets, steps, parent checkpoint.",
    )


class TensorInfo(_Strict):
    """dtype and shape of one stored tensor (readable without loading the weights)."""

    dtype: str = Field(..., description="torch dtype name, e.g. float32.")
    shape: list[int] = Field(..., description="Tensor shape.")


class WeightsInfo(_Strict):
    """The weights file as written (filled in by save_checkpoint)."""

    file: Literal["model.safetensors"] = Field(WEIGHTS_FILE, description="File name.")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file.")
    size: int = Field(..., ge=0, description="File size in bytes.")
    tensors: dict[str, TensorInfo] = Field(..., description="Every tensor, by name.")


class Manifest(_Strict):
    """manifest.json of a SmartPath checkpoint."""

    format: Literal["smartpath-checkpoint"] = Field(FORMAT_NAME, description="Format name.")
    format_version: int = Field(FORMAT_VERSION, description="Layout version of the checkpoint.")
    model: ModelConfig = Field(..., description="The model configuration.")
    experts: list[ExpertInfo] = Field(default_factory=list, description="The LoRA experts.")
    tokenizer_files: list[str] = Field(
        default_factory=list, description="Files under tokenizer/ (filled in on save)."
    )
    weights: WeightsInfo | None = Field(
        None, description="Digest and index of model.safetensors (filled in on save)."
    )
    provenance: Provenance = Field(default_factory=Provenance, description="Provenance.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics.")

    @field_validator("experts")
    @classmethod
    def _unique_experts(cls, value: list[ExpertInfo]) -> list[ExpertInfo]:
        names = [e.name for e in value]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        indexes = sorted(e.index for e in value)
        if indexes != list(range(len(value))):
            raise ValueError(f"expert indexes must be 0..{len(value) - 1}, got {indexes}")
        return value


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _git(*args: str) -> str | None:
    """stdout of a git command run in the source tree; None if git or the tree is missing."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def _git_commit() -> str | None:
    """The commit of the source tree (env SMARTPATH_GIT_COMMIT wins); None if unknown."""
    if commit := os.environ.get("SMARTPATH_GIT_COMMIT"):
        return commit
    commit = (_git("rev-parse", "HEAD") or "").strip()
    return commit if len(commit) == 40 else None


def _git_dirty() -> bool | None:
    """Whether tracked files of the source tree have uncommitted changes; None if unknown
    (also when SMARTPATH_GIT_COMMIT names the commit: an installed copy has no tree)."""
    if os.environ.get("SMARTPATH_GIT_COMMIT"):
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def parse_manifest(data: bytes | str, where: str = "manifest.json") -> Manifest:
    """Validate a manifest: format name, then format_version, then the schema."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(
            f"{where} has format {raw.get('format')!r}, not {FORMAT_NAME!r}: this is not a "
            "SmartPath checkpoint (an HF-format base model loads with load_base_model)"
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointFormatError(
            f"{where} has format_version {version!r}; expected a positive integer. The "
            "manifest is damaged: re-export the checkpoint"
        )
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where} has format_version {version}, but this SmartPath ({_version('smartpath')}) "
            f"reads versions up to {FORMAT_VERSION}: upgrade smartpath to load it"
        )
    provenance = raw.get("provenance")
    if isinstance(provenance, dict):
        # Written before the field existed: unknown, not the state of the reading tree.
        provenance.setdefault("git_dirty", None)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointFormatError(
            f"{where} (format_version {version}) does not match the schema: {exc}"
        ) from None


# -- storage helpers --------------------------------------------------------------------------


def is_s3_uri(value: str | Path) -> bool:
    """True for ``s3://...`` strings."""
    return isinstance(value, str) and value.startswith("s3://")


def resolve_store(store: ObjectStore | StorageConfig | None) -> ObjectStore:
    """An object store: the one given, one made from a StorageConfig, or the local default."""
    if store is None:
        return make_store(StorageConfig())
    if isinstance(store, StorageConfig):
        return make_store(store)
    return store


def parse_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix[/]`` → (bucket, ``some/prefix/``)."""
    ref = parse_slide_ref(uri.rstrip("/") + "/")
    if not isinstance(ref, ObjectRef):
        raise InvalidArgumentError(f"expected s3://bucket/prefix/, got {uri!r}")
    return ref.bucket, ref.key


def upload_folder(
    local_dir: str | Path, uri: str, store: ObjectStore, *, last: tuple[str, ...] = ()
) -> list[str]:
    """Upload every file under ``local_dir`` to the prefix ``uri``; the ``last`` names go last.

    Returns the relative paths uploaded, in order. Creates the bucket if needed.
    """
    bucket, prefix = parse_prefix(uri)
    store.ensure_bucket(bucket)
    root = Path(local_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    for rel in ordered:
        store.upload(root / rel, ObjectRef(bucket, prefix + rel))
    return ordered


def _fill_cache(cache_root: Path, digest: str, fill: Any) -> Path:
    """``cache_root/digest``, filled once by ``fill(tmp_folder)`` and renamed into place."""
    dest = cache_root / digest
    if (dest / _COMPLETE).is_file():
        return dest
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f"tmp-{digest}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp)
        (tmp / _COMPLETE).write_text("")
        if dest.exists() and not (dest / _COMPLETE).is_file():
            shutil.rmtree(dest, ignore_errors=True)  # a broken earlier attempt
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _COMPLETE).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _safe_rel(rel: str, where: str) -> str:
    if key_problem(rel) is not None:
        raise InvalidArgumentError(f"refusing to download {rel!r} from {where}: unsafe path")
    return rel


def download_prefix(uri: str, store: ObjectStore, cache_dir: str | Path | None = None) -> Path:
    """Every object under the prefix ``uri`` in a local cache folder (reused while unchanged).

    The folder is keyed by the objects' names, sizes and ETags. Raises NotFoundError if the
    prefix holds no objects.
    """
    bucket, prefix = parse_prefix(uri)
    infos = [i for i in store.list(bucket, prefix) if not i.key.endswith("/")]
    if not infos:
        raise NotFoundError(f"no objects under {uri}")
    entries = sorted((_safe_rel(i.key[len(prefix) :], uri), i.etag, i.size) for i in infos)
    digest = hashlib.sha256(json.dumps([bucket, prefix, entries]).encode()).hexdigest()[:32]

    def fill(tmp: Path) -> None:
        for rel, _, _ in entries:
            store.download(ObjectRef(bucket, prefix + rel), tmp / rel)

    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    return _fill_cache(root, digest, fill)


# -- save / load ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; views sharing storage are cloned (safetensors needs it)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_tokenizer(tokenizer: PreTrainedTokenizerBase | str | Path, dest: Path) -> list[str]:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer.save_pretrained(str(dest))
    else:
        src = Path(tokenizer)
        if not src.is_dir():
            raise FileNotFoundError(f"tokenizer folder {src} does not exist")
        shutil.copytree(src, dest)
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())


def _write_local(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    manifest: Manifest,
    tokenizer: PreTrainedTokenizerBase | str | Path,
) -> Manifest:
    """Write weights and tokenizer into ``folder``; return the completed manifest (not written)."""
    plain = _plain_tensors(tensors)
    for expert in manifest.experts:
        if expert.tensor_prefix and not any(k.startswith(expert.tensor_prefix) for k in plain):
            raise ValueError(
                f"expert {expert.name!r} has tensor_prefix {expert.tensor_prefix!r} but no "
                "tensor name starts with it"
            )
    weights = folder / WEIGHTS_FILE
    save_file(plain, str(weights), metadata={"format": "pt", "smartpath_format": FORMAT_NAME})
    tok_dir = folder / TOKENIZER_DIR
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok_files = _write_tokenizer(tokenizer, tok_dir)
    info = WeightsInfo(
        sha256=_sha256(weights),
        size=weights.stat().st_size,
        tensors={
            k: TensorInfo(dtype=str(v.dtype).removeprefix("torch."), shape=list(v.shape))
            for k, v in plain.items()
        },
    )
    return manifest.model_copy(
        update={"tokenizer_files": tok_files, "weights": info, "format_version": FORMAT_VERSION}
    )


def save_checkpoint(
    dest: str | Path,
    tensors: Mapping[str, torch.Tensor],
    manifest: Manifest,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    store: ObjectStore | StorageConfig | None = None,
    *,
    overwrite: bool = False,
) -> Manifest:
    """Write a checkpoint to a local folder or ``s3://bucket/prefix/``; return its manifest.

    ``tokenizer`` is a tokenizer object or a folder holding one. ``store`` is used for s3
    destinations (default: the embedded local store). Refuses to replace an existing
    checkpoint unless ``overwrite``.
    """
    if not isinstance(manifest, Manifest):
        raise TypeError(f"manifest must be a Manifest, got {type(manifest).__name__}")
    if is_s3_uri(dest):
        return _save_s3(str(dest), tensors, manifest, tokenizer, resolve_store(store), overwrite)
    folder = Path(dest).expanduser()
    if (folder / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a checkpoint; pass overwrite=True")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST_FILE).unlink()  # incomplete until the new manifest is in place
    final = _write_local(folder, tensors, manifest, tokenizer)
    tmp = folder / f".{MANIFEST_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(final.model_dump_json(indent=2))
    os.replace(tmp, folder / MANIFEST_FILE)
    return final


def _save_s3(
    uri: str,
    tensors: Mapping[str, torch.Tensor],
    manifest: Manifest,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    store: ObjectStore,
    overwrite: bool,
) -> Manifest:
    bucket, prefix = parse_prefix(uri)
    if store.exists(ObjectRef(bucket, prefix + MANIFEST_FILE)) and not overwrite:
        raise FileExistsError(f"{uri} already holds a checkpoint; pass overwrite=True")
    with tempfile.TemporaryDirectory(prefix="smartpath-ckpt-") as tmp:
        folder = Path(tmp)
        final = _write_local(folder, tensors, manifest, tokenizer)
        (folder / MANIFEST_FILE).write_text(final.model_dump_json(indent=2))
        upload_folder(folder, uri, store, last=(MANIFEST_FILE,))
    return final


def _verify_weights(path: Path, manifest: Manifest, where: str) -> None:
    if manifest.weights is None:
        raise CheckpointFormatError(f"{where} lists no weights; re-export the checkpoint")
    if not path.is_file():
        raise CheckpointFormatError(f"{where} has no {WEIGHTS_FILE}")
    if _sha256(path) != manifest.weights.sha256:
        raise CheckpointFormatError(
            f"{WEIGHTS_FILE} of {where} does not match the SHA-256 in its manifest: the copy "
            "is truncated or mixed with another checkpoint; copy the checkpoint again"
        )


def load_checkpoint(
    src: str | Path,
    store: ObjectStore | StorageConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], Manifest, Path]:
    """Read a checkpoint: (tensors, manifest, local tokenizer folder).

    ``src`` is a local folder or ``s3://bucket/prefix/`` (downloaded into ``cache_dir``,
    default ~/.smartpath/cache/models). Raises CheckpointFormatError for anything that is not
    a complete checkpoint of a supported format version.
    """
    if is_s3_uri(src):
        folder = _fetch_s3(str(src), resolve_store(store), cache_dir)
    else:
        folder = Path(src).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    where = str(src)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise CheckpointFormatError(f"{where} has no {MANIFEST_FILE}{hint}")
    manifest = parse_manifest(manifest_path.read_bytes(), f"{where}/{MANIFEST_FILE}")
    _verify_weights(folder / WEIGHTS_FILE, manifest, where)
    tok_dir = folder / TOKENIZER_DIR
    missing = [f for f in manifest.tokenizer_files if not (tok_dir / f).is_file()]
    if missing or not manifest.tokenizer_files:
        raise CheckpointFormatError(f"{where} lacks tokenizer files {missing or '(none listed)'}")
    tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    return tensors, manifest, tok_dir


def _fetch_s3(uri: str, store: ObjectStore, cache_dir: str | Path | None) -> Path:
    """Download exactly the manifest's files; the cache folder is keyed by the manifest."""
    bucket, prefix = parse_prefix(uri)
    try:
        raw = store.get_bytes(ObjectRef(bucket, prefix + MANIFEST_FILE))
    except NotFoundError:
        raise CheckpointFormatError(f"{uri} has no {MANIFEST_FILE}") from None
    manifest = parse_manifest(raw, f"{uri}{MANIFEST_FILE}")
    files = [WEIGHTS_FILE] + [
        f"{TOKENIZER_DIR}/{_safe_rel(f, uri)}" for f in manifest.tokenizer_files
    ]
    digest = hashlib.sha256(raw).hexdigest()[:32]

    def fill(tmp: Path) -> None:
        (tmp / MANIFEST_FILE).write_bytes(raw)
        for rel in files:
            try:
                store.download(ObjectRef(bucket, prefix + rel), tmp / rel)
            except NotFoundError:
                raise CheckpointFormatError(f"{uri} lacks {rel} named by its manifest") from None
        _verify_weights(tmp / WEIGHTS_FILE, manifest, uri)

    root = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / "checkpoints"
    return _fill_cache(root, digest, fill)
