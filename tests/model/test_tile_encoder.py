"""The weight-free tile encoder: shapes, determinism, input checks, and that it tells the
synthetic tissue components (cellular / stroma / adipose) apart."""

from __future__ import annotations

import numpy as np
import pytest

from smartpath.model.tile_encoder import (
    TILE_ENCODERS,
    StainStatsEncoder,
    TileEncoder,
    make_tile_encoder,
)
from smartpath.training.synthetic.slides import SyntheticTissue

TILE, DOWNSAMPLE = 96, 2.0  # the feature extraction defaults: 96 px at 0.5 µm/px of 0.25 µm/px
FOOTPRINT = int(TILE * DOWNSAMPLE)
COMPONENTS = ("cellular", "stroma", "adipose")


def _random_tiles(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _component_tiles(seed: int, size: int = 4096, per_class: int = 12) -> dict[int, np.ndarray]:
    """Tiles rendered where one component dominates (>= 80 % weight) and all is tissue."""
    tissue = SyntheticTissue(size, size, seed)
    spots: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
    for y in range(0, size - FOOTPRINT, FOOTPRINT):
        for x in range(0, size - FOOTPRINT, FOOTPRINT):
            if tissue.is_glass(x, y, FOOTPRINT, FOOTPRINT):
                continue
            if tissue.tissue_mask(x, y, 8, 8, FOOTPRINT / 8).mean() < 0.95:
                continue
            # The generator's own weight fields (as training/synthetic/dataset.py measures them).
            w_cell, w_fat, _ = tissue._class_planes(x, y, 8, 8, FOOTPRINT / 8)
            cell, fat = float(np.mean(w_cell)), float(np.mean(w_fat))
            weights = (cell, 1.0 - cell - fat, fat)
            k = int(np.argmax(weights))
            if weights[k] >= 0.8 and len(spots[k]) < per_class:
                spots[k].append((x, y))
    return {
        k: np.stack([tissue.render(x, y, TILE, TILE, DOWNSAMPLE) for x, y in xy])
        for k, xy in spots.items()
        if xy
    }


@pytest.fixture(scope="module")
def component_tiles() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(train, test) component tiles from two different synthetic slides."""
    return _component_tiles(seed=1), _component_tiles(seed=2)


def test_shapes_dtype_and_determinism() -> None:
    enc = make_tile_encoder("stain-stats-v1")
    assert isinstance(enc, StainStatsEncoder) and isinstance(enc, TileEncoder)
    assert enc.name == "stain-stats-v1" and enc.dim == 32
    assert len(StainStatsEncoder.feature_names) == 32
    tiles = _random_tiles(5)
    out = enc.encode(tiles)
    assert out.shape == (5, 32) and out.dtype == np.float32 and np.isfinite(out).all()
    assert np.array_equal(out, make_tile_encoder("stain-stats-v1").encode(tiles.copy()))
    # Each tile's features depend on that tile only, whatever the batch.
    np.testing.assert_allclose(enc.encode(tiles[2:3])[0], out[2], rtol=1e-5, atol=1e-5)
    assert enc.encode(tiles[:0]).shape == (0, 32)
    # Different content, different features.
    assert not np.allclose(out[0], enc.encode(np.full((1, 64, 64, 3), 240, np.uint8))[0])


def test_rejects_bad_input() -> None:
    enc = StainStatsEncoder()
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(_random_tiles(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enc.encode(_random_tiles(2)[..., :2])
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enc.encode(_random_tiles(1)[0])


def test_unknown_encoder_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown tile encoder 'uni'.*stain-stats-v1"):
        make_tile_encoder("uni")
    assert set(TILE_ENCODERS) == {"stain-stats-v1"}


@pytest.mark.parametrize("name", ["vit:0123456789ab", "dinov2:0123456789ab"])
def test_learned_encoder_names_need_a_path(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}' is a learned encoder.*tile_encoder_path"):
        make_tile_encoder(name)


def test_fat_vacuoles_are_not_glass() -> None:
    """Bright pixels ringed by tissue count as fat; glass beside a straight edge does not."""
    enc = StainStatsEncoder()
    names = StainStatsEncoder.feature_names
    pink, white = np.array([200, 120, 170], np.uint8), np.array([245, 245, 245], np.uint8)
    edge = np.empty((96, 96, 3), np.uint8)
    edge[:, :48], edge[:, 48:] = pink, white  # half tissue, half glass
    fat = np.empty((96, 96, 3), np.uint8)
    fat[...] = white
    fat[::24], fat[:, ::24] = pink, pink  # membranes around 23 px vacuoles
    fat[-1], fat[:, -1] = pink, pink  # ... closed at the tile's far borders too
    raw = enc.raw_features(np.stack([edge, fat]))
    glass, fat_frac = raw[:, names.index("glass_fraction")], raw[:, names.index("fat_fraction")]
    assert glass[0] == pytest.approx(0.5, abs=0.01) and fat_frac[0] < 0.01
    assert fat_frac[1] > 0.8 and glass[1] < 0.01


def test_separates_synthetic_tissue_components(
    component_tiles: tuple[dict[int, np.ndarray], dict[int, np.ndarray]],
) -> None:
    train, test = component_tiles
    enc = StainStatsEncoder()
    for split in (train, test):
        assert sorted(split) == [0, 1, 2] and all(len(v) >= 5 for v in split.values())
    # Nearest centroid, centroids from one slide, evaluated on another slide.
    centroids = np.stack([enc.encode(train[k]).mean(axis=0) for k in range(3)])
    feats = np.concatenate([enc.encode(test[k]) for k in range(3)])
    labels = np.concatenate([np.full(len(test[k]), k) for k in range(3)])
    pred = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels).mean() >= 0.95, np.bincount(labels * 3 + pred, minlength=9)

    # Key dims: class means lie several within-class standard deviations apart.
    names = StainStatsEncoder.feature_names
    raw = {k: enc.raw_features(np.concatenate([train[k], test[k]])) for k in range(3)}

    def gap(dim: str, a: int, b: int) -> float:
        i = names.index(dim)
        spread = max(raw[a][:, i].std(), raw[b][:, i].std(), 1e-6)
        return abs(raw[a][:, i].mean() - raw[b][:, i].mean()) / spread

    assert gap("nuclei_fraction", 0, 1) > 4  # cellular vs stroma
    assert gap("h_share", 0, 1) > 4
    assert gap("fibre_fraction", 1, 0) > 3  # stroma's eosinophilic fibres
    assert gap("fat_fraction", 2, 1) > 4  # adipose vs stroma
    assert gap("tissue_fraction", 2, 0) > 4
    # Standardised features stay roughly unit scale on real-looking tissue.
    all_feats = np.concatenate([enc.encode(v) for v in train.values()])
    assert np.median(np.abs(all_feats)) < 2.0 and np.abs(all_feats).max() < 20.0
