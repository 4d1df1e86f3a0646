"""The services seen through Ray Serve DeploymentHandles, with the same methods as their
in-process counterparts in :mod:`smartpath.services.local` (numpy arrays travel through
Ray's object store, not protobuf)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from ray import serve

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

    def __init__(self) -> None:
        self.tiler = TilerHandle(handle("tiler"))
        self.encoder = handle("encoder")
        self.router = handle("router")
        self.decoder = handle("decoder")

    async def encode_image(self, image: np.ndarray) -> VisualTokens:
        return await self.encoder.encode_image.remote(image)

    def encode_slide(
        self, uri: str, mpp_override: float | None
    ) -> AsyncIterator[SlideProgress | SlideEncoding]:
        return self.encoder.options(stream=True).encode_slide.remote(uri, mpp_override)

    async def route(self, task: Task, scale: Scale, pooled: np.ndarray) -> Route:
        return await self.router.route.remote(task, scale, pooled)

    def decode(self, request: DecodeRequest, expert_set: str) -> AsyncIterator[DecodeEvent]:
        # Requests for the same expert set go to replicas that already hold it.
        options = self.decoder.options(stream=True, multiplexed_model_id=expert_set)
        return options.decode.remote(request)

    async def complete(self, request: DecodeRequest, expert_set: str) -> DecodeEvent:
        options = self.decoder.options(multiplexed_model_id=expert_set)
        return await options.complete.remote(request)
