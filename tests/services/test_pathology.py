"""The whole stack end to end over gRPC: gateway -> tiler/encoder/router/decoder on real Ray
Serve, slides in a real S3 server on loopback."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from smartpath.client.rpc import PathologyClient, question
from smartpath.core.storage import ObjectRef, make_store
from smartpath.model.checkpoint import DEMO_MODEL_DIR
from smartpath.model.mllm import SmartPathModel
from smartpath.services.local import local_pipeline
from smartpath.training.synthetic.dataset import label_taxonomy
from smartpath.training.synthetic.roi import render_roi
from smartpath.v1 import (
    common_pb2,
    decoding_pb2,
    decoding_pb2_grpc,
    encoding_pb2,
    encoding_pb2_grpc,
    pathology_pb2,
    routing_pb2,
    routing_pb2_grpc,
)
from tests.services.conftest import API_TOKEN

AUTH = ("authorization", f"Bearer {API_TOKEN}")

DEMO_LABELS = label_taxonomy()  # the demo checkpoint's taxonomy

BUCKET = "pathology"
ROI_TASKS = ("classification", "detection", "segmentation", "vqa")
VQA_PROMPT = "Is necrosis present in this region?"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def store(serve_instance):
    s = make_store(serve_instance.storage)
    s.ensure_bucket(BUCKET)
    return s


def _upload(store, path: Path, key: str) -> str:
    ref = ObjectRef(BUCKET, key)
    store.upload(path, ref)
    return f"s3://{ref.bucket}/{ref.key}"


def _upload_fresh(store, path: Path, tmp_path: Path) -> str:
    """Upload a copy of a slide with new content (random bytes after the TIFF data, which
    readers ignore), so its ETag, and hence its feature-cache key, is new."""
    copy = tmp_path / f"fresh-{uuid.uuid4().hex}{path.suffix}"
    copy.write_bytes(path.read_bytes() + uuid.uuid4().bytes)
    return _upload(store, copy, f"fresh/{copy.name}")


@pytest.fixture(scope="module")
def slide_uri(store, synthetic_svs) -> str:
    return _upload(store, synthetic_svs.path, "cases/a.svs")


@pytest.fixture(scope="module")
def address(serve_instance) -> str:
    return f"127.0.0.1:{serve_instance.serve.grpc_port}"


@pytest.fixture(scope="module")
def client(address):
    with PathologyClient(address, token=API_TOKEN, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def roi() -> np.ndarray:
    return render_roi(np.random.default_rng(5), "tumour", 256).image


@pytest.fixture(scope="module")
def in_process(serve_instance):
    pipeline, backends = local_pipeline(serve_instance)
    yield pipeline
    backends.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert "Traceback" not in (err.value.details() or "")
    return err.value.code()


def _prompt(task: str) -> str:
    return VQA_PROMPT if task == "vqa" else ""


def test_model_info(client) -> None:
    info = client.model_info()
    assert info.preset == "tiny" and info.version.startswith("tiny@")
    assert list(info.experts) == [f"expert-{i}" for i in range(4)] and info.top_k == 2
    # The model's facts come from its checkpoint, not from the serving config.
    facts = SmartPathModel.load(DEMO_MODEL_DIR).cfg
    labels = {
        f"{common_pb2.Task.Name(t.task)[5:].lower()}/{common_pb2.Scale.Name(t.scale)[6:].lower()}":
        list(t.labels) for t in info.default_labels
    }  # fmt: skip
    assert labels == facts.labels and "classification/roi" in labels
    assert info.tile_encoder == facts.tile_encoder == "stain-stats-v1"
    assert (info.slide_tiles.mpp, info.slide_tiles.tile_size, info.slide_tiles.min_tissue) == (
        facts.slide_tiles.mpp,
        facts.slide_tiles.tile_size,
        facts.slide_tiles.min_tissue,
    )
    assert info.slide_tiles.stain_norm == (facts.slide_tiles.stain_norm or "")
    assert info.prompt_style == facts.prompt_style == "compact"


@pytest.mark.parametrize("task", ROI_TASKS)
def test_roi_tasks_over_grpc_equal_the_in_process_pipeline(
    client, in_process, serve_instance, roi, task
) -> None:
    q = question(task, _prompt(task))
    served = client.analyze_image(_png(roi), q)
    local = asyncio.run(
        in_process.analyze_region(pathology_pb2.AnalyzeRegionRequest(image=_png(roi), question=q))
    )
    assert served.answer == local.answer and served.reasoning == local.reasoning
    assert [(e.index, round(e.weight, 5)) for e in served.experts] == [
        (e.index, round(e.weight, 5)) for e in local.experts
    ]
    assert served.task == q.task and served.scale == common_pb2.SCALE_ROI
    assert served.frame == pathology_pb2.COORDINATE_FRAME_ROI_PIXELS
    assert (served.width, served.height) == (256, 256)
    assert len(served.experts) == 2 and sum(e.weight for e in served.experts) == pytest.approx(1)
    assert served.model_version.startswith("tiny@") and served.request_id
    stages = {t.stage for t in served.timings}
    assert {pathology_pb2.STAGE_ENCODING, pathology_pb2.STAGE_DECODING} <= stages
    # Decoded within the task's grammar (the default), every answer parses; free text
    # (unconstrained) is the model's own and need not.
    assert served.parsed, (served.answer, served.parse_error)
    free_q = question(task, _prompt(task), constrained=False)
    free = client.analyze_image(_png(roi), free_q)
    free_local = asyncio.run(
        in_process.analyze_region(
            pathology_pb2.AnalyzeRegionRequest(image=_png(roi), question=free_q)
        )
    )
    assert free.answer == free_local.answer and (free.parsed or free.parse_error)
    defaults = DEMO_LABELS
    if task == "classification":
        assert served.parsed and served.label in defaults["classification/roi"]
        scores = {s.label: s.score for s in served.label_scores}
        assert list(scores) == defaults["classification/roi"]
        assert sum(scores.values()) == pytest.approx(1, abs=1e-4)
    for d in served.detections:
        assert 0 <= d.x1 <= d.x2 <= 256 and 0 <= d.y1 <= d.y2 <= 256
    for p in served.polygons:
        assert all(0 <= pt.x <= 256 and 0 <= pt.y <= 256 for pt in p.points)


def test_slide_region_answers_in_slide_coordinates(client, slide_uri) -> None:
    rect = common_pb2.Rect(x=2048, y=1024, width=896, height=896)
    request = pathology_pb2.AnalyzeRegionRequest(
        region=pathology_pb2.SlideRegion(slide=common_pb2.SlideRef(uri=slide_uri), rect=rect),
        question=question("detection"),
    )
    analysis = client.analyze_region(request)
    assert analysis.frame == pathology_pb2.COORDINATE_FRAME_SLIDE_LEVEL0
    assert (analysis.width, analysis.height) == (896, 896)
    for d in analysis.detections:
        assert 2048 <= d.x1 <= d.x2 <= 2048 + 896 and 1024 <= d.y1 <= d.y2 <= 1024 + 896


@pytest.mark.parametrize(
    ("task", "prompt"),
    [("classification", ""), ("vqa", "Which tissue component dominates this slide?")],
)
def test_slide_analysis_streams_progress_and_second_call_hits_the_cache(
    client, store, synthetic_tiff, serve_instance, task, prompt, tmp_path
) -> None:
    uri = _upload_fresh(store, synthetic_tiff.path, tmp_path)
    events: list[pathology_pb2.Progress] = []
    first = client.analyze_slide(uri, question(task, prompt), on_progress=events.append)
    encoding = [e for e in events if e.stage == pathology_pb2.STAGE_ENCODING]
    assert encoding[0].done == 0 and encoding[-1].done == encoding[-1].total == first.tiles > 0
    assert [e.done for e in encoding] == sorted(e.done for e in encoding)
    decoded = "".join(e.text_delta for e in events if e.stage == pathology_pb2.STAGE_DECODING)
    assert first.answer and first.answer in decoded
    assert not first.feature_cache_hit and first.scale == common_pb2.SCALE_WSI
    if task == "classification":
        assert first.label in DEMO_LABELS["classification/wsi"]
    second = client.analyze_slide(uri, question(task, prompt))
    assert second.feature_cache_hit and second.tiles == first.tiles
    assert second.answer == first.answer
    # Evidence: every tile the answer saw, inside the slide, weights summing to 1, the same
    # from the cache.
    weights = np.array([e.weight for e in first.evidence])
    assert len(first.evidence) == first.tiles and (weights > 0).all()
    assert weights.sum() == pytest.approx(1.0, abs=1e-4)
    side = first.evidence[0].rect.width
    assert side == 96  # the demo model's 96-px tiles at 0.5 µm/px, on a 0.5 µm/px slide
    assert all(e.rect.width == e.rect.height == side for e in first.evidence)
    assert all(0 <= e.rect.x < 3000 and 0 <= e.rect.y < 2600 for e in first.evidence)
    assert [e.weight for e in second.evidence] == pytest.approx(list(weights), abs=1e-6)
    cached = list(store.list("features", "features/"))
    assert any(o.key.endswith(".safetensors") for o in cached)


def test_bad_requests_get_precise_codes(client, store, slide_uri, roi, tmp_path) -> None:
    png = _png(roi)
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.analyze_image(png, question(7))) == invalid
    assert _code(lambda: client.analyze_image(png, pathology_pb2.Question())) == invalid
    assert _code(lambda: client.analyze_image(b"", question("vqa", "x?"))) == invalid
    assert _code(lambda: client.analyze_image(b"not an image", question("vqa", "x?"))) == invalid
    huge = _png(np.zeros((4200, 4200, 3), np.uint8))  # 17.6 Mpx > 16.8 Mpx limit
    assert _code(lambda: client.analyze_image(huge, question("classification"))) == invalid
    long = "why? " * 1000
    assert _code(lambda: client.analyze_image(png, question("vqa", long))) == invalid
    assert _code(lambda: client.analyze_image(png, question("vqa"))) == invalid  # no question
    assert (
        _code(lambda: client.analyze_slide("s3://pathology/nope.svs", question("vqa", "x?")))
        == missing
    )
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + bytes(4096))
    corrupt = _upload(store, bad, "bad/corrupt.svs")
    assert _code(lambda: client.analyze_slide(corrupt, question("classification"))) == invalid
    Image.fromarray(roi).save(tmp_path / "no-mpp.png")
    no_mpp = _upload(store, tmp_path / "no-mpp.png", "bad/no-mpp.png")
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: client.analyze_slide(no_mpp, question("classification"))) == precondition
    outside = pathology_pb2.AnalyzeRegionRequest(
        region=pathology_pb2.SlideRegion(
            slide=common_pb2.SlideRef(uri=slide_uri),
            rect=common_pb2.Rect(x=6000, y=0, width=512, height=512),
        ),
        question=question("classification"),
    )
    assert _code(lambda: client.analyze_region(outside)) == invalid
    # The service still answers after all of that.
    assert client.analyze_image(png, question("classification")).label


def test_missing_or_wrong_token_is_unauthenticated(address, roi) -> None:
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    for token in (None, "wrong-token"):
        with PathologyClient(address, token=token, timeout_s=60) as c:
            assert _code(c.model_info) == unauthenticated
            call = lambda c=c: c.analyze_image(_png(roi), question("classification"))  # noqa: E731
            assert _code(call) == unauthenticated
    with PathologyClient(address, token="another-token", timeout_s=60) as c:
        assert c.model_info().version


def test_64_concurrent_calls_answer_or_are_refused_and_none_hangs(address, roi) -> None:
    png = _png(roi)

    def call(i: int) -> grpc.StatusCode:
        with PathologyClient(address, token=API_TOKEN, timeout_s=120) as c:
            try:
                c.analyze_image(png, question("vqa", f"Is there tumour? ({i})", max_new_tokens=16))
            except grpc.RpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    started = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(call, range(64)))
    assert len(codes) == 64 and time.monotonic() - started < 120
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) >= 8  # at least the gateway's ongoing capacity
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes  # 8 ongoing + 8 queued < 64


def test_client_deadline_is_honoured_and_the_stack_recovers(
    address, store, synthetic_tiff, roi, tmp_path
) -> None:
    uri = _upload_fresh(store, synthetic_tiff.path, tmp_path)
    with PathologyClient(address, token=API_TOKEN, timeout_s=0.2) as c:
        started = time.monotonic()
        assert _code(lambda: c.analyze_slide(uri, question("classification"))) == (
            grpc.StatusCode.DEADLINE_EXCEEDED
        )
        assert time.monotonic() - started < 2
    with PathologyClient(address, token=API_TOKEN, timeout_s=120) as c:
        assert c.analyze_image(_png(roi), question("classification")).parsed


def test_health_of_every_service_without_application_metadata(grpc_channel) -> None:
    stub = health_pb2_grpc.HealthStub(grpc_channel)
    for service in (
        "",
        "smartpath.v1.SlideTiler",
        "smartpath.v1.FeatureEncoder",
        "smartpath.v1.ExpertRouter",
        "smartpath.v1.Decoder",
        "smartpath.v1.Pathology",
    ):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def test_messages_over_the_limit_are_refused_by_the_proxy(grpc_channel, serve_instance) -> None:
    """Ray's proxy takes 2 GiB messages unless told; ours refuses past serve.max_message_bytes
    before any service sees the request, and serves the next call."""
    limit = serve_instance.serve.max_message_bytes
    stub = encoding_pb2_grpc.FeatureEncoderStub(grpc_channel)
    metadata = [("application", "encoder"), AUTH]
    with pytest.raises(grpc.RpcError) as refused:
        stub.EncodeImage(
            encoding_pb2.EncodeImageRequest(image=bytes(limit + 1)), metadata=metadata, timeout=60
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as under:  # under the limit: the encoder's own answer
        stub.EncodeImage(
            encoding_pb2.EncodeImageRequest(image=bytes(limit - 1024)),
            metadata=metadata,
            timeout=60,
        )
    assert under.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_internal_services_answer_grpc_on_their_own(grpc_channel, roi) -> None:
    encoded = encoding_pb2_grpc.FeatureEncoderStub(grpc_channel).EncodeImage(
        encoding_pb2.EncodeImageRequest(image=_png(roi)),
        metadata=[("application", "encoder"), AUTH],
        timeout=60,
    )
    n, hidden = encoded.tokens.shape
    assert len(encoded.tokens.data) == n * hidden * 4 and len(encoded.image_grid_thw) == 3
    tokens = np.frombuffer(encoded.tokens.data, "<f4").reshape(n, hidden)
    pooled = common_pb2.Tensor(shape=[hidden], data=tokens.mean(0).astype("<f4").tobytes())
    router = routing_pb2_grpc.ExpertRouterStub(grpc_channel)
    roi_vqa = {"task": common_pb2.TASK_VQA, "scale": common_pb2.SCALE_ROI}
    route = router.Route(
        routing_pb2.RouteRequest(**roi_vqa, pooled=pooled),
        metadata=[("application", "router"), AUTH],
        timeout=60,
    )
    assert len(route.experts) == 2 and route.expert_set == "+".join(
        str(i) for i in sorted(e.index for e in route.experts)
    )
    stream = decoding_pb2_grpc.DecoderStub(grpc_channel).Decode(
        decoding_pb2.DecodeRequest(
            task=common_pb2.TASK_VQA,
            scale=common_pb2.SCALE_ROI,
            prompt=VQA_PROMPT,
            visual_tokens=encoded.tokens,
            image_grid_thw=encoded.image_grid_thw,
            experts=route.experts,
            max_new_tokens=32,
        ),
        metadata=[("application", "decoder"), AUTH],
        timeout=60,
    )
    events = list(stream)
    assert events[-1].done and events[-1].completion_tokens > 0
    assert events[-1].finish_reason in (
        decoding_pb2.FINISH_REASON_STOP,
        decoding_pb2.FINISH_REASON_LENGTH,
    )
    bad = common_pb2.Tensor(shape=[hidden + 1], data=b"\x00" * 8)
    call = lambda: router.Route(  # noqa: E731
        routing_pb2.RouteRequest(**roi_vqa, pooled=bad),
        metadata=[("application", "router"), AUTH],
        timeout=60,
    )
    assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_reaches_every_service_log(client, roi) -> None:
    import ray

    rid = f"rid-{uuid.uuid4().hex[:12]}"
    response, call = client.stub.AnalyzeRegion.with_call(
        pathology_pb2.AnalyzeRegionRequest(image=_png(roi), question=question("classification")),
        metadata=(*client.metadata, ("request_id", rid)),
        timeout=60,
    )
    assert response.analysis.request_id == rid
    assert ("request_id", rid) in [(m.key, m.value) for m in call.trailing_metadata()]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.monotonic() + 10
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = {
            f.name.split("_")[1]
            for f in logs.glob("replica_*.log")
            if rid in f.read_text(errors="replace")
        }
        if {"gateway", "encoder", "router", "decoder"} <= seen:
            break
        time.sleep(0.5)
    assert {"gateway", "encoder", "router", "decoder"} <= seen


def test_prometheus_metrics_of_the_pipeline(client, roi) -> None:
    """Queue time, batch size, tokens, tiles and cache lookups reach Ray's metrics endpoint."""
    import urllib.request

    import ray

    client.analyze_image(_png(roi), question("classification"))
    port = ray._private.worker._global_node.metrics_export_port
    wanted = {
        "smartpath_decoder_queue_seconds",
        "smartpath_decoder_batch_size",
        "smartpath_decoder_tokens",
        "smartpath_encoder_batch_size",
        "smartpath_gateway_rpcs",
    }
    deadline = time.monotonic() + 60
    missing = wanted
    while missing and time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        missing = {m for m in wanted if m not in text}
        time.sleep(2)
    assert not missing, f"not exported: {sorted(missing)}"
