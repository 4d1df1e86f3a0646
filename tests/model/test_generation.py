"""Batched generation with per-request experts: reference equivalence, stops, sampling."""

from __future__ import annotations

import copy

import pytest
import torch

from smartpath.model.experts import ExpertRouting, apply_routing, attach_experts, expert_modules
from smartpath.model.generation import DecodeBatch, generate, generate_stream
from tests.model.tiny import VOCAB, randomise_experts, tiny_qwen

NEW = 10


@pytest.fixture(scope="module")
def base():
    return tiny_qwen(seed=2)


@pytest.fixture(scope="module")
def moe(base):
    model = copy.deepcopy(base)
    attach_experts(model, ["q_proj", "v_proj"], num_experts=4, rank=4, alpha=8)
    randomise_experts(model, seed=4)
    return model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (4, 9, 6, 2)]


@pytest.fixture(scope="module")
def routing() -> ExpertRouting:
    return ExpertRouting(
        torch.tensor([[0, 1], [2, 3], [3, 1], [1, 2]]),
        torch.tensor([[0.7, 0.3], [0.5, 0.5], [1.0, 0.0], [0.2, 0.8]]),
    )


def greedy_without_cache(model, prompt: list[int], routing, new: int) -> list[int]:
    """Reference: re-run the whole sequence every step (no KV cache, no padding)."""
    seq = list(prompt)
    with torch.no_grad(), apply_routing(model, routing):
        for _ in range(new):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def test_matches_transformers_generate_for_one_request(base, moe, prompts) -> None:
    for model in (base, moe):  # moe without routing must be the base model
        for prompt in prompts[:2]:
            ids = torch.tensor([prompt])
            ref = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW,
                do_sample=False,
            )[0, len(prompt) :].tolist()
            assert generate(model, [prompt], max_new_tokens=NEW) == [ref]
    # And for a left-padded batch (transformers pads on the left itself here).
    pad = max(len(p) for p in prompts[:2])
    ids = torch.tensor([[0] * (pad - len(p)) + p for p in prompts[:2]])
    mask = (torch.arange(pad)[None] >= torch.tensor([[pad - len(p)] for p in prompts[:2]])).long()
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert generate(base, prompts[:2], max_new_tokens=NEW) == ref[:, pad:].tolist()


def test_batched_mixed_experts_equal_each_request_alone(moe, prompts, routing) -> None:
    batched = generate(moe, prompts, routing, max_new_tokens=NEW)
    alone = [
        generate(moe, [p], routing.select([i]), max_new_tokens=NEW)[0]
        for i, p in enumerate(prompts)
    ]
    assert batched == alone
    for i, p in enumerate(prompts):
        assert batched[i] == greedy_without_cache(moe, p, routing.select([i]), NEW)
    # Experts matter: the same prompts with no routing decode differently.
    assert generate(moe, prompts, None, max_new_tokens=NEW) != batched
    # Per-request routings (None = base for that request) equal the stacked routing.
    per_request = [routing.select([0]), None, ExpertRouting.single([3], [1.0]), routing.select([3])]
    mixed = generate(moe, prompts, per_request, max_new_tokens=NEW)
    assert mixed[0] == batched[0] and mixed[3] == batched[3]
    assert mixed[1] == generate(moe, [prompts[1]], None, max_new_tokens=NEW)[0]
    assert mixed[2] == batched[2]  # row 2 of `routing` is expert 3 with weight 1
    assert all(m.routing is None for m in expert_modules(moe).values())


def mid_stop_token(outputs: list[list[int]]) -> int:
    """A token some request first emits mid-way (step ≥ 2) and some other request never emits."""
    for out in outputs:
        for step, token in enumerate(out):
            if step >= 2 and token not in out[:step] and any(token not in o for o in outputs):
                return token
    raise AssertionError("no suitable stop token in these outputs")


def test_requests_stop_independently(moe, prompts, routing) -> None:
    free = generate(moe, prompts, routing, max_new_tokens=NEW)
    stop = mid_stop_token(free)
    stopped = generate(moe, prompts, routing, max_new_tokens=NEW, stop_token_ids=[stop])
    for got, full in zip(stopped, free, strict=True):
        want = full[: full.index(stop) + 1] if stop in full else full
        assert got == want  # stop token included; the others are unaffected
    lengths = sorted(len(s) for s in stopped)
    assert 3 <= lengths[0] < NEW and lengths[-1] == NEW  # one stopped mid-way, one ran on
    # EOS behaves like a stop token.
    assert generate(moe, prompts, routing, max_new_tokens=NEW, eos_token_id=stop) == stopped


def test_stream_yields_each_active_request_per_step(moe, prompts, routing) -> None:
    stop = mid_stop_token(generate(moe, prompts, routing, max_new_tokens=NEW))
    events = list(generate_stream(moe, prompts, routing, max_new_tokens=NEW, stop_token_ids=[stop]))
    collected: list[list[int]] = [[] for _ in prompts]
    for request, token in events:
        collected[request].append(token)
    assert collected == generate(moe, prompts, routing, max_new_tokens=NEW, stop_token_ids=[stop])
    # Step-major order: the first len(prompts) events are step 0 of requests 0..3.
    assert [r for r, _ in events[: len(prompts)]] == list(range(len(prompts)))
    # Closing the stream early restores the model's routing.
    stream = generate_stream(moe, prompts, routing, max_new_tokens=NEW)
    next(stream)
    assert all(m.routing is not None for m in expert_modules(moe).values())
    stream.close()
    assert all(m.routing is None for m in expert_modules(moe).values())


def test_seeded_sampling_is_reproducible(moe, prompts, routing) -> None:
    kw = {"max_new_tokens": NEW, "temperature": 1.5, "top_p": 0.95}
    a = generate(moe, prompts, routing, seed=11, **kw)
    b = generate(moe, prompts, routing, seed=11, **kw)
    c = generate(moe, prompts, routing, seed=12, **kw)
    greedy = generate(moe, prompts, routing, max_new_tokens=NEW)
    assert a == b
    assert a != c and a != greedy
    assert generate(moe, prompts, routing, max_new_tokens=NEW, temperature=0.0, seed=5) == greedy
    # A tiny nucleus keeps only the most likely token: sampling collapses to greedy.
    assert (
        generate(moe, prompts, routing, seed=3, max_new_tokens=NEW, temperature=1.0, top_p=1e-6)
        == greedy
    )


def test_rejects_bad_inputs(moe, prompts, routing) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate(moe, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="routing is for 4 requests"):
        generate(moe, prompts[:2], routing, max_new_tokens=2)
    assert generate(moe, prompts, routing, max_new_tokens=0) == [[], [], [], []]


def test_suppressed_tokens_are_never_generated(moe, prompts, routing) -> None:
    free = generate(moe, prompts, routing, max_new_tokens=6)
    banned = sorted({t for row in free for t in row})
    assert banned
    for temperature in (0.0, 1.5):
        out = generate(
            moe, prompts, routing, max_new_tokens=6, temperature=temperature, seed=0,
            suppress_token_ids=banned,
        )  # fmt: skip
        assert all(len(row) == 6 for row in out)
        assert not {t for row in out for t in row} & set(banned)


def test_cancelled_requests_leave_the_batch_and_others_are_unchanged(moe, prompts, routing):
    full = generate(moe, prompts, routing, max_new_tokens=NEW)
    steps: dict[int, int] = {}

    def cancelled(i: int) -> bool:
        steps[i] = steps.get(i, 0) + 1
        return i == 1 and steps[i] >= 3  # request 1 gives up after its third token

    out: list[list[int]] = [[] for _ in prompts]
    for row, token in generate_stream(
        moe, prompts, routing, max_new_tokens=NEW, cancelled=cancelled
    ):
        out[row].append(token)
    assert out[1] == full[1][:3]
    assert [out[i] for i in (0, 2, 3)] == [full[i] for i in (0, 2, 3)]


# -- continuous batching: requests join a running batch and leave it at any step --------------


def _continuous(model, arrivals, stop_token_ids=(), check=None) -> dict[int, list[int]]:
    """Run a DecodeBatch where ``arrivals[step]`` = [(key, prompt, routing, max_new)] join
    before that step's decode; ``check(batch)`` runs after every step."""
    batch = DecodeBatch(model, stop_token_ids=stop_token_ids)
    out: dict[int, list[int]] = {}
    step = 0
    while batch or any(s >= step for s in arrivals):
        group = arrivals.get(step, [])
        if group:
            keys, ps, rs, limits = zip(*group, strict=True)
            for key, token in batch.add(keys, ps, list(rs), max_new_tokens=list(limits)):
                out.setdefault(key, []).append(token)
        for key, token in batch.step():
            out[key].append(token)
        if check is not None:
            check(batch, out)
        step += 1
    return out


def test_requests_joining_a_running_batch_equal_each_alone(moe, prompts, routing) -> None:
    free = generate(moe, prompts, routing, max_new_tokens=NEW)
    stop = mid_stop_token(free)
    limits = [NEW, 4, NEW - 2, 7]
    alone = [
        generate(moe, [p], routing.select([i]), max_new_tokens=limits[i], stop_token_ids=[stop])[0]
        for i, p in enumerate(prompts)
    ]
    assert any(stop in a and len(a) < limits[i] for i, a in enumerate(alone))  # a mid-way stop
    r = [routing.select([i]) for i in range(4)]
    # Request 0 starts alone; 1 and 2 (different lengths) join together at step 2; 3 at step 5;
    # a base-model request (routing None) joins at step 3.
    arrivals = {
        0: [(0, prompts[0], r[0], limits[0])],
        2: [(1, prompts[1], r[1], limits[1]), (2, prompts[2], r[2], limits[2])],
        3: [(9, prompts[3], None, 6)],
        5: [(3, prompts[3], r[3], limits[3])],
    }
    out = _continuous(moe, arrivals, stop_token_ids=[stop])
    assert [out[i] for i in range(4)] == alone
    assert out[9] == generate(moe, [prompts[3]], None, max_new_tokens=6, stop_token_ids=[stop])[0]
    assert out[9] != out[3]  # the experts matter, so routing really is per row
    assert all(m.routing is None for m in expert_modules(moe).values())


def test_rows_leaving_and_joining_keep_the_cache_bounded(moe, prompts, routing) -> None:
    gen = torch.Generator().manual_seed(3)
    arrivals: dict[int, list] = {}
    lengths: dict[int, int] = {}
    for key in range(20):  # a new request every 2 steps, each for 2..8 tokens
        prompt = prompts[key % 4]
        new = int(torch.randint(2, 9, (1,), generator=gen))
        arrivals[2 * key] = [(key, prompt, routing.select([key % 4]), new)]
        lengths[key] = len(prompt)
    seen: list[tuple[int, int]] = []  # (rows, cache length) after every step

    def check(batch: DecodeBatch, out: dict[int, list[int]]) -> None:
        if batch:
            longest = max(lengths[k] + len(out[k]) for k in batch.keys)
            assert batch.cache_length <= longest
        seen.append((len(batch), batch.cache_length))

    out = _continuous(moe, arrivals, check=check)
    assert max(rows for rows, _ in seen) >= 3  # rows overlapped
    # The run lasted far longer than the cache ever grew: leading padding was trimmed.
    assert len(seen) > 2 * max(length for _, length in seen)
    for [(key, prompt, r, new)] in arrivals.values():
        assert out[key] == generate(moe, [prompt], r, max_new_tokens=new)[0]


def test_dropped_rows_leave_and_the_others_are_unchanged(moe, prompts, routing) -> None:
    full = generate(moe, prompts, routing, max_new_tokens=NEW)
    batch = DecodeBatch(moe)
    out: dict[int, list[int]] = {i: [] for i in range(4)}
    for key, token in batch.add(range(4), prompts, routing, max_new_tokens=NEW):
        out[key].append(token)
    for step in range(NEW - 1):
        if step == 2:
            batch.drop([1, 3])
            assert batch.keys == [0, 2]
        for key, token in batch.step():
            out[key].append(token)
    assert not batch
    assert out[1] == full[1][:3] and out[3] == full[3][:3]
    assert [out[0], out[2]] == [full[0], full[2]]
    with pytest.raises(ValueError, match="unique"):
        batch.add([0, 0], prompts[:2], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least 1"):
        batch.add([0, 1], prompts[:2], max_new_tokens=[2, 0])
    assert not batch  # a refused group leaves nothing behind


def test_each_row_samples_at_its_own_temperature(moe, prompts, routing) -> None:
    greedy = generate(moe, prompts, routing, max_new_tokens=NEW)
    batch = DecodeBatch(moe, seed=5)
    out: dict[int, list[int]] = {i: [] for i in range(4)}
    temps = [0.0, 1.5, 0.0, 1.5]
    for key, token in batch.add(range(4), prompts, routing, max_new_tokens=NEW, temperature=temps):
        out[key].append(token)
    while batch:
        for key, token in batch.step():
            out[key].append(token)
    assert [out[0], out[2]] == [greedy[0], greedy[2]]  # greedy rows unaffected by sampled ones
    assert [out[1], out[3]] != [greedy[1], greedy[3]]
