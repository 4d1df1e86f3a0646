"""The seeded synthetic slide writer: real files OpenSlide reads, right pixels, bounded memory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage

from smartpath.training.synthetic.slides import (
    SyntheticSlide,
    SyntheticTissue,
    write_synthetic_slide,
)

# Not a multiple of the tile size, so edge tiles and rounded level sizes are exercised.
WIDTH, HEIGHT = 3000, 2000
SEED = 5


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    return write_synthetic_slide(path, width=WIDTH, height=HEIGHT, fmt="svs", seed=SEED)


@pytest.fixture(scope="module")
def tiff(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    path = tmp_path_factory.mktemp("tiff") / "slide.tiff"
    return write_synthetic_slide(
        path, width=WIDTH, height=HEIGHT, fmt="tiff", mpp=0.5, seed=SEED, workers=1
    )


@pytest.fixture(scope="module")
def tissue() -> SyntheticTissue:
    return SyntheticTissue(WIDTH, HEIGHT, SEED)


def tissue_point(tissue: SyntheticTissue, size: int) -> tuple[int, int]:
    """Top-left (16-px aligned) of a size x size level-0 window deep inside tissue."""
    d = 16
    mask = tissue.tissue_mask(0, 0, WIDTH // d, HEIGHT // d, d)
    depth = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    assert depth[y, x] * d > size // 2  # the window is all tissue
    return (int(x) * d - size // 2) // 16 * 16, (int(y) * d - size // 2) // 16 * 16


def read_rgb(slide: openslide.OpenSlide, loc: tuple[int, int], level: int, size: int) -> np.ndarray:
    region = slide.read_region(loc, level, (size, size))
    return np.asarray(region.convert("RGB")).astype(np.int16)


# ------------------------------------------------------------------ OpenSlide sees real slides


def test_svs_opens_as_aperio_with_levels_mpp_and_objective(svs: SyntheticSlide) -> None:
    with openslide.OpenSlide(svs.path) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert slide.level_count == 3  # 3000x2000 -> 750x500 -> 188x125 (fits a tile)
        assert slide.level_count == len(svs.level_downsamples)
        assert slide.level_dimensions[1] == (750, 500)
        assert slide.level_downsamples == pytest.approx(svs.level_downsamples)
        assert svs.level_downsamples[:2] == (1.0, 4.0)
        assert float(props["openslide.mpp-x"]) == svs.mpp == 0.25
        assert float(props["openslide.mpp-y"]) == 0.25
        assert props["openslide.objective-power"] == "40"
        assert props["openslide.level[0].tile-width"] == "256"
        assert props["aperio.AppMag"] == "40"


def test_svs_associated_images(svs: SyntheticSlide, tissue: SyntheticTissue) -> None:
    with openslide.OpenSlide(svs.path) as slide:
        images = slide.associated_images
        assert {"thumbnail", "label", "macro"} <= set(images)
        thumb = np.asarray(images["thumbnail"].convert("RGB")).astype(np.int16)
        label = np.asarray(images["label"].convert("RGB"))
        macro = np.asarray(images["macro"].convert("RGB"))
    assert thumb.shape == (683, 1024, 3)  # longest side 1024, aspect kept
    # The thumbnail is the slide: compare with the procedural overview at the same scale.
    expected = tissue.render(0, 0, 1024, 683, WIDTH / 1024).astype(np.int16)
    assert np.abs(thumb - expected).mean() < 4
    assert (label < 60).mean() > 0.05  # printed barcode and text
    assert macro.shape == (431, 1280, 3)
    assert (macro.std(axis=(0, 1)) > 10).all()


def test_svs_magnification_follows_mpp_or_override(tmp_path: Path) -> None:
    default = write_synthetic_slide(tmp_path / "a.svs", width=600, height=500, mpp=0.5)
    forced = write_synthetic_slide(tmp_path / "b.svs", width=600, height=500, app_mag=10)
    with openslide.OpenSlide(default.path) as a, openslide.OpenSlide(forced.path) as b:
        assert a.properties["openslide.objective-power"] == "20"
        assert float(a.properties["openslide.mpp-x"]) == 0.5
        assert b.properties["openslide.objective-power"] == "10"
        assert float(b.properties["openslide.mpp-x"]) == 0.25
        assert a.level_count == b.level_count == 2  # 600 px -> 150 px fits one tile


def test_svs_page_layout(svs: SyntheticSlide) -> None:
    with tifffile.TiffFile(svs.path) as tif:
        pages = list(tif.pages)
        tiled = [p.is_tiled for p in pages]
        first = pages[0].description
        assert tiled == [True, False, True, True, False, False]  # level 0, thumbnail, ...
        assert first.startswith("Aperio Image Library")
        assert f"{WIDTH}x{HEIGHT} [0,0 {WIDTH}x{HEIGHT}] (256x256) JPEG/RGB Q=85" in first
        assert first.endswith("|AppMag = 40|MPP = 0.25")
        assert pages[4].description.splitlines()[1].startswith("label ")
        assert pages[5].description.splitlines()[1].startswith("macro ")
        assert pages[0].compression == tifffile.COMPRESSION.JPEG


def test_tiff_opens_as_generic_tiff_with_all_levels(tiff: SyntheticSlide) -> None:
    with openslide.OpenSlide(tiff.path) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "generic-tiff"
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert slide.level_count == len(tiff.level_downsamples) == 3
        assert slide.level_downsamples == pytest.approx(tiff.level_downsamples)
        assert props["tiff.ResolutionUnit"] == "centimeter"
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-6)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-6)
        assert not any(k.startswith("aperio.") for k in props)
        assert dict(slide.associated_images) == {}


# ------------------------------------------------------------------ pixels


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
def test_openslide_pixels_match_render_at_level0_and_level1(
    fmt: str, svs: SyntheticSlide, tiff: SyntheticSlide, tissue: SyntheticTissue
) -> None:
    written = svs if fmt == "svs" else tiff
    x, y = tissue_point(tissue, 512)
    with openslide.OpenSlide(written.path) as slide:
        level0 = read_rgb(slide, (x, y), 0, 512)
        level1 = read_rgb(slide, (x, y), 1, 256)
        corner = read_rgb(slide, (0, 0), 0, 64)
    expected0 = tissue.render(x, y, 512, 512).astype(np.int16)
    expected1 = tissue.render(x, y, 256, 256, 4.0).astype(np.int16)
    # A textured tissue window, so a colour-space mix-up (RGB vs YCbCr: ~60 levels) can't hide.
    assert expected0.mean() < 225 and expected0.std() > 10
    assert np.abs(level0 - expected0).mean() < 6  # JPEG error only
    assert np.abs(level0.mean(axis=(0, 1)) - expected0.mean(axis=(0, 1))).max() < 1.5
    assert np.abs(level1 - expected1).mean() < 8
    assert np.abs(corner - np.array(tissue.glass_rgb)).max() <= 2  # bare glass


def test_tiles_agree_at_seams(tissue: SyntheticTissue) -> None:
    x, y = tissue_point(tissue, 512)
    whole = tissue.render(x, y, 300, 280).astype(np.int16)
    left = tissue.render(x, y, 130, 280)
    right = tissue.render(x + 130, y, 170, 280)
    assert np.abs(whole - np.hstack([left, right])).max() <= 1
    big = tissue.render(x, y, 600, 40)  # wider than one render block
    assert np.array_equal(big[:, :300], tissue.render(x, y, 300, 40))


def test_lower_levels_are_area_averages_of_level0(tissue: SyntheticTissue) -> None:
    x, y = tissue_point(tissue, 768)
    fine = tissue.render(x, y, 768, 768).astype(np.float64)
    for d in (4, 16):
        n = 768 // d
        coarse = tissue.render(x, y, n, n, float(d)).astype(np.float64)
        averaged = fine.reshape(n, d, n, d, 3).mean(axis=(1, 3))
        assert np.abs(averaged - coarse).mean() < 16
        assert np.abs((averaged - coarse).mean(axis=(0, 1))).max() < 4  # no brightness drift


# ------------------------------------------------------------------ seeds and content


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    def digest(name: str, seed: int, workers: int) -> str:
        path = tmp_path / name
        write_synthetic_slide(path, width=1200, height=900, seed=seed, workers=workers)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest("a.svs", 3, 1) == digest("b.svs", 3, 3)  # thread count doesn't matter
    assert digest("c.svs", 4, 1) != digest("a.svs", 3, 1)

    def overview(seed: int) -> np.ndarray:
        return SyntheticTissue(1200, 900, seed).render(0, 0, 300, 225, 4.0).astype(np.int16)

    assert np.array_equal(overview(3), overview(3))
    assert np.abs(overview(3) - overview(4)).mean() > 5


@pytest.mark.parametrize("seed", range(6))
def test_tissue_fraction_and_glass(seed: int) -> None:
    tissue = SyntheticTissue(40000, 30000, seed)
    d = 100.0
    mask = tissue.tissue_mask(0, 0, 400, 300, d)
    rgb = tissue.render(0, 0, 400, 300, d).astype(np.int16)
    assert 0.2 <= mask.mean() <= 0.5
    glass = rgb[~ndimage.binary_dilation(mask, iterations=2)]  # off the anti-aliased edge
    assert tuple(np.median(glass, axis=0)) == tissue.glass_rgb
    near_white = (glass.min(axis=1) >= 230) & (glass.max(axis=1) - glass.min(axis=1) <= 8)
    assert near_white.mean() > 0.995  # the rest: specks of sub-pixel fragments
    core = rgb[mask]
    assert np.median(core.mean(axis=1)) < 215  # stained tissue is clearly darker
    # Both stains: pink (eosin: red well above blue) and purple (hematoxylin: blue >= red).
    pink = (core[:, 0] - core[:, 2]) > 12
    purple = core[:, 2] >= core[:, 0]
    assert pink.mean() > 0.05 and purple.mean() > 0.05


def test_textures_differ_between_regions(tissue: SyntheticTissue) -> None:
    # Nuclei-like dark dots, pale fat and pink stroma all occur on one slide.
    rgb = tissue.render(0, 0, 750, 500, 4.0).astype(np.int16)
    mask = tissue.tissue_mask(0, 0, 750, 500, 4.0)
    lum = rgb.mean(axis=2)[mask]
    assert (lum < 120).mean() > 0.002  # dense hematoxylin (nuclei)
    assert (lum > 215).mean() > 0.01  # pale areas inside tissue (fat)
    x, y = tissue_point(tissue, 512)
    tile = tissue.render(x, y, 256, 256).astype(np.int16)
    assert tile.std() > 8  # textured, not flat colour


# ------------------------------------------------------------------ streaming, not holding


def test_writing_does_not_hold_a_level_in_memory(tmp_path: Path) -> None:
    """Peak RSS growth while writing an 8k x 8k slide (a 192 MiB level) stays far below it."""
    script = textwrap.dedent(
        """
        import resource, sys
        from smartpath.training.synthetic.slides import SyntheticTissue, write_synthetic_slide
        SyntheticTissue(64, 64, 0).render(0, 0, 64, 64)  # imports, tables
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_synthetic_slide(sys.argv[1], width=8192, height=8192, seed=1, workers=2)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big.svs")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    growth = int(out.stdout.strip().splitlines()[-1])
    level_bytes = 8192 * 8192 * 3
    assert growth < 0.3 * level_bytes, f"RSS grew {growth / 2**20:.0f} MiB"
    with openslide.OpenSlide(tmp_path / "big.svs") as slide:
        assert slide.level_dimensions == ((8192, 8192), (2048, 2048), (512, 512), (128, 128))


def test_progress_bar_and_argument_checks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_synthetic_slide(tmp_path / "p.tiff", width=700, height=300, fmt="tiff", progress=True)
    assert "tile" in capsys.readouterr().err
    bad: list[dict] = [
        {"fmt": "ndpi"},
        {"width": 0},
        {"tile_size": 100},
        {"quality": 0},
        {"level_factor": 1},
        {"mpp": 0.0},
        {"workers": 0},
    ]
    for kwargs in bad:
        args = {"width": 512, "height": 512, **kwargs}
        with pytest.raises(ValueError):
            write_synthetic_slide(tmp_path / "x.svs", **args)
    with pytest.raises(ValueError):
        SyntheticTissue(100, 100).render(0, 0, 0, 10)
