"""Pictures and annotations of a tile plan: a PNG overlay and QuPath-compatible GeoJSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from smartpath.core.slides.tissue import outline

TISSUE_TINT = (0, 170, 90)
TILE_COLOUR = (20, 60, 220)


def draw_plan_overlay(
    thumbnail: np.ndarray,
    thumbnail_downsample: float,
    tissue_mask: np.ndarray,
    tiles_xy: Sequence[tuple[int, int]],
    footprint: float,
) -> Image.Image:
    """Thumbnail with tissue tinted green (outlined) and every planned tile drawn as a box.

    ``thumbnail_downsample`` is level-0 px per thumbnail px; tile corners are level-0 px.
    """
    base = Image.fromarray(thumbnail).convert("RGB")
    mask = Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize(base.size, Image.NEAREST)
    tint = Image.new("RGB", base.size, TISSUE_TINT)
    image = Image.composite(Image.blend(base, tint, 0.2), base, mask)
    edge = outline(np.asarray(mask) > 0)
    pixels = np.asarray(image).copy()
    pixels[edge] = TISSUE_TINT
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    side = footprint / thumbnail_downsample
    for x, y in tiles_xy:
        x0, y0 = x / thumbnail_downsample, y / thumbnail_downsample
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], outline=TILE_COLOUR, width=1)
    return image


def plan_geojson(
    tiles_xy: Sequence[tuple[int, int]], footprint: float, tissue_fractions: Sequence[float]
) -> dict:
    """Tiles as a GeoJSON FeatureCollection in level-0 pixels, importable into QuPath."""
    features = []
    for (x, y), fraction in zip(tiles_xy, tissue_fractions, strict=True):
        x1, y1 = x + footprint, y + footprint
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "classification": {"name": "Tissue tile", "color": list(TILE_COLOUR)},
                    "measurements": {"tissue_fraction": round(float(fraction), 4)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, collection: dict) -> None:
    """Write a GeoJSON collection."""
    path.write_text(json.dumps(collection))
