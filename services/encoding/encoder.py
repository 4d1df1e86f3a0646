"""Visual encoding of the served model: ROI images through the vision tower, slide tiles
through the tile encoder, tile features through the slide aggregator.

Everything returns visual tokens in the language model's embedding space (``VisualTokens``),
which is what the router pools and the decoder places at the prompt's image/slide pads.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from smartpath.core.config import ModelServingConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.model.mllm import SmartPathModel
from smartpath.model.slide_features import SlideFeatures
from smartpath.model.tile_encoder import TileEncoder, make_tile_encoder
from smartpath.model.vision import RoiInput, make_image_processor, prepare_roi


@dataclass(frozen=True)
class VisualTokens:
    """(n, hidden) float32 tokens of one image or slide; ROIs also carry their image grid."""

    tokens: np.ndarray
    image_grid_thw: tuple[int, int, int] | None = None

    @property
    def pooled(self) -> np.ndarray:
        """(hidden,) mean token: the router's view of the image."""
        return self.tokens.mean(axis=0)


def decode_image(data: bytes, limits: ModelServingConfig) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8, within the configured size limits."""
    if not data:
        raise InvalidArgumentError("image is empty; send PNG or JPEG bytes")
    if len(data) > limits.max_image_bytes:
        raise InvalidArgumentError(
            f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}"
        )
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise InvalidArgumentError(f"image format {image.format} is not PNG or JPEG")
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise InvalidArgumentError(
                f"image is {width}x{height} px; the limit is {limits.max_image_pixels} pixels"
            )
        return np.asarray(image.convert("RGB"))
    except InvalidArgumentError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidArgumentError(f"image bytes do not decode as PNG or JPEG ({e})") from None


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
