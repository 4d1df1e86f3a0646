"""The contracts between the five services: the one table of services, and the Python types
they exchange through DeploymentHandles (numpy arrays travel through Ray's object store).

The service packages (``tiling``, ``encoding``, ``routing``, ``decoding``, ``gateway``) import
each other only through this module (an import-linter contract in ``make test`` keeps it so).
:data:`SERVICES` is read by the Serve config (``apps``), the handles and the gRPC helpers;
the Helm chart keeps a copy in ``templates/_helpers.tpl`` that a test holds equal to it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from smartpath.core.errors import InvalidArgumentError
from smartpath.core.slides.resolution import Resolution
from smartpath.model.constrained import Constraint, text_chars_for
from smartpath.model.grammar import Scale, Task, coerce_scale, coerce_task, task_scale_key
from smartpath.model.prompts import PromptStyle, build_prompt

if TYPE_CHECKING:  # annotations only: the gRPC proxy's health servicer reads SERVICES, and
    # should not load OpenSlide, SciPy and the storage clients for it.
    from smartpath.core.config import ModelServingConfig
    from smartpath.core.config.model import SlideTiles
    from smartpath.core.slides.plan import TileGeometry, TilePlan
    from smartpath.core.slides.slide import SlideInfo
    from smartpath.core.slides.tiler import ResolvedSlide, TileRequest, TissueMask
    from smartpath.v1 import common_pb2

logger = logging.getLogger("smartpath.contracts")


# -- the services ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Service:
    """One SmartPath service: its Serve application, deployment and gRPC service."""

    app: str  # Serve application name (and the `application` gRPC metadata)
    deployment: str  # its one deployment
    grpc_service: str  # the full gRPC service name it serves
    servicer: str  # import path of the generated add_…Servicer_to_server


def _service(app: str, deployment: str, proto: str) -> Service:
    return Service(
        app,
        deployment,
        f"smartpath.v1.{deployment}",
        f"smartpath.v1.{proto}_pb2_grpc.add_{deployment}Servicer_to_server",
    )


# Deployment order: callees before callers.
SERVICES: tuple[Service, ...] = (
    _service("tiler", "SlideTiler", "tiling"),
    _service("encoder", "FeatureEncoder", "encoding"),
    _service("router", "ExpertRouter", "routing"),
    _service("decoder", "Decoder", "decoding"),
    _service("gateway", "Pathology", "pathology"),
)
SERVICE_OF_APP: Mapping[str, Service] = {s.app: s for s in SERVICES}


# -- the model's facts (decoder -> gateway) ----------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What the served checkpoint says about itself (``GetModelInfo``): its version and
    experts, and the facts it was trained with (tile encoder, slide tile spec, label
    taxonomy, prompt style)."""

    version: str
    preset: str
    experts: list[str]
    top_k: int
    tile_encoder: str
    slide_tiles: SlideTiles
    prompt_style: PromptStyle
    labels: dict[str, list[str]] = field(default_factory=dict)


# -- questions (gateway -> router, decoder) ----------------------------------------------
@dataclass(frozen=True)
class Question:
    """What the caller asks (see ``smartpath.v1.Question``)."""

    task: Task
    scale: Scale
    prompt: str = ""
    labels: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    max_new_tokens: int = 0
    constrained: bool = True  # decode within the task's grammar

    @property
    def key(self) -> str:
        """``"classification/roi"`` …: the task/scale key of defaults and metrics."""
        return task_scale_key(self.task, self.scale)

    def effective_labels(self, defaults: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
        """The caller's labels, else the configured defaults for this task and scale."""
        return self.labels or tuple(defaults.get(self.key, ()))

    def constraint(self, defaults: Mapping[str, Sequence[str]]) -> Constraint | None:
        """What the answer must match (the labels the prompt names), or None when the
        caller asked for free text."""
        if not self.constrained:
            return None
        labels, options = self.effective_labels(defaults) or None, self.options or None
        return Constraint(self.task, labels, options, text_chars_for(self.max_new_tokens))

    def text(self, defaults: Mapping[str, Sequence[str]], style: PromptStyle = "full") -> str:
        """The model's instruction text in its prompt ``style``; INVALID_ARGUMENT when the
        question cannot be asked."""
        try:
            return build_prompt(
                self.task,
                self.scale,
                question=self.prompt or None,
                labels=self.effective_labels(defaults) or None,
                options=self.options or None,
                style=style,
            )
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None


def parse_task(value: int) -> Task:
    """The Task of a proto enum value; INVALID_ARGUMENT for unspecified or unknown ones."""
    try:
        return coerce_task(value)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def parse_scale(value: int) -> Scale:
    """The Scale of a proto enum value; INVALID_ARGUMENT for unspecified or unknown ones."""
    try:
        return coerce_scale(value)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def make_question(
    task: int,
    scale: Scale,
    prompt: str,
    labels: Sequence[str],
    options: Sequence[str],
    max_new_tokens: int,
    *,
    max_prompt_chars: int,
    max_new_tokens_cap: int,
    max_labels: int,
    constrained: bool = True,
) -> Question:
    """A validated Question from request fields (proto enums are plain ints)."""
    if len(prompt) > max_prompt_chars:
        raise InvalidArgumentError(
            f"prompt is {len(prompt)} characters; the limit is {max_prompt_chars}"
        )
    if max_new_tokens < 0 or max_new_tokens > max_new_tokens_cap:
        raise InvalidArgumentError(
            f"max_new_tokens={max_new_tokens} must be in [0, {max_new_tokens_cap}] (0: default)"
        )
    for what, values in (("labels", labels), ("options", options)):
        if len(values) > max_labels:
            raise InvalidArgumentError(f"{len(values)} {what}; a question may name {max_labels}")
        if sum(len(v) for v in values) > max_prompt_chars:
            raise InvalidArgumentError(f"{what} exceed the prompt limit of {max_prompt_chars}")
    return Question(
        task=parse_task(task),
        scale=scale,
        prompt=prompt,
        labels=tuple(labels),
        options=tuple(options),
        max_new_tokens=max_new_tokens or max_new_tokens_cap,
        constrained=constrained,
    )


# -- visual tokens (encoder -> router, decoder) ----------------------------------------
@dataclass(frozen=True)
class VisualTokens:
    """(n, hidden) float32 tokens of one image or slide; ROIs also carry their image grid."""

    tokens: np.ndarray
    image_grid_thw: tuple[int, int, int] | None = None

    @property
    def pooled(self) -> np.ndarray:
        """(hidden,) mean token: the router's view of the image."""
        return self.tokens.mean(axis=0)


def decode_image(data: bytes, limits: ModelServingConfig) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8, within the configured size limits."""
    if not data:
        raise InvalidArgumentError("image is empty; send PNG or JPEG bytes")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgumentError(
            f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}"
        )
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise InvalidArgumentError(f"image format {image.format} is not PNG or JPEG")
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise InvalidArgumentError(
                f"image is {width}x{height} px; the limit is {limits.max_image_pixels} pixels"
            )
        return np.asarray(image.convert("RGB"))
    except InvalidArgumentError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # Pillow's words name server objects (<_io.BytesIO object at 0x…>): for the log only.
        logger.warning("image bytes do not decode: %s", e)
        raise InvalidArgumentError(
            "image bytes do not decode as PNG or JPEG (corrupt, truncated or another format)"
        ) from None


# -- the tiler's API (-> encoder, gateway) and slide encoding (encoder -> gateway) ------
def parse_resolution(message: common_pb2.Resolution) -> Resolution | None:
    """The Resolution a request asks for (INVALID_ARGUMENT if bad); None when it names none,
    which means the tiler's configured default."""
    which = message.WhichOneof("value")
    if which == "mpp":
        return Resolution(mpp=message.mpp)
    if which == "magnification":
        return Resolution(magnification=message.magnification)
    return None


class SlideSource(Protocol):
    """The tiler's Python API: :class:`~smartpath.services.tiling.source.TilerSource` in
    process (and the SlideTiler deployment), :class:`~smartpath.services.handles.TilerHandle`
    through Serve. A request resolves its slide once and passes the :class:`ResolvedSlide`
    to the other methods, which then look nothing up in storage again."""

    async def resolve(self, uri: str, mpp_override: float | None = None) -> ResolvedSlide: ...

    async def describe(self, slide: ResolvedSlide) -> SlideInfo: ...

    async def plan_key(self, slide: ResolvedSlide, request: TileRequest) -> str: ...

    async def plan(
        self, slide: ResolvedSlide, request: TileRequest
    ) -> tuple[TilePlan, TissueMask]: ...

    def read_tiles(
        self,
        slide: ResolvedSlide,
        geometry: TileGeometry,
        xs: np.ndarray,
        ys: np.ndarray,
        batch_size: int | None = None,
    ) -> AsyncIterator[tuple[int, np.ndarray]]: ...

    async def read_region(
        self,
        slide: ResolvedSlide,
        rect: tuple[int, int, int, int],
        resolution: Resolution | None = None,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class SlideProgress:
    """Tiles encoded so far out of the plan's total."""

    done: int
    total: int


@dataclass(frozen=True)
class SlideEvidence:
    """Each tile of a slide (level-0 top-left and edge) and its share of the aggregator's
    attention: what a slide answer rests on."""

    x: np.ndarray  # (N,) int64
    y: np.ndarray  # (N,) int64
    tile_px: float  # level-0 px per tile edge
    weight: np.ndarray  # (N,) float32, sums to 1


@dataclass(frozen=True)
class SlideEncoding:
    """A slide's tokens, its tiles' evidence weights, and where they came from."""

    visual: VisualTokens
    evidence: SlideEvidence
    slide_id: str
    plan_hash: str
    tiles: int
    cache_hit: bool


# -- routes (router -> gateway -> decoder) ----------------------------------------------
@dataclass(frozen=True)
class Route:
    """The top-k experts of one request, their gate weights and names."""

    experts: tuple[int, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    @property
    def expert_set(self) -> str:
        """Order-free key of the experts ("0+2"): decoder replicas are multiplexed by it."""
        return "+".join(str(e) for e in sorted(self.experts))


def parse_expert_set(key: str, num_experts: int) -> tuple[int, ...]:
    """The expert indices of an ``expert_set`` key (INVALID_ARGUMENT if it is malformed)."""
    try:
        experts = tuple(sorted(int(p) for p in key.split("+")))
    except ValueError:
        raise InvalidArgumentError(f"expert set {key[:40]!r} is not like '0+2'") from None
    if not experts or any(not 0 <= e < num_experts for e in experts):
        raise InvalidArgumentError(
            f"expert set {key[:40]!r} names experts outside [0, {num_experts})"
        )
    return experts


# -- decoding (gateway -> decoder) -------------------------------------------------------
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class DecodeRequest:
    """One question about visual tokens, with the experts the router chose."""

    question: Question
    visual: VisualTokens
    experts: tuple[int, ...]
    weights: tuple[float, ...]
    temperature: float = 0.0
    deadline: float | None = None  # time.time() after which the request is abandoned


@dataclass
class DecodeEvent:
    """A streamed piece of a completion; the last one has ``done`` and the totals."""

    text_delta: str = ""
    done: bool = False
    finish_reason: str = ""
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    label_scores: list[tuple[str, float]] = field(default_factory=list)
    queue_s: float = 0.0
    batch_size: int = 0
