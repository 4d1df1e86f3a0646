"""Task-aware GRPO, the ``grpo`` stage of the training engine (:mod:`smartpath.training.engine`
runs it on Ray Train + DeepSpeed): ``python -m smartpath.training.grpo --config F``.

Design decisions:

- Start and reference: the policy starts from ``grpo.init`` (default: this run's SFT model),
  and that starting model is the KL reference. Only the trainable parameters ever differ
  between the two (experts, router, aggregator, image positions; the base stays frozen), so
  the reference is a frozen copy of just those tensors, made on the device once DeepSpeed has
  placed and cast the policy (:class:`ReferencePolicy`), not a second 7B model: its forward
  is the policy module's own forward with the copies swapped in by
  ``torch.func.functional_call`` (no gradient, eval mode; the policy's parameters are never
  written, so DeepSpeed's ZeRO-2 buffers and hooks are untouched). The copy is made before a
  resumed run restores its checkpoint, so it is always the starting model.
- Old log-probs are the policy's own, computed without gradient right after the rollouts (so
  with one update per rollout the ratio starts at 1 and the clip only matters for
  ``updates_per_rollout`` > 1, as in GRPO).
- Each worker rolls out ``prompts_per_step`` scale-balanced prompts × G samples in one batched
  mixed-expert generation (see :mod:`smartpath.training.rollout`), scores them with the rewards
  ``grpo.rewards`` names (looked up in :data:`smartpath.training.rewards.REWARDS`; unknown names
  are refused before any worker starts), normalises advantages within each prompt's group, and
  updates with the clipped surrogate + β·k3 KL. The router keeps its load-balancing term.
- Logged per step: mean reward, task reward per task/scale key, format rate, KL, clip fraction,
  completion length and rollout/update times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from smartpath.core.config import SmartPathConfig
from smartpath.core.config.training import GrpoConfig
from smartpath.model.mllm import MultimodalBatch, SmartPathModel, SmartPathOutput
from smartpath.training.collate import Collator
from smartpath.training.engine import DeepSpeedRun, Stage, StepMetrics, register_stage, stage_main
from smartpath.training.objectives import grpo_loss
from smartpath.training.rewards import format_reward, get_rewards
from smartpath.training.rollout import (
    Rollouts,
    completion_logprobs,
    policy_batch,
    rollout,
    to_device,
)
from smartpath.training.sft import step_batch

__all__ = ["GrpoStage", "ReferencePolicy", "grpo_update", "main"]


class ReferencePolicy:
    """GRPO's frozen KL reference as a copy of only the policy's trainable tensors.

    ``module`` is the policy (the bare SmartPathModel, not a DeepSpeed engine); every parameter
    that requires grad when the reference is made is copied (detached, same device and dtype).
    Calling the reference runs ``module``'s forward with those copies in place of the live
    parameters (``torch.func.functional_call``), in eval mode and without gradient; the
    policy's own parameters and mode are as before afterwards. Frozen parameters and buffers
    are shared with the policy, so this holds ``numel`` elements, not a second model.
    """

    def __init__(self, module: SmartPathModel) -> None:
        self.module = module
        self.tensors: dict[str, Tensor] = {
            name: param.detach().clone()
            for name, param in module.named_parameters()
            if param.requires_grad
        }

    @property
    def numel(self) -> int:
        """Elements held by the reference (the trainable parameters' count)."""
        return sum(t.numel() for t in self.tensors.values())

    def __call__(self, batch: MultimodalBatch, **kwargs: Any) -> SmartPathOutput:
        """The reference model's forward on ``batch`` (keyword arguments as the model's)."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return functional_call(self.module, self.tensors, (batch,), kwargs, strict=False)
        finally:
            self.module.train(was_training)


def grpo_update(
    policy: Callable[..., Any],
    model: SmartPathModel,
    reference: Callable[..., SmartPathOutput],
    collator: Collator,
    rolls: Rollouts,
    g: GrpoConfig,
    *,
    backward: Callable[[Tensor], None],
    step: Callable[[], None],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Old and reference log-probs, then ``updates_per_rollout`` clipped-surrogate + KL updates.

    ``policy`` runs the forward with gradients (the DeepSpeed engine, or the model itself);
    ``model`` is the bare policy for the no-grad old log-probs; ``reference`` the frozen
    reference (a :class:`ReferencePolicy`, or any model called the same way). Returns the last
    loss and its stats (plus ``completion_tokens``, the mean generated length).
    """
    batch, labels = policy_batch(collator, rolls)
    batch = to_device(batch, device, dtype)
    labels = labels.to(device)
    with torch.no_grad():
        old, mask, _ = completion_logprobs(model, batch, labels, g.temperature)
        ref, _, _ = completion_logprobs(reference, batch, labels, g.temperature)
    advantages = rolls.advantages.to(device)
    model.train()
    for _ in range(g.updates_per_rollout):
        logprobs, _, aux = completion_logprobs(policy, batch, labels, g.temperature)
        loss, stats = grpo_loss(
            logprobs, old, ref, advantages, mask, clip_eps=g.clip_eps, kl_beta=g.kl_beta
        )
        backward(loss + aux)
        step()
    stats["completion_tokens"] = mask.sum(1).float().mean()
    return loss.detach(), stats


@register_stage
class GrpoStage(Stage):
    """GRPO on one worker: rollouts of scale-balanced prompts, scored, then clipped updates
    against a frozen reference."""

    name = "grpo"
    reference: ReferencePolicy

    @classmethod
    def check(cls, config: SmartPathConfig) -> None:
        get_rewards(config.training.grpo.rewards)

    @property
    def section(self) -> GrpoConfig:
        return self.config.training.grpo

    @property
    def rows_per_step(self) -> int:
        return self.section.prompts_per_step * self.section.group_size

    def build_model(self) -> SmartPathModel:
        """The policy, from ``grpo.init`` (default: this run's SFT model)."""
        init = self.section.init or self.config.training.model_uri("sft")
        return SmartPathModel.load(init, self.store)

    def attach(self, run: DeepSpeedRun) -> None:
        """Also copy the starting policy's trainable parameters, as DeepSpeed placed them on the
        device in the run's dtype, as the KL reference (before any checkpoint is restored)."""
        super().attach(run)
        self.reference = ReferencePolicy(run.model)

    def train_step(self, step: int) -> StepMetrics:
        t, g, run = self.config.training, self.section, self.run
        tic = time.perf_counter()
        prompts = step_batch(
            self.items, t, self.rank, step, g.prompts_per_step, t.data.task_weights
        )
        rolls = rollout(
            run.model,
            self.collator,
            prompts,
            group_size=g.group_size,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=(t.seed * 7919 + self.rank) * 100_003 + step,
            reward_weights=g.reward_weights(),
            device=run.device,
            dtype=run.dtype,
            constrained=g.constrained,
        )
        rollout_s = time.perf_counter() - tic
        loss, stats = grpo_update(
            run.engine, run.model, self.reference, self.collator, rolls, g,
            backward=run.backward, step=run.engine.step, device=run.device, dtype=run.dtype,
        )  # fmt: skip
        values = {
            "loss": float(loss),
            "reward": float(rolls.rewards.mean()),
            "task_reward": float(rolls.task_rewards.mean()),
            "format_rate": sum(format_reward(rolls.texts)) / len(rolls.texts),
            "kl": float(stats["kl"]),
            "clip_fraction": float(stats["clip_fraction"]),
            "completion_tokens": float(stats["completion_tokens"]),
        }
        values.update({f"reward/{k}": v for k, v in rolls.reward_by_key().items()})
        return StepMetrics(mean=values, local={"rollout_s": rollout_s})


def main(argv: list[str] | None = None) -> None:
    """``python -m smartpath.training.grpo --config config.yaml``."""
    stage_main(GrpoStage.name, argv)


if __name__ == "__main__":
    main()
