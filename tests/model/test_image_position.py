"""Absolute 2-D image positions: token order, a no-op at init, and a trained effect."""

from __future__ import annotations

import numpy as np
import torch

from smartpath.core.config.model import ModelConfig
from smartpath.model.base import base_from_config
from smartpath.model.image_position import normalised_token_centres
from smartpath.model.mllm import SmartPathModel
from smartpath.model.vision import make_image_processor, prepare_roi
from smartpath.training.engine import trainable_parameters


def _model(image_positions: bool) -> SmartPathModel:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", image_positions=image_positions)
    base, tokenizer = base_from_config(cfg)
    return SmartPathModel(cfg, base, tokenizer).eval()


def test_token_centres_follow_qwen_raster_order() -> None:
    # Two images: 1 frame of 4x6 patches (2x3 merged tokens), 2 frames of 2x2 (1 token each).
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    xy = normalised_token_centres(grid, merge_size=2)
    expected = [(1 / 6, 0.25), (0.5, 0.25), (5 / 6, 0.25), (1 / 6, 0.75), (0.5, 0.75)]
    expected += [(5 / 6, 0.75), (0.5, 0.5), (0.5, 0.5)]
    assert torch.allclose(xy, torch.tensor(expected))


def test_positions_start_as_a_no_op_then_tell_tokens_apart() -> None:
    plain, positioned = _model(False), _model(True)
    image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    roi = prepare_roi(image, make_image_processor(plain.cfg.vision))
    with torch.no_grad():
        before = plain.encode_images(roi.pixel_values, roi.image_grid_thw)
        same = positioned.encode_images(roi.pixel_values, roi.image_grid_thw)
        assert torch.equal(before, same)  # zero-initialised: a pretrained base is unchanged
        positioned.image_position.proj.weight.normal_()
        moved = positioned.encode_images(roi.pixel_values, roi.image_grid_thw)
    delta = moved - before  # (tokens, H): the position embedding alone
    assert delta.shape == before.shape and delta.shape[0] == 16
    assert torch.cdist(delta, delta).fill_diagonal_(1.0).min() > 1e-3  # every token distinct
    # Trained like SmartPath's own parts even when the base is frozen; saved with the model.
    names = {id(p) for p in positioned.image_position.parameters()}
    assert names <= {id(p) for p in trainable_parameters(positioned, train_base=False)}
    assert "image_position.proj.weight" in positioned.checkpoint_tensors()
    assert plain.image_position is None and not any(
        k.startswith("image_position.") for k in plain.checkpoint_tensors()
    )
