"""Evaluation metrics for every task; the GRPO rewards (``smartpath.training.rewards``) call these.

NumPy only (no torch, no new dependencies). Design decisions:

- **Coordinates** are the grammar's 0–1000 normalised image space; boxes are ``(x1, y1, x2, y2)``
  with continuous areas (no VOC ``+1``).
- **Detection matching** is greedy: all (prediction, ground truth) pairs with the same label and
  IoU >= the threshold, sorted by IoU descending (ties: lower prediction index, then lower ground
  truth index), each box used at most once. ``detection_f1`` of no predictions against no ground
  truth is 1.0 (correctly finding nothing), so an empty image can be rewarded.
- **Average precision** is all-point interpolated (VOC 2010+/COCO-style integral of the monotone
  precision envelope) at one IoU threshold, per label, pooled over images;
  ``mean_average_precision`` averages over labels that have ground truth (labels with none are
  skipped, as in COCO). Each prediction, in rank order, takes the highest-IoU still-unmatched
  ground truth of its label in its image. The model emits no confidence scores, so without
  ``pred_scores`` the **output order is the rank**: the i-th box of every image gets score ``-i``
  (first boxes of all images rank before second boxes; ties keep image order).
- **Masks** are rasterised here (no PIL/matplotlib needed) by pixel-centre sampling on a
  ``resolution``×``resolution`` grid over the 0–1000 space with the even-odd rule per polygon and
  the union over polygons. Pixel-centre sampling is unbiased in area, unlike PIL's fill, which also
  paints boundary pixels and so inflates small nuclei.
- **Dice / mask IoU are label-aware by default**: one union mask per label, then pooled (micro)
  over labels: ``Dice = 2 Σ_l |P_l ∩ G_l| / Σ_l (|P_l| + |G_l|)``. With one label this is the
  usual foreground Dice; a polygon with the wrong label counts as a miss. ``per_label=False``
  ignores labels (all foreground). Both masks empty gives 1.0.
- **Text**: ``exact_match`` compares casefolded text with collapsed whitespace and punctuation
  stripped at the ends; ``token_f1`` is SQuAD's (lower case, no punctuation, no articles).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from smartpath.model.grammar import NORM_MAX, Polygon, SegmentationAnswer

DEFAULT_IOU = 0.5
DEFAULT_RESOLUTION = 512

# ---------------------------------------------------------------------------------------------
# Boxes and detection


def _as_boxes(boxes: Any) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise intersection and union areas of boxes a (N, 4) and b (M, 4)."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter, area_a[:, None] + area_b[None, :] - inter


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4), ``(x1, y1, x2, y2)``: shape (N, M)."""
    inter, union = _overlaps(_as_boxes(a), _as_boxes(b))
    return _ratio(inter, union)


def box_giou(a: Any, b: Any) -> np.ndarray:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of boxes ``a`` (N, 4) and ``b``
    (M, 4): IoU minus the share of the smallest enclosing box neither covers, in [-1, 1]; it
    still says how far apart two boxes that do not overlap are."""
    a, b = _as_boxes(a), _as_boxes(b)
    inter, union = _overlaps(a, b)
    hull = np.maximum(a[:, None, 2:], b[None, :, 2:]) - np.minimum(a[:, None, :2], b[None, :, :2])
    hull_area = hull[..., 0] * hull[..., 1]
    return _ratio(inter, union) - _ratio(hull_area - union, hull_area)


def matched_giou(
    pred_boxes: Any, pred_labels: Sequence[str], gt_boxes: Any, gt_labels: Sequence[str]
) -> float:
    """A continuous detection score in [0, 1]: the best one-to-one same-label matching of
    predicted to target boxes (Hungarian, on (GIoU + 1) / 2), summed and divided by the larger
    of the two counts, so a missing or extra box costs as much as a box at the far side of
    the image. 1.0 only for the target boxes themselves (and for none when none are due)."""
    pb, gb = _as_boxes(pred_boxes), _as_boxes(gt_boxes)
    if len(pred_labels) != len(pb) or len(gt_labels) != len(gb):
        raise ValueError("each box needs exactly one label")
    if len(pb) == 0 or len(gb) == 0:
        return 1.0 if len(pb) == len(gb) else 0.0
    same = np.asarray(pred_labels, dtype=object)[:, None] == np.asarray(gt_labels, dtype=object)
    score = np.where(same, (box_giou(pb, gb) + 1.0) / 2.0, 0.0)
    rows, cols = linear_sum_assignment(score, maximize=True)
    return float(score[rows, cols].sum() / max(len(pb), len(gb)))


def greedy_match(
    pred_boxes: Any,
    pred_labels: Sequence[str],
    gt_boxes: Any,
    gt_labels: Sequence[str],
    iou_threshold: float = DEFAULT_IOU,
) -> list[tuple[int, int]]:
    """Matched ``(pred_index, gt_index)`` pairs, greedy by IoU descending, same label only."""
    pb, gb = _as_boxes(pred_boxes), _as_boxes(gt_boxes)
    if len(pred_labels) != len(pb) or len(gt_labels) != len(gb):
        raise ValueError("each box needs exactly one label")
    if len(pb) == 0 or len(gb) == 0:
        return []
    iou = box_iou(pb, gb)
    same = np.asarray(pred_labels, dtype=object)[:, None] == np.asarray(gt_labels, dtype=object)
    pi, gi = np.nonzero(same & (iou >= iou_threshold))
    order = np.lexsort((gi, pi, -iou[pi, gi]))  # IoU desc, then pred index, then gt index
    used_p: set[int] = set()
    used_g: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in order:
        p, g = int(pi[k]), int(gi[k])
        if p not in used_p and g not in used_g:
            used_p.add(p)
            used_g.add(g)
            pairs.append((p, g))
    return pairs


def match_detections(
    pred_boxes: Any,
    pred_labels: Sequence[str],
    gt_boxes: Any,
    gt_labels: Sequence[str],
    iou_threshold: float = DEFAULT_IOU,
) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` after greedy same-label matching at ``iou_threshold``."""
    pairs = greedy_match(pred_boxes, pred_labels, gt_boxes, gt_labels, iou_threshold)
    tp = len(pairs)
    return tp, len(pred_labels) - tp, len(gt_labels) - tp


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """``2tp / (2tp + fp + fn)``; 1.0 when there is nothing to find and nothing was found."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def detection_f1(
    pred_boxes: Any,
    pred_labels: Sequence[str],
    gt_boxes: Any,
    gt_labels: Sequence[str],
    iou_threshold: float = DEFAULT_IOU,
) -> float:
    """F1 of greedy same-label matching at ``iou_threshold`` (1.0 for empty vs empty)."""
    return f1_from_counts(
        *match_detections(pred_boxes, pred_labels, gt_boxes, gt_labels, iou_threshold)
    )


def _rank_scores(n: int) -> np.ndarray:
    return -np.arange(n, dtype=np.float64)


def average_precision(
    pred_boxes: Sequence[Any],
    gt_boxes: Sequence[Any],
    pred_scores: Sequence[Any] | None = None,
    iou_threshold: float = DEFAULT_IOU,
) -> float:
    """All-point interpolated AP of one class over images (lists indexed by image).

    Without ``pred_scores`` the output order within each image is the rank. NaN when there is
    no ground truth.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError("pred_boxes and gt_boxes must cover the same images")
    preds = [_as_boxes(b) for b in pred_boxes]
    gts = [_as_boxes(b) for b in gt_boxes]
    if pred_scores is None:
        scores = [_rank_scores(len(p)) for p in preds]
    else:
        scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in pred_scores]
        if len(scores) != len(preds) or any(
            len(s) != len(p) for s, p in zip(scores, preds, strict=True)
        ):
            raise ValueError("one score per predicted box")
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return math.nan
    entries = [(img, i) for img, p in enumerate(preds) for i in range(len(p))]
    if not entries:
        return 0.0
    flat_scores = np.array([scores[img][i] for img, i in entries])
    order = np.argsort(-flat_scores, kind="stable")
    ious = [box_iou(p, g) for p, g in zip(preds, gts, strict=True)]
    matched = [np.zeros(len(g), dtype=bool) for g in gts]
    tp = np.zeros(len(entries))
    for rank, k in enumerate(order):
        img, i = entries[k]
        if len(gts[img]) == 0:
            continue
        cand = np.where(matched[img], -1.0, ious[img][i])
        j = int(np.argmax(cand))
        if cand[j] >= iou_threshold:
            matched[img][j] = True
            tp[rank] = 1.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def mean_average_precision(
    pred_boxes: Sequence[Any],
    pred_labels: Sequence[Sequence[str]],
    gt_boxes: Sequence[Any],
    gt_labels: Sequence[Sequence[str]],
    pred_scores: Sequence[Any] | None = None,
    iou_threshold: float = DEFAULT_IOU,
) -> float:
    """Mean over labels with ground truth of ``average_precision`` (lists indexed by image).

    Without ``pred_scores`` the output order within each image is the rank (the model emits no
    scores). NaN when no image has ground truth.
    """
    n = len(gt_boxes)
    if not (len(pred_boxes) == len(pred_labels) == len(gt_labels) == n):
        raise ValueError("predictions and ground truth must cover the same images")
    preds = [_as_boxes(b) for b in pred_boxes]
    gts = [_as_boxes(b) for b in gt_boxes]
    if pred_scores is None:
        scores = [_rank_scores(len(p)) for p in preds]
    else:
        scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in pred_scores]
    classes = sorted({lab for labs in gt_labels for lab in labs})
    aps = []
    for c in classes:
        pm = [np.asarray([lab == c for lab in labs], dtype=bool) for labs in pred_labels]
        gm = [np.asarray([lab == c for lab in labs], dtype=bool) for labs in gt_labels]
        aps.append(
            average_precision(
                [p[m] for p, m in zip(preds, pm, strict=True)],
                [g[m] for g, m in zip(gts, gm, strict=True)],
                [s[m] for s, m in zip(scores, pm, strict=True)],
                iou_threshold,
            )
        )
    return float(np.mean(aps)) if aps else math.nan


# ---------------------------------------------------------------------------------------------
# Polygons and masks

PolygonLike = Polygon | np.ndarray | Sequence[Sequence[float]]


def rasterize_polygon(points: Any, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Boolean (resolution, resolution) mask, row = y, of one polygon in 0–1000 space.

    A pixel is inside iff its centre is inside by the even-odd rule (a centre exactly on a left
    edge counts as inside, on a right edge as outside). Linear in perimeter plus pixels.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mask = np.zeros((resolution, resolution), dtype=bool)
    if len(pts) < 3 or not np.all(np.isfinite(pts)):
        return mask
    scale = resolution / NORM_MAX
    px = pts[:, 0] * scale - 0.5  # pixel c's centre sits at px == c
    py = pts[:, 1] * scale - 0.5
    x0, y0 = px, py
    x1, y1 = np.roll(px, -1), np.roll(py, -1)
    r_start = np.clip(np.ceil(np.minimum(y0, y1)), 0, resolution).astype(np.int64)
    r_end = np.clip(np.ceil(np.maximum(y0, y1)), 0, resolution).astype(np.int64)
    count = np.maximum(r_end - r_start, 0)  # rows r with ymin <= r < ymax (half-open)
    total = int(count.sum())
    if total == 0:
        return mask
    edge = np.repeat(np.arange(len(pts)), count)
    offsets = np.cumsum(count) - count
    rows = r_start[edge] + (np.arange(total) - offsets[edge])
    t = (rows - y0[edge]) / (y1[edge] - y0[edge])
    xc = x0[edge] + t * (x1[edge] - x0[edge])
    cols = np.clip(np.floor(xc).astype(np.int64) + 1, 0, resolution)  # first centre > crossing
    lo, hi = int(rows.min()), int(rows.max()) + 1  # only the rows the polygon spans
    toggles = np.zeros((hi - lo, resolution + 1), dtype=np.int32)
    np.add.at(toggles, (rows - lo, cols), 1)
    mask[lo:hi] = (np.cumsum(toggles, axis=1)[:, :resolution] % 2).astype(bool)
    return mask


def _label_and_points(poly: Any) -> tuple[str, np.ndarray]:
    if isinstance(poly, Polygon):
        return poly.label, poly.array()
    return "", np.asarray(poly, dtype=np.float64).reshape(-1, 2)


def _polys(polys: Any) -> list[tuple[str, np.ndarray]]:
    if isinstance(polys, SegmentationAnswer):
        polys = polys.polygons
    return [_label_and_points(p) for p in polys]


def rasterize(
    polys: SegmentationAnswer | Sequence[PolygonLike],
    resolution: int = DEFAULT_RESOLUTION,
    *,
    per_label: bool = True,
) -> dict[str, np.ndarray]:
    """Union masks keyed by label (``{"": mask}`` for all foreground when ``per_label=False``).

    Plain (N, 2) vertex arrays carry the label ``""``.
    """
    masks: dict[str, np.ndarray] = {}
    for label, pts in _polys(polys):
        key = label if per_label else ""
        m = rasterize_polygon(pts, resolution)
        masks[key] = masks[key] | m if key in masks else m
    return masks


def _overlap(pred: Any, gt: Any, resolution: int, per_label: bool) -> tuple[int, int, int]:
    """``(Σ|P∩G|, Σ|P|, Σ|G|)`` over labels."""
    pm = rasterize(pred, resolution, per_label=per_label)
    gm = rasterize(gt, resolution, per_label=per_label)
    inter = sum(int(np.count_nonzero(m & gm[k])) for k, m in pm.items() if k in gm)
    return (
        inter,
        sum(int(np.count_nonzero(m)) for m in pm.values()),
        sum(int(np.count_nonzero(m)) for m in gm.values()),
    )


def dice(
    pred_polys: SegmentationAnswer | Sequence[PolygonLike],
    gt_polys: SegmentationAnswer | Sequence[PolygonLike],
    resolution: int = DEFAULT_RESOLUTION,
    *,
    per_label: bool = True,
) -> float:
    """Dice of rasterised polygons, pooled over labels (1.0 when both are empty)."""
    inter, p, g = _overlap(pred_polys, gt_polys, resolution, per_label)
    return 1.0 if p + g == 0 else 2.0 * inter / (p + g)


def mask_iou(
    pred_polys: SegmentationAnswer | Sequence[PolygonLike],
    gt_polys: SegmentationAnswer | Sequence[PolygonLike],
    resolution: int = DEFAULT_RESOLUTION,
    *,
    per_label: bool = True,
) -> float:
    """IoU (Jaccard) of rasterised polygons, pooled over labels (1.0 when both are empty)."""
    inter, p, g = _overlap(pred_polys, gt_polys, resolution, per_label)
    union = p + g - inter
    return 1.0 if union == 0 else inter / union


# ---------------------------------------------------------------------------------------------
# Labels and text

_WS_RE = re.compile(r"\s+")
_END_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019"
_PUNCT = set(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    """Casefolded, whitespace collapsed, punctuation and whitespace stripped at both ends."""
    return _WS_RE.sub(" ", text).strip().strip(_END_PUNCT + " ").casefold()


def exact_match(a: str, b: str) -> bool:
    """Equality after ``normalize_text`` (case, whitespace, punctuation at the ends)."""
    return normalize_text(a) == normalize_text(b)


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Fraction of ``exact_match`` pairs; NaN for no samples."""
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    if not y_true:
        return math.nan
    return sum(exact_match(t, p) for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def macro_f1(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> float:
    """Unweighted mean of per-label F1 (labels compared by ``normalize_text``).

    ``labels`` default to those seen in ``y_true`` or ``y_pred``; a given label seen in neither
    is skipped (it has no F1). Predictions outside ``labels`` count as false negatives for the
    true label. NaN when no label is left.
    """
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    t = [normalize_text(x) for x in y_true]
    p = [normalize_text(x) for x in y_pred]
    keys = (
        list(dict.fromkeys(normalize_text(x) for x in labels))
        if labels is not None
        else list(dict.fromkeys(t + p))
    )
    f1s = []
    for k in keys:
        tp = sum(a == k and b == k for a, b in zip(t, p, strict=True))
        fp = sum(a != k and b == k for a, b in zip(t, p, strict=True))
        fn = sum(a == k and b != k for a, b in zip(t, p, strict=True))
        if tp + fp + fn:
            f1s.append(f1_from_counts(tp, fp, fn))
    return float(np.mean(f1s)) if f1s else math.nan


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1; when either side normalises to no tokens, 1.0 iff both do."""
    p, r = squad_normalize(pred).split(), squad_normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)
