"""Absolute 2-D positions added to the vision tower's output tokens.

Design decisions:

- Qwen2.5-VL gives image tokens positions only through rotary embeddings (2-D RoPE in the
  vision tower, M-RoPE in the LM). Rotations shape *where* attention looks but add nothing to
  the values it reads, so a token's value does not say where in the image it sits. A large
  model recovers coordinates from attention patterns; a tiny one cannot, and its boxes and
  polygons stay constant whatever the image. This module adds, to each merged image token,
  a learnt linear map of fixed Fourier features of the token centre's normalised (x, y), the
  same 0-1 frame the answers' 0-1000 coordinates use.
- The linear map starts at zero, so switching it on leaves a pretrained base's outputs
  unchanged at step 0 and lets training decide how much position to add.
- It sits in ``SmartPathModel.encode_images``, so features computed by the encoder service
  already carry it and every path (training, serving, generation) sees the same tokens.
- Token order is Qwen2.5-VL's: per image, frames, then rows, then columns of the merged grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ImagePositionEmbedding", "normalised_token_centres"]


def normalised_token_centres(image_grid_thw: Tensor, merge_size: int) -> Tensor:
    """(x, y) in 0-1 of every merged image token (tokens, 2), in Qwen2.5-VL's token order."""
    centres = []
    for t, h, w in image_grid_thw.tolist():
        rows, cols = h // merge_size, w // merge_size
        y = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
        x = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
        yy, xx = torch.meshgrid(y, x, indexing="ij")  # (rows, cols)
        grid = torch.stack([xx, yy], dim=-1).reshape(-1, 2)  # (rows·cols, 2)
        centres.append(grid.repeat(t, 1))
    return torch.cat(centres) if centres else torch.zeros(0, 2)


class ImagePositionEmbedding(nn.Module):
    """Fourier features of token centres → a zero-initialised linear map to the LM width."""

    def __init__(self, hidden_size: int, num_frequencies: int = 6) -> None:
        super().__init__()
        freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)
        self.register_buffer("frequencies", freqs, persistent=False)
        self.proj = nn.Linear(2 + 4 * num_frequencies, hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, image_grid_thw: Tensor, merge_size: int) -> Tensor:
        """Position embeddings (tokens, hidden) for the images of ``image_grid_thw``."""
        xy = normalised_token_centres(image_grid_thw, merge_size).to(self.proj.weight.device)
        angles = xy[:, :, None] * self.frequencies  # (tokens, 2, F)
        features = torch.cat([xy, angles.sin().flatten(1), angles.cos().flatten(1)], dim=1)
        return self.proj(features.to(self.proj.weight.dtype))
