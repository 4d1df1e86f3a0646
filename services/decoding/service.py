"""The Decoder Ray Serve deployment: batched mixed-expert decoding with token streaming.

Replicas are multiplexed by expert set (Ray Serve model multiplexing): the gateway sends a
request with ``multiplexed_model_id = route.expert_set``, and Serve prefers replicas that
already serve that set. Every replica holds every expert, so a request still runs anywhere;
the affinity keeps each replica's batches on few expert sets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import metrics

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.model.grammar import Scale
from smartpath.services.contracts import (
    FINISH_STOP,
    DecodeEvent,
    DecodeRequest,
    ModelInfo,
    VisualTokens,
    make_question,
    parse_expert_set,
    parse_scale,
)
from smartpath.services.decoding.decoder import BatchDecoder, DecoderStats
from smartpath.services.grpc_util import RpcCounter, RpcGuard, log_to_replica, server_stream
from smartpath.services.models import SERVICE_PARTS, load_served_model, model_info
from smartpath.services.tensors import from_tensor
from smartpath.v1 import common_pb2, decoding_pb2


class DecoderService:
    """Ray Serve deployment class serving ``smartpath.v1.Decoder``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = SmartPathConfig(**config)
        log_to_replica(self.config)
        self.model = load_served_model(self.config, SERVICE_PARTS["decoder"])
        d = self.config.serve.decoder
        self.record_rpc = RpcCounter("decoder")
        self.guard = RpcGuard.from_config(self.config, "decoder")
        queue = metrics.Histogram(
            "smartpath_decoder_queue_seconds",
            description="Time a request waited for its decoding batch.",
            boundaries=[0.001, 0.005, 0.02, 0.1, 0.5, 2, 10],
        )
        batch_size = metrics.Histogram(
            "smartpath_decoder_batch_size",
            description="Requests decoded together (continuous: running rows when a group joins).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        tokens = metrics.Counter("smartpath_decoder_tokens", description="Tokens generated.")
        tokens_per_s = metrics.Gauge(
            "smartpath_decoder_tokens_per_second",
            description="Tokens/s of the last batch (continuous: of the last step or join).",
        )

        def on_batch(size: int, waits: list[float]) -> None:
            batch_size.observe(size)
            for w in waits:
                queue.observe(w)

        def on_tokens(n: int, seconds: float) -> None:
            tokens.inc(n)
            tokens_per_s.set(n / max(seconds, 1e-9))

        self.engine = BatchDecoder.from_config(
            self.model, d, DecoderStats(on_batch=on_batch, on_tokens=on_tokens)
        )
        num_experts = int(self.model.cfg.experts.num_experts)

        async def load_expert_set(key: str) -> tuple[int, ...]:
            return parse_expert_set(key, num_experts)

        self._expert_set = serve.multiplexed(max_num_models_per_replica=d.max_expert_sets)(
            load_expert_set
        )

    # -- Python API (DeploymentHandle) -----------------------------------------------------
    async def info(self) -> ModelInfo:
        """The served model's facts (the gateway's GetModelInfo and request validation)."""
        return model_info(self.model)

    async def _check_expert_set(self, request: DecodeRequest) -> None:
        key = serve.get_multiplexed_model_id()
        if key:
            experts = await self._expert_set(key)
            if tuple(sorted(request.experts)) != experts:
                raise InvalidArgumentError(f"request experts do not match expert set {key!r}")

    async def decode(self, request: DecodeRequest) -> AsyncIterator[DecodeEvent]:
        """Stream one request's completion; call with ``handle.options(stream=True)``."""
        await self._check_expert_set(request)
        async for event in self.engine.decode(request):
            yield event

    async def complete(self, request: DecodeRequest) -> DecodeEvent:
        """One request's whole completion (no per-token messages between replicas)."""
        await self._check_expert_set(request)
        return await self.engine.complete(request)

    # -- gRPC API ----------------------------------------------------------------------------
    @server_stream
    async def Decode(
        self, request: decoding_pb2.DecodeRequest
    ) -> AsyncIterator[decoding_pb2.DecodeResponse]:
        scale = parse_scale(request.scale)
        question = make_question(
            request.task,
            scale,
            request.prompt,
            list(request.labels),
            list(request.options),
            request.max_new_tokens,
            max_prompt_chars=self.config.model.max_prompt_chars,
            max_new_tokens_cap=self.config.model.max_new_tokens,
            max_labels=self.config.model.max_labels,
            constrained=not request.unconstrained,
        )
        grid = tuple(int(v) for v in request.image_grid_thw)
        if scale == Scale.ROI and len(grid) != 3:
            raise InvalidArgumentError("ROI requests need image_grid_thw = (t, h, w)")
        visual = VisualTokens(
            from_tensor(request.visual_tokens, "visual_tokens", ndim=2),
            grid if scale == Scale.ROI else None,
        )
        decode = DecodeRequest(
            question=question,
            visual=visual,
            experts=tuple(e.index for e in request.experts),
            weights=tuple(e.weight for e in request.experts),
            temperature=max(0.0, request.temperature),
        )
        async for event in self.engine.decode(decode):
            response = decoding_pb2.DecodeResponse(text_delta=event.text_delta, done=event.done)
            if event.done:
                response.finish_reason = (
                    decoding_pb2.FINISH_REASON_STOP
                    if event.finish_reason == FINISH_STOP
                    else decoding_pb2.FINISH_REASON_LENGTH
                )
                response.prompt_tokens = event.prompt_tokens
                response.completion_tokens = event.completion_tokens
                response.label_scores.extend(
                    common_pb2.LabelScore(label=k, score=v) for k, v in event.label_scores
                )
            yield response
