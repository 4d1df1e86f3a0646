from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_DETECTION: _ClassVar[Task]
    TASK_SEGMENTATION: _ClassVar[Task]
    TASK_VQA: _ClassVar[Task]

class Scale(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALE_UNSPECIFIED: _ClassVar[Scale]
    SCALE_ROI: _ClassVar[Scale]
    SCALE_WSI: _ClassVar[Scale]
TASK_UNSPECIFIED: Task
TASK_CLASSIFICATION: Task
TASK_DETECTION: Task
TASK_SEGMENTATION: Task
TASK_VQA: Task
SCALE_UNSPECIFIED: Scale
SCALE_ROI: Scale
SCALE_WSI: Scale

class SlideRef(_message.Message):
    __slots__ = ("uri", "mpp_override")
    URI_FIELD_NUMBER: _ClassVar[int]
    MPP_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    uri: str
    mpp_override: float
    def __init__(self, uri: _Optional[str] = ..., mpp_override: _Optional[float] = ...) -> None: ...

class Resolution(_message.Message):
    __slots__ = ("mpp", "magnification")
    MPP_FIELD_NUMBER: _ClassVar[int]
    MAGNIFICATION_FIELD_NUMBER: _ClassVar[int]
    mpp: float
    magnification: float
    def __init__(self, mpp: _Optional[float] = ..., magnification: _Optional[float] = ...) -> None: ...

class Rect(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("data", "media_type", "width", "height")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    media_type: str
    width: int
    height: int
    def __init__(self, data: _Optional[bytes] = ..., media_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExpertWeight(_message.Message):
    __slots__ = ("index", "name", "weight")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    weight: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...
