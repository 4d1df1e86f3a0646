"""The served model: loaded once per replica from the configured checkpoint."""

from __future__ import annotations

from smartpath.model.checkpoint import DEMO_MODEL_DIR
from smartpath.model.mllm import SmartPathModel
from smartpath.services.config import SmartPathConfig


def load_served_model(config: SmartPathConfig) -> SmartPathModel:
    """The model named by ``config.model.uri`` (the packaged demo model when unset), in eval
    mode; the engines run it under ``torch.no_grad()``."""
    src = config.model.uri or DEMO_MODEL_DIR
    return SmartPathModel.load(src, store=config.storage).eval()


def model_version(model: SmartPathModel) -> str:
    """``preset@weights-sha256-prefix``: changes whenever the weights do."""
    digest = model.manifest.weights.sha256[:12] if model.manifest is not None else "unsaved"
    return f"{model.cfg.preset}@{digest}"
