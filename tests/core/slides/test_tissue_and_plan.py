"""Tissue detection against synthetic ground truth, and MPP-correct tile plans."""

from __future__ import annotations

import numpy as np
import pytest

from smartpath.core.config import TilingConfig
from smartpath.core.errors import FailedPreconditionError, InvalidArgumentError
from smartpath.core.slides.plan import plan_hash, plan_tiles, tile_geometry
from smartpath.core.slides.resolution import Resolution
from smartpath.core.slides.slide import Slide, SlideInfo
from smartpath.core.slides.tissue import detect_tissue, otsu_threshold, tile_fractions
from smartpath.training.synthetic.slides import SyntheticTissue, write_synthetic_slide


def _info(width=40_000, height=30_000, mpp=0.25, power=40.0, levels=(1.0, 4.0, 16.0)):
    return SlideInfo(
        width=width,
        height=height,
        level_dimensions=tuple((round(width / d), round(height / d)) for d in levels),
        level_downsamples=levels,
        mpp_x=mpp,
        mpp_y=mpp,
        mpp_from_override=False,
        objective_power=power,
        vendor="aperio",
    )


def _default_mask(path) -> tuple[np.ndarray, float]:
    """The tissue mask of a 0.25 µm/px slide with the default tiling config, and its
    downsample (level-0 px per mask px)."""
    slide = Slide.open(path)
    cfg = TilingConfig()
    ds = cfg.tissue_mpp / 0.25
    w, h = round(slide.info.width / ds), round(slide.info.height / ds)
    thumb = slide.region_at(0, 0, slide.info.width, slide.info.height, w, h, max_read_px=1 << 28)
    mask = detect_tissue(
        thumb,
        um_per_px=cfg.tissue_mpp,
        min_area_um2=cfg.min_tissue_area_um2,
        max_hole_area_um2=cfg.max_hole_area_um2,
    )
    return mask, ds


def test_tissue_mask_matches_ground_truth(synthetic_svs) -> None:
    mask, ds = _default_mask(synthetic_svs.path)
    h, w = mask.shape
    truth = SyntheticTissue(synthetic_svs.width, synthetic_svs.height, synthetic_svs.seed)
    expected = truth.tissue_mask(0, 0, w, h, downsample=ds)
    iou = (mask & expected).sum() / max(1, (mask | expected).sum())
    assert iou > 0.9, f"IoU {iou:.3f}"


def test_fat_is_found_about_as_often_as_other_tissue(tmp_path) -> None:
    """Adipose tissue (pale: empty vacuoles, thin membranes) is detected about as completely
    as the rest, so composition read off the tiles is not biased against fat. The slide is the
    demo's first (28% fat); a single saturation threshold finds 81% of its fat."""
    seed = 1041989314
    write_synthetic_slide(tmp_path / "fat.svs", width=2048, height=2048, seed=seed, workers=1)
    mask, ds = _default_mask(tmp_path / "fat.svs")
    h, w = mask.shape
    truth = SyntheticTissue(2048, 2048, seed)
    tissue = truth.tissue_mask(0, 0, w, h, downsample=ds)
    _, w_fat, _ = truth._class_planes(0.0, 0.0, w, h, ds)
    fat = np.broadcast_to(np.asarray(w_fat, dtype=np.float64), (h, w)) * tissue
    assert fat.sum() > 0.2 * tissue.sum(), "the slide should be fat-rich"
    fat_recall = (fat * mask).sum() / fat.sum()
    other_recall = ((tissue - fat) * mask).sum() / (tissue - fat).sum()
    assert fat_recall > 0.9, f"fat recall {fat_recall:.3f}, other tissue {other_recall:.3f}"
    assert fat_recall > other_recall - 0.05


def test_pale_tissue_is_kept_only_beside_stained_tissue() -> None:
    rgb = np.full((200, 300, 3), (243, 242, 240), np.uint8)  # glass, saturation ~0.01
    rgb[40:160, 20:100] = (200, 80, 160)  # stained tissue
    pale = (245, 233, 241)  # fat's faint tint: saturation ~0.05, below Otsu's split
    rgb[40:160, 100:160] = pale  # fat at the tissue's border
    rgb[40:160, 220:280] = pale  # the same tint with no stained tissue beside it
    mask = detect_tissue(rgb, um_per_px=4, min_area_um2=0, max_hole_area_um2=0)
    assert mask[50:150, 25:95].all()
    assert mask[50:150, 105:155].all(), "pale tissue joined to stained tissue is tissue"
    assert not mask[:, 200:].any(), "a faint tint alone is not tissue"
    assert not mask[:30].any() and not mask[170:].any()


def test_blank_glass_has_no_tissue() -> None:
    glass = np.full((200, 300, 3), 245, np.uint8)
    glass += np.random.default_rng(0).integers(0, 4, glass.shape, dtype=np.uint8)
    assert not detect_tissue(glass, um_per_px=8, min_area_um2=0, max_hole_area_um2=0).any()


def test_specks_dropped_and_small_holes_filled() -> None:
    rgb = np.full((200, 200, 3), 245, np.uint8)
    rgb[40:160, 40:160] = (200, 80, 160)  # tissue, 120 px square
    rgb[95:100, 95:100] = 245  # small hole, 25 px
    rgb[10:13, 10:13] = (200, 80, 160)  # speck, 9 px
    mask = detect_tissue(rgb, um_per_px=8, min_area_um2=64 * 50, max_hole_area_um2=64 * 50)
    assert mask[97, 97], "small hole should be filled"
    assert not mask[11, 11], "speck should be dropped"
    assert mask[50:150, 50:150].all()


def test_otsu_separates_two_modes() -> None:
    values = np.concatenate([np.full(1000, 0.1), np.full(1000, 0.7)])
    assert 0.1 < otsu_threshold(values) < 0.7


def test_tile_fractions_from_summed_area_table() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    xs = np.array([0, 300, 500, 800])
    fractions = tile_fractions(mask, 100.0, xs, np.zeros(4, np.int64), footprint=500)
    assert fractions.tolist() == pytest.approx([1.0, 0.4, 0.0, 0.0])


def test_geometry_is_physical() -> None:
    g = tile_geometry(_info(), mpp=0.5, tile_size=256, overlap=0)
    assert g.footprint == pytest.approx(512) and g.level == 0 and g.read_size == 512
    assert g.cols == -(-40_000 // 512) and g.rows == -(-30_000 // 512)
    # 1 µm/px is exactly level 1 (4x); 2 µm/px reads level 1 and halves.
    assert tile_geometry(_info(), mpp=1.0, tile_size=256, overlap=0).level == 1
    g2 = tile_geometry(_info(), mpp=2.0, tile_size=256, overlap=0)
    assert (g2.level, g2.read_size) == (1, 512)
    # Overlap shortens the stride only.
    g3 = tile_geometry(_info(), mpp=0.5, tile_size=256, overlap=32)
    assert g3.stride == pytest.approx(448) and g3.footprint == pytest.approx(512)


def test_magnification_uses_slide_objective() -> None:
    assert Resolution(magnification=20).to_mpp(_info()) == pytest.approx(0.5)
    assert Resolution(magnification=20).to_mpp(_info(mpp=0.24)) == pytest.approx(0.48)
    assert Resolution(magnification=20).to_mpp(_info(mpp=0.2527)) == pytest.approx(0.5054)
    assert Resolution(magnification=10).to_mpp(_info(power=None)) == pytest.approx(1.0)
    assert Resolution(mpp=0.7).to_mpp(_info(mpp=0.2527)) == 0.7
    with pytest.raises(InvalidArgumentError):
        Resolution(mpp=0.5, magnification=20)
    with pytest.raises(InvalidArgumentError):
        Resolution()
    with pytest.raises(InvalidArgumentError):
        Resolution(magnification=-3)
    with pytest.raises(InvalidArgumentError):
        Resolution(mpp=float("nan"))


@pytest.mark.parametrize(("tile_size", "overlap"), [(8, 0), (256, 256), (256, -1), (100_000, 0)])
def test_bad_geometry_is_invalid_argument(tile_size: int, overlap: int) -> None:
    with pytest.raises(InvalidArgumentError):
        tile_geometry(_info(), mpp=0.5, tile_size=tile_size, overlap=overlap)


def test_no_mpp_is_failed_precondition() -> None:
    info = _info()
    info = SlideInfo(**{**info.__dict__, "mpp_x": None, "mpp_y": None})
    with pytest.raises(FailedPreconditionError):
        tile_geometry(info, mpp=0.5, tile_size=256, overlap=0)


def test_plan_keeps_tissue_tiles_and_hashes_parameters() -> None:
    info = _info(width=4096, height=2048)
    g = tile_geometry(info, mpp=0.5, tile_size=256, overlap=0)
    mask = np.zeros((64, 128), bool)  # downsample 32
    mask[:, :64] = True  # left half is tissue
    kwargs = dict(key="k", tissue_mask=mask, mask_downsample=32.0)
    plan = plan_tiles(g, min_tissue_fraction=0.5, **kwargs)
    assert len(plan) == 4 * 4  # 8x4 grid, left 4 columns
    assert (plan.x < 2048).all()
    assert plan.plan_hash == "k"
    shape = dict(resolution=Resolution(mpp=0.5), tile_size=256, overlap=0, tissue_params={})
    digest = plan_hash("a", min_tissue_fraction=0.5, **shape)
    assert digest == plan_hash("a", min_tissue_fraction=0.5, **shape)
    assert digest != plan_hash("a", min_tissue_fraction=0.4, **shape)
    assert digest != plan_hash("b", min_tissue_fraction=0.5, **shape)
    at_20x = {**shape, "resolution": Resolution(magnification=20)}
    assert digest != plan_hash("a", min_tissue_fraction=0.5, **at_20x)
    everything = plan_tiles(g, min_tissue_fraction=0.0, **kwargs)
    assert len(everything) == g.cols * g.rows
