"""The mixture-of-experts gate of the served model, as a service-level decision."""

from __future__ import annotations

import numpy as np
import torch

from smartpath.core.errors import InvalidArgumentError
from smartpath.model.grammar import Scale, Task
from smartpath.model.mllm import SmartPathModel
from smartpath.services.contracts import Route


class ExpertGate:
    """Task + scale + pooled visual tokens -> the served model's top-k experts."""

    def __init__(self, model: SmartPathModel) -> None:
        self.router = model.router
        self.hidden = int(model.router.visual_dim)
        self.device = model.device
        self.dtype = next(model.router.parameters()).dtype
        manifest = model.manifest
        n = int(model.cfg.experts.num_experts)
        names = {e.index: e.name for e in manifest.experts} if manifest is not None else {}
        self.names = tuple(names.get(i, f"expert-{i}") for i in range(n))

    def route(self, task: Task, scale: Scale, pooled: np.ndarray) -> Route:
        """The router's deterministic top-k choice for one request."""
        pooled = np.asarray(pooled, dtype=np.float32)
        if pooled.shape != (self.hidden,) or not np.isfinite(pooled).all():
            raise InvalidArgumentError(
                f"pooled visual features must be {self.hidden} finite floats, got {pooled.shape}"
            )
        device = self.device
        with torch.no_grad():
            out = self.router(
                torch.tensor([int(task)], device=device),
                torch.tensor([int(scale)], device=device),
                torch.from_numpy(pooled)[None].to(device, self.dtype),
            )
        experts = tuple(int(i) for i in out.indices[0].cpu())
        return Route(
            experts=experts,
            weights=tuple(float(w) for w in out.weights[0].float().cpu()),
            names=tuple(self.names[e] for e in experts),
        )
