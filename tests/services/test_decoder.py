"""The batched decoder engine against the model's own generation, with deadlines, a bounded
queue, cancellation and label scores."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from smartpath.model.experts import ExpertRouting
from smartpath.model.generation import DecodeBatch
from smartpath.model.grammar import Scale, Task
from smartpath.model.mllm import MultimodalBatch, SmartPathModel
from smartpath.model.prompts import PROMPT_STYLES
from smartpath.model.tokenizer import IM_END
from smartpath.model.vision import question_ids
from smartpath.services.contracts import DecodeRequest, Question, VisualTokens
from smartpath.services.decoding.decoder import BatchDecoder
from smartpath.services.encoding.encoder import VisualEncoder
from smartpath.services.models import load_served_model
from smartpath.training.synthetic.dataset import label_taxonomy
from smartpath.training.synthetic.roi import render_roi

# The demo checkpoint's taxonomy (the decoder reads it from the model).
LABELS = label_taxonomy()


@pytest.fixture(scope="module")
def model() -> SmartPathModel:
    return load_served_model(SmartPathConfig())


@pytest.fixture(scope="module")
def visuals(model: SmartPathModel) -> list[VisualTokens]:
    encoder = VisualEncoder(model)
    rng = np.random.default_rng(0)
    images = [render_roi(rng, cls, size).image for cls, size in (("tumour", 224), ("stroma", 288))]
    rois = encoder.encode_rois([encoder.prepare(im) for im in images])
    g = torch.Generator().manual_seed(0)
    slide = VisualTokens(
        torch.randn(model.slide_tokens, rois[0].tokens.shape[1], generator=g).numpy()
    )
    return [*rois, slide]


def _requests(visuals, **kw) -> list[DecodeRequest]:
    questions = [
        Question(Task.CLASSIFICATION, Scale.ROI, max_new_tokens=24),
        Question(Task.VQA, Scale.ROI, prompt="Is there necrosis?", max_new_tokens=24),
        Question(Task.VQA, Scale.WSI, prompt="Which tissue dominates?", max_new_tokens=24),
    ]
    routes = [((0, 1), (0.7, 0.3)), ((2, 3), (0.5, 0.5)), ((3, 1), (0.9, 0.1))]
    return [
        DecodeRequest(q, v, experts=e, weights=w, **kw)
        for q, v, (e, w) in zip(questions, visuals, routes, strict=True)
    ]


def _reference(
    model: SmartPathModel, decoder: BatchDecoder, request: DecodeRequest, constrained: bool = True
) -> str:
    """The model's own generate() on this one request (precomputed visual tokens), within
    the request's grammar."""
    ids = decoder._prompt(request)
    batch: MultimodalBatch = decoder._batch([(ids, request)])
    routing = ExpertRouting(torch.tensor([request.experts]), torch.tensor([request.weights]))
    eos = model.tokenizer.convert_tokens_to_ids(IM_END)
    out = model.generate(
        batch,
        max_new_tokens=request.question.max_new_tokens,
        eos_token_id=eos,
        routing=routing,
        constraints=[request.question.constraint(decoder.default_labels)] if constrained else None,
    )[0]
    out = out[:-1] if out and out[-1] == eos else out
    return model.tokenizer.decode(out, skip_special_tokens=False)


def test_prompts_are_in_the_served_models_style(model, visuals) -> None:
    decoder = BatchDecoder(model)
    for request in _requests(visuals):
        q = request.question
        expected = {
            style: question_ids(
                model.tokenizer,
                q.text(LABELS, style),
                slide=q.scale is Scale.WSI,
                visual_tokens=int(request.visual.tokens.shape[0]),
            )
            for style in PROMPT_STYLES
        }
        assert expected["full"] != expected["compact"]
        assert decoder._prompt(request) == expected[model.cfg.prompt_style]


async def _collect(decoder: BatchDecoder, request: DecodeRequest):
    events = [e async for e in decoder.decode(request)]
    return events


SCHEDULINGS = pytest.mark.parametrize("scheduling", ["static", "continuous"])


@SCHEDULINGS
def test_batched_mixed_experts_equal_each_request_alone(model, visuals, scheduling) -> None:
    decoder = BatchDecoder(model, batch_wait_s=0.05, scheduling=scheduling)
    requests = _requests(visuals)

    async def run():
        return await asyncio.gather(*(_collect(decoder, r) for r in requests))

    results = asyncio.run(run())
    for request, events in zip(requests, results, strict=True):
        final = events[-1]
        assert final.done and all(not e.done for e in events[:-1])
        assert "".join(e.text_delta for e in events) == final.text
        assert final.text == _reference(model, decoder, request)
        assert final.batch_size == 3  # decoded together
        assert final.prompt_tokens > 0 and 0 < final.completion_tokens <= 24
    scores = dict(results[0][-1].label_scores)
    assert list(scores) == LABELS["classification/roi"]
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(not e.label_scores for e in results[1][-1:])  # only classification is scored


def test_label_scores_follow_the_models_likelihood(model, visuals) -> None:
    """The generated label is the most probable candidate under greedy decoding."""
    decoder = BatchDecoder(model)
    request = _requests(visuals)[0]
    final = asyncio.run(_collect(decoder, request))[-1]
    scores = dict(final.label_scores)
    answer = final.text.split("<answer>")[-1].split("</answer>")[0].strip()
    if answer in scores:  # the tiny model may answer off-list; then there is nothing to compare
        assert scores[answer] == max(scores.values())


@SCHEDULINGS
def test_past_deadline_is_deadline_exceeded_and_others_finish(model, visuals, scheduling) -> None:
    decoder = BatchDecoder(model, batch_wait_s=0.05, scheduling=scheduling)
    late, ok, _ = _requests(visuals)
    late = replace(late, deadline=time.time() - 1)

    async def run():
        return await asyncio.gather(
            _collect(decoder, late), _collect(decoder, ok), return_exceptions=True
        )

    started = time.perf_counter()
    late_result, ok_result = asyncio.run(run())
    assert isinstance(late_result, DeadlineExceededError)
    assert ok_result[-1].done and ok_result[-1].text == _reference(model, decoder, ok)
    assert time.perf_counter() - started < 30


@SCHEDULINGS
def test_full_queue_is_resource_exhausted(model, visuals, scheduling) -> None:
    decoder = BatchDecoder(model, max_batch_size=1, max_pending=1, scheduling=scheduling)
    requests = _requests(visuals) * 2

    async def run():
        return await asyncio.gather(
            *(_collect(decoder, r) for r in requests), return_exceptions=True
        )

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, ResourceExhaustedError)]
    answered = [r for r in results if isinstance(r, list)]
    assert refused and answered and len(refused) + len(answered) == len(requests)
    assert all(r[-1].done for r in answered)


@SCHEDULINGS
def test_a_caller_that_goes_away_leaves_the_batch(model, visuals, scheduling) -> None:
    decoder = BatchDecoder(model, batch_wait_s=0.05, scheduling=scheduling)
    a, b, _ = _requests(visuals)

    async def run():
        gone = asyncio.ensure_future(_collect(decoder, a))
        kept = asyncio.ensure_future(_collect(decoder, b))
        await asyncio.sleep(0.06)  # both are in the batch
        gone.cancel()
        return await kept

    events = asyncio.run(run())
    assert events[-1].text == _reference(model, decoder, b)


def test_malformed_visual_tokens_are_invalid_argument(model, visuals) -> None:
    decoder = BatchDecoder(model)
    request = _requests(visuals)[2]
    bad = DecodeRequest(
        **{**request.__dict__, "visual": VisualTokens(np.zeros((3, 7), np.float32))}
    )
    with pytest.raises(InvalidArgumentError, match="visual tokens"):
        asyncio.run(_collect(decoder, bad))
    bad = replace(request, experts=(0, 9))
    with pytest.raises(InvalidArgumentError, match="experts"):
        asyncio.run(_collect(decoder, bad))


def test_requests_may_decode_free_text(model, visuals) -> None:
    """``constrained=False`` decodes as the unconstrained model does; for these requests at
    least one answer differs from the one within its grammar."""
    decoder = BatchDecoder(model)
    requests = [
        DecodeRequest(replace(r.question, constrained=False), r.visual, r.experts, r.weights)
        for r in _requests(visuals)
    ]
    free = [asyncio.run(_collect(decoder, r))[-1].text for r in requests]
    assert free == [_reference(model, decoder, r, constrained=False) for r in requests]
    assert free != [_reference(model, decoder, r) for r in _requests(visuals)]


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes ≥ 40 ms more, so requests can arrive while a batch runs."""
    step = DecodeBatch.step

    def slow(self):
        time.sleep(0.04)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow)


async def _timed(decoder: BatchDecoder, request: DecodeRequest, log: list, name: str):
    """Collect the events, logging (name, "first"/"done", time) as they arrive."""
    events = []
    async for event in decoder.decode(request):
        if not events:
            log.append((name, "first", time.perf_counter()))
        events.append(event)
    log.append((name, "done", time.perf_counter()))
    return events


@SCHEDULINGS
def test_requests_arriving_during_a_batch_join_it_when_continuous(
    model, visuals, scheduling, slow_steps
) -> None:
    """A request sent after a long one started gets its first token before the long one ends
    (continuous), or only after it (static); both equal their decodes alone either way."""
    decoder = BatchDecoder(model, scheduling=scheduling)
    long, short, _ = _requests(visuals)  # classification: 10 tokens; the VQA answer: 6
    log: list = []

    async def run():
        first = asyncio.ensure_future(_timed(decoder, long, log, "long"))
        while not log:  # the long request is decoding
            await asyncio.sleep(0.005)
        return await asyncio.gather(first, _timed(decoder, short, log, "short"))

    long_events, short_events = asyncio.run(run())
    at = {(name, what): t for name, what, t in log}
    assert long_events[-1].completion_tokens >= 8  # long enough to be joined mid-way
    if scheduling == "continuous":
        assert at["short", "first"] < at["long", "done"]
        assert short_events[-1].batch_size == 2
    else:
        assert at["short", "first"] > at["long", "done"]
    assert long_events[-1].text == _reference(model, decoder, long)
    assert short_events[-1].text == _reference(model, decoder, short)
    assert long_events[-1].label_scores  # classification is still scored


def test_a_deadline_mid_decode_leaves_the_continuous_batch(model, visuals, slow_steps) -> None:
    decoder = BatchDecoder(model, batch_wait_s=0.05)
    long, short, _ = _requests(visuals)
    short = replace(short, deadline=time.time() + 0.15)  # passes after a few steps

    async def run():
        return await asyncio.gather(
            _collect(decoder, long), _collect(decoder, short), return_exceptions=True
        )

    long_result, short_result = asyncio.run(run())
    assert isinstance(short_result, DeadlineExceededError)
    assert long_result[-1].text == _reference(model, decoder, long)
    assert long_result[-1].batch_size == 2  # they started together
