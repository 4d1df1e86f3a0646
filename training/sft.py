"""Scale-aware SFT as a Ray Train + DeepSpeed job: ``python -m smartpath.training.sft --config F``.

Design decisions:

- Each worker draws its own scale-balanced batch per step (seeded by run seed, rank and step),
  collates chats with answer-only labels, and minimises the LM loss on the completion plus the
  router's load-balancing loss; the router learns the per-task/per-scale expert assignment
  from task and scale embeddings and the pooled visual tokens (gate weights stay in the graph).
  The LM loss is averaged per sequence, then over sequences (``objectives.sft_loss``).
- What trains: experts, aggregator and router; the base too when ``sft.train_base`` (the demo's
  randomly initialised tiny base has nothing to keep frozen).
- The model is built from ``training.model`` (all ranks seed identically; DeepSpeed broadcasts
  rank 0's weights anyway), with the slide aggregator's pooled-statistics scaler fitted on the
  training slides, or loaded from ``training.sft_init``.
"""

from __future__ import annotations

import time

import torch

from smartpath.model.base import base_from_config
from smartpath.model.mllm import SlideInput, SmartPathModel
from smartpath.services.config import SmartPathConfig
from smartpath.services.storage import make_store
from smartpath.training.collate import Collator
from smartpath.training.config import TrainingConfig
from smartpath.training.data import Item, load_items
from smartpath.training.engine import DeepSpeedRun, finish_stage, trainable_parameters
from smartpath.training.objectives import sft_loss
from smartpath.training.rollout import to_device
from smartpath.training.sampling import ScaleBalancedSampler

__all__ = ["build_model", "main", "step_batch", "train_loop"]

STAGE = "sft"


def build_model(t: TrainingConfig, store, items: list[Item]) -> SmartPathModel:
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
    """The batch rank ``rank`` trains on at ``step``: a pure function, so resume is exact."""
    sampler = ScaleBalancedSampler(
        [s.scale for s, _ in items],
        t.data.scale_weights,
        seed=t.seed * 9973 + rank,
        num_samples=batch_size,
        tasks=None if task_weights is None else [s.task for s, _ in items],
        task_weights=task_weights,
    )
    sampler.set_epoch(step)
    return [items[i] for i in sampler]


def train_loop(loop_config: dict) -> None:
    """The per-worker SFT loop (runs inside Ray Train)."""
    import ray.train

    config: SmartPathConfig = loop_config["config"]
    t = config.training
    rank = ray.train.get_context().get_world_rank()
    store = make_store(config.storage)
    items = load_items(t.data.manifests, t.data.train_split, store)
    model = build_model(t, store, items)
    params = trainable_parameters(model, t.sft.train_base)
    run = DeepSpeedRun(
        model,
        params,
        t.sft.optim,
        t.distributed,
        batch_size=t.sft.batch_size,
        total_steps=t.sft.steps,
    )
    collator = Collator(run.model.cfg, run.model.tokenizer, run.model.slide_tokens)
    start, history = run.restore()
    for step in range(start, t.sft.steps):
        tic = time.perf_counter()
        weights = t.sft.task_weights_at(step, t.data.task_weights)
        batch, labels = collator(step_batch(items, t, rank, step, t.sft.batch_size, weights))
        batch = to_device(batch, run.device, run.dtype)
        run.engine.train()
        labels = labels.to(run.device)
        out = run.engine(batch)
        lm_loss = sft_loss(out.logits, labels)
        weight = t.sft.aux_weight
        if weight is None:
            weight = run.model.cfg.router.load_balance_weight
        aux = weight * run.model.router.aux_loss(out.router)
        loss = lm_loss + aux
        run.backward(loss)
        lr = run.lr
        run.engine.step()
        row = run.all_reduce_mean(
            {"loss": float(loss), "lm_loss": float(lm_loss), "aux_loss": float(aux)}
        )
        grad_norm = run.engine.get_global_grad_norm()
        row.update(
            step=step + 1,
            resumes=run.resumes,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            step_s=time.perf_counter() - tic,
        )
        run.record(
            row,
            history,
            step=step + 1,
            total_steps=t.sft.steps,
            checkpoint_every=t.checkpoint_every,
            report_every=t.report_every,
        )
    finish_stage(run, config, STAGE, history)


def main(argv: list[str] | None = None) -> None:
    """``python -m smartpath.training.sft --config config.yaml``."""
    from smartpath.training.engine import stage_main

    stage_main(STAGE, train_loop, argv)


if __name__ == "__main__":
    main()
