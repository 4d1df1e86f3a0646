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
- The routing is set on the model for the duration of the call (also between the streaming
  variant's yields): don't run other forwards on the same model instance meanwhile.
- The model should be in eval mode (dropout would make decoding non-deterministic).
- Multimodal prompts prefill from embeddings: ``prefill_embeds`` (B, L, H) and
  ``prefill_positions`` (3, B, L) laid out like the left-padded prompts (SmartPathModel.embed
  builds both, with image features and slide tokens in place); later steps feed token ids at
  the last prompt position + 1, as Qwen2.5-VL's M-RoPE continues text after vision tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from smartpath.model.constrained import GrammarBatch
from smartpath.model.experts import ExpertRouting, apply_routing, expert_modules

__all__ = ["generate", "generate_stream", "sample_next"]

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
    allows.
    """
    prompts = [list(p) for p in input_ids]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0 or not prompts:
        return
    batch = len(prompts)
    batch_routing = _batch_routing(routing, batch)
    device = _device(model)
    stops = torch.tensor(
        sorted({*stop_token_ids, *([eos_token_id] if eos_token_id is not None else [])}),
        dtype=torch.long,
        device=device,
    )
    suppress = torch.tensor(sorted(set(suppress_token_ids)), dtype=torch.long, device=device)
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    mrope = _uses_mrope(model)

    length = max(len(p) for p in prompts)
    ids = torch.full((batch, length), pad_token_id, dtype=torch.long)  # (B, L) left-padded
    mask = torch.zeros(batch, length, dtype=torch.long)  # (B, L) 1 = real token
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L)
    if (prefill_embeds is None) != (prefill_positions is None):
        raise ValueError("prefill_embeds and prefill_positions go together")
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
    active = torch.arange(batch, device=device)  # original request index of each row
    cache = None
    modules = list(expert_modules(model).values())

    with apply_routing(model, batch_routing):
        for step in range(max_new_tokens):
            pos = positions[None].expand(3, -1, -1) if mrope else positions  # (3, b, t) | (b, t)
            inputs = {"input_ids": ids}
            if step == 0 and prefill_embeds is not None:
                inputs = {"inputs_embeds": prefill_embeds.to(device)}
                pos = prefill_positions.to(device)
            out = model(
                **inputs,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]  # (b, V)
            if suppress.numel():
                logits = logits.index_fill(-1, suppress, float("-inf"))
            if grammar:
                grammar.mask_(logits)
            next_ids = sample_next(logits, temperature, top_p, generator)  # (b,)
            if grammar:
                grammar.advance(next_ids.tolist())
            yield from zip(active.tolist(), next_ids.tolist(), strict=True)
            if step == max_new_tokens - 1:
                break
            keep = ~torch.isin(next_ids, stops)  # (b,)
            if cancelled is not None:
                gone = [cancelled(i) for i in active.tolist()]
                keep &= ~torch.tensor(gone, dtype=torch.bool, device=keep.device)
            if not bool(keep.any()):
                break
            last = positions[:, -1:]  # (b, 1)
            if not bool(keep.all()):
                rows = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(rows)
                mask, last, next_ids, active = mask[rows], last[rows], next_ids[rows], active[rows]
                if grammar is not None:
                    grammar.select(rows.tolist())
                if batch_routing is not None:
                    batch_routing = batch_routing.select(rows)
                    for m in modules:
                        m.routing = batch_routing
            ids = next_ids[:, None]  # (b, 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (b, t + 1)
            positions = last + 1  # (b, 1)


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
