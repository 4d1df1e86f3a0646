"""Tests of the synthetic ROI generator and the ROI / WSI dataset writers."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image, ImageDraw

from smartpath.model.grammar import (
    DetectionAnswer,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    format_completion,
    parse_answer,
)
from smartpath.training.synthetic.dataset import (
    WSI_CLASSES,
    assign_splits,
    generate_roi_dataset,
    generate_wsi_dataset,
)
from smartpath.training.synthetic.roi import (
    COUNT_OPTIONS,
    NUCLEUS_LABELS,
    TISSUE_CLASSES,
    count_option,
    generate_roi_samples,
    make_roi_sample,
    render_roi,
)

ROI_FIELDS = {"id", "scale", "image", "task", "prompt", "labels", "options", "target", "split"}
WSI_FIELDS = {"id", "scale", "slide", "task", "prompt", "labels", "options", "target", "split"}


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


@pytest.mark.parametrize("task", [Task.CLASSIFICATION, Task.DETECTION, Task.SEGMENTATION, Task.VQA])
def test_deterministic_per_seed(task: Task) -> None:
    a = make_roi_sample(task, seed=11, index=3)
    b = make_roi_sample(task, seed=11, index=3)
    c = make_roi_sample(task, seed=12, index=3)
    assert np.array_equal(a.image, b.image)
    assert a.target_text == b.target_text and a.prompt == b.prompt
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint8 and a.image.ndim == 3 and a.image.shape[2] == 3
    assert 224 <= a.image.shape[0] <= 448 and a.image.shape[0] == a.image.shape[1]
    assert a.scale == "roi" and a.task is task


def test_other_index_differs() -> None:
    a = make_roi_sample(Task.CLASSIFICATION, seed=1, index=0, tissue_class="stroma", size=224)
    b = make_roi_sample(Task.CLASSIFICATION, seed=1, index=1, tissue_class="stroma", size=224)
    assert not np.array_equal(a.image, b.image)


@pytest.mark.parametrize("cls", TISSUE_CLASSES)
def test_boxes_lie_on_nuclei(cls: str) -> None:
    s = make_roi_sample(Task.DETECTION, seed=5, index=0, tissue_class=cls)
    assert isinstance(s.target, DetectionAnswer)
    dets = s.target.detections
    assert len(dets) >= 5
    assert {d.label for d in dets} <= set(NUCLEUS_LABELS)
    h, w = s.image.shape[:2]
    luma = _luma(s.image)
    in_box = np.zeros((h, w), dtype=bool)
    centre_dark = 0
    bg = float(np.median(luma))
    for d in dets:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
        c0, c1 = int(x1 / 1000 * w), int(np.ceil(x2 / 1000 * w))
        r0, r1 = int(y1 / 1000 * h), int(np.ceil(y2 / 1000 * h))
        in_box[r0:r1, c0:c1] = True
        cx, cy = int((x1 + x2) / 2000 * w), int((y1 + y2) / 2000 * h)
        centre_dark += luma[min(cy, h - 1), min(cx, w - 1)] < bg - 20
    assert centre_dark >= 0.9 * len(dets)
    if (~in_box).sum() > 0.1 * h * w:
        assert luma[in_box].mean() < luma[~in_box].mean() - 15
    # Boxes are purple-ish: blue over green rises inside them.
    img = s.image.astype(np.float64)
    purple = img[..., 2] - img[..., 1]
    assert purple[in_box].mean() > purple[~in_box].mean()


def test_boxes_fail_when_shifted() -> None:
    """The box check above can fail: boxes moved by half a box no longer sit on nuclei."""
    s = make_roi_sample(Task.DETECTION, seed=5, index=0, tissue_class="stroma")
    h, w = s.image.shape[:2]
    luma = _luma(s.image)
    bg = float(np.median(luma))
    hits = 0
    for d in s.target.detections:
        x1, y1, x2, y2 = d.box
        cx = min(w - 1, int(((x1 + x2) / 2 + 40) / 1000 * w))
        cy = min(h - 1, int(((y1 + y2) / 2 + 40) / 1000 * h))
        hits += luma[cy, cx] < bg - 20
    assert hits < 0.5 * len(s.target.detections)


@pytest.mark.parametrize("cls", ["normal gland", "tumour"])
def test_polygons_cover_region_masks(cls: str) -> None:
    for index in range(3):
        s = make_roi_sample(Task.SEGMENTATION, seed=9, index=index, tissue_class=cls)
        assert isinstance(s.target, SegmentationAnswer)
        regions = s.scene.regions
        assert len(regions) >= 1 and len(s.target.polygons) == len(regions)
        h, w = s.image.shape[:2]
        for poly, reg in zip(s.target.polygons, regions, strict=True):
            assert poly.label == ("gland" if cls == "normal gland" else "tumour")
            canvas = Image.new("1", (w, h), 0)
            pts = [(x / 1000 * w, y / 1000 * h) for x, y in poly.points]
            ImageDraw.Draw(canvas).polygon(pts, fill=1)
            raster = np.asarray(canvas, dtype=bool)
            iou = (raster & reg.mask).sum() / (raster | reg.mask).sum()
            assert iou > 0.8, iou


def test_segmentation_negatives_are_empty() -> None:
    s = make_roi_sample(Task.SEGMENTATION, seed=2, index=0, tissue_class="stroma")
    assert s.target_text == "[]"


def test_class_balance() -> None:
    samples = list(generate_roi_samples(Task.CLASSIFICATION, 25, seed=4))
    counts = Counter(s.tissue_class for s in samples)
    assert set(counts) == set(TISSUE_CLASSES)
    assert set(counts.values()) == {5}
    assert all(s.target_text == s.tissue_class for s in samples)


def _prompt_without_options(prompt: str, options: tuple[str, ...] | None) -> str:
    lines = prompt.splitlines()
    if options:
        lines = [ln for ln in lines if not re.fullmatch(r"[A-Z]\. .*", ln)]
    return "\n".join(lines)


@pytest.mark.parametrize("kind", ["presence", "dominant", "count", "describe"])
def test_vqa_prompt_does_not_leak_answer(kind: str) -> None:
    answers = Counter()
    for index in range(12):
        cls = TISSUE_CLASSES[index % len(TISSUE_CLASSES)]
        s = make_roi_sample(Task.VQA, seed=8, index=index, tissue_class=cls, vqa_kind=kind)
        assert isinstance(s.target, TextAnswer)
        answers[s.target_text] += 1
        rest = _prompt_without_options(s.prompt, s.options)
        pattern = r"(?<![\w-])" + re.escape(s.target_text) + r"(?![\w-])"
        assert re.search(pattern, rest, flags=re.IGNORECASE) is None, (s.target_text, rest)
        if s.options is not None:
            assert s.target_text in s.options
            assert s.question is not None and s.question in s.prompt
        else:
            assert kind == "describe"
    assert len(answers) >= 2  # the answer varies with the image


def test_leak_check_can_fail() -> None:
    prompt = "Question: Is necrosis present?\nOptions:\nA. yes\nB. no\nAnswer yes or no."
    rest = _prompt_without_options(prompt, ("yes", "no"))
    assert re.search(r"(?<![\w-])yes(?![\w-])", rest) is not None


def test_count_answer_follows_the_scene() -> None:
    def answer(cls: str, index: int) -> str:
        s = make_roi_sample(
            Task.VQA, seed=1, index=index, tissue_class=cls, vqa_kind="count", size=224
        )
        assert s.options == COUNT_OPTIONS
        n = len(make_roi_sample(Task.DETECTION, 0, 0, tissue_class=cls).target.detections)
        assert n > 0
        return s.target_text

    assert {answer("lymphocyte-rich", i) for i in range(3)} == {"more than 120"}
    assert {answer("stroma", i) for i in range(3)} <= {"0-20", "21-60"}
    assert count_option(0) == "0-20" and count_option(61) == "61-120"
    assert count_option(200) == "more than 120"


def test_mean_colour_alone_does_not_solve_classification() -> None:
    def features(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for s in generate_roi_samples(Task.CLASSIFICATION, n, seed):
            xs.append(s.image.reshape(-1, 3).mean(0))
            ys.append(TISSUE_CLASSES.index(s.tissue_class))
        return np.array(xs), np.array(ys)

    x_tr, y_tr = features(21, 60)
    x_te, y_te = features(22, 50)
    means = np.array([x_tr[y_tr == k].mean(0) for k in range(len(TISSUE_CLASSES))])
    pred = ((x_te[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    acc = float((pred == y_te).mean())
    assert 0.3 < acc < 0.9, acc


def test_render_is_fast() -> None:
    rng = np.random.default_rng(0)
    render_roi(rng, "tumour", 224)
    times = []
    for cls in TISSUE_CLASSES:
        t = time.perf_counter()
        render_roi(rng, cls, 224)
        times.append(time.perf_counter() - t)
    assert float(np.median(times)) < 0.1  # ~10-30 ms on a laptop core; loose for busy CI


def test_assign_splits_exact_and_seeded() -> None:
    s = assign_splits(20, (0.6, 0.2, 0.2), seed=1)
    assert Counter(s) == {"train": 12, "val": 4, "test": 4}
    assert s == assign_splits(20, (0.6, 0.2, 0.2), seed=1)
    assert s != assign_splits(20, (0.6, 0.2, 0.2), seed=2)


def _parse(record: dict) -> object:
    return parse_answer(
        Task[record["task"].upper()],
        format_completion("", record["target"]),
        record["labels"],
        options=record["options"],
    )


def test_roi_dataset_manifest(tmp_path: Path) -> None:
    manifest = generate_roi_dataset(tmp_path / "a", n_per_task=5, seed=3, splits=(0.6, 0.2, 0.2))
    lines = manifest.read_text().splitlines()
    assert len(lines) == 20
    records = [json.loads(line) for line in lines]
    assert {r["task"] for r in records} == {"classification", "detection", "segmentation", "vqa"}
    for r in records:
        assert set(r) == ROI_FIELDS
        assert r["scale"] == "roi" and r["split"] in {"train", "val", "test"}
        img = np.asarray(Image.open(manifest.parent / r["image"]))
        assert img.dtype == np.uint8 and img.shape[2] == 3
        assert not isinstance(_parse(r), Unparseable), r["target"]
    by_task = Counter((r["task"], r["split"]) for r in records)
    assert by_task[("detection", "train")] == 3
    again = generate_roi_dataset(tmp_path / "b", n_per_task=5, seed=3, splits=(0.6, 0.2, 0.2))
    assert again.read_text() == manifest.read_text()
    first = records[0]
    assert (tmp_path / "a" / first["image"]).read_bytes() == (
        tmp_path / "b" / first["image"]
    ).read_bytes()


def test_wsi_dataset_manifest(tmp_path: Path) -> None:
    manifest = generate_wsi_dataset(tmp_path, n_slides=2, seed=1, size_px=1024, splits=(1, 0, 0))
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert set(r) == WSI_FIELDS
        assert r["scale"] == "wsi" and r["split"] == "train"
        assert not isinstance(_parse(r), Unparseable), r["target"]
    cls = [r for r in records if r["task"] == "classification"]
    assert all(r["target"] in WSI_CLASSES for r in cls)
    with openslide.OpenSlide(tmp_path / cls[0]["slide"]) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert slide.dimensions == (1024, 1024)
        assert slide.level_count >= 2
