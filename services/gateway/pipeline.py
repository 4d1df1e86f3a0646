"""The analysis pipeline behind ``smartpath.v1.Pathology``: validate, encode, route, decode,
parse. It talks to the other services through :class:`Backends`, so the same code runs in
the gateway deployment (DeploymentHandles) and in-process (local objects: the KServe adapter,
benchmarks, tests).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.model.grammar import Scale, Task
from smartpath.services.contracts import (
    DecodeEvent,
    DecodeRequest,
    ModelInfo,
    Question,
    Route,
    SlideEncoding,
    SlideProgress,
    SlideSource,
    VisualTokens,
    decode_image,
    make_question,
    parse_resolution,
)
from smartpath.services.gateway.results import add_evidence, analysis_from_completion
from smartpath.v1 import common_pb2, pathology_pb2


class Backends(Protocol):
    """The services the pipeline composes."""

    @property
    def tiler(self) -> SlideSource: ...

    async def encode_image(self, image: np.ndarray) -> VisualTokens: ...

    def encode_slide(
        self, uri: str, mpp_override: float | None
    ) -> AsyncIterator[SlideProgress | SlideEncoding]: ...

    async def route(self, task: Task, scale: Scale, pooled: np.ndarray) -> Route: ...

    def decode(self, request: DecodeRequest, expert_set: str) -> AsyncIterator[DecodeEvent]: ...

    async def complete(self, request: DecodeRequest, expert_set: str) -> DecodeEvent: ...


class _Timer:
    def __init__(self) -> None:
        self.timings: list[pathology_pb2.StageTiming] = []

    @contextmanager
    def stage(self, stage: int):
        start = time.perf_counter()
        try:
            yield
        finally:
            ms = (time.perf_counter() - start) * 1000
            self.timings.append(pathology_pb2.StageTiming(stage=stage, ms=ms))


class Pipeline:
    """One analysis from request to ``Analysis`` (see module docstring)."""

    def __init__(self, backends: Backends, config: SmartPathConfig, model: ModelInfo) -> None:
        self.backends = backends
        self.config = config
        self.limits = config.model
        self.model = model

    def question(self, message: pathology_pb2.Question, scale: Scale) -> Question:
        """Validate a request's question (before any slide or image work)."""
        q = make_question(
            message.task,
            scale,
            message.prompt,
            list(message.labels),
            list(message.options),
            message.max_new_tokens,
            max_prompt_chars=self.limits.max_prompt_chars,
            max_new_tokens_cap=self.limits.max_new_tokens,
            max_labels=self.limits.max_labels,
            constrained=not message.unconstrained,
        )
        # INVALID_ARGUMENT now rather than after encoding.
        q.text(self.model.labels, self.model.prompt_style)
        return q

    def _deadline(self, deadline: float | None) -> float:
        own = time.time() + self.config.serve.deadline_s
        return own if deadline is None else min(deadline, own)

    async def analyze_region(
        self,
        request: pathology_pb2.AnalyzeRegionRequest,
        *,
        request_id: str = "",
        deadline: float | None = None,
    ) -> pathology_pb2.Analysis:
        """Analyse an image or a slide region."""
        deadline = self._deadline(deadline)
        question = self.question(request.question, Scale.ROI)
        timer = _Timer()
        source = request.WhichOneof("source")
        region: tuple[int, int, int, int] | None = None
        with timer.stage(pathology_pb2.STAGE_TILING):
            if source == "image":
                image = decode_image(request.image, self.limits)
            elif source == "region":
                r = request.region
                if not r.slide.uri:
                    raise InvalidArgumentError("region.slide.uri is empty")
                region = (r.rect.x, r.rect.y, r.rect.width, r.rect.height)
                resolution = parse_resolution(r.resolution)  # None: the tiler's default
                tiler = self.backends.tiler
                slide = await tiler.resolve(r.slide.uri, r.slide.mpp_override or None)
                image = await tiler.read_region(slide, region, resolution)
            else:
                raise InvalidArgumentError("send an image or a slide region")
        with timer.stage(pathology_pb2.STAGE_ENCODING):
            visual = await self.backends.encode_image(image)
        size = (region[2], region[3]) if region else (int(image.shape[1]), int(image.shape[0]))
        analysis = None
        answer = self._answer(question, visual, timer, deadline, size=size, region=region)
        async for event in answer:
            if isinstance(event, pathology_pb2.Analysis):
                analysis = event
        assert analysis is not None
        return self._finish(analysis, timer, request_id)

    async def analyze_slide(
        self,
        request: pathology_pb2.AnalyzeSlideRequest,
        *,
        request_id: str = "",
        deadline: float | None = None,
    ) -> AsyncIterator[pathology_pb2.AnalyzeSlideResponse]:
        """Analyse a whole slide: progress events, then the analysis."""
        deadline = self._deadline(deadline)
        question = self.question(request.question, Scale.WSI)
        if not request.slide.uri:
            raise InvalidArgumentError("slide.uri is empty; give s3://bucket/key or a local path")
        timer = _Timer()
        encoding: SlideEncoding | None = None
        with timer.stage(pathology_pb2.STAGE_ENCODING):
            slide = request.slide
            async for item in self.backends.encode_slide(slide.uri, slide.mpp_override or None):
                if isinstance(item, SlideProgress):
                    yield pathology_pb2.AnalyzeSlideResponse(
                        progress=pathology_pb2.Progress(
                            stage=pathology_pb2.STAGE_ENCODING, done=item.done, total=item.total
                        )
                    )
                else:
                    encoding = item
        assert encoding is not None
        yield pathology_pb2.AnalyzeSlideResponse(
            progress=pathology_pb2.Progress(
                stage=pathology_pb2.STAGE_ENCODING,
                done=encoding.tiles,
                total=encoding.tiles,
                cache_hit=encoding.cache_hit,
            )
        )
        analysis = None
        answer = self._answer(question, encoding.visual, timer, deadline, size=(0, 0), stream=True)
        async for event in answer:
            if isinstance(event, pathology_pb2.Analysis):
                analysis = event
            else:
                yield pathology_pb2.AnalyzeSlideResponse(progress=event)
        assert analysis is not None
        result = self._finish(analysis, timer, request_id)
        result.tiles = encoding.tiles
        result.feature_cache_hit = encoding.cache_hit
        add_evidence(result, encoding.evidence)
        yield pathology_pb2.AnalyzeSlideResponse(analysis=result)

    async def _answer(
        self,
        question: Question,
        visual: VisualTokens,
        timer: _Timer,
        deadline: float,
        *,
        size: tuple[int, int],
        region: tuple[int, int, int, int] | None = None,
        stream: bool = False,
    ) -> AsyncIterator[pathology_pb2.Progress | pathology_pb2.Analysis]:
        """Route and decode; with ``stream``, decoding progress first; then the analysis."""
        with timer.stage(pathology_pb2.STAGE_ROUTING):
            route = await self.backends.route(question.task, question.scale, visual.pooled)
        request = DecodeRequest(
            question=question,
            visual=visual,
            experts=route.experts,
            weights=route.weights,
            deadline=deadline,
        )
        final: DecodeEvent | None = None
        tokens = 0
        with timer.stage(pathology_pb2.STAGE_DECODING):
            if not stream:
                final = await self.backends.complete(request, route.expert_set)
            else:
                async for event in self.backends.decode(request, route.expert_set):
                    tokens += 1
                    if event.text_delta:
                        yield pathology_pb2.Progress(
                            stage=pathology_pb2.STAGE_DECODING,
                            done=tokens,
                            total=question.max_new_tokens,
                            text_delta=event.text_delta,
                        )
                    if event.done:
                        final = event
        assert final is not None
        with timer.stage(pathology_pb2.STAGE_PARSING):
            analysis = analysis_from_completion(
                final.text,
                question,
                self.model.labels,
                size=size,
                region=region,
                label_scores=final.label_scores,
            )
        analysis.experts.extend(
            common_pb2.ExpertWeight(index=e, name=n, weight=w)
            for e, n, w in zip(route.experts, route.names, route.weights, strict=True)
        )
        yield analysis

    def _finish(
        self, analysis: pathology_pb2.Analysis, timer: _Timer, request_id: str
    ) -> pathology_pb2.Analysis:
        analysis.model_version = self.model.version
        analysis.request_id = request_id
        analysis.timings.extend(timer.timings)
        return analysis
