"""Task-aware GRPO as a Ray Train + DeepSpeed job: ``python -m smartpath.training.grpo --config F``.

Design decisions:

- Start and reference: the policy starts from ``grpo.init`` (default: this run's SFT model); a
  second, frozen copy of that model is the KL reference. Old log-probs are the policy's own,
  computed without gradient right after the rollouts (so with one update per rollout the ratio
  starts at 1 and the clip only matters for ``updates_per_rollout`` > 1, as in GRPO).
- Each worker rolls out ``prompts_per_step`` scale-balanced prompts × G samples in one batched
  mixed-expert generation (see :mod:`smartpath.training.rollout`), scores them with the task
  rewards, normalises advantages within each prompt's group, and updates with the clipped
  surrogate + β·k3 KL. The router keeps its load-balancing term.
- Logged per step: mean reward, task reward per task/scale key, format rate, KL, clip fraction,
  completion length and rollout/update times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from smartpath.model.mllm import SmartPathModel
from smartpath.services.config import SmartPathConfig
from smartpath.services.storage import make_store
from smartpath.training.collate import Collator
from smartpath.training.config import GrpoConfig
from smartpath.training.data import load_items
from smartpath.training.engine import DeepSpeedRun, finish_stage, trainable_parameters
from smartpath.training.objectives import grpo_loss
from smartpath.training.rewards import format_reward
from smartpath.training.rollout import (
    Rollouts,
    completion_logprobs,
    policy_batch,
    rollout,
    to_device,
)
from smartpath.training.sft import step_batch

__all__ = ["grpo_update", "main", "train_loop"]

STAGE = "grpo"


def grpo_update(
    policy: Callable[..., Any],
    model: SmartPathModel,
    reference: SmartPathModel,
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
    ``model`` is the bare policy for the no-grad old log-probs. Returns the last loss and its
    stats (plus ``completion_tokens``, the mean generated length).
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


def train_loop(loop_config: dict) -> None:
    """The per-worker GRPO loop (runs inside Ray Train)."""
    import ray.train

    config: SmartPathConfig = loop_config["config"]
    t = config.training
    g = t.grpo
    rank = ray.train.get_context().get_world_rank()
    store = make_store(config.storage)
    init = g.init or t.model_uri("sft")
    policy = SmartPathModel.load(init, store)
    reference = SmartPathModel.load(init, store).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(policy, g.train_base)
    batch_rows = g.prompts_per_step * g.group_size
    run = DeepSpeedRun(
        policy, params, g.optim, t.distributed, batch_size=batch_rows, total_steps=g.steps
    )
    reference.to(run.device, dtype=run.dtype or torch.float32)
    items = load_items(t.data.manifests, t.data.train_split, store)
    collator = Collator(run.model.cfg, run.model.tokenizer, run.model.slide_tokens)
    start, history = run.restore()
    for step in range(start, g.steps):
        tic = time.perf_counter()
        prompts = step_batch(items, t, rank, step, g.prompts_per_step, t.data.task_weights)
        rolls = rollout(
            run.model,
            collator,
            prompts,
            group_size=g.group_size,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=(t.seed * 7919 + rank) * 100_003 + step,
            format_weight=g.format_weight,
            device=run.device,
            dtype=run.dtype,
        )
        rollout_s = time.perf_counter() - tic
        lr = run.lr
        loss, stats = grpo_update(
            run.engine, run.model, reference, collator, rolls, g,
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
        row = run.all_reduce_mean(values)
        row.update(
            step=step + 1,
            resumes=run.resumes,
            lr=lr,
            rollout_s=rollout_s,
            step_s=time.perf_counter() - tic,
        )
        run.record(
            row,
            history,
            step=step + 1,
            total_steps=g.steps,
            checkpoint_every=t.checkpoint_every,
            report_every=t.report_every,
        )
    finish_stage(run, config, STAGE, history)


def main(argv: list[str] | None = None) -> None:
    """``python -m smartpath.training.grpo --config config.yaml``."""
    from smartpath.training.engine import stage_main

    stage_main(STAGE, train_loop, argv)


if __name__ == "__main__":
    main()
