"""``smartpath analyze --local``: the Pathology and SlideTiler APIs in this process, without
Ray or a server.

:class:`LocalSession` has the methods of :class:`~smartpath.client.rpc.PathologyClient` and
:class:`~smartpath.client.rpc.TilerClient` that :func:`smartpath.client.analyze.analyze` calls,
answered by the same gateway pipeline and engines the deployments run
(:func:`smartpath.services.local.local_pipeline`) and the same message builders as the tiler
service, so an analysis prints the same JSON as over gRPC.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from smartpath.client.rpc import slide_event, slide_request
from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.services.gateway.service import model_info_response
from smartpath.services.local import local_pipeline
from smartpath.services.tiling.service import describe_response, plan_message, tile_request
from smartpath.v1 import pathology_pb2, tiling_pb2


class LocalSession:
    """One in-process pipeline (see module docstring); close it when done."""

    def __init__(self, config: SmartPathConfig) -> None:
        self.config = config
        self._runner = asyncio.Runner()
        self.pipeline, self.backends = local_pipeline(config)
        self.tiler = self.backends.tiler.tiler

    def close(self) -> None:
        """Release the slides, threads and the event loop."""
        self.backends.close()
        self._runner.close()

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Pathology ---------------------------------------------------------------------------
    def model_info(self) -> pathology_pb2.GetModelInfoResponse:
        """GetModelInfo."""
        return model_info_response(self.config, self.pipeline.model)

    def analyze_image(self, image: bytes, q: pathology_pb2.Question) -> pathology_pb2.Analysis:
        """AnalyzeRegion on PNG/JPEG bytes."""
        return self.analyze_region(pathology_pb2.AnalyzeRegionRequest(image=image, question=q))

    def analyze_region(self, request: pathology_pb2.AnalyzeRegionRequest) -> pathology_pb2.Analysis:
        """AnalyzeRegion."""
        return self._runner.run(self.pipeline.analyze_region(request, request_id=_request_id()))

    def analyze_slide(
        self,
        uri: str,
        q: pathology_pb2.Question,
        *,
        mpp_override: float = 0.0,
        on_progress: Callable[[pathology_pb2.Progress], None] | None = None,
    ) -> pathology_pb2.Analysis:
        """AnalyzeSlide; progress events go to ``on_progress``, the analysis is returned."""
        request = slide_request(uri, q, mpp_override)

        async def run() -> pathology_pb2.Analysis:
            async for event in self.pipeline.analyze_slide(request, request_id=_request_id()):
                if (analysis := slide_event(event, on_progress)) is not None:
                    return analysis
            raise RuntimeError("AnalyzeSlide ended without an analysis")

        return self._runner.run(run())

    # -- SlideTiler --------------------------------------------------------------------------
    def describe(
        self, uri: str, *, mpp_override: float = 0.0, thumbnail_max_px: int = 0
    ) -> tiling_pb2.DescribeSlideResponse:
        """DescribeSlide."""
        opened = self.tiler.open(self.tiler.resolve(uri, mpp_override or None))
        thumbnail = self.tiler.thumbnail(opened, thumbnail_max_px) if thumbnail_max_px else None
        return describe_response(opened, thumbnail)

    def plan(
        self,
        uri: str,
        spec: tiling_pb2.TileSpec | None = None,
        *,
        mpp_override: float = 0.0,
        include_tissue_mask: bool = False,
    ) -> tiling_pb2.PlanTilesResponse:
        """PlanTiles (without the tissue mask image)."""
        opened = self.tiler.open(self.tiler.resolve(uri, mpp_override or None))
        plan, tissue = self.tiler.plan(opened, tile_request(spec or tiling_pb2.TileSpec()))
        return tiling_pb2.PlanTilesResponse(
            plan=plan_message(plan), tissue_fraction=tissue.fraction
        )

    def read_tiles(
        self,
        uri: str,
        spec: tiling_pb2.TileSpec | None = None,
        tiles: Sequence[tiling_pb2.Tile] = (),
        *,
        mpp_override: float = 0.0,
        batch_size: int = 0,
    ) -> Iterator[tuple[tiling_pb2.ReadTilesResponse, np.ndarray]]:
        """ReadTiles of the given tiles as raw RGB: (response, (n, S, S, 3) uint8) per batch."""
        if not tiles:
            raise InvalidArgumentError("name the tiles to read")
        opened = self.tiler.open(self.tiler.resolve(uri, mpp_override or None))
        geometry = self.tiler.geometry(opened, tile_request(spec or tiling_pb2.TileSpec()))
        xs = np.array([t.x for t in tiles], dtype=np.int64)
        ys = np.array([t.y for t in tiles], dtype=np.int64)
        for offset, pixels in self.tiler.read(opened, geometry, xs, ys, batch_size or None):
            response = tiling_pb2.ReadTilesResponse(
                tiles=list(tiles[offset : offset + len(pixels)]),
                tile_size=pixels.shape[1],
                encoding=tiling_pb2.TILE_ENCODING_RAW_RGB,
                offset=offset,
                total=len(tiles),
            )
            yield response, pixels


def _request_id() -> str:
    return uuid.uuid4().hex
