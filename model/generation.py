"""Batched generation in which every request has its own mixture of LoRA experts.

Design decisions:

- One forward per step for the whole batch; the per-request expert mix is applied inside each
  :class:`~smartpath.model.experts.MixtureLoRALinear` by batched gathers and matmuls, so a batch
  mixing different experts costs about what a single-adapter batch costs.
- Prompts are left-padded with an attention mask and decoded with the model's KV cache
  (``use_cache=True``; the cache object the model returns is fed back). Positions are explicit:
  ``cumsum(mask) - 1`` for the prompt, then one more per step, so padding never shifts a
  request's positions. Qwen2.5-VL uses multimodal RoPE with (3, B, T) position ids; for text
  only the three rows (time, height, width) are equal, and we pass them so (other causal LMs get
  (B, T)). ``logits_to_keep=1`` avoids the vocabulary projection of every prompt position.
- A request finishes on its own when it emits a stop token (e.g. ``</answer>``) or the EOS id;
  that token is part of its output (as with transformers' ``generate``). Finished requests are
  dropped from the batch: their rows leave the KV cache (``batch_select_indices``), the mask,
  and the routing, so the remaining requests run a smaller batch.
- Sampling: temperature 0 = greedy (argmax, lowest id on ties); otherwise temperature + top-p
  (nucleus) with one ``torch.Generator`` seeded by ``seed``, so a call is reproducible. Samples
  depend on the batch composition (one generator for the batch), not only on the request.
- Continuous (iteration-level) batching: :class:`DecodeBatch` is the running batch.
  ``add`` prefills a group of new requests in a fresh cache (their own left padding and
  routing), samples their first tokens, then merges the group into the running batch: the
  shorter of the two KV caches and masks is padded on the left (zero keys/values, mask 0) to
  the longer, and both are concatenated along the batch; positions are explicit per row, so
  this padding never shifts them. Routing rows (``ExpertRouting.cat``) and grammar matchers
  are concatenated too. ``step`` decodes one token for every row; rows leave at a stop token,
  at their own ``max_new_tokens`` or by ``drop``, and cache columns that have become padding
  for every remaining row are cut, so the cache stays as long as the longest live request
  (prompt + generated). transformers has no public call to concatenate or left-pad caches,
  so the merge writes each ``DynamicLayer``'s ``keys``/``values`` (full attention only).
  :func:`generate_stream` is the static case: one group, joined at the start.
- Greedy tokens do not depend on when a request joined or with whom (tested exactly against
  each request alone). Each row has its own temperature; sampled tokens depend on the batch
  composition and on the join order (one generator for the batch).
- The routing is set on the model for each forward of a :class:`DecodeBatch` (and, in
  :func:`generate_stream`, for the whole call, also between its yields): don't run other
  forwards on the same model instance meanwhile.
- The model should be in eval mode (dropout would make decoding non-deterministic).
- Multimodal prompts prefill from embeddings: ``prefill_embeds`` (B, L, H) and
  ``prefill_positions`` (3, B, L) laid out like the left-padded prompts (SmartPathModel.embed
  builds both, with image features and slide tokens in place); later steps feed token ids at
  the last prompt position + 1, as Qwen2.5-VL's M-RoPE continues text after vision tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from smartpath.model.constrained import GrammarBatch
from smartpath.model.experts import (
    ExpertRouting,
    MixtureLoRALinear,
    apply_routing,
    expert_modules,
)

__all__ = ["DecodeBatch", "generate", "generate_stream", "sample_next"]

_MROPE_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _uses_mrope(model: nn.Module) -> bool:
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return model_type.startswith(_MROPE_MODEL_TYPES)


def _batch_routing(
    routing: ExpertRouting | Sequence[ExpertRouting | None] | None, batch: int
) -> ExpertRouting | None:
    if routing is None:
        return None
    if not isinstance(routing, ExpertRouting):
        if len(routing) != batch:
            raise ValueError(f"{len(routing)} routings for {batch} requests")
        if all(r is None for r in routing):
            return None
        routing = ExpertRouting.cat(list(routing))
    if routing.batch_size != batch:
        raise ValueError(f"routing is for {routing.batch_size} requests, got {batch} prompts")
    return routing


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Next token per row from logits (B, V): argmax if temperature ≤ 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, sorted_i = torch.sort(probs, dim=-1, descending=True)  # (B, V)
        # Drop a token when the tokens ranked before it already reach top_p (keeps ≥ 1).
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _left_pad(t: Tensor, length: int, dim: int) -> Tensor:
    """``t`` padded with zeros at the start of ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cache_layers(cache: Cache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    if not all(type(layer) is DynamicLayer for layer in layers):
        raise NotImplementedError("continuous batching needs a full-attention DynamicCache")
    return layers


def _set_routing(modules: Sequence[MixtureLoRALinear], routing: ExpertRouting | None) -> None:
    for m in modules:
        m.routing = routing


class DecodeBatch:
    """A running decode batch that requests join and leave at any step (continuous batching).

    :meth:`add` prefills a group of requests (their own fresh KV cache, their own routing) and
    merges the rows into the running batch; :meth:`step` runs one decode step for every running
    row; rows leave by themselves after a stop/EOS token or their ``max_new_tokens``, or
    through :meth:`drop`. Rows are known by caller-chosen ``keys``. Every forward sets the
    routing on the model's expert modules and restores it afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        suppress_token_ids: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.top_p = top_p
        self.pad_token_id = pad_token_id
        self.device = _device(model)
        self.stops = torch.tensor(
            sorted({*stop_token_ids, *([eos_token_id] if eos_token_id is not None else [])}),
            dtype=torch.long,
            device=self.device,
        )
        self.suppress = torch.tensor(
            sorted(set(suppress_token_ids)), dtype=torch.long, device=self.device
        )
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.mrope = _uses_mrope(model)
        self._modules = list(expert_modules(model).values())
        self._num_experts = self._modules[0].num_experts if self._modules else 0
        # Per running row, in batch order:
        self.keys: list[Hashable] = []
        self._cache: Cache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (b, T)
        self._last = torch.zeros(0, dtype=torch.long, device=self.device)  # last position (b,)
        self._next = torch.zeros(0, dtype=torch.long, device=self.device)  # token to feed (b,)
        self._temps = torch.zeros(0, device=self.device)  # (b,)
        self._left = torch.zeros(0, dtype=torch.long, device=self.device)  # tokens left (b,)
        self._routing: list[ExpertRouting | None] = []
        self._batch_routing: ExpertRouting | None = None
        self._grammar: GrammarBatch | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    @property
    def cache_length(self) -> int:
        """Columns of the KV cache (the longest live prompt + generated, after trimming)."""
        return int(self._mask.shape[1])

    # -- forwards ----------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, routing: ExpertRouting | None, **inputs: Any) -> Any:
        previous = [m.routing for m in self._modules]
        _set_routing(self._modules, routing)
        try:
            return self.model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            for m, prev in zip(self._modules, previous, strict=True):
                m.routing = prev

    def _sample(self, logits: Tensor, temps: Tensor, grammar: GrammarBatch | None) -> Tensor:
        """Next token per row of logits (b, V), each row at its own temperature."""
        if self.suppress.numel():
            logits = logits.index_fill(-1, self.suppress, float("-inf"))
        if grammar:
            grammar.mask_(logits)
        values = temps.unique()
        if values.numel() == 1:
            tokens = sample_next(logits, float(values[0]), self.top_p, self.generator)
        else:
            tokens = logits.argmax(dim=-1)
            for t in values.tolist():
                if t > 0:
                    rows = (temps == t).nonzero().squeeze(-1)
                    tokens[rows] = sample_next(logits[rows], t, self.top_p, self.generator)
        if grammar:
            grammar.advance(tokens.tolist())
        return tokens

    def _routing_of(self, routing: list[ExpertRouting | None]) -> ExpertRouting | None:
        if all(r is None for r in routing):
            return None
        if not self._modules:
            raise ValueError("routing given but the model has no experts attached")
        batch = ExpertRouting.cat(routing)
        if batch.indices.numel() and (
            int(batch.indices.min()) < 0 or int(batch.indices.max()) >= self._num_experts
        ):
            raise ValueError(f"expert index out of range [0, {self._num_experts})")
        return batch.to(self._modules[0].lora_A.device)

    # -- joining -------------------------------------------------------------------------------
    def add(
        self,
        keys: Sequence[Hashable],
        input_ids: Sequence[Sequence[int]],
        routing: ExpertRouting | Sequence[ExpertRouting | None] | None = None,
        *,
        max_new_tokens: int | Sequence[int],
        temperature: float | Sequence[float] = 0.0,
        prefill_embeds: Tensor | None = None,
        prefill_positions: Tensor | None = None,
        grammar: GrammarBatch | None = None,
    ) -> list[tuple[Hashable, int]]:
        """Prefill a group of requests and merge it into the running batch; returns each
        request's first token as ``(key, token)``. Arguments are per request, as in
        :func:`generate_stream` (``max_new_tokens`` and ``temperature`` may differ per request).
        """
        prompts = [list(p) for p in input_ids]
        batch = len(prompts)
        if len(keys) != batch:
            raise ValueError(f"{len(keys)} keys for {batch} requests")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if len(set(keys)) != batch or set(keys) & set(self.keys):
            raise ValueError("keys must be unique among running requests")
        limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else max_new_tokens
        temps = [temperature] * batch if isinstance(temperature, int | float) else temperature
        if len(limits) != batch or len(temps) != batch:
            raise ValueError("one max_new_tokens and temperature per request")
        routing = _batch_routing(routing, batch)
        rows = [routing.select([i]) for i in range(batch)] if routing else [None] * batch
        if min(limits) < 1:
            raise ValueError("max_new_tokens must be at least 1 for every request")
        return self._add(
            list(keys), prompts, rows, limits, temps, prefill_embeds, prefill_positions, grammar
        )

    def _add(
        self,
        keys: list[Hashable],
        prompts: list[list[int]],
        routing: list[ExpertRouting | None],
        limits: Sequence[int],
        temps: Sequence[float],
        prefill_embeds: Tensor | None,
        prefill_positions: Tensor | None,
        grammar: GrammarBatch | None,
    ) -> list[tuple[Hashable, int]]:
        device, batch = self.device, len(prompts)
        length = max(len(p) for p in prompts)
        ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # left-padded
        mask = torch.zeros(batch, length, dtype=torch.long)  # (b, L) 1 = real token
        for i, p in enumerate(prompts):
            ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (b, L)
        if (prefill_embeds is None) != (prefill_positions is None):
            raise ValueError("prefill_embeds and prefill_positions go together")
        group_routing = self._routing_of(routing)
        if prefill_embeds is not None:
            if prefill_embeds.shape[:2] != (batch, length) or prefill_positions.shape != (
                3,
                batch,
                length,
            ):
                raise ValueError(
                    f"prefill must match the left-padded prompts (B={batch}, L={length}); got "
                    f"embeds {tuple(prefill_embeds.shape)} and positions "
                    f"{tuple(prefill_positions.shape)}"
                )
            positions = prefill_positions[0].to(device)  # text rows: the three M-RoPE rows agree
            inputs = {
                "inputs_embeds": prefill_embeds.to(device),
                "position_ids": prefill_positions.to(device),
            }
        else:
            pos = positions[None].expand(3, -1, -1) if self.mrope else positions
            inputs = {"input_ids": ids, "position_ids": pos}
        out = self._forward(group_routing, **inputs, attention_mask=mask, past_key_values=None)
        temps_t = torch.tensor(list(temps), dtype=torch.float, device=device)
        tokens = self._sample(out.logits[:, -1, :], temps_t, grammar)  # (b,)
        first = list(zip(keys, tokens.tolist(), strict=True))
        left = torch.tensor(list(limits), dtype=torch.long, device=device) - 1
        keep = (left > 0) & ~torch.isin(tokens, self.stops)
        if not bool(keep.any()):
            return first
        cache = out.past_key_values
        rows = keep.nonzero().squeeze(-1)
        if not bool(keep.all()):
            cache.batch_select_indices(rows)
            if grammar is not None:
                grammar.select(rows.tolist())
        kept = rows.tolist()
        self._merge(
            [keys[i] for i in kept],
            cache,
            mask[rows],
            positions[rows, -1],
            tokens[rows],
            temps_t[rows],
            left[rows],
            [routing[i] for i in kept],
            grammar,
        )
        return first

    def _merge(
        self,
        keys: list[Hashable],
        cache: Cache,
        mask: Tensor,
        last: Tensor,
        tokens: Tensor,
        temps: Tensor,
        left: Tensor,
        routing: list[ExpertRouting | None],
        grammar: GrammarBatch | None,
    ) -> None:
        """Append prefilled rows to the batch: the shorter KV cache and mask are padded on the
        left (zero keys/values, mask 0) to the longer one, then both are concatenated."""
        if self._cache is None or not self.keys:
            self._cache, self._mask = cache, mask
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(_cache_layers(self._cache), _cache_layers(cache), strict=True):
                old.keys = torch.cat(
                    [_left_pad(old.keys, length, 2), _left_pad(new.keys, length, 2)]
                )
                old.values = torch.cat(
                    [_left_pad(old.values, length, 2), _left_pad(new.values, length, 2)]
                )
            self._mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(mask, length, 1)])
        n_old = len(self.keys)
        self.keys += keys
        self._last = torch.cat([self._last, last])
        self._next = torch.cat([self._next, tokens])
        self._temps = torch.cat([self._temps, temps])
        self._left = torch.cat([self._left, left])
        self._routing += routing
        self._batch_routing = self._routing_of(self._routing)
        if grammar and self._grammar is None:
            grammar.matchers = [None] * n_old + grammar.matchers
            self._grammar = grammar
        elif self._grammar is not None:
            self._grammar.matchers += grammar.matchers if grammar else [None] * len(keys)

    # -- stepping and leaving --------------------------------------------------------------------
    def step(self) -> list[tuple[Hashable, int]]:
        """One decode step for every running row; returns ``(key, token)`` per row."""
        if not self.keys:
            return []
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.keys), 1)], dim=1)
        self._last = self._last + 1
        positions = self._last[:, None]  # (b, 1)
        pos = positions[None].expand(3, -1, -1) if self.mrope else positions
        out = self._forward(
            self._batch_routing,
            input_ids=self._next[:, None],
            attention_mask=self._mask,
            position_ids=pos,
            past_key_values=self._cache,
        )
        self._cache = out.past_key_values
        tokens = self._sample(out.logits[:, -1, :], self._temps, self._grammar)  # (b,)
        result = list(zip(self.keys, tokens.tolist(), strict=True))
        self._next = tokens
        self._left = self._left - 1
        keep = (self._left > 0) & ~torch.isin(tokens, self.stops)
        if not bool(keep.all()):
            self._keep(keep.nonzero().squeeze(-1))
        return result

    def drop(self, keys: Iterable[Hashable]) -> None:
        """Remove these requests from the batch (cancelled, deadline passed, caller gone)."""
        gone = set(keys)
        if gone & set(self.keys):
            rows = [i for i, k in enumerate(self.keys) if k not in gone]
            self._keep(torch.tensor(rows, dtype=torch.long, device=self.device))

    def _keep(self, rows: Tensor) -> None:
        kept = rows.tolist()
        self.keys = [self.keys[i] for i in kept]
        self._routing = [self._routing[i] for i in kept]
        if not kept:
            self._cache, self._batch_routing, self._grammar = None, None, None
            self._mask = self._mask[:0, :0]
            self._last, self._next = self._last[:0], self._next[:0]
            self._temps, self._left = self._temps[:0], self._left[:0]
            return
        self._cache.batch_select_indices(rows)
        self._mask, self._last, self._next = self._mask[rows], self._last[rows], self._next[rows]
        self._temps, self._left = self._temps[rows], self._left[rows]
        if self._batch_routing is not None:
            self._batch_routing = self._routing_of(self._routing)
        if self._grammar is not None:
            self._grammar.select(kept)
        # Columns that are padding for every remaining row go, so the cache stays bounded.
        start = int(self._mask.any(0).int().argmax())
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in _cache_layers(self._cache):
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]


@torch.no_grad()
def generate_stream(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    routing: ExpertRouting | Sequence[ExpertRouting | None] | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    suppress_token_ids: Sequence[int] = (),
    prefill_embeds: Tensor | None = None,
    prefill_positions: Tensor | None = None,
    cancelled: Callable[[int], bool] | None = None,
    grammar: GrammarBatch | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield ``(request_index, token_id)`` for every request still running, step by step.

    ``input_ids``: one token-id list per request (no padding). ``routing``: an
    :class:`ExpertRouting` for the whole batch, or one per request (None = base model for that
    request), or None (base model for all). A request is finished after it yields a stop/EOS
    token or ``max_new_tokens`` tokens. ``suppress_token_ids`` are never sampled (e.g. the
    image/slide placeholders, which only the prompt builder may place). ``cancelled(i)`` is
    asked after every step for each running request; a request it answers True for leaves the
    batch like a finished one (deadlines, callers that went away). ``grammar`` holds one
    matcher per request (None: unconstrained): each request samples only tokens its grammar
    allows. This is the static batch: every request joins at the start (see
    :class:`DecodeBatch` for requests that join a running batch).
    """
    prompts = [list(p) for p in input_ids]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0 or not prompts:
        return
    engine = DecodeBatch(
        model,
        top_p=top_p,
        seed=seed if temperature > 0 else None,
        stop_token_ids=stop_token_ids,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        suppress_token_ids=suppress_token_ids,
    )
    # The batch's routing stays on the model between yields too (the engine's own forwards
    # set theirs and restore this one).
    with apply_routing(model, _batch_routing(routing, len(prompts))):
        yield from engine.add(
            list(range(len(prompts))),
            prompts,
            routing,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            prefill_embeds=prefill_embeds,
            prefill_positions=prefill_positions,
            grammar=grammar,
        )
        while engine:
            if cancelled is not None:
                engine.drop([i for i in engine.keys if cancelled(i)])
                if not engine:
                    break
            yield from engine.step()


def generate(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]],
    routing: ExpertRouting | Sequence[ExpertRouting | None] | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    suppress_token_ids: Sequence[int] = (),
    grammar: GrammarBatch | None = None,
) -> list[list[int]]:
    """Generate for every request; returns each request's new tokens (stop token included).

    Same arguments as :func:`generate_stream`.
    """
    outputs: list[list[int]] = [[] for _ in input_ids]
    for row, token in generate_stream(
        model,
        input_ids,
        routing,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_token_ids=stop_token_ids,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        suppress_token_ids=suppress_token_ids,
        grammar=grammar,
    ):
        outputs[row].append(token)
    return outputs
