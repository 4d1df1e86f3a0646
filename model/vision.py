"""ROI input: one RGB region of interest → Qwen2.5-VL's ``pixel_values``/``image_grid_thw``.

Design decisions:

- transformers' own PIL image processor (``Qwen2VLImageProcessorPil``: no torchvision) does the
  resizing, normalisation and patch flattening, configured from the model's vision sizes, so
  the numbers are exactly those the real Qwen2.5-VL processor produces.
- The image is resized (aspect ratio kept) so both sides are multiples of
  patch_size × merge_size and H×W lies in [min_pixels, max_pixels]; it becomes a grid of
  ``(t, h, w)`` patches and ``t*h*w / merge²`` LM tokens. The prompt holds one
  ``<|image_pad|>`` per image, which :func:`expand_image_pads` repeats to that count.
- Bad input fails early with :class:`InvalidImageError` (an InvalidArgumentError, so the
  services report INVALID_ARGUMENT) saying what was received and what is expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from smartpath.core.config.model import VisionSizes
from smartpath.core.errors import InvalidArgumentError
from smartpath.model.tokenizer import IMAGE_PAD, SLIDE_PAD, render_chat

MAX_ASPECT_RATIO = 200  # Qwen's resize refuses anything longer and thinner


class InvalidImageError(InvalidArgumentError):
    """An ROI that is not a non-empty RGB image (PIL image or H×W×3 uint8 array)."""


@dataclass(frozen=True, slots=True)
class RoiInput:
    """One ROI ready for the model."""

    pixel_values: torch.Tensor  # (t*h*w, C * temporal_patch * patch * patch) float32
    image_grid_thw: torch.Tensor  # (1, 3) int64: patches along time, height, width
    num_image_tokens: int  # LM tokens this image becomes: t*h*w / merge²


def make_image_processor(
    vision: VisionSizes | Any,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Qwen2VLImageProcessorPil:
    """The Qwen2-VL PIL image processor for these vision sizes.

    ``vision`` is a :class:`VisionSizes` or a loaded model's HF vision config
    (``model.config.vision_config``), whose pixel budget then defaults to Qwen's
    (56² … 28²·1280) unless ``min_pixels``/``max_pixels`` are given.
    """
    defaults = VisionSizes.model_fields
    if min_pixels is None:
        min_pixels = getattr(vision, "min_pixels", defaults["min_pixels"].default)
    if max_pixels is None:
        max_pixels = getattr(vision, "max_pixels", defaults["max_pixels"].default)
    patch_size = _as_int(vision.patch_size)
    temporal_patch_size = _as_int(vision.temporal_patch_size)
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=int(vision.spatial_merge_size),
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
    )


def _as_int(value: int | Sequence[int]) -> int:
    """HF configs allow ``patch_size`` as an int or a pair; SmartPath uses square patches."""
    if isinstance(value, int):
        return value
    values = list(value)
    if len(set(values)) != 1:
        raise ValueError(f"non-square patch size {values} is not supported")
    return int(values[0])


def check_image(image: Any) -> Image.Image | np.ndarray:
    """Return ``image`` if it is a usable ROI, else raise :class:`InvalidImageError`.

    PIL images of any mode are accepted (converted to RGB by the processor); arrays must be
    H×W×3 uint8. Either must be non-empty with an aspect ratio of at most 200.
    """
    if isinstance(image, Image.Image):
        width, height = image.size
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InvalidImageError(
                f"ROI array must have dtype uint8 (0–255 RGB), got {image.dtype}; convert "
                "float images in [0, 1] with (x * 255).round().astype(np.uint8)"
            )
        if image.ndim != 3 or image.shape[2] != 3:
            raise InvalidImageError(
                f"ROI array must have shape (H, W, 3) (RGB, channels last), got {image.shape}"
            )
        height, width = image.shape[:2]
    else:
        raise InvalidImageError(
            f"ROI must be a PIL image or an (H, W, 3) uint8 numpy array, got {type(image).__name__}"
        )
    if height < 1 or width < 1:
        raise InvalidImageError(f"ROI is empty ({height}×{width} pixels)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidImageError(
            f"ROI is {height}×{width} pixels: aspect ratio above {MAX_ASPECT_RATIO} is not "
            "supported; crop it into squarer regions"
        )
    return image


def prepare_roi(image: Image.Image | np.ndarray, processor: Qwen2VLImageProcessorPil) -> RoiInput:
    """Turn one ROI into ``pixel_values``, ``image_grid_thw`` and its image-token count."""
    image = check_image(image)
    if isinstance(image, Image.Image) and image.mode != "RGB":
        image = image.convert("RGB")
    out = processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"].to(torch.int64)  # (1, 3)
    return RoiInput(
        pixel_values=out["pixel_values"],
        image_grid_thw=grid,
        num_image_tokens=num_image_tokens(grid, processor.merge_size)[0],
    )


def num_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    """LM tokens per image: t*h*w / merge² for each row of ``image_grid_thw`` (N, 3)."""
    if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(
            f"image_grid_thw must have shape (N, 3), got {tuple(image_grid_thw.shape)}"
        )
    return [int(n) // merge_size**2 for n in image_grid_thw.prod(dim=-1).tolist()]


def expand_image_pads(prompt: str, counts: int | Sequence[int], pad: str = IMAGE_PAD) -> str:
    """Repeat each ``pad`` in ``prompt`` to its image's token count (one count per pad, in order).

    Raises ValueError when the number of pads in the prompt differs from the number of counts.
    """
    counts = [counts] if isinstance(counts, int) else list(counts)
    parts = prompt.split(pad)
    if len(parts) - 1 != len(counts):
        raise ValueError(
            f"prompt has {len(parts) - 1} {pad} placeholder(s) but {len(counts)} image(s) were "
            f"given; put one {pad} per image (the chat template does this for image parts)"
        )
    if any(c < 1 for c in counts):
        raise ValueError(f"image token counts must be positive, got {counts}")
    out = [parts[0]]
    for count, rest in zip(counts, parts[1:], strict=True):
        out.append(pad * count)
        out.append(rest)
    return "".join(out)


def question_ids(
    tokenizer: Any,
    text: str,
    *,
    slide: bool,
    visual_tokens: int,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of a one-turn chat ready for generation: the image (or slide) placeholder
    repeated ``visual_tokens`` times, then ``text``, then the assistant's turn opener."""
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    visual = {"type": "slide" if slide else "image"}
    messages.append({"role": "user", "content": [visual, {"type": "text", "text": text}]})
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    prompt = expand_image_pads(prompt, visual_tokens, SLIDE_PAD if slide else IMAGE_PAD)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
