"""The FeatureEncoder Ray Serve deployment: gRPC methods for clients, Python methods for the
gateway. ROI images and tile sets from concurrent callers are batched with ``@serve.batch``;
slides go through the tiler deployment and the feature cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.core.storage import make_store
from smartpath.model.vision import RoiInput
from smartpath.services.contracts import SlideEncoding, SlideProgress, VisualTokens, decode_image
from smartpath.services.encoding.cache import FeatureCache
from smartpath.services.encoding.encoder import VisualEncoder
from smartpath.services.encoding.slides import encode_slide
from smartpath.services.grpc_util import RpcCounter, RpcGuard, log_to_replica, unary
from smartpath.services.handles import TilerHandle, handle
from smartpath.services.models import SERVICE_PARTS, load_served_model
from smartpath.services.tensors import to_tensor
from smartpath.v1 import encoding_pb2


class FeatureEncoderService:
    """Ray Serve deployment class serving ``smartpath.v1.FeatureEncoder``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = SmartPathConfig(**config)
        log_to_replica(self.config)
        model = load_served_model(self.config, SERVICE_PARTS["encoder"])
        store = make_store(self.config.storage)
        self.encoder = VisualEncoder.from_config(model, self.config, store)
        self.cache = FeatureCache(store, self.config.model.features_bucket)
        self.tiler = TilerHandle(handle("tiler"))
        e = self.config.serve.encoder
        for batched in (self._encode_rois, self._encode_tile_sets):
            batched.set_max_batch_size(e.max_batch_size)
            batched.set_batch_wait_timeout_s(e.batch_wait_timeout_s)
        self.record_rpc = RpcCounter("encoder")
        self.guard = RpcGuard.from_config(self.config, "encoder")
        self._batch_size = metrics.Histogram(
            "smartpath_encoder_batch_size",
            description="Images or tile sets per encoder forward.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("kind",),
        )
        self._tiles = metrics.Counter("smartpath_encoder_tiles", description="Tiles encoded.")
        self._tiles_per_s = metrics.Gauge(
            "smartpath_encoder_tiles_per_second", description="Tiles/s of the last tile batch."
        )
        self._cache = metrics.Counter(
            "smartpath_feature_cache_lookups",
            description="Slide feature cache lookups by result (hit or miss).",
            tag_keys=("result",),
        )

    # -- batched engines -------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode_rois(self, rois: list[RoiInput]) -> list[VisualTokens]:
        self._batch_size.observe(len(rois), tags={"kind": "image"})
        return await asyncio.to_thread(self.encoder.encode_rois, rois)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _encode_tile_sets(self, sets: list[np.ndarray]) -> list[np.ndarray]:
        self._batch_size.observe(len(sets), tags={"kind": "tiles"})
        start = time.perf_counter()
        features = await asyncio.to_thread(self.encoder.encode_tiles, np.concatenate(sets))
        n = len(features)
        self._tiles.inc(n)
        self._tiles_per_s.set(n / max(time.perf_counter() - start, 1e-9))
        return np.split(features, np.cumsum([len(s) for s in sets])[:-1])

    # -- Python API (DeploymentHandle) -----------------------------------------------------
    async def encode_image(self, image: np.ndarray) -> VisualTokens:
        """Visual tokens of one ROI (batched with concurrent callers)."""
        roi = await asyncio.to_thread(self.encoder.prepare, image)
        return await self._encode_rois(roi)

    async def encode_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Tile features of (n, S, S, 3) uint8 tiles (batched with concurrent callers)."""
        return await self._encode_tile_sets(tiles)

    async def encode_slide(
        self, uri: str, mpp_override: float | None = None
    ) -> AsyncIterator[SlideProgress | SlideEncoding]:
        """Progress, then the slide's tokens; call with ``handle.options(stream=True)``."""
        async for item in encode_slide(
            uri,
            mpp_override,
            source=self.tiler,
            encode_tiles=self.encode_tiles,
            encoder=self.encoder,
            cache=self.cache,
        ):
            if isinstance(item, SlideEncoding):
                self._cache.inc(tags={"result": "hit" if item.cache_hit else "miss"})
            yield item

    # -- gRPC API ----------------------------------------------------------------------------
    @unary(encoding_pb2.EncodeImageResponse)
    async def EncodeImage(
        self, request: encoding_pb2.EncodeImageRequest
    ) -> encoding_pb2.EncodeImageResponse:
        image = await asyncio.to_thread(decode_image, request.image, self.config.model)
        visual = await self.encode_image(image)
        return encoding_pb2.EncodeImageResponse(
            tokens=to_tensor(visual.tokens), image_grid_thw=list(visual.image_grid_thw or ())
        )

    @unary(encoding_pb2.EncodeTilesResponse)
    async def EncodeTiles(
        self, request: encoding_pb2.EncodeTilesRequest
    ) -> encoding_pb2.EncodeTilesResponse:
        size = request.tile_size
        if not 16 <= size <= 1024:
            raise InvalidArgumentError(f"tile_size={size} must be in [16, 1024]")
        per_tile = size * size * 3
        if not request.pixels or len(request.pixels) % per_tile:
            raise InvalidArgumentError(
                f"pixels hold {len(request.pixels)} bytes, not a positive multiple of "
                f"{size}x{size}x3"
            )
        count, cap = len(request.pixels) // per_tile, self.config.model.max_tiles_per_request
        if count > cap:
            raise InvalidArgumentError(f"{count} tiles in one request; the limit is {cap}")
        tiles = np.frombuffer(request.pixels, dtype=np.uint8).reshape(-1, size, size, 3)
        features = await self.encode_tiles(tiles)
        return encoding_pb2.EncodeTilesResponse(
            features=to_tensor(features), encoder=self.encoder.tile_encoder.name
        )

    @unary(encoding_pb2.EncodeSlideResponse)
    async def EncodeSlide(
        self, request: encoding_pb2.EncodeSlideRequest
    ) -> encoding_pb2.EncodeSlideResponse:
        if not request.slide.uri:
            raise InvalidArgumentError("slide.uri is empty; give s3://bucket/key or a local path")
        result = None
        async for item in self.encode_slide(request.slide.uri, request.slide.mpp_override or None):
            result = item
        assert isinstance(result, SlideEncoding)
        return encoding_pb2.EncodeSlideResponse(
            tokens=to_tensor(result.visual.tokens),
            slide_id=result.slide_id,
            plan_hash=result.plan_hash,
            tiles=result.tiles,
            cache_hit=result.cache_hit,
        )
