"""The ExpertRouter Ray Serve deployment: the mixture-of-experts gate as a service."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray.serve import metrics

from smartpath.core.config import SmartPathConfig
from smartpath.model.grammar import Scale, Task
from smartpath.services.contracts import Route, parse_scale, parse_task
from smartpath.services.grpc_util import RpcCounter, RpcGuard, log_to_replica, unary
from smartpath.services.models import SERVICE_PARTS, load_served_model
from smartpath.services.routing.router import ExpertGate
from smartpath.services.tensors import from_tensor
from smartpath.v1 import common_pb2, routing_pb2


class ExpertRouterService:
    """Ray Serve deployment class serving ``smartpath.v1.ExpertRouter``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = SmartPathConfig(**config)
        log_to_replica(self.config)
        self.gate = ExpertGate(load_served_model(self.config, SERVICE_PARTS["router"]))
        self.record_rpc = RpcCounter("router")
        self.guard = RpcGuard.from_config(self.config, "router")
        self._routes = metrics.Counter(
            "smartpath_router_expert_sets",
            description="Requests routed, by task/scale and chosen expert set.",
            tag_keys=("key", "expert_set"),
        )

    async def route(self, task: Task, scale: Scale, pooled: np.ndarray) -> Route:
        """The top-k experts of one request."""
        route = await asyncio.to_thread(self.gate.route, task, scale, pooled)
        key = f"{task.name.lower()}/{scale.name.lower()}"
        self._routes.inc(tags={"key": key, "expert_set": route.expert_set})
        return route

    @unary(routing_pb2.RouteResponse)
    async def Route(self, request: routing_pb2.RouteRequest) -> routing_pb2.RouteResponse:
        task, scale = parse_task(request.task), parse_scale(request.scale)
        pooled = from_tensor(request.pooled, "pooled", ndim=1)
        route = await self.route(task, scale, pooled)
        return routing_pb2.RouteResponse(
            experts=[
                common_pb2.ExpertWeight(index=e, name=n, weight=w)
                for e, n, w in zip(route.experts, route.names, route.weights, strict=True)
            ],
            expert_set=route.expert_set,
        )
