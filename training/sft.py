"""Scale-aware SFT, the ``sft`` stage of the training engine (:mod:`smartpath.training.engine`
runs it on Ray Train + DeepSpeed): ``python -m smartpath.training.sft --config F``.

Design decisions:

- Each worker draws its own scale-balanced batch per step (seeded by run seed, rank and step),
  collates chats with answer-only labels, and minimises the LM loss on the completion plus the
  router's load-balancing loss; the router learns the per-task/per-scale expert assignment
  from task and scale embeddings and the pooled visual tokens (gate weights stay in the graph).
  The LM loss is averaged per sequence, then over sequences (``objectives.sft_loss``).
- What trains: experts, aggregator and router; the base too when ``sft.train_base`` (the demo's
  randomly initialised tiny base has nothing to keep frozen). A frozen base stays in the run's
  dtype (bf16 on GPU) with no gradient or optimizer state; ``distributed.gradient_checkpointing``
  trades recomputation for activation memory (see :mod:`smartpath.training.memory`).
- The model is built from ``training.model`` (all ranks seed identically; DeepSpeed broadcasts
  rank 0's weights anyway), with the slide aggregator's pooled-statistics scaler fitted on the
  training slides, or loaded from ``training.sft_init``.
"""

from __future__ import annotations

import numpy as np
import torch

from smartpath.core.config.training import SftConfig, TrainingConfig
from smartpath.core.storage.base import ObjectStore
from smartpath.model.base import base_from_config
from smartpath.model.mllm import SlideInput, SmartPathModel
from smartpath.training.data import Item
from smartpath.training.engine import Stage, StepMetrics, register_stage, stage_main
from smartpath.training.objectives import sft_loss
from smartpath.training.rollout import to_device
from smartpath.training.sampling import ScaleBalancedSampler
from smartpath.training.stain import augment_items

__all__ = ["SftStage", "build_model", "main", "step_batch"]


def build_model(t: TrainingConfig, store: ObjectStore | None, items: list[Item]) -> SmartPathModel:
    """The model SFT starts from: ``sft_init`` if set, else built from ``model`` with the seed,
    its slide aggregator's pooled statistics fitted on the training slides in ``items``."""
    if t.sft_init is not None:
        return SmartPathModel.load(t.sft_init, store)
    torch.manual_seed(t.seed)
    base, tokenizer = base_from_config(t.model, store=store)
    model = SmartPathModel(t.model, base, tokenizer)
    slides = [inp.features for _, inp in items if isinstance(inp, SlideInput)]
    if slides:
        model.aggregator.fit_pooled_statistics(slides)
    return model


def step_batch(
    items: list[Item],
    t: TrainingConfig,
    rank: int,
    step: int,
    batch_size: int,
    task_weights: dict[str, float] | None = None,
) -> list[Item]:
    """The batch rank ``rank`` trains on at ``step``, its ROIs stain-jittered
    (``data.stain_jitter``): a pure function, so resume is exact."""
    sampler = ScaleBalancedSampler(
        [s.scale for s, _ in items],
        t.data.scale_weights,
        seed=t.seed * 9973 + rank,
        num_samples=batch_size,
        tasks=None if task_weights is None else [s.task for s, _ in items],
        task_weights=task_weights,
    )
    sampler.set_epoch(step)
    rng = np.random.default_rng((t.seed, rank, step))
    return augment_items([items[i] for i in sampler], rng, t.data.stain_jitter)


@register_stage
class SftStage(Stage):
    """SFT on one worker: a collated scale-balanced batch per step, LM loss + router aux loss."""

    name = "sft"

    @property
    def section(self) -> SftConfig:
        return self.config.training.sft

    @property
    def rows_per_step(self) -> int:
        return self.section.batch_size

    def build_model(self) -> SmartPathModel:
        return build_model(self.config.training, self.store, self.items)

    def train_step(self, step: int) -> StepMetrics:
        t, sft, run = self.config.training, self.section, self.run
        weights = sft.task_weights_at(step, t.data.task_weights)
        batch, labels = self.collator(
            step_batch(self.items, t, self.rank, step, sft.batch_size, weights)
        )
        batch = to_device(batch, run.device, run.dtype)
        run.engine.train()
        labels = labels.to(run.device)
        out = run.engine(batch)
        lm_loss = sft_loss(out.logits, labels)
        weight = sft.aux_weight
        if weight is None:
            weight = run.model.cfg.router.load_balance_weight
        aux = weight * run.model.router.aux_loss(out.router)
        loss = lm_loss + aux
        run.backward(loss)
        run.engine.step()
        grad_norm = run.engine.get_global_grad_norm()
        return StepMetrics(
            mean={"loss": float(loss), "lm_loss": float(lm_loss), "aux_loss": float(aux)},
            local={"grad_norm": float(grad_norm) if grad_norm is not None else float("nan")},
        )


def main(argv: list[str] | None = None) -> None:
    """``python -m smartpath.training.sft --config config.yaml``."""
    stage_main(SftStage.name, argv)


if __name__ == "__main__":
    main()
