"""``smartpath``: the one command-line interface.

smartpath demo          serve locally; analyse a synthetic slide, a region and an ROI over gRPC
smartpath serve         start Ray Serve with the five SmartPath applications and block
smartpath analyze       ask a running server (or, with --local, this process) about an image,
                        a slide region or a slide
smartpath model init    make a SmartPath checkpoint from an HF-format Qwen2.5-VL checkpoint
smartpath synth-slide   write a synthetic pyramidal slide (SVS or generic TIFF)
smartpath plan          ask a running server for a tile plan; write overlay PNG + GeoJSON
smartpath train sft|grpo  run a training stage (Ray Train + DeepSpeed) from the config
smartpath train demo    reproduce the demo model: synthetic data, SFT, GRPO, evaluation report
smartpath train submit  create a RayJob for SFT or GRPO on Kubernetes (KubeRay)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml
from PIL import Image

from smartpath.core.config import SmartPathConfig, load_config
from smartpath.core.errors import SmartPathError

if TYPE_CHECKING:
    from smartpath.client.rpc import Tls

logger = logging.getLogger("smartpath")


def _setup_environment() -> None:
    # Local Ray must not phone home or bind non-loopback addresses (DESIGN.md).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Replicas that reserve no GPU must not see one ("auto" would put them on it).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")


def _decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def write_plan_outputs(
    out: Path, thumbnail: bytes, describe_width: int, plan_response, stem: str = "plan"
) -> tuple[Path, Path]:
    """Write ``{stem}_overlay.png`` and ``{stem}.geojson`` for a PlanTiles response."""
    from smartpath.client.overlay import draw_plan_overlay, plan_geojson, write_geojson

    out.mkdir(parents=True, exist_ok=True)
    thumb = np.asarray(Image.open(io.BytesIO(thumbnail)).convert("RGB"))
    mask = _decode_png(plan_response.tissue_mask.data) > 0
    plan = plan_response.plan
    xy = [(t.x, t.y) for t in plan.tiles]
    overlay = draw_plan_overlay(thumb, describe_width / thumb.shape[1], mask, xy, plan.footprint)
    png = out / f"{stem}_overlay.png"
    overlay.save(png)
    geojson = out / f"{stem}.geojson"
    write_geojson(
        geojson, plan_geojson(xy, plan.footprint, [t.tissue_fraction for t in plan.tiles])
    )
    return png, geojson


def cmd_synth_slide(args: argparse.Namespace, config: SmartPathConfig) -> int:
    from smartpath.training.synthetic.slides import write_synthetic_slide

    slide = write_synthetic_slide(
        args.path,
        width=args.width,
        height=args.height or args.width,
        fmt=args.format,
        mpp=args.mpp,
        seed=args.seed,
        progress=True,
    )
    print(json.dumps({"path": str(slide.path), "width": slide.width, "height": slide.height}))
    return 0


def cmd_serve(args: argparse.Namespace, config: SmartPathConfig) -> int:
    from smartpath.services.apps import serve_config

    if args.print_config:
        print(yaml.safe_dump(serve_config(config), sort_keys=False), end="")
        return 0
    from smartpath.services import serving

    _setup_environment()
    serving.start(config)
    # After Ray's start: its driver installs a crash handler for SIGTERM (a stack dump, then
    # abort) that this replaces.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serving.deploy(config)
    print(f"SmartPath serving gRPC on port {config.serve.grpc_port}; Ctrl-C to stop", flush=True)
    while not stop.wait(1.0):
        pass
    print("SmartPath stopping: calls in flight finish first", flush=True)
    serving.drain_and_shutdown()
    return 0


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _tls(args: argparse.Namespace) -> Tls | None:
    """The channel's TLS: --tls, or implied by --ca-file or --server-name; None: plaintext."""
    from smartpath.client.rpc import Tls

    if not (args.tls or args.ca_file or args.server_name):
        return None
    return Tls(ca_file=args.ca_file, server_name=args.server_name)


def _local_config(args: argparse.Namespace, config: SmartPathConfig) -> SmartPathConfig:
    """The config of ``analyze --local``: the model named by --model, and the input slide's
    folder readable by path (the user's own files, in the user's own process)."""
    remote = ("address", "token_file", "tls", "ca_file", "server_name")
    if any(getattr(args, name) for name in remote):
        raise ValueError(
            "--local runs in this process: leave out --address, --token-file, --tls, --ca-file"
            " and --server-name"
        )
    model = config.model.model_copy(update={"uri": args.model or config.model.uri})
    roots = list(config.tiling.local_slide_roots)
    if not args.image and not args.input.startswith("s3://"):
        roots.append(Path(args.input).expanduser().resolve().parent)
    tiling = config.tiling.model_copy(update={"local_slide_roots": roots})
    return config.model_copy(update={"model": model, "tiling": tiling})


def cmd_analyze(args: argparse.Namespace, config: SmartPathConfig) -> int:
    from smartpath.client.analyze import Target, analyze, slide_uri_for, summary
    from smartpath.client.rpc import PathologyClient, TilerClient, is_loopback, question
    from smartpath.core.storage import make_store

    if args.model and not args.local:
        raise ValueError("--model picks the checkpoint of --local; a server serves its own")
    if args.local:
        config = _local_config(args, config)
    region = tuple(int(v) for v in _csv(args.region)) if args.region else None
    if region is not None and len(region) != 4:
        raise ValueError(f"--region takes x,y,width,height in level-0 px, got {args.region!r}")
    if args.image:
        target = Target(image=Path(args.input))
    else:
        store = make_store(config.storage)
        uri = slide_uri_for(args.input, store, config.tiling.local_slide_roots)
        target = Target(slide_uri=uri, region=region)
    q = question(
        args.task,
        args.prompt or "",
        _csv(args.labels),
        _csv(args.options),
        args.max_new_tokens,
        constrained=not args.free_text,
    )
    with contextlib.ExitStack() as stack:
        if args.local:
            from smartpath.client.local import LocalSession

            client = tiler = stack.enter_context(LocalSession(config))
        else:
            address = args.address or f"127.0.0.1:{config.serve.grpc_port}"
            token = args.token_file.read_text().strip() if args.token_file else None
            tls = _tls(args)
            if token and tls is None and not is_loopback(address):
                print(
                    f"smartpath: warning: sending the bearer token to {address} in clear text;"
                    " add --tls",
                    file=sys.stderr,
                )
            client = stack.enter_context(PathologyClient(address, token=token, tls=tls))
            tiler = stack.enter_context(TilerClient(address, token=token, tls=tls))
        analysis, paths = analyze(
            client, tiler, target, q, Path(args.out), args.stem, region_mpp=config.model.region_mpp
        )
    print(json.dumps(summary(analysis, paths), indent=2, ensure_ascii=False))
    return 0


def cmd_model_init(args: argparse.Namespace, config: SmartPathConfig) -> int:
    from smartpath.model.initialize import init_checkpoint

    fields: dict = {"seed": args.seed}
    if args.tile_encoder:
        fields["tile_encoder_path"] = args.tile_encoder
    manifest = init_checkpoint(
        args.base,
        args.out,
        preset=args.preset,
        store=config.storage,
        overwrite=args.overwrite,
        **fields,
    )
    m = manifest.model
    print(
        json.dumps(
            {
                "checkpoint": args.out,
                "base": m.base_path,
                "preset": m.preset,
                "text_layers": m.text.num_layers,
                "vision_layers": m.vision.depth,
                "tile_encoder": m.tile_encoder,
                "experts": len(manifest.experts),
                "tensors": len(manifest.weights.tensors) if manifest.weights else 0,
            },
            indent=2,
        )
    )
    return 0


def cmd_plan(args: argparse.Namespace, config: SmartPathConfig) -> int:
    from smartpath.client.rpc import TilerClient, tile_spec

    address = args.address or f"127.0.0.1:{config.serve.grpc_port}"
    token = args.token_file.read_text().strip() if args.token_file else None
    with TilerClient(address, token=token, tls=_tls(args)) as client:
        info = client.describe(args.uri, mpp_override=args.mpp_override, thumbnail_max_px=1024)
        spec = tile_spec(mpp=args.mpp, tile_size=args.tile_size)
        plan = client.plan(args.uri, spec, mpp_override=args.mpp_override, include_tissue_mask=True)
    png, geojson = write_plan_outputs(Path(args.out), info.thumbnail.data, info.width, plan)
    print(json.dumps({"tiles": len(plan.plan.tiles), "overlay": str(png), "geojson": str(geojson)}))
    return 0


def cmd_demo(args: argparse.Namespace, config: SmartPathConfig) -> int:
    """The main job on the embedded default: local Ray, local storage, the demo model; a
    synthetic slide and ROI analysed end to end through the gRPC API."""
    from smartpath.client.analyze import Target, analyze, best_region, summary
    from smartpath.client.rpc import PathologyClient, TilerClient, question
    from smartpath.core.storage import ObjectRef, make_store
    from smartpath.services import serving
    from smartpath.training.synthetic.roi import render_roi
    from smartpath.training.synthetic.slides import write_synthetic_slide

    _setup_environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slide_path = out / "demo.svs"
    print(f"[1/5] writing a {args.size}x{args.size} px synthetic SVS slide and an ROI", flush=True)
    write_synthetic_slide(
        slide_path, width=args.size, height=args.size, seed=args.seed, progress=True
    )
    roi_path = out / "roi.png"
    Image.fromarray(render_roi(np.random.default_rng(args.seed), "tumour", 320).image).save(
        roi_path
    )
    store = make_store(config.storage)
    ref = ObjectRef("slides", "demo/demo.svs")
    store.ensure_bucket(ref.bucket)
    store.upload(slide_path, ref)
    backend = config.storage.endpoint or f"local storage at {config.storage.local_root}"
    print(f"      stored as {ref.uri} ({backend})", flush=True)

    print("[2/5] starting Ray Serve locally with the five SmartPath applications", flush=True)
    serving.start(config)
    serving.deploy(config)
    address = f"127.0.0.1:{config.serve.grpc_port}"
    results = {}
    try:
        with PathologyClient(address) as client, TilerClient(address) as tiler:
            print(f"[3/5] analysing the whole slide over gRPC at {address}", flush=True)
            slide = Target(slide_uri=ref.uri)
            results["slide_classification"] = analyze(
                client, tiler, slide, question("classification"), out, "slide_classification"
            )
            vqa = question("vqa", "Which tissue component dominates this slide?")
            results["slide_vqa"] = analyze(client, tiler, slide, vqa, out, "slide_vqa")
            print("[4/5] detecting nuclei in a slide region", flush=True)
            mpp = config.model.region_mpp
            region = Target(slide_uri=ref.uri, region=best_region(tiler, ref.uri, mpp, 448))
            results["region_detection"] = analyze(
                client,
                tiler,
                region,
                question("detection"),
                out,
                "region_detection",
                region_mpp=mpp,
            )
            print("[5/5] classifying and segmenting an ROI image", flush=True)
            roi = Target(image=roi_path)
            for task in ("classification", "segmentation"):
                results[f"roi_{task}"] = analyze(
                    client, tiler, roi, question(task), out, f"roi_{task}"
                )
    finally:
        serving.shutdown()
    print(json.dumps({k: summary(*v) for k, v in results.items()}, indent=2, ensure_ascii=False))
    return 0


def cmd_train_stage(args: argparse.Namespace, config: SmartPathConfig) -> int:
    _setup_environment()
    from smartpath.training.engine import run_stage

    if not config.training.data.manifests:
        raise ValueError("training.data.manifests is empty: name at least one JSONL manifest")
    result = run_stage(config, args.train_command)
    if result.error is not None:
        print(f"smartpath: {args.train_command} failed: {result.error}", file=sys.stderr)
        return 1
    model = config.training.model_uri(args.train_command)
    print(json.dumps({"stage": args.train_command, "model": model, **result.metrics}, indent=2))
    return 0


def cmd_train_demo(args: argparse.Namespace, config: SmartPathConfig) -> int:
    _setup_environment()
    from smartpath.training.demo import REPORT_DIR, reproduce_demo

    recipe = {"sft_steps": args.sft_steps, "grpo_steps": args.grpo_steps, "seed": args.seed}
    summary = reproduce_demo(
        Path(args.out),
        **{k: v for k, v in recipe.items() if v is not None},
        train=not args.report_only,
        publish=args.publish,
        report_dir=REPORT_DIR if args.publish else None,
    )
    print(json.dumps({k: summary[k] for k in ("report", "timings_s", "total_s")}, indent=2))
    return 0


def cmd_train_submit(args: argparse.Namespace, config: SmartPathConfig) -> int:
    from smartpath.training.rayjob import (
        PodResources,
        RayJobSpec,
        build_rayjob,
        job_name,
        submit_rayjob,
        to_yaml,
        validate_rayjob,
    )

    fields = {
        "kind": args.kind,
        "name": args.name or job_name("smartpath", args.kind, config.training.name),
        "namespace": args.namespace,
        "image": args.image,
        "workers": args.workers,
        "worker": PodResources(cpus=args.cpus, memory=args.memory, gpus=args.gpus),
        "config_map": args.config_map,
        "s3_secret": args.s3_secret,
    }
    if config.storage.endpoint is None:
        fields["storage_endpoint"] = args.storage_endpoint
        spec = RayJobSpec(**fields)
    else:
        spec = RayJobSpec.from_config(config, **fields)
    job = build_rayjob(spec)
    validate_rayjob(job)
    if args.dry_run:
        print(to_yaml(job), end="")
        return 0
    created = submit_rayjob(job, args.namespace, kube_context=args.context)
    print(f"created RayJob {created['metadata']['name']} in namespace {args.namespace}")
    return 0


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls", action="store_true", help="dial with TLS (e.g. an ingress at host:443)"
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="PATH",
        help="PEM file of trusted CAs (implies --tls; default: system roots)",
    )
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="name the server's certificate must carry, if not the dialled host (implies --tls)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartpath", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML config file (env SMARTPATH_* overrides)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on the embedded default")
    demo.add_argument("--out", default="out/demo", help="output folder")
    demo.add_argument("--size", type=int, default=12_000, help="slide edge in px (0.25 µm/px)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    serve_p = sub.add_parser("serve", help="start Ray Serve with SmartPath and block")
    serve_p.add_argument(
        "--print-config", action="store_true", help="print the Serve config (YAML) and exit"
    )
    serve_p.set_defaults(func=cmd_serve)

    ask = sub.add_parser("analyze", help="analyse an image, a slide region or a slide")
    ask.add_argument(
        "input", help="slide (s3://bucket/key or a local file) or, with --image, a PNG/JPEG ROI"
    )
    ask.add_argument("--image", action="store_true", help="input is an ROI image")
    ask.add_argument(
        "--task", required=True, choices=["classification", "detection", "segmentation", "vqa"]
    )
    ask.add_argument("--prompt", help="the question (VQA) or an instruction")
    ask.add_argument("--labels", help="comma-separated candidate labels")
    ask.add_argument("--options", help="comma-separated options of a closed question")
    ask.add_argument("--region", help="x,y,width,height of a slide region (level-0 px)")
    ask.add_argument(
        "--max-new-tokens", type=int, default=0, help="answer length cap (0: the server's)"
    )
    ask.add_argument(
        "--free-text",
        action="store_true",
        help="decode free text instead of within the task's answer grammar (on by default)",
    )
    ask.add_argument("--address", help="gRPC address (default 127.0.0.1:<serve.grpc_port>)")
    ask.add_argument("--token-file", type=Path, help="file holding a bearer token")
    _add_tls_arguments(ask)
    ask.add_argument(
        "--local", action="store_true", help="run the pipeline in this process (no Ray, no server)"
    )
    ask.add_argument(
        "--model", help="with --local: checkpoint folder or s3:// URI (default: model.uri or demo)"
    )
    ask.add_argument("--out", default="out/analyze", help="output folder")
    ask.add_argument("--stem", default="analysis", help="output file name stem")
    ask.set_defaults(func=cmd_analyze)

    model_p = sub.add_parser("model", help="SmartPath checkpoints")
    model_sub = model_p.add_subparsers(dest="model_command", required=True)
    init = model_sub.add_parser(
        "init", help="make a SmartPath checkpoint from an HF-format Qwen2.5-VL checkpoint"
    )
    init.add_argument("--base", required=True, help="HF folder or s3://bucket/prefix/ of the base")
    init.add_argument("--out", required=True, help="checkpoint folder or s3://bucket/prefix/")
    init.add_argument(
        "--preset", help="name of the base (qwen2.5-vl-3b, qwen2.5-vl-7b); default: by its widths"
    )
    init.add_argument(
        "--tile-encoder", help="HF ViT/DINOv2 folder or s3:// prefix (default: stain-stats-v1)"
    )
    init.add_argument("--seed", type=int, default=0, help="seed of SmartPath's new parts")
    init.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    init.set_defaults(func=cmd_model_init)

    synth = sub.add_parser("synth-slide", help="write a synthetic pyramidal slide")
    synth.add_argument("path", type=Path)
    synth.add_argument("--width", type=int, default=20_000)
    synth.add_argument("--height", type=int, default=0, help="0 means square")
    synth.add_argument("--format", choices=["svs", "tiff"], default="svs")
    synth.add_argument("--mpp", type=float, default=0.25)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth_slide)

    plan = sub.add_parser("plan", help="tile plan from a running server, as PNG + GeoJSON")
    plan.add_argument("uri", help="s3://bucket/key or a local path the server may read")
    plan.add_argument("--address", help="gRPC address (default 127.0.0.1:<serve.grpc_port>)")
    plan.add_argument("--token-file", type=Path, help="file holding a bearer token")
    _add_tls_arguments(plan)
    plan.add_argument("--mpp", type=float, default=0.5)
    plan.add_argument("--tile-size", type=int, default=256)
    plan.add_argument("--mpp-override", type=float, default=0.0)
    plan.add_argument("--out", default="out/plan")
    plan.set_defaults(func=cmd_plan)

    train = sub.add_parser("train", help="SFT and GRPO (Ray Train + DeepSpeed), demo, KubeRay")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    for stage in ("sft", "grpo"):
        stage_p = train_sub.add_parser(stage, help=f"run {stage.upper()} from the config")
        stage_p.set_defaults(func=cmd_train_stage)
    demo_model = train_sub.add_parser("demo", help="reproduce the demo model and its report")
    demo_model.add_argument("--out", default="out/demo-model", help="data, runs and report")
    demo_model.add_argument("--sft-steps", type=int, help="default: the recipe's")
    demo_model.add_argument("--grpo-steps", type=int, help="default: the recipe's")
    demo_model.add_argument("--seed", type=int, help="training seed (default: the recipe's)")
    demo_model.add_argument(
        "--publish", action="store_true", help="install as the default model; report to reports/"
    )
    demo_model.add_argument(
        "--report-only", action="store_true", help="evaluate and report the runs under --out"
    )
    demo_model.set_defaults(func=cmd_train_demo)
    submit = train_sub.add_parser("submit", help="create a RayJob for SFT or GRPO")
    submit.add_argument("kind", choices=["sft", "grpo"])
    submit.add_argument("--image", required=True, help="image holding smartpath")
    submit.add_argument(
        "--name", help="RayJob name (default smartpath-<kind>-<training.name>: one RayJob per run)"
    )
    submit.add_argument("--namespace", default="default")
    submit.add_argument("--workers", type=int, default=2)
    submit.add_argument("--cpus", default="2", help="CPUs per worker (a Kubernetes quantity)")
    submit.add_argument("--memory", default="8Gi", help="memory per worker")
    submit.add_argument("--gpus", type=int, default=0, help="GPUs per worker (0: CPU)")
    submit.add_argument(
        "--storage-endpoint", default="minio:9000", help="used when storage.endpoint is unset"
    )
    submit.add_argument(
        "--config-map", default="smartpath-config", help="ConfigMap with config.yaml"
    )
    submit.add_argument("--s3-secret", default="smartpath-s3", help="Secret with S3 keys")
    submit.add_argument("--context", help="kubeconfig context")
    submit.add_argument("--dry-run", action="store_true", help="print the YAML, create nothing")
    submit.set_defaults(func=cmd_train_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (OSError, ValueError) as e:
        parser.error(f"bad config: {e}")
    logging.basicConfig(level=config.log_level, format="%(levelname)s %(name)s: %(message)s")
    import grpc

    try:
        return args.func(args, config)
    except grpc.RpcError as e:  # the server's answer, or no connection (e.g. a TLS mismatch)
        code = e.code() if isinstance(e, grpc.Call) else None
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        name = code.name if code is not None else "RPC failed"
        print(f"smartpath: error: {name}: {' '.join(str(details).split())}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad arguments found past argparse (pydantic errors are ValueErrors)
        print(f"smartpath: error: {e}", file=sys.stderr)
        return 2
    except (SmartPathError, OSError) as e:  # e.g. a missing checkpoint or slide, in --local
        print(f"smartpath: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
