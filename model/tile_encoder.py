"""Tile encoders: uint8 RGB tiles (B, H, W, 3) -> float32 feature vectors (B, D).

Design decisions:
- No pretrained pathology encoder may be downloaded, so the project ships a deterministic,
  weight-free encoder. :class:`StainStatsEncoder` computes 32 hand-crafted H&E descriptors:
  optical density (OD) per channel, Ruifrok-Johnston colour deconvolution into hematoxylin,
  eosin and residual concentrations (means, spreads, quantiles), glass/fat/nuclei/fibre
  fractions, gradient texture and gradient coherence (oriented fibres).
- Everything is vectorised numpy over the whole batch (no Python loop over tiles or pixels).
  The only neighbourhood operation tells fat vacuoles from glass: a bright pixel is "fat" when
  tissue lies within 48 px on both sides of it along its row or its column (running sums), so
  glass beside a straight tissue edge stays glass while vacuoles ringed by membranes do not.
- Each raw descriptor is standardised as ``(raw - centre) / scale`` with fixed constants chosen
  by hand from the physically plausible range of the quantity (not fitted to any data set), so
  the features are roughly unit scale for any H&E-like input and two runs, machines or data
  sets always give the same numbers for the same pixels.
- The Ruifrok stain vectors are the published ones, not the synthetic generator's, so the
  encoder does not know how the synthetic slides were made.
- Encoders are chosen by name through ``TILE_ENCODERS`` / :func:`make_tile_encoder`; the name
  travels with saved features so a model never mixes feature spaces. Any object with ``name``,
  ``dim`` and ``encode`` satisfies :class:`TileEncoder`.
- Learned encoders (HF-format ViT / DINOv2 pathology foundation models, named
  ``"<model_type>:<weights digest>"``) need weights, so they are not in the registry: they live
  in :mod:`smartpath.model.hf_tile_encoder` (torch + transformers) and load from a path with
  :func:`load_hf_tile_encoder`, or from a model config with :func:`tile_encoder_for`. Both are
  re-exported here lazily, so importing this module stays numpy-only and fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from smartpath.model.hf_tile_encoder import (
        HFTileEncoder,
        load_hf_tile_encoder,
        tile_encoder_for,
    )

__all__ = [
    "LEARNED_MODEL_TYPES",
    "TILE_ENCODERS",
    "HFTileEncoder",
    "StainStatsEncoder",
    "TileEncoder",
    "load_hf_tile_encoder",
    "make_tile_encoder",
    "ruifrok_stains",
    "tile_encoder_for",
]

# HF ``model_type`` values of the learned encoders (smartpath.model.hf_tile_encoder); their
# names are "<model_type>:<digest12>".
LEARNED_MODEL_TYPES: tuple[str, ...] = ("vit", "dinov2")
_LAZY = {"HFTileEncoder", "load_hf_tile_encoder", "tile_encoder_for"}


def __getattr__(name: str) -> Any:
    """The learned-encoder API of :mod:`smartpath.model.hf_tile_encoder`, imported on use."""
    if name in _LAZY:
        return getattr(importlib.import_module("smartpath.model.hf_tile_encoder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@runtime_checkable
class TileEncoder(Protocol):
    """Maps uint8 RGB tiles (B, H, W, 3) to float32 features (B, dim)."""

    name: str
    dim: int

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """Features of a batch of tiles: (B, H, W, 3) uint8 -> (B, dim) float32."""
        ...


# Ruifrok & Johnston (2001) optical-density vectors (R, G, B) of hematoxylin and eosin; the
# third stain is their normalised cross product (the "residual" channel), as in scikit-image.
_RUIFROK_H = np.array([0.650, 0.704, 0.286])
_RUIFROK_E = np.array([0.072, 0.990, 0.105])


def ruifrok_stains() -> np.ndarray:
    """The unit OD vectors the encoder deconvolves with (3, 3) float64: rows H, E, residual."""
    h = _RUIFROK_H / np.linalg.norm(_RUIFROK_H)
    e = _RUIFROK_E / np.linalg.norm(_RUIFROK_E)
    r = np.cross(h, e)
    r /= np.linalg.norm(r)
    return np.stack([h, e, r])


def _deconvolution_matrix() -> np.ndarray:
    return np.linalg.inv(ruifrok_stains()).astype(np.float32)  # OD (.., 3) @ M -> (H, E, R)


# Pixel classes, in OD (-log10 of transmitted light, glass ~0.02 per channel).
_BRIGHT_OD = 0.25  # summed OD below this: glass or fat vacuole (no stain to speak of)
_NUCLEUS_H = 0.5  # hematoxylin concentration above this: nucleus
_FIBRE_E = 0.35  # eosin concentration above this (and not a nucleus): dense eosinophilic fibre
_FAT_RADIUS = 48  # px: a bright pixel with tissue within this on both sides is a fat vacuole
_QUANTILES = (0.1, 0.5, 0.9)

# (name, centre, scale): raw descriptor -> (raw - centre) / scale. Hand-set from plausible
# ranges (OD 0-1.5, concentrations 0-1.5, fractions 0-1), not fitted to data.
_STANDARDISATION: tuple[tuple[str, float, float], ...] = (
    ("od_r_mean", 0.3, 0.2),
    ("od_g_mean", 0.4, 0.25),
    ("od_b_mean", 0.2, 0.15),
    ("od_r_std", 0.15, 0.1),
    ("od_g_std", 0.2, 0.1),
    ("od_b_std", 0.1, 0.07),
    ("h_mean", 0.2, 0.15),
    ("h_std", 0.15, 0.1),
    ("h_q10", 0.05, 0.1),
    ("h_q50", 0.15, 0.15),
    ("h_q90", 0.4, 0.25),
    ("e_mean", 0.25, 0.15),
    ("e_std", 0.15, 0.1),
    ("e_q10", 0.05, 0.1),
    ("e_q50", 0.2, 0.15),
    ("e_q90", 0.45, 0.25),
    ("residual_mean", 0.0, 0.05),
    ("residual_std", 0.03, 0.03),
    ("glass_fraction", 0.3, 0.3),
    ("tissue_fraction", 0.6, 0.3),
    ("fat_fraction", 0.15, 0.25),
    ("nuclei_fraction", 0.1, 0.1),
    ("fibre_fraction", 0.2, 0.2),
    ("h_tissue_mean", 0.25, 0.15),
    ("e_tissue_mean", 0.3, 0.15),
    ("h_share", 0.4, 0.2),
    ("h_gradient", 0.05, 0.04),
    ("e_gradient", 0.05, 0.04),
    ("od_gradient", 0.08, 0.06),
    ("gradient_coherence", 0.15, 0.1),
    ("he_correlation", 0.0, 0.5),
    ("saturation_mean", 0.2, 0.15),
)


class StainStatsEncoder:
    """Deterministic, weight-free H&E stain and texture descriptors (see module docstring)."""

    name: str = "stain-stats-v1"
    dim: int = len(_STANDARDISATION)
    feature_names: tuple[str, ...] = tuple(n for n, _, _ in _STANDARDISATION)

    def __init__(self) -> None:
        self._deconv = _deconvolution_matrix()
        self._centre = np.array([c for _, c, _ in _STANDARDISATION], dtype=np.float32)
        self._scale = np.array([s for _, _, s in _STANDARDISATION], dtype=np.float32)

    def __repr__(self) -> str:
        return f"StainStatsEncoder(name={self.name!r}, dim={self.dim})"

    def raw_features(self, tiles: np.ndarray) -> np.ndarray:
        """Unstandardised descriptors (B, dim) float32, in ``feature_names`` order."""
        tiles = _check_tiles(tiles)
        b, h, w, _ = tiles.shape
        if b == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Optical density through a 256-entry table (no per-pixel log), as channel planes:
        # reductions over contiguous (B, H*W) rows are far faster than over a length-3 axis.
        od_lut = -np.log10((np.arange(256, dtype=np.float32) + 1.0) / 256.0)
        od = od_lut[np.ascontiguousarray(tiles.transpose(3, 0, 1, 2))]  # (3, B, H, W)
        m = self._deconv
        hema, eosin, resid = (od[0] * m[0, k] + od[1] * m[1, k] + od[2] * m[2, k] for k in range(3))
        od_sum = od[0] + od[1] + od[2]  # (B, H, W)

        bright = od_sum < _BRIGHT_OD
        tissue = ~bright
        fat = bright & _enclosed(tissue, _FAT_RADIUS)
        glass = bright & ~fat
        nuclei = hema > _NUCLEUS_H
        fibre = (eosin > _FIBRE_E) & ~nuclei

        n_tissue = _fraction(tissue) * (h * w)
        safe = np.maximum(n_tissue, 1.0)
        h_tissue = _rows(hema * tissue).sum(axis=1) / safe
        e_tissue = _rows(eosin * tissue).sum(axis=1) / safe
        h_share = np.where(n_tissue > 0, h_tissue / np.maximum(h_tissue + e_tissue, 1e-3), 0.0)

        gray = od_sum / np.float32(3.0)
        rgb = tiles.astype(np.float32).transpose(3, 0, 1, 2)
        vmax = np.maximum(np.maximum(rgb[0], rgb[1]), rgb[2])
        vmin = np.minimum(np.minimum(rgb[0], rgb[1]), rgb[2])
        saturation = (vmax - vmin) / np.maximum(vmax, 1.0)

        od_stats = [_mean_std(od[c]) for c in range(3)]
        h_mean, h_std = _mean_std(hema)
        e_mean, e_std = _mean_std(eosin)
        r_mean, r_std = _mean_std(resid)
        h_q = np.quantile(_rows(hema), _QUANTILES, axis=1)  # (3, B)
        e_q = np.quantile(_rows(eosin), _QUANTILES, axis=1)
        columns = [
            *(mean for mean, _ in od_stats),
            *(std for _, std in od_stats),
            h_mean,
            h_std,
            *h_q,
            e_mean,
            e_std,
            *e_q,
            r_mean,
            r_std,
            _fraction(glass),
            _fraction(tissue),
            _fraction(fat),
            _fraction(nuclei),
            _fraction(fibre),
            h_tissue,
            e_tissue,
            h_share,
            _gradient_magnitude(hema),
            _gradient_magnitude(eosin),
            _gradient_magnitude(gray),
            _gradient_coherence(gray),
            _correlation(_rows(hema), _rows(eosin)),
            _rows(saturation).mean(axis=1),
        ]
        out = np.stack([np.asarray(c, dtype=np.float32) for c in columns], axis=1)
        assert out.shape == (b, self.dim)
        return out

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """Standardised descriptors (B, 32) float32 of uint8 RGB tiles (B, H, W, 3)."""
        raw = self.raw_features(tiles)
        return ((raw - self._centre) / self._scale).astype(np.float32)


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 RGB, got dtype {tiles.dtype}")
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must have shape (B, H, W, 3), got {tiles.shape}")
    if tiles.shape[1] < 2 or tiles.shape[2] < 2:
        raise ValueError(f"tiles must be at least 2x2 px, got {tiles.shape[1]}x{tiles.shape[2]}")
    return tiles


def _rows(plane: np.ndarray) -> np.ndarray:
    """(B, H, W) -> (B, H*W) (a view when contiguous)."""
    return plane.reshape(plane.shape[0], -1)


def _fraction(mask: np.ndarray) -> np.ndarray:
    """Share of True pixels per tile (B,) of a (B, H, W) bool mask."""
    rows = _rows(mask)
    return np.count_nonzero(rows, axis=1).astype(np.float32) / np.float32(rows.shape[1])


def _mean_std(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile mean and standard deviation (B,) of a (B, H, W) plane."""
    rows = _rows(plane)
    mean = rows.mean(axis=1, keepdims=True)
    dev = rows - mean
    return mean[:, 0], np.sqrt((dev * dev).mean(axis=1))


def _enclosed(mask: np.ndarray, radius: int) -> np.ndarray:
    """(B, H, W) bool: pixels with ``mask`` pixels within ``radius`` on both sides along a row
    or along a column (enclosed by the mask, unlike glass beside a straight tissue edge)."""

    def both_sides(m: np.ndarray, axis: int) -> np.ndarray:
        n = m.shape[axis]
        cs = np.concatenate(
            [np.zeros_like(m.take([0], axis=axis), dtype=np.int32), m.cumsum(axis, np.int32)],
            axis=axis,
        )  # cs[i] = count of m[:i]
        i = np.arange(n)
        before = cs.take(i, axis=axis) - cs.take(np.maximum(i - radius, 0), axis=axis)
        after = cs.take(np.minimum(i + 1 + radius, n), axis=axis) - cs.take(i + 1, axis=axis)
        return (before > 0) & (after > 0)

    return both_sides(mask, 2) | both_sides(mask, 1)


def _gradients(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward differences of (B, H, W) on the common (B, H-1, W-1) grid."""
    gx = plane[:, :-1, 1:] - plane[:, :-1, :-1]
    gy = plane[:, 1:, :-1] - plane[:, :-1, :-1]
    return gx, gy


def _gradient_magnitude(plane: np.ndarray) -> np.ndarray:
    """Mean gradient magnitude per tile (B,)."""
    gx, gy = _gradients(plane)
    return np.sqrt(gx * gx + gy * gy).mean(axis=(1, 2))


def _gradient_coherence(plane: np.ndarray) -> np.ndarray:
    """Coherence of the tile's structure tensor (B,): 0 isotropic texture, 1 one orientation."""
    gx, gy = _gradients(plane)
    jxx = (gx * gx).mean(axis=(1, 2))
    jyy = (gy * gy).mean(axis=(1, 2))
    jxy = (gx * gy).mean(axis=(1, 2))
    return np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy**2) / np.maximum(jxx + jyy, 1e-8)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per row of (B, P) arrays; 0 where either row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    cov = (a * b).mean(axis=1)
    den = np.sqrt((a * a).mean(axis=1) * (b * b).mean(axis=1))
    return np.where(den > 1e-8, cov / np.maximum(den, 1e-8), 0.0)


TILE_ENCODERS: dict[str, Callable[[], TileEncoder]] = {
    StainStatsEncoder.name: StainStatsEncoder,
}


def make_tile_encoder(name: str) -> TileEncoder:
    """A new built-in encoder registered under ``name`` in ``TILE_ENCODERS`` (no weights)."""
    try:
        factory = TILE_ENCODERS[name]
    except KeyError:
        known = ", ".join(sorted(TILE_ENCODERS))
        if ":" in name and name.split(":", 1)[0] in LEARNED_MODEL_TYPES:
            raise ValueError(
                f"tile encoder {name!r} is a learned encoder and needs its weights: set the "
                "model config's tile_encoder_path to its HF-format folder or s3:// prefix and "
                f"build it with tile_encoder_for(cfg). Built-in encoders: {known}"
            ) from None
        raise ValueError(f"unknown tile encoder {name!r}; known encoders: {known}") from None
    return factory()
