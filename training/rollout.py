"""GRPO rollouts: G sampled completions per prompt, scored, with group-normalised advantages.

Design decisions:

- Batched mixed-expert rollouts: the P prompts are repeated G times (prompt-major, trl's
  order) and generated in ONE batch with :meth:`SmartPathModel.generate`; each row runs with
  the experts its own router picked, so a batch mixing tasks and scales (hence expert sets)
  decodes together. ``sequential=True`` is the naive baseline the benchmark compares against:
  one prompt, one sample at a time.
- The reward is a weighted sum of rewards chosen by name from
  :data:`smartpath.training.rewards.REWARDS` (:func:`score`); GRPO's default is the task reward
  (exact match, IoU-matched F1, Dice, EM/token-F1) plus ``format_weight`` × the format reward,
  so the output grammar stays learnt while the task reward dominates. The task reward is always
  scored too, for the per-task logs.
- :func:`policy_batch` turns rollouts back into a left-padded training batch whose labels mark
  the generated tokens only, for the log-prob passes (old, reference and policy).
- Log-probs use logits divided by the sampling temperature, matching the distribution that
  produced the samples; only the completion positions are taken to float32 (a 7B model's
  152k-vocabulary logits over a whole image prompt would cost ~1 GiB per row in float32).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from smartpath.core.config.training import GrpoConfig
from smartpath.model.mllm import IGNORE_INDEX, MultimodalBatch, SmartPathModel, SmartPathOutput
from smartpath.model.tokenizer import IM_END
from smartpath.training.collate import Collator
from smartpath.training.data import Item, item_key
from smartpath.training.manifest import RoiSample, WsiSample, sample_constraint, sample_task
from smartpath.training.objectives import group_advantages
from smartpath.training.rewards import get_rewards

__all__ = ["Rollouts", "completion_logprobs", "policy_batch", "rollout", "score", "to_device"]


@dataclass
class Rollouts:
    """P prompts × G completions, prompt-major, with rewards and advantages (P·G,)."""

    items: list[Item]
    completions: list[list[int]]
    texts: list[str]
    rewards: Tensor
    task_rewards: Tensor
    advantages: Tensor
    group_size: int

    def reward_by_key(self) -> dict[str, float]:
        """Mean task reward per task/scale key (e.g. ``"detection/roi"``)."""
        sums: dict[str, list[float]] = {}
        for (sample, _), r in zip(self.items, self.task_rewards.tolist(), strict=True):
            sums.setdefault(item_key(sample), []).append(r)
        return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


def _decode(model: SmartPathModel, ids: Sequence[int]) -> str:
    text = model.tokenizer.decode(list(ids), skip_special_tokens=False)
    return text.split(IM_END, 1)[0]


def score(
    texts: Sequence[str],
    samples: Sequence[RoiSample | WsiSample],
    weights: Mapping[str, float],
) -> tuple[Tensor, Tensor]:
    """(reward, task reward) of each completion in ``texts`` against its sample: the reward is
    the sum of the rewards ``weights`` names (looked up in ``REWARDS``), each times its weight;
    the task reward is scored whether named or not, for the per-task logs. ValueError for an
    unknown name."""
    columns = dict(
        tasks=[sample_task(s) for s in samples],
        targets=[s.target for s in samples],
        labels=[s.labels for s in samples],
        options=[s.options for s in samples],
    )
    scores = {
        name: torch.tensor(reward(texts, **columns))
        for name, reward in get_rewards([*weights, "task"]).items()
    }
    total = sum((w * scores[name] for name, w in weights.items()), torch.zeros(len(texts)))
    return total, scores["task"]


def rollout(
    model: SmartPathModel,
    collator: Collator,
    prompts: Sequence[Item],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    reward_weights: Mapping[str, float] | None = None,
    sequential: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    constrained: bool = True,
) -> Rollouts:
    """Sample ``group_size`` completions for each prompt and :func:`score` them with
    ``reward_weights`` (reward name -> weight; None: GRPO's default), inputs moved to ``device``,
    pixels and slide features cast to ``dtype``, the model's; ``constrained`` decodes each
    within its sample's answer grammar."""
    items = [item for item in prompts for _ in range(group_size)]
    stop = model.tokenizer.convert_tokens_to_ids(IM_END)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=stop,
    )
    was_training = model.training
    model.eval()
    constraints = [sample_constraint(s, max_new_tokens) if constrained else None for s, _ in items]
    if sequential:
        completions = [
            model.generate(
                to_device(collator.prompts([item]), device, dtype),
                seed=None if seed is None else seed + i,
                constraints=constraints[i : i + 1],
                **kwargs,
            )[0]
            for i, item in enumerate(items)
        ]
    else:
        batch = to_device(collator.prompts(items), device, dtype)
        completions = model.generate(batch, seed=seed, constraints=constraints, **kwargs)
    model.train(was_training)
    texts = [_decode(model, ids) for ids in completions]
    weights = GrpoConfig().reward_weights() if reward_weights is None else reward_weights
    total, task = score(texts, [s for s, _ in items], weights)
    return Rollouts(
        items=items,
        completions=completions,
        texts=texts,
        rewards=total,
        task_rewards=task,
        advantages=group_advantages(total, group_size),
        group_size=group_size,
    )


def policy_batch(collator: Collator, rollouts: Rollouts) -> tuple[MultimodalBatch, Tensor]:
    """Prompt + generated tokens as a left-padded batch; labels hold the generated tokens."""
    encoded = []
    for (sample, visual), completion in zip(rollouts.items, rollouts.completions, strict=True):
        prompt, roi, slide = collator.encode_prompt(sample, visual)
        encoded.append((prompt + list(completion), len(completion), roi, slide))
    return collator._batch([s for s, _ in rollouts.items], encoded)


def completion_logprobs(
    model: Callable[..., SmartPathOutput],
    batch: MultimodalBatch,
    labels: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(per-token log-probs (B, T), completion mask (B, T), router aux loss) of ``model`` on a
    policy batch; ``model`` is a SmartPathModel, a DeepSpeed engine wrapping one, or anything
    called like one with the model as ``.module`` (the GRPO reference).

    Log-probs are float32 and aligned with the tokens (``out[:, t] = log p(tokens[:, t] | < t)``,
    0 outside the completion), as :func:`smartpath.model.logprobs.sequence_logprobs`, but only
    the completion positions' logits are taken to float32 (N_completion × V instead of B × T × V)
    and the model computes no LM loss over the whole sequence.
    """
    mask = labels != IGNORE_INDEX  # (B, T)
    out = model(batch)
    logits = out.logits[:, :-1]  # (B, T-1, V) position t-1 predicts token t
    shifted = mask[:, 1:]  # (B, T-1)
    picked = logits[shifted].float()  # (N, V)
    if temperature != 1.0:
        picked = picked / temperature
    targets = batch.input_ids[:, 1:][shifted]  # (N,)
    lp = picked.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    body = torch.zeros(shifted.shape, dtype=lp.dtype, device=lp.device)
    body = body.masked_scatter(shifted, lp)  # (B, T-1)
    logprobs = torch.cat([body.new_zeros(body.shape[0], 1), body], dim=1)  # (B, T)
    core = getattr(model, "module", model)
    aux = None
    if isinstance(core, SmartPathModel) and core.router is not None:
        aux = core.cfg.router.load_balance_weight * core.router.aux_loss(out.router)
    return logprobs, mask, aux


def to_device(batch: MultimodalBatch, device: torch.device | str, dtype: torch.dtype | None = None):
    """``batch`` on ``device``; float inputs (pixels, slide features) cast to ``dtype``."""
    device = torch.device(device)
    if device.type == "cpu" and dtype is None:
        return batch

    def floats(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

    slides = None
    if batch.slides is not None:
        slides = [
            None
            if s is None
            else type(s)(features=floats(s.features), coords=s.coords.to(device), mpp=s.mpp)
            for s in batch.slides
        ]
    return MultimodalBatch(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        task_ids=batch.task_ids.to(device),
        scale_ids=batch.scale_ids.to(device),
        pixel_values=floats(batch.pixel_values),
        image_grid_thw=None if batch.image_grid_thw is None else batch.image_grid_thw.to(device),
        slides=slides,
    )
