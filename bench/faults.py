"""Benchmark: the served stack under faults — replicas SIGKILLed under load, storage hung.

Starts local Ray + Serve with the five applications (one replica each, autoscaling pinned off)
and a real S3 server on loopback (moto_server, in a subprocess: the storage it can hang), then
runs each scenario against the gRPC API:

- ``no-fault`` (the baseline, same load, nothing killed): every call must be OK; its median
  latency is what the others recover to.
- ``kill-<app>`` for the encoder, router, decoder and gateway: ``--clients`` threads call
  ``AnalyzeRegion`` (ROI classification) in a loop; after 2 s the application's replica is
  killed with ``ray.kill`` (SIGKILL of its worker, no cleanup); load goes on until a call that
  started after the kill succeeds (``recovery_s``: kill to the end of that call) or
  ``--recovery-limit-s``. Passed: every call ends OK or UNAVAILABLE, none hangs, and the
  service recovered.
- ``storage-outage``: ``AnalyzeSlide`` of a slide no cache holds while the S3 server is
  stopped (SIGSTOP) for ``--outage-s`` seconds; passed: the call ends OK or UNAVAILABLE within
  its deadline and the same slide then analyses OK (``recovery_s``: storage back to that
  call's end).

Per scenario: ``calls``, ``codes``, ``hung`` (calls still open past their deadline + 5 s),
``lost`` (calls that ended with neither an answer nor a status a client can act on: anything
but OK, UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) and ``recovery_s``. Prints
progress to stderr, then one JSON line last on stdout: ``scenarios``, ``passed``, ``lost``,
``hung``, ``recovery_s`` (per scenario) and the per-scenario details.

    python bench/faults.py [--clients 6] [--outage-s 10] [--recovery-limit-s 90]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

# bench/ is on sys.path when a benchmark runs as a script: the served-stack helpers it shares.
from serving import free_port, log, setup_environment

from smartpath.core.config import SmartPathConfig, StorageConfig, load_config
from smartpath.core.storage import ObjectRef, make_store
from smartpath.training.synthetic.slides import write_synthetic_slide
from smartpath.v1 import common_pb2, pathology_pb2, pathology_pb2_grpc

GATEWAY = (("application", "gateway"),)
CALL_TIMEOUT_S = 60.0
ACTIONABLE = {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
S3_KEYS = ("bench-faults", "bench-faults-secret")


@contextlib.contextmanager
def s3_server() -> Iterator[subprocess.Popen]:
    """moto_server on a free loopback port (the process; its port in ``.port``)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc.port = port  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)


def make_config(tmp: Path, s3_port: int) -> SmartPathConfig:
    """S3 on loopback, one replica per application, free ports; storage retries as shipped."""
    from smartpath.services import serving

    defaults = SmartPathConfig().serve
    serve: dict = {"grpc_port": free_port(), "http_port": free_port()}
    for app in serving.APPS:
        deployment = getattr(defaults, app).model_dump()
        deployment["autoscaling"].update(min_replicas=1, max_replicas=1)
        deployment["num_cpus"] = 0.25
        serve[app] = deployment
    return load_config(
        storage=StorageConfig(
            endpoint=f"127.0.0.1:{s3_port}",
            access_key=S3_KEYS[0],
            secret_key=S3_KEYS[1],
            region="us-east-1",
            timeout_s=5,
        ),
        slide_cache={"dir": str(tmp / "slide-cache")},
        serve=serve,
        log_level="WARNING",
    )


@dataclass
class Call:
    start: float
    end: float
    code: str


def roi_request() -> pathology_pb2.AnalyzeRegionRequest:
    image = np.random.default_rng(3).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return pathology_pb2.AnalyzeRegionRequest(
        image=buf.getvalue(),
        question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION),
    )


def replica(app: str) -> tuple[str, str]:
    """(name, namespace) of an application's replica actor."""
    import ray

    (found,) = [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]
    return found


def summary(calls: list[Call], hung: int, recovery_s: float | None, passed: bool) -> dict:
    codes = Counter(c.code for c in calls)
    ok = sorted(c.end - c.start for c in calls if c.code == "OK")
    return {
        "passed": passed,
        "calls": len(calls),
        "codes": dict(codes),
        "hung": hung,
        "lost": sum(n for code, n in codes.items() if code not in ACTIONABLE),
        "recovery_s": None if recovery_s is None else round(recovery_s, 2),
        "ok_latency_p50_s": round(ok[len(ok) // 2], 3) if ok else None,
    }


def under_load(stub, clients: int, app: str | None, limit_s: float) -> dict:
    """Region calls from ``clients`` threads; ``app``'s replica killed after 2 s (None: the
    no-fault baseline, 10 s of load)."""
    import ray

    request = roi_request()
    calls: list[Call] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                stub.AnalyzeRegion(request, metadata=GATEWAY, timeout=CALL_TIMEOUT_S)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            calls.append(Call(start, time.monotonic(), code))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    recovery_s = None
    if app is None:
        time.sleep(8)
    else:
        name, namespace = replica(app)
        killed = time.monotonic()
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        while time.monotonic() - killed < limit_s:
            done = [c.end for c in list(calls) if c.start > killed and c.code == "OK"]
            if done:
                recovery_s = min(done) - killed
                break
            time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=CALL_TIMEOUT_S + 5)
    hung = sum(t.is_alive() for t in threads)
    allowed = {"OK"} if app is None else {"OK", "UNAVAILABLE"}
    codes = {c.code for c in calls}
    passed = not hung and codes <= allowed and (app is None or recovery_s is not None)
    return summary(calls, hung, recovery_s, passed)


def storage_outage(stub, config: SmartPathConfig, moto, tmp: Path, outage_s: float) -> dict:
    """AnalyzeSlide of a fresh slide with the S3 server stopped for ``outage_s``."""
    store = make_store(config.storage)
    store.ensure_bucket("slides")
    path = tmp / f"outage-{uuid.uuid4().hex}.svs"
    write_synthetic_slide(path, width=4096, height=4096, seed=11)
    ref = ObjectRef("slides", path.name)
    store.upload(path, ref)
    request = pathology_pb2.AnalyzeSlideRequest(
        slide=common_pb2.SlideRef(uri=f"s3://{ref.bucket}/{ref.key}"),
        question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION),
    )
    calls: list[Call] = []

    def analyse() -> None:
        start = time.monotonic()
        try:
            *_, last = stub.AnalyzeSlide(request, metadata=GATEWAY, timeout=CALL_TIMEOUT_S)
            code = "OK" if last.HasField("analysis") else "NO_ANALYSIS"
        except grpc.RpcError as exc:
            code = exc.code().name
        calls.append(Call(start, time.monotonic(), code))

    caller = threading.Thread(target=analyse, daemon=True)
    os.kill(moto.pid, signal.SIGSTOP)
    try:
        caller.start()
        time.sleep(outage_s)
    finally:
        os.kill(moto.pid, signal.SIGCONT)
    back = time.monotonic()
    caller.join(timeout=CALL_TIMEOUT_S + 5)
    hung = int(caller.is_alive())
    analyse()  # the same slide, storage back, nothing restarted
    recovery_s = calls[-1].end - back if calls[-1].code == "OK" else None
    first_ok = calls[0].code in ("OK", "UNAVAILABLE") if calls and not hung else False
    return summary(calls, hung, recovery_s, first_ok and recovery_s is not None)


def run(args: argparse.Namespace) -> dict:
    setup_environment()
    from smartpath.services import serving  # imports Ray: after the environment is set

    results: dict[str, dict] = {}
    with s3_server() as moto, tempfile.TemporaryDirectory(prefix="smartpath-faults-") as tmp:
        config = make_config(Path(tmp), moto.port)
        log("starting Ray and Serve with the five applications…")
        serving.start(config)
        try:
            serving.deploy(config)
            channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
            stub = pathology_pb2_grpc.PathologyStub(channel)
            stub.AnalyzeRegion(roi_request(), metadata=GATEWAY, timeout=CALL_TIMEOUT_S)
            for app in (None, "encoder", "router", "decoder", "gateway"):
                name = "no-fault" if app is None else f"kill-{app}"
                log(f"{name}…")
                results[name] = under_load(stub, args.clients, app, args.recovery_limit_s)
                log(f"  {results[name]}")
            log("storage-outage…")
            results["storage-outage"] = storage_outage(stub, config, moto, Path(tmp), args.outage_s)
            log(f"  {results['storage-outage']}")
            channel.close()
        finally:
            serving.shutdown()
    return {
        "bench": "faults",
        "scenarios": list(results),
        "passed": sum(r["passed"] for r in results.values()),
        "lost": sum(r["lost"] for r in results.values()),
        "hung": sum(r["hung"] for r in results.values()),
        "recovery_s": {k: r["recovery_s"] for k, r in results.items() if k != "no-fault"},
        "baseline_ok_latency_p50_s": results["no-fault"]["ok_latency_p50_s"],
        "details": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6, help="concurrent region clients")
    parser.add_argument("--outage-s", type=float, default=10.0, help="seconds storage hangs")
    parser.add_argument("--recovery-limit-s", type=float, default=90.0)
    args = parser.parse_args()
    # Ray forwards its processes' output to this process's stdout: keep it on stderr, so
    # stdout carries only the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
