"""Tests for smartpath.model.logprobs."""

from __future__ import annotations

import torch

from smartpath.model.logprobs import sequence_logprobs


def test_sequence_logprobs_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).to(torch.bfloat16)
    tokens = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    out = sequence_logprobs(logits, tokens, mask)
    assert out.shape == (B, T) and out.dtype == torch.float32
    expected = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                row = logits[b, t - 1].double()
                expected[b, t] = row[tokens[b, t]] - torch.log(torch.exp(row).sum())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert (out[:, 0] == 0).all()
    assert (out[~mask] == 0).all()
