"""The whole pipeline in one process: the services' engines as local objects.

Backs the KServe adapter, the benchmarks' in-process baseline and tests. The engines are the
ones the deployments wrap, so in-process and served results are the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from smartpath.core.config import SmartPathConfig
from smartpath.core.slides.tiler import Tiler
from smartpath.model.grammar import Scale, Task
from smartpath.model.mllm import SmartPathModel
from smartpath.services.contracts import (
    DecodeEvent,
    DecodeRequest,
    Route,
    SlideEncoding,
    SlideProgress,
    VisualTokens,
)
from smartpath.services.decoding.decoder import BatchDecoder
from smartpath.services.encoding.cache import FeatureCache
from smartpath.services.encoding.encoder import VisualEncoder
from smartpath.services.encoding.slides import encode_slide
from smartpath.services.gateway.pipeline import Pipeline
from smartpath.services.models import load_served_model, model_info
from smartpath.services.routing.router import ExpertGate
from smartpath.services.tiling.source import TilerSource


class LocalBackends:
    """Tiler, encoder, gate and decoder in this process, sharing one model."""

    def __init__(self, config: SmartPathConfig, model: SmartPathModel | None = None) -> None:
        self.config = config
        self.model = model if model is not None else load_served_model(config)
        self.tiler = TilerSource(Tiler(config))
        store = self.tiler.tiler.store
        self.encoder = VisualEncoder.from_config(self.model, config, store)
        self.cache = FeatureCache(store, config.model.features_bucket)
        self.gate = ExpertGate(self.model)
        self.decoder = BatchDecoder.from_config(self.model, config.serve.decoder)

    async def encode_image(self, image: np.ndarray) -> VisualTokens:
        roi = self.encoder.prepare(image)
        return (await asyncio.to_thread(self.encoder.encode_rois, [roi]))[0]

    def encode_slide(
        self, uri: str, mpp_override: float | None
    ) -> AsyncIterator[SlideProgress | SlideEncoding]:
        async def encode_tiles(tiles: np.ndarray) -> np.ndarray:
            return await asyncio.to_thread(self.encoder.encode_tiles, tiles)

        return encode_slide(
            uri,
            mpp_override,
            source=self.tiler,
            encode_tiles=encode_tiles,
            encoder=self.encoder,
            cache=self.cache,
        )

    async def route(self, task: Task, scale: Scale, pooled: np.ndarray) -> Route:
        return self.gate.route(task, scale, pooled)

    def decode(self, request: DecodeRequest, expert_set: str) -> AsyncIterator[DecodeEvent]:
        return self.decoder.decode(request)

    async def complete(self, request: DecodeRequest, expert_set: str) -> DecodeEvent:
        return await self.decoder.complete(request)

    def close(self) -> None:
        """Release the tiler's slides and threads."""
        self.tiler.tiler.close()


def local_pipeline(
    config: SmartPathConfig, model: SmartPathModel | None = None
) -> tuple[Pipeline, LocalBackends]:
    """A :class:`Pipeline` over :class:`LocalBackends` (close the backends when done)."""
    backends = LocalBackends(config, model)
    return Pipeline(backends, config, model_info(backends.model)), backends
