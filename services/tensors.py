"""numpy arrays <-> ``smartpath.v1.Tensor`` (float32, row-major, little-endian)."""

from __future__ import annotations

import numpy as np

from smartpath.core.errors import InvalidArgumentError
from smartpath.v1 import common_pb2

_DTYPE = np.dtype("<f4")


def to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    """A float32 Tensor message of ``array``."""
    a = np.ascontiguousarray(array, dtype=_DTYPE)
    return common_pb2.Tensor(shape=list(a.shape), data=a.tobytes())


def from_tensor(tensor: common_pb2.Tensor, what: str, ndim: int) -> np.ndarray:
    """The array of a Tensor message; INVALID_ARGUMENT unless it has ``ndim`` dimensions,
    matching data and only finite values."""
    shape = tuple(int(s) for s in tensor.shape)
    if len(shape) != ndim or any(s < 1 for s in shape):
        raise InvalidArgumentError(f"{what} must be a {ndim}-D tensor, got shape {list(shape)}")
    expected = int(np.prod(shape)) * _DTYPE.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgumentError(
            f"{what} has {len(tensor.data)} bytes; shape {list(shape)} needs {expected}"
        )
    array = np.frombuffer(tensor.data, dtype=_DTYPE).reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidArgumentError(f"{what} holds NaN or infinite values")
    return array
