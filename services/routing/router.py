"""The mixture-of-experts gate of the served model, as a service-level decision."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from smartpath.core.errors import InvalidArgumentError
from smartpath.model.grammar import Scale, Task
from smartpath.model.mllm import SmartPathModel


@dataclass(frozen=True)
class Route:
    """The top-k experts of one request, their gate weights and names."""

    experts: tuple[int, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    @property
    def expert_set(self) -> str:
        """Order-free key of the experts ("0+2"): decoder replicas are multiplexed by it."""
        return "+".join(str(e) for e in sorted(self.experts))


def parse_expert_set(key: str, num_experts: int) -> tuple[int, ...]:
    """The expert indices of an ``expert_set`` key (INVALID_ARGUMENT if it is malformed)."""
    try:
        experts = tuple(sorted(int(p) for p in key.split("+")))
    except ValueError:
        raise InvalidArgumentError(f"expert set {key[:40]!r} is not like '0+2'") from None
    if not experts or any(not 0 <= e < num_experts for e in experts):
        raise InvalidArgumentError(
            f"expert set {key[:40]!r} names experts outside [0, {num_experts})"
        )
    return experts


class ExpertGate:
    """Task + scale + pooled visual tokens -> the served model's top-k experts."""

    def __init__(self, model: SmartPathModel) -> None:
        self.router = model.router
        self.hidden = int(model.router.visual_dim)
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
        with torch.no_grad():
            out = self.router(
                torch.tensor([int(task)]),
                torch.tensor([int(scale)]),
                torch.from_numpy(pooled)[None],
            )
        experts = tuple(int(i) for i in out.indices[0])
        return Route(
            experts=experts,
            weights=tuple(float(w) for w in out.weights[0]),
            names=tuple(self.names[e] for e in experts),
        )
