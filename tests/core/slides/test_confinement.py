"""Confinement: a slide's companion files (VMS/VMU images and map, MRXS data files, DICOM
instances) must lie inside the slide's own folder, or the slide is INVALID_ARGUMENT with a
message that names no path, before OpenSlide ever opens it; by local path and from object
storage (a LocalStore behind the slide cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from smartpath.core.config import load_config
from smartpath.core.errors import InvalidArgumentError
from smartpath.core.slides.companions import OUTSIDE_MESSAGE
from smartpath.core.slides.slide import Slide
from smartpath.core.slides.tiler import Tiler
from smartpath.core.storage import ObjectRef

BUCKET = "slides"
RED, BLUE = (200, 0, 0), (0, 0, 200)


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (256, 128)) -> Path:
    """A JPEG that OpenSlide's VMS reader accepts (4:4:4, restart markers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    Image.fromarray(pixels).save(path, quality=95, subsampling=0, restart_marker_rows=1)
    return path


def _vms_text(image: str, map_file: str | None = None, extra: str = "") -> str:
    return (
        "[Virtual Microscope Specimen]\n"
        "NoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
        f"ImageFile={image}\nMapFile={map_file or image}\n{extra}"
    )


def _mrxs(folder: Path, datafiles: list[str], index: str = "Index.dat") -> Path:
    """A .mrxs with its sibling folder and a Slidedat.ini naming ``datafiles``."""
    folder.mkdir(parents=True, exist_ok=True)
    mrxs = folder / "slide.mrxs"
    mrxs.write_text("[GENERAL]\n")
    (folder / "slide").mkdir(exist_ok=True)
    lines = [f"FILE_{i}={name}" for i, name in enumerate(datafiles)]
    (folder / "slide" / "Slidedat.ini").write_text(
        "[GENERAL]\nSLIDE_ID=0\n[HIERARCHICAL]\n"
        f"INDEXFILE={index}\n[DATAFILE]\nFILE_COUNT={len(datafiles)}\n" + "\n".join(lines) + "\n"
    )
    return mrxs


def _tiler(tmp_path: Path, *roots: Path) -> Tiler:
    config = load_config(
        slide_cache={"dir": tmp_path / "cache"},
        storage={"local_root": tmp_path / "store"},
        tiling={"local_slide_roots": list(roots)},
    )
    return Tiler(config)


@pytest.fixture
def tiler(tmp_path: Path, openslide_fixtures: Path):
    t = _tiler(tmp_path, tmp_path / "local", openslide_fixtures)
    t.store.ensure_bucket(BUCKET)
    yield t
    t.close()


def _refused(error: pytest.ExceptionInfo[InvalidArgumentError], *names: str) -> None:
    message = str(error.value)
    assert error.value.code == "INVALID_ARGUMENT"
    assert message == OUTSIDE_MESSAGE
    assert "/" not in message and ".." not in message
    for name in names:
        assert name not in message


# -- VMS/VMU --------------------------------------------------------------------------------


def test_vms_inside_its_folder_opens(tiler: Tiler, tmp_path: Path) -> None:
    folder = tmp_path / "local" / "case"
    _jpeg(folder / "img.jpg", RED)
    _jpeg(folder / "sub" / "map.jpg", BLUE, (64, 32))
    (folder / "link.jpg").symlink_to(folder / "img.jpg")  # a symlink that stays inside
    (folder / "slide.vms").write_text(_vms_text("link.jpg", "sub/../sub/map.jpg"))
    opened = tiler.open(str(folder / "slide.vms"))
    assert opened.info.vendor == "hamamatsu"
    assert opened.info.level_dimensions[0] == (256, 128)
    assert (64, 32) in opened.info.level_dimensions  # the map
    pixel = opened.slide.read_region(0, 0, 0, 4, 4)[0, 0].astype(int)
    assert np.abs(pixel - RED).max() <= 3


VMS_ESCAPES = {
    "dotdot": lambda outside: _vms_text("../outside.jpg"),
    "absolute": lambda outside: _vms_text(str(outside)),
    "map-file": lambda outside: _vms_text("img.jpg", "../outside.jpg"),
    "tile-key": lambda outside: _vms_text("img.jpg").replace(
        "ImageFile=img.jpg", "ImageFile(0,0)=../outside.jpg"
    ),
    "optimisation": lambda outside: _vms_text("img.jpg", extra="OptimisationFile=../opt\n"),
    "macro": lambda outside: _vms_text("img.jpg", extra="MacroImage=../outside.jpg\n"),
    "escaped": lambda outside: _vms_text("..\\/outside.jpg"),
    "spaced": lambda outside: (
        "\ufeff  "
        + _vms_text("img.jpg").replace("ImageFile=img.jpg", "ImageFile  =   ../outside.jpg")
    ),
    "vmu": lambda outside: (
        "[Uncompressed Virtual Microscope Specimen]\n"
        "NoLayers=1\nImageFile=../outside.ngr\nMapFile=map.ngr\n"
    ),
}


@pytest.mark.parametrize("kind", sorted(VMS_ESCAPES))
def test_vms_naming_a_file_outside_is_refused(tiler: Tiler, tmp_path: Path, kind: str) -> None:
    outside = _jpeg(tmp_path / "local" / "outside.jpg", RED)
    folder = tmp_path / "local" / "case"
    _jpeg(folder / "img.jpg", BLUE)
    slide = folder / ("escape.txt" if kind == "dotdot" else "escape.vms")  # content, not name
    slide.write_bytes(VMS_ESCAPES[kind](outside).encode())
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open(str(slide))
    _refused(error, "outside.jpg", str(tmp_path))
    with pytest.raises(InvalidArgumentError) as direct:
        Slide.open(slide)
    _refused(direct)


def test_the_escape_is_real_without_the_check(tmp_path: Path) -> None:
    """OpenSlide by itself follows ``../`` and serves the outside JPEG's pixels: what the
    check exists to stop."""
    _jpeg(tmp_path / "outside.jpg", RED)
    slide = tmp_path / "case" / "escape.vms"
    slide.parent.mkdir()
    slide.write_text(_vms_text("../outside.jpg"))
    with openslide.OpenSlide(slide) as raw:
        pixel = np.asarray(raw.read_region((0, 0), 0, (1, 1)))[0, 0, :3].astype(int)
    assert np.abs(pixel - RED).max() <= 3


def test_symlink_inside_the_folder_leading_outside_is_refused(tiler: Tiler, tmp_path: Path) -> None:
    outside = _jpeg(tmp_path / "elsewhere" / "secret.jpg", RED)
    folder = tmp_path / "local" / "case"
    folder.mkdir(parents=True)
    (folder / "img.jpg").symlink_to(outside)
    (folder / "slide.vms").write_text(_vms_text("img.jpg"))
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open(str(folder / "slide.vms"))
    _refused(error, "secret", "img.jpg")


def test_vms_from_object_storage_cannot_reach_out_of_its_cache_entry(
    tiler: Tiler, tmp_path: Path
) -> None:
    outside = _jpeg(tmp_path / "outside.jpg", RED)
    # The cache keeps the object at cache/entries/<id>/escape.vms: three levels below tmp_path.
    text = _vms_text("../../../outside.jpg")
    ref = ObjectRef(BUCKET, "x/escape.vms")
    tiler.store.put_bytes(ref, text.encode())
    cached = tiler.cache.fetch(ref)
    assert (cached.parent / "../../../outside.jpg").resolve() == outside.resolve()
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open(tiler.resolve(ref.uri))
    _refused(error, "outside.jpg", str(tmp_path))


# -- MRXS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datafiles", "index"),
    [
        (["Data0000.dat", "../x.dat"], "Index.dat"),
        (["../../x.dat"], "Index.dat"),
        (["Data0000.dat"], "../x.dat"),
        (["/etc/hostname"], "Index.dat"),
    ],
)
def test_mrxs_naming_data_outside_its_folder_is_refused(
    tiler: Tiler, tmp_path: Path, datafiles: list[str], index: str
) -> None:
    folder = tmp_path / "local" / "case"
    mrxs = _mrxs(folder, datafiles, index)
    (folder / "x.dat").write_bytes(b"data")
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open(str(mrxs))
    _refused(error, "x.dat", "hostname")


@pytest.mark.parametrize("link", ["folder", "slidedat", "datafile"])
def test_mrxs_symlinks_leading_outside_are_refused(tiler: Tiler, tmp_path: Path, link: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    _mrxs(elsewhere, ["Data0000.dat"])
    folder = tmp_path / "local" / "case"
    mrxs = _mrxs(folder, ["Data0000.dat"])
    target = {"folder": folder / "slide", "slidedat": folder / "slide" / "Slidedat.ini"}
    target["datafile"] = folder / "slide" / "Data0000.dat"
    if link == "folder":
        shutil.rmtree(target[link])
        target[link].symlink_to(elsewhere / "slide")
    elif link == "slidedat":
        target[link].unlink()
        target[link].symlink_to(elsewhere / "slide" / "Slidedat.ini")
    else:
        target[link].symlink_to(elsewhere / "slide" / "Slidedat.ini")
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open(str(mrxs))
    _refused(error, "elsewhere")


def test_mrxs_inside_its_folder_passes_the_check(tiler: Tiler, tmp_path: Path) -> None:
    """A self-contained (if fake) MIRAX gets past confinement to OpenSlide, which fails on
    its content: a different, still path-free message."""
    folder = tmp_path / "local" / "case"
    mrxs = _mrxs(folder, ["Data0000.dat", "sub/../Data0001.dat"])
    (folder / "slide" / "Data0000.dat").write_bytes(b"data")
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open(str(mrxs))
    assert str(error.value) != OUTSIDE_MESSAGE
    assert str(tmp_path) not in str(error.value)


def test_mrxs_from_object_storage_is_confined(tiler: Tiler, tmp_path: Path) -> None:
    (tmp_path / "x.dat").write_bytes(b"outside")
    store = tiler.store
    store.put_bytes(ObjectRef(BUCKET, "p/slide.mrxs"), b"[GENERAL]\n")
    store.put_bytes(
        ObjectRef(BUCKET, "p/slide/Slidedat.ini"),
        b"[GENERAL]\nSLIDE_ID=0\n[DATAFILE]\nFILE_COUNT=1\nFILE_0=../../../../x.dat\n",
    )
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open("s3://slides/p/slide.mrxs")
    _refused(error, "x.dat", str(tmp_path))


# -- DICOM ------------------------------------------------------------------------------------


def test_dicom_series_in_its_folder_opens(
    tiler: Tiler, tmp_path: Path, openslide_fixtures: Path
) -> None:
    folder = tmp_path / "local" / "series"
    folder.mkdir(parents=True)
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(openslide_fixtures / name, folder / name)
    opened = tiler.open(str(folder / "boxes_0.dcm"))
    assert opened.info.vendor == "dicom"


def test_dicom_instance_symlinked_from_outside_is_refused(
    tiler: Tiler, tmp_path: Path, openslide_fixtures: Path
) -> None:
    folder = tmp_path / "local" / "series"
    folder.mkdir(parents=True)
    shutil.copy(openslide_fixtures / "boxes_0.dcm", folder / "boxes_0.dcm")
    (tmp_path / "elsewhere").mkdir()
    outside = shutil.copy(openslide_fixtures / "boxes_1.dcm", tmp_path / "elsewhere" / "b1.dcm")
    (folder / "boxes_1.dcm").symlink_to(outside)
    with pytest.raises(InvalidArgumentError) as error:
        tiler.open(str(folder / "boxes_0.dcm"))
    _refused(error, "elsewhere", "boxes")


# -- the fixture slides -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small.svs", "boxes.tiff", "boxes_0.dcm", "boxes_1.dcm"])
def test_fixture_slides_still_open(tiler: Tiler, openslide_fixtures: Path, name: str) -> None:
    opened = tiler.open(str(openslide_fixtures / name))
    assert opened.info.width > 0
    if name == "boxes_1.dcm":
        return  # not a slide without its series: a lone object from storage cannot open
    ref = ObjectRef(BUCKET, f"fixtures/{name}")
    tiler.store.upload(openslide_fixtures / name, ref)
    assert tiler.open(ref.uri).info.width == opened.info.width


def test_symlinked_slide_is_confined_to_its_real_folder(tiler: Tiler, tmp_path: Path) -> None:
    """The boundary is the folder the slide really lives in: a VMS reached through a
    symlink names files beside its target, as OpenSlide will see them."""
    real = tmp_path / "local" / "real"
    _jpeg(real / "img.jpg", RED)
    (real / "slide.vms").write_text(_vms_text("img.jpg"))
    alias = tmp_path / "local" / "alias.vms"
    alias.symlink_to(real / "slide.vms")
    assert tiler.open(str(alias)).info.vendor == "hamamatsu"


# -- folder slides from object storage --------------------------------------------------------


def test_folder_slides_from_object_storage_open(
    tiler: Tiler, tmp_path: Path, openslide_fixtures: Path
) -> None:
    """A key ending in "/" is a folder slide: a DICOM series, or a VMS with its image files
    (a lone .vms object would arrive without them)."""
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        tiler.store.upload(openslide_fixtures / name, ObjectRef(BUCKET, f"dicom/{name}"))
    dicom = tiler.open(tiler.resolve(f"s3://{BUCKET}/dicom/"))
    assert dicom.info.vendor == "dicom"
    assert (
        dicom.info.level_dimensions
        == Slide.open(openslide_fixtures / "boxes_0.dcm").info.level_dimensions
    )

    _jpeg(tmp_path / "vms" / "img.jpg", RED)
    (tmp_path / "vms" / "slide.vms").write_text(_vms_text("img.jpg"))
    for name in ("img.jpg", "slide.vms"):
        tiler.store.upload(tmp_path / "vms" / name, ObjectRef(BUCKET, f"vms/{name}"))
    vms = tiler.open(tiler.resolve(f"s3://{BUCKET}/vms/"))
    assert vms.info.vendor == "hamamatsu"
    pixel = vms.slide.read_region(0, 0, 0, 4, 4)[0, 0].astype(int)
    assert np.abs(pixel - RED).max() <= 3


def test_folder_of_several_slides_or_none_is_refused(
    tiler: Tiler, openslide_fixtures: Path
) -> None:
    for name in ("small.svs", "boxes.tiff"):
        tiler.store.upload(openslide_fixtures / name, ObjectRef(BUCKET, f"two/{name}"))
    with pytest.raises(InvalidArgumentError, match="holds 2 slides"):
        tiler.open(tiler.resolve(f"s3://{BUCKET}/two/"))
    tiler.store.put_bytes(ObjectRef(BUCKET, "none/notes.txt"), b"not a slide")
    with pytest.raises(InvalidArgumentError, match="no slide"):
        tiler.open(tiler.resolve(f"s3://{BUCKET}/none/"))
