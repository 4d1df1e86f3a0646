"""The tiler's asynchronous Python API: blocking :class:`Tiler` calls run in worker threads.

The SlideTiler deployment exposes it through DeploymentHandles; in-process backends use it
directly. It is the :class:`~smartpath.services.encoding.slides.SlideSource` of slide encoding.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from smartpath.core.slides.plan import TileGeometry, TilePlan
from smartpath.core.slides.slide import SlideInfo
from smartpath.core.slides.tiler import Tiler, TileRequest, TissueMask
from smartpath.services.aio import iterate_in_thread


class TilerSource:
    """Async access to one :class:`Tiler` (see module docstring)."""

    def __init__(self, tiler: Tiler) -> None:
        self.tiler = tiler

    async def describe(self, uri: str, mpp_override: float | None = None) -> tuple[SlideInfo, str]:
        """The slide's metadata and content id."""
        opened = await asyncio.to_thread(self.tiler.open, uri, mpp_override)
        return opened.info, opened.slide_id

    async def identify(self, uri: str) -> str:
        """The slide's content id from metadata only (no download)."""
        return await asyncio.to_thread(self.tiler.identify, uri)

    async def tissue_params(self) -> dict[str, float]:
        """The tissue-detection settings that shape this tiler's plans."""
        return self.tiler.tissue_params()

    async def read_region(
        self, uri: str, mpp_override: float | None, rect: tuple[int, int, int, int], mpp: float
    ) -> np.ndarray:
        """A level-0 rectangle (x, y, w, h) of the slide as RGB at ``mpp`` µm/px."""
        opened = await asyncio.to_thread(self.tiler.open, uri, mpp_override)
        return await asyncio.to_thread(self.tiler.read_region, opened, *rect, mpp)

    async def plan(
        self, uri: str, request: TileRequest, mpp_override: float | None = None
    ) -> tuple[TilePlan, TissueMask]:
        """Tissue tile plan of a slide."""
        opened = await asyncio.to_thread(self.tiler.open, uri, mpp_override)
        return await asyncio.to_thread(self.tiler.plan, opened, request)

    async def read_tiles(
        self,
        uri: str,
        geometry: TileGeometry,
        xs: np.ndarray,
        ys: np.ndarray,
        mpp_override: float | None = None,
        batch_size: int | None = None,
    ) -> AsyncIterator[tuple[int, np.ndarray]]:
        """Stream (offset, tiles) batches (through a handle: ``options(stream=True)``)."""
        opened = await asyncio.to_thread(self.tiler.open, uri, mpp_override)
        async for batch in iterate_in_thread(self.tiler.read(opened, geometry, xs, ys, batch_size)):
            yield batch
