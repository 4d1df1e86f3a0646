"""The expert router: top-k gate, determinism, load-balancing loss, gradients."""

from __future__ import annotations

import pytest
import torch

from smartpath.model.experts import ExpertRouting
from smartpath.model.router import ExpertRouter, load_balancing_loss, top_k_gate

E, K, D_VIS = 6, 2, 16


@pytest.fixture
def router() -> ExpertRouter:
    torch.manual_seed(0)
    return ExpertRouter(num_tasks=5, num_scales=2, visual_dim=D_VIS, num_experts=E, top_k=K)


def inputs(batch: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 5, (batch,), generator=gen),
        torch.randint(0, 2, (batch,), generator=gen),
        torch.randn(batch, D_VIS, generator=gen),
    )


def test_gate_picks_k_distinct_experts_with_weights_summing_to_one(router) -> None:
    out = router(*inputs())
    assert out.logits.shape == (8, E)
    assert out.indices.shape == (8, K) and out.weights.shape == (8, K)
    assert out.indices.dtype == torch.long
    assert torch.allclose(out.weights.sum(-1), torch.ones(8), atol=1e-6)
    assert bool((out.weights > 0).all())
    for row, logits in zip(out.indices, out.logits, strict=True):
        assert len(set(row.tolist())) == K
        # They are the k largest logits, best first.
        assert row.tolist() == torch.argsort(logits, descending=True)[:K].tolist()
    # Weights are the softmax over the selected logits (best expert weighs most).
    expected = torch.softmax(out.logits.gather(1, out.indices), dim=-1)
    assert torch.allclose(out.weights, expected)
    assert bool((out.weights[:, 0] >= out.weights[:, 1]).all())
    routing = out.routing()
    assert isinstance(routing, ExpertRouting) and routing.batch_size == 8
    assert not routing.weights.requires_grad
    assert out.routing(detach=False).weights.requires_grad


def test_routing_is_deterministic_and_ties_go_to_the_lower_index(router) -> None:
    a, b = router(*inputs()), router(*inputs())
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 0.0, 5.0]])
    for _ in range(3):
        idx, w = top_k_gate(logits, 2)
        assert idx.tolist() == [[1, 2], [0, 1], [1, 3]]
        assert torch.allclose(w, torch.full((3, 2), 0.5))
    # Requests differ by task/scale/features, so the router does not return a constant.
    task, scale, vis = inputs(64)
    assert len({tuple(r) for r in router(task, scale, vis).indices.tolist()}) > 1
    with pytest.raises(ValueError):
        top_k_gate(logits, 5)


def test_no_visual_features_means_zeros(router) -> None:
    task, scale, _ = inputs()
    none = router(task, scale, None)
    zeros = router(task, scale, torch.zeros(8, D_VIS))
    assert torch.equal(none.logits, zeros.logits)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed() -> None:
    batch = 12
    uniform_logits = torch.zeros(batch, E)
    # Every expert chosen equally often: 12 requests x 2 slots = 24 = 4 per expert.
    balanced = torch.arange(batch * K).reshape(batch, K) % E
    uniform = load_balancing_loss(uniform_logits, balanced, E)
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)
    collapsed_logits = torch.zeros(batch, E)
    collapsed_logits[:, :2] = 10.0
    collapsed_idx = torch.tensor([[0, 1]] * batch)
    collapsed = load_balancing_loss(collapsed_logits, collapsed_idx, E)
    assert collapsed.item() > 2.5  # ≈ E/2 = 3 with everything on experts 0 and 1
    # Same balanced assignment, peaked probabilities: still ≥ the uniform optimum here.
    skewed = load_balancing_loss(collapsed_logits, balanced, E)
    assert uniform.item() <= skewed.item() + 1e-6 < collapsed.item()


def test_gradients_reach_every_router_parameter(router) -> None:
    task, scale, vis = inputs(16)
    out = router(task, scale, vis)
    target = torch.randn(16, K)
    loss = (out.weights * target).sum() + 0.1 * router.aux_loss(out)
    loss.backward()
    for name, p in router.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name
    # The aux loss alone also has a gradient (through the mean probabilities).
    router.zero_grad()
    router.aux_loss(router(task, scale, vis)).backward()
    assert torch.count_nonzero(router.mlp[-1].weight.grad) > 0


def test_lm_loss_reaches_the_router_through_the_expert_mix(router) -> None:
    from torch import nn

    from smartpath.model.experts import MixtureLoRALinear, apply_routing

    layer = nn.Sequential(MixtureLoRALinear(nn.Linear(8, 8), num_experts=E, rank=2, alpha=2))
    with torch.no_grad():
        layer[0].lora_B.normal_()
    task, scale, vis = inputs(4)
    out = router(task, scale, vis)
    with apply_routing(layer, out.routing(detach=False)):
        layer(torch.randn(4, 3, 8)).square().mean().backward()
    assert torch.count_nonzero(router.mlp[-1].weight.grad) > 0
    assert torch.count_nonzero(layer[0].lora_B.grad) > 0
