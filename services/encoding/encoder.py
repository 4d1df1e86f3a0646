"""Visual encoding of the served model: ROI images through the vision tower, slide tiles
through the tile encoder, tile features through the slide aggregator.

Everything returns visual tokens in the language model's embedding space (``VisualTokens``),
which is what the router pools and the decoder places at the prompt's image/slide pads.
Inputs go to the model's device; outputs come back to CPU as float32 numpy.

Budgets: an ROI is resized (aspect ratio kept) to at most ``max_image_tokens`` visual tokens,
and one vision-tower forward packs ROIs up to ``max_batch_tokens`` tokens; a larger batch from
the deployment's batcher runs as several forwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from smartpath.core.config import SmartPathConfig, StorageConfig
from smartpath.core.storage import ObjectStore
from smartpath.model.mllm import SmartPathModel
from smartpath.model.slide_features import SlideFeatures
from smartpath.model.tile_encoder import TileEncoder, tile_encoder_for
from smartpath.model.vision import RoiInput, make_image_processor, prepare_roi
from smartpath.services.contracts import SlideEvidence, VisualTokens


class VisualEncoder:
    """The served model's visual side (see module docstring)."""

    def __init__(
        self,
        model: SmartPathModel,
        tile_encoder: TileEncoder | None = None,
        *,
        store: ObjectStore | StorageConfig | None = None,
        max_image_tokens: int = 1280,
        max_batch_tokens: int = 16384,
    ) -> None:
        """``tile_encoder`` defaults to the one the model's checkpoint names (loaded from
        ``store`` when it is a learned one), on the model's device."""
        self.model = model
        dtype = next(model.aggregator.parameters()).dtype
        self.tile_encoder = tile_encoder or tile_encoder_for(
            model.cfg, store=store, device=model.device, dtype=dtype
        )
        vision = model.cfg.vision
        self.max_pixels = min(vision.max_pixels, max_image_tokens * vision.factor**2)
        self.processor = make_image_processor(
            vision, min_pixels=min(vision.min_pixels, self.max_pixels), max_pixels=self.max_pixels
        )
        self.max_image_tokens = max_image_tokens
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def from_config(
        cls, model: SmartPathModel, config: SmartPathConfig, store: ObjectStore
    ) -> VisualEncoder:
        """The encoder with the served model's ROI budget and the encoder deployment's."""
        return cls(
            model,
            store=store,
            max_image_tokens=config.model.max_image_tokens,
            max_batch_tokens=config.serve.encoder.max_batch_tokens,
        )

    def prepare(self, image: np.ndarray) -> RoiInput:
        """Resize and patchify one ROI (cheap; done per request before batching).

        Qwen's resize keeps the short side at least one token (28 px) high, so an ROI longer
        and thinner than the token budget is squeezed along its long side to fit."""
        roi = prepare_roi(image, self.processor)
        if roi.num_image_tokens <= self.max_image_tokens:
            return roi
        side = self.model.cfg.vision.factor
        h, w = np.asarray(image).shape[:2]
        size = (
            (side * self.max_image_tokens, side) if w >= h else (side, side * self.max_image_tokens)
        )
        squeezed = np.asarray(Image.fromarray(np.asarray(image)).resize(size, Image.BICUBIC))
        return prepare_roi(squeezed, self.processor)

    def _token_batches(self, rois: Sequence[RoiInput]) -> Iterator[Sequence[RoiInput]]:
        start, tokens = 0, 0
        for i, roi in enumerate(rois):
            if i > start and tokens + roi.num_image_tokens > self.max_batch_tokens:
                yield rois[start:i]
                start, tokens = i, 0
            tokens += roi.num_image_tokens
        if start < len(rois):
            yield rois[start:]

    def encode_rois(self, rois: Sequence[RoiInput]) -> list[VisualTokens]:
        """Vision-tower forwards over the packed ROIs (at most ``max_batch_tokens`` tokens
        each); tokens split back per ROI."""
        out = []
        for batch in self._token_batches(rois):
            pixels = torch.cat([r.pixel_values for r in batch])
            grid = torch.cat([r.image_grid_thw for r in batch])
            with torch.no_grad():
                tokens = self.model.encode_images(pixels, grid).float().cpu().numpy()
            start = 0
            for roi in batch:
                n = roi.num_image_tokens
                t, h, w = (int(v) for v in roi.image_grid_thw[0])
                out.append(VisualTokens(tokens[start : start + n].copy(), (t, h, w)))
                start += n
        return out

    def encode_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 tiles -> (n, D) float32 tile features."""
        return np.asarray(self.tile_encoder.encode(tiles), dtype=np.float32)

    def slide_tokens(self, features: SlideFeatures) -> tuple[VisualTokens, SlideEvidence]:
        """The aggregator's slide tokens for one slide's tile features, and each tile's share
        of its attention."""
        slide, spec = features.to_slide_input(), self.model.cfg.slide_tiles
        with torch.no_grad():
            tokens = self.model.slide_tokens_of(slide)
            weight = self.model.tile_attention_of(slide)
        evidence = SlideEvidence(
            x=features.coords[:, 0].astype(np.int64),
            y=features.coords[:, 1].astype(np.int64),
            tile_px=features.tile_size_px or spec.tile_size * spec.mpp / features.mpp,
            weight=weight.float().cpu().numpy(),
        )
        return VisualTokens(tokens.float().cpu().numpy()), evidence
