"""Opening slides: every OpenSlide fixture format, ROIs, metadata, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smartpath.core.errors import FailedPreconditionError, InvalidArgumentError
from smartpath.core.slides.slide import Slide

FIXTURE_VENDORS = {
    "small.svs": "aperio",
    "boxes.tiff": "generic-tiff",
    "boxes_0.dcm": "dicom",
    "boxes_1.dcm": "dicom",
}


@pytest.mark.parametrize("name", sorted(FIXTURE_VENDORS))
def test_every_openslide_fixture_opens_and_reads(openslide_fixtures: Path, name: str) -> None:
    slide = Slide.open(openslide_fixtures / name)
    info = slide.info
    assert info.vendor == FIXTURE_VENDORS[name]
    assert info.width > 0 and info.height > 0
    assert len(info.level_dimensions) == len(info.level_downsamples) >= 1
    assert info.level_downsamples[0] == 1.0
    region = slide.read_region(0, 0, 0, min(info.width, 32), min(info.height, 32))
    assert region.dtype == np.uint8 and region.shape[2] == 3
    thumb = slide.thumbnail(64, max_read_px=1 << 28)
    assert max(thumb.shape[:2]) <= 64
    slide.close()


def test_svs_metadata(openslide_fixtures: Path) -> None:
    info = Slide.open(openslide_fixtures / "small.svs").info
    assert info.mpp == pytest.approx(0.499)
    assert "thumbnail" in info.associated_images
    assert info.require_mpp() == pytest.approx(0.499)


def test_synthetic_svs_metadata(synthetic_svs) -> None:
    info = Slide.open(synthetic_svs.path).info
    assert (info.width, info.height) == (6144, 5120)
    assert info.mpp == pytest.approx(0.25)
    assert info.objective_power == pytest.approx(40)
    assert len(info.level_downsamples) >= 2
    assert {"thumbnail", "label", "macro"} <= set(info.associated_images)


def test_implausible_tiff_resolution_needs_override(openslide_fixtures: Path) -> None:
    # boxes.tiff carries the default 72 dpi (≈ 353 µm/px): not a scan resolution.
    info = Slide.open(openslide_fixtures / "boxes.tiff").info
    assert info.mpp is None
    with pytest.raises(FailedPreconditionError, match="mpp_override"):
        info.require_mpp()
    fixed = Slide.open(openslide_fixtures / "boxes.tiff", mpp_override=0.5).info
    assert fixed.require_mpp() == 0.5 and fixed.mpp_from_override


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_roi_images_open_without_mpp(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"roi.{fmt.lower()}"
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (200, 50, 120)
    Image.fromarray(rgb).save(path, format=fmt)
    slide = Slide.open(path)
    assert slide.info.vendor == "image"
    assert (slide.info.width, slide.info.height) == (60, 40)
    with pytest.raises(FailedPreconditionError, match="no MPP"):
        slide.info.require_mpp()
    region = slide.read_region(0, 0, 0, 60, 40)
    assert np.abs(region.astype(int) - rgb).mean() < 3


def test_region_outside_slide_is_white(openslide_fixtures: Path) -> None:
    slide = Slide.open(openslide_fixtures / "small.svs")
    region = slide.read_region(0, 100, 100, 8, 8)
    assert (region == 255).all()


def _corrupt(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(0)
    # Keep the TIFF header and IFDs' first bytes; scramble the middle where the tiles are.
    start = len(data) // 4
    data[start:] = rng.integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("kind", ["zero", "text", "truncated", "corrupted", "gif", "folder"])
def test_bad_files_are_invalid_argument(
    tmp_path: Path, openslide_fixtures: Path, synthetic_svs, kind: str
) -> None:
    if kind == "zero":
        path = tmp_path / "empty.svs"
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.svs"
        path.write_text("not a slide\n" * 100)
    elif kind == "truncated":
        path = tmp_path / "cut.svs"
        data = synthetic_svs.path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "corrupted":
        path = _corrupt(openslide_fixtures / "boxes.tiff", tmp_path / "bad.tiff")
    elif kind == "gif":
        path = tmp_path / "anim.gif"
        Image.new("RGB", (8, 8)).save(path, format="GIF")
    else:
        path = tmp_path / "folder"
        path.mkdir()
    with pytest.raises(InvalidArgumentError) as err:
        slide = Slide.open(path)
        # Some damage only shows when pixels are read.
        slide.read_region(0, 0, 0, slide.info.width, slide.info.height)
    assert str(path) not in str(err.value)  # slide names stay out of messages


def test_mpp_override_is_validated(openslide_fixtures: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="mpp_override"):
        Slide.open(openslide_fixtures / "small.svs", mpp_override=-1.0)
