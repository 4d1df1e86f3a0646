from smartpath.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_TILING: _ClassVar[Stage]
    STAGE_ENCODING: _ClassVar[Stage]
    STAGE_ROUTING: _ClassVar[Stage]
    STAGE_DECODING: _ClassVar[Stage]
    STAGE_PARSING: _ClassVar[Stage]

class CoordinateFrame(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COORDINATE_FRAME_UNSPECIFIED: _ClassVar[CoordinateFrame]
    COORDINATE_FRAME_ROI_PIXELS: _ClassVar[CoordinateFrame]
    COORDINATE_FRAME_SLIDE_LEVEL0: _ClassVar[CoordinateFrame]
STAGE_UNSPECIFIED: Stage
STAGE_TILING: Stage
STAGE_ENCODING: Stage
STAGE_ROUTING: Stage
STAGE_DECODING: Stage
STAGE_PARSING: Stage
COORDINATE_FRAME_UNSPECIFIED: CoordinateFrame
COORDINATE_FRAME_ROI_PIXELS: CoordinateFrame
COORDINATE_FRAME_SLIDE_LEVEL0: CoordinateFrame

class Question(_message.Message):
    __slots__ = ("task", "prompt", "labels", "options", "max_new_tokens", "unconstrained")
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNCONSTRAINED_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    prompt: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.RepeatedScalarFieldContainer[str]
    max_new_tokens: int
    unconstrained: bool
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, str]] = ..., prompt: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., options: _Optional[_Iterable[str]] = ..., max_new_tokens: _Optional[int] = ..., unconstrained: _Optional[bool] = ...) -> None: ...

class SlideRegion(_message.Message):
    __slots__ = ("slide", "rect", "resolution")
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    RECT_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    slide: _common_pb2.SlideRef
    rect: _common_pb2.Rect
    resolution: _common_pb2.Resolution
    def __init__(self, slide: _Optional[_Union[_common_pb2.SlideRef, _Mapping]] = ..., rect: _Optional[_Union[_common_pb2.Rect, _Mapping]] = ..., resolution: _Optional[_Union[_common_pb2.Resolution, _Mapping]] = ...) -> None: ...

class AnalyzeRegionRequest(_message.Message):
    __slots__ = ("image", "region", "question")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    region: SlideRegion
    question: Question
    def __init__(self, image: _Optional[bytes] = ..., region: _Optional[_Union[SlideRegion, _Mapping]] = ..., question: _Optional[_Union[Question, _Mapping]] = ...) -> None: ...

class AnalyzeRegionResponse(_message.Message):
    __slots__ = ("analysis",)
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    analysis: Analysis
    def __init__(self, analysis: _Optional[_Union[Analysis, _Mapping]] = ...) -> None: ...

class AnalyzeSlideRequest(_message.Message):
    __slots__ = ("slide", "question")
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    slide: _common_pb2.SlideRef
    question: Question
    def __init__(self, slide: _Optional[_Union[_common_pb2.SlideRef, _Mapping]] = ..., question: _Optional[_Union[Question, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "cache_hit", "text_delta")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    done: int
    total: int
    cache_hit: bool
    text_delta: str
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., text_delta: _Optional[str] = ...) -> None: ...

class AnalyzeSlideResponse(_message.Message):
    __slots__ = ("progress", "analysis")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    analysis: Analysis
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., analysis: _Optional[_Union[Analysis, _Mapping]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("label", "x1", "y1", "x2", "y2")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, label: _Optional[str] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("label", "points")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    label: str
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, label: _Optional[str] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class TileEvidence(_message.Message):
    __slots__ = ("rect", "weight")
    RECT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    rect: _common_pb2.Rect
    weight: float
    def __init__(self, rect: _Optional[_Union[_common_pb2.Rect, _Mapping]] = ..., weight: _Optional[float] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "ms")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    ms: float
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., ms: _Optional[float] = ...) -> None: ...

class Analysis(_message.Message):
    __slots__ = ("task", "scale", "label", "label_scores", "detections", "polygons", "frame", "answer", "reasoning", "parsed", "parse_error", "experts", "model_version", "timings", "request_id", "tiles", "feature_cache_hit", "width", "height", "evidence")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORES_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    POLYGONS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    PARSED_FIELD_NUMBER: _ClassVar[int]
    PARSE_ERROR_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    scale: _common_pb2.Scale
    label: str
    label_scores: _containers.RepeatedCompositeFieldContainer[_common_pb2.LabelScore]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    polygons: _containers.RepeatedCompositeFieldContainer[Polygon]
    frame: CoordinateFrame
    answer: str
    reasoning: str
    parsed: bool
    parse_error: str
    experts: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExpertWeight]
    model_version: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    request_id: str
    tiles: int
    feature_cache_hit: bool
    width: int
    height: int
    evidence: _containers.RepeatedCompositeFieldContainer[TileEvidence]
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, str]] = ..., scale: _Optional[_Union[_common_pb2.Scale, str]] = ..., label: _Optional[str] = ..., label_scores: _Optional[_Iterable[_Union[_common_pb2.LabelScore, _Mapping]]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., polygons: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ..., frame: _Optional[_Union[CoordinateFrame, str]] = ..., answer: _Optional[str] = ..., reasoning: _Optional[str] = ..., parsed: _Optional[bool] = ..., parse_error: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[_common_pb2.ExpertWeight, _Mapping]]] = ..., model_version: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., request_id: _Optional[str] = ..., tiles: _Optional[int] = ..., feature_cache_hit: _Optional[bool] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., evidence: _Optional[_Iterable[_Union[TileEvidence, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SlideTileSpec(_message.Message):
    __slots__ = ("mpp", "tile_size", "min_tissue", "stain_norm")
    MPP_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FIELD_NUMBER: _ClassVar[int]
    STAIN_NORM_FIELD_NUMBER: _ClassVar[int]
    mpp: float
    tile_size: int
    min_tissue: float
    stain_norm: str
    def __init__(self, mpp: _Optional[float] = ..., tile_size: _Optional[int] = ..., min_tissue: _Optional[float] = ..., stain_norm: _Optional[str] = ...) -> None: ...

class TaskLabels(_message.Message):
    __slots__ = ("task", "scale", "labels")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    scale: _common_pb2.Scale
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, str]] = ..., scale: _Optional[_Union[_common_pb2.Scale, str]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("name", "version", "preset", "experts", "top_k", "tile_encoder", "default_labels", "slide_tiles", "prompt_style", "max_prompt_chars", "max_image_pixels", "max_new_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TILE_ENCODER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LABELS_FIELD_NUMBER: _ClassVar[int]
    SLIDE_TILES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STYLE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    preset: str
    experts: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    tile_encoder: str
    default_labels: _containers.RepeatedCompositeFieldContainer[TaskLabels]
    slide_tiles: SlideTileSpec
    prompt_style: str
    max_prompt_chars: int
    max_image_pixels: int
    max_new_tokens: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., preset: _Optional[str] = ..., experts: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., tile_encoder: _Optional[str] = ..., default_labels: _Optional[_Iterable[_Union[TaskLabels, _Mapping]]] = ..., slide_tiles: _Optional[_Union[SlideTileSpec, _Mapping]] = ..., prompt_style: _Optional[str] = ..., max_prompt_chars: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...
