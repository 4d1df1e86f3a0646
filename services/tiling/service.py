"""The SlideTiler Ray Serve deployment: gRPC methods for clients, Python methods for the
gateway (through a DeploymentHandle, moving numpy arrays through Ray's object store).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from PIL import Image
from ray.serve import metrics

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.core.slides.plan import TileGeometry, TilePlan
from smartpath.core.slides.tiler import OpenedSlide, ResolvedSlide, Tiler, TileRequest
from smartpath.services.aio import iterate_in_thread
from smartpath.services.contracts import parse_resolution
from smartpath.services.grpc_util import RpcCounter, RpcGuard, log_to_replica, server_stream, unary
from smartpath.services.tiling.source import TilerSource
from smartpath.v1 import common_pb2, tiling_pb2

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
JPEG_QUALITY = 90


def encode_image(rgb: np.ndarray, media_type: str = "image/png") -> common_pb2.EncodedImage:
    """An RGB or boolean array as an EncodedImage message."""
    image = Image.fromarray(rgb)
    buf = io.BytesIO()
    if media_type == "image/jpeg":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return common_pb2.EncodedImage(
        data=buf.getvalue(), media_type=media_type, width=image.width, height=image.height
    )


def tile_request(spec: tiling_pb2.TileSpec) -> TileRequest:
    """The domain request for a TileSpec message."""
    return TileRequest(
        resolution=parse_resolution(spec.resolution),
        tile_size=spec.tile_size or None,
        overlap=spec.overlap,
        min_tissue_fraction=(
            spec.min_tissue_fraction if spec.HasField("min_tissue_fraction") else None
        ),
    )


def describe_response(
    opened: OpenedSlide, thumbnail: np.ndarray | None
) -> tiling_pb2.DescribeSlideResponse:
    """DescribeSlideResponse for an open slide."""
    info = opened.info
    return tiling_pb2.DescribeSlideResponse(
        slide_id=opened.slide_id,
        width=info.width,
        height=info.height,
        levels=[
            tiling_pb2.SlideLevel(width=w, height=h, downsample=ds, mpp=(info.mpp or 0.0) * ds)
            for (w, h), ds in zip(info.level_dimensions, info.level_downsamples, strict=True)
        ],
        mpp_x=info.mpp_x or 0.0,
        mpp_y=info.mpp_y or 0.0,
        mpp_from_override=info.mpp_from_override,
        objective_power=info.objective_power or 0.0,
        vendor=info.vendor,
        associated_images=[
            tiling_pb2.AssociatedImage(name=name, width=w, height=h)
            for name, (w, h) in sorted(info.associated_images.items())
        ],
        thumbnail=encode_image(thumbnail, "image/jpeg") if thumbnail is not None else None,
    )


def plan_message(plan: TilePlan) -> tiling_pb2.TilePlan:
    """TilePlan message of a plan."""
    g = plan.geometry
    return tiling_pb2.TilePlan(
        plan_hash=plan.plan_hash,
        mpp=g.mpp,
        tile_size=g.tile_size,
        overlap=g.overlap,
        footprint=g.footprint,
        stride=g.stride,
        level=g.level,
        level_downsample=g.level_downsample,
        cols=g.cols,
        rows=g.rows,
        min_tissue_fraction=plan.min_tissue_fraction,
        tiles=[
            tiling_pb2.Tile(x=x, y=y, col=c, row=r, tissue_fraction=f)
            for x, y, c, r, f in zip(
                plan.x.tolist(),
                plan.y.tolist(),
                plan.col.tolist(),
                plan.row.tolist(),
                plan.tissue_fraction.tolist(),
                strict=True,
            )
        ],
    )


def tile_batch(
    tiles: list[tiling_pb2.Tile],
    pixels: np.ndarray,
    encoding: int,
    offset: int,
    total: int,
) -> tiling_pb2.ReadTilesResponse:
    """One streamed batch of tiles in the requested encoding."""
    response = tiling_pb2.ReadTilesResponse(
        tiles=tiles,
        tile_size=pixels.shape[1],
        encoding=encoding,
        offset=offset,
        total=total,
    )
    if encoding == tiling_pb2.TILE_ENCODING_RAW_RGB:
        response.pixels = np.ascontiguousarray(pixels).tobytes()
    else:
        media = "image/jpeg" if encoding == tiling_pb2.TILE_ENCODING_JPEG else "image/png"
        response.images.extend(encode_image(tile, media).data for tile in pixels)
    return response


class SlideTilerService(TilerSource):
    """Ray Serve deployment class serving ``smartpath.v1.SlideTiler``; its Python API (for
    DeploymentHandles) is :class:`TilerSource`'s."""

    def __init__(self, config: dict[str, Any]) -> None:
        config = SmartPathConfig(**config)
        log_to_replica(config)
        super().__init__(Tiler(config))
        self.record_rpc = RpcCounter("tiler")
        self.guard = RpcGuard.from_config(config, "tiler")
        self._tiles = metrics.Counter(
            "smartpath_tiler_tiles", description="Tiles decoded and returned."
        )

    async def read_tiles(
        self,
        slide: ResolvedSlide,
        geometry: TileGeometry,
        xs: np.ndarray,
        ys: np.ndarray,
        batch_size: int | None = None,
    ) -> AsyncIterator[tuple[int, np.ndarray]]:
        """:meth:`TilerSource.read_tiles`, counted."""
        async for batch in super().read_tiles(slide, geometry, xs, ys, batch_size):
            self._tiles.inc(len(batch[1]))
            yield batch

    # -- gRPC API ------------------------------------------------------------------------
    @unary(tiling_pb2.DescribeSlideResponse)
    async def DescribeSlide(
        self, request: tiling_pb2.DescribeSlideRequest
    ) -> tiling_pb2.DescribeSlideResponse:
        opened = await self._open(request.slide)
        thumbnail = None
        if request.thumbnail_max_px:
            thumbnail = await asyncio.to_thread(
                self.tiler.thumbnail, opened, request.thumbnail_max_px
            )
        return describe_response(opened, thumbnail)

    @unary(tiling_pb2.PlanTilesResponse)
    async def PlanTiles(self, request: tiling_pb2.PlanTilesRequest) -> tiling_pb2.PlanTilesResponse:
        opened = await self._open(request.slide)
        plan, tissue = await asyncio.to_thread(self.tiler.plan, opened, tile_request(request.spec))
        response = tiling_pb2.PlanTilesResponse(
            plan=plan_message(plan), tissue_fraction=tissue.fraction
        )
        if request.include_tissue_mask:
            response.tissue_mask.CopyFrom(encode_image(tissue.mask))
            response.tissue_mask_downsample = tissue.downsample
        return response

    @server_stream
    async def ReadTiles(
        self, request: tiling_pb2.ReadTilesRequest
    ) -> AsyncIterator[tiling_pb2.ReadTilesResponse]:
        encoding = request.encoding or tiling_pb2.TILE_ENCODING_RAW_RGB
        if encoding not in tiling_pb2.TileEncoding.values():
            raise InvalidArgumentError(f"unknown tile encoding {encoding}")
        if request.batch_size < 0:
            raise InvalidArgumentError(f"batch_size={request.batch_size} must be >= 0")
        opened = await self._open(request.slide)
        spec = tile_request(request.spec)
        if request.tiles:
            geometry = await asyncio.to_thread(self.tiler.geometry, opened, spec)
            tiles = list(request.tiles)
        else:
            plan, _ = await asyncio.to_thread(self.tiler.plan, opened, spec)
            geometry, tiles = plan.geometry, list(plan_message(plan).tiles)
        tile_bytes = geometry.tile_size**2 * 3
        batch_size = request.batch_size or self.tiler.config.batch_size
        batch_size = max(1, min(batch_size, MAX_RESPONSE_BYTES // tile_bytes))
        xs = np.fromiter((t.x for t in tiles), dtype=np.int64, count=len(tiles))
        ys = np.fromiter((t.y for t in tiles), dtype=np.int64, count=len(tiles))
        batches = self.tiler.read(opened, geometry, xs, ys, batch_size)
        async for offset, pixels in iterate_in_thread(batches):
            self._tiles.inc(len(pixels))
            yield await asyncio.to_thread(
                tile_batch,
                tiles[offset : offset + len(pixels)],
                pixels,
                encoding,
                offset,
                len(tiles),
            )

    async def _open(self, slide: common_pb2.SlideRef) -> OpenedSlide:
        if not slide.uri:
            raise InvalidArgumentError("slide.uri is empty; give s3://bucket/key or a local path")
        return await self._opened(await self.resolve(slide.uri, slide.mpp_override or None))
