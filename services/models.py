"""The served model: loaded once per replica from the configured checkpoint, and the facts
about it that the gateway reports and validates requests against."""

from __future__ import annotations

from collections.abc import Sequence

from smartpath.core.config import SmartPathConfig
from smartpath.model.checkpoint import DEMO_MODEL_DIR
from smartpath.model.mllm import MODEL_PARTS, ModelPart, SmartPathModel
from smartpath.services.contracts import ModelInfo

SERVICE_PARTS: dict[str, tuple[ModelPart, ...]] = {
    "encoder": ("vision",),
    "router": ("router",),
    "decoder": ("language",),
}
"""The model parts each model-serving deployment loads (the tiler and gateway load none)."""


def load_served_model(
    config: SmartPathConfig, parts: Sequence[ModelPart] = MODEL_PARTS
) -> SmartPathModel:
    """``parts`` of the model named by ``config.model.uri`` (the packaged demo model when
    unset) on ``config.model.device`` in ``config.model.dtype``, in eval mode; the engines run
    it under ``torch.no_grad()``."""
    src = config.model.uri or DEMO_MODEL_DIR
    m = config.model
    model = SmartPathModel.load(
        src, store=config.storage, parts=parts, device=m.device, dtype=m.dtype
    )
    return model.eval()


def model_version(model: SmartPathModel) -> str:
    """``preset@weights-sha256-prefix``: changes whenever the weights do."""
    digest = model.manifest.weights.sha256[:12] if model.manifest is not None else "unsaved"
    return f"{model.cfg.preset}@{digest}"


def model_info(model: SmartPathModel) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded model."""
    cfg = model.cfg
    manifest = model.manifest
    return ModelInfo(
        version=model_version(model),
        preset=cfg.preset,
        experts=[e.name for e in manifest.experts] if manifest is not None else [],
        top_k=int(cfg.experts.top_k),
        tile_encoder=cfg.tile_encoder,
        slide_tiles=cfg.slide_tiles,
        prompt_style=cfg.prompt_style,
        labels={k: list(v) for k, v in cfg.labels.items()},
    )
