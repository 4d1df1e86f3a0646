"""Stain in optical density: deconvolution round trips, HED augmentation, re-staining as
another lab, the re-stained held-out manifest, and jittered training batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smartpath.core.config.training import TrainingConfig
from smartpath.model.grammar import Task
from smartpath.model.stain_norm import FIT_TILES, MACENKO, SlideStain
from smartpath.model.tile_encoder import StainStatsEncoder
from smartpath.training.data import load_items
from smartpath.training.features import extract_slide_features
from smartpath.training.manifest import read_manifest
from smartpath.training.sft import step_batch
from smartpath.training.stain import (
    HED,
    LAB_B,
    LAB_B_STAINING,
    Restaining,
    compose,
    concentrations,
    jitter_stains,
    random_staining,
    restain,
    restain_manifest,
)
from smartpath.training.synthetic.dataset import generate_roi_dataset
from smartpath.training.synthetic.roi import COMPACT, TISSUE_CLASSES, render_roi
from smartpath.training.synthetic.slides import write_synthetic_slide


@pytest.fixture(scope="module")
def roi() -> np.ndarray:
    return render_roi(np.random.default_rng(5), "tumour", 224).image


def test_deconvolution_round_trips(roi) -> None:
    assert np.abs(compose(concentrations(roi)).astype(int) - roi).max() <= 1
    conc = concentrations(roi)
    # Nuclei are hematoxylin: the darkest-blue pixels carry far more H than the rest.
    h = conc[..., 0]
    assert h[roi[..., 2].astype(int) - roi[..., 0] > 40].mean() > 3 * h.mean()


def test_jitter_is_seeded_small_and_keeps_the_tissue(roi) -> None:
    assert jitter_stains(roi, np.random.default_rng(0), 0.0) is roi
    a = jitter_stains(roi, np.random.default_rng(1), 0.1)
    b = jitter_stains(roi, np.random.default_rng(1), 0.1)
    assert np.array_equal(a, b) and not np.array_equal(a, roi)
    assert 0 < np.abs(a.astype(int) - roi).mean() < 25
    h0, h1 = concentrations(roi)[..., 0].ravel(), concentrations(a)[..., 0].ravel()
    assert np.corrcoef(h0, h1)[0, 1] > 0.99  # a colour change, not a different image
    with pytest.raises(ValueError, match="sigma"):
        jitter_stains(roi, np.random.default_rng(0), -0.1)


def test_restain_is_the_same_tissue_in_another_labs_stain(roi) -> None:
    shifted = restain(roi)
    assert np.abs(shifted.reshape(-1, 3).mean(0) - roi.reshape(-1, 3).mean(0)).max() > 10
    # Read with the other lab's vectors, the stains are the original ones at its strengths.
    # (Within the range a uint8 can hold: the darkest pixels saturate.)
    want = concentrations(roi)
    got = concentrations(shifted, LAB_B)
    unsaturated = (shifted > 2).all(-1) & (shifted < 253).all(-1)
    for stain, strength in enumerate(LAB_B_STAINING.scale[:2]):
        err = np.abs(got[..., stain] - strength * want[..., stain])[unsaturated]
        assert np.median(err) < 0.02, (stain, np.median(err))


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b, -1, 1))))


def test_random_stainings_tilt_hue_and_cover_the_held_out_lab() -> None:
    rng = np.random.default_rng(0)
    draws = [random_staining(rng, 0.3) for _ in range(400)]
    for d in draws:
        assert np.allclose(np.linalg.norm(d.stains, axis=1), 1.0) and (d.stains >= 0).all()
        assert np.allclose(d.stains[2], HED[2])  # the residual channel stays
    tilt_h = np.array([_angle(d.stains[0], HED[0]) for d in draws])
    tilt_e = np.array([_angle(d.stains[1], HED[1]) for d in draws])
    assert 5 < np.median(tilt_h) < 20 and 5 < np.median(tilt_e) < 20
    # The held-out lab is never drawn, but training's range reaches its hue and strengths.
    assert (tilt_h > _angle(LAB_B[0], HED[0])).mean() > 0.1
    assert (tilt_e > _angle(LAB_B[1], HED[1])).mean() > 0.01
    scale = np.array([d.scale for d in draws])
    assert scale[:, 0].max() > 1.25 and scale[:, 1].min() < 0.75
    assert random_staining(np.random.default_rng(0), 0.0).scale.tolist() == [1.0, 1.0, 1.0]


class CapturingEncoder(StainStatsEncoder):
    """stain-stats, keeping the tiles it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.tiles: list[np.ndarray] = []

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        self.tiles.append(tiles.copy())
        return super().encode(tiles)


def test_slides_are_restained_before_the_stain_normalisation(tmp_path: Path) -> None:
    slide = tmp_path / "small.svs"
    write_synthetic_slide(slide, width=1536, height=1280, seed=3, workers=1)
    raw = CapturingEncoder()
    extract_slide_features(slide, raw)
    tiles = np.concatenate(raw.tiles)
    encoder, lab_b = StainStatsEncoder(), Restaining(LAB_B_STAINING, "lab-b")

    shifted = extract_slide_features(slide, encoder, transform=lab_b)
    assert shifted.encoder == "stain-stats-v1+stain-lab-b"
    np.testing.assert_array_equal(shifted.features, encoder.encode(restain(tiles)))

    feats = extract_slide_features(slide, encoder, transform=lab_b, stain_norm=MACENKO)
    assert feats.encoder == "stain-stats-v1+stain-lab-b+macenko-v1"
    restained = restain(tiles)  # the normaliser sees, and is fitted on, the other lab's stain
    want = SlideStain.fit(restained[:FIT_TILES]).apply(restained)
    np.testing.assert_array_equal(feats.features, encoder.encode(want))
    wrong_order = restain(SlideStain.fit(tiles[:FIT_TILES]).apply(tiles))
    assert not np.allclose(feats.features, encoder.encode(wrong_order), atol=0.05)


def test_stain_normalisation_brings_another_labs_features_close() -> None:
    """The same tissue, plain and as LAB_B stains it: each normalised on its own fit, their
    stain-stats features lie several times closer than without normalisation."""
    encoder = StainStatsEncoder()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        images = [render_roi(rng, c, 192).image[..., :3] for c in TISSUE_CLASSES for _ in range(2)]
        tiles = np.stack(
            [im[y : y + 96, x : x + 96] for im in images for y in (0, 96) for x in (0, 96)]
        )
        tiles = tiles[rng.permutation(len(tiles))]  # one "slide" of 40 tiles
        shifted = restain(tiles)
        before = np.abs(encoder.encode(tiles) - encoder.encode(shifted)).mean()
        a, b = SlideStain.fit(tiles[:FIT_TILES]), SlideStain.fit(shifted[:FIT_TILES])
        assert not a.fallback and not b.fallback
        after = np.abs(encoder.encode(a.apply(tiles)) - encoder.encode(b.apply(shifted))).mean()
        assert before > 3 * after, (seed, before, after)


def test_restained_manifest_is_a_held_out_set(tmp_path: Path) -> None:
    manifest = generate_roi_dataset(
        tmp_path / "plain", 4, seed=9, profile=COMPACT, splits=(0.5, 0, 0.5),
        tasks=(Task.CLASSIFICATION, Task.DETECTION),
    )  # fmt: skip
    shifted = restain_manifest(manifest, tmp_path / "shifted", split="test")
    plain = [s for s in read_manifest(str(manifest)) if s.split == "test"]
    again = read_manifest(str(shifted))
    assert [(s.id, s.target, s.task) for s in again] == [(s.id, s.target, s.task) for s in plain]
    before = load_items([str(manifest)], "test")
    after = load_items([str(shifted)], "test")
    for (_, a), (_, b) in zip(before, after, strict=True):
        assert np.array_equal(np.asarray(b), restain(np.asarray(a)[..., :3]))
    with pytest.raises(ValueError, match="no ROI samples"):
        restain_manifest(manifest, tmp_path / "none", split="val")


def test_training_batches_are_jittered_and_reproducible(tmp_path: Path) -> None:
    manifest = generate_roi_dataset(
        tmp_path / "d", 3, seed=2, profile=COMPACT, splits=(1, 0, 0), tasks=(Task.CLASSIFICATION,)
    )
    items = load_items([str(manifest)], "train")
    plain = TrainingConfig(data={"scale_weights": {"roi": 1.0, "wsi": 0.0}})
    jittered = plain.model_copy(
        update={"data": plain.data.model_copy(update={"stain_jitter": 0.1})}
    )
    a = step_batch(items, jittered, 0, 3, 4)
    b = step_batch(items, jittered, 0, 3, 4)
    base = step_batch(items, plain, 0, 3, 4)
    assert [s.id for s, _ in a] == [s.id for s, _ in base]  # same samples drawn
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))  # resumable
    assert not any(
        np.array_equal(x, np.asarray(y)[..., :3]) for (_, x), (_, y) in zip(a, base, strict=True)
    )
