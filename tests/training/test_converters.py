"""Converters from ImageFolder, COCO, mask folders and VQA JSON into manifest samples."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smartpath.model.coords import norm_to_roi
from smartpath.model.grammar import (
    DetectionAnswer,
    LabelAnswer,
    SegmentationAnswer,
    Task,
    TextAnswer,
    format_answer,
    format_completion,
    parse_answer,
    polygon_area,
)
from smartpath.training.converters import (
    from_coco,
    from_image_folder,
    from_mask_folder,
    from_vqa_json,
    hash_split,
    mask_to_polygons,
)
from smartpath.training.manifest import (
    RoiSample,
    load_roi_image,
    read_manifest,
    resolve_ref,
    sample_task,
    write_manifest,
)


def save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def rgb(h: int, w: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def parsed(sample: RoiSample) -> object:
    """The target parsed exactly as a reward would parse a completion."""
    return parse_answer(
        sample_task(sample),
        format_completion("", sample.target),
        sample.labels,
        options=sample.options,
    )


def rasterise(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centres lie inside the polygon (even-odd rule)."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    inside = np.zeros((height, width), dtype=bool)
    for (x1, y1), (x2, y2) in zip(points, np.roll(points, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > yy) != (y2 > yy)
        x_at = x1 + (yy - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xx < x_at)
    return inside


# ---------------------------------------------------------------------------------------------
# Splits


def test_hash_split_is_deterministic_and_follows_fractions() -> None:
    keys = [f"img_{i}.png" for i in range(3000)]
    splits = [hash_split(k) for k in keys]
    assert splits == [hash_split(k) for k in keys]
    counts = Counter(splits)
    assert 0.76 < counts["train"] / 3000 < 0.84
    assert 0.07 < counts["val"] / 3000 < 0.13
    assert 0.07 < counts["test"] / 3000 < 0.13
    assert {hash_split(k, (0.0, 0.0, 1.0)) for k in keys[:200]} == {"test"}
    with pytest.raises(ValueError, match="summing to 1"):
        hash_split("a", (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="three non-negative"):
        hash_split("a", (0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# ImageFolder


def make_image_folder(root: Path) -> None:
    for cls, value in (("tumor", 200), ("benign", 50)):
        for i in range(4):
            save(root / cls / f"{cls}_{i}.png", rgb(8, 10, value + i))
    (root / "benign" / "notes.txt").write_text("not an image")


def test_from_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "data" / "folder"
    make_image_folder(root)
    manifest = tmp_path / "data" / "manifest.jsonl"
    got = from_image_folder(root, manifest_dir=manifest.parent, fractions=(0.5, 0.25, 0.25))
    assert len(got) == 8
    assert all(s.labels == ["benign", "tumor"] for s in got)
    assert all(s.task == "classification" for s in got)
    assert all(not Path(s.image).is_absolute() for s in got)
    assert {s.split for s in got} <= {"train", "val", "test"}
    for s in got:
        cls = Path(s.image).parent.name
        assert parsed(s) == LabelAnswer(cls)
        expected = 200 if cls == "tumor" else 50
        assert load_roi_image(s, manifest)[0, 0, 0] == expected + int(Path(s.image).stem[-1])

    write_manifest(got, manifest)
    assert read_manifest(manifest) == got

    # Splits depend on the path within the dataset only, not on where the dataset lives.
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    again = from_image_folder(moved, fractions=(0.5, 0.25, 0.25))
    assert [s.split for s in again] == [s.split for s in got]
    assert all(Path(s.image).is_absolute() and Path(s.image).is_file() for s in again)
    all_train = from_image_folder(root, fractions=(1.0, 0.0, 0.0))
    assert {s.split for s in all_train} == {"train"}


def test_from_image_folder_without_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no class folders"):
        from_image_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# COCO


def test_from_coco(tmp_path: Path) -> None:
    images = tmp_path / "images"
    save(images / "a.png", rgb(100, 200, 10))
    save(images / "b.png", rgb(50, 50, 20))
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
            {"id": 2, "file_name": "b.png"},  # size read from the image
        ],
        "categories": [{"id": 7, "name": "mitosis"}, {"id": 3, "name": "nucleus"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [20, 10, 40, 30]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 200, 100]},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 10], "iscrowd": 1},
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [50, 50, 0, 10]},  # degenerate
        ],
    }
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps(coco))
    got = from_coco(ann, images, manifest_dir=tmp_path)
    assert [s.id for s in got] == ["coco:1", "coco:2"]
    assert all(s.labels == ["nucleus", "mitosis"] for s in got)  # category-id order
    a, b = (parsed(s) for s in got)
    assert isinstance(a, DetectionAnswer) and isinstance(b, DetectionAnswer)
    assert a.labels() == ["nucleus", "mitosis"]
    np.testing.assert_allclose(a.boxes(), [[100, 100, 300, 400], [0, 0, 1000, 1000]])
    assert b.detections == ()
    assert got[1].target == "[]"
    assert resolve_ref(got[0].image, tmp_path / "m.jsonl") == images / "a.png"


def test_from_coco_unknown_category(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5]}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="unknown category 2"):
        from_coco(tmp_path / "c.json", tmp_path)


# ---------------------------------------------------------------------------------------------
# Masks


def square_and_disk(h: int = 120, w: int = 160) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[10:40, 15:55] = 1  # a 40 x 30 rectangle of class 1
    yy, xx = np.mgrid[:h, :w]
    mask[(xx - 110) ** 2 + (yy - 70) ** 2 <= 35**2] = 2  # a disk of class 2
    return mask


def test_mask_polygons_match_mask_area() -> None:
    mask = square_and_disk()
    polys = mask_to_polygons(mask, ["stroma", "gland"], max_points=64)
    assert [p.label for p in polys] == ["stroma", "gland"]
    for k, poly in enumerate(polys, start=1):
        assert 3 <= len(poly.points) <= 64
        px = norm_to_roi(poly.array(), 160, 120)
        truth = mask == k
        raster = rasterise(px, 120, 160)
        assert abs(raster.sum() - truth.sum()) / truth.sum() < 0.03
        assert abs(polygon_area([tuple(p) for p in px]) - truth.sum()) / truth.sum() < 0.03
        iou = (raster & truth).sum() / (raster | truth).sum()
        assert iou > 0.95
    square = norm_to_roi(polys[0].array(), 160, 120)
    corners = [(15, 10), (15, 40), (55, 10), (55, 40)]  # rounding to 0.1 in 0–1000 space
    np.testing.assert_allclose(sorted(map(tuple, square)), corners, atol=0.02)


def test_mask_polygons_diagonal_touch_and_small_components() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:6, 2:6] = 1
    mask[6:10, 6:10] = 1  # touches the first block at one corner: one 8-connected component
    mask[15, 15] = 1  # one pixel, below min_area
    polys = mask_to_polygons(mask, ["a"], min_area=4)
    assert len(polys) == 1
    px = norm_to_roi(polys[0].array(), 20, 20)
    assert polygon_area([tuple(p) for p in px]) == pytest.approx(32)
    text = format_completion("", format_answer(SegmentationAnswer(tuple(polys))))
    assert parse_answer(Task.SEGMENTATION, text) == SegmentationAnswer(tuple(polys))
    assert len(mask_to_polygons(mask, ["a"], min_area=1)) == 2


def test_from_mask_folder(tmp_path: Path) -> None:
    mask = square_and_disk()
    save(tmp_path / "img" / "x.png", rgb(120, 160, 128))
    save(tmp_path / "img" / "empty.jpg", rgb(120, 160, 128))
    save(tmp_path / "img" / "unlabelled.png", rgb(120, 160, 128))
    save(tmp_path / "masks" / "x.png", mask)
    save(tmp_path / "masks" / "empty.png", np.zeros((120, 160), dtype=np.uint8))
    got = from_mask_folder(
        tmp_path / "img", tmp_path / "masks", ["stroma", "gland"], manifest_dir=tmp_path
    )
    assert [s.id for s in got] == ["masks:empty.jpg", "masks:x.png"]
    empty, full = (parsed(s) for s in got)
    assert empty == SegmentationAnswer(())
    assert isinstance(full, SegmentationAnswer)
    assert sorted(p.label for p in full.polygons) == ["gland", "stroma"]
    write_manifest(got, tmp_path / "m.jsonl")
    assert read_manifest(tmp_path / "m.jsonl") == got

    save(tmp_path / "masks" / "unlabelled.png", np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="its image is"):
        from_mask_folder(tmp_path / "img", tmp_path / "masks", ["stroma", "gland"])


# ---------------------------------------------------------------------------------------------
# VQA


def test_from_vqa_json(tmp_path: Path) -> None:
    save(tmp_path / "imgs" / "a.png", rgb(8, 8, 1))
    items = [
        {"image": "a.png", "question": "Tumour present?", "answer": "B", "options": ["yes", "no"]},
        {
            "image": "a.png",
            "question": "Which grade?",
            "answer": "grade 2.",
            "options": ["grade 1", "Grade 2"],
        },
        {"image": "a.png", "question": "Describe.", "answer": "  Dense infiltrate. ", "id": "q9"},
        {"image": "a.png", "question": "Again?", "answer": "x", "split": "test"},
    ]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(items))
    got = from_vqa_json(path, tmp_path / "imgs", manifest_dir=tmp_path)
    assert [s.target for s in got] == ["no", "Grade 2", "Dense infiltrate.", "x"]
    assert [s.options is not None for s in got] == [True, True, False, False]
    assert [s.id for s in got] == ["vqa:0", "vqa:1", "q9", "vqa:3"]
    assert got[0].prompt == "Tumour present?"
    assert got[3].split == "test"
    assert [parsed(s) for s in got] == [
        TextAnswer("no"),
        TextAnswer("Grade 2"),
        TextAnswer("Dense infiltrate."),
        TextAnswer("x"),
    ]
    assert load_roi_image(got[0], tmp_path / "m.jsonl").shape == (8, 8, 3)

    path.write_text(json.dumps([{**items[0], "answer": "maybe"}]))
    with pytest.raises(ValueError, match="item 0"):
        from_vqa_json(path, tmp_path / "imgs")
    path.write_text(json.dumps([{"image": "a.png", "answer": "x"}]))
    with pytest.raises(ValueError, match="needs 'image', 'question' and 'answer'"):
        from_vqa_json(path, tmp_path / "imgs")
