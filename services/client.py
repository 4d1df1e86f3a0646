"""A small typed client of SmartPath's gRPC API, used by the CLI, the demo and the tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
import numpy as np

from smartpath.v1 import common_pb2, tiling_pb2, tiling_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def tile_spec(
    mpp: float | None = None,
    magnification: float | None = None,
    tile_size: int = 0,
    overlap: int = 0,
    min_tissue_fraction: float | None = None,
) -> tiling_pb2.TileSpec:
    """A TileSpec message; unset values take the server's defaults."""
    spec = tiling_pb2.TileSpec(tile_size=tile_size, overlap=overlap)
    if mpp is not None:
        spec.resolution.mpp = mpp
    elif magnification is not None:
        spec.resolution.magnification = magnification
    if min_tissue_fraction is not None:
        spec.min_tissue_fraction = min_tissue_fraction
    return spec


class TilerClient:
    """Calls ``smartpath.v1.SlideTiler`` on a Serve gRPC proxy."""

    def __init__(self, address: str, application: str | None = "tiler", timeout_s: float = 120):
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = tiling_pb2_grpc.SlideTilerStub(self.channel)
        self.metadata = (("application", application),) if application else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TilerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(
        self, uri: str, *, mpp_override: float = 0.0, thumbnail_max_px: int = 0
    ) -> tiling_pb2.DescribeSlideResponse:
        """DescribeSlide."""
        request = tiling_pb2.DescribeSlideRequest(
            slide=common_pb2.SlideRef(uri=uri, mpp_override=mpp_override),
            thumbnail_max_px=thumbnail_max_px,
        )
        return self.stub.DescribeSlide(request, metadata=self.metadata, timeout=self.timeout_s)

    def plan(
        self,
        uri: str,
        spec: tiling_pb2.TileSpec | None = None,
        *,
        mpp_override: float = 0.0,
        include_tissue_mask: bool = False,
    ) -> tiling_pb2.PlanTilesResponse:
        """PlanTiles."""
        request = tiling_pb2.PlanTilesRequest(
            slide=common_pb2.SlideRef(uri=uri, mpp_override=mpp_override),
            spec=spec or tiling_pb2.TileSpec(),
            include_tissue_mask=include_tissue_mask,
        )
        return self.stub.PlanTiles(request, metadata=self.metadata, timeout=self.timeout_s)

    def read_tiles(
        self,
        uri: str,
        spec: tiling_pb2.TileSpec | None = None,
        tiles: Sequence[tiling_pb2.Tile] = (),
        *,
        mpp_override: float = 0.0,
        batch_size: int = 0,
    ) -> Iterator[tuple[tiling_pb2.ReadTilesResponse, np.ndarray]]:
        """ReadTiles as raw RGB: yields (response, (n, S, S, 3) uint8 pixels) per batch."""
        request = tiling_pb2.ReadTilesRequest(
            slide=common_pb2.SlideRef(uri=uri, mpp_override=mpp_override),
            spec=spec or tiling_pb2.TileSpec(),
            tiles=list(tiles),
            batch_size=batch_size,
            encoding=tiling_pb2.TILE_ENCODING_RAW_RGB,
        )
        stream = self.stub.ReadTiles(request, metadata=self.metadata, timeout=self.timeout_s)
        for response in stream:
            s = response.tile_size
            pixels = np.frombuffer(response.pixels, dtype=np.uint8).reshape(-1, s, s, 3)
            yield response, pixels
