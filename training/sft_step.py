"""One supervised fine-tuning step of SmartPathModel, and the parameters SFT trains.

Design decisions:

- SFT trains SmartPath's own parts only: the experts' ``lora_A``/``lora_B``, the slide
  aggregator and the router; every other base weight stays frozen.
- The total loss is the LM loss plus the router's load-balancing loss. ``aux_weight`` None uses
  the model's own scaling (``cfg.router.load_balance_weight``, already in ``aux_loss``); a float
  replaces that weight (raw load-balancing loss × ``aux_weight``).
- The returned grad norm is the total L2 norm over the optimizer's parameters before the step
  (clipped to ``max_grad_norm`` when given).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from smartpath.model.mllm import MultimodalBatch, SmartPathModel

__all__ = ["sft_step", "trainable_parameters"]


def trainable_parameters(model: SmartPathModel) -> list[nn.Parameter]:
    """Freeze everything but experts (lora_A/lora_B), aggregator and router; return those."""
    trainable: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        own = name.startswith(("aggregator.", "router.")) or name.endswith((".lora_A", ".lora_B"))
        param.requires_grad_(own)
        if own:
            trainable.append(param)
    return trainable


def sft_step(
    model: SmartPathModel,
    batch: MultimodalBatch,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    aux_weight: float | None = None,
    *,
    max_grad_norm: float | None = None,
) -> dict[str, float]:
    """Forward, (LM + aux) loss, backward, optimizer step, zero_grad.

    Returns ``loss`` (total), ``lm_loss``, ``aux_loss`` (as added) and ``grad_norm`` floats.
    """
    model.train()
    out = model(batch, labels=labels)
    assert out.loss is not None and out.aux_loss is not None
    aux = out.aux_loss if aux_weight is None else aux_weight * model.router.aux_loss(out.router)
    total = out.loss + aux
    total.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    limit = math.inf if max_grad_norm is None else max_grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit) if params else torch.zeros(())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": float(total.detach()),
        "lm_loss": float(out.loss.detach()),
        "aux_loss": float(aux.detach()),
        "grad_norm": float(grad_norm),
    }
