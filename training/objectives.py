"""The math of SmartPath-R1's scale-aware SFT and task-aware GRPO, as pure torch functions.

No Ray, no DeepSpeed, no model: these take tensors and return tensors, so the trainers can be
thin and the math is tested on its own. Design decisions:

- **Label alignment**: labels are aligned with ``input_ids`` (``labels[b, t]`` is
  ``input_ids[b, t]`` or ``IGNORE_INDEX``); the shift to next-token prediction happens in
  ``SmartPathModel.forward`` (``logits[:, :-1]`` against ``labels[:, 1:]``), as in HF models.
- **SFT target = the completion only.** SmartPath-R1's SFT data carries no chain-of-thought
  annotations, so the assistant completion is ``<think></think><answer>…</answer><|im_end|>``
  (an empty think block teaches the output grammar that GRPO's format reward checks; see
  ``training/collate.py``) and that whole completion (closing ``<|im_end|>`` included, so the
  model learns to stop) is the loss target;
  the system/user prompt and the ``<|im_start|>assistant\\n`` header are not. ``<think>`` content,
  if a sample ever had any, would count as part of the completion: ``answer_only_labels`` does not
  look at token content. To restrict the loss to the ``<answer>…</answer>`` span alone, pass
  ``answer_span_mask(...)`` as the completion mask.
- **Log-probs** are computed in float32 (bf16 logits lose too much in ``log_softmax``) as
  ``gather - logsumexp``, aligned with ``tokens``: ``out[:, t] = log p(tokens[:, t] | < t)``
  from ``logits[:, t-1]``; position 0 (no predicting logit) and masked positions are 0.
- **SFT loss normalisation**: per-sequence mean over completion tokens, then mean over
  sequences (``sft_loss``), as the GRPO loss; a token mean over the batch would let long
  detection/segmentation answers drown classification and VQA labels.
- **Group advantages**: rewards are laid out prompt-major (``[p0s0, p0s1, …, p1s0, …]``, trl's
  ``repeat_interleave`` order); ``(r - mean) / (std + eps)`` per group with the *unbiased* std
  (as trl); a group whose rewards are all equal (or G = 1) gets advantage exactly 0.
- **GRPO loss** (DeepSeekMath / trl): per token
  ``-min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) + β·k3`` with ``ρ = exp(logp - old)`` and the k3 estimator
  ``k3 = exp(ref - logp) - (ref - logp) - 1`` (≥ 0, = 0 iff equal, unbiased for KL(π‖ref);
  computed as ``expm1(δ) - δ`` for float32 accuracy near 0).
  ``old`` and ``ref`` are detached: gradients reach ``logprobs`` only.
  **Normalisation: per-sequence mean over completion tokens, then mean over sequences** (the
  GRPO paper's 1/G Σ 1/|o_i| Σ_t); a sequence with no completion tokens contributes 0 but still
  counts in the batch mean (its denominator is clamped to 1).
- Stats are detached 0-dim tensors (no host sync forced; ``.item()`` when logging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smartpath.model.mllm import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "answer_only_labels",
    "answer_span_mask",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "sft_loss",
]


def _completion_mask(input_ids: Tensor, prompt: Tensor) -> Tensor:
    """Bool (B, T) completion mask from prompt lengths (B,) or a (B, T) mask."""
    bsz, seq = input_ids.shape
    if prompt.dim() == 1:
        if prompt.shape[0] != bsz:
            raise ValueError(f"prompt_lengths has {prompt.shape[0]} entries for batch {bsz}")
        if prompt.is_floating_point() or prompt.dtype == torch.bool:
            raise ValueError("prompt_lengths must be an integer tensor (B,)")
        positions = torch.arange(seq, device=input_ids.device)  # (T,)
        return positions[None, :] >= prompt.to(input_ids.device)[:, None]  # (B, T)
    if prompt.shape != input_ids.shape:
        raise ValueError(
            f"completion mask shape {tuple(prompt.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    return prompt.to(torch.bool)


def answer_only_labels(input_ids: Tensor, prompt: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """SFT labels (B, T): ``input_ids`` on completion tokens, ``IGNORE_INDEX`` elsewhere.

    ``prompt`` is either prompt lengths (B,) (tokens ``>= length`` are the completion; right
    padding) or a (B, T) completion mask (any padding side). ``pad_mask`` (B, T) is the
    attention mask (1 = real token); padding is always ignored.
    """
    keep = _completion_mask(input_ids, prompt)  # (B, T) bool
    if pad_mask is not None:
        if pad_mask.shape != input_ids.shape:
            raise ValueError(
                f"pad_mask shape {tuple(pad_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        keep = keep & pad_mask.to(torch.bool)
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def answer_span_mask(input_ids: Tensor, open_id: int, close_id: int) -> Tensor:
    """Bool (B, T): from the first ``open_id`` through the first ``close_id`` after it.

    Both tags are included; a row without ``open_id`` is all False; an unclosed answer runs to
    the end of the row. Use the tokenizer's ids of ``<answer>``/``</answer>``.
    """
    opened = torch.cumsum((input_ids == open_id).int(), dim=1) > 0  # (B, T)
    close_after = (input_ids == close_id) & opened  # (B, T)
    closes = torch.cumsum(close_after.int(), dim=1)  # (B, T) closes seen up to and incl. t
    closed_before = (closes - close_after.int()) > 0  # a close strictly before t
    return opened & ~closed_before


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy on the completion, averaged per sequence and then over sequences.

    ``labels`` (B, T) are aligned with the inputs (IGNORE_INDEX outside completions). A
    40-token detection answer then weighs as much as a 3-token label: a token mean over the
    batch would let long answers drown the short ones (the GRPO loss normalises the same way).
    Rows without completion tokens count 0 and still count in the mean.

    Only the completion positions' logits are taken to float32 and log-softmaxed (the saved
    log-softmax is N_completion × V, not B × T × V: with image tokens in the prompt and a
    152k vocabulary that is most of the loss's memory).
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    picked = logits[:, :-1][mask].float()  # (N, V) completion positions only
    nll = F.cross_entropy(picked, labels[:, 1:][mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,) the sequence of each completion token
    per_row = torch.zeros(mask.shape[0], dtype=nll.dtype, device=nll.device)
    per_row = per_row.index_add(0, rows, nll)  # (B,)
    return (per_row / mask.sum(1).clamp_min(1)).mean()


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO advantages (N·G,): ``(r - mean_group) / (std_group + eps)``, prompt-major groups.

    Unbiased std per group; zero-variance groups (and G = 1) → 0.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    r = rewards.float().view(-1, group_size)  # (N, G)
    if group_size == 1:
        return torch.zeros_like(r).view(-1)
    mean = r.mean(dim=1, keepdim=True)  # (N, 1)
    std = r.std(dim=1, keepdim=True)  # (N, 1), unbiased
    adv = (r - mean) / (std + eps)  # (N, G)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # (N, 1) all rewards equal
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.view(-1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π‖ref): ``exp(ref - logp) - (ref - logp) - 1`` (≥ 0).

    Computed as ``expm1(δ) - δ`` (no cancellation against the ``- 1`` in float32), clamped at 0
    so rounding cannot make it negative.
    """
    delta = ref_logprobs - logprobs
    return (torch.expm1(delta) - delta).clamp_min(0.0)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    kl_beta: float = 0.04,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss (scalar) and stats; log-probs and mask (B, T), advantages (B,).

    Per token ``-min(ρA, clip(ρ, 1±ε)A) + β·k3``, averaged per sequence over ``mask`` tokens,
    then over sequences. Stats: ``clip_fraction``, ``kl`` (token mean of k3), ``advantage``
    (mean), ``ratio`` (token mean).
    """
    if not (logprobs.shape == old_logprobs.shape == ref_logprobs.shape == mask.shape):
        raise ValueError("logprobs, old_logprobs, ref_logprobs and mask must share a (B, T) shape")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,)={tuple(logprobs.shape[:1])}")
    m = mask.to(logprobs.dtype)  # (B, T)
    old = old_logprobs.detach()
    ref = ref_logprobs.detach()
    adv = advantages.detach().to(logprobs.dtype)[:, None]  # (B, 1)

    ratio = torch.exp(logprobs - old)  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    surrogate = torch.minimum(ratio * adv, clipped * adv)  # (B, T)
    kl = k3_kl(logprobs, ref)  # (B, T)
    per_token = -surrogate + kl_beta * kl  # (B, T)

    lengths = m.sum(dim=1)  # (B,)
    per_seq = (per_token * m).sum(dim=1) / lengths.clamp(min=1.0)  # (B,)
    loss = per_seq.mean()

    with torch.no_grad():
        n_tokens = m.sum().clamp(min=1.0)
        is_clipped = ((adv > 0) & (ratio > 1.0 + clip_eps)) | (
            (adv < 0) & (ratio < 1.0 - clip_eps)
        )  # (B, T) tokens where the clipped branch is active (zero gradient)
        stats = {
            "clip_fraction": (is_clipped.to(m.dtype) * m).sum() / n_tokens,
            "kl": (kl * m).sum() / n_tokens,
            "advantage": advantages.detach().float().mean(),
            "ratio": (ratio * m).sum() / n_tokens,
        }
    return loss, {k: v.detach() for k, v in stats.items()}
