"""Coordinate transforms between ROI pixels, the model's 0–1000 space and slide level-0 pixels.

Coordinates are continuous: ``(0, 0)`` is the top-left corner of the top-left pixel and
``(width, height)`` the bottom-right corner of the bottom-right pixel, so the whole ROI (or slide
region) maps onto ``[0, 1000] × [0, 1000]``. Points are arrays of shape ``(..., 2)`` as ``(x, y)``;
boxes are ``(..., 4)`` as ``(x1, y1, x2, y2)``. Everything is float64 and vectorised.

Clipping: transforms *into* the 0–1000 space clip to ``[0, 1000]`` by default (``clip=False`` to
keep points outside the ROI/region), because the model's space is bounded. Transforms *out of*
it never clip: parsed answers are already within range, and other inputs map linearly.
Non-finite inputs and non-positive sizes raise ValueError.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike

from smartpath.model.grammar import NORM_MAX

__all__ = [
    "NORM_MAX",
    "Region",
    "box_norm_to_roi",
    "box_norm_to_slide",
    "box_roi_to_norm",
    "box_slide_to_norm",
    "norm_to_roi",
    "norm_to_slide",
    "roi_to_norm",
    "slide_to_norm",
]


class RectLike(Protocol):
    """Anything with ``x, y, width, height`` (e.g. ``smartpath.v1.common_pb2.Rect``)."""

    x: Any
    y: Any
    width: Any
    height: Any


Region = tuple[float, float, float, float] | RectLike


def _points(points: ArrayLike, last: int = 2, what: str = "points") -> np.ndarray:
    a = np.asarray(points, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] != last:
        raise ValueError(f"{what} must have shape (..., {last}), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contain non-finite values")
    return a


def _size(width: float, height: float) -> np.ndarray:
    size = np.array([width, height], dtype=np.float64)
    if not (np.all(np.isfinite(size)) and np.all(size > 0)):
        raise ValueError(f"width and height must be finite and > 0, got {width!r} x {height!r}")
    return size


def _region(region: Region) -> tuple[np.ndarray, np.ndarray]:
    """(origin, size) of a region given as ``(x, y, w, h)`` or a Rect-like object."""
    if hasattr(region, "width"):
        x, y, w, h = region.x, region.y, region.width, region.height  # type: ignore[union-attr]
    else:
        x, y, w, h = region  # type: ignore[misc]
    origin = np.array([x, y], dtype=np.float64)
    if not np.all(np.isfinite(origin)):
        raise ValueError(f"region origin must be finite, got ({x!r}, {y!r})")
    return origin, _size(w, h)


def _maybe_clip(a: np.ndarray, clip: bool) -> np.ndarray:
    return np.clip(a, 0.0, NORM_MAX, out=a) if clip else a


def roi_to_norm(points: ArrayLike, width: float, height: float, *, clip: bool = True) -> np.ndarray:
    """ROI pixel ``(x, y)`` → 0–1000 space."""
    return _maybe_clip(_points(points) / _size(width, height) * NORM_MAX, clip)


def norm_to_roi(points: ArrayLike, width: float, height: float) -> np.ndarray:
    """0–1000 space → ROI pixel ``(x, y)`` (no clipping)."""
    return _points(points) / NORM_MAX * _size(width, height)


def slide_to_norm(points: ArrayLike, region: Region, *, clip: bool = True) -> np.ndarray:
    """Slide level-0 pixel ``(x, y)`` → 0–1000 space of ``region`` (level-0 ``x, y, w, h``)."""
    origin, size = _region(region)
    return _maybe_clip((_points(points) - origin) / size * NORM_MAX, clip)


def norm_to_slide(points: ArrayLike, region: Region) -> np.ndarray:
    """0–1000 space of ``region`` (level-0 ``x, y, w, h``) → slide level-0 pixels (no clipping)."""
    origin, size = _region(region)
    return origin + _points(points) / NORM_MAX * size


def _box_map(boxes: ArrayLike, fn: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    b = _points(boxes, 4, "boxes")
    corners = fn(b.reshape(*b.shape[:-1], 2, 2), *args, **kwargs)
    return corners.reshape(b.shape)


def box_roi_to_norm(
    boxes: ArrayLike, width: float, height: float, *, clip: bool = True
) -> np.ndarray:
    """ROI pixel boxes ``(x1, y1, x2, y2)`` → 0–1000 space."""
    return _box_map(boxes, roi_to_norm, width, height, clip=clip)


def box_norm_to_roi(boxes: ArrayLike, width: float, height: float) -> np.ndarray:
    """0–1000 boxes → ROI pixel boxes (no clipping)."""
    return _box_map(boxes, norm_to_roi, width, height)


def box_slide_to_norm(boxes: ArrayLike, region: Region, *, clip: bool = True) -> np.ndarray:
    """Slide level-0 boxes → 0–1000 space of ``region``."""
    return _box_map(boxes, slide_to_norm, region, clip=clip)


def box_norm_to_slide(boxes: ArrayLike, region: Region) -> np.ndarray:
    """0–1000 boxes of ``region`` → slide level-0 boxes (no clipping)."""
    return _box_map(boxes, norm_to_slide, region)
