"""Tests for smartpath.training.objectives: SFT labels, GRPO advantages and loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from smartpath.model.logprobs import sequence_logprobs
from smartpath.model.mllm import IGNORE_INDEX
from smartpath.training.objectives import (
    answer_only_labels,
    answer_span_mask,
    group_advantages,
    grpo_loss,
    k3_kl,
    sft_loss,
)

I = IGNORE_INDEX  # noqa: E741


# ---------------------------------------------------------------------------------------------
# answer_only_labels / answer_span_mask


def test_answer_only_labels_prompt_lengths_and_padding() -> None:
    ids = torch.tensor([[10, 11, 12, 13, 14, 0], [20, 21, 22, 23, 0, 0]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    labels = answer_only_labels(ids, torch.tensor([3, 2]), pad)
    assert labels.tolist() == [[I, I, I, 13, 14, I], [I, I, 22, 23, I, I]]
    assert labels.dtype == ids.dtype
    # Without pad_mask the padded tail of the completion would be kept.
    assert answer_only_labels(ids, torch.tensor([3, 2]))[0].tolist() == [I, I, I, 13, 14, 0]


def test_answer_only_labels_completion_mask_left_padding() -> None:
    ids = torch.tensor([[0, 0, 5, 6, 7, 8]])
    pad = torch.tensor([[0, 0, 1, 1, 1, 1]])
    completion = torch.tensor([[True, False, False, False, True, True]])  # pad overrides pos 0
    assert answer_only_labels(ids, completion, pad).tolist() == [[I, I, I, I, 7, 8]]


def test_answer_only_labels_rejects_bad_shapes() -> None:
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError):
        answer_only_labels(ids, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError):
        answer_only_labels(ids, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        answer_only_labels(ids, torch.tensor([1.0, 2.0]))


def test_answer_span_mask() -> None:
    o, c = 5, 6
    ids = torch.tensor(
        [
            [1, o, 7, 8, c, 9],  # normal span, tags included
            [c, 1, o, 7, c, c],  # a close before the open is ignored; only the first close ends
            [1, 2, 3, 4, 5 + 10, 9],  # no open tag
            [1, 1, o, 7, 7, 7],  # unclosed: runs to the end
        ]
    )
    assert answer_span_mask(ids, o, c).int().tolist() == [
        [0, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1],
    ]


# ---------------------------------------------------------------------------------------------
# sequence_logprobs


def test_sequence_logprobs_agrees_with_model_loss_convention() -> None:
    """-mean(logprobs on label tokens) is SmartPathModel.forward's shifted cross-entropy."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 6, 9
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(V, (B, T), generator=g)
    labels = answer_only_labels(ids, torch.tensor([2, 4]))
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=I)
    keep = labels != I
    lp = sequence_logprobs(logits, ids, keep)
    torch.testing.assert_close(-lp[keep].mean(), ce)


# ---------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_known_example_and_zero_variance() -> None:
    rewards = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2, 0, 1, 0, 1])
    adv = group_advantages(rewards, 4, eps=0.0)
    # group 0: mean .25, unbiased std .5; group 1: constant; group 2: mean .5, std sqrt(1/3)
    s = math.sqrt(1 / 3)
    expected = [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, -0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert (adv[4:8] == 0).all()
    with_eps = group_advantages(rewards, 4)
    torch.testing.assert_close(with_eps[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001)


def test_group_advantages_groups_are_independent() -> None:
    base = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.2, 0.8])
    other = base.clone()
    other[3:] = torch.tensor([5.0, -1.0, 7.0])
    a, b = group_advantages(base, 3), group_advantages(other, 3)
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3:], b[3:])
    # shifting one group's rewards by a constant leaves its advantages unchanged
    torch.testing.assert_close(group_advantages(base + torch.tensor([0, 0, 0, 9, 9, 9]), 3), a)
    assert torch.allclose(a.view(2, 3).sum(1), torch.zeros(2), atol=1e-6)


def test_group_advantages_edge_cases() -> None:
    assert group_advantages(torch.tensor([1.0, 3.0]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 0)


# ---------------------------------------------------------------------------------------------
# k3 and grpo_loss


def test_k3_nonnegative_zero_iff_equal_and_unbiased() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    kl = k3_kl(a, b)
    assert (kl > 0).all()
    assert (k3_kl(a, a) == 0).all()
    # float32 accuracy near 0: k3 ≈ δ²/2 (naive exp(δ) - δ - 1 rounds to 0 or below)
    deltas = torch.tensor([1e-3, -4e-5])
    torch.testing.assert_close(k3_kl(torch.zeros(2), deltas), deltas**2 / 2, rtol=2e-3, atol=0)
    # E_{x~p}[k3] = KL(p || q) for categorical p, q
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = k3_kl(p.log()[x], q.log()[x]).mean()
    true_kl = (p * (p / q).log()).sum()
    assert abs(estimate.item() - true_kl.item()) < 0.01


def _fixture(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, 6, generator=g) * 3
    adv = torch.randn(4, generator=g)
    mask = torch.tensor(
        [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
    ).float()
    return lp, adv, mask


def test_grpo_loss_on_policy_equals_minus_mean_advantage_and_grads_to_logprobs_only() -> None:
    lp, adv, mask = _fixture()
    logp = lp.clone().requires_grad_(True)
    old = lp.clone().requires_grad_(True)
    ref = lp.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, old, ref, adv, mask)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["kl"].item() == 0.0
    assert stats["clip_fraction"].item() == 0.0
    torch.testing.assert_close(stats["advantage"], adv.mean())
    torch.testing.assert_close(stats["ratio"], torch.tensor(1.0))
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    assert old.grad is None and ref.grad is None
    # d loss / d logp[b, t] = -A_b / (|o_b| * B) on completion tokens, 0 elsewhere
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / mask.shape[0]
    torch.testing.assert_close(logp.grad, expected)


def test_grpo_loss_normalisation_is_per_sequence_then_batch() -> None:
    lp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]]).float()
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(lp, lp, lp, adv, mask)
    # per-sequence mean: (-1 + 1) / 2 = 0; token-level would give -(1 - 3) / 4 = 0.5
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_grpo_loss_kl_term() -> None:
    lp, _, mask = _fixture()
    ref = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(4))
    zero_adv = torch.zeros(4)
    loss, stats = grpo_loss(lp, lp, ref, zero_adv, mask, kl_beta=0.5)
    k = k3_kl(lp, ref)
    expected = 0.5 * ((k * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["kl"], (k * mask).sum() / mask.sum())
    assert stats["kl"].item() > 0
    loss_no_kl, _ = grpo_loss(lp, lp, ref, zero_adv, mask, kl_beta=0.0)
    assert loss_no_kl.item() == 0.0


def test_grpo_loss_clipping_engages_and_zeroes_gradient() -> None:
    old = torch.full((3, 4), -1.0)
    mask = torch.ones(3, 4)
    shift = torch.tensor(
        [
            [math.log(1.5), 0.0, math.log(1.1), math.log(1.5)],  # A > 0: clipped at 1.5 only
            [math.log(0.5), 0.0, math.log(1.5), 0.0],  # A < 0: clipped at 0.5 only
            [math.log(1.5), math.log(0.5), 0.0, 0.0],  # A = 0: never counted as clipped
        ]
    )
    adv = torch.tensor([1.0, -1.0, 0.0])
    logp = (old + shift).requires_grad_(True)
    ref = (old + shift).detach()  # k3 gradient is 0 at logp == ref: isolates the surrogate
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2)
    assert stats["clip_fraction"].item() == pytest.approx(3 / 12)
    loss.backward()
    grad = logp.grad
    clipped = torch.tensor([[True, False, False, True], [True, False, False, False], [False] * 4])
    assert (grad[clipped] == 0).all()
    assert (grad[:2][~clipped[:2]] != 0).all()  # unclipped tokens with A != 0 still learn
    # the clipped value is used: token (0, 0) contributes -(1.2 * 1) / 4 / 3
    loss_row0, _ = grpo_loss(logp[:1].detach(), old[:1], ref[:1], adv[:1], mask[:1])
    expected_row0 = -(1.2 + 1.0 + 1.1 + 1.2) / 4
    assert loss_row0.item() == pytest.approx(expected_row0, rel=1e-6)


def test_grpo_loss_rejects_bad_shapes() -> None:
    lp, adv, mask = _fixture()
    with pytest.raises(ValueError):
        grpo_loss(lp, lp[:, :-1], lp, adv, mask)
    with pytest.raises(ValueError):
        grpo_loss(lp, lp, lp, adv[:2], mask)


def test_sft_loss_weighs_every_sequence_equally() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 7)
    tokens = torch.randint(0, 7, (2, 12))
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[0, -1:] = tokens[0, -1:]  # one completion token
    labels[1, 2:] = tokens[1, 2:]  # ten completion tokens
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none"
    ).view(2, 11)
    expected = (nll[0, -1] + nll[1, 1:].mean()) / 2
    assert torch.allclose(sft_loss(logits, labels), expected)
    token_mean = F.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert not torch.allclose(sft_loss(logits, labels), token_mean)
    labels[0] = IGNORE_INDEX  # a row without completion counts 0 but stays in the mean
    assert torch.allclose(sft_loss(logits, labels), nll[1, 1:].mean() / 2)


def test_sft_loss_gradient_equals_the_full_vocabulary_formulation() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 10, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 10))
    labels[0, :6] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX  # no completion at all
    labels[2, :3] = IGNORE_INDEX
    sft_loss(logits, labels).backward()
    grad = logits.grad.clone()
    logits.grad = None
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    (nll.sum(1) / mask.sum(1).clamp_min(1)).mean().backward()
    assert torch.allclose(grad, logits.grad, atol=1e-7)
    assert bool((grad[1] == 0).all()) and bool((grad[:, -1] == 0).all())
