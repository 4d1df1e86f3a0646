"""Benchmark: the served pipeline (Ray Serve, gRPC) against the same engines in one process.

Starts local Ray + Serve in the same run, deploys the five applications (tiler, encoder,
router, decoder, gateway; one replica each, autoscaling pinned off so no replica starts in the
middle of a measurement on two cores), and measures three things, each against a baseline
measured in the same run. The model is the packaged demo model everywhere.

(a) Encoder throughput. Per call, the pipeline's encoder work is one tile batch of a slide:
    ``encode_slide`` hands each batch the tiler streams (``tiling.batch_size`` = 64 tiles of
    the model's ``slide_tiles``: 96 px at 0.5 µm/px) to ``encode_tiles``, which
    ``@serve.batch`` batches across concurrent callers; ``FeatureEncoder.EncodeTiles`` is
    that same method over gRPC, so it is what is measured here. ``--clients`` threads (32),
    each with its own channel, each send their own sequence of ``--requests`` requests of
    ``--tiles-per-request`` tiles (64); all start together after one warm-up request each.
    The tiles are tissue tiles of the benchmark slide read with
    ``smartpath.core.slides.tiler.Tiler`` at the pipeline's tile spec. Items/s = tiles /
    wall time from the start to the last response. Baseline: the offline forward of the same
    encoder in this process (``VisualEncoder.encode_tiles``) over exactly the same tiles
    concatenated in request order, in chunks from one request up to the largest batch the
    service forms (``serve.encoder.max_batch_size`` requests) by factors of 4; the fastest
    chunking is the baseline (``..._same_batch`` compares with the largest). Every served
    feature vector is checked against the offline one. (ROIs via ``EncodeImage`` are one
    small vision-tower forward per AnalyzeRegion; their cost is part of (c).)
(b) Slide latency: ``Pathology.AnalyzeSlide`` on a fresh slide (first call: resolve, tissue
    detection, plan, tile reading, encoding, feature cache write, aggregator, routing,
    decoding) against a second call on the same slide (feature cache hit: resolve, cache
    read, aggregator, routing, decoding). The feature cache lives in this run's temporary
    storage, so the first call always misses. The slide is ``--slide-px`` square
    (``write_synthetic_slide``, kept under ~/.cache/smartpath-bench by size and seed); a
    small slide is analysed twice before, so one-time costs of the slide path are not
    counted. The question is WSI classification (a short answer); the stage timings of both
    calls are reported.
(c) Region latency: ``Pathology.AnalyzeRegion`` through gRPC against the same ``Pipeline``
    in this process (``services.local.local_pipeline``, same model object, ``await
    pipeline.analyze_region``): the same 256-px synthetic ROI (PNG) and ROI classification,
    ``--region-calls`` sequential calls each, interleaved (gRPC, then in-process at 1 torch
    thread, then at the default thread count) so both see the same background load, after
    warm-up calls. The replicas are idle while an in-process call runs. Each path's median;
    the in-process baseline is the better of its two thread counts, so it is not judged at a
    thread count that suits it badly. Median stage timings of each path are reported.

Prints progress to stderr, shuts Ray down, then prints one JSON line last on stdout.

    python bench/serving.py [--quick] [--clients 32] [--requests 4] [--tiles-per-request 64]
                            [--slide-px 16384] [--region-calls 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from smartpath.core.config import SmartPathConfig, load_config
from smartpath.core.slides.tiler import Tiler, TileRequest
from smartpath.services.encoding.encoder import VisualEncoder
from smartpath.services.local import local_pipeline
from smartpath.services.models import load_served_model
from smartpath.services.tensors import from_tensor
from smartpath.training.synthetic.roi import render_roi
from smartpath.training.synthetic.slides import write_synthetic_slide
from smartpath.v1 import (
    common_pb2,
    encoding_pb2,
    encoding_pb2_grpc,
    pathology_pb2,
    pathology_pb2_grpc,
)

TARGETS = {"encoder_fraction_of_offline": 0.85, "cache_speedup": 20.0, "grpc_overhead_ratio": 1.3}
SLIDE_CACHE = Path("~/.cache/smartpath-bench").expanduser()
GATEWAY = [("application", "gateway")]
ENCODER = [("application", "encoder")]
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def setup_environment() -> None:
    """Local Ray must not phone home or bind non-loopback addresses (as ``smartpath serve``);
    set before Ray is imported."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_slide(size: int, seed: int) -> tuple[Path, float]:
    """The benchmark slide (written once per size and seed) and the seconds spent writing."""
    path = SLIDE_CACHE / f"slide-{size}-seed{seed}.svs"
    if path.exists():
        return path, 0.0
    SLIDE_CACHE.mkdir(parents=True, exist_ok=True)
    log(f"writing a {size}x{size} synthetic slide to {path}…")
    tmp = path.with_suffix(f".tmp{os.getpid()}.svs")
    start = time.perf_counter()
    write_synthetic_slide(tmp, width=size, height=size, seed=seed)
    tmp.rename(path)  # whole files only: an interrupted write leaves no half slide
    return path, time.perf_counter() - start


def make_config(tmp: Path, apps: tuple[str, ...]) -> SmartPathConfig:
    """Local storage and slide cache in ``tmp``, slides from ``tmp`` and the bench cache, free
    ports, one replica per application (otherwise the default deployment settings)."""
    defaults = SmartPathConfig().serve
    serve: dict = {"grpc_port": free_port(), "http_port": free_port()}
    for app in apps:
        deployment = getattr(defaults, app).model_dump()
        deployment["autoscaling"].update(min_replicas=1, max_replicas=1)
        serve[app] = deployment
    return load_config(
        storage={"local_root": str(tmp / "storage")},
        slide_cache={"dir": str(tmp / "slide-cache")},
        tiling={"local_slide_roots": [str(tmp), str(SLIDE_CACHE)]},
        serve=serve,
        log_level="WARNING",
    )


def slide_tiles(config: SmartPathConfig, path: Path, n: int) -> np.ndarray:
    """Up to ``n`` tissue tiles of the slide at the pipeline's tile spec, (n, S, S, 3) uint8."""
    tiler = Tiler(config)
    try:
        opened = tiler.open(str(path))
        spec = load_served_model(config).cfg.slide_tiles
        request = TileRequest(
            mpp=spec.mpp, tile_size=spec.tile_size, min_tissue_fraction=spec.min_tissue
        )
        plan, _ = tiler.plan(opened, request)
        pick = np.linspace(0, len(plan) - 1, min(n, len(plan))).astype(int)
        batches = tiler.read(opened, plan.geometry, plan.x[pick], plan.y[pick])
        return np.concatenate([tiles for _, tiles in batches])
    finally:
        tiler.close()


# -- (a) encoder throughput ------------------------------------------------------------------
def request_tiles(
    pool: np.ndarray, clients: int, requests: int, per: int
) -> list[list[np.ndarray]]:
    """Client i's j-th request: the next ``per`` tiles of the pool, cyclically."""
    out, k = [], 0
    for _ in range(clients):
        mine = []
        for _ in range(requests):
            idx = (k + np.arange(per)) % len(pool)
            mine.append(np.ascontiguousarray(pool[idx]))
            k += per
        out.append(mine)
    return out


def served_encoder(address: str, work: list[list[np.ndarray]]) -> tuple[float, list[list]]:
    """Seconds for all clients' requests (all clients start together after one warm-up
    request each), and the features each request got back."""
    clients = len(work)
    starts: list[float] = []
    barrier = threading.Barrier(clients, action=lambda: starts.append(time.perf_counter()))
    ends = [0.0] * clients
    results: list[list] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                stub = encoding_pb2_grpc.FeatureEncoderStub(channel)
                size = work[i][0].shape[1]

                def call(tiles: np.ndarray) -> np.ndarray:
                    request = encoding_pb2.EncodeTilesRequest(
                        pixels=tiles.tobytes(), tile_size=size
                    )
                    response = stub.EncodeTiles(request, metadata=ENCODER, timeout=600)
                    return from_tensor(response.features, "features", 2)

                call(work[i][0])  # warm-up: connection, proxy route, replica path
                barrier.wait()
                for tiles in work[i]:
                    results[i].append(call(tiles))
                ends[i] = time.perf_counter()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return max(ends) - starts[0], results


def offline_encoder(
    encoder: VisualEncoder, tiles: np.ndarray, chunk: int
) -> tuple[float, np.ndarray]:
    """Seconds for ``encode_tiles`` over ``tiles`` in chunks of ``chunk``, and the features."""
    start = time.perf_counter()
    parts = [encoder.encode_tiles(tiles[i : i + chunk]) for i in range(0, len(tiles), chunk)]
    return time.perf_counter() - start, np.concatenate(parts)


# -- (b) and (c) -------------------------------------------------------------------------------
def stage_ms(analysis: pathology_pb2.Analysis) -> dict[str, float]:
    return {
        pathology_pb2.Stage.Name(t.stage).removeprefix("STAGE_").lower(): round(t.ms, 1)
        for t in analysis.timings
    }


def analyze_slide(stub, uri: str) -> tuple[float, pathology_pb2.Analysis, int]:
    """Seconds for one AnalyzeSlide stream (WSI classification), its analysis and events."""
    request = pathology_pb2.AnalyzeSlideRequest(
        slide=common_pb2.SlideRef(uri=uri),
        question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION),
    )
    start = time.perf_counter()
    events = list(stub.AnalyzeSlide(request, metadata=GATEWAY, timeout=3600))
    seconds = time.perf_counter() - start
    assert events and events[-1].HasField("analysis"), "stream ended without an analysis"
    return seconds, events[-1].analysis, len(events)


def wait_ready(stub, timeout_s: float = 120.0) -> None:
    """Wait until the gateway answers through the gRPC proxy."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stub.GetModelInfo(pathology_pb2.GetModelInfoRequest(), metadata=GATEWAY, timeout=10)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent encoder clients")
    parser.add_argument("--requests", type=int, help="EncodeTiles requests per client (4)")
    parser.add_argument("--tiles-per-request", type=int, help="tiles per EncodeTiles (64)")
    parser.add_argument("--tile-pool", type=int, default=1024, help="distinct slide tiles used")
    parser.add_argument("--slide-px", type=int, help="edge of the AnalyzeSlide slide (16384)")
    parser.add_argument("--seed", type=int, default=7, help="synthetic slide seed")
    parser.add_argument("--region-calls", type=int, help="AnalyzeRegion calls per path (20)")
    parser.add_argument("--region-warmup", type=int, default=3)
    args = parser.parse_args()
    quick = {"requests": 1, "tiles_per_request": 16, "slide_px": 8192, "region_calls": 5}
    full = {"requests": 4, "tiles_per_request": 64, "slide_px": 16384, "region_calls": 20}
    run_and_print(run, args, quick if args.quick else full)


def run_and_print(
    run: Callable[[argparse.Namespace], dict], args: argparse.Namespace, defaults: dict
) -> None:
    """Fill the options ``args`` left unset from ``defaults``, run the benchmark and print its
    result as the one JSON line on stdout."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Ray forwards its processes' output to this process's stdout: keep it on stderr, so
    # stdout carries only the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result))


def run(args: argparse.Namespace) -> dict:
    """All three measurements; the result line as a dict."""
    wall = time.perf_counter()
    setup_environment()
    from smartpath.services import serving  # imports Ray: after the environment is set

    slide, write_s = bench_slide(args.slide_px, args.seed)
    with tempfile.TemporaryDirectory(prefix="smartpath-bench-") as tmp_name:
        tmp = Path(tmp_name)
        config = make_config(tmp, serving.APPS)
        warm_slide = tmp / "warmup.svs"
        write_synthetic_slide(warm_slide, width=4096, height=4096, seed=args.seed + 1)

        log("reading tiles and loading the model in this process…")
        pool = slide_tiles(config, slide, args.tile_pool)
        model = load_served_model(config)
        encoder = VisualEncoder(model)
        pipeline, backends = local_pipeline(config, model)
        work = request_tiles(pool, args.clients, args.requests, args.tiles_per_request)
        flat = np.concatenate([tiles for mine in work for tiles in mine])

        log("starting Ray Serve and deploying the five applications…")
        t0 = time.perf_counter()
        serving.start(config)
        try:
            serving.deploy(config)
            address = f"127.0.0.1:{config.serve.grpc_port}"
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            stub = pathology_pb2_grpc.PathologyStub(channel)
            wait_ready(stub)
            deploy_s = time.perf_counter() - t0
            log(f"deployed in {deploy_s:.1f} s")

            # (a) served EncodeTiles, then the offline forward while the replicas are idle.
            log(f"(a) {args.clients} clients x {args.requests} EncodeTiles x "
                f"{args.tiles_per_request} tiles…")  # fmt: skip
            served_s, served = served_encoder(address, work)
            encoder.encode_tiles(pool[: args.tiles_per_request])  # warm-up
            # Chunks from one request to the largest batch the service forms, by 4x: this
            # encoder is memory-bound, so its best batch is not the largest.
            max_chunk = args.tiles_per_request * config.serve.encoder.max_batch_size
            chunks = [args.tiles_per_request]
            while chunks[-1] * 4 < max_chunk:
                chunks.append(chunks[-1] * 4)
            chunks = sorted({*chunks, max_chunk})
            offline = {c: offline_encoder(encoder, flat, c) for c in chunks}
            reference = offline[args.tiles_per_request][1]
            got = np.concatenate([f for mine in served for f in mine])
            max_diff = float(np.abs(got - reference).max())
            assert got.shape == reference.shape and max_diff < 1e-4, ("features differ", max_diff)
            n_items = len(flat)
            served_rate = n_items / served_s
            offline_rates = {c: n_items / s for c, (s, _) in offline.items()}
            offline_rate = max(offline_rates.values())
            rates = ", ".join(f"{r:.0f} (chunk {c})" for c, r in offline_rates.items())
            log(f"    served {served_rate:.0f} tiles/s; offline {rates}")

            # (b) AnalyzeSlide: warm the slide path on a small slide, then fresh vs cached.
            log("(b) AnalyzeSlide warm-up on a small slide…")
            for _ in range(2):
                analyze_slide(stub, str(warm_slide))
            log(f"(b) AnalyzeSlide on the {args.slide_px}-px slide, first call…")
            first_s, first, first_events = analyze_slide(stub, str(slide))
            assert not first.feature_cache_hit, "the first call hit the feature cache"
            log(f"    {first_s:.2f} s, {first.tiles} tiles; second call…")
            cached_s, cached, _ = analyze_slide(stub, str(slide))
            assert cached.feature_cache_hit, "the second call missed the feature cache"
            log(f"    {cached_s:.3f} s")

            # (c) AnalyzeRegion: gRPC vs in-process, interleaved.
            scene = render_roi(np.random.default_rng(args.seed), "tumour", 256)
            buf = io.BytesIO()
            Image.fromarray(scene.image).save(buf, format="PNG")
            region = pathology_pb2.AnalyzeRegionRequest(
                image=buf.getvalue(),
                question=pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION),
            )
            loop = asyncio.new_event_loop()
            threads = {"1": 1, "default": torch.get_num_threads()}

            def grpc_call() -> tuple[float, pathology_pb2.Analysis]:
                start = time.perf_counter()
                response = stub.AnalyzeRegion(region, metadata=GATEWAY, timeout=120)
                return (time.perf_counter() - start) * 1000, response.analysis

            def local_call(n_threads: int) -> tuple[float, pathology_pb2.Analysis]:
                torch.set_num_threads(n_threads)
                start = time.perf_counter()
                analysis = loop.run_until_complete(pipeline.analyze_region(region))
                return (time.perf_counter() - start) * 1000, analysis

            log(f"(c) AnalyzeRegion: {args.region_warmup} warm-up and {args.region_calls} "
                "timed calls per path, interleaved…")  # fmt: skip
            times: dict[str, list[float]] = {"grpc": [], **{k: [] for k in threads}}
            stages: dict[str, list[dict[str, float]]] = {k: [] for k in times}
            labels = set()
            for i in range(args.region_warmup + args.region_calls):
                results = {"grpc": grpc_call(), **{k: local_call(n) for k, n in threads.items()}}
                labels.update(a.label for _, a in results.values())
                if i >= args.region_warmup:
                    for k, (ms, analysis) in results.items():
                        times[k].append(ms)
                        stages[k].append(stage_ms(analysis))
            torch.set_num_threads(threads["default"])
            medians = {k: statistics.median(v) for k, v in times.items()}
            grpc_ms = medians.pop("grpc")
            local_ms = min(medians.values())
            log(f"    gRPC {grpc_ms:.1f} ms, in-process {medians} ms")
            stage_medians = {
                k: {n: round(statistics.median(d[n] for d in v), 1) for n in v[0]}
                for k, v in stages.items()
            }
            tasks = asyncio.all_tasks(loop)  # the in-process decoder's batching worker
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()
        finally:
            log("shutting down…")
            serving.shutdown()
            backends.close()

    fraction = served_rate / offline_rate
    speedup = first_s / cached_s
    overhead = grpc_ms / local_ms
    return {
        "benchmark": "serving",
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "deploy_s": round(deploy_s, 1),
        # (a)
        "clients": args.clients,
        "requests_per_client": args.requests,
        "tiles_per_request": args.tiles_per_request,
        "tile_px": int(pool.shape[1]),
        "encoder_items": n_items,
        "encoder_items_per_s": round(served_rate, 1),
        "offline_items_per_s": round(offline_rate, 1),
        "offline_items_per_s_by_chunk": {str(c): round(v, 1) for c, v in offline_rates.items()},
        "encoder_fraction_of_offline": round(fraction, 3),
        "encoder_fraction_of_offline_same_batch": round(served_rate / offline_rates[max_chunk], 3),
        "encoder_max_abs_diff": max_diff,
        # (b)
        "slide_px": args.slide_px,
        "slide_write_s": round(write_s, 1),
        "slide_tiles": first.tiles,
        "slide_stream_events": first_events,
        "slide_label": first.label,
        "slide_labels_agree": cached.label == first.label,
        "slide_first_s": round(first_s, 3),
        "slide_cached_s": round(cached_s, 3),
        "slide_first_stage_ms": stage_ms(first),
        "slide_cached_stage_ms": stage_ms(cached),
        "cache_speedup": round(speedup, 1),
        # (c)
        "region_calls": args.region_calls,
        "region_labels": sorted(labels),
        "region_labels_agree": len(labels) == 1,
        "grpc_region_ms": round(grpc_ms, 1),
        "inprocess_region_ms": round(local_ms, 1),
        "inprocess_region_ms_by_threads": {k: round(v, 1) for k, v in medians.items()},
        "region_stage_ms_median": stage_medians,
        "grpc_overhead_ratio": round(overhead, 3),
        "targets": {
            "encoder_fraction_of_offline_min": TARGETS["encoder_fraction_of_offline"],
            "cache_speedup_min": TARGETS["cache_speedup"],
            "grpc_overhead_ratio_max": TARGETS["grpc_overhead_ratio"],
        },
        "meets_encoder_fraction": fraction >= TARGETS["encoder_fraction_of_offline"],
        "meets_cache_speedup": speedup >= TARGETS["cache_speedup"],
        "meets_grpc_overhead": overhead <= TARGETS["grpc_overhead_ratio"],
        "wall_s": round(time.perf_counter() - wall, 1),
    }


if __name__ == "__main__":
    main()
