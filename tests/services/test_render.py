"""Analysis rendering: QuPath GeoJSON, the PNG overlay and the written files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smartpath.client.render import (
    analysis_geojson,
    draw_analysis,
    label_colour,
    write_analysis_outputs,
)
from smartpath.v1 import common_pb2, pathology_pb2

GREY = (128, 128, 128)


def _image(width: int = 256, height: int = 200) -> np.ndarray:
    return np.full((height, width, 3), GREY, dtype=np.uint8)


def _detection() -> pathology_pb2.Analysis:
    a = pathology_pb2.Analysis(
        task=common_pb2.TASK_DETECTION,
        scale=common_pb2.SCALE_ROI,
        frame=pathology_pb2.COORDINATE_FRAME_ROI_PIXELS,
        width=256,
        height=200,
        model_version="v-test",
    )
    a.detections.add(label="mitosis", x1=40, y1=50, x2=100, y2=120)
    a.detections.add(label="lymphocyte", x1=150, y1=30, x2=200, y2=70)
    return a


def _segmentation() -> pathology_pb2.Analysis:
    a = pathology_pb2.Analysis(
        task=common_pb2.TASK_SEGMENTATION,
        scale=common_pb2.SCALE_ROI,
        frame=pathology_pb2.COORDINATE_FRAME_ROI_PIXELS,
    )
    a.polygons.add(
        label="tumour",
        points=[pathology_pb2.Point(x=x, y=y) for x, y in [(50, 40), (200, 40), (125, 150)]],
    )
    return a


def _classification() -> pathology_pb2.Analysis:
    return pathology_pb2.Analysis(
        task=common_pb2.TASK_CLASSIFICATION,
        scale=common_pb2.SCALE_WSI,
        label="adenocarcinoma",
        label_scores=[
            common_pb2.LabelScore(label="adenocarcinoma", score=0.83),
            common_pb2.LabelScore(label="normal", score=0.17),
        ],
        model_version="v-test",
    )


def _vqa() -> pathology_pb2.Analysis:
    return pathology_pb2.Analysis(
        task=common_pb2.TASK_VQA,
        scale=common_pb2.SCALE_ROI,
        answer="The tissue shows glandular structures " * 20,
        model_version="v-test",
    )


def _changed(a: Image.Image, xy: tuple[int, int]) -> bool:
    return a.getpixel(xy) != GREY


def test_geojson_detections_are_closed_rectangles() -> None:
    gj = analysis_geojson(_detection())
    assert gj["type"] == "FeatureCollection"
    assert len(gj["features"]) == 2
    first = gj["features"][0]
    assert first["type"] == "Feature"
    assert first["geometry"]["type"] == "Polygon"
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    assert {tuple(p) for p in ring} == {(40, 50), (100, 50), (100, 120), (40, 120)}
    props = first["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] == "mitosis"
    assert props["classification"]["color"] == list(label_colour("mitosis"))
    assert gj["features"][1]["properties"]["classification"]["name"] == "lymphocyte"
    json.dumps(gj)  # serialisable


def test_geojson_polygon_and_origin() -> None:
    gj = analysis_geojson(_segmentation(), origin=(1000, 2000))
    (feature,) = gj["features"]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == "tumour"
    ring = feature["geometry"]["coordinates"][0]
    assert ring == [[1050, 2040], [1200, 2040], [1125, 2150], [1050, 2040]]


def test_geojson_without_geometry_is_empty() -> None:
    for a in (_classification(), _vqa(), pathology_pb2.Analysis()):
        assert analysis_geojson(a) == {"type": "FeatureCollection", "features": []}


def test_label_colour_is_stable_and_distinct() -> None:
    assert label_colour("tumour") == label_colour("tumour")
    assert label_colour("tumour") != label_colour("stroma")
    assert all(0 <= c <= 255 for c in label_colour(""))


def test_overlay_draws_box_outlines_only() -> None:
    image = _image()
    out = draw_analysis(image, _detection())
    assert out.size == (256, 200) and out.mode == "RGB"
    assert out.getpixel((40, 85)) == label_colour("mitosis")  # left edge of box 1
    assert out.getpixel((100, 85)) == label_colour("mitosis")  # right edge
    assert not _changed(out, (70, 85))  # inside the outline
    assert not _changed(out, (20, 160))  # far away, above the caption bar
    assert _changed(out, (5, 197))  # caption bar
    assert (image == GREY).all()  # input untouched


def test_overlay_polygon_is_filled_semi_transparently() -> None:
    out = draw_analysis(_image(), _segmentation())
    inside = out.getpixel((125, 80))
    assert inside not in (GREY, label_colour("tumour"))
    assert not _changed(out, (20, 160))


def test_scale_and_offset_map_slide_coordinates() -> None:
    a = pathology_pb2.Analysis(
        task=common_pb2.TASK_DETECTION, frame=pathology_pb2.COORDINATE_FRAME_SLIDE_LEVEL0
    )
    a.detections.add(label="gland", x1=10_000, y1=12_000, x2=14_000, y2=16_000)
    # A thumbnail of a 25600-px-wide slide at 256 px: box at (100, 120)-(140, 160).
    out = draw_analysis(_image(256, 256), a, scale=256 / 25_600)
    assert out.getpixel((100, 140)) == label_colour("gland")
    assert out.getpixel((140, 140)) == label_colour("gland")
    assert not _changed(out, (120, 140))
    # A region read at 2x downsample from (9_800, 11_800): box at (100, 100)-(2100, 2100).
    out = draw_analysis(_image(256, 256), a, scale=0.5, offset=(9_800, 11_800))
    assert out.getpixel((100, 150)) == label_colour("gland")
    assert not _changed(out, (99, 150)) and not _changed(out, (150, 150))


def test_overlay_handles_empty_and_out_of_range() -> None:
    assert draw_analysis(_image(), pathology_pb2.Analysis()).size == (256, 200)
    a = _detection()
    a.detections.add(label="far", x1=-5e9, y1=1e12, x2=float("inf"), y2=float("nan"))
    a.detections.add(label="reversed", x1=300, y1=300, x2=250, y2=-40)
    a.polygons.add(label="tiny", points=[pathology_pb2.Point(x=1, y=1)])
    a.polygons.add(label="line", points=[pathology_pb2.Point(x=1, y=1), pathology_pb2.Point()])
    a.polygons.add(label="empty")
    out = draw_analysis(_image(), a)
    assert out.size == (256, 200)
    assert len(analysis_geojson(a)["features"]) == 6  # the empty polygon is dropped
    # Tiny, grey and RGBA inputs.
    draw_analysis(np.zeros((3, 3), np.uint8), _vqa())
    assert draw_analysis(np.zeros((40, 30, 4), np.uint8), _classification()).size == (30, 40)


def test_write_outputs(tmp_path: Path) -> None:
    a = _classification()
    paths = write_analysis_outputs(tmp_path / "out", "case1", _image(), a)
    assert set(paths) == {"json", "geojson", "overlay"}
    assert paths["overlay"] == tmp_path / "out" / "case1_overlay.png"
    data = json.loads(paths["json"].read_text())
    assert data["label"] == "adenocarcinoma" and data["model_version"] == "v-test"
    assert data["label_scores"][0]["score"] == pytest.approx(0.83, rel=1e-6)
    assert json.loads(paths["geojson"].read_text())["features"] == []
    with Image.open(paths["overlay"]) as png:
        assert png.size == (256, 200)

    paths = write_analysis_outputs(tmp_path, "det", None, _detection())
    assert set(paths) == {"json", "geojson"}
    assert len(json.loads(paths["geojson"].read_text())["features"]) == 2
    assert not (tmp_path / "det_overlay.png").exists()


def _evidence() -> pathology_pb2.Analysis:
    """A slide classification over a 4 x 4 grid of 1000-px tiles, weight rising to the right."""
    a = _classification()
    a.frame = pathology_pb2.COORDINATE_FRAME_SLIDE_LEVEL0
    raw = {(c, r): 1.0 + c for c in range(4) for r in range(4)}
    total = sum(raw.values())
    for (c, r), w in raw.items():
        a.evidence.add(
            rect=common_pb2.Rect(x=c * 1000, y=r * 1000, width=1000, height=1000), weight=w / total
        )
    return a


def test_overlay_draws_tile_evidence_as_a_heatmap() -> None:
    out = draw_analysis(_image(256, 256), _evidence(), scale=256 / 4000)
    least, most = out.getpixel((32, 32)), out.getpixel((224, 32))  # column 0 and column 3
    # Least weighted tiles are faintly blue, the most weighted strongly red.
    assert least[2] > least[0] and most[0] > most[2] + 60
    assert np.abs(np.subtract(least, GREY)).max() < np.abs(np.subtract(most, GREY)).max()
    # Same column, same colour; outside the tiles nothing changes.
    assert out.getpixel((224, 32)) == out.getpixel((224, 224))
    assert not _changed(draw_analysis(_image(256, 256), _classification()), (128, 128))


def test_geojson_tiles_carry_their_evidence_as_a_measurement() -> None:
    a = _evidence()
    tiles = [f for f in analysis_geojson(a)["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == 16
    by_corner = {tuple(f["geometry"]["coordinates"][0][0]): f for f in tiles}
    right = by_corner[(3000.0, 0.0)]["properties"]["measurements"]
    left = by_corner[(0.0, 0.0)]["properties"]["measurements"]
    assert right["evidence"] == pytest.approx(4 / 40) and left["evidence"] == pytest.approx(1 / 40)
    assert right["evidence (fraction of max)"] == pytest.approx(1.0)
    ring = by_corner[(3000.0, 0.0)]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and ring[2] == [4000.0, 1000.0]
