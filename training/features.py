"""Precomputed WSI tile features: extract them from slides, store them, load them for training.

Design decisions:
- Tiles come from the project's tiling library, not a second implementation: a
  :class:`~smartpath.core.slides.tiler.Tiler` opens the slide, detects tissue, plans tissue
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
- Stain: when the model's tile spec names a stain normalisation (``stain_norm``, see
  :mod:`smartpath.model.stain_norm`), it is fitted per slide and applied to every batch before
  the encoder, after any ``transform`` (a re-staining), exactly as the encoder service does;
  the features' name then ends ``+<stain_norm>`` (``stain-stats-v1+macenko-v1``).
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
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from tqdm import tqdm

from smartpath.core.config import (
    SlideCacheConfig,
    SmartPathConfig,
    StorageConfig,
    TilingConfig,
)
from smartpath.core.config.model import SlideTiles
from smartpath.core.errors import SmartPathError
from smartpath.core.slides.plan import TilePlan
from smartpath.core.slides.tiler import Tiler, TileRequest
from smartpath.core.storage.local import LocalStore
from smartpath.model.slide_features import SlideFeatures, load_features, save_features
from smartpath.model.stain_norm import feature_name, slide_normaliser
from smartpath.model.tile_encoder import TileEncoder, make_tile_encoder
from smartpath.training.manifest import (
    ManifestError,
    RoiSample,
    WsiSample,
    read_manifest,
    resolve_ref,
    write_manifest,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_MIN_TISSUE",
    "DEFAULT_MPP",
    "DEFAULT_TILE_SIZE",
    "TileTransform",
    "extract_slide_features",
    "featurize_manifest",
]

log = logging.getLogger(__name__)

# A model's default slide tile spec (ModelConfig.slide_tiles): features match what it serves.
DEFAULT_MPP = SlideTiles().mpp
DEFAULT_TILE_SIZE = SlideTiles().tile_size
DEFAULT_MIN_TISSUE = SlideTiles().min_tissue
CACHE_VERSION = 1  # bump when extraction changes in a way the parameters do not capture


class TileTransform(Protocol):
    """A change made to every tile as read, before stain normalisation and the encoder (e.g.
    :class:`smartpath.training.stain.Restaining`); its ``name`` joins the features' name."""

    name: str

    def __call__(self, tiles: np.ndarray) -> np.ndarray: ...


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
    stain_norm: str | None = None,
    transform: TileTransform | None = None,
    batch_size: int = 64,
    tiler: Tiler | None = None,
) -> SlideFeatures:
    """Encode the tissue tiles of a local slide (``tile_size`` px at ``mpp`` µm/px).

    Tiles are those of ``Tiler.plan`` with at least ``min_tissue`` tissue; a slide with none
    falls back to its single best tile (never N = 0). Each batch as read goes through
    ``transform`` (when given), then the slide's stain normalisation (``stain_norm``, a
    ``ModelConfig.slide_tiles.stain_norm``), then the encoder, as ``encode_slide`` serves it.
    ``tiler`` (one whose ``tiling.local_slide_roots`` allows the slide) is reused when given,
    else a private one is made. Defaults give 30–56 tiles on a synthetic 2048-px slide (see the
    module docstring).
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
        normaliser = slide_normaliser(stain_norm)
        parts: list[np.ndarray] = []

        def encode(batches: list[np.ndarray]) -> None:
            for tiles in batches:
                out = np.asarray(enc.encode(tiles), dtype=np.float32)
                if out.shape != (len(tiles), enc.dim):
                    raise ValueError(
                        f"encoder {enc.name!r} returned shape {out.shape} for {len(tiles)} "
                        f"tiles; expected ({len(tiles)}, {enc.dim})"
                    )
                parts.append(out)

        for _, tiles in tiler.read(opened, plan.geometry, xs, ys, batch_size):
            tiles = tiles if transform is None else transform(tiles)
            encode([tiles] if normaliser is None else normaliser.feed(tiles))
        if normaliser is not None:
            encode(normaliser.finish())
        return SlideFeatures(
            features=np.concatenate(parts),
            coords=np.stack([xs, ys], axis=1).astype(np.int64),
            mpp=opened.info.require_mpp(),
            tile_size_px=plan.geometry.footprint,
            encoder=_features_name(enc, stain_norm, transform),
        )


def _features_name(
    enc: TileEncoder, stain_norm: str | None, transform: TileTransform | None
) -> str:
    """The features' encoder name: the encoder's, ``+<transform>``, ``+<stain_norm>``."""
    encoder = enc.name if transform is None else f"{enc.name}+{transform.name}"
    return feature_name(encoder, stain_norm)


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
    encoder: TileEncoder | str = "stain-stats-v1",
    mpp: float = DEFAULT_MPP,
    tile_size: int = DEFAULT_TILE_SIZE,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    stain_norm: str | None = None,
    transform: TileTransform | None = None,
    out_dir: str | Path | None = None,
    out_manifest: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Featurise every distinct slide of a local manifest; return the new manifest
    (``out_manifest``, default ``<stem>.features.jsonl`` beside the input).

    Feature files go to ``out_dir`` (default ``<manifest folder>/features``) and are reused
    when their cache key (slide name, size, mtime; the features' name, which carries the
    encoder, ``transform`` and ``stain_norm``; mpp, tile size, min tissue) matches.
    The new manifest's WSI samples reference them by path relative to the manifest.
    ``encoder`` is a built-in encoder's name or a loaded one (e.g. a learned encoder from
    :func:`smartpath.model.tile_encoder.tile_encoder_for` on the model's config).
    """
    if isinstance(manifest, str) and manifest.startswith("s3://"):
        raise ValueError("featurize_manifest reads local manifests only, got an s3:// URI")
    manifest_path = Path(manifest).expanduser().absolute()
    base = manifest_path.parent
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else base / "features"
    encoder = make_tile_encoder(encoder) if isinstance(encoder, str) else encoder
    samples = read_manifest(manifest_path)
    features_name = _features_name(encoder, stain_norm, transform)

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
                slides[ref] = out / _cache_name(ref, features_name, mpp, tile_size, min_tissue)
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
                        stain_norm=stain_norm,
                        transform=transform,
                        tiler=tiler,
                    )
                except (ValueError, SmartPathError) as e:
                    raise ManifestError(f"{manifest_path.name}: slide {names[slide]!r}: {e}") from e
                save_features(dest, feats)
    log.info("featurised %d slides (%d from cache)", len(slides), len(slides) - len(todo))

    result = (
        Path(out_manifest).expanduser().absolute()
        if out_manifest is not None
        else base / f"{manifest_path.stem}.features.jsonl"
    )
    rewritten: list[RoiSample | WsiSample] = []
    for sample in samples:
        if sample.id in feature_of:
            rel = Path(os.path.relpath(feature_of[sample.id], result.parent)).as_posix()
            sample = sample.model_copy(update={"slide": None, "features": rel})
        rewritten.append(sample)
    write_manifest(rewritten, result)
    return result
