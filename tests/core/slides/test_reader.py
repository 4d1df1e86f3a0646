"""Tile reading: the JPEG fast path against OpenSlide read-and-resize, fallbacks, bad data."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from smartpath.core.errors import InvalidArgumentError
from smartpath.core.slides.plan import TileGeometry, plan_tiles, tile_geometry
from smartpath.core.slides.reader import TileReader
from smartpath.core.slides.slide import Slide, resize
from smartpath.training.synthetic.slides import SyntheticTissue

# Tolerance between a DCT-scaled decode and OpenSlide's full decode + area resize.
MEAN_TOLERANCE = 1.5
P99_TOLERANCE = 6


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


def _all_tiles(slide: Slide, g: TileGeometry):
    mask = np.ones((4, 4), bool)
    return plan_tiles(
        g,
        key="t",
        tissue_mask=mask,
        mask_downsample=max(slide.info.width, slide.info.height) / 4,
        min_tissue_fraction=0.0,
    )


def _reference(slide: Slide, g: TileGeometry, xs, ys) -> np.ndarray:
    return np.stack(
        [
            resize(
                slide.read_region(g.level, int(x), int(y), g.read_size, g.read_size),
                g.tile_size,
                g.tile_size,
            )
            for x, y in zip(xs, ys, strict=True)
        ]
    )


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() < MEAN_TOLERANCE, diff.mean()
    assert np.percentile(diff, 99) <= P99_TOLERANCE


@pytest.mark.parametrize(
    ("mpp", "tile_size", "overlap"),
    [(0.5, 256, 0), (0.25, 256, 0), (1.0, 224, 0), (0.5, 256, 32), (0.37, 128, 0), (2.0, 256, 0)],
)
def test_fast_path_matches_read_and_resize(synthetic_svs, pool, mpp, tile_size, overlap) -> None:
    slide = Slide.open(synthetic_svs.path)
    g = tile_geometry(slide.info, mpp=mpp, tile_size=tile_size, overlap=overlap)
    plan = _all_tiles(slide, g)
    pick = np.linspace(0, len(plan) - 1, min(len(plan), 24)).astype(int)
    xs, ys = plan.x[pick], plan.y[pick]
    with TileReader(slide, g, pool) as reader:
        assert reader.fast_path
        tiles = reader.read(xs, ys)
    assert tiles.shape == (len(pick), tile_size, tile_size, 3) and tiles.dtype == np.uint8
    _assert_close(tiles, _reference(slide, g, xs, ys))


def test_physical_area_matches_direct_read(synthetic_svs, pool) -> None:
    """A 0.5 µm/px tile from a 0.25 µm/px slide covers 2x its pixels at level 0."""
    slide = Slide.open(synthetic_svs.path)
    g = tile_geometry(slide.info, mpp=0.5, tile_size=256, overlap=0)
    truth = SyntheticTissue(synthetic_svs.width, synthetic_svs.height, synthetic_svs.seed)
    coarse = truth.tissue_mask(0, 0, slide.info.width // 512, slide.info.height // 512, 512)
    row, col = np.argwhere(coarse)[len(np.argwhere(coarse)) // 2]
    x, y = int(col) * 512, int(row) * 512  # a tile inside tissue
    with TileReader(slide, g, pool) as reader:
        tile = reader.read(np.array([x]), np.array([y]))[0]
    direct = slide.read_region(0, x, y, 512, 512)
    _assert_close(tile, resize(direct, 256, 256))
    # And it is not the same as reading 256 px of level 0 (half the area).
    assert np.abs(tile.astype(int) - slide.read_region(0, x, y, 256, 256)).mean() > 5


def test_generic_tiff_edges_and_levels(synthetic_tiff, pool) -> None:
    slide = Slide.open(synthetic_tiff.path)
    for mpp in (0.5, 1.0, 2.0):
        g = tile_geometry(slide.info, mpp=mpp, tile_size=256, overlap=0)
        plan = _all_tiles(slide, g)
        with TileReader(slide, g, pool) as reader:
            assert reader.fast_path
            tiles = reader.read(plan.x, plan.y)
        _assert_close(tiles, _reference(slide, g, plan.x, plan.y))
        # The last column runs past the slide edge: padded white, as OpenSlide reads it.
        assert (tiles[plan.col == plan.col.max()][:, :, -1] >= 250).all()


def test_openslide_fallback_for_other_formats(openslide_fixtures: Path, pool) -> None:
    slide = Slide.open(openslide_fixtures / "boxes_0.dcm", mpp_override=0.25)
    g = tile_geometry(slide.info, mpp=0.25, tile_size=64, overlap=0)
    plan = _all_tiles(slide, g)
    with TileReader(slide, g, pool) as reader:
        assert not reader.fast_path
        tiles = reader.read(plan.x, plan.y)
    assert np.array_equal(tiles, _reference(slide, g, plan.x, plan.y))


def test_batches_cover_plan_in_order(synthetic_svs, pool) -> None:
    slide = Slide.open(synthetic_svs.path)
    g = tile_geometry(slide.info, mpp=1.0, tile_size=128, overlap=0)
    plan = _all_tiles(slide, g)
    with TileReader(slide, g, pool) as reader:
        whole = reader.read(plan.x, plan.y)
        batches = list(reader.iter_batches(plan.x, plan.y, batch_size=7))
    assert [offset for offset, _ in batches] == list(range(0, len(plan), 7))
    assert np.array_equal(np.concatenate([b for _, b in batches]), whole)


def test_corrupt_tile_data_is_invalid_argument(synthetic_svs, tmp_path: Path, pool) -> None:
    import tifffile

    data = bytearray(synthetic_svs.path.read_bytes())
    with tifffile.TiffFile(synthetic_svs.path) as tif:
        page = tif.pages[0]
        counts = np.asarray(page.databytecounts)
        index = int(np.argmax(counts))  # a tissue tile (largest JPEG)
        offset, count = int(page.dataoffsets[index]), int(counts[index])
        cols = -(-page.imagewidth // page.tilewidth)
    data[offset + 2 : offset + count] = b"\x00" * (count - 2)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(data))
    slide = Slide.open(bad)
    g = tile_geometry(slide.info, mpp=0.25, tile_size=256, overlap=0)
    x, y = (index % cols) * 256, (index // cols) * 256
    with TileReader(slide, g, pool) as reader, pytest.raises(InvalidArgumentError):
        reader.read(np.array([x]), np.array([y]))


def test_rgb_coded_jpeg_decodes_like_openslide(openslide_fixtures: Path, pool) -> None:
    """Aperio's JPEG tiles hold RGB without YCbCr conversion (TIFF Photometric RGB)."""
    slide = Slide.open(openslide_fixtures / "small.svs")
    g = tile_geometry(slide.info, mpp=slide.info.mpp, tile_size=16, overlap=0)
    with TileReader(slide, g, pool) as reader:
        assert reader.fast_path
        tile = reader.read(np.array([0]), np.array([0]))
    assert np.array_equal(tile[0], slide.read_region(0, 0, 0, 16, 16))
