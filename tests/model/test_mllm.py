"""The composed SmartPath model: ROI, WSI and text requests mixed in one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smartpath.core.config.model import ModelConfig
from smartpath.model.base import base_from_config
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


def test_precomputed_visual_tokens_equal_raw_inputs(model: SmartPathModel) -> None:
    """The encoder service sends vision-tower and aggregator outputs instead of raw inputs."""
    batch = _batch(_requests(model))
    with torch.no_grad():
        raw = model(batch)
        embeds = model.encode_images(batch.pixel_values, batch.image_grid_thw)
        slides = [s if s is None else model.slide_tokens_of(s) for s in batch.slides]
        batch.pixel_values, batch.image_embeds, batch.slides = None, embeds, slides
        pre = model(batch)
    torch.testing.assert_close(pre.logits, raw.logits)
    assert torch.equal(pre.router.indices, raw.router.indices)


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


def test_generation_mixed_batch_equals_alone_and_stops(model: SmartPathModel) -> None:
    requests = _requests(model)
    batch = _batch(requests)
    together = model.generate(batch, max_new_tokens=6)
    assert all(len(t) == 6 for t in together)
    with torch.no_grad():
        decision = model(batch).router
    for i, request in enumerate(requests):
        routing = ExpertRouting(decision.indices[i : i + 1], decision.weights[i : i + 1])
        alone = model.generate(_batch([request]), max_new_tokens=6, routing=routing)
        assert alone[0] == together[i]
    # A stop token ends only the request that produced it.
    stop = together[1][2]
    stopped = model.generate(batch, max_new_tokens=6, stop_token_ids=[stop])
    assert stopped[1] == together[1][: together[1].index(stop) + 1]


def test_generation_prefill_matches_full_forward(model: SmartPathModel) -> None:
    """Greedy token 1 from the KV-cached prefill equals the argmax of a plain forward."""
    batch = _batch(_requests(model))
    with torch.no_grad():
        out = model(batch)
        expected = out.logits[:, -1].argmax(-1).tolist()
        first = [t[0] for t in model.generate(batch, max_new_tokens=1)]
    assert first == expected


def test_generation_needs_left_padding(model: SmartPathModel) -> None:
    batch = _batch(_requests(model))
    batch.attention_mask = batch.attention_mask.flip(-1)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(batch, max_new_tokens=1)


def test_cached_decoding_continues_positions_after_images(model: SmartPathModel) -> None:
    """Tokens from the KV cache equal full forwards over prompt + tokens so far (M-RoPE after
    an image continues at the vision block's max position + 1, not at the token count)."""
    processor = make_image_processor(model.cfg.vision)
    image = np.random.default_rng(3).integers(0, 255, (196, 280, 3), dtype=np.uint8)
    roi = prepare_roi(image, processor)  # 14x20 patches -> 70 tokens over 10 positions
    prompt = expand_image_pads(f"{VISION_START}{IMAGE_PAD}{VISION_END} grade", roi.num_image_tokens)
    request = (model.tokenizer(prompt)["input_ids"], Task.CLASSIFICATION, Scale.ROI, roi, None)
    batch = _batch([request])
    routing = ExpertRouting.single([0, 1], [0.5, 0.5])
    with torch.no_grad():
        tokens = model.generate(batch, max_new_tokens=4, routing=routing)[0]
        for k in range(1, 4):
            extended = (request[0] + tokens[:k], *request[1:])
            logits = model(_batch([extended]), routing=routing).logits[0, -1]
            assert logits.argmax().item() == tokens[k], k


def test_decode_positions_follow_the_vision_block(model: SmartPathModel) -> None:
    processor = make_image_processor(model.cfg.vision)
    image = np.random.default_rng(3).integers(0, 255, (196, 280, 3), dtype=np.uint8)
    roi = prepare_roi(image, processor)
    prompt = expand_image_pads(f"{VISION_START}{IMAGE_PAD}{VISION_END} grade", roi.num_image_tokens)
    batch = _batch(
        [(model.tokenizer(prompt)["input_ids"], Task.CLASSIFICATION, Scale.ROI, roi, None)]
    )
    seen: list[torch.Tensor] = []
    hook = model.base.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        model.generate(batch, max_new_tokens=3)
    finally:
        hook.remove()
    prefill_max = int(seen[0].max())
    assert prefill_max < batch.input_ids.shape[1] - 1  # 70 image tokens span only 10 positions
    assert [int(p.max()) for p in seen[1:]] == [prefill_max + 1, prefill_max + 2]
    assert all(bool((p == p[0]).all()) for p in seen[1:])  # text: the 3 M-RoPE rows agree


def test_checkpoint_round_trip_through_s3(model: SmartPathModel, s3_config) -> None:
    from smartpath.core.storage import make_store

    store = make_store(s3_config)
    store.ensure_bucket("models")
    manifest = model.save("s3://models/smartpath/tiny/v1/", store, metrics={"f1": 0.5})
    assert [e.index for e in manifest.experts] == list(range(model.cfg.experts.num_experts))
    loaded = SmartPathModel.load("s3://models/smartpath/tiny/v1/", store)
    batch = _batch(_requests(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, model(batch).logits, atol=0, rtol=0)
    assert loaded.generate(batch, max_new_tokens=3) == model.generate(batch, max_new_tokens=3)
