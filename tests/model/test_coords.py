"""Coordinate transforms: known values, clipping, round trips to 1e-9, box helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from smartpath.model import coords as c
from smartpath.v1 import common_pb2

FAST = settings(max_examples=150, deadline=None, database=None)
UNIT = hnp.arrays(
    np.float64,
    st.tuples(st.integers(0, 20), st.just(2)),
    elements=st.floats(0, 1, allow_nan=False, allow_subnormal=False),
)
SIZE = st.floats(1, 100_000, allow_nan=False) | st.integers(1, 100_000).map(float)
# Regions at least 64 px wide, origins within a 200k px slide: realistic, and far enough from
# cancellation that slide → norm stays within 1e-9.
REGION = st.tuples(
    st.integers(0, 200_000),
    st.integers(0, 200_000),
    st.integers(64, 50_000),
    st.integers(64, 50_000),
)


def test_known_values() -> None:
    pts = [[0, 0], [640, 480], [320, 120]]
    assert c.roi_to_norm(pts, 640, 480).tolist() == [[0, 0], [1000, 1000], [500, 250]]
    assert c.norm_to_roi([[500, 250]], 640, 480).tolist() == [[320, 120]]
    region = (10_000, 20_000, 2_000, 1_000)
    assert c.norm_to_slide([[0, 0], [1000, 1000], [250, 500]], region).tolist() == [
        [10_000, 20_000],
        [12_000, 21_000],
        [10_500, 20_500],
    ]
    assert c.slide_to_norm([[10_500, 20_500]], region).tolist() == [[250, 500]]


def test_outputs_are_float64_and_keep_shape() -> None:
    out = c.roi_to_norm(np.zeros((2, 3, 2), dtype=np.int32), 10, 10)
    assert out.dtype == np.float64 and out.shape == (2, 3, 2)
    assert c.norm_to_slide((1, 2), (0, 0, 1, 1)).shape == (2,)


def test_into_norm_space_clips_by_default() -> None:
    outside = [[-10, 5], [700, 500]]
    assert c.roi_to_norm(outside, 640, 480).tolist() == [[0, 5 / 480 * 1000], [1000, 1000]]
    np.testing.assert_allclose(
        c.roi_to_norm(outside, 640, 480, clip=False),
        [[-15.625, 5 / 480 * 1000], [1093.75, 1000 * 500 / 480]],
    )
    assert c.slide_to_norm([[0, 0]], (100, 100, 10, 10)).tolist() == [[0, 0]]
    assert c.slide_to_norm([[0, 0]], (100, 100, 10, 10), clip=False).tolist() == [
        [-10_000, -10_000]
    ]


def test_out_of_norm_space_does_not_clip() -> None:
    assert c.norm_to_roi([[1500, -500]], 100, 100).tolist() == [[150, -50]]
    assert c.norm_to_slide([[1500, -500]], (0, 0, 100, 100)).tolist() == [[150, -50]]


def test_region_accepts_a_proto_rect() -> None:
    rect = common_pb2.Rect(x=100, y=200, width=50, height=20)
    pts = [[500, 500]]
    assert c.norm_to_slide(pts, rect).tolist() == c.norm_to_slide(pts, (100, 200, 50, 20)).tolist()
    assert c.norm_to_slide(pts, rect).tolist() == [[125, 210]]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: c.roi_to_norm([[1, 2]], 0, 10), "width and height must be finite and > 0"),
        (lambda: c.norm_to_roi([[1, 2]], 10, -1), "width and height"),
        (lambda: c.roi_to_norm([[1, 2]], float("inf"), 10), "width and height"),
        (lambda: c.roi_to_norm([[np.nan, 2]], 10, 10), "non-finite"),
        (lambda: c.roi_to_norm([1, 2, 3], 10, 10), r"shape \(\.\.\., 2\)"),
        (lambda: c.roi_to_norm(5, 10, 10), r"shape \(\.\.\., 2\)"),
        (lambda: c.box_roi_to_norm([[1, 2]], 10, 10), r"boxes must have shape \(\.\.\., 4\)"),
        (lambda: c.norm_to_slide([[1, 2]], (np.inf, 0, 1, 1)), "region origin"),
        (lambda: c.norm_to_slide([[1, 2]], (0, 0, 0, 1)), "width and height"),
    ],
)
def test_bad_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@FAST
@given(UNIT, SIZE, SIZE)
def test_roi_round_trips(unit: np.ndarray, w: float, h: float) -> None:
    pixels = unit * [w, h]
    norm = c.roi_to_norm(pixels, w, h)
    assert np.all((norm >= 0) & (norm <= 1000))
    np.testing.assert_allclose(c.norm_to_roi(norm, w, h), pixels, rtol=0, atol=1e-9)
    norm_pts = unit * 1000
    np.testing.assert_allclose(
        c.roi_to_norm(c.norm_to_roi(norm_pts, w, h), w, h), norm_pts, rtol=0, atol=1e-9
    )


@FAST
@given(UNIT, REGION)
def test_slide_round_trips(unit: np.ndarray, region: tuple[int, int, int, int]) -> None:
    x, y, w, h = region
    norm = unit * 1000
    slide = c.norm_to_slide(norm, region)
    assert np.all((slide >= [x, y]) & (slide <= [x + w, y + h]))
    np.testing.assert_allclose(c.slide_to_norm(slide, region), norm, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        c.norm_to_slide(c.slide_to_norm(slide, region), region), slide, rtol=0, atol=1e-9
    )
    # A slide region's norm space is its ROI pixel space shifted by the region's origin.
    np.testing.assert_allclose(
        slide, c.norm_to_roi(norm, w, h) + np.array([x, y]), rtol=0, atol=1e-9
    )


@FAST
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(0, 6), st.just(4)),
        elements=st.floats(0, 1000, allow_nan=False),
    ),
    REGION,
)
def test_box_helpers_map_each_corner(boxes: np.ndarray, region: tuple[int, int, int, int]) -> None:
    _, _, w, h = region
    corners = boxes.reshape(-1, 2, 2)
    cases = [
        (c.box_norm_to_roi(boxes, w, h), c.norm_to_roi(corners, w, h)),
        (c.box_norm_to_slide(boxes, region), c.norm_to_slide(corners, region)),
        (c.box_roi_to_norm(boxes, w, h), c.roi_to_norm(corners, w, h)),
        (c.box_slide_to_norm(boxes, region), c.slide_to_norm(corners, region)),
    ]
    for got, expected in cases:
        assert got.shape == boxes.shape
        np.testing.assert_array_equal(got, expected.reshape(boxes.shape))
    roi = c.box_norm_to_roi(boxes, w, h)
    np.testing.assert_allclose(c.box_roi_to_norm(roi, w, h), boxes, rtol=0, atol=1e-9)
    slide = c.box_norm_to_slide(boxes, region)
    np.testing.assert_allclose(c.box_slide_to_norm(slide, region), boxes, rtol=0, atol=1e-9)


def test_box_helpers_accept_one_box_and_batches() -> None:
    assert c.box_roi_to_norm([64, 48, 128, 96], 640, 480).tolist() == [100, 100, 200, 200]
    batch = np.tile([64, 48, 128, 96], (2, 3, 1))
    assert c.box_roi_to_norm(batch, 640, 480).shape == (2, 3, 4)
    assert c.box_roi_to_norm([-64, 0, 700, 480], 640, 480).tolist() == [0, 0, 1000, 1000]
