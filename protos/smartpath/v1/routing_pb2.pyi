from smartpath.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteRequest(_message.Message):
    __slots__ = ("task", "scale", "pooled")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    task: _common_pb2.Task
    scale: _common_pb2.Scale
    pooled: _common_pb2.Tensor
    def __init__(self, task: _Optional[_Union[_common_pb2.Task, str]] = ..., scale: _Optional[_Union[_common_pb2.Scale, str]] = ..., pooled: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("experts", "expert_set")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SET_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExpertWeight]
    expert_set: str
    def __init__(self, experts: _Optional[_Iterable[_Union[_common_pb2.ExpertWeight, _Mapping]]] = ..., expert_set: _Optional[str] = ...) -> None: ...
