"""The services seen through Ray Serve DeploymentHandles, with the same methods as their
in-process counterparts in :mod:`smartpath.services.local`.

Arguments and results travel as Python objects (numpy arrays, never re-encoded as protobuf)
by one of Serve's two transports, chosen per call by the size of its tensors: small calls
(a route, a ROI's image and visual tokens) go straight to the replica over Serve's
inter-deployment gRPC, which skips the object store's put and get (a few ms per hop); calls
whose tensors exceed ``serve.inline_message_bytes`` pass them by reference through Ray's object
store (zero-copy between processes on a node). Tile batches and slide encodings always go
by reference."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve

from smartpath.core.config import SmartPathConfig
from smartpath.core.slides.plan import TileGeometry, TilePlan
from smartpath.core.slides.resolution import Resolution
from smartpath.core.slides.slide import SlideInfo
from smartpath.core.slides.tiler import ResolvedSlide, TileRequest, TissueMask
from smartpath.model.grammar import Scale, Task
from smartpath.services.contracts import (
    SERVICE_OF_APP,
    DecodeEvent,
    DecodeRequest,
    Route,
    SlideEncoding,
    SlideProgress,
    VisualTokens,
)


def handle(app: str) -> Any:
    """The DeploymentHandle of a SmartPath application's deployment."""
    return serve.get_deployment_handle(SERVICE_OF_APP[app].deployment, app_name=app)


class TilerHandle:
    """The SlideTiler deployment's Python API (the
    :class:`~smartpath.services.contracts.SlideSource`), with the same methods as
    :class:`~smartpath.services.tiling.source.TilerSource`."""

    def __init__(self, tiler: Any) -> None:
        self.tiler = tiler

    async def resolve(self, uri: str, mpp_override: float | None = None) -> ResolvedSlide:
        return await self.tiler.resolve.remote(uri, mpp_override)

    async def describe(self, slide: ResolvedSlide) -> SlideInfo:
        return await self.tiler.describe.remote(slide)

    async def plan_key(self, slide: ResolvedSlide, request: TileRequest) -> str:
        return await self.tiler.plan_key.remote(slide, request)

    async def plan(self, slide: ResolvedSlide, request: TileRequest) -> tuple[TilePlan, TissueMask]:
        return await self.tiler.plan.remote(slide, request)

    def read_tiles(
        self,
        slide: ResolvedSlide,
        geometry: TileGeometry,
        xs: np.ndarray,
        ys: np.ndarray,
        batch_size: int | None = None,
    ) -> AsyncIterator[tuple[int, np.ndarray]]:
        stream = self.tiler.options(stream=True)
        return stream.read_tiles.remote(slide, geometry, xs, ys, batch_size)

    async def read_region(
        self,
        slide: ResolvedSlide,
        rect: tuple[int, int, int, int],
        resolution: Resolution | None = None,
    ) -> np.ndarray:
        return await self.tiler.read_region.remote(slide, rect, resolution)


class HandleBackends:
    """The pipeline's backends in a Serve cluster (see ``gateway.pipeline.Backends``)."""

    def __init__(self, config: SmartPathConfig) -> None:
        self.tiler = TilerHandle(handle("tiler"))
        self.encoder = handle("encoder")
        self.router = handle("router")
        self.decoder = handle("decoder")
        self.inline_bytes = config.serve.inline_message_bytes

    def by_reference(self, nbytes: int) -> bool:
        """Whether a call carrying ``nbytes`` of tensors passes them through the object store
        (else inline, over direct gRPC)."""
        return nbytes > self.inline_bytes

    async def encode_image(self, image: np.ndarray) -> VisualTokens:
        options = self.encoder.options(_by_reference=self.by_reference(image.nbytes))
        return await options.encode_image.remote(image)

    def encode_slide(
        self, uri: str, mpp_override: float | None
    ) -> AsyncIterator[SlideProgress | SlideEncoding]:
        return self.encoder.options(stream=True).encode_slide.remote(uri, mpp_override)

    async def route(self, task: Task, scale: Scale, pooled: np.ndarray) -> Route:
        options = self.router.options(_by_reference=self.by_reference(pooled.nbytes))
        return await options.route.remote(task, scale, pooled)

    def _decoder(self, request: DecodeRequest, expert_set: str, *, stream: bool) -> Any:
        # Requests for the same expert set go to replicas that already hold it.
        return self.decoder.options(
            stream=stream,
            multiplexed_model_id=expert_set,
            _by_reference=self.by_reference(request.visual.tokens.nbytes),
        )

    def decode(self, request: DecodeRequest, expert_set: str) -> AsyncIterator[DecodeEvent]:
        return self._decoder(request, expert_set, stream=True).decode.remote(request)

    async def complete(self, request: DecodeRequest, expert_set: str) -> DecodeEvent:
        return await self._decoder(request, expert_set, stream=False).complete.remote(request)
