"""The composed SmartPath model: ROI, WSI and text requests mixed in one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smartpath.model.base import base_from_config
from smartpath.model.config import ModelConfig
from smartpath.model.experts import ExpertRouting, expert_modules
from smartpath.model.grammar import Scale, Task
from smartpath.model.mllm import IGNORE_INDEX, MultimodalBatch, SlideInput, SmartPathModel
from smartpath.model.tokenizer import IMAGE_PAD, SLIDE_PAD, VISION_END, VISION_START
from smartpath.model.vision import expand_image_pads, make_image_processor, prepare_roi

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def model() -> SmartPathModel:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", aggregator={"feature_dim": FEATURE_DIM, "num_tokens": 4})
    base, tokenizer = base_from_config(cfg)
    m = SmartPathModel(cfg, base, tokenizer).eval()
    g = torch.Generator().manual_seed(1)
    for layer in expert_modules(m.base).values():  # non-zero experts, so mixing matters
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    m.tokenizer = tokenizer
    return m


def _requests(model: SmartPathModel):
    tok = model.tokenizer
    processor = make_image_processor(model.cfg.vision)
    rng = np.random.default_rng(0)
    roi = prepare_roi(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8), processor)
    roi_prompt = expand_image_pads(
        f"{VISION_START}{IMAGE_PAD}{VISION_END} classify this region", roi.num_image_tokens
    )
    slide = SlideInput(
        torch.randn(50, FEATURE_DIM), torch.randint(0, 20_000, (50, 2)).float(), mpp=0.5
    )
    slide_prompt = f"{VISION_START}{SLIDE_PAD * model.slide_tokens}{VISION_END} what is this?"
    return [
        (tok(roi_prompt)["input_ids"], Task.CLASSIFICATION, Scale.ROI, roi, None),
        (tok(slide_prompt)["input_ids"], Task.VQA, Scale.WSI, None, slide),
        (tok("is there tumour here at all")["input_ids"], Task.VQA, Scale.ROI, None, None),
    ]


def _batch(requests) -> MultimodalBatch:
    length = max(len(r[0]) for r in requests)
    ids = torch.zeros(len(requests), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (tokens, *_rest) in enumerate(requests):
        ids[i, length - len(tokens) :] = torch.tensor(tokens)  # left padding
        mask[i, length - len(tokens) :] = 1
    rois = [r[3] for r in requests if r[3] is not None]
    return MultimodalBatch(
        input_ids=ids,
        attention_mask=mask,
        task_ids=torch.tensor([int(r[1]) for r in requests]),
        scale_ids=torch.tensor([int(r[2]) for r in requests]),
        pixel_values=torch.cat([r.pixel_values for r in rois]) if rois else None,
        image_grid_thw=torch.cat([r.image_grid_thw for r in rois]) if rois else None,
        slides=[r[4] for r in requests],
    )


def test_mixed_batch_equals_each_request_alone(model: SmartPathModel) -> None:
    requests = _requests(model)
    with torch.no_grad():
        together = model(_batch(requests))
        idx, w = together.router.indices, together.router.weights
        assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-6)
        assert idx.shape == (3, model.cfg.experts.top_k)
        for i, request in enumerate(requests):
            alone = model(_batch([request]), routing=ExpertRouting(idx[i : i + 1], w[i : i + 1]))
            n = len(request[0])
            torch.testing.assert_close(
                together.logits[i, -n:], alone.logits[0], atol=1e-5, rtol=1e-5
            )


def test_experts_change_the_output(model: SmartPathModel) -> None:
    batch = _batch(_requests(model)[:1])
    with torch.no_grad():
        a = model(batch, routing=ExpertRouting.single([0], [1.0])).logits
        b = model(batch, routing=ExpertRouting.single([1], [1.0])).logits
    assert (a - b).abs().max() > 1e-3


def test_loss_trains_router_aggregator_and_experts_not_base(model: SmartPathModel) -> None:
    batch = _batch(_requests(model))
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
    out = model(batch, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    (out.loss + out.aux_loss).backward()
    assert model.aggregator.input_proj.weight.grad is not None
    assert model.router.visual_proj.weight.grad.abs().sum() > 0
    assert any(m.lora_A.grad is not None for m in expert_modules(model.base).values())
    assert all(p.grad is None for n, p in model.base.named_parameters() if "lora_" not in n)
    model.zero_grad(set_to_none=True)


def test_placeholder_count_mismatch_is_a_clear_error(model: SmartPathModel) -> None:
    requests = _requests(model)
    tokens, task, scale, roi, slide = requests[1]
    short = (tokens[:3] + tokens[4:], task, scale, roi, slide)  # one slide pad fewer
    with pytest.raises(ValueError, match="slide_pad"):
        model(_batch([short]))
