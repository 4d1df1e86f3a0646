"""Pictures and annotations of an ``Analysis``: a PNG overlay and QuPath-compatible GeoJSON.

Geometry is taken in the Analysis' own frame (ROI pixels, or slide level-0 pixels; see
``Analysis.frame``). ``draw_analysis`` maps it to image pixels with ``(coord - offset) * scale``
so that a slide analysis can be drawn on a thumbnail and a slide-region analysis on the region
image. Every label gets a stable colour (derived from a hash of its name), shared by the overlay
and the GeoJSON classification. Nothing here raises on empty results or on geometry outside
the image.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
from pathlib import Path

import numpy as np
from google.protobuf import json_format
from PIL import Image, ImageDraw, ImageFont

from smartpath.client.overlay import write_geojson
from smartpath.v1 import common_pb2, pathology_pb2

FILL_ALPHA = 80
# Evidence heatmap: blue (least) -> yellow -> red (most), ColorBrewer's RdYlBu reversed.
HEAT_STOPS = ((49, 54, 149), (254, 224, 144), (165, 0, 38))
HEAT_ALPHA = (40, 170)  # alpha of the least and the most weighted tile
CAPTION_BACKGROUND = (0, 0, 0, 170)
CAPTION_TEXT = (255, 255, 255, 255)
UNLABELLED = "unlabelled"
# Coordinates beyond this many pixels are clamped before drawing (PIL works in C ints).
_DRAW_LIMIT = 1e6

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def label_colour(label: str) -> tuple[int, int, int]:
    """A stable, saturated RGB colour for ``label`` (the same in every process and run)."""
    digest = hashlib.blake2b((label or UNLABELLED).encode(), digest_size=4).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536.0
    value = 0.75 + 0.2 * digest[2] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _feature(geometry: dict, object_type: str, label: str) -> dict:
    name = label or UNLABELLED
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": {"name": name, "color": list(label_colour(label))},
        },
    }


def _ring_geometry(points: list[list[float]]) -> dict | None:
    """Polygon (closed ring) for 3+ points, LineString for 2, Point for 1, None for none."""
    if len(points) >= 3:
        ring = [*points, points[0]] if points[0] != points[-1] else points
        if len(ring) >= 4:
            return {"type": "Polygon", "coordinates": [ring]}
        points = ring[:2]
    if len(points) == 2:
        return {"type": "LineString", "coordinates": points}
    if len(points) == 1:
        return {"type": "Point", "coordinates": points[0]}
    return None


def analysis_geojson(
    analysis: pathology_pb2.Analysis, *, origin: tuple[float, float] = (0, 0)
) -> dict:
    """The Analysis' geometry as a GeoJSON FeatureCollection that QuPath imports.

    A slide analysis' evidence becomes one ``objectType`` "tile" per tile with its weight as
    the ``evidence`` measurement (QuPath colours tiles by it: Measure > Show measurement maps).
    Detections become rectangles with ``objectType`` "detection"; polygons become annotations
    (``objectType`` "annotation") with closed rings (first point == last point). Each feature's
    ``classification`` holds the label and its colour. Coordinates are the Analysis' own (ROI
    pixels or slide level-0 pixels, per ``analysis.frame``) plus ``origin`` (x, y): e.g. pass a
    region's top-left to place ROI-pixel results in slide coordinates. Results without geometry
    (classification, VQA, or nothing found) give a plain FeatureCollection with no features.
    """
    ox, oy = float(origin[0]), float(origin[1])
    features = []
    top = max((e.weight for e in analysis.evidence), default=0.0)
    for e in analysis.evidence:
        x1, y1 = e.rect.x + ox, e.rect.y + oy
        x2, y2 = x1 + e.rect.width, y1 + e.rect.height
        ring = [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": "evidence",
                    "measurements": {
                        "evidence": e.weight,
                        "evidence (fraction of max)": e.weight / top if top > 0 else 0.0,
                    },
                },
            }
        )
    for d in analysis.detections:
        x1, x2 = sorted((d.x1 + ox, d.x2 + ox))
        y1, y2 = sorted((d.y1 + oy, d.y2 + oy))
        ring = [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]
        features.append(_feature({"type": "Polygon", "coordinates": [ring]}, "detection", d.label))
    for polygon in analysis.polygons:
        geometry = _ring_geometry([[p.x + ox, p.y + oy] for p in polygon.points])
        if geometry is not None:
            features.append(_feature(geometry, "annotation", polygon.label))
    return {"type": "FeatureCollection", "features": features}


def _enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _caption(analysis: pathology_pb2.Analysis) -> str:
    parts = [
        f"{_enum_name(common_pb2.Task, analysis.task, 'TASK_')}"
        f" ({_enum_name(common_pb2.Scale, analysis.scale, 'SCALE_')})"
    ]
    if analysis.task == common_pb2.TASK_VQA and analysis.answer:
        parts.append(" ".join(analysis.answer.split()))
    elif analysis.label:
        scores = {s.label: s.score for s in analysis.label_scores}
        score = scores.get(analysis.label)
        parts.append(analysis.label + (f" {score:.2f}" if score is not None else ""))
    elif analysis.task == common_pb2.TASK_DETECTION:
        parts.append(f"{len(analysis.detections)} detections")
    elif analysis.task == common_pb2.TASK_SEGMENTATION:
        parts.append(f"{len(analysis.polygons)} regions")
    elif analysis.answer:
        parts.append(" ".join(analysis.answer.split()))
    if analysis.parse_error:
        parts.append(f"unparsed: {analysis.parse_error}")
    if analysis.model_version:
        parts.append(analysis.model_version)
    return " | ".join(parts)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: float) -> str:
    """``text`` truncated with "..." to at most ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..."


def _safe_text(text: str, font: Font) -> str:
    # PIL's bitmap fallback font only encodes Latin-1.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _contrast(colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    r, g, b = colour
    return (0, 0, 0, 255) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255, 255)


def _tag(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    colour: tuple[int, int, int],
    font: Font,
    size: tuple[int, int],
) -> None:
    """A label in a filled box just above ``xy`` (below it at the top edge), kept in view."""
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 2
    x = min(max(xy[0], 0.0), max(size[0] - w, 0))
    y = xy[1] - h if xy[1] - h >= 0 else xy[1]
    y = min(max(y, 0.0), max(size[1] - h, 0))
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(*colour, 255))
    draw.text((x + 2 - left, y + 1 - top), text, fill=_contrast(colour), font=font)


def heat_colour(level: float) -> tuple[int, int, int, int]:
    """The heatmap's RGBA for ``level`` in [0, 1] (clamped): blue, yellow, red."""
    level = min(max(level, 0.0), 1.0)
    half = 0 if level < 0.5 else 1
    t = level * 2 - half
    a, b = HEAT_STOPS[half], HEAT_STOPS[half + 1]
    rgb = tuple(round(u + (v - u) * t) for u, v in zip(a, b, strict=True))
    alpha = round(HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * level)
    return (*rgb, alpha)


def draw_analysis(
    image: np.ndarray,
    analysis: pathology_pb2.Analysis,
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> Image.Image:
    """``image`` (RGB, RGBA or grey) with the Analysis drawn over it, same size, RGB.

    A slide analysis' tile evidence is a heatmap under everything else (:func:`heat_colour`
    of each weight, scaled from the smallest to the largest). Boxes are outlined, polygons
    filled semi-transparently and outlined, each with its label; a caption bar along the
    bottom gives the task, the label (with its score when ``label_scores`` has it) or the
    VQA answer (truncated to fit), and the model version.
    Analysis coordinates map to image pixels as ``(coord - offset) * scale``.
    """
    base = Image.fromarray(np.ascontiguousarray(image)).convert("RGBA")
    size = base.size
    font = ImageFont.load_default()
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    fill_layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    fill_draw = ImageDraw.Draw(fill_layer)
    ox, oy = float(offset[0]), float(offset[1])
    line = max(1, round(min(size) / 256))

    def to_px(x: float, y: float) -> tuple[float, float] | None:
        px, py = (x - ox) * scale, (y - oy) * scale
        if not (math.isfinite(px) and math.isfinite(py)):
            return None
        return (min(max(px, -_DRAW_LIMIT), _DRAW_LIMIT), min(max(py, -_DRAW_LIMIT), _DRAW_LIMIT))

    weights = [e.weight for e in analysis.evidence]
    low, span = min(weights, default=0.0), max(weights, default=0.0) - min(weights, default=0.0)
    heat = Image.new("RGBA", size, (0, 0, 0, 0))
    heat_draw = ImageDraw.Draw(heat)
    for e in analysis.evidence:
        a = to_px(e.rect.x, e.rect.y)
        b = to_px(e.rect.x + e.rect.width, e.rect.y + e.rect.height)
        if a is not None and b is not None:
            # Whole pixels, each tile ending where the next begins: no overlaps, no gaps.
            x0, y0, x1, y1 = (round(v) for v in (*a, *b))
            level = (e.weight - low) / span if span > 0 else 0.0
            heat_draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], fill=heat_colour(level))
    tags: list[tuple[tuple[float, float], str, tuple[int, int, int]]] = []
    for d in analysis.detections:
        a, b = to_px(d.x1, d.y1), to_px(d.x2, d.y2)
        if a is None or b is None:
            continue
        x1, x2 = sorted((a[0], b[0]))
        y1, y2 = sorted((a[1], b[1]))
        colour = label_colour(d.label)
        draw.rectangle([x1, y1, x2, y2], outline=(*colour, 255), width=line)
        tags.append(((x1, y1), d.label, colour))
    for polygon in analysis.polygons:
        points = [p for p in (to_px(q.x, q.y) for q in polygon.points) if p is not None]
        if not points:
            continue
        colour = label_colour(polygon.label)
        if len(points) >= 3:
            fill_draw.polygon(points, fill=(*colour, FILL_ALPHA))
            draw.line([*points, points[0]], fill=(*colour, 255), width=line, joint="curve")
        elif len(points) == 2:
            draw.line(points, fill=(*colour, 255), width=line)
        else:
            (x, y) = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(*colour, 255))
        top = min(points, key=lambda p: (p[1], p[0]))
        tags.append((top, polygon.label, colour))
    for xy, label, colour in tags:
        _tag(draw, xy, _safe_text(label, font), colour, font, size)

    caption = _safe_text(_caption(analysis), font)
    _, top, _, bottom = draw.textbbox((0, 0), "Ag" + caption, font=font)
    bar = min(bottom - top + 6, size[1])
    draw.rectangle([0, size[1] - bar, size[0], size[1]], fill=CAPTION_BACKGROUND)
    text = _fit(draw, caption, font, size[0] - 8)
    draw.text((4, size[1] - bar + 3 - top), text, fill=CAPTION_TEXT, font=font)

    out = Image.alpha_composite(Image.alpha_composite(base, heat), fill_layer)
    out = Image.alpha_composite(out, layer)
    return out.convert("RGB")


def write_analysis_outputs(
    out_dir: Path,
    stem: str,
    image: np.ndarray | None,
    analysis: pathology_pb2.Analysis,
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Path]:
    """Write ``{stem}.json`` (the Analysis), ``{stem}.geojson`` and, when ``image`` is given,
    ``{stem}_overlay.png`` into ``out_dir``; return their paths by kind ("json", "geojson",
    "overlay"). ``scale``/``offset`` are as in ``draw_analysis``; the GeoJSON keeps the
    Analysis' own coordinates."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "geojson": out_dir / f"{stem}.geojson"}
    paths["json"].write_text(json_format.MessageToJson(analysis, preserving_proto_field_name=True))
    write_geojson(paths["geojson"], analysis_geojson(analysis))
    if image is not None:
        paths["overlay"] = out_dir / f"{stem}_overlay.png"
        draw_analysis(image, analysis, scale=scale, offset=offset).save(paths["overlay"])
    return paths
