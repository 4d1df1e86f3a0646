"""Tissue detection on a low-resolution thumbnail.

Saturation separates stained tissue from glass far better than brightness. Otsu's threshold
is taken on log-saturation: glass sits near 0.01 and pale eosin near 0.2, purple nuclei near
0.4, so in linear units Otsu tends to split pale from dark tissue instead of tissue from
glass. A floor keeps near-grey glass, dust and shadows out, morphology
closes gaps, and area filters (in µm², so they mean the same at any thumbnail scale) drop
specks and fill small holes.

Adipose tissue is the exception: fat vacuoles are empty and their membranes thin, so at
thumbnail scale fat reads as a faint tint (saturation ~0.03-0.06), below Otsu's split though
well above glass. A single threshold loses the fat at tissue borders, which biases every
"how much of the tissue is X" answer against fat (on the demo slides it and a 20,000 µm²
fragment floor lost 17% of the tissue tiles, at twice the fat share of the kept ones). So
the threshold is a hysteresis pair, as in scikit-image's ``apply_hysteresis_threshold``:
pixels above ``PALE_SATURATION`` are tissue when their connected region holds a pixel above
Otsu's threshold; faint regions touching no confidently stained tissue (tinted glass,
smudges) stay glass.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_SATURATION = 0.06  # below this a pixel is glass, whatever Otsu says
MAX_BRIGHTNESS = 0.98  # near-white pixels are glass even if slightly tinted
PALE_SATURATION = 0.03  # hysteresis low threshold: pale tissue (fat) joined to stained tissue


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image, shape (H, W)."""
    rgb = rgb.astype(np.float32)
    vmax = rgb.max(axis=-1)
    vmin = rgb.min(axis=-1)
    return np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1), 0.0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1 + int(np.argmax(between))])  # class 0 is every bin up to here


def log_otsu_threshold(sat: np.ndarray, floor: float = 0.01) -> float:
    """Otsu's threshold of saturation computed on log10(sat + floor), returned in sat units."""
    lo, hi = np.log10(floor), np.log10(1.0 + floor)
    t = otsu_threshold((np.log10(sat + floor) - lo) / (hi - lo))
    return float(10 ** (lo + t * (hi - lo)) - floor)


def detect_tissue(
    rgb: np.ndarray,
    *,
    um_per_px: float,
    min_area_um2: float,
    max_hole_area_um2: float,
) -> np.ndarray:
    """Boolean tissue mask (H, W) of an RGB thumbnail whose pixels are ``um_per_px`` wide."""
    sat = saturation(rgb)
    bright = rgb.max(axis=-1) / 255.0
    candidates = sat[bright < MAX_BRIGHTNESS]
    if candidates.size == 0 or candidates.max() < MIN_SATURATION:
        return np.zeros(sat.shape, dtype=bool)
    threshold = max(log_otsu_threshold(sat), MIN_SATURATION)
    mask = _hysteresis(np.where(bright < MAX_BRIGHTNESS, sat, 0.0), PALE_SATURATION, threshold)

    px_area = um_per_px**2
    radius = max(1, min(3, round(20.0 / um_per_px)))  # ~20 µm, a few px at thumbnail scale
    structure = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), radius)
    mask = ndimage.binary_closing(mask, structure=structure, border_value=0)
    mask = ndimage.binary_opening(mask, structure=structure)

    labels, n = ndimage.label(mask)
    if n:
        areas = np.bincount(labels.ravel())[1:] * px_area
        keep = np.concatenate([[False], areas >= min_area_um2])
        mask = keep[labels]

    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)
    if n:
        areas = np.bincount(labels.ravel())[1:] * px_area
        small = np.concatenate([[False], areas < max_hole_area_um2])
        mask |= small[labels]
    return mask


def _hysteresis(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Pixels above ``low`` whose 8-connected region holds a pixel above ``high``."""
    labels, n = ndimage.label(values > low, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(n + 1, dtype=bool)
    keep[labels[values > high]] = True
    keep[0] = False
    return keep[labels]


def tile_fractions(
    mask: np.ndarray, mask_downsample: float, xs: np.ndarray, ys: np.ndarray, footprint: float
) -> np.ndarray:
    """Fraction of tissue in each square tile (level-0 x, y, edge ``footprint``), float32.

    Uses a summed-area table, so the cost is O(1) per tile. Parts of a tile outside the mask
    count as glass.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.round(xs / mask_downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.round(ys / mask_downsample).astype(np.int64), 0, h)
    side = max(1, round(footprint / mask_downsample))
    x1 = np.clip(np.round(xs / mask_downsample).astype(np.int64) + side, 0, w)
    y1 = np.clip(np.round(ys / mask_downsample).astype(np.int64) + side, 0, h)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (total / float(side * side)).astype(np.float32)


def outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a boolean mask."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)
