"""Tile plans: a lattice of square tiles at a physical resolution, filtered by tissue.

Design decisions (after LazySlide's ``tile_tissues``):
- Callers ask for tile size in pixels *at a target MPP*; a magnification becomes MPP by
  :meth:`~smartpath.core.slides.resolution.Resolution.to_mpp`.
- Geometry is stored in level-0 pixels; the footprint (level-0 px per tile edge) may be
  fractional and is rounded only where pixels are read, so physical size stays exact.
- The read level is the coarsest one still at least as fine as the target (MPP-first:
  never upsample from a coarse level when a finer one exists).
- A plan's hash covers the slide identity and every parameter that shapes it, as requested
  (so it is known before the slide is read); it keys the feature cache.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from smartpath.core.errors import InvalidArgumentError
from smartpath.core.slides.resolution import Resolution
from smartpath.core.slides.slide import SlideInfo
from smartpath.core.slides.tissue import tile_fractions

PLAN_VERSION = 2  # 2: tissue detection keeps pale (fat) tissue joined to stained tissue
MAX_TILE_OVERSAMPLE = 8  # a tile reads at most 8x its edge (64x its pixels) from its level


@dataclass(frozen=True)
class TileGeometry:
    """Where and how every tile of a plan is read."""

    mpp: float  # output µm/px
    tile_size: int  # output pixels per edge
    overlap: int  # output pixels shared by neighbours
    footprint: float  # level-0 pixels per tile edge
    stride: float  # level-0 pixels between neighbouring tiles
    level: int  # pyramid level read
    level_downsample: float
    cols: int
    rows: int

    @property
    def read_size(self) -> int:
        """Pixels per tile edge read at ``level`` before resampling to ``tile_size``."""
        return max(1, round(self.footprint / self.level_downsample))


@dataclass(frozen=True)
class TilePlan:
    """The tissue tiles of one slide at one geometry, as parallel arrays in plan order."""

    geometry: TileGeometry
    x: np.ndarray  # (N,) int64 level-0 left
    y: np.ndarray  # (N,) int64 level-0 top
    col: np.ndarray  # (N,) int32
    row: np.ndarray  # (N,) int32
    tissue_fraction: np.ndarray  # (N,) float32
    min_tissue_fraction: float
    plan_hash: str

    def __len__(self) -> int:
        return len(self.x)


def tile_geometry(info: SlideInfo, *, mpp: float, tile_size: int, overlap: int) -> TileGeometry:
    """The lattice for ``tile_size``-px tiles at ``mpp`` µm/px over the whole slide."""
    if not 16 <= tile_size <= 4096:
        raise InvalidArgumentError(f"tile_size={tile_size} must be in 16–4096 px")
    if not 0 <= overlap < tile_size:
        raise InvalidArgumentError(f"overlap={overlap} must be in [0, tile_size)")
    scale = mpp / info.require_mpp()  # level-0 px per output px
    footprint = tile_size * scale
    stride = (tile_size - overlap) * scale
    level = info.best_level(scale)
    cols = 1 + max(0, math.ceil((info.width - footprint) / stride))
    rows = 1 + max(0, math.ceil((info.height - footprint) / stride))
    read_size = max(1, round(footprint / info.level_downsamples[level]))
    if read_size > MAX_TILE_OVERSAMPLE * tile_size:
        raise InvalidArgumentError(
            f"tiles at {mpp:g} µm/px would each read {read_size}² px from the nearest finer "
            f"pyramid level ({read_size // tile_size}x oversampled, at most "
            f"{MAX_TILE_OVERSAMPLE}x); ask for a finer mpp or store the slide with coarser levels"
        )
    if cols * rows > 50_000_000:
        raise InvalidArgumentError(
            f"a {cols}x{rows} tile grid is too large; ask for a coarser mpp or bigger tiles"
        )
    return TileGeometry(
        mpp=mpp,
        tile_size=tile_size,
        overlap=overlap,
        footprint=footprint,
        stride=stride,
        level=level,
        level_downsample=info.level_downsamples[level],
        cols=cols,
        rows=rows,
    )


def plan_hash(
    slide_key: str,
    *,
    resolution: Resolution,
    tile_size: int,
    overlap: int,
    min_tissue_fraction: float,
    tissue_params: dict[str, float],
) -> str:
    """The hash of everything that shapes a plan, as requested; known before the plan is
    computed, so caches keyed by it can be checked without reading the slide.

    The resolution enters as given (µm/px, or a magnification), so no slide metadata is
    needed. Keys of µm/px requests are those of every earlier version of this function.
    """
    key: dict[str, object] = {
        "v": PLAN_VERSION,
        "slide": slide_key,
        "tile": tile_size,
        "overlap": overlap,
        "min_tissue": round(min_tissue_fraction, 6),
        "tissue": tissue_params,
    }
    if resolution.mpp is not None:
        key["mpp"] = round(resolution.mpp, 6)
    else:
        assert resolution.magnification is not None
        key["magnification"] = round(resolution.magnification, 6)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def plan_tiles(
    geometry: TileGeometry,
    *,
    key: str,
    tissue_mask: np.ndarray,
    mask_downsample: float,
    min_tissue_fraction: float,
) -> TilePlan:
    """Keep the lattice tiles whose tissue fraction is at least ``min_tissue_fraction``;
    ``key`` (from :func:`plan_hash`) becomes the plan's hash."""
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise InvalidArgumentError(f"min_tissue_fraction={min_tissue_fraction} must be in [0, 1]")
    row, col = np.divmod(np.arange(geometry.rows * geometry.cols, dtype=np.int64), geometry.cols)
    x = np.round(col * geometry.stride).astype(np.int64)
    y = np.round(row * geometry.stride).astype(np.int64)
    fraction = tile_fractions(tissue_mask, mask_downsample, x, y, geometry.footprint)
    keep = fraction >= min_tissue_fraction if min_tissue_fraction > 0 else slice(None)
    return TilePlan(
        geometry=geometry,
        x=x[keep],
        y=y[keep],
        col=col[keep].astype(np.int32),
        row=row[keep].astype(np.int32),
        tissue_fraction=fraction[keep],
        min_tissue_fraction=min_tissue_fraction,
        plan_hash=key,
    )
