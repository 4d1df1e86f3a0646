"""Serve autoscaling on a local two-node Ray cluster, driven by real gRPC load.

Run by ``tests/services/test_autoscaling.py`` in a process of its own (a multi-node
``ray.cluster_utils.Cluster`` cannot share a process with the test session's Ray)::

    python -m tests.services.autoscaling_scenario TMP_DIR

The head node declares exactly the CPUs of every application's minimum replicas; a worker node
(added once the stack runs, as the Ray autoscaler adds one) declares the CPUs of the extra
encoder and decoder replicas. Client threads call ``Pathology.AnalyzeRegion`` through the one
Serve proxy on the head until Serve has scaled encoder and decoder out (or a time limit), then
stop; the scenario waits for the scale-in (or a time limit), removes the worker node and calls
again. The last line of output is a JSON object of what was observed (``Observations``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smartpath.core.config import SmartPathConfig, load_config

AUTOSCALED = ("encoder", "decoder")
# The autoscaling the test exercises (the chart takes the same keys: tests/deploy/test_chart.py).
AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 2,
    # Far below what the clients keep in flight (a call or so at the encoder, most of them at
    # the decoder): Serve averages sparse samples (here one per 2.2 s) of these small counts.
    "target_ongoing_requests": 0.1,
    "upscale_delay_s": 1.0,
    # Longer than Serve's metrics push interval (metrics_interval_s, 10 s): one low report
    # (an encoder reading 0 under load happens) does not scale in a replica still starting.
    "downscale_delay_s": 12.0,
    # Above the push interval too, as Serve requires.
    "look_back_period_s": 11.0,
}
# Replica CPUs: they sum to a whole number, the head node's CPUs.
CPUS = {"tiler": 0.5, "encoder": 1.0, "router": 0.25, "decoder": 1.0, "gateway": 0.25}
CLIENTS = 12
CALL_TIMEOUT_S = 30.0
SCALE_UP_LIMIT_S = 60.0
HOLD_S = 3.0  # load goes on this long once scaled out, so calls reach the new replicas
SCALE_DOWN_LIMIT_S = 60.0
SAMPLE_EVERY_S = 0.5
CALLS_AFTER_REMOVAL = 4


@dataclass
class Observations:
    """What the scenario saw; times are seconds since the load started."""

    head_node: str
    worker_node: str
    # (t, {app: (running replicas, replicas in any state)}), every SAMPLE_EVERY_S.
    timeline: list[tuple[float, dict[str, tuple[int, int]]]] = field(default_factory=list)
    placements: dict[str, dict[str, str]] = field(default_factory=dict)
    max_running: dict[str, int] = field(default_factory=dict)
    scale_up_started_s: dict[str, float | None] = field(default_factory=dict)
    scaled_up_s: dict[str, float | None] = field(default_factory=dict)
    load_stopped_s: float = 0.0
    scaled_down_s: dict[str, float | None] = field(default_factory=dict)
    nodes_after_scale_down: dict[str, list[str]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    call_s: dict[str, float] = field(default_factory=dict)
    stage_ms: dict[str, float] = field(default_factory=dict)  # mean per stage under load
    calls_after_removal: dict[str, int] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)


def scenario_config(tmp: Path) -> SmartPathConfig:
    """Local storage in ``tmp``, free ports, no auth; encoder and decoder autoscale."""
    from tests.conftest import free_port

    defaults = SmartPathConfig().serve
    serve: dict[str, Any] = {"grpc_port": free_port(), "http_port": free_port(), "deadline_s": 30}
    for app, cpus in CPUS.items():
        fixed = {"min_replicas": 1, "max_replicas": 1}
        deployment = getattr(defaults, app).model_dump()
        deployment["num_cpus"] = cpus
        deployment["autoscaling"] = AUTOSCALING if app in AUTOSCALED else fixed
        serve[app] = deployment
    return load_config(
        storage={"local_root": str(tmp / "storage")},
        slide_cache={"dir": str(tmp / "slide-cache")},
        serve=serve,
        log_level="WARNING",
    )


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    image = np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def replicas(app: str) -> list[tuple[str, str, str | None]]:
    """(replica id, state, node id) of each replica of ``app``'s deployment."""
    from ray import serve

    from smartpath.services.contracts import SERVICE_OF_APP

    # The public route to replica placement is the dashboard's REST API; the scenario runs no
    # dashboard (two cores), so it asks the controller what that API would answer.
    details = serve.context._get_global_client().get_serve_details()
    deployment = details["applications"][app]["deployments"][SERVICE_OF_APP[app].deployment]
    return [(r["replica_id"], r["state"], r.get("node_id")) for r in deployment["replicas"]]


class Sampler(threading.Thread):
    """Records running replicas of the autoscaled deployments, and where each ran."""

    def __init__(self, obs: Observations, t0: float) -> None:
        super().__init__(daemon=True)
        self.obs, self.t0 = obs, t0
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.last: dict[str, list[tuple[str, str, str | None]]] = {}
        self.scaled_out: set[str] = set()  # apps seen running more than one replica

    def sample(self) -> None:
        now = {app: replicas(app) for app in AUTOSCALED}
        counts = {app: (sum(s == "RUNNING" for _, s, _ in rs), len(rs)) for app, rs in now.items()}
        with self.lock:
            self.last = now
            self.obs.timeline.append((round(time.monotonic() - self.t0, 2), counts))
            self.scaled_out |= {app for app, (running, _) in counts.items() if running > 1}
            for app, rs in now.items():
                for rid, state, node in rs:
                    if state == "RUNNING" and node:
                        self.obs.placements.setdefault(app, {})[rid] = node

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_EVERY_S):
            self.sample()

    def all_scaled_out(self) -> bool:
        with self.lock:
            return self.scaled_out >= set(AUTOSCALED)

    def all_replicas(self) -> dict[str, int]:
        with self.lock:
            return {app: len(rs) for app, rs in self.last.items()}


class Load:
    """``CLIENTS`` threads calling AnalyzeRegion until stopped; each call's code and time."""

    def __init__(self, port: int) -> None:
        import grpc

        from smartpath.v1 import common_pb2, pathology_pb2, pathology_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = pathology_pb2_grpc.PathologyStub(self.channel)
        question = pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION)
        self.requests = [
            pathology_pb2.AnalyzeRegionRequest(image=_png(seed), question=question)
            for seed in range(4)
        ]
        self.stopped = threading.Event()
        self.calls: list[tuple[str, float]] = []
        self.stage_ms: list[dict[str, float]] = []  # of each call made under load that succeeded
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def call(self, i: int) -> tuple[str, float, dict[str, float]]:
        """One AnalyzeRegion call: its status code name, seconds and the answer's stage times."""
        import grpc

        from smartpath.v1 import pathology_pb2

        start = time.monotonic()
        stages: dict[str, float] = {}
        try:
            response = self.stub.AnalyzeRegion(
                self.requests[i % len(self.requests)],
                metadata=(("application", "gateway"),),
                timeout=CALL_TIMEOUT_S,
            )
            code = "OK"
            stages = {pathology_pb2.Stage.Name(t.stage): t.ms for t in response.analysis.timings}
        except grpc.RpcError as exc:
            code = exc.code().name
        return code, time.monotonic() - start, stages

    def _client(self, i: int) -> None:
        while not self.stopped.is_set():
            code, seconds, stages = self.call(i)
            with self.lock:
                self.calls.append((code, seconds))
                if stages:
                    self.stage_ms.append(stages)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=CALL_TIMEOUT_S + 5)


def _wait(condition: Callable[[], bool], limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


class Phases:
    """Seconds each phase of the scenario took."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into, self.last = into, time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.into[name] = round(now - self.last, 2)
        self.last = now


def summarise(obs: Observations, load: Load) -> None:
    """Fill in the counts, times and placements ``obs`` reports from its timeline."""
    for app in AUTOSCALED:
        counts = [(t, apps[app][0]) for t, apps in obs.timeline]
        obs.max_running[app] = max(n for _, n in counts)
        started = [t for t, apps in obs.timeline if apps[app][1] >= 2]
        obs.scale_up_started_s[app] = started[0] if started else None
        up = [t for t, n in counts if n >= 2]
        obs.scaled_up_s[app] = up[0] if up else None
        # Scaled in: the first sample after the load stopped from which one replica ran on.
        down = None
        for t, n in counts:
            if t < obs.load_stopped_s:
                continue
            if n != 1:
                down = None
            elif down is None:
                down = t
        obs.scaled_down_s[app] = down
        obs.nodes_after_scale_down[app] = sorted(
            node for _, state, node in replicas(app) if state == "RUNNING" and node
        )
    obs.calls = dict(Counter(code for code, _ in load.calls))
    seconds = sorted(s for code, s in load.calls if code == "OK")
    if seconds:
        obs.call_s = {"p50": round(seconds[len(seconds) // 2], 3), "max": round(seconds[-1], 3)}
    stages = sorted({name for call in load.stage_ms for name in call})
    n = max(1, len(load.stage_ms))
    obs.stage_ms = {k: round(sum(c.get(k, 0.0) for c in load.stage_ms) / n, 1) for k in stages}


def run(tmp: Path) -> Observations:
    """The scenario (see module docstring)."""
    from ray.cluster_utils import Cluster

    from smartpath.services import serving

    config = scenario_config(tmp)
    # The Ray nodes started below inherit this environment, and their proxies with it.
    os.environ.update(serving.proxy_environment(config))
    extra_cpus = sum(
        (AUTOSCALING["max_replicas"] - AUTOSCALING["min_replicas"]) * CPUS[app]
        for app in AUTOSCALED
    )
    phases: dict[str, float] = {}
    phase = Phases(phases)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": int(serving.required_cpus(config)), "include_dashboard": False},
    )
    try:
        config.serve.ray_address = cluster.address
        serving.start(config, proxy_location="HeadOnly")
        phase.done("start")
        serving.deploy(config)
        phase.done("deploy")
        worker = cluster.add_node(num_cpus=int(extra_cpus))
        obs = Observations(head_node=cluster.head_node.node_id, worker_node=worker.node_id)
        obs.phases_s = phases
        phase.done("add_worker")
        load = Load(config.serve.grpc_port)
        code, *_ = load.call(0)  # warm: every stage has served once
        assert code == "OK", f"warm-up call failed: {code}"
        phase.done("warm")

        t0 = time.monotonic()
        sampler = Sampler(obs, t0)
        sampler.sample()
        sampler.start()
        load.start()
        if _wait(sampler.all_scaled_out, SCALE_UP_LIMIT_S):
            time.sleep(HOLD_S)
        load.stop()
        obs.load_stopped_s = round(time.monotonic() - t0, 2)
        phase.done("load")
        _wait(lambda: all(n == 1 for n in sampler.all_replicas().values()), SCALE_DOWN_LIMIT_S)
        sampler.stopped.set()
        sampler.join(timeout=10)
        sampler.sample()
        phase.done("scale_down")
        summarise(obs, load)

        cluster.remove_node(worker)
        obs.calls_after_removal = dict(Counter(load.call(i)[0] for i in range(CALLS_AFTER_REMOVAL)))
        load.channel.close()
        phase.done("remove_worker")
        return obs
    finally:
        serving.shutdown()
        cluster.shutdown()
        phase.done("shutdown")


def main(argv: list[str]) -> None:
    """Run the scenario in the folder ``argv[0]`` and print its observations as JSON."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    logging.basicConfig(level=logging.WARNING)
    obs = run(Path(argv[0]))
    print(json.dumps(asdict(obs)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
