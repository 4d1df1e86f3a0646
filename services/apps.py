"""The five Serve applications and the one Serve config (YAML) that deploys them.

``serve_config(config)`` renders the typed SmartPath config into Serve's own deploy schema
(``ServeDeploySchema``): gRPC options, and per application its import path, args and the
deployment's replicas, autoscaling, queue bounds and resources. ``smartpath serve`` deploys
exactly that document, ``smartpath serve --print-config`` prints it, and the Helm chart
renders the same document as the RayService's ``serveConfigV2``.

Each builder (``smartpath.services.apps:tiler`` …) takes Serve's ``args`` mapping; its
``config`` entry is a SmartPath config tree (secrets stay out of it: replicas read them from
``SMARTPATH_*`` environment variables, which win over the file).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from smartpath.core.config import DeploymentConfig, SmartPathConfig
from smartpath.services.contracts import SERVICE_OF_APP, SERVICES

GRPC_SERVICERS = [
    *(s.servicer for s in SERVICES),
    "smartpath.services.grpc_util.add_health_servicer",
]
# Deployment order: callees before callers.
APPS = tuple(s.app for s in SERVICES)


def _deployment_config(config: SmartPathConfig, app: str) -> DeploymentConfig:
    return getattr(config.serve, app)


def deployment_options(config: SmartPathConfig, app: str) -> dict[str, Any]:
    """Serve options of ``app``'s deployment (the ``deployments:`` entry of its config)."""
    d = _deployment_config(config, app)
    return {
        "name": SERVICE_OF_APP[app].deployment,
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": d.autoscaling.min_replicas,
            "max_replicas": d.autoscaling.max_replicas,
            "target_ongoing_requests": d.autoscaling.target_ongoing_requests,
            "upscale_delay_s": d.autoscaling.upscale_delay_s,
            "downscale_delay_s": d.autoscaling.downscale_delay_s,
            "look_back_period_s": d.autoscaling.look_back_period_s,
        },
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        # A replica being replaced (redeploy, scale-down, its node drained) finishes the calls
        # it holds; none outlives the server-side deadline (Serve's default cut: 20 s).
        "graceful_shutdown_timeout_s": config.serve.deadline_s,
    }


SECRETS = {"storage": {"access_key", "secret_key"}}


def config_args(config: SmartPathConfig) -> dict[str, Any]:
    """The builder args for ``config``: the tree without secrets, JSON-ready."""
    return {"config": config.model_dump(mode="json", exclude=SECRETS)}


def secret_env(config: SmartPathConfig) -> dict[str, str]:
    """The config's secrets as the ``SMARTPATH_*`` variables replicas read them from."""
    env = {}
    for field in sorted(SECRETS["storage"]):
        value = getattr(config.storage, field)
        if value is not None:
            env[f"SMARTPATH_STORAGE__{field.upper()}"] = value.get_secret_value()
    return env


def serve_config(config: SmartPathConfig) -> dict[str, Any]:
    """Serve's deploy schema for all five applications (see module docstring)."""
    s = config.serve
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.host, "port": s.http_port},
        "grpc_options": {
            "port": s.grpc_port,
            "grpc_servicer_functions": GRPC_SERVICERS,
            "request_timeout_s": s.request_timeout_s,
            "enable_reflection": True,
        },
        "logging_config": {"encoding": s.log_encoding, "log_level": config.log_level},
        "applications": [
            {
                "name": app,
                "route_prefix": f"/{app}",
                "import_path": f"smartpath.services.apps:{app}",
                "args": config_args(config),
                "deployments": [deployment_options(config, app)],
            }
            for app in APPS
        ],
    }


def _build(cls: type, app: str, args: dict[str, Any]) -> serve.Application:
    config = SmartPathConfig(**args.get("config", {}))
    options = deployment_options(config, app)
    deployment = serve.deployment(cls, **options)
    # mode="python" keeps secrets (from the environment) readable by the replica.
    return deployment.bind(config.model_dump(mode="python"))


def tiler(args: dict[str, Any]) -> serve.Application:
    """The SlideTiler application."""
    from smartpath.services.tiling.service import SlideTilerService

    return _build(SlideTilerService, "tiler", args)


def encoder(args: dict[str, Any]) -> serve.Application:
    """The FeatureEncoder application."""
    from smartpath.services.encoding.service import FeatureEncoderService

    return _build(FeatureEncoderService, "encoder", args)


def router(args: dict[str, Any]) -> serve.Application:
    """The ExpertRouter application."""
    from smartpath.services.routing.service import ExpertRouterService

    return _build(ExpertRouterService, "router", args)


def decoder(args: dict[str, Any]) -> serve.Application:
    """The Decoder application."""
    from smartpath.services.decoding.service import DecoderService

    return _build(DecoderService, "decoder", args)


def gateway(args: dict[str, Any]) -> serve.Application:
    """The Pathology application (the public front door)."""
    from smartpath.services.gateway.service import PathologyService

    return _build(PathologyService, "gateway", args)
