"""Serving budgets: ROI token caps and packed vision-tower forwards in the encoder; the decoder's
token budget per batch and label scoring in chunks of candidates."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from smartpath.core.config import DecoderDeploymentConfig, SmartPathConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.model.checkpoint import DEMO_MODEL_DIR
from smartpath.model.grammar import Scale, Task, format_completion, split_completion
from smartpath.model.mllm import SmartPathModel
from smartpath.model.tokenizer import IM_END
from smartpath.services.contracts import DecodeRequest, Question, VisualTokens
from smartpath.services.decoding.decoder import BatchDecoder, DecoderStats
from smartpath.services.encoding.encoder import VisualEncoder

# Seven candidate labels (none of the demo taxonomy's, so the request's own list is used).
LABELS = ("alpha", "beta", "gamma cell", "delta", "epsilon-rich", "zeta", "eta")


@pytest.fixture(scope="module")
def model() -> SmartPathModel:
    """The packaged demo model: its vision preset caps an ROI at 224² px = 64 tokens."""
    return SmartPathModel.load(DEMO_MODEL_DIR)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def roi_tokens(model: SmartPathModel) -> VisualTokens:
    """One small ROI's visual tokens (16 tokens), for short decoder prompts."""
    encoder = VisualEncoder(model, max_image_tokens=16)
    return encoder.encode_rois([encoder.prepare(_image(448, 448))])[0]


def _request(visual: VisualTokens, question: Question) -> DecodeRequest:
    return DecodeRequest(question, visual, experts=(0, 1), weights=(0.6, 0.4))


def _vqa(visual: VisualTokens, max_new_tokens: int) -> DecodeRequest:
    question = Question(
        Task.VQA, Scale.ROI, prompt="Is there necrosis?", max_new_tokens=max_new_tokens
    )
    return _request(visual, question)


async def _collect(decoder: BatchDecoder, request: DecodeRequest) -> list:
    return [e async for e in decoder.decode(request)]


# -- encoder: image token cap --------------------------------------------------------------------
def test_a_large_roi_is_resized_to_the_token_budget_not_refused(model) -> None:
    image = _image(448, 448)
    small = VisualEncoder(model, max_image_tokens=16)
    default = VisualEncoder(model)  # 1280 tokens, so the preset's 224² = 64 tokens decide

    capped = small.prepare(image)
    t, h, w = (int(v) for v in capped.image_grid_thw[0])
    assert 0 < capped.num_image_tokens <= 16
    assert h == w  # a square image stays square
    assert t * h * w == capped.num_image_tokens * 4  # grid in patches, merge 2×2 per token

    full = default.prepare(image)
    assert full.num_image_tokens == 64 > capped.num_image_tokens

    # The encoder's output follows the prepared ROI: as many tokens as its grid says.
    out = small.encode_rois([capped])[0]
    assert out.tokens.shape == (capped.num_image_tokens, model.hidden_size)
    assert out.image_grid_thw == (t, h, w)
    assert np.isfinite(out.tokens).all()


@pytest.mark.parametrize(("height", "width"), [(448, 224), (224, 448), (336, 560)])
def test_a_resized_roi_keeps_its_aspect_ratio(model, height: int, width: int) -> None:
    encoder = VisualEncoder(model, max_image_tokens=32)
    roi = encoder.prepare(_image(height, width))
    _, h, w = (int(v) for v in roi.image_grid_thw[0])
    assert 0 < roi.num_image_tokens <= 32
    assert (h > w) == (height > width)
    assert (h / w) / (height / width) == pytest.approx(1.0, rel=0.25)


def test_an_elongated_roi_stays_within_the_token_budget(model) -> None:
    encoder = VisualEncoder(model, max_image_tokens=16)
    for h, w in [(28, 2000), (2000, 56), (40, 900)]:  # aspect ratio above the budget
        roi = encoder.prepare(_image(h, w))
        assert 0 < roi.num_image_tokens <= 16
        _, gh, gw = (int(v) for v in roi.image_grid_thw[0])
        assert (gw > gh) == (w > h)  # the long side stays the long side


# -- encoder: tokens per vision-tower forward ----------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "forwards"),
    [  # ROIs of 64, 36, 16, 64 tokens, packed in order; a lone ROI over the budget runs alone
        (100, [[64, 36], [16, 64]]),
        (64, [[64], [36, 16], [64]]),
        (1, [[64], [36], [16], [64]]),
    ],
)
def test_encode_rois_in_several_forwards_equals_one_batch(
    model, monkeypatch, budget: int, forwards: list[list[int]]
) -> None:
    sizes = [(224, 224), (168, 168), (112, 112), (224, 224)]
    reference = VisualEncoder(model, max_batch_tokens=16384)
    rois = [reference.prepare(_image(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
    assert [r.num_image_tokens for r in rois] == [64, 36, 16, 64]

    calls: list[list[int]] = []  # tokens of each image, per vision-tower forward
    original = SmartPathModel.encode_images

    def counting(self, pixel_values, image_grid_thw):
        calls.append([int(n) // 4 for n in image_grid_thw.prod(-1)])
        return original(self, pixel_values, image_grid_thw)

    monkeypatch.setattr(SmartPathModel, "encode_images", counting)
    together = reference.encode_rois(rois)
    assert calls == [[64, 36, 16, 64]]
    calls.clear()

    split = VisualEncoder(model, max_batch_tokens=budget).encode_rois(rois)
    assert calls == forwards
    assert all(sum(c) <= budget or len(c) == 1 for c in calls)
    assert len(split) == len(together) == 4
    for a, b in zip(split, together, strict=True):
        assert a.image_grid_thw == b.image_grid_thw
        np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5, rtol=0)


# -- decoder: label scoring in chunks ------------------------------------------------------------
def _classify(visual: VisualTokens) -> DecodeRequest:
    question = Question(Task.CLASSIFICATION, Scale.ROI, labels=LABELS, max_new_tokens=6)
    return _request(visual, question)


def _reference_scores(model: SmartPathModel, decoder: BatchDecoder, request, text: str):
    """P(label) from one full forward per label (no padding, no chunking, all logits)."""
    think = split_completion(text).think or ""
    prompt = decoder._prompt(request)
    logps = []
    for label in LABELS:
        completion = model.tokenizer(
            format_completion(think, label) + IM_END, add_special_tokens=False
        )["input_ids"]
        batch = decoder._batch([(prompt + completion, request)])
        routing = BatchDecoder._routing([request])[0]
        with torch.no_grad():
            logits = model(batch, routing=routing).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        n = len(prompt)
        logps.append(sum(float(logp[n + j - 1, c]) for j, c in enumerate(completion)))
    return torch.softmax(torch.tensor(logps, dtype=torch.float64), 0).tolist()


def test_label_scores_in_chunks_equal_one_forward(model, roi_tokens, monkeypatch) -> None:
    request = _classify(roi_tokens)
    prompt_len = len(BatchDecoder(model)._prompt(request))
    forwards: list[dict] = []
    original = SmartPathModel.forward

    def counting(self, batch, *args, **kwargs):
        out = original(self, batch, *args, **kwargs)
        forwards.append(
            {
                "rows": batch.input_ids.shape[0],
                "length": batch.input_ids.shape[1],
                "keep": kwargs.get("logits_to_keep", 0),
                "positions": out.logits.shape[1],
            }
        )
        return out

    monkeypatch.setattr(SmartPathModel, "forward", counting)
    results = {}
    for chunk in (2, 64):
        forwards.clear()
        decoder = BatchDecoder(model, label_chunk=chunk)
        results[chunk] = asyncio.run(decoder.complete(request))
        assert len(forwards) == math.ceil(len(LABELS) / chunk)
        assert [f["rows"] for f in forwards] == ([2, 2, 2, 1] if chunk == 2 else [len(LABELS)])
        for f in forwards:
            assert f["keep"] > 0
            assert f["positions"] == f["keep"]
            assert f["positions"] < prompt_len < f["length"]
    monkeypatch.undo()

    assert results[2].text == results[64].text  # the same think precedes the labels
    chunked, whole = dict(results[2].label_scores), dict(results[64].label_scores)
    assert list(chunked) == list(whole) == list(LABELS)
    np.testing.assert_allclose(list(chunked.values()), list(whole.values()), atol=1e-5, rtol=0)
    assert sum(chunked.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(chunked.values()) - min(chunked.values()) > 1e-3  # not a uniform placeholder

    reference = _reference_scores(model, BatchDecoder(model), request, results[2].text)
    np.testing.assert_allclose(list(chunked.values()), reference, atol=1e-5, rtol=0)


def test_a_label_scoring_failure_reaches_the_caller(model, roi_tokens, monkeypatch) -> None:
    def broken(self, job):
        raise RuntimeError("label scoring failed")

    monkeypatch.setattr(BatchDecoder, "_label_scores", broken)
    decoder = BatchDecoder(model)

    async def run():
        return await asyncio.wait_for(decoder.complete(_classify(roi_tokens)), 3)

    with pytest.raises(RuntimeError, match="label scoring failed"):
        asyncio.run(run())


# -- decoder: token budget per batch -------------------------------------------------------------
def test_a_request_over_the_token_budget_is_invalid_argument(model, roi_tokens) -> None:
    request = _vqa(roi_tokens, max_new_tokens=4)
    cost = len(BatchDecoder(model)._prompt(request)) + 4

    refused = BatchDecoder(model, max_batch_tokens=cost - 1)
    with pytest.raises(InvalidArgumentError, match=r"serve\.decoder\.max_batch_tokens") as err:
        asyncio.run(_collect(refused, request))
    assert f"needs {cost} tokens" in str(err.value)
    assert not refused._pending  # refused before it was queued

    exact = BatchDecoder(model, max_batch_tokens=cost)  # exactly at the budget is fine
    events = asyncio.run(_collect(exact, request))
    assert events[-1].done and events[-1].completion_tokens > 0


@pytest.mark.parametrize(("fits", "expected"), [(2, [2, 2, 1]), (5, [5])])
def test_batches_hold_at_most_the_token_budget(model, roi_tokens, fits, expected) -> None:
    requests = [_vqa(roi_tokens, max_new_tokens=3) for _ in range(5)]
    cost = len(BatchDecoder(model)._prompt(requests[0])) + 3
    sizes: list[int] = []
    decoder = BatchDecoder(
        model,
        max_batch_tokens=fits * cost + cost // 2,  # room for `fits` requests, not one more
        batch_wait_s=0.05,
        stats=DecoderStats(on_batch=lambda size, _queue: sizes.append(size)),
    )

    async def run():
        return await asyncio.gather(*(_collect(decoder, r) for r in requests))

    results = asyncio.run(run())
    assert sizes == expected
    assert max(sizes) <= fits
    assert all(events[-1].done for events in results)
    assert sorted(events[-1].batch_size for events in results) == sorted(
        s for s in expected for _ in range(s)
    )
    texts = {events[-1].text for events in results}
    assert len(texts) == 1  # equal requests, equal answers, whichever batch they were in


def test_from_config_takes_the_deployments_settings(model) -> None:
    config = DecoderDeploymentConfig(
        max_batch_size=3,
        max_batch_tokens=777,
        label_chunk=5,
        max_pending=9,
        batch_wait_timeout_s=0.25,
    )
    decoder = BatchDecoder.from_config(model, config)
    assert decoder.max_batch_size == 3
    assert decoder.max_batch_tokens == 777
    assert decoder.label_chunk == 5
    assert decoder.max_pending == 9
    assert decoder.batch_wait_s == 0.25

    stats = DecoderStats()
    served = SmartPathConfig(serve={"decoder": {"max_batch_tokens": 4096, "label_chunk": 2}})
    decoder = BatchDecoder.from_config(model, served.serve.decoder, stats)
    assert (decoder.max_batch_tokens, decoder.label_chunk) == (4096, 2)
    assert decoder.max_batch_size == DecoderDeploymentConfig().max_batch_size
    assert decoder.stats is stats

    defaults = BatchDecoder.from_config(model, SmartPathConfig().serve.decoder)
    assert (defaults.max_batch_tokens, defaults.label_chunk) == (65536, 16)
