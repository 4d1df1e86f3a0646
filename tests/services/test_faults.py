"""Faults under load, over real gRPC against the live Serve stack: a replica SIGKILLed mid-call
ends the calls it held with UNAVAILABLE (a lost replica is not a bug: retrying reaches the one
Serve starts in its place), never INTERNAL; no call hangs; Serve replaces the replica and calls
succeed again."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import UnavailableError
from smartpath.core.storage import ObjectRef, make_store
from smartpath.model.slide_features import load_features
from smartpath.services.grpc_util import (
    LOST_REPLICA,
    NOT_RUNNING,
    domain_error,
    install_proxy_status_mapping,
)
from smartpath.training.synthetic.slides import SyntheticSlide
from smartpath.v1 import common_pb2, pathology_pb2, pathology_pb2_grpc
from tests.conftest import MotoServer, free_port
from tests.services.conftest import API_TOKEN

AUTH = (("application", "gateway"), ("authorization", f"Bearer {API_TOKEN}"))
CALL_TIMEOUT_S = 60
RECOVERY_LIMIT_S = 90


def test_lost_replicas_are_unavailable_not_internal() -> None:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
    from ray.serve.exceptions import DeploymentUnavailableError

    lost = [
        ActorDiedError(),
        ActorUnavailableError("node unreachable", None),
        DeploymentUnavailableError("decoder"),
        # A lost replica seen through another replica: Ray wraps it in a RayTaskError.
        RayTaskError("Decode", "traceback", ActorDiedError()),
    ]
    for error in lost:
        mapped = domain_error(error)
        assert isinstance(mapped, UnavailableError), type(error).__name__
        assert "retry" in str(mapped) and "Actor" not in str(mapped)
    assert not isinstance(domain_error(ValueError("a bug")), UnavailableError)


def test_the_proxy_answers_unavailable_for_a_lost_replica_or_a_stopped_service() -> None:
    """The proxy-side mapping wraps two of Serve's private functions, which must still exist
    with the signatures the wrappers call."""
    import asyncio
    import inspect
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError
    from ray.serve._private import proxy

    assert list(inspect.signature(proxy.get_grpc_response_status).parameters) == [
        "exc",
        "request_timeout_s",
        "request_id",
    ]
    assert list(inspect.signature(proxy.gRPCProxy.not_found_response).parameters) == [
        "self",
        "proxy_request",
    ]
    install_proxy_status_mapping()
    install_proxy_status_mapping()  # idempotent: wraps once
    status = proxy.get_grpc_response_status
    lost = status(ActorDiedError(), None, "req-1")
    assert (lost.code, lost.message) == (grpc.StatusCode.UNAVAILABLE, LOST_REPLICA)
    # Everything else is Serve's own answer.
    assert status(TimeoutError(), 5.0, "req-2").code == grpc.StatusCode.DEADLINE_EXCEEDED

    async def answer(app: str) -> object:
        request = SimpleNamespace(app_name=app)
        return [r async for r in proxy.gRPCProxy.not_found_response(None, request)][-1]

    stopped = asyncio.run(answer("gateway"))  # ours, not deployed (starting or stopping)
    assert (stopped.code, stopped.message) == (grpc.StatusCode.UNAVAILABLE, NOT_RUNNING)
    assert asyncio.run(answer("no-such-app")).code == grpc.StatusCode.NOT_FOUND
    assert asyncio.run(answer("")).code == grpc.StatusCode.NOT_FOUND


@dataclass
class _Call:
    start: float
    end: float
    code: grpc.StatusCode


def _timed(call: Callable[[], object]) -> _Call:
    """Run one RPC; its start, end and status."""
    start = time.monotonic()
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    return _Call(start, time.monotonic(), code)


class _Load:
    """``clients`` threads each making ``call`` over and over until the block ends (a client
    backs off ``backoff_s`` after RESOURCE_EXHAUSTED, as that status asks); on leaving, every
    thread must end within a call's deadline, or the test fails: a call hung."""

    def __init__(self, call: Callable[[], object], clients: int, backoff_s: float = 0.0) -> None:
        self.calls: list[_Call] = []
        self._stop = threading.Event()

        def client() -> None:
            while not self._stop.is_set():
                done = _timed(call)
                self.calls.append(done)
                if done.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    time.sleep(backoff_s)

        self._threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self._threads), "a call hung past its deadline"


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _replica(app: str) -> tuple[str, str]:
    """(name, namespace) of the one replica actor of a Serve application."""
    import ray

    (replica,) = [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]
    return replica


def _slide_request(
    config: SmartPathConfig, path: Path, key: str
) -> pathology_pb2.AnalyzeSlideRequest:
    """Upload ``path`` to the session's S3 as ``s3://faults/<key>``; a classification request
    for it."""
    store = make_store(config.storage)
    store.ensure_bucket("faults")
    ref = ObjectRef("faults", key)
    store.upload(path, ref)
    return pathology_pb2.AnalyzeSlideRequest(
        slide=common_pb2.SlideRef(uri=f"s3://{ref.bucket}/{ref.key}"),
        question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION),
    )


@pytest.mark.parametrize("app", ["decoder", "encoder", "router", "gateway"])
def test_a_replica_killed_under_load_ends_calls_unavailable_and_is_replaced(
    grpc_channel: grpc.Channel, app: str
) -> None:
    import ray

    stub = pathology_pb2_grpc.PathologyStub(grpc_channel)
    request = pathology_pb2.AnalyzeRegionRequest(
        image=_png(7), question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION)
    )
    stub.AnalyzeRegion(request, metadata=AUTH, timeout=CALL_TIMEOUT_S)  # warm
    with _Load(
        lambda: stub.AnalyzeRegion(request, metadata=AUTH, timeout=CALL_TIMEOUT_S), 6
    ) as load:
        time.sleep(2)  # calls in flight at every stage
        name, namespace = _replica(app)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)  # SIGKILL
        # Load goes on until a call that started after the kill succeeds: the replacement.
        recovered_at = None
        while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
            done = [c for c in load.calls if c.start > killed_at and c.code == grpc.StatusCode.OK]
            if done:
                recovered_at = min(c.end for c in done)
                break
            time.sleep(0.2)
    calls = load.calls
    assert recovered_at is not None, f"no call succeeded within {RECOVERY_LIMIT_S} s of the kill"
    codes = {c.code for c in calls}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert all(c.end - c.start < CALL_TIMEOUT_S for c in calls)
    assert _replica(app)[0] != name  # Serve started another replica
    lost = sum(c.code == grpc.StatusCode.UNAVAILABLE for c in calls)
    print(
        f"{app}: {len(calls)} calls, {lost} UNAVAILABLE, "
        f"recovered {recovered_at - killed_at:.1f} s after the kill"
    )


def test_a_storage_outage_mid_analysis_ends_unavailable_and_leaves_nothing_broken(
    grpc_channel: grpc.Channel,
    serve_instance: SmartPathConfig,
    s3_server: MotoServer,
    synthetic_svs: SyntheticSlide,
    tmp_path: Path,
) -> None:
    """Storage stops answering for 10 s while a slide is analysed: the call ends UNAVAILABLE
    (or completes, if the slide was read before), within its deadline; afterwards the same
    slide analyses without restarting anything, and the feature cache holds no broken entry."""
    store = make_store(serve_instance.storage)
    # New content, so neither the slide cache nor the feature cache has it.
    copy = tmp_path / f"outage-{uuid.uuid4().hex}.svs"
    copy.write_bytes(synthetic_svs.path.read_bytes() + uuid.uuid4().bytes)
    request = _slide_request(serve_instance, copy, copy.name)
    stub = pathology_pb2_grpc.PathologyStub(grpc_channel)
    outcome: dict[str, object] = {}

    def analyse_slide() -> pathology_pb2.Analysis:
        *_, last = stub.AnalyzeSlide(request, metadata=AUTH, timeout=CALL_TIMEOUT_S)
        return last.analysis

    def analyse() -> None:
        start = time.monotonic()
        try:
            analyse_slide()
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome["code"], outcome["details"] = exc.code(), exc.details()
        outcome["seconds"] = time.monotonic() - start

    caller = threading.Thread(target=analyse, daemon=True)
    with s3_server.down():
        caller.start()
        time.sleep(10)
    caller.join(timeout=CALL_TIMEOUT_S + 5)
    assert not caller.is_alive(), "the call hung"
    assert outcome["code"] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK), outcome
    if outcome["code"] == grpc.StatusCode.UNAVAILABLE:
        assert serve_instance.storage.endpoint not in str(outcome["details"])
    # Storage is back: the same slide analyses, nothing restarted.
    start = time.monotonic()
    assert analyse_slide().label
    bucket = serve_instance.model.features_bucket
    entries = list(store.list(bucket))
    assert entries  # the recovered call cached its features
    for info in entries:  # every entry loads whole and its checksum holds
        load_features(store.get_bytes(ObjectRef(bucket, info.key)))
    print(
        f"storage outage: first call {outcome['code'].name} after {outcome['seconds']:.1f} s; "
        f"recovered call {time.monotonic() - start:.1f} s"
    )


def test_200_clients_mixing_region_and_slide_calls_all_get_an_answer(
    grpc_channel: grpc.Channel,
    serve_instance: SmartPathConfig,
    synthetic_svs: SyntheticSlide,
) -> None:
    """Load far above the session's queues (gateway: 8 ongoing, 8 queued): every call ends OK,
    RESOURCE_EXHAUSTED (back off, retry) or DEADLINE_EXCEEDED, none hangs, and both kinds of
    call keep being served."""
    slide = _slide_request(serve_instance, synthetic_svs.path, "load.svs")
    stub = pathology_pb2_grpc.PathologyStub(grpc_channel)
    classify = slide.question
    region = pathology_pb2.AnalyzeRegionRequest(image=_png(11), question=classify)
    *_, warm = stub.AnalyzeSlide(slide, metadata=AUTH, timeout=CALL_TIMEOUT_S)
    assert warm.analysis.label  # features cached: slide calls now cost a decode, as in use
    timeout_s = 20.0

    def analyse_slide() -> None:
        *_, last = stub.AnalyzeSlide(slide, metadata=AUTH, timeout=timeout_s)
        assert last.analysis.label

    loads = {
        "region": _Load(
            lambda: stub.AnalyzeRegion(region, metadata=AUTH, timeout=timeout_s), 100, 0.5
        ),
        "slide": _Load(analyse_slide, 100, 0.5),
    }
    with loads["region"], loads["slide"]:
        time.sleep(15)
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    for kind, load in loads.items():
        done = load.calls
        codes = {c.code for c in done}
        assert codes <= allowed, (kind, codes)
        ok = sorted(c.end - c.start for c in done if c.code == grpc.StatusCode.OK)
        assert ok, f"no {kind} call was served under load"
        assert max(c.end - c.start for c in done) < timeout_s + 5
        counts = {code.name: sum(c.code == code for c in done) for code in codes}
        p50, p99 = ok[len(ok) // 2], ok[min(len(ok) - 1, int(len(ok) * 0.99))]
        print(f"{kind}: {counts}; OK latency p50 {p50:.2f} s, p99 {p99:.2f} s")


def test_a_redeploy_under_load_finishes_the_calls_in_flight(
    grpc_channel: grpc.Channel, serve_instance: SmartPathConfig
) -> None:
    """A Serve redeploy that replaces the gateway's replica (new actor options) while calls run:
    every call ends OK (the old replica finishes what it holds, graceful_shutdown_timeout_s =
    serve.deadline_s; new calls wait for or reach the new one) or UNAVAILABLE, none hangs."""
    from smartpath.services import serving

    stub = pathology_pb2_grpc.PathologyStub(grpc_channel)
    request = pathology_pb2.AnalyzeRegionRequest(
        image=_png(13), question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION)
    )
    before = _replica("gateway")[0]
    gateway = serve_instance.serve.gateway
    bumped = serve_instance.model_copy(deep=True)
    bumped.serve.gateway = gateway.model_copy(update={"num_cpus": gateway.num_cpus + 0.05})
    try:
        with _Load(
            lambda: stub.AnalyzeRegion(request, metadata=AUTH, timeout=CALL_TIMEOUT_S), 6
        ) as load:
            time.sleep(2)
            redeployed_at = time.monotonic()
            serving.deploy(bumped)  # returns once the new replica runs
            done_at = time.monotonic()
            time.sleep(2)
    finally:
        serving.deploy(serve_instance)  # the session's own options again
    calls = load.calls
    assert _replica("gateway")[0] != before  # the replica was replaced, twice
    spanning = [c for c in calls if c.start < redeployed_at < c.end]
    codes = {c.code for c in calls}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert [c for c in calls if c.start > done_at and c.code == grpc.StatusCode.OK]
    lost = sum(c.code != grpc.StatusCode.OK for c in calls)
    print(
        f"redeploy: {len(calls)} calls, {len(spanning)} in flight at the redeploy, "
        f"{lost} not OK; rollout {done_at - redeployed_at:.1f} s"
    )


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SMARTPATH_SLOW"), reason="set SMARTPATH_SLOW=1")
def test_sigterm_to_smartpath_serve_lets_calls_in_flight_finish(tmp_path: Path) -> None:
    """`smartpath serve` in a process of its own (its own Ray), SIGTERM with calls in flight:
    they end OK, calls after the signal end OK or UNAVAILABLE (never hang or vanish), and the
    process exits 0 within the grace period."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    small = {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    serve = {app: small for app in ("tiler", "encoder", "router", "decoder", "gateway")}
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"local_root": str(tmp_path / "storage")},
                "slide_cache": {"dir": str(tmp_path / "cache")},
                "serve": {"grpc_port": port, "http_port": free_port(), **serve},
            }
        )
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "smartpath.client.cli", "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pathology_pb2_grpc.PathologyStub(channel)
        request = pathology_pb2.AnalyzeRegionRequest(
            image=_png(17), question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION)
        )
        metadata = (("application", "gateway"),)
        deadline = time.monotonic() + 240
        while True:  # ready when a call succeeds
            try:
                stub.AnalyzeRegion(request, metadata=metadata, timeout=30)
                break
            except grpc.RpcError:
                assert server.poll() is None and time.monotonic() < deadline, "no start"
                time.sleep(1)
        calls: list[_Call] = []

        def call() -> None:
            start = time.monotonic()
            try:
                stub.AnalyzeRegion(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            calls.append(_Call(start, time.monotonic(), code))

        in_flight = [threading.Thread(target=call) for _ in range(6)]
        for thread in in_flight:
            thread.start()
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        after = [threading.Thread(target=call) for _ in range(3)]
        for thread in after:
            thread.start()
            time.sleep(0.5)
        for thread in in_flight + after:
            thread.join(timeout=CALL_TIMEOUT_S + 5)
        assert server.wait(timeout=180) == 0
        exited = time.monotonic() - signalled
        channel.close()
    finally:
        if server.poll() is None:
            server.kill()
    first = [c for c in calls if c.start < signalled]
    assert len(first) == 6 and {c.code for c in first} == {grpc.StatusCode.OK}, first
    late = {c.code for c in calls if c.start >= signalled}
    assert late <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, late
    print(
        f"SIGTERM: in flight all OK; after it {sorted(c.name for c in late)}; exit {exited:.1f} s"
    )


def _replica_rss() -> dict[tuple[int, str], int]:
    """Resident memory (bytes) of each Serve replica process on this machine, by (pid, app)."""
    import psutil

    rss = {}
    for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::ServeReplica:"):
            app = cmdline[0].split(":")[3]  # "ray::ServeReplica:<app>:<deployment>[.<method>]"
            rss[(proc.info["pid"], app)] = proc.info["memory_info"].rss
    return rss


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SMARTPATH_SLOW"), reason="set SMARTPATH_SLOW=1")
@pytest.mark.timeout(float(os.environ.get("SMARTPATH_SOAK_S", "600")) * 1.2 + 300)
def test_a_soak_grows_no_replica_by_5_percent(
    grpc_channel: grpc.Channel, serve_instance: SmartPathConfig, synthetic_svs: SyntheticSlide
) -> None:
    """Mixed region and slide load for ``SMARTPATH_SOAK_S`` seconds (600) after a warm-up: each
    replica's resident memory grows by less than 5%."""
    soak_s = float(os.environ.get("SMARTPATH_SOAK_S", "600"))
    slide = _slide_request(serve_instance, synthetic_svs.path, "soak.svs")
    stub = pathology_pb2_grpc.PathologyStub(grpc_channel)
    classify = slide.question
    regions = [
        pathology_pb2.AnalyzeRegionRequest(image=_png(seed), question=classify) for seed in range(4)
    ]
    loads = [
        _Load(functools.partial(stub.AnalyzeRegion, r, metadata=AUTH, timeout=CALL_TIMEOUT_S), 1)
        for r in regions
    ] + [_Load(lambda: list(stub.AnalyzeSlide(slide, metadata=AUTH, timeout=CALL_TIMEOUT_S)), 1)]
    with contextlib.ExitStack() as stack:
        for load in loads:
            stack.enter_context(load)
        time.sleep(min(120.0, soak_s / 5))  # warm-up: caches, allocator pools, lazy imports
        warm = _replica_rss()
        time.sleep(soak_s)
        after = _replica_rss()
    calls = [c for load in loads for c in load.calls]
    assert {c.code for c in calls} == {grpc.StatusCode.OK}
    counts = {"region": sum(len(load.calls) for load in loads[:4]), "slide": len(loads[4].calls)}
    assert set(warm) == set(after) and len(warm) == 5, (warm, after)  # no replica restarted
    growth = {name: after[name] / warm[name] - 1 for name in warm}
    print(
        f"soak {soak_s:.0f} s, {counts} calls; RSS growth "
        + ", ".join(f"{app} {g:+.1%}" for (_, app), g in sorted(growth.items()))
    )
    assert all(g < 0.05 for g in growth.values()), growth
