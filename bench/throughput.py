"""Benchmark: slides per hour through the served stack, by encoder replicas and pipelining.

Starts local Ray + Serve in the same run and deploys the five applications (autoscaling pinned,
so no replica starts or stops in the middle of a measurement), then streams ``--slides``
distinct slides through ``Pathology.AnalyzeSlide`` (WSI classification) over gRPC, three ways:

- **serial**, one encoder replica: the next slide is sent when the last answer arrives (what a
  client that analyses one slide at a time gets);
- **pipelined**, one encoder replica: two slides in flight, so resolving, tissue detection,
  tiling and reading of the next slide overlap encoding of this one;
- **pipelined**, two encoder replicas: four slides in flight (two per replica).

Every slide is a fresh copy of one synthetic slide (``--slide-px`` square, 0.25 µm/px, kept under
~/.cache/smartpath-bench) with unique trailing bytes, so each has its own content id and misses
the feature cache: every call plans, reads and encodes all tissue tiles. One warm-up slide per
deployment is analysed first and not counted. ``slides_per_hour`` = slides / wall time from
the first request to the last answer x 3600. ``replicas_2_vs_1`` compares the two pipelined
runs, ``pipelined_vs_serial`` the two one-replica runs. The CPU seconds each role (every Serve
application's replicas, proxy and controller, Ray, the clients) spends per slide give each
ratio's ceiling on this machine: two replicas cannot beat all cores at the two-replica run's
CPU cost per slide, and pipelining cannot beat one encoder replica that never idles. Per-stage
costs of the slide path (tissue plan, tile reading, encoding; measured in this process on one
core) are reported for capacity planning.

Prints progress to stderr, shuts Ray down, then prints one JSON line last on stdout.

    python bench/throughput.py [--quick] [--slides 8] [--slide-px 12288]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import torch

# bench/ is on sys.path when a benchmark runs as a script: the served-stack helpers it shares.
from serving import (
    CHANNEL_OPTIONS,
    analyze_slide,
    bench_slide,
    log,
    make_config,
    run_and_print,
    setup_environment,
    stage_ms,
    wait_ready,
)

from smartpath.core.config import SmartPathConfig
from smartpath.core.slides.tiler import Tiler, TileRequest
from smartpath.services.encoding.encoder import VisualEncoder
from smartpath.services.models import load_served_model
from smartpath.v1 import pathology_pb2_grpc

TARGETS = {"replicas_2_vs_1": 1.5, "pipelined_vs_serial": 1.3}
RUNS = {  # name: (encoder replicas, slides in flight)
    "one_replica_serial": (1, 1),
    "one_replica_pipelined": (1, 2),
    "two_replicas_pipelined": (2, 4),
}


def with_encoder_replicas(config: SmartPathConfig, replicas: int) -> SmartPathConfig:
    """``config`` with the encoder pinned at ``replicas``."""
    data = config.model_dump(mode="python")
    data["serve"]["encoder"]["autoscaling"].update(min_replicas=replicas, max_replicas=replicas)
    return SmartPathConfig(**data)


def fresh_copies(slide: Path, folder: Path, n: int) -> list[Path]:
    """``n`` copies of ``slide`` whose contents (so content ids) differ: each misses the
    feature cache."""
    data = slide.read_bytes()
    copies = []
    for _ in range(n):
        path = folder / f"stream-{uuid.uuid4().hex}.svs"
        path.write_bytes(data + uuid.uuid4().bytes)
        copies.append(path)
    return copies


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this machine's Ray processes, by role: each
    Serve application's replicas, the Serve proxy and controller, and Ray itself (raylet, GCS,
    other workers); plus this process (the gRPC clients)."""
    import psutil

    used: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        cmdline = proc.info["cmdline"] or []
        title = cmdline[0] if cmdline else ""
        if title.startswith("ray::ServeReplica:"):
            role = title.split(":")[3]  # "ray::ServeReplica:<app>:<deployment>"
        elif title.startswith(("ray::ProxyActor", "ray::ServeController")):
            role = "serve_proxy_and_controller"
        elif title.startswith("ray::") or proc.info["name"] in ("raylet", "gcs_server"):
            role = "ray"
        elif proc.info["pid"] == os.getpid():
            role = "clients"
        else:
            continue
        times = proc.info["cpu_times"]
        if times is not None:
            used[role] = used.get(role, 0.0) + times.user + times.system
    return used


def stream(stub: pathology_pb2_grpc.PathologyStub, slides: list[Path], depth: int) -> dict:
    """Analyse ``slides`` with ``depth`` in flight (each client takes the next slide when its
    last answer arrives); wall seconds, per-slide seconds and stage timings."""
    queue = list(reversed(slides))
    lock = threading.Lock()
    done: list[tuple[float, dict[str, float], int]] = []
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                path = queue.pop()
            try:
                seconds, analysis, _ = analyze_slide(stub, str(path))
                assert not analysis.feature_cache_hit, "a stream slide hit the feature cache"
                done.append((seconds, stage_ms(analysis), analysis.tiles))
            except BaseException as e:  # reported by the caller
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(depth)]
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_seconds().items()}
    if errors:
        raise errors[0]
    return {
        "wall_s": wall,
        "slides_per_hour": len(done) * 3600 / wall,
        "slide_s_median": statistics.median(s for s, _, _ in done),
        "encoding_ms_median": statistics.median(t["encoding"] for _, t, _ in done),
        "tiles": sorted({n for _, _, n in done}),
        "cpu_s_per_slide": {k: round(v / len(done), 3) for k, v in sorted(cpu.items())},
        "cores_busy": round(sum(cpu.values()) / wall, 2),
    }


def stage_costs(config: SmartPathConfig, slide: Path) -> dict[str, float]:
    """Seconds per slide of tissue planning, tile reading and tile encoding in this process on
    one core (one torch thread, one read worker): the per-stage costs capacity planning uses."""
    torch.set_num_threads(1)
    model = load_served_model(config)
    encoder = VisualEncoder(model)
    spec = model.cfg.slide_tiles
    request = TileRequest(
        mpp=spec.mpp, tile_size=spec.tile_size, min_tissue_fraction=spec.min_tissue
    )
    tiling = config.tiling.model_copy(update={"read_workers": 1})
    tiler = Tiler(config.model_copy(update={"tiling": tiling}))
    try:
        start = time.perf_counter()
        opened = tiler.open(str(slide))
        plan, _ = tiler.plan(opened, request)
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        batches = [tiles for _, tiles in tiler.read(opened, plan.geometry, plan.x, plan.y)]
        read_s = time.perf_counter() - start
    finally:
        tiler.close()
    start = time.perf_counter()
    for tiles in batches:
        encoder.encode_tiles(tiles)
    encode_s = time.perf_counter() - start
    return {
        "tiles": len(plan),
        "plan_s": round(plan_s, 3),
        "read_s": round(read_s, 3),
        "encode_s": round(encode_s, 3),
        "encode_ms_per_tile": round(1000 * encode_s / len(plan), 3),
        "read_ms_per_tile": round(1000 * read_s / len(plan), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--slides", type=int, help="slides per run (8)")
    parser.add_argument("--slide-px", type=int, help="edge of each slide (12288)")
    parser.add_argument("--seed", type=int, default=7, help="synthetic slide seed")
    args = parser.parse_args()
    defaults = {"slides": 4, "slide_px": 4096} if args.quick else {"slides": 8, "slide_px": 12288}
    run_and_print(run, args, defaults)


def run(args: argparse.Namespace) -> dict:
    """The three runs and the stage costs; the result line as a dict."""
    wall = time.perf_counter()
    setup_environment()
    from smartpath.services import serving  # imports Ray: after the environment is set

    slide, _ = bench_slide(args.slide_px, args.seed)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="smartpath-bench-") as tmp_name:
        tmp = Path(tmp_name)
        base = make_config(tmp, serving.APPS)
        log("per-stage costs in this process…")
        costs = stage_costs(base, slide)
        log(f"    {costs}")
        most = with_encoder_replicas(base, max(r for r, _ in RUNS.values()))
        serving.start(most)  # Ray's CPUs fit the most replicas of any run
        try:
            deployed = None
            for name, (replicas, depth) in RUNS.items():
                if deployed != replicas:
                    log(f"deploying with {replicas} encoder replica(s)…")
                    serving.deploy(with_encoder_replicas(base, replicas))
                    deployed = replicas
                channel = grpc.insecure_channel(
                    f"127.0.0.1:{base.serve.grpc_port}", options=CHANNEL_OPTIONS
                )
                stub = pathology_pb2_grpc.PathologyStub(channel)
                wait_ready(stub)
                (warm,) = fresh_copies(slide, tmp, 1)
                analyze_slide(stub, str(warm))
                slides = fresh_copies(slide, tmp, args.slides)
                log(f"{name}: {args.slides} slides, {depth} in flight…")
                results[name] = stream(stub, slides, depth)
                log(f"    {results[name]['slides_per_hour']:.0f} slides/h")
                channel.close()
                for path in slides:
                    path.unlink()
        finally:
            log("shutting down…")
            serving.shutdown()

    sph = {name: r["slides_per_hour"] for name, r in results.items()}
    ratios = {
        "replicas_2_vs_1": sph["two_replicas_pipelined"] / sph["one_replica_pipelined"],
        "pipelined_vs_serial": sph["one_replica_pipelined"] / sph["one_replica_serial"],
    }
    # What this machine allows, from the CPU accounting: the two-replica run cannot beat all
    # cores spent at its CPU cost per slide; pipelining one replica cannot beat that replica
    # never idling.
    all_roles_s = sum(results["two_replicas_pipelined"]["cpu_s_per_slide"].values())
    encoder_s = results["one_replica_serial"]["cpu_s_per_slide"]["encoder"]
    cpus = os.cpu_count() or 1
    ceilings = {
        "replicas_2_vs_1": cpus * 3600 / all_roles_s / sph["one_replica_pipelined"],
        "pipelined_vs_serial": 3600 / encoder_s / sph["one_replica_serial"],
    }
    return {
        "benchmark": "throughput",
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "slides_per_run": args.slides,
        "slide_px": args.slide_px,
        "runs": {
            name: {"encoder_replicas": r, "in_flight": d, **_rounded(results[name])}
            for name, (r, d) in RUNS.items()
        },
        "slides_per_hour": {name: round(v, 1) for name, v in sph.items()},
        **{k: round(v, 3) for k, v in ratios.items()},
        "ceilings_on_this_machine": {k: round(v, 3) for k, v in ceilings.items()},
        "stage_costs_one_core": costs,
        "targets": {f"{k}_min": v for k, v in TARGETS.items()},
        **{f"meets_{k}": ratios[k] >= v for k, v in TARGETS.items()},
        "wall_s": round(time.perf_counter() - wall, 1),
    }


def _rounded(result: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


if __name__ == "__main__":
    main()
