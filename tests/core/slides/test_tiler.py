"""The Tiler's slide identity and plan keys: resolved once, keyed by content, and the keys of
existing feature caches kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smartpath.core.config import load_config
from smartpath.core.errors import InvalidArgumentError, UnavailableError
from smartpath.core.slides.resolution import Resolution
from smartpath.core.slides.tiler import ResolvedSlide, Tiler, TileRequest


@pytest.fixture
def tiler(tmp_path: Path, openslide_fixtures: Path):
    config = load_config(
        slide_cache={"dir": tmp_path / "cache"},
        storage={"local_root": tmp_path / "store"},
        tiling={"local_slide_roots": [tmp_path, openslide_fixtures]},
    )
    t = Tiler(config)
    yield t
    t.close()


def test_plan_keys_are_stable_and_change_with_the_plan_version(tiler: Tiler) -> None:
    """Plan keys key the feature cache. They are pinned, so a refactor cannot silently orphan
    (or wrongly reuse) cached features. Plan version 2 changed tissue detection, so these
    replaced version 1's keys ("2f92cf6503f70d5f", "ad1f1042209330f1")."""
    slide = ResolvedSlide("s3://slides/a.svs", "s3:0123456789abcdef0123456789abcdef")
    request = TileRequest(mpp=0.5, tile_size=224, min_tissue_fraction=0.25)
    overridden = ResolvedSlide(slide.uri, slide.slide_id, mpp_override=0.3)
    keys = tiler.plan_key(slide, request), tiler.plan_key(overridden, request)
    assert keys == ("37b0ba91097038ac", "a044538a3025663c")
    # Defaults are filled in before hashing: the same plan, the same key.
    defaults = tiler.config
    explicit = TileRequest(
        resolution=Resolution(mpp=defaults.target_mpp),
        tile_size=defaults.tile_size,
        min_tissue_fraction=defaults.min_tissue_fraction,
    )
    assert tiler.plan_key(slide, TileRequest()) == tiler.plan_key(slide, explicit)


def test_plan_hash_is_the_plan_key(tiler: Tiler, openslide_fixtures: Path) -> None:
    opened = tiler.open(str(openslide_fixtures / "small.svs"))
    request = TileRequest(mpp=opened.info.require_mpp(), tile_size=16, min_tissue_fraction=0)
    plan, _ = tiler.plan(opened, request)
    assert len(plan) == 1 and plan.plan_hash == tiler.plan_key(opened.resolved, request)


def test_tile_request_takes_a_resolution_or_its_shorthand() -> None:
    assert TileRequest(mpp=0.5) == TileRequest(resolution=Resolution(mpp=0.5))
    assert TileRequest(magnification=20).resolution == Resolution(magnification=20)
    assert TileRequest().resolution is None
    with pytest.raises(InvalidArgumentError):
        TileRequest(resolution=Resolution(mpp=0.5), mpp=0.5)
    with pytest.raises(InvalidArgumentError):
        TileRequest(mpp=0.5, magnification=20)


def test_open_slides_are_reused_by_content(tiler: Tiler, tmp_path: Path, openslide_fixtures):
    path = tmp_path / "small.svs"
    path.write_bytes((openslide_fixtures / "small.svs").read_bytes())
    slide = tiler.resolve(str(path))
    assert slide.slide_id.startswith("file:") and slide.mpp_override is None
    opened = tiler.open(slide)
    assert tiler.open(slide) is opened and tiler.open(str(path)) is opened
    overridden = tiler.open(tiler.resolve(str(path), mpp_override=0.5))
    assert overridden is not opened and overridden.info.mpp == 0.5


def test_a_file_changed_after_it_was_resolved_is_unavailable(
    tiler: Tiler, tmp_path: Path, openslide_fixtures: Path
) -> None:
    path = tmp_path / "small.svs"
    path.write_bytes((openslide_fixtures / "small.svs").read_bytes())
    slide = tiler.resolve(str(path))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(UnavailableError):
        tiler.open(slide)
    assert tiler.open(tiler.resolve(str(path))).info.width == 16
