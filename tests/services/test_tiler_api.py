"""The tiler's one Python API, in process: the same methods in process and through Serve, one
formula for magnification, and one storage lookup of a slide per request (slides in a real
S3 server on loopback)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from smartpath.client.rpc import question, tile_spec
from smartpath.core.config import SmartPathConfig, StorageConfig, load_config
from smartpath.core.config.model import SlideTiles
from smartpath.core.slides.resolution import Resolution
from smartpath.core.slides.tiler import ResolvedSlide, Tiler, TileRequest
from smartpath.core.storage import LocalStore, ObjectInfo, ObjectRef, S3Store
from smartpath.model.mllm import SmartPathModel
from smartpath.model.slide_features import SlideFeatures
from smartpath.model.stain_norm import MACENKO
from smartpath.model.tile_encoder import StainStatsEncoder
from smartpath.services.contracts import SlideEncoding, SlideSource
from smartpath.services.encoding.cache import FeatureCache
from smartpath.services.encoding.encoder import VisualEncoder
from smartpath.services.encoding.slides import encode_slide
from smartpath.services.gateway.pipeline import Pipeline
from smartpath.services.handles import TilerHandle
from smartpath.services.models import load_served_model, model_info
from smartpath.services.tiling.service import SlideTilerService, tile_request
from smartpath.services.tiling.source import TilerSource
from smartpath.training.features import extract_slide_features
from smartpath.training.synthetic.slides import write_synthetic_slide
from smartpath.v1 import common_pb2, pathology_pb2

TILER_API = {"resolve", "describe", "plan_key", "plan", "read_tiles", "read_region"}


class HeadCountingStore(S3Store):
    """An S3Store that counts object metadata requests (HEAD)."""

    def __init__(self, cfg: StorageConfig) -> None:
        super().__init__(cfg)
        self.heads = 0

    def stat(self, ref: ObjectRef) -> ObjectInfo:
        self.heads += 1
        return super().stat(ref)

    def exists(self, ref: ObjectRef) -> bool:
        self.heads += 1
        return super().exists(ref)


class _Encoded(Exception):
    """Raised by :class:`RegionBackends` once the gateway has handed over its image."""


class RegionBackends:
    """Pipeline backends with a real tiler whose encoder keeps the ROI image it is given
    and stops the analysis there."""

    def __init__(self, tiler: TilerSource) -> None:
        self.tiler = tiler
        self.image: np.ndarray | None = None

    async def encode_image(self, image: np.ndarray) -> None:
        self.image = image
        raise _Encoded


@pytest.fixture(scope="module")
def model() -> SmartPathModel:
    return load_served_model(load_config())


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SVS scanned at 40x whose MPP is not 10/40 = 0.25 µm/px."""
    folder = tmp_path_factory.mktemp("mag")
    return write_synthetic_slide(
        folder / "mag.svs", width=2048, height=2048, mpp=0.2527, app_mag=40, seed=4
    ).path


def _config(tmp_path: Path, **overrides) -> SmartPathConfig:
    defaults = {"slide_cache": {"dir": tmp_path / "cache"}, "storage": {"local_root": tmp_path}}
    return load_config(**{**defaults, **overrides})


def _region_request(uri: str, rect: common_pb2.Rect, **resolution: float):
    return pathology_pb2.AnalyzeRegionRequest(
        region=pathology_pb2.SlideRegion(
            slide=common_pb2.SlideRef(uri=uri),
            rect=rect,
            resolution=common_pb2.Resolution(**resolution) if resolution else None,
        ),
        question=question("classification"),
    )


def _gateway_image(pipeline: Pipeline, request) -> np.ndarray:
    """The image the gateway hands the encoder for ``request``."""
    with pytest.raises(_Encoded):
        asyncio.run(pipeline.analyze_region(request))
    image = pipeline.backends.image
    assert image is not None
    return image


def test_one_tiler_api() -> None:
    """The Protocol, TilerSource (and the deployment), and TilerHandle cannot drift apart."""
    protocol = {n for n, v in vars(SlideSource).items() if callable(v) and not n.startswith("_")}
    assert protocol == TILER_API
    for cls in (TilerSource, TilerHandle):
        public = {n for n, v in inspect.getmembers(cls, callable) if not n.startswith("_")}
        assert public == TILER_API, cls
    for name in sorted(TILER_API):
        expected = inspect.signature(getattr(SlideSource, name))
        for cls in (TilerSource, TilerHandle, SlideTilerService):
            assert inspect.signature(getattr(cls, name)) == expected, (cls.__name__, name)


def test_magnification_is_one_formula_in_region_reads_and_plans(
    tmp_path: Path, slide_40x: Path, model: SmartPathModel
) -> None:
    config = _config(tmp_path, tiling={"local_slide_roots": [slide_40x.parent]})
    tiler = Tiler(config)
    try:
        opened = tiler.open(str(slide_40x))
        info = opened.info
        assert info.objective_power == 40 and info.mpp == pytest.approx(0.2527)
        at_20x = Resolution(magnification=20).to_mpp(info)
        assert at_20x == pytest.approx(0.5054)
        # PlanTiles: the gRPC spec becomes the tiler's request, then its plan.
        plan, _ = tiler.plan(opened, tile_request(tile_spec(magnification=20, tile_size=128)))
        assert plan.geometry.mpp == at_20x
        # AnalyzeRegion: the gateway passes the resolution on; the tiler converts it.
        pipeline = Pipeline(RegionBackends(TilerSource(tiler)), config, model_info(model))
        rect = common_pb2.Rect(x=0, y=0, width=1000, height=1000)
        image = _gateway_image(pipeline, _region_request(str(slide_40x), rect, magnification=20))
        assert image.shape == (500, 500, 3)  # 1000 px at 0.2527 µm/px, read at 0.5054 µm/px
        assert rect.width * info.mpp / image.shape[1] == pytest.approx(at_20x)
        # No resolution: the configured model.region_mpp.
        image = _gateway_image(pipeline, _region_request(str(slide_40x), rect))
        side = round(rect.width * info.mpp / config.model.region_mpp)
        assert image.shape == (side, side, 3)
    finally:
        tiler.close()


@pytest.fixture
def s3_slide(s3_config: StorageConfig, bucket_name: str, synthetic_tiff) -> tuple[str, str]:
    """(URI of a slide in the S3 server, its bucket)."""
    store = S3Store(s3_config)
    store.ensure_bucket(bucket_name)
    ref = ObjectRef(bucket_name, "cases/slide.tiff")
    store.upload(synthetic_tiff.path, ref)
    return ref.uri, bucket_name


def test_encode_slide_heads_the_slide_once(
    tmp_path: Path, s3_config: StorageConfig, s3_slide: tuple[str, str], model: SmartPathModel
) -> None:
    uri, bucket = s3_slide
    store = HeadCountingStore(s3_config)
    tiler = Tiler(_config(tmp_path, storage=s3_config), store=store)
    source = TilerSource(tiler)
    encoder = VisualEncoder(model)

    async def encode_tiles(tiles: np.ndarray) -> np.ndarray:
        return await asyncio.to_thread(encoder.encode_tiles, tiles)

    async def encode() -> SlideEncoding:
        cache = FeatureCache(store, bucket)
        items = encode_slide(
            uri, None, source=source, encode_tiles=encode_tiles, encoder=encoder, cache=cache
        )
        return [item async for item in items][-1]

    try:
        first = asyncio.run(encode())  # feature cache and slide cache both miss
        assert not first.cache_hit and first.tiles > 0
        assert store.heads == 1
        assert tiler.cache.stats().downloads == 1
        spec = model.cfg.slide_tiles
        request = TileRequest(
            mpp=spec.mpp, tile_size=spec.tile_size, min_tissue_fraction=spec.min_tissue
        )
        assert first.plan_hash == tiler.plan_key(ResolvedSlide(uri, first.slide_id), request)
        second = asyncio.run(encode())
        assert second.cache_hit and second.tiles == first.tiles
        assert store.heads == 2  # one per request
    finally:
        tiler.close()


def test_region_read_heads_the_slide_once(
    tmp_path: Path, s3_config: StorageConfig, s3_slide: tuple[str, str], model: SmartPathModel
) -> None:
    uri, _ = s3_slide
    store = HeadCountingStore(s3_config)
    config = _config(tmp_path, storage=s3_config)
    tiler = Tiler(config, store=store)
    try:
        pipeline = Pipeline(RegionBackends(TilerSource(tiler)), config, model_info(model))
        rect = common_pb2.Rect(x=256, y=256, width=512, height=512)
        image = _gateway_image(pipeline, _region_request(uri, rect, mpp=1.0))
        assert image.shape == (256, 256, 3)  # the slide is at 0.5 µm/px
        assert store.heads == 1 and tiler.cache.stats().downloads == 1
    finally:
        tiler.close()


class SlideFeatureEncoder:
    """encode_slide's view of a served model with the given slide tile spec: the stain-stats
    tile encoder, and an aggregator that keeps the slide's features."""

    def __init__(self, slide_tiles: SlideTiles) -> None:
        self.model = SimpleNamespace(cfg=SimpleNamespace(slide_tiles=slide_tiles))
        self.tile_encoder = StainStatsEncoder()
        self.features: list[SlideFeatures] = []

    def encode_tiles(self, tiles: np.ndarray) -> np.ndarray:
        return self.tile_encoder.encode(tiles)

    def slide_tokens(self, features: SlideFeatures) -> tuple[None, None]:
        self.features.append(features)
        return None, None


@pytest.mark.parametrize("stain_norm", [None, MACENKO])
def test_served_slide_features_are_trainings(tmp_path: Path, stain_norm: str | None) -> None:
    """Serving (batches of 5 through encode_slide) and training (extract_slide_features,
    batches of 64) make the same features under the same name, stain-normalised or not."""
    slide = tmp_path / "slides" / "small.svs"
    slide.parent.mkdir()
    write_synthetic_slide(slide, width=1536, height=1280, seed=3, workers=1)
    config = _config(tmp_path, tiling={"local_slide_roots": [slide.parent], "batch_size": 5})
    tiler = Tiler(config)
    encoder = SlideFeatureEncoder(SlideTiles(stain_norm=stain_norm))
    cache = FeatureCache(LocalStore(tmp_path / "store"), "features")

    async def encode() -> SlideEncoding:
        async def encode_tiles(tiles: np.ndarray) -> np.ndarray:
            return encoder.encode_tiles(tiles)

        items = encode_slide(
            str(slide), None, source=TilerSource(tiler), encode_tiles=encode_tiles,
            encoder=encoder, cache=cache,
        )  # fmt: skip
        return [item async for item in items][-1]

    try:
        first, second = asyncio.run(encode()), asyncio.run(encode())
    finally:
        tiler.close()
    assert not first.cache_hit and second.cache_hit  # the cache keys on the features' name
    served, cached = encoder.features
    trained = extract_slide_features(slide, "stain-stats-v1", stain_norm=stain_norm)
    for got in (served, cached):
        assert got.encoder == trained.encoder
        np.testing.assert_array_equal(got.coords, trained.coords)
        np.testing.assert_array_equal(got.features, trained.features)
    assert trained.encoder == (
        "stain-stats-v1" if stain_norm is None else "stain-stats-v1+macenko-v1"
    )
