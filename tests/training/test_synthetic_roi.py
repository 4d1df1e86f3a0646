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
from scipy import ndimage

from smartpath.model.grammar import (
    DetectionAnswer,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    format_completion,
    parse_answer,
)
from smartpath.model.tokenizer import train_builtin_tokenizer
from smartpath.training.metrics import box_iou, rasterize
from smartpath.training.synthetic.dataset import (
    WSI_CLASSES,
    assign_splits,
    generate_roi_dataset,
    generate_wsi_dataset,
)
from smartpath.training.synthetic.roi import (
    COMPACT,
    COUNT_OPTIONS,
    NUCLEUS_LABELS,
    TISSUE_CLASSES,
    RoiProfile,
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


# ---------------------------------------------------------------------------------------------
# Profiles: RoiProfile() is the default generator; COMPACT is short targets for a demo model


@pytest.fixture(scope="module")
def builtin_tokenizer():
    return train_builtin_tokenizer()


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_default_profile_is_the_default() -> None:
    for task in (Task.DETECTION, Task.SEGMENTATION):
        a = make_roi_sample(task, seed=6, index=2)
        b = make_roi_sample(task, seed=6, index=2, profile=RoiProfile())
        assert np.array_equal(a.image, b.image) and a.target_text == b.target_text
    c = make_roi_sample(Task.DETECTION, seed=6, index=2, profile=COMPACT)
    assert c.target_text != a.target_text  # the profile is not ignored
    with pytest.raises(ValueError):
        RoiProfile(max_nuclei=0)
    with pytest.raises(ValueError):
        RoiProfile(polygon_vertices=2)


def test_compact_target_lengths(builtin_tokenizer) -> None:
    """Builtin-tokenizer lengths under COMPACT: detection / segmentation p90 <= 60 (default
    detection targets are thousands of tokens)."""
    lengths: dict[Task, list[int]] = {}
    for task in (Task.CLASSIFICATION, Task.DETECTION, Task.SEGMENTATION, Task.VQA):
        samples = list(generate_roi_samples(task, 30, seed=13, profile=COMPACT))
        assert all(s.image.shape == (224, 224, 3) for s in samples)
        lengths[task] = [_n_tokens(builtin_tokenizer, s.target_text) for s in samples]
    for task in (Task.DETECTION, Task.SEGMENTATION):
        assert np.percentile(lengths[task], 90) <= 60, (task, sorted(lengths[task]))
        assert np.median(lengths[task]) >= 30  # not trivially empty
    assert max(lengths[Task.CLASSIFICATION]) <= 10 and max(lengths[Task.VQA]) <= 45
    default = [make_roi_sample(Task.DETECTION, 13, i).target_text for i in range(3)]
    assert min(_n_tokens(builtin_tokenizer, t) for t in default) > 300


def test_compact_coordinates_are_integers() -> None:
    for task in (Task.DETECTION, Task.SEGMENTATION):
        for s in generate_roi_samples(task, 10, seed=14, profile=COMPACT):
            numbers = re.findall(r"-?\d+(?:\.\d+)?", s.target_text)
            assert numbers or s.target_text == "[]"
            assert all("." not in x and 0 <= int(x) <= 1000 for x in numbers), s.target_text


def _dark_blobs(image: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2, y2, px) of hematoxylin-dark blobs, found without the ground truth:
    red-channel optical density (hematoxylin absorbs red, eosin hardly), 3x3 mean, thresholded
    30 % of the way from the median to the 99.5th percentile, components of >= 30 px."""
    od = ndimage.uniform_filter(-np.log((image[..., 0].astype(np.float64) + 1.0) / 256.0), 3)
    med = np.median(od)
    lab, n = ndimage.label(od > med + 0.3 * (np.percentile(od, 99.5) - med))
    areas = ndimage.sum_labels(np.ones_like(lab), lab, np.arange(1, n + 1))
    objs = ndimage.find_objects(lab)
    boxes = [
        (o[1].start, o[0].start, o[1].stop, o[0].stop)
        for o, a in zip(objs, areas, strict=True)
        if a >= 30
    ]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


def _blob_match(boxes_norm: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Each answer box's best IoU with a dark blob (pixel space)."""
    blobs = _dark_blobs(image)
    boxes = boxes_norm.reshape(-1, 4) * image.shape[0] / 1000.0
    if len(blobs) == 0:
        return np.zeros(len(boxes))
    return box_iou(boxes, blobs).max(axis=1)


@pytest.mark.parametrize("cls", TISSUE_CLASSES)
def test_compact_boxes_are_the_rendered_nuclei(cls: str) -> None:
    sizes = []
    for index in range(6):
        s = make_roi_sample(Task.DETECTION, seed=15, index=index, tissue_class=cls, profile=COMPACT)
        dets = s.target.detections
        assert 1 <= len(dets) <= COMPACT.max_nuclei
        assert len(s.scene.nuclei) == len(dets)  # only the annotated nuclei are rendered
        boxes = np.array([d.box for d in dets])
        assert len(_dark_blobs(s.image)) == len(dets)  # one dark blob per box, no others
        assert _blob_match(boxes, s.image).min() >= 0.7
        sizes += list((boxes[:, 2:] - boxes[:, :2]).min(axis=1) * 224 / 1000)
    assert np.median(sizes) >= 17 and min(sizes) >= 12  # detectable at IoU 0.5


def test_blob_check_can_fail() -> None:
    s = make_roi_sample(Task.DETECTION, seed=15, index=0, tissue_class="tumour", profile=COMPACT)
    boxes = np.array([d.box for d in s.target.detections])
    assert _blob_match(boxes, s.image).min() >= 0.7
    shifted = boxes + np.array([60.0, 60.0, 60.0, 60.0])  # ~13 px: off the nuclei
    assert _blob_match(shifted, s.image).max() < 0.5
    full = make_roi_sample(Task.DETECTION, seed=15, index=0, tissue_class="tumour")
    assert len(_dark_blobs(full.image)) != len(full.target.detections)  # dense: blobs merge


def _union(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for m in masks:
        out |= m
    return out


def _mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if a.sum() + b.sum() == 0 else 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_compact_polygons_match_painted_regions() -> None:
    n_regions = Counter()
    for s in generate_roi_samples(Task.SEGMENTATION, 24, seed=16, profile=COMPACT):
        n = s.image.shape[0]
        polys = s.target.polygons
        n_regions[len(polys)] += 1
        assert len(polys) == len(s.scene.regions) <= COMPACT.max_regions
        assert all(3 <= len(p.points) <= COMPACT.polygon_vertices for p in polys)
        gen = _union([r.mask for r in s.scene.regions], (n, n))
        answer = rasterize(s.target, n, per_label=False).get("", np.zeros((n, n), dtype=bool))
        assert _mask_dice(answer, gen) >= 0.9, s.id
        # At the metric's own resolution too (a 2x nearest upsampling of the generator mask).
        fine = rasterize(s.target, 2 * n, per_label=False).get("", np.zeros((2 * n, 2 * n), bool))
        assert _mask_dice(fine, np.kron(gen, np.ones((2, 2), dtype=bool))) >= 0.9
        # The painted pixels, read through PIL's own fill of the answer polygons.
        luma = _luma(s.image)
        red_od = -np.log((s.image[..., 0].astype(np.float64) + 1.0) / 256.0)
        for poly in polys:
            canvas = Image.new("1", (n, n), 0)
            ImageDraw.Draw(canvas).polygon(
                [(x * n / 1000, y * n / 1000) for x, y in poly.points], fill=1
            )
            m = np.asarray(canvas, dtype=bool)
            ring = ndimage.binary_dilation(m, iterations=6) & ~m
            if poly.label == "gland":  # a white lumen, brighter than any stroma around it
                assert np.percentile(luma[m], 75) > np.percentile(luma[ring], 95) + 10
            else:  # tumour nest: more hematoxylin than the stroma around it
                assert np.median(red_od[m]) > np.median(red_od[ring]) + 0.05
    assert n_regions[1] >= 18  # COMPACT keeps one region


def test_polygon_dice_check_can_fail() -> None:
    s = make_roi_sample(Task.SEGMENTATION, seed=16, index=0, tissue_class="tumour", profile=COMPACT)
    n = s.image.shape[0]
    gen = _union([r.mask for r in s.scene.regions], (n, n))
    moved = [[(min(1000, x + 150), y) for x, y in p.points] for p in s.target.polygons]
    assert _mask_dice(rasterize(moved, n, per_label=False)[""], gen) < 0.9


@pytest.mark.parametrize("task", [Task.CLASSIFICATION, Task.DETECTION, Task.SEGMENTATION, Task.VQA])
def test_compact_deterministic_per_seed(task: Task) -> None:
    a = make_roi_sample(task, seed=17, index=4, profile=COMPACT)
    b = make_roi_sample(task, seed=17, index=4, profile=COMPACT)
    c = make_roi_sample(task, seed=18, index=4, profile=COMPACT)
    assert np.array_equal(a.image, b.image) and a.target_text == b.target_text
    assert a.prompt == b.prompt
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (224, 224, 3)


def test_compact_classification_and_vqa_keep_their_answers() -> None:
    """Only the size changes: same classes in the same order, VQA counts the full scene."""
    plain = [s.target_text for s in generate_roi_samples(Task.CLASSIFICATION, 10, seed=19)]
    small = generate_roi_samples(Task.CLASSIFICATION, 10, seed=19, profile=COMPACT)
    assert [s.target_text for s in small] == plain
    s = make_roi_sample(
        Task.VQA, 2, 0, tissue_class="lymphocyte-rich", vqa_kind="count", profile=COMPACT
    )
    assert s.target_text == "more than 120"
