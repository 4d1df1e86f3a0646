"""The served model: loaded once per replica from the configured checkpoint, and the facts
about it that the gateway reports and validates requests against."""

from __future__ import annotations

from smartpath.core.config import SmartPathConfig
from smartpath.model.checkpoint import DEMO_MODEL_DIR
from smartpath.model.mllm import SmartPathModel
from smartpath.services.contracts import ModelInfo


def load_served_model(config: SmartPathConfig) -> SmartPathModel:
    """The model named by ``config.model.uri`` (the packaged demo model when unset), in eval
    mode; the engines run it under ``torch.no_grad()``."""
    src = config.model.uri or DEMO_MODEL_DIR
    return SmartPathModel.load(src, store=config.storage).eval()


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
