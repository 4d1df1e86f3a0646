"""Batched decoding across requests that use different experts, with token streaming,
per-request deadlines and a bounded queue.

Design decisions:

- One model per replica runs one batch at a time. Requests wait in a bounded pending list;
  a full list refuses new requests with RESOURCE_EXHAUSTED instead of queueing without end.
- Scheduling is ``continuous`` (the default) or ``static``. Continuous: before every decode
  step, the oldest waiting requests that fit are prefilled as a group and join the running
  batch (``SmartPathModel.join`` → :class:`~smartpath.model.generation.DecodeBatch`);
  finished, expired and abandoned requests leave it; a request's tokens are the same as
  decoded alone (greedy). Static: a batch runs to its end and requests arriving meanwhile
  form the next one. Either way a batch starts when ``max_batch_size`` requests wait or
  ``batch_wait_s`` after the first one arrived (0, the default: at once when idle), and holds
  at most ``max_batch_size`` requests and ``max_batch_tokens`` prompt + new tokens of its
  running requests (the KV cache it can grow to); admission is in arrival order (the first
  request that does not fit waits, and those after it). A request that alone exceeds the
  budget is refused with INVALID_ARGUMENT. Every request keeps its own experts and gate
  weights (the model's batched mixed-LoRA generation), its own ``max_new_tokens`` and its own
  deadline; in continuous mode also its own temperature (static: the batch's highest).
- Continuous mode's worker thread takes waiting requests itself between steps, so the pending
  list is guarded by a lock. It runs while requests run or wait, then returns to the asyncio
  worker, which wakes it again on the next arrival.
- Generation runs in a worker thread; tokens reach each caller's asyncio queue as text deltas
  (byte-level BPE can end mid-character, so a delta waits until its text is complete).
- A request whose deadline passed, or whose caller went away, leaves the batch at the next
  step (static: ``generate_stream(cancelled=…)``; continuous: ``DecodeBatch.drop``); the
  others continue unchanged.
- Classification also gets per-label probabilities (continuous: as soon as the request
  finishes, between two steps; static: after the batch): teacher-forced forwards over the
  candidate completions ``<think>{think}</think><answer>{label}</answer><|im_end|>``, softmaxed
  over their summed log-probabilities (the shared think prefix cancels out). Labels go
  ``label_chunk`` rows per forward, and only the completions' positions are projected onto the
  vocabulary, so scoring 2000 labels with a 152k vocabulary stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from smartpath.core.config import DecoderDeploymentConfig
from smartpath.core.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from smartpath.model.experts import ExpertRouting
from smartpath.model.generation import DecodeBatch
from smartpath.model.grammar import Scale, Task, format_completion, split_completion
from smartpath.model.logprobs import sequence_logprobs
from smartpath.model.mllm import MultimodalBatch, SmartPathModel
from smartpath.model.tokenizer import IM_END
from smartpath.model.vision import question_ids
from smartpath.services.contracts import FINISH_LENGTH, FINISH_STOP, DecodeEvent, DecodeRequest


@dataclass(eq=False)
class _Job:
    request: DecodeRequest
    prompt_ids: list[int]
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False  # no more tokens for it (stopped, at its limit, gone or expired)
    answered: bool = False  # its final event or error was sent
    gone: bool = False  # the caller stopped listening
    queue_s: float = 0.0  # waited before decoding started
    batch_size: int = 0  # requests in its batch when it started (continuous: after joining)

    def expired(self) -> bool:
        d = self.request.deadline
        return d is not None and time.time() > d

    def send(self, item: DecodeEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


Scheduling = Literal["static", "continuous"]


@dataclass
class DecoderStats:
    """Hooks through which the deployment exports metrics (batch sizes, queue time, tokens)."""

    on_batch: Callable[[int, list[float]], None] | None = None  # (size, queue seconds)
    on_tokens: Callable[[int, float], None] | None = None  # (tokens, seconds)


class BatchDecoder:
    """The decoding engine of one replica (see module docstring)."""

    def __init__(
        self,
        model: SmartPathModel,
        *,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.0,
        max_pending: int = 64,
        max_batch_tokens: int = 65536,
        label_chunk: int = 16,
        stats: DecoderStats | None = None,
        scheduling: Scheduling = "continuous",
    ) -> None:
        if scheduling not in ("static", "continuous"):
            raise ValueError(f"scheduling must be 'static' or 'continuous', got {scheduling!r}")
        self.model = model
        self.scheduling = scheduling
        self.tokenizer = model.tokenizer
        self.default_labels = model.cfg.labels
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.label_chunk = label_chunk
        self.batch_wait_s = batch_wait_s
        self.max_pending = max_pending
        self.stats = stats or DecoderStats()
        self.eos_id = int(self.tokenizer.convert_tokens_to_ids(IM_END))
        _ = model.grammar  # built at start-up, not on the first constrained request
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.hidden = model.hidden_size
        self.num_experts = int(model.cfg.experts.num_experts)
        self._pending: list[_Job] = []
        self._lock = threading.Lock()  # _pending: the continuous worker thread takes from it
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @classmethod
    def from_config(
        cls,
        model: SmartPathModel,
        config: DecoderDeploymentConfig,
        stats: DecoderStats | None = None,
    ) -> BatchDecoder:
        """The engine with the decoder deployment's batching, queue and budget settings."""
        return cls(
            model,
            max_batch_size=config.max_batch_size,
            batch_wait_s=config.batch_wait_timeout_s,
            max_pending=config.max_pending,
            max_batch_tokens=config.max_batch_tokens,
            label_chunk=config.label_chunk,
            stats=stats,
            scheduling=config.scheduling,
        )

    # -- requests --------------------------------------------------------------------------
    def _check(self, request: DecodeRequest) -> None:
        tokens = request.visual.tokens
        if tokens.ndim != 2 or tokens.shape[1] != self.hidden or tokens.shape[0] < 1:
            raise InvalidArgumentError(
                f"visual tokens must be (n >= 1, {self.hidden}), got {tokens.shape}"
            )
        if request.question.scale == Scale.ROI and request.visual.image_grid_thw is None:
            raise InvalidArgumentError("ROI visual tokens need their image_grid_thw")
        if request.question.scale == Scale.WSI and tokens.shape[0] != self.model.slide_tokens:
            raise InvalidArgumentError(
                f"a slide is {self.model.slide_tokens} tokens, got {tokens.shape[0]}"
            )
        if not request.experts or len(request.experts) != len(request.weights):
            raise InvalidArgumentError("experts and weights must be non-empty and equally long")
        if any(not 0 <= e < self.num_experts for e in request.experts):
            raise InvalidArgumentError(f"experts must be in [0, {self.num_experts})")

    def _prompt(self, request: DecodeRequest) -> list[int]:
        return question_ids(
            self.tokenizer,
            request.question.text(self.default_labels, self.model.cfg.prompt_style),
            slide=request.question.scale == Scale.WSI,
            visual_tokens=int(request.visual.tokens.shape[0]),
        )

    async def complete(self, request: DecodeRequest) -> DecodeEvent:
        """The final event of :meth:`decode` (the whole text), for callers that need no stream."""
        final = None
        async for event in self.decode(request):
            final = event
        assert final is not None and final.done
        return final

    async def decode(self, request: DecodeRequest) -> AsyncIterator[DecodeEvent]:
        """Stream the completion of ``request``: text deltas, then a final ``done`` event."""
        self._check(request)
        ids = self._prompt(request)
        needed = len(ids) + request.question.max_new_tokens
        if needed > self.max_batch_tokens:
            raise InvalidArgumentError(
                f"the request needs {needed} tokens (prompt {len(ids)} + max_new_tokens "
                f"{request.question.max_new_tokens}) but a decoder batch holds at most "
                f"{self.max_batch_tokens} (serve.decoder.max_batch_tokens)"
            )
        loop = asyncio.get_running_loop()
        job = _Job(request, ids, asyncio.Queue(), loop)
        with self._lock:
            if len(self._pending) >= self.max_pending:
                raise ResourceExhaustedError(
                    f"decoder queue is full ({self.max_pending} requests waiting); retry later"
                )
            self._pending.append(job)
        self._ensure_worker()
        try:
            while True:
                timeout = None
                if request.deadline is not None:
                    timeout = max(0.0, request.deadline - time.time())
                try:
                    item = await asyncio.wait_for(job.queue.get(), timeout)
                except TimeoutError:
                    raise DeadlineExceededError("the request ran past its deadline") from None
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            job.gone = True
            with self._lock, contextlib.suppress(ValueError):
                self._pending.remove(job)

    # -- batching loop -----------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                if len(self._pending) < self.max_batch_size and self.batch_wait_s > 0:
                    await asyncio.sleep(self.batch_wait_s)
                if self.scheduling == "continuous":
                    await asyncio.to_thread(self._run_continuous)
                    continue
                batch = self._next_batch()
                if batch:
                    await asyncio.to_thread(self._run_safely, batch)

    @staticmethod
    def _cost(job: _Job) -> int:
        return len(job.prompt_ids) + job.request.question.max_new_tokens

    def _take(self, slots: int, tokens: int) -> list[_Job]:
        """Take the oldest waiting requests that fit ``slots`` rows and ``tokens`` (prompt + new
        tokens), in arrival order: the first that does not fit waits, and so do those after it."""
        with self._lock:
            self._pending = [j for j in self._pending if not (j.gone or j.expired())]
            batch: list[_Job] = []
            for job in self._pending[: max(slots, 0)]:
                if self._cost(job) > tokens:
                    break
                batch.append(job)
                tokens -= self._cost(job)
            del self._pending[: len(batch)]
        return batch

    def _next_batch(self) -> list[_Job]:
        """Take the oldest waiting requests that fit the batch size and token budget (a request
        alone always fits: :meth:`decode` refuses larger ones)."""
        return self._take(self.max_batch_size, self.max_batch_tokens)

    def _run_safely(self, jobs: list[_Job]) -> None:
        try:
            self._run(jobs)
        except BaseException as e:  # a bug must fail these requests, never the replica
            for job in jobs:
                if not job.answered:  # also one that finished generating but awaits its scores
                    job.finished = job.answered = True
                    job.send(e)

    # -- one batch (worker thread) -----------------------------------------------------------
    def _batch(self, rows: Sequence[tuple[list[int], DecodeRequest]]) -> MultimodalBatch:
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        images, grids, slides = [], [], []
        for i, (ids, req) in enumerate(rows):
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            mask[i, length - len(ids) :] = 1
            tokens = torch.from_numpy(np.ascontiguousarray(req.visual.tokens, dtype=np.float32))
            if req.question.scale == Scale.WSI:
                slides.append(tokens)
            else:
                slides.append(None)
                images.append(tokens)
                grids.append(torch.tensor([req.visual.image_grid_thw], dtype=torch.long))
        return MultimodalBatch(
            input_ids=input_ids,
            attention_mask=mask,
            task_ids=torch.tensor([int(r.question.task) for _, r in rows]),
            scale_ids=torch.tensor([int(r.question.scale) for _, r in rows]),
            image_grid_thw=torch.cat(grids) if grids else None,
            image_embeds=torch.cat(images) if images else None,
            slides=slides if any(s is not None for s in slides) else None,
        )

    @staticmethod
    def _routing(requests: Sequence[DecodeRequest]) -> list[ExpertRouting]:
        return [
            ExpertRouting(torch.tensor([r.experts]), torch.tensor([r.weights], dtype=torch.float))
            for r in requests
        ]

    def _run(self, jobs: list[_Job]) -> None:
        start = time.monotonic()
        for job in jobs:
            job.queue_s, job.batch_size = start - job.enqueued, len(jobs)
        if self.stats.on_batch is not None:
            self.stats.on_batch(len(jobs), [j.queue_s for j in jobs])
        batch = self._batch([(j.prompt_ids, j.request) for j in jobs])
        limits = [j.request.question.max_new_tokens for j in jobs]
        temperature = max(j.request.temperature for j in jobs)

        def cancelled(i: int) -> bool:
            job = jobs[i]
            if job.gone or job.expired():
                job.finished = True
                return True
            return len(job.ids) >= limits[i]

        produced = 0
        for i, token in self.model.generate_stream(
            batch,
            max_new_tokens=max(limits),
            temperature=temperature,
            eos_token_id=self.eos_id,
            routing=self._routing([j.request for j in jobs]),
            cancelled=cancelled,
            constraints=[j.request.question.constraint(self.default_labels) for j in jobs],
        ):
            produced += 1
            job = jobs[i]
            if job.finished:
                continue
            self._accept(job, token)
            if job.finished and job.request.question.task != Task.CLASSIFICATION:
                self._finish(job)
        if self.stats.on_tokens is not None:
            self.stats.on_tokens(produced, time.monotonic() - start)
        for job in jobs:
            if job.gone or job.expired():
                continue
            if job.request.question.task == Task.CLASSIFICATION:
                self._finish(job, self._label_scores(job))

    # -- continuous batching (worker thread) -----------------------------------------------------
    def _run_continuous(self) -> None:
        """Decode until no request runs or waits: at every step, waiting requests that fit are
        prefilled and join the running batch, finished, expired and abandoned ones leave."""
        running = self.model.decode_batch(eos_token_id=self.eos_id)
        rows: dict[int, _Job] = {}  # key in ``running`` → job
        admitted: dict[int, _Job] = {}  # not answered yet (failed together on a bug)
        keys = iter(range(1 << 62))
        try:
            while True:
                gone = [k for k, j in rows.items() if j.gone or j.expired()]
                for k in gone:
                    rows.pop(k).finished = True
                    admitted.pop(k)
                running.drop(gone)
                budget = self.max_batch_tokens - sum(self._cost(j) for j in rows.values())
                group = self._take(self.max_batch_size - len(rows), budget)
                if group:
                    new = {next(keys): job for job in group}
                    admitted.update(new)
                    rows.update(new)
                    self._join(running, new, len(rows))
                    self._settle(running, rows, admitted)
                if not rows:
                    if group:
                        continue  # all of them finished at their first token
                    with self._lock:
                        if not any(not j.gone for j in self._pending):
                            return
                    continue
                start = time.monotonic()
                tokens = running.step()
                for key, token in tokens:
                    self._accept(rows[key], token)
                if self.stats.on_tokens is not None:
                    self.stats.on_tokens(len(tokens), time.monotonic() - start)
                self._settle(running, rows, admitted)
        except BaseException as e:  # a bug must fail these requests, never the replica
            for job in admitted.values():
                if not job.answered:
                    job.finished = job.answered = True
                    job.send(e)

    def _join(self, running: DecodeBatch, group: dict[int, _Job], size: int) -> None:
        """Prefill ``group`` (with its images/slides and experts) into the running batch."""
        now = time.monotonic()
        for job in group.values():
            job.queue_s, job.batch_size = now - job.enqueued, size
            job.finished = job.request.question.max_new_tokens < 1  # nothing to generate
        if self.stats.on_batch is not None:
            self.stats.on_batch(size, [j.queue_s for j in group.values()])
        group = {k: j for k, j in group.items() if not j.finished}
        if not group:
            return
        jobs = list(group.values())
        start = time.monotonic()
        first = self.model.join(
            running,
            list(group),
            self._batch([(j.prompt_ids, j.request) for j in jobs]),
            max_new_tokens=[j.request.question.max_new_tokens for j in jobs],
            temperature=[j.request.temperature for j in jobs],
            routing=self._routing([j.request for j in jobs]),
            constraints=[j.request.question.constraint(self.default_labels) for j in jobs],
        )
        for key, token in first:
            self._accept(group[key], token)
        if self.stats.on_tokens is not None:
            self.stats.on_tokens(len(first), time.monotonic() - start)

    def _accept(self, job: _Job, token: int) -> None:
        """One generated token of ``job``: streamed as a text delta; marks it finished."""
        job.ids.append(token)
        delta = self._delta(job)
        if delta:
            job.send(DecodeEvent(text_delta=delta))
        if token == self.eos_id or len(job.ids) >= job.request.question.max_new_tokens:
            job.finished = True

    def _settle(
        self, running: DecodeBatch, rows: dict[int, _Job], admitted: dict[int, _Job]
    ) -> None:
        """Answer the requests that finished (label scores first for classification)."""
        done = [k for k, j in rows.items() if j.finished]
        running.drop(done)  # normally gone already: the batch stops rows at EOS or their limit
        for key in done:
            job = rows.pop(key)
            if not (job.gone or job.expired()):
                scores = None
                if job.request.question.task == Task.CLASSIFICATION:
                    scores = self._label_scores(job)
                self._finish(job, scores)
            admitted.pop(key)

    def _completion(self, job: _Job) -> str:
        ids = job.ids[:-1] if job.ids and job.ids[-1] == self.eos_id else job.ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _delta(self, job: _Job) -> str:
        text = self._completion(job)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return ""
        delta, job.text = text[len(job.text) :], text
        return delta

    def _finish(self, job: _Job, scores: list[tuple[str, float]] | None = None) -> None:
        text = self._completion(job)
        tail = text[len(job.text) :]
        stopped = bool(job.ids) and job.ids[-1] == self.eos_id
        job.answered = True
        job.send(
            DecodeEvent(
                text_delta=tail,
                done=True,
                finish_reason=FINISH_STOP if stopped else FINISH_LENGTH,
                text=text,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(job.ids),
                label_scores=scores or [],
                queue_s=job.queue_s,
                batch_size=job.batch_size,
            )
        )

    def _label_scores(self, job: _Job) -> list[tuple[str, float]]:
        """P(label) over the candidate labels, given the prompt and the generated think."""
        labels = job.request.question.effective_labels(self.default_labels)
        if not labels:
            return []
        think = split_completion(self._completion(job)).think or ""
        completions = [
            self.tokenizer(format_completion(think, label) + IM_END, add_special_tokens=False)[
                "input_ids"
            ]
            for label in labels
        ]
        logps: list[torch.Tensor] = []
        for start in range(0, len(labels), self.label_chunk):
            chunk = completions[start : start + self.label_chunk]
            batch = self._batch([(job.prompt_ids + list(c), job.request) for c in chunk])
            keep = max(len(c) for c in chunk) + 1  # positions whose logits score completions
            ids = batch.input_ids[:, -keep:]
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for i, c in enumerate(chunk):
                mask[i, keep - len(c) :] = True
            routing = ExpertRouting.cat(self._routing([job.request] * len(chunk)))
            with torch.no_grad():
                logits = self.model(batch, routing=routing, logits_to_keep=keep).logits
            logps.append(
                sequence_logprobs(logits, ids.to(logits.device), mask.to(logits.device)).sum(-1)
            )
        probs = torch.softmax(torch.cat(logps).float(), dim=0).cpu().tolist()
        return list(zip(labels, probs, strict=True))
