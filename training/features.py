"""Precomputed WSI tile features: extract them from slides, store them, load them for training.

Design decisions:
- Tiles come from the project's tiling library, not a second implementation: a
  :class:`~smartpath.services.tiling.tiler.Tiler` opens the slide, detects tissue, plans tissue
  tiles at a physical resolution (``Tiler.plan``) and streams decoded tile batches
  (``Tiler.read``). Extraction therefore sees exactly the tiles the ``SlideTiler`` service
  would serve. When no tiler is given, a private one works out of a temporary folder (its
  slide cache and store are never touched for local files) that allows only the slides' own
  folders, and it ignores ``SMARTPATH_*`` environment overrides.
- Never N = 0: a slide without any tile reaching ``min_tissue`` (blank or nearly blank) falls
  back to its single best lattice tile, the one with the most tissue (ties: nearest the slide
  centre), so every slide yields a valid :class:`~smartpath.model.mllm.SlideInput`.
- Files: safetensors (tensors ``features`` float32 (N, D) and ``coords`` int64 (N, 2); the
  strings ``mpp``, ``tile_size_px``, ``encoder`` and ``format`` as metadata), written
  atomically. ``.npz`` files with arrays ``features`` and ``coords`` (optional ``mpp``,
  ``tile_size_px``, ``encoder``) are read too, for features made elsewhere; a missing ``mpp``
  means 1.0 µm/px (``SlideInput``'s default). Coordinates are level-0 pixels of each tile's
  top-left corner; ``tile_size_px`` is the level-0 side of a tile (possibly fractional).
- Defaults (``mpp=0.5``, ``tile_size=96``, ``min_tissue=0.3``): 48 µm tiles. A synthetic
  ``generate_wsi_dataset`` slide (2048 px at 0.25 µm/px, i.e. 512 µm square, 25–42 % tissue)
  has an 11 x 11 lattice of 192-px tiles, of which about 30–56 are tissue tiles (measured on
  six seeds), inside the 16–100 a slide aggregator wants; at 1 µm/px x 128 px a slide would
  give only 6–10 tiles. Extraction takes about 0.1–0.15 s per synthetic slide (two cores).
- torch and the model package are imported only by :meth:`SlideFeatures.to_slide_input`, so
  featurising slides stays a light numpy job (importing the model costs seconds).
- :func:`featurize_manifest` featurises every distinct slide of a local manifest once, into
  ``<manifest folder>/features/`` by default; a file's name carries a hash of the slide's
  name, size and mtime and of every extraction parameter, so reruns skip slides already
  done (and redo them when the slide or a parameter changes). The new manifest
  ``<stem>.features.jsonl`` sits beside the input and references features by relative path;
  ROI lines and WSI lines that already reference features pass through unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from tqdm import tqdm

from smartpath.model.tile_encoder import TileEncoder, make_tile_encoder
from smartpath.services.config import (
    SlideCacheConfig,
    SmartPathConfig,
    StorageConfig,
    TilingConfig,
)
from smartpath.services.errors import SmartPathError
from smartpath.services.storage.local import LocalStore
from smartpath.services.tiling.plan import TilePlan
from smartpath.services.tiling.tiler import Tiler, TileRequest
from smartpath.training.manifest import (
    ManifestError,
    RoiSample,
    WsiSample,
    read_manifest,
    resolve_ref,
    write_manifest,
)

if TYPE_CHECKING:
    from smartpath.model.mllm import SlideInput

__all__ = [
    "DEFAULT_MIN_TISSUE",
    "DEFAULT_MPP",
    "DEFAULT_TILE_SIZE",
    "SlideFeatures",
    "extract_slide_features",
    "featurize_manifest",
    "load_features",
    "save_features",
]

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.5
DEFAULT_TILE_SIZE = 96
DEFAULT_MIN_TISSUE = 0.3
FORMAT = "smartpath-slide-features/1"
CACHE_VERSION = 1  # bump when extraction changes in a way the parameters do not capture
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


def features_bytes(feats: SlideFeatures) -> bytes:
    """``feats`` as the bytes of a ``.safetensors`` feature file (see :func:`load_features`)."""
    metadata = {
        "format": FORMAT,
        "mpp": repr(float(feats.mpp)),
        "encoder": feats.encoder,
    }
    if feats.tile_size_px is not None:
        metadata["tile_size_px"] = repr(float(feats.tile_size_px))
    return st_save(
        {
            "features": np.ascontiguousarray(feats.features, dtype=np.float32),
            "coords": np.ascontiguousarray(feats.coords, dtype=np.int64),
        },
        metadata=metadata,
    )


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


@contextmanager
def _local_tiler(roots: list[Path]) -> Iterator[Tiler]:
    """A Tiler for local slides under ``roots``, working out of a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="smartpath-features-") as scratch:
        tiling = TilingConfig(local_slide_roots=roots)
        config = SmartPathConfig.model_construct(  # no SMARTPATH_* environment overrides
            tiling=tiling,
            slide_cache=SlideCacheConfig(dir=Path(scratch) / "cache"),
            storage=StorageConfig(local_root=Path(scratch) / "store"),
        )
        tiler = Tiler(config, store=LocalStore(Path(scratch) / "store"))
        try:
            yield tiler
        finally:
            tiler.close()


def extract_slide_features(
    slide_path: str | Path,
    encoder: TileEncoder | str,
    *,
    mpp: float = DEFAULT_MPP,
    tile_size: int = DEFAULT_TILE_SIZE,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    batch_size: int = 64,
    tiler: Tiler | None = None,
) -> SlideFeatures:
    """Encode the tissue tiles of a local slide (``tile_size`` px at ``mpp`` µm/px).

    Tiles are those of ``Tiler.plan`` with at least ``min_tissue`` tissue; a slide with none
    falls back to its single best tile (never N = 0). ``tiler`` (one whose
    ``tiling.local_slide_roots`` allows the slide) is reused when given, else a private one is
    made. Defaults give 30–56 tiles on a synthetic 2048-px slide (see the module docstring).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    enc = make_tile_encoder(encoder) if isinstance(encoder, str) else encoder
    path = Path(slide_path).expanduser().resolve()
    with ExitStack() as stack:
        if tiler is None:
            tiler = stack.enter_context(_local_tiler([path.parent]))
        opened = tiler.open(str(path))
        request = TileRequest(mpp=mpp, tile_size=tile_size, min_tissue_fraction=min_tissue)
        plan, _ = tiler.plan(opened, request)
        xs, ys = plan.x, plan.y
        if len(plan) == 0:
            everything, _ = tiler.plan(
                opened, TileRequest(mpp=mpp, tile_size=tile_size, min_tissue_fraction=0.0)
            )
            best = _best_tile(everything, opened.info.width, opened.info.height)
            xs, ys = everything.x[best : best + 1], everything.y[best : best + 1]
        features = np.empty((len(xs), enc.dim), dtype=np.float32)
        for offset, tiles in tiler.read(opened, plan.geometry, xs, ys, batch_size):
            out = np.asarray(enc.encode(tiles), dtype=np.float32)
            if out.shape != (len(tiles), enc.dim):
                raise ValueError(
                    f"encoder {enc.name!r} returned shape {out.shape} for {len(tiles)} tiles; "
                    f"expected ({len(tiles)}, {enc.dim})"
                )
            features[offset : offset + len(tiles)] = out
        return SlideFeatures(
            features=features,
            coords=np.stack([xs, ys], axis=1).astype(np.int64),
            mpp=opened.info.require_mpp(),
            tile_size_px=plan.geometry.footprint,
            encoder=enc.name,
        )


def _best_tile(plan: TilePlan, width: int, height: int) -> int:
    """Index of the plan's tile with the most tissue; ties go to the one nearest the centre."""
    half = plan.geometry.footprint / 2
    centre_dist = np.hypot(plan.x + half - width / 2, plan.y + half - height / 2)
    return int(np.lexsort((centre_dist, -plan.tissue_fraction))[0])


# ---------------------------------------------------------------------------------------------
# Manifests


def _cache_name(slide: Path, encoder: str, mpp: float, tile_size: int, min_tissue: float) -> str:
    st = slide.stat()
    key = {
        "v": CACHE_VERSION,
        "name": slide.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "encoder": encoder,
        "mpp": round(float(mpp), 6),
        "tile_size": int(tile_size),
        "min_tissue": round(float(min_tissue), 6),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", slide.stem)[:80] or "slide"
    return f"{stem}-{digest}.safetensors"


def _usable(path: Path) -> bool:
    """True when a cached feature file exists and reads back."""
    if not path.is_file():
        return False
    try:
        load_features(path)
    except ValueError:
        log.warning("re-extracting an unreadable cached feature file")
        return False
    return True


def featurize_manifest(
    manifest: str | Path,
    *,
    encoder_name: str = "stain-stats-v1",
    mpp: float = DEFAULT_MPP,
    tile_size: int = DEFAULT_TILE_SIZE,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Featurise every distinct slide of a local manifest; return ``<stem>.features.jsonl``.

    Feature files go to ``out_dir`` (default ``<manifest folder>/features``) and are reused
    when their cache key (slide name, size, mtime; encoder, mpp, tile size, min tissue) matches.
    The new manifest's WSI samples reference them by path relative to the manifest.
    """
    if isinstance(manifest, str) and manifest.startswith("s3://"):
        raise ValueError("featurize_manifest reads local manifests only, got an s3:// URI")
    manifest_path = Path(manifest).expanduser().absolute()
    base = manifest_path.parent
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else base / "features"
    encoder = make_tile_encoder(encoder_name)
    samples = read_manifest(manifest_path)

    slides: dict[Path, Path] = {}  # resolved slide path -> feature file
    names: dict[Path, str] = {}  # resolved slide path -> its ref, for messages
    feature_of: dict[str, Path] = {}  # sample id -> feature file
    for sample in samples:
        if isinstance(sample, WsiSample) and sample.slide is not None:
            ref = resolve_ref(sample.slide, manifest_path)
            if not isinstance(ref, Path):
                raise ManifestError(
                    f"{manifest_path.name}: sample {sample.id!r} names a slide in object "
                    "storage; featurize_manifest reads local slides only"
                )
            if ref not in slides:
                if not ref.is_file():
                    raise ManifestError(
                        f"{manifest_path.name}: sample {sample.id!r}: slide {sample.slide!r} "
                        "does not exist"
                    )
                slides[ref] = out / _cache_name(ref, encoder.name, mpp, tile_size, min_tissue)
                names[ref] = sample.slide
            feature_of[sample.id] = slides[ref]

    todo = [(slide, dest) for slide, dest in slides.items() if not _usable(dest)]
    if todo:
        roots = sorted({slide.resolve().parent for slide, _ in todo})
        with _local_tiler(roots) as tiler:
            for slide, dest in tqdm(todo, unit="slide", desc="features", disable=not progress):
                try:
                    feats = extract_slide_features(
                        slide,
                        encoder,
                        mpp=mpp,
                        tile_size=tile_size,
                        min_tissue=min_tissue,
                        tiler=tiler,
                    )
                except (ValueError, SmartPathError) as e:
                    raise ManifestError(f"{manifest_path.name}: slide {names[slide]!r}: {e}") from e
                save_features(dest, feats)
    log.info("featurised %d slides (%d from cache)", len(slides), len(slides) - len(todo))

    rewritten: list[RoiSample | WsiSample] = []
    for sample in samples:
        if sample.id in feature_of:
            rel = Path(os.path.relpath(feature_of[sample.id], base)).as_posix()
            sample = sample.model_copy(update={"slide": None, "features": rel})
        rewritten.append(sample)
    result = base / f"{manifest_path.stem}.features.jsonl"
    write_manifest(rewritten, result)
    return result
