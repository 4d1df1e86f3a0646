from smartpath.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class DecodeRequest(_message.Message):
    __slots__ = ("task", "scale", "prompt", "labels", "options", "visual_tokens", "image_grid_thw", "experts", "max_new_tokens", "temperature", "unconstrained")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GRID_THW_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    UNCONSTRAINED_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    scale: _common_pb2.Scale
    prompt: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.RepeatedScalarFieldContainer[str]
    visual_tokens: _common_pb2.Tensor
    image_grid_thw: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExpertWeight]
    max_new_tokens: int
    temperature: float
    unconstrained: bool
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, str]] = ..., scale: _Optional[_Union[_common_pb2.Scale, str]] = ..., prompt: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., options: _Optional[_Iterable[str]] = ..., visual_tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., image_grid_thw: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[_Union[_common_pb2.ExpertWeight, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., unconstrained: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("text_delta", "done", "finish_reason", "prompt_tokens", "completion_tokens", "label_scores")
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORES_FIELD_NUMBER: _ClassVar[int]
    text_delta: str
    done: bool
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    label_scores: _containers.RepeatedCompositeFieldContainer[_common_pb2.LabelScore]
    def __init__(self, text_delta: _Optional[str] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., label_scores: _Optional[_Iterable[_Union[_common_pb2.LabelScore, _Mapping]]] = ...) -> None: ...
