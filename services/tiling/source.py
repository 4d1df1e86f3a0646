"""The tiler's asynchronous Python API: blocking :class:`Tiler` calls run in worker threads.

The SlideTiler deployment exposes it through DeploymentHandles
(:class:`~smartpath.services.handles.TilerHandle`, the same methods); in-process backends
use it directly. It is the :class:`~smartpath.services.contracts.SlideSource` of slide
encoding and region reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from smartpath.core.slides.plan import TileGeometry, TilePlan
from smartpath.core.slides.resolution import Resolution
from smartpath.core.slides.slide import SlideInfo
from smartpath.core.slides.tiler import OpenedSlide, ResolvedSlide, Tiler, TileRequest, TissueMask
from smartpath.services.aio import iterate_in_thread


class TilerSource:
    """Async access to one :class:`Tiler` (see module docstring)."""

    def __init__(self, tiler: Tiler) -> None:
        self.tiler = tiler

    async def resolve(self, uri: str, mpp_override: float | None = None) -> ResolvedSlide:
        """The slide's content id from metadata only (no download): what the other methods
        take, so a request looks its slide up once."""
        return await asyncio.to_thread(self.tiler.resolve, uri, mpp_override)

    async def describe(self, slide: ResolvedSlide) -> SlideInfo:
        """The slide's metadata."""
        return (await self._opened(slide)).info

    async def plan_key(self, slide: ResolvedSlide, request: TileRequest) -> str:
        """The hash of the plan :meth:`plan` would make (the feature cache's key), without
        reading the slide."""
        return self.tiler.plan_key(slide, request)

    async def plan(self, slide: ResolvedSlide, request: TileRequest) -> tuple[TilePlan, TissueMask]:
        """Tissue tile plan of a slide, and the tissue mask it came from."""
        opened = await self._opened(slide)
        return await asyncio.to_thread(self.tiler.plan, opened, request)

    async def read_tiles(
        self,
        slide: ResolvedSlide,
        geometry: TileGeometry,
        xs: np.ndarray,
        ys: np.ndarray,
        batch_size: int | None = None,
    ) -> AsyncIterator[tuple[int, np.ndarray]]:
        """Stream (offset, tiles) batches (through a handle: ``options(stream=True)``)."""
        opened = await self._opened(slide)
        async for batch in iterate_in_thread(self.tiler.read(opened, geometry, xs, ys, batch_size)):
            yield batch

    async def read_region(
        self,
        slide: ResolvedSlide,
        rect: tuple[int, int, int, int],
        resolution: Resolution | None = None,
    ) -> np.ndarray:
        """A level-0 rectangle (x, y, w, h) of the slide as RGB at ``resolution`` (None: the
        configured ``model.region_mpp``)."""
        opened = await self._opened(slide)
        return await asyncio.to_thread(self.tiler.read_region, opened, *rect, resolution)

    async def _opened(self, slide: ResolvedSlide) -> OpenedSlide:
        return await asyncio.to_thread(self.tiler.open, slide)
