from smartpath.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TileEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TILE_ENCODING_UNSPECIFIED: _ClassVar[TileEncoding]
    TILE_ENCODING_RAW_RGB: _ClassVar[TileEncoding]
    TILE_ENCODING_JPEG: _ClassVar[TileEncoding]
    TILE_ENCODING_PNG: _ClassVar[TileEncoding]
TILE_ENCODING_UNSPECIFIED: TileEncoding
TILE_ENCODING_RAW_RGB: TileEncoding
TILE_ENCODING_JPEG: TileEncoding
TILE_ENCODING_PNG: TileEncoding

class DescribeSlideRequest(_message.Message):
    __slots__ = ("slide", "thumbnail_max_px")
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_MAX_PX_FIELD_NUMBER: _ClassVar[int]
    slide: _common_pb2.SlideRef
    thumbnail_max_px: int
    def __init__(self, slide: _Optional[_Union[_common_pb2.SlideRef, _Mapping]] = ..., thumbnail_max_px: _Optional[int] = ...) -> None: ...

class SlideLevel(_message.Message):
    __slots__ = ("width", "height", "downsample", "mpp")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    downsample: float
    mpp: float
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., downsample: _Optional[float] = ..., mpp: _Optional[float] = ...) -> None: ...

class AssociatedImage(_message.Message):
    __slots__ = ("name", "width", "height")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    width: int
    height: int
    def __init__(self, name: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class DescribeSlideResponse(_message.Message):
    __slots__ = ("slide_id", "width", "height", "levels", "mpp_x", "mpp_y", "mpp_from_override", "objective_power", "vendor", "associated_images", "thumbnail")
    SLIDE_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MPP_X_FIELD_NUMBER: _ClassVar[int]
    MPP_Y_FIELD_NUMBER: _ClassVar[int]
    MPP_FROM_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_POWER_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    ASSOCIATED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    slide_id: str
    width: int
    height: int
    levels: _containers.RepeatedCompositeFieldContainer[SlideLevel]
    mpp_x: float
    mpp_y: float
    mpp_from_override: bool
    objective_power: float
    vendor: str
    associated_images: _containers.RepeatedCompositeFieldContainer[AssociatedImage]
    thumbnail: _common_pb2.EncodedImage
    def __init__(self, slide_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[SlideLevel, _Mapping]]] = ..., mpp_x: _Optional[float] = ..., mpp_y: _Optional[float] = ..., mpp_from_override: _Optional[bool] = ..., objective_power: _Optional[float] = ..., vendor: _Optional[str] = ..., associated_images: _Optional[_Iterable[_Union[AssociatedImage, _Mapping]]] = ..., thumbnail: _Optional[_Union[_common_pb2.EncodedImage, _Mapping]] = ...) -> None: ...

class TileSpec(_message.Message):
    __slots__ = ("resolution", "tile_size", "overlap", "min_tissue_fraction")
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    resolution: _common_pb2.Resolution
    tile_size: int
    overlap: int
    min_tissue_fraction: float
    def __init__(self, resolution: _Optional[_Union[_common_pb2.Resolution, _Mapping]] = ..., tile_size: _Optional[int] = ..., overlap: _Optional[int] = ..., min_tissue_fraction: _Optional[float] = ...) -> None: ...

class PlanTilesRequest(_message.Message):
    __slots__ = ("slide", "spec", "include_tissue_mask")
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TISSUE_MASK_FIELD_NUMBER: _ClassVar[int]
    slide: _common_pb2.SlideRef
    spec: TileSpec
    include_tissue_mask: bool
    def __init__(self, slide: _Optional[_Union[_common_pb2.SlideRef, _Mapping]] = ..., spec: _Optional[_Union[TileSpec, _Mapping]] = ..., include_tissue_mask: _Optional[bool] = ...) -> None: ...

class Tile(_message.Message):
    __slots__ = ("x", "y", "col", "row", "tissue_fraction")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    col: int
    row: int
    tissue_fraction: float
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., col: _Optional[int] = ..., row: _Optional[int] = ..., tissue_fraction: _Optional[float] = ...) -> None: ...

class TilePlan(_message.Message):
    __slots__ = ("plan_hash", "mpp", "tile_size", "overlap", "footprint", "stride", "level", "level_downsample", "cols", "rows", "min_tissue_fraction", "tiles")
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MIN_TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    plan_hash: str
    mpp: float
    tile_size: int
    overlap: int
    footprint: float
    stride: float
    level: int
    level_downsample: float
    cols: int
    rows: int
    min_tissue_fraction: float
    tiles: _containers.RepeatedCompositeFieldContainer[Tile]
    def __init__(self, plan_hash: _Optional[str] = ..., mpp: _Optional[float] = ..., tile_size: _Optional[int] = ..., overlap: _Optional[int] = ..., footprint: _Optional[float] = ..., stride: _Optional[float] = ..., level: _Optional[int] = ..., level_downsample: _Optional[float] = ..., cols: _Optional[int] = ..., rows: _Optional[int] = ..., min_tissue_fraction: _Optional[float] = ..., tiles: _Optional[_Iterable[_Union[Tile, _Mapping]]] = ...) -> None: ...

class PlanTilesResponse(_message.Message):
    __slots__ = ("plan", "tissue_fraction", "tissue_mask", "tissue_mask_downsample")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TISSUE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TISSUE_MASK_FIELD_NUMBER: _ClassVar[int]
    TISSUE_MASK_DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    plan: TilePlan
    tissue_fraction: float
    tissue_mask: _common_pb2.EncodedImage
    tissue_mask_downsample: float
    def __init__(self, plan: _Optional[_Union[TilePlan, _Mapping]] = ..., tissue_fraction: _Optional[float] = ..., tissue_mask: _Optional[_Union[_common_pb2.EncodedImage, _Mapping]] = ..., tissue_mask_downsample: _Optional[float] = ...) -> None: ...

class ReadTilesRequest(_message.Message):
    __slots__ = ("slide", "spec", "tiles", "batch_size", "encoding")
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    slide: _common_pb2.SlideRef
    spec: TileSpec
    tiles: _containers.RepeatedCompositeFieldContainer[Tile]
    batch_size: int
    encoding: TileEncoding
    def __init__(self, slide: _Optional[_Union[_common_pb2.SlideRef, _Mapping]] = ..., spec: _Optional[_Union[TileSpec, _Mapping]] = ..., tiles: _Optional[_Iterable[_Union[Tile, _Mapping]]] = ..., batch_size: _Optional[int] = ..., encoding: _Optional[_Union[TileEncoding, str]] = ...) -> None: ...

class ReadTilesResponse(_message.Message):
    __slots__ = ("tiles", "tile_size", "encoding", "pixels", "images", "offset", "total")
    TILES_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    tiles: _containers.RepeatedCompositeFieldContainer[Tile]
    tile_size: int
    encoding: TileEncoding
    pixels: bytes
    images: _containers.RepeatedScalarFieldContainer[bytes]
    offset: int
    total: int
    def __init__(self, tiles: _Optional[_Iterable[_Union[Tile, _Mapping]]] = ..., tile_size: _Optional[int] = ..., encoding: _Optional[_Union[TileEncoding, str]] = ..., pixels: _Optional[bytes] = ..., images: _Optional[_Iterable[bytes]] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...
