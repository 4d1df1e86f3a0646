"""Typed configuration of the SmartPath model: base preset, experts, router, slide aggregator.

Design decisions:

- One pydantic tree (``ModelConfig``) that is dumped verbatim into every checkpoint manifest, so a
  checkpoint says exactly which model it belongs to. ``extra="forbid"`` everywhere: a typo in a
  YAML file is an error, not a silently ignored key.
- Presets are registered by name in :data:`PRESETS`. ``tiny`` (tests, demo) and ``bench``
  (20–60M parameters, benchmarks) are the same transformers Qwen2.5-VL classes as the real
  model, randomly initialised from ``seed``; ``qwen2.5-vl-3b``/``-7b`` are never built randomly
  and need ``base_path``. A preset's ``text``/``vision`` sizes can be overridden field by field
  (``ModelConfig(preset="tiny", text={"num_layers": 3})``); the result is always complete, so
  ``model_dump()`` round-trips, and frozen so that the sizes cannot drift from the preset.
- Combinations are checked when the config is made (head counts divide, M-RoPE sections fit
  the head dimension, full-attention block indexes exist, pixel budgets are consistent, top-k
  fits the experts) with messages that say which field to change. When weights are loaded from
  ``base_path`` the checkpoint's own config.json is checked against these sizes
  (:func:`smartpath.model.base.check_hf_config`).
- Holds configuration only: no torch modules, no training logic.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Linear layers of the Qwen2.5-VL language model that LoRA experts may wrap.
DTypeSpec = Literal["auto", "float32", "bfloat16", "float16"]
"""A parameter dtype, or "auto" (bfloat16 on CUDA, float32 on CPU; smartpath.model.devices)."""
PromptStyle = Literal["full", "compact"]
"""Instruction prompts a model is trained and served with (see smartpath.model.prompts)."""
StainNorm = Literal["macenko-v1"]
"""Per-slide stain normalisation of tiles before the tile encoder (smartpath.model.stain_norm)."""

LM_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen2.5-VL-7B's M-RoPE split of the rotary half-dimension (64) into (temporal, height, width).
_MROPE_REFERENCE = (16, 24, 24)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextSizes(_Strict):
    """Sizes of the Qwen2.5-VL language model (decoder) for a built preset."""

    vocab_size: int = Field(
        ...,
        ge=300,
        description="BPE vocabulary size to train for this preset's own tokenizer. The embedding "
        "matrix is sized to the actual tokenizer (len(tokenizer)), which can be smaller.",
    )
    hidden_size: int = Field(..., gt=0, description="Width of the residual stream (d_model).")
    num_layers: int = Field(..., gt=0, description="Number of decoder layers.")
    num_heads: int = Field(..., gt=0, description="Query attention heads per layer.")
    num_kv_heads: int = Field(
        ..., gt=0, description="Key/value heads per layer (grouped-query attention)."
    )
    intermediate_size: int = Field(..., gt=0, description="Hidden width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(
        32768, gt=0, description="Longest sequence the rotary embedding is set up for."
    )
    rope_theta: float = Field(1_000_000.0, gt=0, description="Rotary embedding base.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="Epsilon of the RMSNorm layers.")
    tie_word_embeddings: bool = Field(
        False, description="Share the input embedding and the LM head (Qwen2.5-VL-7B does not)."
    )

    @property
    def head_dim(self) -> int:
        """Per-head width: hidden_size / num_heads."""
        return self.hidden_size // self.num_heads

    @property
    def mrope_section(self) -> list[int]:
        """M-RoPE split of head_dim/2 into (temporal, height, width), scaled from 16:24:24."""
        unit = self.head_dim // 16  # head_dim is a multiple of 16, so 2:3:3 splits exactly
        return [2 * unit, 3 * unit, 3 * unit]

    @model_validator(mode="after")
    def _check(self) -> TextSizes:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text.hidden_size ({self.hidden_size}) must be divisible by text.num_heads "
                f"({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"text.num_heads ({self.num_heads}) must be a multiple of text.num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 16:
            raise ValueError(
                f"text head dimension hidden_size/num_heads = {self.head_dim} must be a multiple "
                "of 16 so that M-RoPE can split its rotary half 2:3:3 over (time, height, width); "
                "change text.hidden_size or text.num_heads"
            )
        return self


class VisionSizes(_Strict):
    """Sizes of the Qwen2.5-VL vision tower (ViT + patch merger) and its pixel budget."""

    depth: int = Field(..., gt=0, description="Number of ViT blocks.")
    hidden_size: int = Field(..., gt=0, description="ViT width.")
    intermediate_size: int = Field(..., gt=0, description="Hidden width of the ViT's SwiGLU MLP.")
    num_heads: int = Field(..., gt=0, description="ViT attention heads.")
    patch_size: int = Field(14, gt=0, description="Edge of one square ViT patch in pixels.")
    spatial_merge_size: int = Field(
        2, gt=0, description="The merger joins merge×merge neighbouring patches into one LM token."
    )
    temporal_patch_size: int = Field(
        2, gt=0, description="Frames per patch; a still image is repeated to fill them."
    )
    window_size: int = Field(
        112, gt=0, description="Edge in pixels of the windows of windowed-attention blocks."
    )
    fullatt_block_indexes: list[int] = Field(
        default_factory=list, description="Indexes of the ViT blocks with full (global) attention."
    )
    min_pixels: int = Field(
        56 * 56, gt=0, description="Smallest H×W an ROI is resized to (keeps aspect ratio)."
    )
    max_pixels: int = Field(
        28 * 28 * 1280, gt=0, description="Largest H×W an ROI is resized to (keeps aspect ratio)."
    )

    @property
    def factor(self) -> int:
        """Image sides are resized to multiples of patch_size × spatial_merge_size."""
        return self.patch_size * self.spatial_merge_size

    @model_validator(mode="after")
    def _check(self) -> VisionSizes:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision.hidden_size ({self.hidden_size}) must be divisible by vision.num_heads "
                f"({self.num_heads})"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"vision head dimension {self.hidden_size // self.num_heads} must be a multiple "
                "of 4 (2-D rotary embedding over height and width)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"vision.fullatt_block_indexes {bad} are outside 0..{self.depth - 1} "
                f"(vision.depth is {self.depth})"
            )
        if self.window_size % self.factor:
            raise ValueError(
                f"vision.window_size ({self.window_size}) must be a multiple of patch_size × "
                f"spatial_merge_size ({self.factor})"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"vision.min_pixels ({self.min_pixels}) must not exceed vision.max_pixels "
                f"({self.max_pixels})"
            )
        if self.max_pixels < self.factor**2:
            raise ValueError(
                f"vision.max_pixels ({self.max_pixels}) must allow at least one merged patch "
                f"({self.factor}×{self.factor} = {self.factor**2} pixels)"
            )
        return self


class ExpertsConfig(_Strict):
    """The mixture of LoRA experts on the language model's linear layers."""

    num_experts: int = Field(4, ge=1, description="Number of LoRA experts (E).")
    rank: int = Field(8, ge=1, description="LoRA rank (r) of every expert.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator; scale = alpha / rank.")
    top_k: int = Field(2, ge=1, description="Experts mixed per request by the router's gate.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description=f"LM linear layers wrapped by the experts; any of {list(LM_LINEAR_MODULES)}.",
    )

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in LM_LINEAR_MODULES]
        if unknown:
            raise ValueError(
                f"unknown experts.target_modules {unknown}; choose from {list(LM_LINEAR_MODULES)}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"experts.target_modules {value} lists a module twice")
        return value

    @model_validator(mode="after")
    def _check(self) -> ExpertsConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"experts.top_k ({self.top_k}) cannot exceed experts.num_experts "
                f"({self.num_experts})"
            )
        return self


class RouterConfig(_Strict):
    """The request router that gates the experts."""

    hidden_size: int = Field(256, ge=1, description="Hidden width of the router's MLP.")
    load_balance_weight: float = Field(
        0.01, ge=0, description="Weight of the load-balancing loss term (0 disables it)."
    )


class AggregatorConfig(_Strict):
    """The slide aggregator: N tile features (N×D) → a fixed budget of LM tokens."""

    feature_dim: int = Field(
        32,
        ge=1,
        description="Width D of the input tile features: the tile encoder's (stain-stats-v1: 32; "
        "ViT-B: 768; ViT-L: 1024).",
    )
    num_tokens: int = Field(32, ge=1, description="LM tokens one slide becomes.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the pooling/resampler.")
    chunk_size: int = Field(
        4096, ge=1, description="Tiles attended per chunk (bounds memory for huge slides)."
    )


class SlideTiles(_Strict):
    """How slides are tiled for the model's tile encoder: the WSI tile spec its slide features
    are made with, in training and in serving alike."""

    mpp: float = Field(0.5, gt=0, description="Tile resolution, µm/px.")
    tile_size: int = Field(96, ge=16, le=1024, description="Tile edge at that resolution, px.")
    min_tissue: float = Field(0.3, ge=0, le=1, description="Tissue share a tile needs.")
    stain_norm: StainNorm | None = Field(
        None,
        description="Per-slide stain normalisation of the tiles before the tile encoder "
        "(smartpath.model.stain_norm); None: tiles as scanned. Part of the features' identity.",
    )


_LABEL_KEY = re.compile(r"^(classification|detection|segmentation|vqa)/(roi|wsi)$")


class Preset(_Strict):
    """A named base model: sizes to build it randomly, or the sizes a checkpoint must have."""

    description: str = Field(..., description="What the preset is for.")
    text: TextSizes = Field(..., description="Language model sizes.")
    vision: VisionSizes = Field(..., description="Vision tower sizes and pixel budget.")
    requires_base_path: bool = Field(
        False, description="True if the preset is only ever loaded from a checkpoint."
    )


# The vision tower of every Qwen2.5-VL size (3B, 7B, 32B, 72B).
_QWEN_VISION = VisionSizes(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    fullatt_block_indexes=[7, 15, 23, 31],
    max_pixels=12845056,
)

_QWEN_7B_TEXT = TextSizes(
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    max_position_embeddings=128000,
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        description="tests and the demo: ~0.27M parameters, random init, CPU in milliseconds",
        text=TextSizes(
            vocab_size=1024,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            max_position_embeddings=4096,
        ),
        vision=VisionSizes(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            fullatt_block_indexes=[1],
            max_pixels=224 * 224,
        ),
    ),
    "bench": Preset(
        description="benchmarks: 31–39M parameters (by tokenizer size), random init, same "
        "classes as the real model",
        text=TextSizes(
            vocab_size=8192,
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=1536,
            max_position_embeddings=8192,
        ),
        vision=VisionSizes(
            depth=4,
            hidden_size=256,
            intermediate_size=768,
            num_heads=4,
            fullatt_block_indexes=[1, 3],
            max_pixels=448 * 448,
        ),
    ),
    "qwen2.5-vl-3b": Preset(
        description="Qwen2.5-VL-3B-Instruct loaded from base_path (HF format, safetensors)",
        text=TextSizes(
            vocab_size=151936,
            hidden_size=2048,
            num_layers=36,
            num_heads=16,
            num_kv_heads=2,
            intermediate_size=11008,
            max_position_embeddings=128000,
            tie_word_embeddings=True,
        ),
        vision=_QWEN_VISION,
        requires_base_path=True,
    ),
    "qwen2.5-vl": Preset(
        description="any Qwen2.5-VL checkpoint loaded from base_path, sizes overridden from its "
        "config.json (smartpath model init); defaults are the 7B's",
        text=_QWEN_7B_TEXT,
        vision=_QWEN_VISION,
        requires_base_path=True,
    ),
    "qwen2.5-vl-7b": Preset(
        description="Qwen2.5-VL-7B-Instruct loaded from base_path (HF format, safetensors)",
        text=_QWEN_7B_TEXT,
        vision=_QWEN_VISION,
        requires_base_path=True,
    ),
}


def _merged(base: BaseModel, override: Any) -> Any:
    """``override`` as given, or ``base``'s fields updated with a partial dict override."""
    if override is None:
        return base.model_dump()
    if isinstance(override, dict):
        return {**base.model_dump(), **override}
    return override


class ModelConfig(_Strict):
    """The whole SmartPath model: base (preset or checkpoint), experts, router, aggregator.

    Frozen: ``text``/``vision`` are filled from the preset once, so changing ``preset`` in place
    would leave stale sizes. Make a new config instead (drop ``text``/``vision`` from the dump
    when switching presets).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field(
        "tiny", description=f"Base model preset, one of {sorted(PRESETS)} (see PRESETS)."
    )
    base_path: str | None = Field(
        None,
        description="HF-format Qwen2.5-VL checkpoint: a local folder or an s3://bucket/prefix/. "
        "None builds the preset randomly initialised from `seed`.",
    )
    text: TextSizes = Field(
        None,  # type: ignore[assignment]  # filled from the preset before validation
        description="Language model sizes; defaults to the preset's, any field can be overridden.",
    )
    vision: VisionSizes = Field(
        None,  # type: ignore[assignment]
        description="Vision tower sizes; defaults to the preset's, any field can be overridden.",
    )
    experts: ExpertsConfig = Field(
        default_factory=ExpertsConfig, description="Mixture of LoRA experts."
    )
    router: RouterConfig = Field(default_factory=RouterConfig, description="Expert router.")
    aggregator: AggregatorConfig = Field(
        default_factory=AggregatorConfig, description="Slide aggregator (WSI path)."
    )
    image_positions: bool = Field(
        False,
        description="Add learnt absolute 2-D positions to the vision tower's tokens "
        "(smartpath.model.image_position); a tiny model needs them to localise objects.",
    )
    prompt_style: PromptStyle = Field(
        "full",
        description="Instruction prompts the model is trained and served with "
        "(smartpath.model.prompts.PROMPT_STYLES): 'full' (SmartPath-R1's, with format "
        "instructions) or 'compact' (task, labels or question only; the tiny demo model).",
    )
    tile_encoder: str = Field(
        "stain-stats-v1",
        description="Tile encoder (smartpath.model.tile_encoder) that makes the slide features "
        "the aggregator reads.",
    )
    tile_encoder_path: str | None = Field(
        None,
        description="HF-format ViT/DINOv2 folder or s3://bucket/prefix/ of the tile encoder, when "
        "`tile_encoder` names a learned one; None for the built-in, weight-free encoders.",
    )
    slide_tiles: SlideTiles = Field(
        default_factory=SlideTiles, description="WSI tile spec of the tile encoder's input."
    )
    labels: dict[str, list[str]] = Field(
        default_factory=dict,
        description='The label taxonomy per "task/scale" (e.g. "classification/roi"): the '
        "candidate labels when a request names none. Empty: requests must give labels.",
    )
    seed: int = Field(0, ge=0, description="Seed of random initialisation (deterministic).")
    device: str = Field(
        "auto",
        description='Device the model runs on: "auto" (CUDA when a GPU is visible, else CPU), '
        '"cpu", "cuda" or "cuda:N".',
    )
    dtype: DTypeSpec = Field(
        "auto",
        description='Parameter dtype of the model: "auto" is bfloat16 on CUDA and float32 on '
        "CPU (smartpath.model.devices).",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "tiny")
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[name]
        return {
            **data,
            "text": _merged(preset.text, data.get("text")),
            "vision": _merged(preset.vision, data.get("vision")),
        }

    @field_validator("labels")
    @classmethod
    def _label_taxonomy(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, labels in value.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f'labels key {key!r} is not "task/scale" (e.g. "detection/roi")')
            if not labels or len(set(labels)) != len(labels) or not all(s.strip() for s in labels):
                raise ValueError(f"labels[{key!r}] must be distinct, non-empty names")
        return value

    @field_validator("base_path")
    @classmethod
    def _base_path_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("base_path is empty; use null to build the preset randomly")
        if value.startswith("s3://") and len(value.rstrip("/")) <= len("s3://"):
            raise ValueError(f"base_path {value!r} names no bucket; expected s3://bucket/prefix/")
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        preset = PRESETS[self.preset]
        if preset.requires_base_path and self.base_path is None:
            raise ValueError(
                f"preset {self.preset!r} is not built randomly: set base_path to its HF-format "
                "checkpoint (local folder or s3://bucket/prefix/), or use preset 'tiny'/'bench'"
            )
        return self
