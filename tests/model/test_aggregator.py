"""The slide aggregator: fixed token budget, exact chunked attention, bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from smartpath.model.aggregator import SlideAggregator, pooled_statistics, position_encoding


def _slide(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g)
    coords = torch.randint(0, 100_000, (n, 2), generator=g).float()
    return features, coords


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_output_is_a_fixed_token_budget(n: int) -> None:
    torch.manual_seed(0)
    agg = SlideAggregator(48, 64, hidden_dim=32, num_tokens=8, num_heads=4, chunk_size=64)
    out = agg(*_slide(n, 48))
    assert out.shape == (8, 64) and torch.isfinite(out).all()


def test_chunked_attention_equals_full_attention() -> None:
    torch.manual_seed(0)
    agg = SlideAggregator(48, 64, hidden_dim=32, num_tokens=8, num_heads=4, chunk_size=37)
    features, coords = _slide(1000, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            agg(features, coords, mpp=0.5),
            agg.reference_attention(features, coords, mpp=0.5),
            atol=1e-5,
            rtol=1e-5,
        )


def test_tile_attention_is_the_softmax_share_of_each_tile() -> None:
    torch.manual_seed(0)
    agg = SlideAggregator(48, 64, hidden_dim=32, num_tokens=8, num_heads=4, chunk_size=37)
    features, coords = _slide(1000, 48)
    shares = agg.tile_attention(features, coords, mpp=0.5)
    # The same shares from one unchunked softmax over all tiles, mean over heads and queries.
    with torch.no_grad():
        x = agg.input_norm(agg.input_proj(features) + position_encoding(coords * 0.5, 32))
        q = agg.q(agg.query_norm(agg.queries)).view(8, 4, 8).transpose(0, 1)
        k = agg.k(x).view(-1, 4, 8).transpose(0, 1)
        expected = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1).mean(dim=(0, 1))
    assert shares.shape == (1000,) and shares.dtype == torch.float32
    torch.testing.assert_close(shares, expected, atol=1e-6, rtol=1e-4)
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-5)
    # Keys that ignore the tiles give every tile the same share.
    agg.k.weight.data.zero_()
    assert torch.allclose(agg.tile_attention(features, coords), torch.full((1000,), 1e-3))


def test_positions_matter_and_order_does_not() -> None:
    torch.manual_seed(0)
    agg = SlideAggregator(16, 32, hidden_dim=32, num_tokens=4, num_heads=4, chunk_size=10)
    features, coords = _slide(50, 16)
    perm = torch.randperm(50)
    with torch.no_grad():
        base = agg(features, coords)
        torch.testing.assert_close(agg(features[perm], coords[perm]), base, atol=1e-5, rtol=1e-5)
        moved = agg(features, coords + torch.tensor([5000.0, 0.0]))
    assert (moved - base).abs().max() > 1e-4


def test_gradients_reach_every_part() -> None:
    agg = SlideAggregator(16, 32, hidden_dim=32, num_tokens=4, num_heads=4, chunk_size=8)
    agg(*_slide(30, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agg.parameters())


def test_pooled_statistics_are_mean_and_std_over_tiles() -> None:
    features = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    torch.testing.assert_close(
        pooled_statistics(features), torch.tensor([3.0, 10.0, (8 / 3) ** 0.5, 0.0])
    )


def test_pooled_path_carries_slide_composition() -> None:
    """With attention's output zeroed, tokens still differ between slides of different
    composition (through the pooled skip path), and not between orderings of one slide."""
    torch.manual_seed(0)
    agg = SlideAggregator(16, 32, hidden_dim=32, num_tokens=4, num_heads=4)
    torch.nn.init.zeros_(agg.o.weight)
    torch.nn.init.zeros_(agg.o.bias)
    features, coords = _slide(40, 16)
    richer = features.clone()
    richer[:20, 0] += 3.0  # half the tiles change in one descriptor
    with torch.no_grad():
        base = agg(features, coords)
        torch.testing.assert_close(agg(features.flip(0), coords.flip(0)), base)
        assert (agg(richer, coords) - base).abs().max() > 1e-3


def test_fitted_pooled_statistics_standardise_the_training_slides() -> None:
    agg = SlideAggregator(4, 8, hidden_dim=8, num_tokens=2, num_heads=2)
    slides = [_slide(10 + 5 * i, 4, seed=i)[0] + 0.1 * i for i in range(6)]
    for f in slides:
        f[:, 3] = 2.0  # a descriptor that never varies: its std is 0 on every slide
    agg.fit_pooled_statistics(slides)
    stats = torch.stack([pooled_statistics(f) for f in slides])
    z = (stats - agg.pooled_centre) / agg.pooled_scale
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    varying = [0, 1, 2, 4, 5, 6]
    torch.testing.assert_close(z[:, varying].std(0, correction=0), torch.ones(6))
    assert agg.pooled_scale[[3, 7]].tolist() == [1.0, 1.0]  # not divided by zero
    assert {"pooled_centre", "pooled_scale"} <= set(agg.state_dict())  # saved with the model
    with pytest.raises(ValueError, match="at least one slide"):
        agg.fit_pooled_statistics([])


def test_position_encoding_is_bounded_and_distinct() -> None:
    pe = position_encoding(torch.tensor([[0.0, 0.0], [250.0, 0.0], [0.0, 250.0]]), 32)
    assert pe.shape == (3, 32) and pe.abs().max() <= 1.0
    assert not torch.allclose(pe[1], pe[2])
    with pytest.raises(ValueError):
        position_encoding(torch.zeros(1, 2), 30)


def test_bad_inputs_are_value_errors() -> None:
    agg = SlideAggregator(16, 32, hidden_dim=32, num_tokens=4, num_heads=4)
    with pytest.raises(ValueError, match="at least one"):
        agg(torch.zeros(0, 16), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="coords"):
        agg(torch.zeros(5, 16), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        SlideAggregator(16, 32, hidden_dim=30, num_heads=4)


def test_100k_tiles_in_bounded_memory() -> None:
    """Peak memory of a fresh process: chunked stays near the input's size, full does not."""
    script = textwrap.dedent(
        """
        import re, sys, torch
        from smartpath.model.aggregator import SlideAggregator

        def peak_mb():
            # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a fork of a big parent
            # would start with the parent's peak.
            status = open("/proc/self/status").read()
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024

        torch.manual_seed(0)
        agg = SlideAggregator(64, 64, hidden_dim=64, num_tokens=16, num_heads=4, chunk_size=2048)
        features = torch.randn(100_000, 64)  # 25.6 MB
        coords = torch.randint(0, 100_000, (100_000, 2)).float()
        before = peak_mb()
        with torch.no_grad():
            out = agg(features, coords) if sys.argv[1] == "chunked" else agg.reference_attention(
                features, coords)
        assert out.shape == (16, 64) and torch.isfinite(out).all()
        print(peak_mb() - before)
        """
    )

    def grown_mb(mode: str) -> float:
        run = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
        )
        return float(run.stdout.strip().splitlines()[-1])

    chunked, full = grown_mb("chunked"), grown_mb("full")
    # Full attention holds (N, hidden) projections, keys, values and scores (~110 MB here).
    assert full > 64, full
    assert chunked < 32, chunked
