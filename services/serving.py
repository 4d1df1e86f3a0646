"""Start Ray Serve with SmartPath's gRPC proxy options and deploy the applications.

The same functions back ``smartpath serve``, the demo and the tests; on Kubernetes the
chart's RayService renders the equivalent serveConfigV2.
"""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from smartpath.services.config import SmartPathConfig
from smartpath.services.tiling.service import tiler_deployment

logger = logging.getLogger("smartpath.serving")

GRPC_SERVICERS = [
    "smartpath.v1.tiling_pb2_grpc.add_SlideTilerServicer_to_server",
    "smartpath.services.grpc_util.add_health_servicer",
]
TILER_APP = "tiler"


def grpc_options(config: SmartPathConfig) -> gRPCOptions:
    """The gRPC proxy's options: SmartPath's services, health and reflection."""
    return gRPCOptions(
        port=config.serve.grpc_port,
        grpc_servicer_functions=GRPC_SERVICERS,
        request_timeout_s=config.serve.request_timeout_s,
        enable_reflection=True,
    )


def start(config: SmartPathConfig, *, num_cpus: int | None = None) -> None:
    """Join (or start locally) a Ray cluster and start Serve's HTTP and gRPC proxies."""
    if not ray.is_initialized():
        if config.serve.ray_address:
            ray.init(address=config.serve.ray_address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(
        http_options={"host": config.serve.host, "port": config.serve.http_port},
        grpc_options=grpc_options(config),
    )


def deploy(config: SmartPathConfig) -> None:
    """Deploy (or update) the SmartPath applications and wait until they run."""
    serve.run(tiler_deployment(config), name=TILER_APP, route_prefix=f"/{TILER_APP}")
    logger.info("deployed %s on gRPC port %d", TILER_APP, config.serve.grpc_port)


def shutdown() -> None:
    """Stop Serve and Ray (for the demo and tests)."""
    serve.shutdown()
    ray.shutdown()
