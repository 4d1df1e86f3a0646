"""Start Ray Serve and deploy the SmartPath applications from the one Serve config.

The same functions back ``smartpath serve``, the demo and the tests; on Kubernetes the
chart's RayService carries the same document (``smartpath.services.apps.serve_config``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Literal

import ray
from ray import serve
from ray.serve.api import RunTarget
from ray.serve.config import gRPCOptions

from smartpath.core.config import SmartPathConfig
from smartpath.services import apps
from smartpath.services.apps import APPS, serve_config

logger = logging.getLogger("smartpath.serving")


def required_cpus(config: SmartPathConfig) -> float:
    """CPUs the minimum replicas of all applications reserve."""
    return sum(
        getattr(config.serve, app).num_cpus
        * max(1, getattr(config.serve, app).autoscaling.min_replicas)
        for app in APPS
    )


def proxy_environment(config: SmartPathConfig) -> dict[str, str]:
    """Environment Serve's proxies and replicas read when their processes start: the Ray
    nodes' own (set before a local Ray starts; the chart puts it on every Ray container). One
    message limit for the public gRPC proxy and for the replicas' inter-deployment gRPC (whose
    own default, 4 MiB, would refuse a large result of an inline call)."""
    limit = str(config.serve.max_message_bytes)
    return {
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": limit,
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": limit,
    }


def start(
    config: SmartPathConfig,
    *,
    num_cpus: float | None = None,
    proxy_location: Literal["EveryNode", "HeadOnly"] | None = None,
) -> None:
    """Join (or start locally) a Ray cluster and start Serve's HTTP and gRPC proxies.

    A local Ray gets at least the CPUs the replicas reserve (logical CPUs may exceed the
    cores: the replicas mostly wait on each other) and the proxies' environment. Proxies run
    where the Serve config says (every node with a replica) unless ``proxy_location`` says
    otherwise: ``HeadOnly`` where several Ray nodes share one host, whose gRPC port only one
    proxy can bind."""
    if not ray.is_initialized():
        if config.serve.ray_address:
            ray.init(address=config.serve.ray_address, logging_level=logging.WARNING)
        else:
            os.environ.update(proxy_environment(config))
            cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(required_cpus(config)) + 1)
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    schema = serve_config(config)
    serve.start(
        proxy_location=proxy_location or schema["proxy_location"],
        http_options=schema["http_options"],
        grpc_options=gRPCOptions(**schema["grpc_options"]),
    )


def deploy(config: SmartPathConfig) -> None:
    """Deploy (or update) the five applications and wait until they run.

    Builds each application here from the same builders and options the Serve config
    names (``apps.serve_config``), which spares the cluster one import-heavy build task per
    application; a RayService deploys the config document itself."""
    logging_config = serve_config(config)["logging_config"]
    with _secrets_in_environment(config):
        targets = [
            RunTarget(
                getattr(apps, app)(apps.config_args(config)),
                name=app,
                route_prefix=f"/{app}",
                logging_config=logging_config,
            )
            for app in APPS
        ]
    serve.run_many(targets)  # the replicas of all five start side by side
    logger.info("deployed %s on gRPC port %d", ", ".join(APPS), config.serve.grpc_port)


@contextlib.contextmanager
def _secrets_in_environment(config: SmartPathConfig) -> Iterator[None]:
    """Builders read secrets from SMARTPATH_* variables, as replicas do in a cluster."""
    env = apps.secret_env(config)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown() -> None:
    """Stop Serve and Ray (for the demo and tests)."""
    serve.shutdown()
    ray.shutdown()


def drain_and_shutdown() -> None:
    """Stop taking calls, let the calls in flight finish, then stop Serve and Ray.

    The gateway (the only entry of client calls) goes first: its replicas finish the calls
    they hold (graceful_shutdown_timeout_s = serve.deadline_s) while the services those calls
    still need keep running; Serve's own shutdown stops every application at once, which
    would fail a call in flight at the gateway that has yet to reach the decoder."""
    serve.delete("gateway", _blocking=True)
    shutdown()
