"""Reads are bounded by the answer, not the slide: thumbnails, tissue masks and regions read
at most ``tiling.max_read_pixels`` source pixels, open slides are bounded in bytes, and a
100,000² px single-level slide plans in a fresh process under 1 GiB."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from smartpath.core.config import load_config
from smartpath.core.errors import InvalidArgumentError
from smartpath.core.slides import slide as slide_module
from smartpath.core.slides.plan import tile_geometry
from smartpath.core.slides.slide import Slide
from smartpath.core.slides.tiler import Tiler, TileRequest

EDGE, TILE = 100_000, 512
TISSUE_TILES = (40, 60, 40, 70)  # rows 40–59 and columns 40–69 of 512-px tiles hold "tissue"
STAIN = (200, 120, 180)


def _sparse_tissue_tile(row: int, col: int) -> np.ndarray | None:
    r0, r1, c0, c1 = TISSUE_TILES
    if r0 <= row < r1 and c0 <= col < c1:
        return np.full((TILE, TILE, 3), STAIN, np.uint8)
    if row == col == 0:  # tifffile takes the dtype from the first tile: glass
        return np.full((TILE, TILE, 3), 245, np.uint8)
    return None  # not written: OpenSlide reads it as transparent, i.e. white glass


@pytest.fixture(scope="module")
def sparse_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100,000² px single-level JPEG-tiled TIFF at 0.25 µm/px (~3 MB): a 10 x 15 mm block
    of stain, the rest unwritten tiles."""
    path = tmp_path_factory.mktemp("sparse") / "single-level.tif"
    n = -(-EDGE // TILE)
    tifffile.imwrite(
        path,
        (_sparse_tissue_tile(r, c) for r in range(n) for c in range(n)),
        shape=(EDGE, EDGE, 3),
        dtype=np.uint8,
        tile=(TILE, TILE),
        compression="jpeg",
        photometric="rgb",
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    return path


class CountingSlide(Slide):
    """A slide that adds up the source pixels every read asks of OpenSlide."""

    read_px = 0

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        self.read_px += width * height
        return super().read_region(level, x, y, width, height)


def _tiler(root: Path, **tiling: object) -> Tiler:
    return Tiler(
        load_config(
            tiling={"local_slide_roots": [root], **tiling},
            storage={"local_root": root / "store"},
            slide_cache={"dir": root / "cache"},
        )
    )


def test_sparse_slide_is_single_level(sparse_slide: Path) -> None:
    info = Slide.open(sparse_slide).info
    assert (info.width, info.height, len(info.level_dimensions)) == (EDGE, EDGE, 1)
    assert info.mpp == pytest.approx(0.25)


def test_reads_of_a_single_level_slide_stay_within_the_budget(sparse_slide: Path) -> None:
    budget = 1 << 26
    slide = CountingSlide.open(sparse_slide)
    thumb = slide.thumbnail(2048, max_read_px=budget)
    # Not 2048: 100k-px rows, one per output row, fit 671 times in 64 Mpx.
    assert max(thumb.shape[:2]) == budget // EDGE
    assert slide.read_px <= budget
    # The stain block shows where it lies: rows/cols 40–60/40–70 of 196 tiles.
    scale = thumb.shape[0] / EDGE
    inside = thumb[round(50 * TILE * scale), round(55 * TILE * scale)]
    assert np.abs(inside.astype(int) - STAIN).max() <= 8
    assert (thumb[5, 5] >= 240).all()

    slide.read_px = 0
    region = slide.region_at(0, 0, 40_000, 40_000, 1250, 1250, max_read_px=budget)
    assert region.shape == (1250, 1250, 3) and slide.read_px <= budget
    with pytest.raises(InvalidArgumentError, match="pyramidal TIFF") as refused:
        slide.region_at(0, 0, EDGE, EDGE, 4000, 4000, max_read_px=budget)
    assert str(sparse_slide) not in str(refused.value)
    with pytest.raises(InvalidArgumentError, match="level 0"):
        slide.fit_size(EDGE, EDGE, 100, 100, EDGE - 1)  # not one row fits


def test_tiles_far_coarser_than_the_only_level_are_refused(sparse_slide: Path) -> None:
    info = Slide.open(sparse_slide).info
    assert tile_geometry(info, mpp=2.0, tile_size=256, overlap=0).read_size == 2048
    with pytest.raises(InvalidArgumentError, match="oversampled"):
        tile_geometry(info, mpp=4.0, tile_size=256, overlap=0)


def test_tissue_plan_of_a_single_level_slide(sparse_slide: Path) -> None:
    tiler = _tiler(sparse_slide.parent, max_read_pixels=1 << 27)
    opened = tiler.open(str(sparse_slide))
    plan, tissue = tiler.plan(opened, TileRequest(mpp=0.5, tile_size=256))
    # The mask shrank from 3125 px (8 µm/px) to what 128 Mpx of 100k-px rows allows.
    assert max(tissue.mask.shape) == (1 << 27) // EDGE
    r0, r1, c0, c1 = (v * TILE for v in TISSUE_TILES)
    centre_x, centre_y = plan.x + 256, plan.y + 256  # tiles are 512 level-0 px
    inside = (centre_x >= c0) & (centre_x < c1) & (centre_y >= r0) & (centre_y < r1)
    assert inside.all()
    assert len(plan) >= 0.95 * ((r1 - r0) // 512) * ((c1 - c0) // 512)
    tiler.close()


def test_strided_tissue_mask_matches_the_full_read(synthetic_svs) -> None:
    full = _tiler(synthetic_svs.path.parent, tissue_mpp=8.0)
    strided = _tiler(synthetic_svs.path.parent, tissue_mpp=8.0, max_read_pixels=1 << 16)
    masks = []
    for tiler in (full, strided):
        opened = tiler.open(str(synthetic_svs.path))
        masks.append(tiler.tissue(opened))
        tiler.close()
    # A mask at 8 µm/px is 192 x 160 px, read from level 2, 384 x 320 px, 123k px: over 64k,
    # so each of the mask's 160 rows reads one of the two level rows it covers.
    a, b = (m.mask for m in masks)
    assert a.shape == b.shape == (160, 192)
    iou = (a & b).sum() / (a | b).sum()
    assert iou > 0.9, iou


def test_banded_reads_equal_one_read(synthetic_svs, monkeypatch: pytest.MonkeyPatch) -> None:
    slide = Slide.open(synthetic_svs.path)
    whole = slide.region_at(0, 0, 6144, 5120, 768, 640, max_read_px=1 << 28)
    monkeypatch.setattr(slide_module, "READ_CHUNK_PX", 1 << 14)
    banded = slide.region_at(0, 0, 6144, 5120, 768, 640, max_read_px=1 << 28)
    assert np.array_equal(whole, banded)


def _png(path: Path, side: int) -> Path:
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(path)
    return path


def test_open_slides_are_bounded_in_bytes(tmp_path: Path) -> None:
    tiler = _tiler(tmp_path, open_slide_bytes=1 << 20)
    images = [_png(tmp_path / f"roi{i}.png", 400) for i in range(4)]  # 480,000 B decoded
    for image in images:
        tiler.open(str(image))
        assert tiler._open_bytes() <= 1 << 20
    assert len(tiler._slides) == 2
    with pytest.raises(InvalidArgumentError, match="MiB the tiler keeps open"):
        tiler.open(str(_png(tmp_path / "big.png", 600)))  # 1,080,000 B
    tiler.close()


PLAN_SCRIPT = """
import json, re, sys
from smartpath.core.config import load_config
from smartpath.core.slides.tiler import Tiler, TileRequest

path = sys.argv[1]
tiler = Tiler(load_config(tiling={"local_slide_roots": [sys.argv[2]]},
                          storage={"local_root": sys.argv[2]}, slide_cache={"dir": sys.argv[3]}))
opened = tiler.open(path)
plan, tissue = tiler.plan(opened, TileRequest(mpp=0.5, tile_size=224))
thumb = tiler.thumbnail(opened, 1024)
status = open("/proc/self/status").read()
rss = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024
print(json.dumps({"planned": len(plan), "mask": list(tissue.mask.shape),
                  "thumb": list(thumb.shape), "rss_mb": rss}))
"""


def test_a_100k_single_level_slide_plans_under_1_gib(sparse_slide: Path, tmp_path: Path) -> None:
    """Planning reads a tissue mask of a slide whose one level is 30 GB of RGB; a fresh
    process's peak RSS (VmHWM) stays under 1 GiB."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(PLAN_SCRIPT),
            str(sparse_slide),
            str(sparse_slide.parent),
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    r0, r1, c0, c1 = TISSUE_TILES
    tissue_tiles = (r1 - r0) * (c1 - c0) * (TILE / 448) ** 2  # 224 px at 0.5 µm/px = 448 px
    assert 0.9 * tissue_tiles <= result["planned"] <= 1.1 * tissue_tiles, result
    assert max(result["thumb"]) == 1024
    assert result["mask"][0] == (1 << 28) // EDGE  # 8 µm/px would be 3125 rows
    assert result["rss_mb"] < 1024, result
