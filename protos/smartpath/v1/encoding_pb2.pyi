from smartpath.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    def __init__(self, image: _Optional[bytes] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("tokens", "image_grid_thw")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GRID_THW_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.Tensor
    image_grid_thw: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., image_grid_thw: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeTilesRequest(_message.Message):
    __slots__ = ("pixels", "tile_size")
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    pixels: bytes
    tile_size: int
    def __init__(self, pixels: _Optional[bytes] = ..., tile_size: _Optional[int] = ...) -> None: ...

class EncodeTilesResponse(_message.Message):
    __slots__ = ("features", "encoder")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    features: _common_pb2.Tensor
    encoder: str
    def __init__(self, features: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., encoder: _Optional[str] = ...) -> None: ...

class EncodeSlideRequest(_message.Message):
    __slots__ = ("slide",)
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    slide: _common_pb2.SlideRef
    def __init__(self, slide: _Optional[_Union[_common_pb2.SlideRef, _Mapping]] = ...) -> None: ...

class EncodeSlideResponse(_message.Message):
    __slots__ = ("tokens", "slide_id", "plan_hash", "tiles", "cache_hit")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLIDE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.Tensor
    slide_id: str
    plan_hash: str
    tiles: int
    cache_hit: bool
    def __init__(self, tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., slide_id: _Optional[str] = ..., plan_hash: _Optional[str] = ..., tiles: _Optional[int] = ..., cache_hit: _Optional[bool] = ...) -> None: ...
