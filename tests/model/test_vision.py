"""ROI input: the numbers match transformers' Qwen2-VL processor, bad images fail clearly, and
the prompt's image pad expands to the image's token count."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from smartpath.core.config.model import PRESETS, VisionSizes
from smartpath.core.errors import InvalidArgumentError
from smartpath.model.tokenizer import IMAGE_PAD, SLIDE_PAD
from smartpath.model.vision import (
    InvalidImageError,
    expand_image_pads,
    make_image_processor,
    num_image_tokens,
    prepare_roi,
)

TINY = PRESETS["tiny"].vision


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_processor_is_configured_from_the_vision_sizes() -> None:
    sizes = VisionSizes(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=1,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=1,
        window_size=128,
        min_pixels=64 * 64,
        max_pixels=256 * 256,
    )
    proc = make_image_processor(sizes)
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (16, 2, 1)
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (64 * 64, 256 * 256)
    roi = prepare_roi(_image(64, 96), proc)
    assert roi.image_grid_thw.tolist() == [[1, 4, 6]]
    assert roi.pixel_values.shape == (24, 3 * 1 * 16 * 16)


def test_hand_computed_example() -> None:
    roi = prepare_roi(_image(56, 84), make_image_processor(TINY))
    # 56×84 is already a multiple of 28: 4×6 patches of 14 px, merged 2×2 → 6 LM tokens.
    assert roi.image_grid_thw.tolist() == [[1, 4, 6]]
    assert roi.image_grid_thw.dtype == torch.int64
    assert roi.pixel_values.shape == (24, 3 * 2 * 14 * 14)
    assert roi.pixel_values.dtype == torch.float32
    assert roi.num_image_tokens == 6


@pytest.mark.parametrize("hw", [(56, 84), (1000, 700), (17, 300), (224, 224), (30, 30)])
def test_numbers_match_the_processor(hw: tuple[int, int]) -> None:
    proc = make_image_processor(TINY)
    img = _image(*hw)
    roi = prepare_roi(img, proc)
    reference = proc(images=[img], return_tensors="pt")
    assert torch.equal(roi.pixel_values, reference["pixel_values"])
    assert torch.equal(roi.image_grid_thw, reference["image_grid_thw"])
    patches = proc.get_number_of_image_patches(*hw)
    assert roi.pixel_values.shape[0] == patches
    assert roi.num_image_tokens == patches // proc.merge_size**2
    rh, rw = smart_resize(*hw, factor=28, min_pixels=TINY.min_pixels, max_pixels=TINY.max_pixels)
    assert roi.image_grid_thw.tolist() == [[1, rh // 14, rw // 14]]
    assert TINY.min_pixels <= rh * rw <= TINY.max_pixels


def test_pil_and_numpy_agree_and_non_rgb_pil_is_converted() -> None:
    proc = make_image_processor(TINY)
    arr = _image(60, 90)
    a = prepare_roi(arr, proc)
    b = prepare_roi(Image.fromarray(arr), proc)
    assert torch.equal(a.pixel_values, b.pixel_values)
    rgba = Image.fromarray(arr).convert("RGBA")
    assert torch.equal(prepare_roi(rgba, proc).pixel_values, a.pixel_values)
    gray = prepare_roi(Image.new("L", (40, 40), 128), proc)
    c = gray.pixel_values.shape[1] // 3
    # grey becomes R=G=B, so after per-channel normalisation each channel is constant
    assert torch.unique(gray.pixel_values[:, :c]).numel() == 1
    assert torch.unique(gray.pixel_values[:, c : 2 * c]).numel() == 1


def test_processor_from_a_loaded_models_vision_config() -> None:
    hf = Qwen2_5_VLConfig(
        vision_config={"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    )
    proc = make_image_processor(hf.vision_config, max_pixels=TINY.max_pixels)
    ours = make_image_processor(TINY)
    img = _image(300, 200)
    assert torch.equal(prepare_roi(img, proc).pixel_values, prepare_roi(img, ours).pixel_values)
    default_budget = make_image_processor(hf.vision_config)
    assert default_budget.size["longest_edge"] == 28 * 28 * 1280


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((32, 32, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((32, 32), dtype=np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((32, 32, 4), dtype=np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((3, 32, 32), dtype=np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((0, 32, 3), dtype=np.uint8), "empty"),
        (np.zeros((2, 500, 3), dtype=np.uint8), "aspect ratio"),
        ([[0, 0, 0]], "PIL image or an"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), "PIL image or an"),
    ],
)
def test_bad_images_are_refused_clearly(image: object, match: str) -> None:
    proc = make_image_processor(TINY)
    with pytest.raises(InvalidImageError, match=match) as info:
        prepare_roi(image, proc)  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidArgumentError)
    assert isinstance(info.value, ValueError)


def test_empty_pil_image_is_refused() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        prepare_roi(Image.new("RGB", (0, 10)), make_image_processor(TINY))


def test_expand_image_pads() -> None:
    prompt = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>What?"
    assert expand_image_pads(prompt, 3) == f"<|vision_start|>{IMAGE_PAD * 3}<|vision_end|>What?"
    two = f"a{IMAGE_PAD}b{IMAGE_PAD}c"
    assert expand_image_pads(two, [2, 1]) == f"a{IMAGE_PAD * 2}b{IMAGE_PAD}c"
    assert expand_image_pads(f"x{SLIDE_PAD}", 4, pad=SLIDE_PAD) == f"x{SLIDE_PAD * 4}"
    with pytest.raises(ValueError, match=re.escape("has 1 <|image_pad|> placeholder(s) but 2")):
        expand_image_pads(prompt, [1, 2])
    with pytest.raises(ValueError, match=re.escape("has 0 <|image_pad|> placeholder(s) but 1")):
        expand_image_pads("no image", 1)
    with pytest.raises(ValueError, match="positive"):
        expand_image_pads(prompt, 0)


def test_num_image_tokens_per_row() -> None:
    grid = torch.tensor([[1, 4, 6], [1, 8, 8], [2, 2, 2]])
    assert num_image_tokens(grid, 2) == [6, 16, 2]
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        num_image_tokens(torch.tensor([1, 4, 6]), 2)
