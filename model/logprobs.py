"""Per-token log-probabilities of sequences: GRPO's policy ratio and KL, and the decoder's
label scoring. Computed in float32 (bf16 logits lose too much in ``log_softmax``) as
``gather - logsumexp``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sequence_logprobs"]


def sequence_logprobs(logits: Tensor, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token log-probs (B, T) float32 of ``tokens`` under ``logits`` (B, T, V), shifted.

    ``out[:, t] = log_softmax(logits[:, t-1])[tokens[:, t]]`` for t ≥ 1; ``out[:, 0] = 0``;
    positions where ``mask`` (B, T, aligned with ``tokens``) is 0 are 0.
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    pred = logits[:, :-1].float()  # (B, T-1, V)
    target = tokens[:, 1:]  # (B, T-1)
    picked = pred.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    lp = picked - torch.logsumexp(pred, dim=-1)  # (B, T-1)
    out = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)  # (B, T)
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out
