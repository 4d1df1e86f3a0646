"""Convert standard dataset layouts into ROI manifest samples.

Sources: ImageFolder classification, COCO detection, mask folders (segmentation) and a simple
VQA JSON. Every converter returns ``list[RoiSample]``; write them with
:func:`smartpath.training.manifest.write_manifest`.

Design decisions:

- Image refs: with ``manifest_dir`` the refs are relative to that folder (POSIX separators), so
  the manifest and its images can move together (disk or bucket); without it they are absolute.
- Splits are deterministic: a SHA-256 of the image's path relative to the dataset root maps to
  [0, 1) and is cut at the cumulative ``fractions`` (train, val, test). The same file lands in
  the same split on every machine, whatever the listing order or the dataset's location.
- Coordinates go through :mod:`smartpath.model.coords` into the 0–1000 space and are rounded to
  0.1 (one tenth of a per-mille of the image side: sub-pixel for images up to 10 000 px) to keep
  targets short. Boxes or polygons that become degenerate after rounding are dropped.
- COCO: ``[x, y, w, h]`` pixels → ``[x1, y1, x2, y2]``; ``iscrowd`` annotations are skipped
  (their RLE masks are not boxes of single objects); images without annotations get the empty
  detection answer ``[]``; ``labels`` lists every category name in category-id order.
- Masks: pixel value ``k`` (1-based) is ``class_names[k - 1]``; 0 is background and other values
  are ignored. Each 8-connected component of each class becomes one polygon: its *outer*
  boundary traced along pixel edges (exact area for a hole-free component), then simplified
  with Ramer–Douglas–Peucker at a growing tolerance until it has at most ``max_points``
  vertices. Approximations: holes are filled (the grammar has no holes), components smaller
  than ``min_area`` pixels are dropped, and simplification moves the boundary by at most the
  final tolerance (typically ≤ 1 px for blob-like shapes at 64 points).
- VQA: items ``{"image", "question", "answer", "options"?, "id"?, "split"?}``. With options it
  is closed VQA and the answer (text or letter) is stored as the option's exact text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from smartpath.model.coords import box_roi_to_norm, roi_to_norm
from smartpath.model.grammar import (
    Detection,
    DetectionAnswer,
    LabelAnswer,
    Polygon,
    SegmentationAnswer,
    TextAnswer,
    Unparseable,
    format_answer,
    parse_option,
    polygon_area,
)
from smartpath.training.manifest import RoiSample

__all__ = [
    "DEFAULT_FRACTIONS",
    "IMAGE_EXTENSIONS",
    "from_coco",
    "from_image_folder",
    "from_mask_folder",
    "from_vqa_json",
    "hash_split",
    "mask_to_polygons",
]

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")
DECIMALS = 1


# ---------------------------------------------------------------------------------------------
# Shared helpers


def hash_split(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for ``key``, deterministically, in ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {tuple(fractions)!r}"
        )
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, f in zip(SPLITS, fractions, strict=True):
        edge += f
        if u < edge:
            return name
    return next(name for name, f in reversed(list(zip(SPLITS, fractions, strict=True))) if f > 0)


def _ref(path: Path, manifest_dir: Path | None) -> str:
    path = path.absolute()
    if manifest_dir is None:
        return path.as_posix()
    return Path(os.path.relpath(path, Path(manifest_dir).absolute())).as_posix()


def _rel_key(path: Path, root: Path) -> str:
    return path.absolute().relative_to(root.absolute()).as_posix()


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _r(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.round(values, DECIMALS).ravel()]


def _mpp(mpp: float | None) -> dict[str, Any]:
    return {} if mpp is None else {"mpp": mpp}


# ---------------------------------------------------------------------------------------------
# ImageFolder classification


def from_image_folder(
    root: str | Path,
    *,
    manifest_dir: str | Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    source: str = "imagefolder",
    prompt: str | None = None,
    mpp: float | None = None,
) -> list[RoiSample]:
    """Classification samples from ``root/<class>/<image>``; labels are the sorted class names."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders under {root}")
    mdir = Path(manifest_dir) if manifest_dir is not None else None
    samples = []
    for cls in classes:
        for img in _images(root / cls):
            key = _rel_key(img, root)
            samples.append(
                RoiSample(
                    id=f"{source}:{key}",
                    image=_ref(img, mdir),
                    task="classification",
                    prompt=prompt,
                    labels=classes,
                    target=format_answer(LabelAnswer(cls)),
                    split=hash_split(key, fractions),
                    source=source,
                    **_mpp(mpp),
                )
            )
    return samples


# ---------------------------------------------------------------------------------------------
# COCO detection


def from_coco(
    annotations_json: str | Path,
    images_dir: str | Path,
    *,
    manifest_dir: str | Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    source: str = "coco",
    prompt: str | None = None,
    mpp: float | None = None,
) -> list[RoiSample]:
    """Detection samples from a COCO annotation file; boxes in 0–1000 ``[x1, y1, x2, y2]``."""
    images_dir = Path(images_dir)
    coco = json.loads(Path(annotations_json).read_text(encoding="utf-8"))
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    names = {c["id"]: str(c["name"]) for c in categories}
    labels = list(dict.fromkeys(names.values()))
    if not labels:
        raise ValueError(f"{annotations_json}: no categories")
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    mdir = Path(manifest_dir) if manifest_dir is not None else None
    samples = []
    for img in sorted(coco.get("images", []), key=lambda i: str(i["file_name"])):
        path = images_dir / img["file_name"]
        width, height = img.get("width"), img.get("height")
        if not width or not height:
            with Image.open(path) as im:
                width, height = im.size
        dets = []
        for ann in by_image.get(img["id"], []):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in names:
                raise ValueError(
                    f"{annotations_json}: annotation {ann.get('id')} has unknown category "
                    f"{ann['category_id']}"
                )
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = _r(box_roi_to_norm([x, y, x + w, y + h], width, height))
            if box[2] > box[0] and box[3] > box[1]:
                dets.append(Detection(names[ann["category_id"]], tuple(box)))  # type: ignore[arg-type]
        key = str(img["file_name"])
        samples.append(
            RoiSample(
                id=f"{source}:{img['id']}",
                image=_ref(path, mdir),
                task="detection",
                prompt=prompt,
                labels=labels,
                target=format_answer(DetectionAnswer(tuple(dets))),
                split=hash_split(key, fractions),
                source=source,
                **_mpp(mpp),
            )
        )
    return samples


# ---------------------------------------------------------------------------------------------
# Mask folders (segmentation)

_LEFT = {(1, 0): (0, -1), (0, -1): (-1, 0), (-1, 0): (0, 1), (0, 1): (1, 0)}


def _outer_boundary(component: np.ndarray) -> np.ndarray:
    """Outer boundary of one 8-connected component along pixel edges, as (x, y) corners.

    Every foreground pixel side facing background becomes a directed edge with the foreground
    on its right (clockwise on screen, y down); edges are chained into loops, turning left at
    the ambiguous corners where two pixels touch diagonally (so 8-connected pixels stay in one
    loop). The loop with the largest area is the outer boundary; the others are holes.
    """
    m = np.pad(component.astype(bool), 1)
    fg = m[1:-1, 1:-1]
    rows, cols = np.nonzero(fg)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(mask: np.ndarray, start: tuple[int, int], end: tuple[int, int]) -> None:
        sel = mask[rows, cols]
        for r, c in zip(rows[sel], cols[sel], strict=True):
            a = (int(c) + start[0], int(r) + start[1])
            b = (int(c) + end[0], int(r) + end[1])
            out.setdefault(a, []).append(b)

    add(~m[:-2, 1:-1], (0, 0), (1, 0))  # top side, going east
    add(~m[1:-1, 2:], (1, 0), (1, 1))  # right side, going south
    add(~m[2:, 1:-1], (1, 1), (0, 1))  # bottom side, going west
    add(~m[1:-1, :-2], (0, 1), (0, 0))  # left side, going north

    loops = []
    while out:
        # Start at a vertex with one way out: stopping at a two-way (diagonal) vertex could
        # cut a loop in two.
        start = next(k for k, v in out.items() if len(v) == 1)
        loop = [start]
        prev, cur = start, out[start].pop()
        if not out[start]:
            del out[start]
        while cur != start:
            loop.append(cur)
            nexts = out[cur]
            if len(nexts) == 1:
                nxt = nexts.pop()
            else:
                d = (cur[0] - prev[0], cur[1] - prev[1])
                left = _LEFT[d]
                want = (cur[0] + left[0], cur[1] + left[1])
                nxt = want if want in nexts else nexts[0]
                nexts.remove(nxt)
            if not nexts:
                del out[cur]
            prev, cur = cur, nxt
        loops.append(np.array(loop, dtype=np.float64))
    best = max(loops, key=lambda p: polygon_area([tuple(v) for v in p]))
    return _drop_collinear(best)


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    prev = np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - points[:, 1]) - (
        points[:, 1] - prev[:, 1]
    ) * (nxt[:, 0] - points[:, 0])
    return points[cross != 0]


def _rdp(points: np.ndarray, eps: float) -> np.ndarray:
    """Ramer–Douglas–Peucker on an open polyline (endpoints kept)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = points[i], points[j]
        seg = points[i + 1 : j]
        ab = b - a
        norm = float(np.hypot(*ab))
        if norm == 0:
            dist = np.hypot(*(seg - a).T)
        else:
            dist = np.abs(ab[0] * (seg[:, 1] - a[1]) - ab[1] * (seg[:, 0] - a[0])) / norm
        k = int(np.argmax(dist))
        if dist[k] > eps:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return points[keep]


def _simplify(ring: np.ndarray, max_points: int) -> np.ndarray:
    """Simplify a closed ring to at most ``max_points`` vertices (RDP, growing tolerance)."""
    if len(ring) <= max_points:
        return ring
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    eps = 0.5
    while True:
        first = _rdp(ring[: far + 1], eps)
        second = _rdp(np.vstack([ring[far:], ring[:1]]), eps)
        out = np.vstack([first, second[1:-1]])
        if len(out) <= max_points:
            return out
        eps *= 1.5


def mask_to_polygons(
    mask: np.ndarray,
    class_names: Sequence[str],
    *,
    max_points: int = 64,
    min_area: int = 4,
) -> list[Polygon]:
    """Polygons (0–1000 space) of every 8-connected component of every class in ``mask``.

    ``mask`` is ``(H, W)`` of class indices: value ``k`` is ``class_names[k - 1]``, 0 background.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if max_points < 3:
        raise ValueError("max_points must be at least 3")
    height, width = mask.shape
    polygons = []
    for k, name in enumerate(class_names, start=1):
        labelled, n = ndimage.label(mask == k, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            continue
        slices = ndimage.find_objects(labelled)
        for i, sl in enumerate(slices, start=1):
            if sl is None:
                continue
            comp = labelled[sl] == i
            if int(comp.sum()) < min_area:
                continue
            ring = _outer_boundary(comp) + np.array([sl[1].start, sl[0].start], dtype=np.float64)
            ring = _simplify(ring, max_points)
            norm = np.round(roi_to_norm(ring, width, height), DECIMALS)
            # Drop vertices that rounding made equal to their predecessor (a pinch vertex where
            # two pixels touch diagonally legitimately appears twice, not consecutively).
            same = np.all(norm == np.roll(norm, 1, axis=0), axis=1)
            pts = tuple((float(x), float(y)) for x, y in norm[~same])
            if len(pts) >= 3 and polygon_area(pts) > 0:
                polygons.append(Polygon(name, pts))
    return polygons


def from_mask_folder(
    images_dir: str | Path,
    masks_dir: str | Path,
    class_names: Sequence[str],
    *,
    manifest_dir: str | Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    source: str = "masks",
    prompt: str | None = None,
    max_points: int = 64,
    min_area: int = 4,
    mpp: float | None = None,
) -> list[RoiSample]:
    """Segmentation samples from ``images_dir/<stem>.*`` and ``masks_dir/<stem>.png``.

    Images without a mask are skipped; a mask whose size differs from its image is an error.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    labels = list(class_names)
    mdir = Path(manifest_dir) if manifest_dir is not None else None
    samples = []
    for img in _images(images_dir):
        mask_path = masks_dir / f"{img.stem}.png"
        if not mask_path.is_file():
            continue
        with Image.open(mask_path) as m:
            mask = np.asarray(m)
        if mask.ndim == 3:
            mask = mask[..., 0]
        with Image.open(img) as im:
            size = im.size
        if (mask.shape[1], mask.shape[0]) != size:
            raise ValueError(f"mask {mask_path} is {mask.shape[::-1]}, its image is {size}")
        polys = mask_to_polygons(mask, labels, max_points=max_points, min_area=min_area)
        key = _rel_key(img, images_dir)
        samples.append(
            RoiSample(
                id=f"{source}:{key}",
                image=_ref(img, mdir),
                task="segmentation",
                prompt=prompt,
                labels=labels,
                target=format_answer(SegmentationAnswer(tuple(polys))),
                split=hash_split(key, fractions),
                source=source,
                **_mpp(mpp),
            )
        )
    return samples


# ---------------------------------------------------------------------------------------------
# VQA JSON


def from_vqa_json(
    path: str | Path,
    images_dir: str | Path,
    *,
    manifest_dir: str | Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    source: str = "vqa",
    mpp: float | None = None,
) -> list[RoiSample]:
    """VQA samples from a JSON list of ``{image, question, answer, options?, id?, split?}``.

    With ``options`` (closed VQA) the answer may be an option's text or letter; the target is
    the option's exact text. An ``answer`` not among the options is a ValueError.
    """
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of question objects")
    images_dir = Path(images_dir)
    mdir = Path(manifest_dir) if manifest_dir is not None else None
    samples = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not {"image", "question", "answer"} <= item.keys():
            raise ValueError(f"{path}: item {i} needs 'image', 'question' and 'answer'")
        options = item.get("options")
        answer = str(item["answer"])
        if options is not None:
            options = [str(o) for o in options]
            parsed = parse_option(answer, options)
            if isinstance(parsed, Unparseable):
                raise ValueError(f"{path}: item {i}: answer {answer!r}: {parsed.reason}")
            target = format_answer(parsed)
        else:
            target = format_answer(TextAnswer(answer.strip()))
        img = images_dir / str(item["image"])
        split = item.get("split") or hash_split(f"{item['image']}\n{item['question']}", fractions)
        samples.append(
            RoiSample(
                id=str(item.get("id", f"{source}:{i}")),
                image=_ref(img, mdir),
                task="vqa",
                prompt=str(item["question"]),
                options=options,
                target=target,
                split=split,
                source=source,
                **_mpp(mpp),
            )
        )
    return samples
