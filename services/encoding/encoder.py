"""Visual encoding of the served model: ROI images through the vision tower, slide tiles
through the tile encoder, tile features through the slide aggregator.

Everything returns visual tokens in the language model's embedding space (``VisualTokens``),
which is what the router pools and the decoder places at the prompt's image/slide pads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from smartpath.model.mllm import SmartPathModel
from smartpath.model.slide_features import SlideFeatures
from smartpath.model.tile_encoder import TileEncoder, make_tile_encoder
from smartpath.model.vision import RoiInput, make_image_processor, prepare_roi
from smartpath.services.contracts import VisualTokens


class VisualEncoder:
    """The served model's visual side (see module docstring)."""

    def __init__(self, model: SmartPathModel, tile_encoder: TileEncoder | None = None) -> None:
        """``tile_encoder`` defaults to the one the model's checkpoint names."""
        self.model = model
        self.tile_encoder = tile_encoder or make_tile_encoder(model.cfg.tile_encoder)
        self.processor = make_image_processor(model.cfg.vision)

    def prepare(self, image: np.ndarray) -> RoiInput:
        """Resize and patchify one ROI (cheap; done per request before batching)."""
        return prepare_roi(image, self.processor)

    def encode_rois(self, rois: Sequence[RoiInput]) -> list[VisualTokens]:
        """One vision-tower forward over the packed ROIs; tokens split back per ROI."""
        pixels = torch.cat([r.pixel_values for r in rois])
        grid = torch.cat([r.image_grid_thw for r in rois])
        with torch.no_grad():
            tokens = self.model.encode_images(pixels, grid).float().numpy()
        out, start = [], 0
        for roi in rois:
            n = roi.num_image_tokens
            t, h, w = (int(v) for v in roi.image_grid_thw[0])
            out.append(VisualTokens(tokens[start : start + n].copy(), (t, h, w)))
            start += n
        return out

    def encode_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 tiles -> (n, D) float32 tile features."""
        return np.asarray(self.tile_encoder.encode(tiles), dtype=np.float32)

    def slide_tokens(self, features: SlideFeatures) -> VisualTokens:
        """The aggregator's slide tokens for one slide's tile features."""
        with torch.no_grad():
            tokens = self.model.slide_tokens_of(features.to_slide_input())
        return VisualTokens(tokens.float().numpy())
