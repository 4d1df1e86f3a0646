"""Metrics against hand-computed values and independent reference implementations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from smartpath.model.grammar import Polygon, SegmentationAnswer, polygon_area
from smartpath.training.metrics import (
    accuracy,
    average_precision,
    box_giou,
    box_iou,
    detection_f1,
    dice,
    exact_match,
    greedy_match,
    macro_f1,
    mask_iou,
    match_detections,
    matched_giou,
    mean_average_precision,
    rasterize,
    rasterize_polygon,
    token_f1,
)

# ---------------------------------------------------------------------------------------------
# Independent references (plain loops, no vectorisation shared with the implementation)


def ref_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_greedy(pb, pl, gb, gl, thr=0.5) -> set[tuple[int, int]]:
    pairs = []
    for i in range(len(pb)):
        for j in range(len(gb)):
            if pl[i] == gl[j]:
                v = ref_iou(pb[i], gb[j])
                if v >= thr:
                    pairs.append((v, i, j))
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    used_p, used_g, out = set(), set(), set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            out.add((i, j))
    return out


def max_matching(pb, pl, gb, gl, thr=0.5) -> int:
    """Maximum-cardinality matching of eligible pairs (Hungarian on a 0/1 matrix)."""
    if not pb or not gb:
        return 0
    elig = np.array(
        [
            [float(pl[i] == gl[j] and ref_iou(pb[i], gb[j]) >= thr) for j in range(len(gb))]
            for i in range(len(pb))
        ]
    )
    r, c = linear_sum_assignment(-elig)
    return int(elig[r, c].sum())


def random_case(rng: np.random.Generator, n_p: int, n_g: int, labels=("a", "b")):
    def boxes(n):
        xy = rng.uniform(0, 900, size=(n, 2))
        wh = rng.uniform(20, 150, size=(n, 2))
        return [
            tuple(map(float, (x, y, x + w, y + h))) for (x, y), (w, h) in zip(xy, wh, strict=True)
        ]

    gb = boxes(n_g)
    # predictions: jittered copies of some ground truths plus random boxes
    pb = []
    for _ in range(n_p):
        if gb and rng.random() < 0.7:
            x1, y1, x2, y2 = gb[rng.integers(len(gb))]
            d = rng.normal(0, 15, size=4)
            pb.append((x1 + d[0], y1 + d[1], x2 + d[2] + 1 + abs(d[0]), y2 + d[3] + 1 + abs(d[1])))
        else:
            pb.extend(boxes(1))
    pl = [labels[int(rng.integers(len(labels)))] for _ in pb]
    gl = [labels[int(rng.integers(len(labels)))] for _ in gb]
    return pb, pl, gb, gl


SQ = [(0, 0), (500, 0), (500, 500), (0, 500)]
SQ_SHIFT_HALF = [(250, 0), (750, 0), (750, 500), (250, 500)]
SQ_FAR = [(625, 625), (875, 625), (875, 875), (625, 875)]  # on the 512 grid


# ---------------------------------------------------------------------------------------------
# Boxes


def test_box_iou_known_values_and_shape():
    a = np.array([[0, 0, 10, 10], [0, 0, 20, 10]], dtype=float)
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=float)
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [50 / 150, 1.0, 0.0])
    np.testing.assert_allclose(iou[1], [100 / 200, 0.5, 0.0])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)


def test_box_iou_matches_loop_reference():
    rng = np.random.default_rng(0)
    pb, _, gb, _ = random_case(rng, 12, 9)
    want = np.array([[ref_iou(p, g) for g in gb] for p in pb])
    np.testing.assert_allclose(box_iou(pb, gb), want, atol=1e-12)


def ref_giou(a, b) -> float:
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ref_iou(a, b) - (hull - union) / hull


def test_box_giou_known_values_and_loop_reference():
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [30, 0, 40, 10]], dtype=float)
    # identical; touching (hull 200, union 200); 20 apart (hull 400, union 200)
    np.testing.assert_allclose(box_giou(a, b)[0], [1.0, 0.0, -0.5])
    rng = np.random.default_rng(1)
    pb, _, gb, _ = random_case(rng, 10, 7)
    want = np.array([[ref_giou(p, g) for g in gb] for p in pb])
    np.testing.assert_allclose(box_giou(pb, gb), want, atol=1e-12)
    assert ((box_giou(pb, gb) >= -1) & (box_giou(pb, gb) <= box_iou(pb, gb) + 1e-12)).all()


def test_matched_giou_is_continuous_and_counts_boxes():
    gt = [(100, 100, 200, 200)]
    assert matched_giou(gt, ["t"], gt, ["t"]) == pytest.approx(1.0)
    assert matched_giou([], [], [], []) == 1.0
    assert matched_giou([], [], gt, ["t"]) == matched_giou(gt, ["t"], [], []) == 0.0
    assert matched_giou(gt, ["s"], gt, ["t"]) == 0.0  # right place, wrong label
    # Below IoU 0.5 (where F1@0.5 is 0 throughout) a box still earns more as it comes closer.
    far, near = [(400, 400, 500, 500)], [(160, 160, 260, 260)]
    assert box_iou(near, gt)[0, 0] < 0.5
    assert 0 < matched_giou(far, ["t"], gt, ["t"]) < matched_giou(near, ["t"], gt, ["t"]) < 1
    # An extra box halves the score of a perfect one; a missing one likewise.
    two = [*gt, (700, 700, 800, 800)]
    assert matched_giou(two, ["t", "t"], gt, ["t"]) == pytest.approx(0.5)
    assert matched_giou(gt, ["t"], two, ["t", "s"]) == pytest.approx(0.5)


def test_matched_giou_is_the_optimal_assignment():
    rng = np.random.default_rng(2)
    for _ in range(20):
        pb, pl, gb, gl = random_case(rng, 4, 3)
        same = np.array(pl, dtype=object)[:, None] == np.array(gl, dtype=object)
        score = np.where(same, (box_giou(pb, gb) + 1) / 2, 0.0)
        best = max(
            sum(score[i, j] for i, j in zip(perm, range(3), strict=False))
            for perm in itertools.permutations(range(4), 3)
        )
        assert matched_giou(pb, pl, gb, gl) == pytest.approx(best / 4)


def test_greedy_takes_highest_iou_pair_first():
    gt = [(0, 0, 100, 100), (0, 0, 100, 120)]
    pred = [(0, 0, 100, 118)]  # IoU 0.85 with gt0, 0.983 with gt1
    assert greedy_match(pred, ["a"], gt, ["a", "a"]) == [(0, 1)]
    assert match_detections(pred, ["a"], gt, ["a", "a"]) == (1, 0, 1)


def test_label_must_match_and_each_box_used_once():
    gt = [(0, 0, 100, 100)]
    assert match_detections([(0, 0, 100, 100)], ["b"], gt, ["a"]) == (0, 1, 1)
    assert match_detections([(0, 0, 100, 100)] * 2, ["a", "a"], gt, ["a"]) == (1, 1, 0)
    # IoU exactly at the threshold counts
    assert match_detections([(0, 0, 100, 100)], ["a"], [(0, 0, 200, 100)], ["a"]) == (1, 0, 0)
    assert match_detections([(0, 0, 99, 100)], ["a"], [(0, 0, 200, 100)], ["a"]) == (0, 1, 1)


def test_greedy_matches_reference_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(200):
        pb, pl, gb, gl = random_case(rng, int(rng.integers(0, 8)), int(rng.integers(0, 8)))
        got = set(greedy_match(pb, pl, gb, gl))
        assert got == ref_greedy(pb, pl, gb, gl)
        tp, fp, fn = match_detections(pb, pl, gb, gl)
        assert (tp, fp, fn) == (len(got), len(pb) - len(got), len(gb) - len(got))
        # greedy is a maximal matching: between half the maximum and the maximum
        best = max_matching(pb, pl, gb, gl)
        assert best / 2 <= tp <= best


def test_greedy_equals_optimal_when_boxes_are_separated():
    rng = np.random.default_rng(2)
    for _ in range(50):
        n = int(rng.integers(1, 7))
        cells = rng.permutation(16)[:n]  # ground truths on disjoint grid cells
        gb = [
            (c % 4 * 250 + 10, c // 4 * 250 + 10, c % 4 * 250 + 200, c // 4 * 250 + 200)
            for c in cells
        ]
        gl = ["a" if rng.random() < 0.5 else "b" for _ in gb]
        keep = rng.random(n) < 0.7
        pb = [tuple(v + rng.normal(0, 5) for v in g) for g, k in zip(gb, keep, strict=True) if k]
        pl = [lab for lab, k in zip(gl, keep, strict=True) if k]
        tp, fp, fn = match_detections(pb, pl, gb, gl)
        assert tp == max_matching(pb, pl, gb, gl) == int(keep.sum())
        assert (fp, fn) == (0, n - tp)


def test_detection_f1_values():
    gt = [(0, 0, 100, 100), (200, 200, 300, 300)]
    assert detection_f1(gt, ["a", "a"], gt, ["a", "a"]) == 1.0
    assert detection_f1(gt[:1], ["a"], gt, ["a", "a"]) == pytest.approx(2 / 3)
    assert detection_f1([], [], gt, ["a", "a"]) == 0.0
    assert detection_f1(gt, ["a", "a"], [], []) == 0.0
    assert detection_f1([], [], [], []) == 1.0
    with pytest.raises(ValueError):
        detection_f1(gt, ["a"], gt, ["a", "a"])


# ---------------------------------------------------------------------------------------------
# Average precision


def test_average_precision_hand_example():
    gt = [[(0, 0, 10, 10), (20, 20, 30, 30), (40, 40, 50, 50)]]
    pred = [[(0, 0, 10, 10), (100, 100, 110, 110), (20, 20, 30, 30)]]  # TP, FP, TP
    # precision 1 at recall 1/3, 2/3 at recall 2/3; all-point: 1/3 * 1 + 1/3 * 2/3
    assert average_precision(pred, gt) == pytest.approx(5 / 9)
    # scores reorder the ranks: both TPs first gives 2/3 of recall at precision 1
    assert average_precision(pred, gt, [[0.9, 0.1, 0.8]]) == pytest.approx(2 / 3)
    assert average_precision(gt, gt) == pytest.approx(1.0)
    assert average_precision([[]], gt) == 0.0
    assert math.isnan(average_precision(pred, [[]]))


def test_average_precision_envelope_and_duplicates():
    gt = [[(0, 0, 10, 10), (20, 20, 30, 30)]]
    # FP first then two TPs: precision 1/2 at recall 1/2, 2/3 at 1 -> envelope 2/3 everywhere
    pred = [[(90, 90, 99, 99), (0, 0, 10, 10), (20, 20, 30, 30)]]
    assert average_precision(pred, gt) == pytest.approx(2 / 3)
    # a duplicate of a matched box is a false positive
    dup = [[(0, 0, 10, 10), (0, 0, 10, 10), (20, 20, 30, 30)]]
    assert average_precision(dup, gt) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_average_precision_ranks_across_images_by_output_order():
    gt = [[(0, 0, 10, 10)], [(0, 0, 10, 10)]]
    pred = [[(0, 0, 10, 10)], [(50, 50, 60, 60), (0, 0, 10, 10)]]
    # ranks: img0#0 TP, img1#0 FP, img1#1 TP -> 1 at 1/2, 2/3 at 1
    assert average_precision(pred, gt) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_mean_average_precision_averages_labels_with_ground_truth():
    gb = [[(0, 0, 10, 10), (20, 20, 30, 30)]]
    gl = [["a", "b"]]
    pb = [[(0, 0, 10, 10), (20, 20, 30, 30), (60, 60, 70, 70)]]
    assert mean_average_precision(pb, [["a", "a", "c"]], gb, gl) == pytest.approx(0.5)
    assert mean_average_precision(pb[:1], [["a", "b", "c"]], gb, gl) == pytest.approx(1.0)
    assert math.isnan(mean_average_precision([[]], [[]], [[]], [[]]))


# ---------------------------------------------------------------------------------------------
# Masks


def test_rasterize_axis_aligned_square_exactly():
    res = 512
    mask = rasterize_polygon(SQ, res)
    assert mask.shape == (res, res)
    assert mask.sum() == 256 * 256
    assert mask[:256, :256].all() and not mask[256:].any() and not mask[:, 256:].any()
    assert rasterize_polygon([(0, 0), (1000, 0), (1000, 1000), (0, 1000)], 64).all()


def test_rasterize_row_is_y():
    tall = [(0, 0), (100, 0), (100, 1000), (0, 1000)]  # narrow in x, full height
    m = rasterize_polygon(tall, 100)
    assert m[:, :10].all() and not m[:, 10:].any()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1000), st.floats(0, 1000)),
        min_size=3,
        max_size=12,
    )
)
def test_rasterized_area_tracks_shoelace_for_convex_polygons(points):
    pts = np.array(points)
    # convex hull by angle around the centroid (a simple polygon)
    c = pts.mean(axis=0)
    order = np.argsort(np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0]))
    poly = [tuple(p) for p in pts[order]]
    res = 256
    px = (1000 / res) ** 2
    area = rasterize_polygon(poly, res).sum() * px
    perimeter = sum(math.dist(poly[i], poly[(i + 1) % len(poly)]) for i in range(len(poly)))
    # pixel-centre sampling errs by at most a band of one pixel around the boundary
    assert abs(area - polygon_area(poly)) <= perimeter * (1000 / res) + 4 * px


def test_dice_and_iou_analytic_values():
    a = SegmentationAnswer((Polygon("gland", tuple(SQ)),))
    assert dice(a, a) == 1.0 and mask_iou(a, a) == 1.0
    assert dice([SQ], [SQ_FAR]) == 0.0 and mask_iou([SQ], [SQ_FAR]) == 0.0
    assert dice([SQ], [SQ_SHIFT_HALF]) == pytest.approx(0.5)
    assert mask_iou([SQ], [SQ_SHIFT_HALF]) == pytest.approx(1 / 3)
    # a triangle covering half the square: Dice = 2 * 0.5 / 1.5
    tri = [(0, 0), (500, 0), (0, 500)]
    assert dice([tri], [SQ]) == pytest.approx(2 / 3, abs=0.01)
    assert dice([], []) == 1.0 and dice([SQ], []) == 0.0


def test_dice_is_label_aware_by_default():
    pred = [Polygon("tumour", tuple(SQ))]
    gt = [Polygon("stroma", tuple(SQ))]
    assert dice(pred, gt) == 0.0
    assert dice(pred, gt, per_label=False) == 1.0
    # pooled over labels: one label right, one wrong, equal sizes
    pred2 = [Polygon("tumour", tuple(SQ)), Polygon("tumour", tuple(SQ_FAR))]
    gt2 = [Polygon("tumour", tuple(SQ)), Polygon("stroma", tuple(SQ_FAR))]
    a_sq, a_far = 500 * 500, 250 * 250
    assert dice(pred2, gt2) == pytest.approx(2 * a_sq / (2 * a_sq + 2 * a_far))


def test_overlapping_polygons_union_not_cancel():
    masks = rasterize([SQ, SQ_SHIFT_HALF], 100, per_label=False)
    assert masks[""].sum() == 75 * 50


# ---------------------------------------------------------------------------------------------
# Labels and text


def test_accuracy_and_exact_match():
    assert exact_match("  Adenocarcinoma. ", "adenocarcinoma")
    assert exact_match("Tumour  stroma", "tumour stroma")
    assert not exact_match("tumour-stroma", "tumour stroma")
    assert accuracy(["a", "b", "c", "d"], ["A", "b", "x", "y"]) == 0.5
    assert math.isnan(accuracy([], []))


def test_macro_f1_hand_example():
    y_true = ["a", "a", "b", "c"]
    y_pred = ["a", "b", "b", "b"]
    # a: tp1 fn1 -> 2/3; b: tp1 fp2 -> 1/2; c: fn1 -> 0
    assert macro_f1(y_true, y_pred) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # a given label never seen is skipped
    assert macro_f1(y_true, y_pred, ["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert macro_f1(["a"], ["a"]) == 1.0


@pytest.mark.parametrize(
    ("pred", "ref", "want"),
    [
        ("the cat sat", "a cat sat down", 0.8),  # articles dropped: p=1, r=2/3
        ("Mitotic figures!", "mitotic figures", 1.0),
        ("no", "yes", 0.0),
        ("x b b", "b b c", 2 / 3),  # multiset overlap counts b twice
        ("the", "a", 1.0),  # both normalise to nothing
        ("the", "cat", 0.0),
    ],
)
def test_token_f1_known_examples(pred, ref, want):
    assert token_f1(pred, ref) == pytest.approx(want)


def test_token_f1_is_symmetric_in_f1():
    for a, b in itertools.product(["x y z", "y", "z z w"], repeat=2):
        assert token_f1(a, b) == pytest.approx(token_f1(b, a))
