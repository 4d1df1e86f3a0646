"""Benchmark: continuous (iteration-level) against static batching in the decoder engine.

Model: bench/decoding.py's ~30M-parameter model of transformers' Qwen2.5-VL classes (text path;
hidden 512, 8 layers, vocab 8192) with E=4 LoRA experts (r=8) on q_proj/v_proj, random
non-zero B; every request has its own random top-2 expert mix.

Request stream (seeded): N requests, prompts of 16..48 random tokens, answer lengths
(``max_new_tokens``) uniform in 4..128, greedy, no early stop (no EOS), so a request makes
exactly its length. Arrivals are Poisson.

Both schedulers run in one thread of this process on the same model, with the same torch
threads, over the identical stream (same prompts, experts, lengths and arrival times); the
clock starts at the first arrival and a request cannot be admitted before its arrival time:

- static (the decoder's ``scheduling: static``): when idle, the waiting requests (at most
  ``--max-batch``, oldest first) form a batch that runs ``generate_stream`` to its end; each
  row leaves at its own length (``cancelled``), but requests arriving meanwhile wait for the
  next batch.
- continuous (``scheduling: continuous``): a ``DecodeBatch``; before every step the waiting
  requests (up to ``--max-batch`` running rows) are prefilled as a group and merged into the
  running batch; rows leave when they reach their length.

Rate: first each scheduler's capacity is measured closed-loop (all N requests waiting at
t=0: requests/s = N / makespan). The Poisson rate is then ``--load`` (default 0.9) × the
continuous capacity: near continuous batching's saturation, above static batching's capacity
whenever continuous batching is worth having (both capacities are in the JSON, so the
overload of the static path is visible). Measured per scheduler, open-loop:

- throughput: tokens generated while requests were arriving (first to last arrival) per
  second of that window: the steady rate under this load, without the drain after the last
  arrival (where a finite stream's tail dilutes any difference); also requests / (last
  completion - first arrival) over the whole run;
- latency: completion - arrival (p50, p99); time to first token (TTFT): first token -
  arrival (p50).

``continuous_vs_static_throughput`` (target >= 1.5) = continuous / static in-window tokens/s;
``p99_ratio`` (target <= 1.0) = continuous p99 latency / static p99 latency. ``outputs_equal``:
every request decoded the same tokens under both schedulers (greedy; each also equals its
decode alone, which the tests check).

Prints progress, then one JSON line last.

    python bench/continuous.py [--requests 160] [--load 0.9] [--max-batch 16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from decoding import build_model, random_routing, with_experts

from smartpath.model.experts import ExpertRouting
from smartpath.model.generation import DecodeBatch, generate_stream

TARGET_THROUGHPUT, TARGET_P99 = 1.5, 1.0


@dataclass
class Request:
    """One request of the stream: its prompt, experts, answer length and arrival offset (s)."""

    key: int
    prompt: list[int]
    routing: ExpertRouting
    new: int
    arrival: float
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # of each token, from the clock's start
    first: float = 0.0  # first token, seconds from the clock's start
    done: float = 0.0  # last token


def make_stream(n: int, lengths: tuple[int, int], seed: int) -> list[Request]:
    """N requests (arrivals all 0; :func:`poisson` sets them)."""
    gen = torch.Generator().manual_seed(seed)
    routing = random_routing(n, gen)
    out = []
    for i in range(n):
        plen = int(torch.randint(16, 49, (1,), generator=gen))
        new = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
        prompt = torch.randint(3, 8192, (plen,), generator=gen).tolist()
        out.append(Request(i, prompt, routing.select([i]), new, 0.0))
    return out


def poisson(requests: list[Request], rate: float, seed: int) -> list[Request]:
    """Copies of ``requests`` with Poisson arrivals at ``rate`` per second (first at 0)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    return [
        Request(r.key, r.prompt, r.routing, r.new, float(a))
        for r, a in zip(requests, arrivals, strict=True)
    ]


def fresh(requests: list[Request]) -> list[Request]:
    return [Request(r.key, r.prompt, r.routing, r.new, r.arrival) for r in requests]


class Clock:
    """Seconds since the run started; waits for the next arrival when nothing is runnable."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self()))


def _record(req: Request, token: int, now: float) -> None:
    if not req.tokens:
        req.first = now
    req.tokens.append(token)
    req.times.append(now)
    if len(req.tokens) == req.new:
        req.done = now


def run_static(model, requests: list[Request], max_batch: int) -> list[Request]:
    """Static batching: a batch runs to its end; arrivals meanwhile wait for the next one."""
    waiting = sorted(requests, key=lambda r: r.arrival)
    clock = Clock()
    while waiting:
        now = clock()
        batch = [r for r in waiting[:max_batch] if r.arrival <= now]
        if not batch:
            clock.wait_until(waiting[0].arrival)
            continue
        del waiting[: len(batch)]

        def cancelled(i: int, batch: list[Request] = batch) -> bool:
            return len(batch[i].tokens) >= batch[i].new

        for i, token in generate_stream(
            model,
            [r.prompt for r in batch],
            [r.routing for r in batch],
            max_new_tokens=max(r.new for r in batch),
            cancelled=cancelled,
        ):
            if len(batch[i].tokens) < batch[i].new:
                _record(batch[i], token, clock())
    return requests


def run_continuous(model, requests: list[Request], max_batch: int) -> list[Request]:
    """Continuous batching: arrivals join the running batch before the next step."""
    waiting = sorted(requests, key=lambda r: r.arrival)
    by_key = {r.key: r for r in requests}
    running = DecodeBatch(model)
    clock = Clock()
    while waiting or running:
        now = clock()
        group = [r for r in waiting[: max_batch - len(running)] if r.arrival <= now]
        if group:
            del waiting[: len(group)]
            first = running.add(
                [r.key for r in group],
                [r.prompt for r in group],
                [r.routing for r in group],
                max_new_tokens=[r.new for r in group],
            )
            now = clock()
            for key, token in first:
                _record(by_key[key], token, now)
        if not running:
            if waiting:
                clock.wait_until(waiting[0].arrival)
            continue
        tokens = running.step()
        now = clock()
        for key, token in tokens:
            _record(by_key[key], token, now)
    return requests


Runner = Callable[[object, list[Request], int], list[Request]]


def summary(requests: list[Request]) -> dict[str, float]:
    """Throughput and latency of one finished run."""
    start, end = min(r.arrival for r in requests), max(r.arrival for r in requests)
    span = max(r.done for r in requests) - start
    in_window = sum(start <= t <= end for r in requests for t in r.times)
    latency = np.array([r.done - r.arrival for r in requests])
    ttft = np.array([r.first - r.arrival for r in requests])
    return {
        # closed-loop runs (every arrival at 0) have no window: 0
        "window_tokens_per_s": round(in_window / (end - start), 1) if end > start else 0.0,
        "requests_per_s": round(len(requests) / span, 3),
        "tokens_per_s": round(sum(len(r.tokens) for r in requests) / span, 1),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "makespan_s": round(span, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--load", type=float, default=0.9, help="x the continuous capacity")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--min-new", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_new = 24, 32
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = with_experts(build_model(), gen)
    stream = make_stream(args.requests, (args.min_new, args.max_new), args.seed)
    runners: dict[str, Runner] = {"static": run_static, "continuous": run_continuous}
    for run in runners.values():  # warm-up: first forwards and allocator
        run(model, fresh(stream[:4]), args.max_batch)

    capacity = {}
    for name, run in runners.items():
        closed = summary(run(model, fresh(stream), args.max_batch))
        capacity[name] = closed["requests_per_s"]
        print(f"closed-loop {name}: {closed}", flush=True)
    rate = args.load * capacity["continuous"]
    arrivals = poisson(stream, rate, args.seed)
    print(f"Poisson rate {rate:.2f} requests/s ({args.load} x continuous capacity)", flush=True)
    results, outputs = {}, {}
    for name, run in runners.items():
        done = run(model, fresh(arrivals), args.max_batch)
        results[name] = summary(done)
        outputs[name] = [r.tokens for r in sorted(done, key=lambda r: r.key)]
        print(f"open-loop {name}: {results[name]}", flush=True)

    s, c = results["static"], results["continuous"]
    ratio = c["window_tokens_per_s"] / s["window_tokens_per_s"]
    p99 = c["latency_p99_s"] / s["latency_p99_s"]
    print(
        json.dumps(
            {
                "bench": "continuous",
                "requests": args.requests,
                "max_new_tokens": [args.min_new, args.max_new],
                "max_batch": args.max_batch,
                "threads": args.threads,
                "capacity_requests_per_s": capacity,
                "capacity_ratio": round(capacity["continuous"] / capacity["static"], 3),
                "rate_requests_per_s": round(rate, 3),
                "static": s,
                "continuous": c,
                "continuous_vs_static_throughput": round(ratio, 3),
                "p99_ratio": round(p99, 3),
                "ttft_p50_s": {"static": s["ttft_p50_s"], "continuous": c["ttft_p50_s"]},
                "outputs_equal": outputs["static"] == outputs["continuous"],
                "target_throughput": TARGET_THROUGHPUT,
                "target_p99_ratio": TARGET_P99,
                "meets_throughput": ratio >= TARGET_THROUGHPUT,
                "meets_p99": p99 <= TARGET_P99,
            }
        )
    )


if __name__ == "__main__":
    main()
