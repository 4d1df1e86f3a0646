"""A slide's tile features: features (N, D), level-0 tile positions, scale and the tile encoder
that made them, and their file format (safetensors, or ``.npz`` made elsewhere).

They are what the slide aggregator reads, what the encoder service caches in object storage
and what WSI training samples reference. Files: safetensors (tensors ``features`` float32
(N, D) and ``coords`` int64 (N, 2); the strings ``mpp``, ``tile_size_px``, ``encoder``,
``format`` and ``sha256`` (of the two arrays, checked on read) as metadata), written
atomically. ``.npz`` files with arrays ``features`` and ``coords`` (optional ``mpp``,
``tile_size_px``, ``encoder``) are read too; a missing ``mpp`` means 1.0 µm/px
(``SlideInput``'s default). torch is imported only by
:meth:`SlideFeatures.to_slide_input`, so reading features stays a light numpy job.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

if TYPE_CHECKING:
    from smartpath.model.mllm import SlideInput

__all__ = ["FORMAT", "SlideFeatures", "features_bytes", "load_features", "save_features"]

FORMAT = "smartpath-slide-features/1"
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class SlideFeatures:
    """One slide's tile features, tile positions and scale (validated on construction)."""

    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64 level-0 px of each tile's top-left corner
    mpp: float  # µm/px of level 0
    tile_size_px: float | None = None  # level-0 px per tile side; None when unknown
    encoder: str = "unknown"  # name of the tile encoder that made the features

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        coords = np.asarray(self.coords)
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(
                f"features must be a 2-D (N, D) array with N, D >= 1, got shape {features.shape}"
            )
        if not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
            raise ValueError(f"features must be real numbers, got dtype {features.dtype}")
        features = features.astype(np.float32, copy=False)
        if not np.isfinite(features).all():
            raise ValueError("features hold NaN or infinite values")
        if coords.shape != (features.shape[0], 2):
            raise ValueError(
                f"coords must have shape (N, 2) = ({features.shape[0]}, 2) to match features "
                f"{features.shape}, got {coords.shape}"
            )
        if not np.issubdtype(coords.dtype, np.number) or np.iscomplexobj(coords):
            raise ValueError(f"coords must be real numbers, got dtype {coords.dtype}")
        if not np.issubdtype(coords.dtype, np.integer):
            if not np.isfinite(coords).all():
                raise ValueError("coords hold NaN or infinite values")
            coords = np.rint(coords)
        self.features = features
        self.coords = coords.astype(np.int64, copy=False)
        self.mpp = _positive("mpp", self.mpp)
        if self.tile_size_px is not None:
            self.tile_size_px = _positive("tile_size_px", self.tile_size_px)
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ValueError(f"encoder must be a non-empty name, got {self.encoder!r}")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature width D."""
        return int(self.features.shape[1])

    def to_slide_input(self) -> SlideInput:
        """The model's input: float32 features (N, D), float32 coords (N, 2), level-0 mpp."""
        import torch  # lazily: see the module docstring

        from smartpath.model.mllm import SlideInput

        return SlideInput(
            features=torch.from_numpy(self.features.copy()),
            coords=torch.from_numpy(self.coords.astype(np.float32)),
            mpp=float(self.mpp),
        )


def _positive(name: str, value: object) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# Files


def _digest(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 of the features' and coordinates' bytes, as stored."""
    digest = hashlib.sha256()
    for name in ("features", "coords"):
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


def features_bytes(feats: SlideFeatures) -> bytes:
    """``feats`` as the bytes of a ``.safetensors`` feature file (see :func:`load_features`),
    with the SHA-256 of its arrays in the metadata, so that a damaged copy is never read as
    features."""
    tensors = {
        "features": np.ascontiguousarray(feats.features, dtype=np.float32),
        "coords": np.ascontiguousarray(feats.coords, dtype=np.int64),
    }
    metadata = {
        "format": FORMAT,
        "mpp": repr(float(feats.mpp)),
        "encoder": feats.encoder,
        "sha256": _digest(tensors),
    }
    if feats.tile_size_px is not None:
        metadata["tile_size_px"] = repr(float(feats.tile_size_px))
    return st_save(tensors, metadata=metadata)


def save_features(dest: str | Path, feats: SlideFeatures) -> Path:
    """Write ``feats`` to ``dest`` (must end in ``.safetensors``) atomically; return the path."""
    path = Path(dest).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"feature files are written as .safetensors, got {path.name!r}")
    data = features_bytes(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_features(src: str | Path | bytes) -> SlideFeatures:
    """Read a ``.safetensors`` or ``.npz`` feature file (a path, or the file's bytes).

    Raises ValueError naming what is wrong: unreadable file, missing array, bad shapes.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        data, where = bytes(src), "feature bytes"
        kind = "npz" if data.startswith(_ZIP_MAGIC) else "safetensors"
    else:
        path = Path(src).expanduser()
        where = f"feature file {path.name!r}"
        suffix = path.suffix.lower()
        if suffix not in (".safetensors", ".npz"):
            raise ValueError(f"{where}: expected a .safetensors or .npz file")
        data, kind = path.read_bytes(), suffix[1:]
    try:
        if kind == "npz":
            return _from_npz(data)
        return _from_safetensors(data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _from_safetensors(data: bytes) -> SlideFeatures:
    try:
        tensors = st_load(data)
        # The header is 8 bytes of little-endian length, then JSON (metadata under __metadata__).
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"not a readable safetensors file ({e})") from None
    _require(tensors, "safetensors")
    # Files written before the checksum existed have none; every file this code writes has one.
    if "sha256" in metadata and metadata["sha256"] != _digest(tensors):
        raise ValueError("checksum mismatch: the file is damaged")
    return SlideFeatures(
        features=tensors["features"],
        coords=tensors["coords"],
        mpp=metadata.get("mpp", 1.0),
        tile_size_px=metadata.get("tile_size_px"),
        encoder=metadata.get("encoder", "unknown"),
    )


def _from_npz(data: bytes) -> SlideFeatures:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        raise ValueError(f"not a readable .npz file ({type(e).__name__}: {e})") from None
    _require(arrays, "npz")

    def scalar(name: str) -> object:
        value = arrays.get(name)
        if value is None:
            return None
        if value.size != 1:
            raise ValueError(f"array {name!r} must hold one value, got shape {value.shape}")
        return value.reshape(()).item()

    mpp = scalar("mpp")
    encoder = scalar("encoder")
    return SlideFeatures(
        features=arrays["features"],
        coords=arrays["coords"],
        mpp=1.0 if mpp is None else mpp,
        tile_size_px=scalar("tile_size_px"),
        encoder="unknown" if encoder is None else str(encoder),
    )


def _require(arrays: dict[str, np.ndarray], kind: str) -> None:
    missing = [name for name in ("features", "coords") if name not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "none"
        raise ValueError(f"{kind} file lacks array(s) {', '.join(missing)} (has: {have})")


# ---------------------------------------------------------------------------------------------
# Extraction
