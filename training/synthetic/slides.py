"""Seeded synthetic pyramidal whole-slide images, written as real Aperio SVS or generic tiled TIFF.

Design decisions
----------------
- Procedural, resolution-independent tissue. :class:`SyntheticTissue` is a pure function of
  level-0 coordinates: any region can be rendered at any downsample without holding an image, and
  tiles agree across boundaries and across pyramid levels.
- Value noise from a seeded 1024 x 1024 table of lattice values, evaluated as two small matrix
  products: interpolation is separable, so a field over a w x h block is ``Wy @ G @ Wx.T``. The
  weights integrate the smoothstep kernel exactly over each output pixel's footprint (a box
  filter), so a lower level is the area average of level 0, not an aliased point sample. Octaves
  much finer than a pixel are dropped (mean 0); thresholded features (fibres, fat membranes,
  nuclei) fade to their intensity-equivalent mean as they become sub-pixel, so levels agree in
  colour. Lattice periods are whole pixels, so tiles on a grid repeat a few offsets and the
  weight matrices are cached. Blocks are at most 256 px (weights grow with the square of the
  side); GEMMs are split to stay on OpenBLAS's single-threaded path (waking its threads for tiny
  products is slower than the product, and they compete with the tile workers).
- Large, smooth fields (tissue outline, tissue classes) are precomputed on coarse global lattices
  at construction, with rotated noise (no axis-aligned artefacts), and only interpolated per
  block: cheap, and identical for every tile, so tiles agree at their seams.
- Tissue = 2-4 domain-warped ellipses in distinct cells of a 3 x 2 layout plus small fragments,
  as a signed distance in level-0 px with ragged-edge noise on top; a threshold calibrated on an
  overview hits a seeded tissue fraction in [0.25, 0.42]. Interpolation weights are convex and
  every octave is bounded, so :meth:`SyntheticTissue.is_glass` proves a block is bare glass (and
  a twin test proves it all tissue) from a handful of lattice values: glass costs nothing.
- Colour by Beer-Lambert: each texture sets hematoxylin and eosin concentrations, converted to RGB
  with fixed optical-density vectors over near-white glass (through a 0.01-step lookup table, no
  per-pixel exp), so every mix looks like H&E.
- Writing streams pre-encoded JPEG tiles to tifffile (``data=`` an iterator of bytes), rendering
  each level straight from the procedural function, in a bounded thread pool, in file order. Bare
  glass tiles reuse one cached encoding. Memory is O(tile x workers), independent of slide size.
- Colour space: OpenSlide decodes JPEG tiles in the colour space named by the TIFF Photometric tag
  and ignores JFIF/Adobe markers, so the tiles are YCbCr JPEG (4:2:0) under
  Photometric=YCbCr, exactly what tifffile itself writes for ``compression="jpeg"``. Writing
  Photometric=RGB over YCbCr streams (or the reverse) shifts colours by ~60 grey levels.
- SVS layout (OpenSlide's aperio driver): page 0 tiled level 0 whose ImageDescription starts with
  "Aperio" and carries ``|AppMag = ..|MPP = ..``; page 1 a stripped thumbnail (OpenSlide names the
  second directory "thumbnail" when untiled); then the tiled lower levels; then stripped ``label``
  and ``macro`` pages, named by the first word of their description's second line.
- Generic TIFF: one tiled page per level; pages after the first are marked reduced-resolution
  (NewSubfileType=1), which OpenSlide's generic-tiff driver requires; the MPP is written as
  X/YResolution in pixels per centimetre (ResolutionUnit=3).
- BigTIFF when the level-0 raster exceeds 2 GiB uncompressed, so 100k x 100k slides are valid.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

import imagecodecs
import numpy as np
import tifffile
from tqdm import tqdm

__all__ = ["SyntheticSlide", "SyntheticTissue", "write_synthetic_slide"]

_T = TypeVar("_T")
_R = TypeVar("_R")
Field = np.ndarray | float  # a per-pixel plane, or a Python float when constant over a block

_MASK32 = 0xFFFFFFFF
# Glass and stain optical densities (-ln(I/255)) per RGB channel.
_GLASS_RGB = np.array([243.0, 242.0, 240.0])
_GLASS_OD = -np.log(_GLASS_RGB / 255.0)
_HEMATOXYLIN_OD = np.array([0.62, 0.80, 0.28])
_EOSIN_OD = np.array([0.10, 0.95, 0.42])
_LUT_SCALE = 100  # stain concentration steps per unit optical density
_LUT_H, _LUT_E = 480, 320  # table size: hematoxylin up to 4.8, eosin up to 3.2
_NUCLEUS_CELL = 13  # px: jittered-grid cell size of the nuclei layer
_NUCLEUS_R = (2.6, 4.4)  # px: nucleus radius range
# Mean values of the thresholded features, used once they are finer than a pixel.
# (Intensity-equivalent means: the value whose colour matches the average colour, measured.)
_FIBRE_MEAN = 0.37
_FAT_WALL_MEAN = 0.06
# Hematoxylin per unit of sub-pixel nucleus coverage: a nucleus adds 1.55, but averaging light
# (not stain) over a pixel dilutes it: -ln(1 - f * (1 - e^(-1.55 * 0.8))) / 0.8 ~= 0.9 f.
_NUCLEUS_H = 1.55
_NUCLEUS_H_FADED = 0.9
_GEMM_SINGLE = 1 << 18  # OpenBLAS multithreads GEMMs above 65536 * 4 multiply-adds
_BLOCK = 256  # px: regions are rendered in blocks of at most this side
_PAD = -4  # coarse lattices start this many nodes before the slide's origin
_TABLE = 1024  # lattice values repeat every _TABLE nodes (>= 7k px even for the finest octave)


def _kernel_integral(u: np.ndarray) -> np.ndarray:
    """Integral from -inf to u of the smoothstep interpolation kernel 1 - 3|t|^2 + 2|t|^3."""
    t = np.clip(u, -1.0, 1.0)
    a = np.abs(t)
    return 0.5 + np.sign(t) * (a - a**3 + 0.5 * a**4)


@lru_cache(maxsize=4096)
def _axis_weights(offset: float, n: int, step: float, period: int) -> tuple[int, np.ndarray]:
    """Box-filtered interpolation weights along one axis.

    Output pixel i covers ``[offset + i*step, offset + (i+1)*step)`` px, measured from a lattice
    node; nodes sit every ``period`` px. Returns ``(k0, W)`` with W of shape (n, m): the weight of
    node ``k0 + j`` (relative to that node) for pixel i. Rows are convex combinations. Cached (a
    pure function; tiles on a grid repeat a few offsets per period).
    """
    a = (offset + np.arange(n, dtype=np.float64) * step) / period
    b = a + step / period
    k0 = math.floor(a[0]) - 1
    k = np.arange(k0, math.floor(b[-1]) + 2, dtype=np.float64)
    w = (_kernel_integral(b[:, None] - k) - _kernel_integral(a[:, None] - k)) / (b - a)[:, None]
    w = w.astype(np.float32)
    w.setflags(write=False)
    return k0, w


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` as row blocks small enough for OpenBLAS's single-threaded path.

    Waking BLAS threads for each small product costs more than the product itself and fights
    the tile workers for cores; blocks of at most 2**18 multiply-adds stay on the calling thread.
    """
    m, k = a.shape
    n = b.shape[1]
    rows = max(1, _GEMM_SINGLE // max(1, n * k))
    if rows >= m:
        return a @ b
    out = np.empty((m, n), dtype=np.result_type(a, b))
    for i in range(0, m, rows):
        np.matmul(a[i : i + rows], b, out=out[i : i + rows])
    return out


@lru_cache(maxsize=1)
def _stain_luts() -> tuple[np.ndarray, np.ndarray]:
    """Beer-Lambert colours of (hematoxylin, eosin) concentration bins of width 1/_LUT_SCALE,
    at bin centres; entry 0 is exactly bare glass. As packed RGBX (uint32, little-endian) and as
    3-byte records (for contiguous RGB output)."""
    hema = (np.arange(_LUT_H, dtype=np.float64)[:, None, None] + 0.5) / _LUT_SCALE
    eosin = (np.arange(_LUT_E, dtype=np.float64)[None, :, None] + 0.5) / _LUT_SCALE
    od = _GLASS_OD + hema * _HEMATOXYLIN_OD + eosin * _EOSIN_OD
    rgb = np.rint(255.0 * np.exp(-od)).astype(np.uint8).reshape(-1, 3)
    rgb[0] = np.rint(_GLASS_RGB)
    rgbx = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    packed = rgbx.view(np.uint32).reshape(-1)
    records = rgb.view(np.dtype((np.void, 3))).reshape(-1)
    packed.setflags(write=False)
    records.setflags(write=False)
    return packed, records


def _check_region(w: int, h: int, downsample: float) -> float:
    """Validate a region's size and downsample; return the downsample as a float."""
    d = float(downsample)
    if w < 1 or h < 1 or not d > 0 or not math.isfinite(d):
        raise ValueError(f"bad region {w}x{h} at downsample {downsample}")
    return d


def _blocks(w: int, h: int) -> Iterator[tuple[int, int, int, int]]:
    """(row, col, height, width) of the _BLOCK-px blocks covering a w x h region."""
    for r in range(0, h, _BLOCK):
        for c in range(0, w, _BLOCK):
            yield r, c, min(_BLOCK, h - r), min(_BLOCK, w - c)


def _plane(v: Field, h: int, w: int) -> np.ndarray:
    """``v`` as a writable (h, w) float32 array (a new one unless it already is one)."""
    if isinstance(v, np.ndarray) and v.shape == (h, w) and v.dtype == np.float32:
        return v
    return np.broadcast_to(np.asarray(v, dtype=np.float32), (h, w)).copy()


def _density(w_cell: Field, w_fat: Field) -> Field:
    """Fraction of nucleus candidates present: 0.85 in cellular, 0.16 in stroma, 0.04 in fat."""
    return 0.16 + 0.69 * w_cell - 0.12 * w_fat


def _smoothstep(lo: float, hi: float, v: np.ndarray | float) -> np.ndarray | float:
    """Hermite step from 0 at ``lo`` to 1 at ``hi``."""
    t = np.clip((v - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _fade(d: float, size: float) -> float:
    """How far a feature of ``size`` px has faded to its mean at downsample ``d`` (0..1)."""
    return float(_smoothstep(0.3, 1.2, d / size))


@dataclass(frozen=True)
class _Octave:
    """One value-noise octave: table offsets, lattice periods (px), amplitude, rotation."""

    ox: int
    oy: int
    period_x: int
    period_y: int
    amp: float
    angle: float  # radians; used by the point-sampled (init-time) fields only


class SyntheticTissue:
    """Deterministic procedural H&E-like tissue on white glass, evaluable for any region at any
    scale.

    Coordinates are level-0 pixels. ``render(x, y, w, h, d)`` returns the w x h image whose pixel
    (i, j) approximates the area average over ``[x + j*d, x + (j+1)*d) x [y + i*d, y + (i+1)*d)``;
    the same seed always gives the same pixels, and regions outside the slide are glass.
    ``target_fraction`` is the seeded share of the slide covered by tissue (0.25-0.42).
    """

    def __init__(self, width: int, height: int, seed: int = 0) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"slide size must be positive, got {width}x{height}")
        self.width = int(width)
        self.height = int(height)
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed & _MASK32, 0x5EED51DE])
        self._table = rng.random((_TABLE, _TABLE), dtype=np.float32) - np.float32(0.5)
        size = min(self.width, self.height)

        def octave(period: float, amp: float, aspect: float = 1.0) -> _Octave:
            ox, oy = (int(v) for v in rng.integers(0, _TABLE, size=2))
            px, py = max(2, round(period)), max(2, round(period * aspect))
            return _Octave(ox, oy, px, py, amp, float(rng.uniform(0.0, math.pi)))

        # Tissue pieces: ellipses in distinct cells of a 3 x 2 layout plus a few small fragments,
        # domain-warped, as a coarse signed-distance lattice (px, positive inside).
        p = self._blob_period = max(8, math.ceil(max(self.width, self.height) / 64))
        nx, ny = math.ceil(self.width / p) + 9, math.ceil(self.height / p) + 9
        gx = ((np.arange(nx) + _PAD) * float(p))[None, :]
        gy = ((np.arange(ny) + _PAD) * float(p))[:, None]
        wx = gx + self._noise_at((octave(size / 3, 0.08 * size),), gx, gy)
        wy = gy + self._noise_at((octave(size / 3, 0.08 * size),), gx, gy)
        cols, rows = (3, 2) if self.width >= self.height else (2, 3)
        cw, ch = self.width / cols, self.height / rows
        blobs = []
        for cell in rng.choice(cols * rows, size=int(rng.integers(2, 5)), replace=False):
            cx = (cell % cols + rng.uniform(0.4, 0.6)) * cw
            cy = (cell // cols + rng.uniform(0.4, 0.6)) * ch
            blobs.append((cx, cy, rng.uniform(0.2, 0.36) * cw, rng.uniform(0.2, 0.36) * ch))
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0.1, 0.9) * self.width, rng.uniform(0.1, 0.9) * self.height
            blobs.append((cx, cy, *(rng.uniform(0.015, 0.04, size=2) * size)))
        sdf = np.full((ny, nx), -np.inf)
        for cx, cy, ra, rb in blobs:
            ang = rng.uniform(0.0, math.pi)
            u = (wx - cx) * math.cos(ang) + (wy - cy) * math.sin(ang)
            v = (wy - cy) * math.cos(ang) - (wx - cx) * math.sin(ang)
            q = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
            sdf = np.maximum(sdf, (1.0 - q) * math.sqrt(ra * rb))
        sdf += self._noise_at((octave(size / 10, 0.04 * size),), gx, gy)
        self._blob = sdf.astype(np.float32)

        # Ragged edges at physical scales (px amplitudes), tamer on small slides.
        rag = min(1.0, size / 10000) ** 0.5
        self._edge = (octave(330, 120.0 * rag), octave(90, 36.0 * rag), octave(26, 10.0 * rag))
        self._edge_bound = 0.5 * sum(o.amp for o in self._edge)

        # Tissue classes (stroma / cellular / fat) and fibre orientation: smooth fields, kept
        # on a lattice of their own and interpolated per region.
        cls = min(max(size / 4, 300.0), 2600.0)
        class_a = (octave(cls, 1.0), octave(cls / 3, 0.45))
        class_b = (octave(cls, 1.0), octave(cls / 3, 0.45))
        orient = (octave(700, 1.0),)
        cp = self._class_period = max(16, round(cls / 16))
        px = ((np.arange(math.ceil(self.width / cp) + 9) + _PAD) * float(cp))[None, :]
        py = ((np.arange(math.ceil(self.height / cp) + 9) + _PAD) * float(cp))[:, None]
        self._class_nodes = np.empty((3, py.shape[0], px.shape[1]), dtype=np.float32)
        for r in range(0, py.shape[0], 64):  # row bands keep the temporaries small
            band = py[r : r + 64]
            w_cell = _smoothstep(0.10, 0.22, self._noise_at(class_a, px, band))
            w_fat = _smoothstep(0.12, 0.24, self._noise_at(class_b, px, band)) * (1.0 - w_cell)
            mix = _smoothstep(-0.15, 0.15, self._noise_at(orient, px, band))
            self._class_nodes[:, r : r + 64] = np.stack([w_cell, w_fat, mix])

        # Textures at physical scales.
        self._fibre_h = (octave(70, 1.0, 0.16), octave(23, 0.35, 0.3))
        self._fibre_v = (octave(11, 1.0, 6.4), octave(7, 0.35, 3.3))
        self._fat = (octave(52, 1.0), octave(17, 0.3))
        self._cyto = (octave(18, 1.0),)
        self._speck = (octave(10, 1.0),)
        self._nuc = tuple(octave(_NUCLEUS_CELL, 1.0) for _ in range(4))

        # Calibrate the tissue threshold on an overview to a seeded tissue fraction.
        self.target_fraction = float(rng.uniform(0.25, 0.42))
        self._offset = 0.0
        ds = max(1.0, max(self.width, self.height) / 320)
        ow, oh = max(1, math.ceil(self.width / ds)), max(1, math.ceil(self.height / ds))
        overview = self._tissue_field(0, 0, ow, oh, ds)
        self._offset = float(np.quantile(overview, 1.0 - self.target_fraction))

    # ---------------------------------------------------------------- noise machinery

    def _noise_at(self, octaves: Iterable[_Octave], px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Point-sampled sum of ``amp * noise`` at positions (broadcast), each octave on its own
        rotated lattice: hides value noise's axis-aligned look in the large init-time fields."""
        total = np.zeros(np.broadcast_shapes(px.shape, py.shape), dtype=np.float64)
        t, mask = self._table, _TABLE - 1
        for o in octaves:
            cos, sin = math.cos(o.angle), math.sin(o.angle)
            u = (px * cos - py * sin) / o.period_x
            v = (px * sin + py * cos) / o.period_y
            i, j = np.floor(u), np.floor(v)
            fu, fv = _smoothstep(0.0, 1.0, u - i), _smoothstep(0.0, 1.0, v - j)
            i0 = (i.astype(np.int64) + o.ox) & mask
            j0 = (j.astype(np.int64) + o.oy) & mask
            i1, j1 = (i0 + 1) & mask, (j0 + 1) & mask
            top = t[j0, i0] + fu * (t[j0, i1] - t[j0, i0])
            bottom = t[j1, i0] + fu * (t[j1, i1] - t[j1, i0])
            total += o.amp * (top + fv * (bottom - top))
        return total

    def _lattice(self, o: _Octave, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
        """Lattice values in [-0.5, 0.5) for node indices ``ky x kx``."""
        rows = self._table.take((ky + o.oy) & (_TABLE - 1), axis=0)
        return rows.take((kx + o.ox) & (_TABLE - 1), axis=1)

    def _field(
        self,
        octaves: Iterable[_Octave],
        x: float,
        y: float,
        w: int,
        h: int,
        d: float,
        cutoff: float = 1.5,
    ) -> Field:
        """Box-filtered sum of ``amp * noise`` (noise in [-0.5, 0.5]). Octaves whose period is
        under ``d / cutoff`` px are dropped (their mean is 0); 0.0 if all are."""
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        gs: list[np.ndarray] = []
        for o in octaves:
            if d > cutoff * min(o.period_x, o.period_y):
                continue  # averaged out: contributes its mean, 0
            bx, by = math.floor(x / o.period_x), math.floor(y / o.period_y)
            kx0, wx = _axis_weights(float(x - bx * o.period_x), w, float(d), o.period_x)
            ky0, wy = _axis_weights(float(y - by * o.period_y), h, float(d), o.period_y)
            kx = np.arange(bx + kx0, bx + kx0 + wx.shape[1], dtype=np.int64)
            ky = np.arange(by + ky0, by + ky0 + wy.shape[1], dtype=np.int64)
            g = self._lattice(o, kx, ky)
            if o.amp != 1.0:
                g = g * np.float32(o.amp)
            xs.append(wx)
            ys.append(wy)
            gs.append(g)
        if not gs:
            return 0.0
        # Contract the cheaper axis first so the final full-size product has the shorter inner
        # dimension (block-diagonal sum of octaves as one matrix product).
        if sum(g.shape[0] for g in gs) <= sum(g.shape[1] for g in gs):
            inner = [_mm(g, wx.T) for g, wx in zip(gs, xs, strict=True)]
            left = ys[0] if len(ys) == 1 else np.concatenate(ys, axis=1)
            return _mm(left, inner[0] if len(inner) == 1 else np.concatenate(inner, axis=0))
        inner = [_mm(wy, g) for g, wy in zip(gs, ys, strict=True)]
        right = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=1)
        return _mm(inner[0] if len(inner) == 1 else np.concatenate(inner, axis=1), right.T)

    def _blob_nodes(self, x: float, y: float, w: int, h: int, d: float) -> np.ndarray:
        """The blob-lattice nodes that can influence a region (a view; clamped at the border)."""
        p, k0 = self._blob_period, _PAD
        ny, nx = self._blob.shape
        # Node k's kernel covers ((k - 1) p, (k + 1) p): nodes floor(x/p) .. ceil(x_end/p).
        i0 = min(max(math.floor(y / p) - k0, 0), ny - 1)
        i1 = min(max(math.ceil((y + h * d) / p) + 1 - k0, i0 + 1), ny)
        j0 = min(max(math.floor(x / p) - k0, 0), nx - 1)
        j1 = min(max(math.ceil((x + w * d) / p) + 1 - k0, j0 + 1), nx)
        return self._blob[i0:i1, j0:j1]

    def _tissue_field(self, x: float, y: float, w: int, h: int, d: float) -> np.ndarray:
        """Approximate signed distance to the tissue boundary in level-0 px (positive = tissue)."""
        p, k0 = self._blob_period, _PAD
        bx, by = math.floor(x / p), math.floor(y / p)
        kx0, wx = _axis_weights(float(x - bx * p), w, float(d), p)
        ky0, wy = _axis_weights(float(y - by * p), h, float(d), p)
        ix = np.clip(np.arange(wx.shape[1]) + bx + kx0 - k0, 0, self._blob.shape[1] - 1)
        iy = np.clip(np.arange(wy.shape[1]) + by + ky0 - k0, 0, self._blob.shape[0] - 1)
        t = _mm(wy, _mm(self._blob.take(iy, axis=0).take(ix, axis=1), wx.T))
        t += self._field(self._edge, x, y, w, h, d)
        t -= np.float32(self._offset)
        return t

    def _class_planes(self, x: float, y: float, w: int, h: int, d: float) -> list[Field]:
        """Cellular weight, fat weight and fibre orientation mix over a region, interpolated from
        their values on a global lattice (smooth fields; the lattice makes them cheap and
        identical for every tile). A plane constant over the region is a Python float."""
        p = self._class_period
        bx, by = math.floor(x / p), math.floor(y / p)
        kx0, wx = _axis_weights(float(x - bx * p), w, float(d), p)
        ky0, wy = _axis_weights(float(y - by * p), h, float(d), p)
        _, ny, nx = self._class_nodes.shape
        ix = np.clip(np.arange(wx.shape[1]) + bx + kx0 - _PAD, 0, nx - 1)
        iy = np.clip(np.arange(wy.shape[1]) + by + ky0 - _PAD, 0, ny - 1)
        nodes = self._class_nodes.take(iy, axis=1).take(ix, axis=2)
        planes: list[Field] = []
        for c in nodes:
            lo, hi = float(c.min()), float(c.max())
            planes.append(lo if hi - lo < 1e-6 else _mm(wy, _mm(c, wx.T)))
        return planes

    # ---------------------------------------------------------------- public API

    @property
    def glass_rgb(self) -> tuple[int, int, int]:
        """The colour of bare glass."""
        r, g, b = (int(v) for v in np.rint(_GLASS_RGB))
        return r, g, b

    def is_glass(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> bool:
        """True when the region provably holds no tissue (a cheap conservative bound)."""
        peak = float(self._blob_nodes(x, y, w, h, downsample).max())
        return peak + self._edge_bound - self._offset < -2.0 * max(1.0, downsample)

    def _is_interior(self, x: int, y: int, w: int, h: int, d: float) -> bool:
        """True when the region is provably all tissue (alpha = 1 everywhere)."""
        low = float(self._blob_nodes(x, y, w, h, d).min())
        return low - self._edge_bound - self._offset > 2.0 * max(1.0, d)

    def tissue_mask(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """(h, w) bool ground truth: True where the pixel's footprint is mostly tissue."""
        d = _check_region(w, h, downsample)
        out = np.empty((h, w), dtype=bool)
        for r, c, bh, bw in _blocks(w, h):
            bx, by = x + c * d, y + r * d
            if self.is_glass(bx, by, bw, bh, d):
                out[r : r + bh, c : c + bw] = False
            elif self._is_interior(bx, by, bw, bh, d):
                out[r : r + bh, c : c + bw] = True
            else:
                out[r : r + bh, c : c + bw] = self._tissue_field(bx, by, bw, bh, d) > 0
        return out

    def render(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the region at (x, y) level-0 px, each pixel covering
        ``downsample`` level-0 px."""
        return self._render(x, y, w, h, downsample, channels=3)

    def _tile_rgbx(self, x: float, y: float, size: int, downsample: float) -> np.ndarray | None:
        """One (size, size, 4) RGBX tile (JPEG encodes it without a repacking copy), or None when
        it is bare glass."""
        if size > _BLOCK:
            glass = self.is_glass(x, y, size, size, downsample)
            return None if glass else self._render(x, y, size, size, downsample, channels=4)
        index = self._stain_index(x, y, size, size, downsample)
        if index is None:
            return None
        return _stain_luts()[0].take(index).view(np.uint8).reshape(size, size, 4)

    def _render(
        self, x: float, y: float, w: int, h: int, downsample: float, channels: int
    ) -> np.ndarray:
        """Render in blocks of at most _BLOCK px: the weight matrices grow with the square of the
        block side, so large regions are done piecewise (blocks agree at their seams)."""
        d = _check_region(w, h, downsample)
        packed, records = _stain_luts()
        lut = packed if channels == 4 else records
        out = np.empty((h, w, channels), dtype=np.uint8)
        for r, c, bh, bw in _blocks(w, h):
            index = self._stain_index(x + c * d, y + r * d, bw, bh, d)
            block = out[r : r + bh, c : c + bw]
            if index is None:
                block[...] = lut[:1].view(np.uint8)
            else:
                block[...] = lut.take(index).view(np.uint8).reshape(bh, bw, channels)
        return out

    def _stain_index(self, x: float, y: float, w: int, h: int, d: float) -> np.ndarray | None:
        """(h, w) int32 index into the stain colour tables for one block, or None if the block
        is bare glass."""
        if self.is_glass(x, y, w, h, d):
            return None
        alpha: Field = 1.0
        if not self._is_interior(x, y, w, h, d):
            # alpha = clip(t / (2 * edge) + 0.5, 0, 1): 0 below -edge, 1 above +edge.
            t = self._tissue_field(x, y, w, h, d)
            edge = 0.75 * max(1.0, d)
            if float(t.max()) <= -edge:
                return None
            if float(t.min()) < edge:
                t *= np.float32(0.5 / edge)
                t += np.float32(0.5)
                alpha = np.clip(t, 0.0, 1.0, out=t)

        w_cell, w_fat, mix = self._class_planes(x, y, w, h, d)
        w_str = 1.0 - w_cell - w_fat
        hema: Field = 0.07 * w_str
        eosin: Field = 0.0
        if np.max(w_str) > 0.0:
            # Wavy fibres: ridges along the zero set of anisotropic noise; orientation varies.
            if np.max(mix) <= 0.0:
                fib = self._field(self._fibre_h, x, y, w, h, d)
            elif np.min(mix) >= 1.0:
                fib = self._field(self._fibre_v, x, y, w, h, d)
            else:
                fh = self._field(self._fibre_h, x, y, w, h, d)
                fib = fh + mix * (self._field(self._fibre_v, x, y, w, h, d) - fh)
            ridge = np.clip(1.0 - 3.0 * np.abs(fib), 0.0, 1.0)
            ridge = ridge * ridge
            fade = _fade(d, 9.0)
            if fade > 0.0:
                ridge = (1.0 - fade) * ridge + fade * _FIBRE_MEAN
            eosin = w_str * (0.30 + 0.75 * ridge)
        if np.max(w_cell) > 0.0:
            cyto = self._field(self._cyto, x, y, w, h, d)
            hema = hema + w_cell * (0.30 + 0.5 * cyto)
            eosin = eosin + w_cell * (0.28 + 0.3 * cyto)
        if np.max(w_fat) > 0.0:
            holes = self._field(self._fat, x, y, w, h, d)
            wall = 1.0 - _smoothstep(0.0, 0.05, np.abs(holes + 0.06))
            fade = _fade(d, 6.0)
            if fade > 0.0:
                wall = (1.0 - fade) * wall + fade * _FAT_WALL_MEAN
            eosin = eosin + w_fat * (0.04 + 0.85 * wall)
            hema = hema + w_fat * (0.03 * wall)

        disc, faded = self._nuclei(x, y, w, h, d, w_cell, w_fat)
        hema = hema + (_NUCLEUS_H * disc + _NUCLEUS_H_FADED * faded)
        eosin = eosin * (1.0 - (0.6 * disc + 0.35 * faded))
        # Concentrations -> table steps, with speckle and the tissue edge's coverage folded in.
        speck = self._field(self._speck, x, y, w, h, d, cutoff=0.5)
        steps = (0.9 * _LUT_SCALE) * speck + _LUT_SCALE
        steps = steps * alpha
        hq = _plane(hema * steps, h, w)
        index = np.minimum(hq, _LUT_H - 1, out=hq).astype(np.int32)
        index *= _LUT_E
        eq = _plane(eosin * steps, h, w)
        index += np.minimum(eq, _LUT_E - 1, out=eq).astype(np.int32)
        return index

    def _nuclei(
        self, x: float, y: float, w: int, h: int, d: float, w_cell: Field, w_fat: Field
    ) -> tuple[Field, Field]:
        """Nuclei as (resolved disc coverage, sub-pixel mean coverage), both 0..1: discs on a
        jittered grid, one candidate per cell, fading to their mean as they shrink below a px."""
        c = _NUCLEUS_CELL
        r_lo, r_hi = _NUCLEUS_R
        fade = _fade(d, 2.0 * r_lo)
        disc: Field = 0.0
        if fade < 1.0:
            axes = []
            for n, start in ((w, x), (h, y)):
                pos = start + (np.arange(n, dtype=np.float64) + 0.5) * d
                cell = np.floor(pos / c).astype(np.int64)
                local = (pos - cell * c).astype(np.float32)
                axes.append((int(cell[0]), np.bincount(cell - cell[0]), local))
            (kx0, cnt_x, lx), (ky0, cnt_y, ly) = axes
            kx = np.arange(kx0, kx0 + len(cnt_x), dtype=np.int64)
            ky = np.arange(ky0, ky0 + len(cnt_y), dtype=np.int64)
            u = [self._lattice(o, kx, ky) + np.float32(0.5) for o in self._nuc]
            radius = r_lo + (r_hi - r_lo) * u[2]
            margin = np.minimum(radius + 0.6 * max(1.0, d), 0.5 * c)
            # Presence: compare with the nucleus density over the cell.
            cell_cls = self._class_planes(kx0 * c, ky0 * c, len(kx), len(ky), float(c))
            params = np.stack(
                [
                    margin + (c - 2.0 * margin) * u[0],
                    margin + (c - 2.0 * margin) * u[1],
                    np.where(u[3] < _density(cell_cls[0], cell_cls[1]), radius * radius, -1e4),
                ]
            ).astype(np.float32)
            full = np.repeat(np.repeat(params, cnt_y, axis=1), cnt_x, axis=2)
            dist = lx[None, :] - full[0]
            dist *= dist
            dy = ly[:, None] - full[1]
            dy *= dy
            dist += dy
            np.subtract(full[2], dist, out=dist)
            dist *= np.float32(1.0 / (1.2 * max(1.0, d) * (r_lo + r_hi) / 2))
            dist += np.float32(0.5)
            disc = np.clip(dist, 0.0, 1.0, out=dist)
        if fade <= 0.0:
            return disc, 0.0
        mean_cov = math.pi * ((r_lo + r_hi) / 2) ** 2 / (c * c)
        return (1.0 - fade) * disc, fade * mean_cov * _density(w_cell, w_fat)


# -------------------------------------------------------------------- writer


@dataclass(frozen=True)
class SyntheticSlide:
    """A written synthetic slide. ``level_downsamples`` are as OpenSlide reports them (mean of the
    width and height ratios); level k's pixels are rendered at exactly ``level_factor ** k``."""

    path: Path
    width: int
    height: int
    mpp: float
    level_downsamples: tuple[float, ...]
    format: str
    seed: int


def _level_shapes(width: int, height: int, tile: int, factor: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) per level, down to the first level that fits in one tile."""
    levels = [(1, width, height)]
    while max(levels[-1][1], levels[-1][2]) > tile:
        ds = levels[-1][0] * factor
        levels.append((ds, max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))))
    return levels


def _ordered_map(
    fn: Callable[[_T], _R], items: Iterable[_T], pool: ThreadPoolExecutor | None, window: int
) -> Iterator[_R]:
    """``map(fn, items)`` in order, at most ``window`` items in flight on ``pool``."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque[Future[_R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    """YCbCr 4:2:0 JPEG of an (h, w, 4) RGBX tile, matching the Photometric=YCbCr tags tifffile
    writes for JPEG (the same bytes tifffile would produce from the RGB tile)."""
    return bytes(
        imagecodecs.jpeg8_encode(
            tile,
            level=quality,
            colorspace=imagecodecs.JPEG8.CS.EXT_RGBX,
            outcolorspace="YCBCR",
            subsampling=(2, 2),
        )
    )


def _label_image(seed: int) -> np.ndarray:
    """A slide label: cream paper, a seeded 2-D barcode block and text-like bars."""
    rng = np.random.default_rng([seed & _MASK32, 0x1ABE1])
    img = np.full((400, 400, 3), (246, 244, 236), np.uint8)
    code = rng.random((20, 20)) < 0.5
    code[0, :], code[:, 0] = True, True  # finder edges, like a DataMatrix
    img[30:230, 100:300] = np.where(np.kron(code, np.ones((10, 10), bool))[..., None], 20, 246)
    for row in range(4):
        y0 = 255 + row * 34
        x = 40
        while x < 360:
            n = int(rng.integers(8, 40))
            img[y0 : y0 + 18, x : min(x + n, 360)] = 40
            x += n + int(rng.integers(6, 14))
    return img


def _macro_image(tissue: SyntheticTissue, label: np.ndarray) -> np.ndarray:
    """A camera picture of the whole glass slide: label on the left, tissue on the right."""
    mh, mw = 431, 1280
    img = np.full((mh, mw, 3), (214, 218, 222), np.uint8)
    lab_w = 330
    rows = (np.arange(mh - 40) * label.shape[0] / (mh - 40)).astype(int)
    cols = (np.arange(lab_w - 40) * label.shape[1] / (lab_w - 40)).astype(int)
    img[20 : mh - 20, 20 : lab_w - 20] = label[rows][:, cols]
    area_w, area_h = mw - lab_w - 40, mh - 40
    ds = max(tissue.width / area_w, tissue.height / area_h)
    tw = max(1, min(area_w, math.ceil(tissue.width / ds)))
    th = max(1, min(area_h, math.ceil(tissue.height / ds)))
    view = tissue.render(0, 0, tw, th, ds).astype(np.float32) * (218.0 / 243.0)
    y0, x0 = 20 + (area_h - th) // 2, lab_w + 20 + (area_w - tw) // 2
    img[y0 : y0 + th, x0 : x0 + tw] = np.clip(view, 0, 255).astype(np.uint8)
    return img


def _encoded_tiles(
    tissue: SyntheticTissue,
    level: tuple[int, int, int],
    tile: int,
    quality: int,
    glass: bytes,
    pool: ThreadPoolExecutor | None,
    window: int,
    bar: tqdm | None,
) -> Iterator[bytes]:
    """The JPEG tiles of one level in file order (rows of tiles, left to right), each rendered
    straight from ``tissue`` at the level's downsample; bare-glass tiles reuse ``glass``."""
    ds, lw, lh = level

    def encode(job: tuple[int, int]) -> bytes:
        x0, y0 = job[1] * tile * ds, job[0] * tile * ds
        rgbx = tissue._tile_rgbx(x0, y0, tile, ds)
        return glass if rgbx is None else _jpeg(rgbx, quality)

    jobs = ((ty, tx) for ty in range(math.ceil(lh / tile)) for tx in range(math.ceil(lw / tile)))
    for data in _ordered_map(encode, jobs, pool, window):
        if bar is not None:
            bar.update(1)
        yield data


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    fmt: Literal["svs", "tiff"] = "svs",
    mpp: float = 0.25,
    app_mag: float | None = None,
    tile_size: int = 256,
    quality: int = 85,
    seed: int = 0,
    level_factor: int = 4,
    progress: bool = False,
    workers: int | None = None,
) -> SyntheticSlide:
    """Write a seeded synthetic pyramidal slide tile by tile and return its description.

    ``fmt="svs"`` writes an Aperio SVS (OpenSlide vendor "aperio", with thumbnail, label and macro
    associated images); ``fmt="tiff"`` a generic tiled TIFF (vendor "generic-tiff"). Levels go
    down by ``level_factor`` until one fits in a tile. ``app_mag`` (SVS only) defaults to
    ``10 / mpp``. ``workers`` threads render and encode tiles (default: CPU count, at most 8).
    The same arguments always give the same file, byte for byte.
    """
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt must be 'svs' or 'tiff', got {fmt!r}")
    if width < 1 or height < 1:
        raise ValueError(f"slide size must be positive, got {width}x{height}")
    if tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if level_factor < 2:
        raise ValueError(f"level_factor must be >= 2, got {level_factor}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be positive, got {mpp}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    path = Path(path)
    mag = 10.0 / mpp if app_mag is None else float(app_mag)
    mag_text = str(round(mag)) if abs(mag - round(mag)) < 1e-9 else f"{mag:g}"
    tissue = SyntheticTissue(width, height, seed)
    levels = _level_shapes(width, height, tile_size, level_factor)
    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    glass = _jpeg(tissue._render(0, 0, tile_size, tile_size, 1.0, channels=4), quality)

    aperio = "Aperio Image Library v12.0.0 \n"
    region = f"{width}x{height} [0,0 {width}x{height}]"
    props = f"|AppMag = {mag_text}|MPP = {float(mpp)!r}"
    common = {
        "photometric": "rgb",
        "metadata": None,  # no tifffile JSON description
        "resolution": (1e4 / mpp, 1e4 / mpp),  # pixels per centimetre
        "resolutionunit": "CENTIMETER",
    }
    # JPEG tiles can't outgrow the raw pixels, so classic TIFF's 4 GiB is safe below 2 GiB raw.
    bigtiff = width * height * 3 > 2**31
    bar = None
    if progress:
        total = sum(math.ceil(w / tile_size) * math.ceil(h / tile_size) for _, w, h in levels)
        bar = tqdm(total=total, unit="tile", desc=path.name)
    pool = ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
            for index, level in enumerate(levels):
                _, lw, lh = level
                if fmt == "tiff":
                    desc = None
                elif index == 0:
                    desc = f"{aperio}{region} ({tile_size}x{tile_size}) JPEG/RGB Q={quality}{props}"
                else:
                    desc = f"{aperio}{region} -> {lw}x{lh} JPEG/RGB Q={quality}"
                tif.write(
                    _encoded_tiles(
                        tissue, level, tile_size, quality, glass, pool, 4 * n_workers, bar
                    ),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(tile_size, tile_size),
                    compression="jpeg",  # tags only: the tiles come pre-encoded
                    description=desc,
                    subfiletype=0 if index == 0 else 1,  # 1 = reduced-resolution image
                    **common,
                )
                if fmt == "svs" and index == 0:
                    # Aperio: the second directory is always the stripped thumbnail.
                    tds = max(1.0, max(width, height) / 1024)
                    tw, th = max(1, round(width / tds)), max(1, round(height / tds))
                    tif.write(
                        tissue.render(0, 0, tw, th, tds),
                        compression="jpeg",
                        compressionargs={"level": quality},
                        description=f"{aperio}{width}x{height} -> {tw}x{th} - {props}",
                        **common,
                    )
            if fmt == "svs":
                label = _label_image(seed)
                macro = _macro_image(tissue, label)
                tif.write(
                    label,
                    compression="lzw",
                    description=f"{aperio}label {label.shape[1]}x{label.shape[0]}",
                    subfiletype=1,
                    **common,
                )
                tif.write(
                    macro,
                    compression="jpeg",
                    compressionargs={"level": quality},
                    description=f"{aperio}macro {macro.shape[1]}x{macro.shape[0]}",
                    subfiletype=9,
                    **common,
                )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()

    return SyntheticSlide(
        path=path,
        width=width,
        height=height,
        mpp=float(mpp),
        level_downsamples=tuple((width / lw + height / lh) / 2 for _, lw, lh in levels),
        format=fmt,
        seed=int(seed),
    )
