"""Per-slide Macenko stain normalisation: known stain vectors recovered, the do-no-harm
fallbacks, batch-size independence, and the name it gives features."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from smartpath.core.config.model import SlideTiles, StainNorm
from smartpath.model.stain_norm import (
    FIT_TILES,
    MACENKO,
    REFERENCE_STAINS,
    SlideNormaliser,
    SlideStain,
    feature_name,
    slide_normaliser,
)


def _unit(v: list[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(a) @ _unit(b), -1, 1))))


def _stained(h: np.ndarray, e: np.ndarray, n: int = 24, seed: int = 0) -> np.ndarray:
    """n 64-px uint8 tiles of random H and E concentrations (a share of pure H, pure E and
    glass pixels, :func:`_concentrations`) composed with the OD vectors h and e
    (OD = -ln((I + 1) / 256))."""
    conc = _concentrations(n, seed)
    od = conc[..., :1] * h + conc[..., 1:] * e
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def _concentrations(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.1, 1.5, size=(n, 64, 64, 2))
    kind = rng.integers(0, 4, size=(n, 64, 64))  # 0 mixed, 1 pure H, 2 pure E, 3 glass
    conc[kind == 1, 1] = 0
    conc[kind == 2, 0] = 0
    conc[kind == 3] = 0
    return conc


# Another lab's H and E: 11.6° and 18.4° from Ruifrok's. (training.stain.LAB_B's H; its E
# absorbs so little red that pure-eosin pixels never pass Macenko's tissue cut, every channel's
# OD above beta, so its estimate comes from mixed pixels and lies ~15° off.)
LAB_H, LAB_E = _unit([0.50, 0.76, 0.41]), _unit([0.15, 0.90, 0.40])


def test_recovers_known_stain_vectors_and_rescales_them() -> None:
    tiles = _stained(LAB_H, LAB_E)
    stain = SlideStain.fit(tiles)
    assert not stain.fallback
    assert _angle(stain.stains[0], LAB_H) < 1 and _angle(stain.stains[1], LAB_E) < 1
    # Re-composed with the reference vectors: read back with them, each stain is the tissue's
    # own concentration times one factor per slide (the rescale to the reference strength).
    out = stain.apply(tiles)
    conc = -np.log((out + 1.0) / 256.0) @ np.linalg.inv(REFERENCE_STAINS)
    true = _concentrations(24, 0)
    unsaturated = (out > 2).all(-1) & (out < 253).all(-1)
    for k in range(2):
        pixels = unsaturated & (true[..., k] > 0.5)
        ratio = conc[..., k][pixels] / true[..., k][pixels]
        assert np.median(ratio) == pytest.approx(stain.scale[k], rel=0.03)
        assert np.percentile(np.abs(ratio / stain.scale[k] - 1), 90) < 0.05
    assert np.abs(conc[..., 2][unsaturated]).max() < 0.03  # no residual left


def test_little_tissue_falls_back_to_the_reference_without_rescale() -> None:
    tiles = np.full((FIT_TILES, 64, 64, 3), 240, np.uint8)
    tiles[:, :4, :4] = _stained(LAB_H, LAB_E, n=FIT_TILES)[:, :4, :4]  # a few stained pixels
    stain = SlideStain.fit(tiles)
    assert stain.fallback
    np.testing.assert_array_equal(stain.stains, REFERENCE_STAINS[:2])
    np.testing.assert_array_equal(stain.scale, [1.0, 1.0])
    # Read with the reference vectors, H and E stay as they were; only the residual goes.
    inverse = np.linalg.inv(REFERENCE_STAINS)
    before = -np.log((tiles[:, :4, :4] + 1.0) / 256.0) @ inverse
    after = -np.log((stain.apply(tiles)[:, :4, :4] + 1.0) / 256.0) @ inverse
    np.testing.assert_allclose(after[..., :2], before[..., :2], atol=0.03)
    assert np.abs(after[..., 2]).max() < 0.03 < np.abs(before[..., 2]).max()


@pytest.mark.parametrize(
    ("h", "e"),
    [
        ([0.27, 0.57, 0.78], [0.07, 0.99, 0.11]),  # DAB for hematoxylin: 37° from Ruifrok's H
        ([0.65, 0.70, 0.29], [0.05, 0.60, 0.80]),  # an "eosin" 45° from Ruifrok's E
    ],
)
def test_an_implausible_estimate_falls_back(h: list[float], e: list[float]) -> None:
    tiles = _stained(_unit(h), _unit(e))
    stain = SlideStain.fit(tiles)
    assert stain.fallback
    np.testing.assert_array_equal(stain.stains, REFERENCE_STAINS[:2])
    np.testing.assert_array_equal(stain.scale, [1.0, 1.0])


def test_the_normaliser_fits_on_the_first_tiles_whatever_the_batches() -> None:
    tiles = np.concatenate([_stained(LAB_H, LAB_E, n=FIT_TILES, seed=1), _stained(LAB_E, LAB_H)])
    want = SlideStain.fit(tiles[:FIT_TILES]).apply(tiles)
    for size in (3, FIT_TILES, len(tiles)):
        normaliser = SlideNormaliser()
        got = [b for i in range(0, len(tiles), size) for b in normaliser.feed(tiles[i : i + size])]
        got += normaliser.finish()
        np.testing.assert_array_equal(np.concatenate(got), want)
    few = SlideNormaliser()  # a slide with fewer tiles than the fit sample
    assert few.feed(tiles[:5]) == []
    np.testing.assert_array_equal(
        np.concatenate(few.finish()), SlideStain.fit(tiles[:5]).apply(tiles[:5])
    )


def test_names_and_the_config_switch() -> None:
    assert typing.get_args(StainNorm) == (MACENKO,)
    assert SlideTiles().stain_norm is None  # off unless a model says so
    assert slide_normaliser(None) is None and isinstance(slide_normaliser(MACENKO), SlideNormaliser)
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        slide_normaliser("reinhard")
    assert feature_name("stain-stats-v1", None) == "stain-stats-v1"
    assert feature_name("stain-stats-v1", MACENKO) == "stain-stats-v1+macenko-v1"
