"""Precomputed slide features: file round trips, validation, extraction from a synthetic SVS
through the tiling library, and manifest featurisation with its cache."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from smartpath.model.aggregator import SlideAggregator
from smartpath.model.slide_features import SlideFeatures, load_features, save_features
from smartpath.model.stain_norm import FIT_TILES, MACENKO, SlideStain
from smartpath.model.tile_encoder import StainStatsEncoder
from smartpath.training import features as features_mod
from smartpath.training.features import extract_slide_features, featurize_manifest
from smartpath.training.manifest import (
    RoiSample,
    WsiSample,
    read_manifest,
    resolve_ref,
    write_manifest,
)
from smartpath.training.synthetic.dataset import generate_wsi_dataset
from smartpath.training.synthetic.slides import write_synthetic_slide


def _feats(n: int = 7, d: int = 32) -> SlideFeatures:
    rng = np.random.default_rng(0)
    return SlideFeatures(
        features=rng.normal(size=(n, d)).astype(np.float32),
        coords=rng.integers(0, 5000, size=(n, 2)),
        mpp=0.25,
        tile_size_px=192.0,
        encoder="stain-stats-v1",
    )


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "small.svs"
    write_synthetic_slide(path, width=1536, height=1280, seed=3, workers=1)
    return path


def test_safetensors_round_trip(tmp_path: Path) -> None:
    feats = _feats()
    path = save_features(tmp_path / "sub" / "a.safetensors", feats)
    assert path == tmp_path / "sub" / "a.safetensors" and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    for src in (path, str(path), path.read_bytes()):
        back = load_features(src)
        assert back.features.dtype == np.float32 and back.coords.dtype == np.int64
        np.testing.assert_array_equal(back.features, feats.features)
        np.testing.assert_array_equal(back.coords, feats.coords)
        assert (back.mpp, back.tile_size_px, back.encoder) == (0.25, 192.0, "stain-stats-v1")
    si = load_features(path).to_slide_input()
    assert si.features.shape == (7, 32) and si.features.dtype == torch.float32
    assert si.coords.dtype == torch.float32 and si.mpp == 0.25
    assert torch.equal(si.coords, torch.from_numpy(feats.coords).float())
    # What the model's slide aggregator takes.
    tokens = SlideAggregator(32, 16, hidden_dim=16, num_tokens=4, num_heads=2)(
        si.features, si.coords, si.mpp
    )
    assert tokens.shape == (4, 16)


def test_npz_round_trip(tmp_path: Path) -> None:
    feats = _feats(n=3, d=5)
    path = tmp_path / "f.npz"
    np.savez(
        path,
        features=feats.features.astype(np.float64),
        coords=feats.coords.astype(float),
        mpp=np.float64(0.5),
    )
    back = load_features(path)
    assert back.features.dtype == np.float32 and back.coords.dtype == np.int64
    np.testing.assert_allclose(back.features, feats.features)
    np.testing.assert_array_equal(back.coords, feats.coords)
    assert back.mpp == 0.5 and back.tile_size_px is None and back.encoder == "unknown"
    # No mpp: SlideInput's default of 1.0 µm/px; bytes work like paths.
    plain = load_features(_npz_bytes(features=feats.features, coords=feats.coords))
    assert plain.mpp == 1.0 and len(plain) == 3 and plain.dim == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_npz_bytes(features=np.zeros((3, 4))), r"lacks array\(s\) coords \(has: features\)"),
        (_npz_bytes(coords=np.zeros((3, 2))), r"lacks array\(s\) features"),
        (_npz_bytes(features=np.zeros((3, 4)), coords=np.zeros((2, 2))), r"\(3, 2\).*\(2, 2\)"),
        (_npz_bytes(features=np.zeros((3, 4)), coords=np.zeros((3, 3))), r"coords must have"),
        (_npz_bytes(features=np.zeros(4), coords=np.zeros((4, 2))), "2-D"),
        (_npz_bytes(features=np.zeros((0, 4)), coords=np.zeros((0, 2))), "N, D >= 1"),
        (_npz_bytes(features=np.full((1, 4), np.nan), coords=np.zeros((1, 2))), "NaN"),
        (
            _npz_bytes(features=np.zeros((1, 4)), coords=np.zeros((1, 2)), mpp=np.float64(-1)),
            "mpp must be a positive",
        ),
        (b"PK\x03\x04 not really a zip", "not a readable .npz"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage json!!}", "not a readable safetensors"),
        (b"", "not a readable safetensors"),
    ],
)
def test_bad_feature_bytes_raise_value_error(content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_features(content)


def test_bad_feature_files_raise_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"'bad\.safetensors': not a readable safetensors"):
        load_features(bad)
    with pytest.raises(ValueError, match=r"\.safetensors or \.npz"):
        load_features(tmp_path / "features.pt")
    with pytest.raises(ValueError, match=r"written as \.safetensors"):
        save_features(tmp_path / "out.npz", _feats())
    # A safetensors file without coords.
    from safetensors.numpy import save_file

    save_file({"features": np.zeros((2, 3), np.float32)}, tmp_path / "nocoords.safetensors")
    with pytest.raises(ValueError, match=r"lacks array\(s\) coords"):
        load_features(tmp_path / "nocoords.safetensors")


def test_extract_slide_features(slide: Path) -> None:
    feats = extract_slide_features(slide, "stain-stats-v1")
    n = len(feats)
    assert n > 0 and feats.features.shape == (n, 32) and feats.coords.shape == (n, 2)
    assert np.isfinite(feats.features).all()
    assert feats.mpp == pytest.approx(0.25) and feats.tile_size_px == pytest.approx(192.0)
    assert feats.encoder == "stain-stats-v1"
    x, y = feats.coords[:, 0], feats.coords[:, 1]
    assert (x >= 0).all() and (y >= 0).all() and (x < 1536).all() and (y < 1280).all()
    assert len({tuple(c) for c in feats.coords.tolist()}) == n  # distinct tiles
    # Deterministic, and batch size does not change the numbers.
    again = extract_slide_features(
        slide, features_mod.make_tile_encoder("stain-stats-v1"), batch_size=5
    )
    np.testing.assert_array_equal(again.coords, feats.coords)
    np.testing.assert_allclose(again.features, feats.features, rtol=1e-5, atol=1e-5)
    # Stricter tissue threshold, fewer tiles.
    assert len(extract_slide_features(slide, "stain-stats-v1", min_tissue=0.9)) < n


class CapturingEncoder:
    """A tile encoder that keeps the tiles it is given (and encodes them with stain-stats)."""

    name, dim = "capturing", StainStatsEncoder.dim

    def __init__(self) -> None:
        self.tiles: list[np.ndarray] = []

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        self.tiles.append(tiles.copy())
        return StainStatsEncoder().encode(tiles)


def test_stain_normalised_features(slide: Path) -> None:
    raw = CapturingEncoder()
    plain = extract_slide_features(slide, raw)
    tiles = np.concatenate(raw.tiles)
    # Off: the encoder's features of the tiles as read, under the encoder's name.
    assert plain.encoder == "capturing"
    np.testing.assert_array_equal(plain.features, StainStatsEncoder().encode(tiles))
    # On: the slide's stain fitted on its first tiles, every tile normalised, then encoded;
    # the same numbers whatever the batch size, under a name that says so.
    feats = extract_slide_features(slide, "stain-stats-v1", stain_norm=MACENKO)
    assert feats.encoder == "stain-stats-v1+macenko-v1" and len(tiles) > FIT_TILES
    want = StainStatsEncoder().encode(SlideStain.fit(tiles[:FIT_TILES]).apply(tiles))
    np.testing.assert_array_equal(feats.features, want)
    np.testing.assert_array_equal(feats.coords, plain.coords)
    again = extract_slide_features(slide, "stain-stats-v1", stain_norm=MACENKO, batch_size=5)
    np.testing.assert_array_equal(again.features, feats.features)
    assert not np.allclose(feats.features, plain.features, atol=0.05)


def test_blank_slide_falls_back_to_one_tile(tmp_path: Path) -> None:
    path = tmp_path / "blank.tiff"
    tifffile.imwrite(
        path,
        np.full((512, 512, 3), 245, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        resolution=(4e4, 4e4),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    feats = extract_slide_features(path, "stain-stats-v1")
    assert len(feats) == 1 and feats.mpp == pytest.approx(0.25)
    assert feats.coords.tolist() == [[192, 192]]  # the centre tile of a 3 x 3 lattice


def test_featurize_manifest_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wsi = generate_wsi_dataset(tmp_path / "ds", n_slides=2, seed=5)  # default 2048-px slides
    samples = read_manifest(wsi)
    roi = RoiSample(
        id="roi-1", image="images/x.png", task="classification", labels=["a", "b"], target="b"
    )
    manifest = tmp_path / "ds" / "mixed.jsonl"
    write_manifest([*samples, roi], manifest)

    out = featurize_manifest(manifest, progress=False)
    assert out == tmp_path / "ds" / "mixed.features.jsonl"
    rows = read_manifest(out)
    assert len(rows) == len(samples) + 1 and rows[-1] == roi
    wsi_rows = [r for r in rows if isinstance(r, WsiSample)]
    assert all(r.slide is None and r.features is not None for r in wsi_rows)
    assert all(not r.features.startswith("/") for r in wsi_rows)  # type: ignore[union-attr]
    for old, new in zip(samples, wsi_rows, strict=True):
        assert (new.id, new.target, new.prompt) == (old.id, old.target, old.prompt)
    files = sorted({out.parent / r.features for r in wsi_rows})  # type: ignore[operator]
    assert len(files) == 2 and all(f.parent == tmp_path / "ds" / "features" for f in files)
    for f in files:
        feats = load_features(f)
        assert 16 <= len(feats) <= 100 and feats.encoder == "stain-stats-v1"
    # The three lines of one slide share its feature file.
    by_slide: dict[str, set[str]] = {}
    for old, new in zip(samples, wsi_rows, strict=True):
        by_slide.setdefault(old.slide, set()).add(new.features)  # type: ignore[arg-type]
    assert all(len(v) == 1 for v in by_slide.values()) and len(by_slide) == 2

    # Second run: nothing re-extracted, files untouched, same manifest.
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    text = out.read_text()

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-extracted a cached slide")

    with monkeypatch.context() as m:
        m.setattr(features_mod, "extract_slide_features", boom)
        assert featurize_manifest(manifest, progress=False) == out
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes and out.read_text() == text

    # A changed slide (new mtime) is extracted again, into a new cache file.
    calls: list[Path] = []
    real = features_mod.extract_slide_features

    def counting(path: Path, *args: object, **kwargs: object) -> SlideFeatures:
        calls.append(Path(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    slide = tmp_path / "ds" / samples[0].slide  # type: ignore[operator]
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(features_mod, "extract_slide_features", counting)
    featurize_manifest(manifest, progress=False)
    assert calls == [slide]
    assert len(list((tmp_path / "ds" / "features").glob("*.safetensors"))) == 3

    # Stain-normalised features are other files: the cache never mixes them with raw ones.
    featurize_manifest(manifest, stain_norm=MACENKO, progress=False)
    assert len(calls) == 3
    normalised = {load_features(f).encoder for f in (tmp_path / "ds" / "features").iterdir()}
    assert normalised == {"stain-stats-v1", "stain-stats-v1+macenko-v1"}
    assert len(list((tmp_path / "ds" / "features").glob("*.safetensors"))) == 5


def test_featurize_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local manifests only"):
        featurize_manifest("s3://bucket/wsi.jsonl", progress=False)
    manifest = tmp_path / "m.jsonl"
    write_manifest([WsiSample(id="s", slide="missing.svs", task="vqa", target="yes")], manifest)
    with pytest.raises(ValueError, match="does not exist"):
        featurize_manifest(manifest, progress=False)
    with pytest.raises(ValueError, match="unknown tile encoder"):
        featurize_manifest(manifest, encoder="nope", progress=False)


def test_featurize_manifest_out_dir_and_broken_slide(slide: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m" / "wsi.jsonl"
    write_manifest([WsiSample(id="s", slide=str(slide), task="vqa", target="yes")], manifest)
    out = featurize_manifest(manifest, out_dir=tmp_path / "feats", progress=False)
    (row,) = read_manifest(out)
    assert isinstance(row, WsiSample) and row.features is not None
    assert row.features.startswith("../feats/") and row.features.endswith(".safetensors")
    ref = resolve_ref(row.features, out)
    assert isinstance(ref, Path) and len(load_features(ref)) > 0

    (tmp_path / "m" / "broken.svs").write_bytes(b"not a slide at all" * 10)
    write_manifest([WsiSample(id="b", slide="broken.svs", task="vqa", target="yes")], manifest)
    with pytest.raises(ValueError, match=r"slide 'broken\.svs': .*(corrupt|not a slide)"):
        featurize_manifest(manifest, out_dir=tmp_path / "feats", progress=False)
