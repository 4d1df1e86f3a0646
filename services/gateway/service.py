"""The Pathology Ray Serve deployment: the public front door. It checks access, validates the
question and composes the tiler, encoder, router and decoder deployments through the
:class:`~smartpath.services.gateway.pipeline.Pipeline`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray.serve import context as serve_context

from smartpath.core.config import SmartPathConfig
from smartpath.services.contracts import ModelInfo
from smartpath.services.gateway.pipeline import Pipeline
from smartpath.services.grpc_util import RpcCounter, RpcGuard, log_to_replica, server_stream, unary
from smartpath.services.handles import HandleBackends
from smartpath.v1 import common_pb2, pathology_pb2


def request_id() -> str:
    """Serve's id of the current request (the caller's ``request_id`` metadata when sent);
    it also tags every log line of every replica the request passes through."""
    rid = serve_context._get_serve_request_context().request_id
    return rid or uuid.uuid4().hex


class PathologyService:
    """Ray Serve deployment class serving ``smartpath.v1.Pathology``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = SmartPathConfig(**config)
        log_to_replica(self.config)
        self.backends = HandleBackends(self.config)
        self._pipeline: Pipeline | None = None
        self._info: ModelInfo | None = None
        self.record_rpc = RpcCounter("gateway")
        self.guard = RpcGuard.from_config(self.config, "gateway")

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self.backends.decoder.info.remote()
        return self._info

    async def _ready(self) -> Pipeline:
        if self._pipeline is None:
            info = await self._model_info()
            self._pipeline = Pipeline(self.backends, self.config, info)
        return self._pipeline

    @unary(pathology_pb2.AnalyzeRegionResponse)
    async def AnalyzeRegion(
        self, request: pathology_pb2.AnalyzeRegionRequest
    ) -> pathology_pb2.AnalyzeRegionResponse:
        pipeline = await self._ready()
        analysis = await pipeline.analyze_region(request, request_id=request_id())
        return pathology_pb2.AnalyzeRegionResponse(analysis=analysis)

    @server_stream
    async def AnalyzeSlide(
        self, request: pathology_pb2.AnalyzeSlideRequest
    ) -> AsyncIterator[pathology_pb2.AnalyzeSlideResponse]:
        pipeline = await self._ready()
        async for event in pipeline.analyze_slide(request, request_id=request_id()):
            yield event

    @unary(pathology_pb2.GetModelInfoResponse)
    async def GetModelInfo(
        self, request: pathology_pb2.GetModelInfoRequest
    ) -> pathology_pb2.GetModelInfoResponse:
        await self._ready()
        return model_info_response(self.config, await self._model_info())


def model_info_response(
    config: SmartPathConfig, info: ModelInfo
) -> pathology_pb2.GetModelInfoResponse:
    """GetModelInfoResponse from the served model's facts and the serving limits."""
    m = config.model
    labels = []
    for key, values in sorted(info.labels.items()):
        task, _, scale = key.partition("/")
        labels.append(
            pathology_pb2.TaskLabels(
                task=common_pb2.Task.Value(f"TASK_{task.upper()}"),
                scale=common_pb2.Scale.Value(f"SCALE_{scale.upper()}"),
                labels=values,
            )
        )
    tiles = info.slide_tiles
    return pathology_pb2.GetModelInfoResponse(
        name=m.uri or "smartpath-demo",
        version=info.version,
        preset=info.preset,
        experts=info.experts,
        top_k=info.top_k,
        tile_encoder=info.tile_encoder,
        default_labels=labels,
        slide_tiles=pathology_pb2.SlideTileSpec(
            mpp=tiles.mpp,
            tile_size=tiles.tile_size,
            min_tissue=tiles.min_tissue,
            stain_norm=tiles.stain_norm or "",
        ),
        prompt_style=info.prompt_style,
        max_prompt_chars=m.max_prompt_chars,
        max_image_pixels=m.max_image_pixels,
        max_new_tokens=m.max_new_tokens,
    )
