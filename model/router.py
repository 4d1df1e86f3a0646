"""The expert router: task, scale and pooled visual features -> top-k LoRA experts and weights.

Design decisions:

- Inputs per request: a task id, a scale id (ROI / WSI …) and pooled visual features
  (B, D_vis); requests without an image pass zeros. The three are embedded into one hidden
  vector (task embedding + scale embedding + linear projection of the features), then a small
  MLP (LayerNorm → Linear → GELU → Linear) gives expert logits (B, E).
- Top-k gate: the k largest logits, ties broken by the lower expert index (a stable descending
  sort, not ``torch.topk`` whose tie order is unspecified), so routing is deterministic for a
  given input. Weights are a softmax over the k selected logits (they sum to 1, and gradients
  reach the router through them; the indices themselves are not differentiable).
- Load balancing (Switch Transformer): ``E · Σ_e f_e · P_e`` with f_e the fraction of the B·k
  assignments that went to expert e and P_e the batch-mean router probability of e. It equals
  1 for perfectly uniform routing and grows to E when every request collapses onto one expert.
- No noise in the gate (deterministic serving); exploration, if wanted, belongs to training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartpath.model.experts import ExpertRouting

__all__ = ["ExpertRouter", "RouterOutput", "load_balancing_loss", "top_k_gate"]


@dataclass(frozen=True)
class RouterOutput:
    """Router logits (B, E), chosen experts (B, k) and their weights (B, k, summing to 1)."""

    logits: Tensor  # (B, E)
    indices: Tensor  # (B, k) int64
    weights: Tensor  # (B, k)

    def routing(self, detach: bool = True) -> ExpertRouting:
        """The :class:`ExpertRouting` to apply to the experts.

        ``detach=False`` keeps the weights in the graph, so the LM loss trains the router
        through the expert mix (SFT); serving uses the detached default.
        """
        return ExpertRouting(self.indices, self.weights.detach() if detach else self.weights)


def top_k_gate(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of ``logits`` (B, E) with ties to the lower index; softmax over the selected k.

    Returns indices (B, k) int64 and weights (B, k) that sum to 1 per row.
    """
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {k}")
    # Stable descending sort keeps equal logits in index order -> deterministic ties.
    order = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices
    indices = order[:, :k]  # (B, k)
    selected = logits.gather(-1, indices)  # (B, k), differentiable
    return indices, torch.softmax(selected, dim=-1)


def load_balancing_loss(router_logits: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer auxiliary loss ``E · Σ_e f_e · P_e`` (scalar; 1.0 when uniform).

    router_logits: (B, E); indices: (B, k) experts chosen per request.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # (B, E)
    counts = F.one_hot(indices.reshape(-1), num_experts).float().sum(0)  # (E,)
    fraction = counts / counts.sum().clamp_min(1.0)  # f_e, (E,)
    mean_prob = probs.mean(0)  # P_e, (E,)
    return num_experts * torch.sum(fraction * mean_prob)


class ExpertRouter(nn.Module):
    """Task + scale + pooled visual features -> expert logits (B, E) -> top-k routing."""

    def __init__(
        self,
        num_tasks: int,
        num_scales: int,
        visual_dim: int,
        num_experts: int,
        top_k: int,
        hidden_dim: int = 128,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.visual_dim = visual_dim
        self.task_embedding = nn.Embedding(num_tasks, hidden_dim)
        self.scale_embedding = nn.Embedding(num_scales, hidden_dim)
        self.visual_proj = nn.Linear(visual_dim, hidden_dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(hidden_dim),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_experts),
        )

    def logits(self, task_ids: Tensor, scale_ids: Tensor, visual: Tensor | None = None) -> Tensor:
        """Expert logits (B, E) for task ids (B,), scale ids (B,), visual features (B, D_vis)."""
        if visual is None:
            visual = task_ids.new_zeros(task_ids.shape[0], self.visual_dim, dtype=torch.float)
        visual = visual.to(self.visual_proj.weight.dtype)
        h = (
            self.task_embedding(task_ids)  # (B, H)
            + self.scale_embedding(scale_ids)  # (B, H)
            + self.visual_proj(visual)  # (B, H)
        )
        return self.mlp(h)  # (B, E)

    def forward(
        self, task_ids: Tensor, scale_ids: Tensor, visual: Tensor | None = None
    ) -> RouterOutput:
        logits = self.logits(task_ids, scale_ids, visual)
        indices, weights = top_k_gate(logits, self.top_k)
        return RouterOutput(logits, indices, weights)

    def aux_loss(self, out: RouterOutput) -> Tensor:
        """The load-balancing loss of one routing decision (add it, scaled, to the LM loss)."""
        return load_balancing_loss(out.logits, out.indices, self.num_experts)
