"""Where a model runs and in which dtype: the config's ``device``/``dtype`` ("auto" or explicit)
resolved against the hardware this process sees.

"auto" means CUDA and bfloat16 when a GPU is visible, else CPU and float32 (CPUs have no fast
half-precision matmul, and float32 keeps CPU results bit-stable for tests).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``spec`` as a torch device; "auto" is ``cuda`` when a GPU is visible, else ``cpu``.

    Raises ValueError for a CUDA device this process cannot see."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(
            f'unknown device {spec!r}; use "auto", "cpu", "cuda" or "cuda:N"'
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(
                f"device {spec!r} is not available: this process sees {count} CUDA device(s)"
            )
    return device


def resolve_dtype(
    spec: str | torch.dtype = "auto", device: torch.device | None = None
) -> torch.dtype:
    """``spec`` as a torch dtype; "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        device = device if device is not None else resolve_device("auto")
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[spec]
    except KeyError:
        raise ValueError(f"unknown dtype {spec!r}; use auto or one of {sorted(DTYPES)}") from None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without any)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
