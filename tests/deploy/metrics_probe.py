"""Which names Ray really exports: start a local Ray with a metrics export port, run a Serve
application whose replica defines metrics the way the services do (``RpcCounter`` and
``ray.serve.metrics``), call it through Serve's gRPC proxy, make a second replica fail its health
checks, and print the metric names scraped from Ray's metrics agent as JSON.

``tests/deploy/test_chart_monitoring.py`` runs it (slow: about a minute) to check the rule it
applies to the code's metric definitions, ``ray_`` + name, counters + ``_total`` (unless the name
already ends with it), histograms + ``_bucket``/``_sum``/``_count``, and that Serve's own metrics
the chart alerts on appear under the names it uses::

    .venv/bin/python -m tests.deploy.metrics_probe
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.request
from typing import Any

# What the probe's replica defines (kind, name given to ray.serve.metrics), besides RpcCounter.
PROBE_METRICS = (
    ("Counter", "smartpath_probe_items"),
    ("Histogram", "smartpath_probe_queue_seconds"),
    ("Gauge", "smartpath_probe_items_per_second"),
)
PROBE_SERVICE = "probe"  # RpcCounter("probe") counts smartpath_probe_rpcs
# Exported once the calls below were made and the flaky replica failed its health checks.
WAIT_FOR = (
    "ray_smartpath_probe_rpcs_total",
    "ray_smartpath_probe_queue_seconds_bucket",
    "ray_smartpath_probe_items_per_second",
    "ray_serve_grpc_request_latency_ms_bucket",
    "ray_serve_deployment_processing_latency_ms_bucket",
    "ray_serve_health_check_failures_total",
)
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric_names(exposition: str) -> list[str]:
    """The metric names of a Prometheus text exposition."""
    return sorted(set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposition, re.M)))


def probe() -> list[str]:
    import grpc
    import ray
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve

    metrics_port, grpc_port = _free_port(), _free_port()
    ray.init(_metrics_export_port=metrics_port, include_dashboard=False, num_cpus=2)

    @serve.deployment
    class Probe:
        def __init__(self) -> None:
            from ray.serve import metrics

            from smartpath.services.grpc_util import RpcCounter

            self.record_rpc = RpcCounter(PROBE_SERVICE)
            made = {}
            for kind, name in PROBE_METRICS:
                options: dict[str, Any] = {"description": name}
                if kind == "Histogram":
                    options["boundaries"] = [0.1, 1.0]
                made[kind] = getattr(metrics, kind)(name, **options)
            self.made = made

        async def Check(self, request: Any) -> Any:  # grpc.health.v1.Health/Check
            self.record_rpc("Check", grpc.StatusCode.OK)
            self.record_rpc("Check", grpc.StatusCode.INTERNAL)
            self.made["Counter"].inc(3)
            self.made["Histogram"].observe(0.5)
            self.made["Gauge"].set(3.0)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    @serve.deployment(health_check_period_s=1, health_check_timeout_s=2)
    class Flaky:
        def __init__(self) -> None:
            self.checks = 0

        def check_health(self) -> None:
            self.checks += 1
            if self.checks > 2:
                raise RuntimeError("unhealthy on purpose")

        def __call__(self) -> str:
            return "ok"

    try:
        serve.start(
            grpc_options={
                "port": grpc_port,
                "grpc_servicer_functions": [
                    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
                ],
            }
        )
        serve.run(Probe.bind(), name="probe", route_prefix="/probe")
        serve.run(Flaky.bind(), name="flaky", route_prefix="/flaky")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(3):
                stub.Check(health_pb2.HealthCheckRequest(), metadata=(("application", "probe"),))
        deadline = time.monotonic() + TIMEOUT_S
        names: list[str] = []
        while time.monotonic() < deadline:
            names = metric_names(scrape(metrics_port))
            if set(WAIT_FOR) <= set(names):
                break
            time.sleep(3)
        return names
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    print(json.dumps(probe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
