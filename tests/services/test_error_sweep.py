"""Error details name no server facts, over real gRPC against the live Serve stack.

Every service's error paths (missing object or bucket, corrupt or unsupported slides, local
paths outside the allowed roots or missing, ``..`` and symlink escapes, regions outside the
slide, bad tile sizes, malformed tensors …) answer their precise status code, and the details
hold no S3 endpoint, slide cache folder, local slide root, token file, temporary or install
path, stack trace or Python repr; the caller's own slide reference may be echoed. The full
message goes to the replica's log with the request id (DESIGN.md, Conventions; the core-level
sweep is tests/core/slides/test_error_details.py).
"""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from smartpath.core.config import SmartPathConfig
from smartpath.core.storage import ObjectRef, make_store
from smartpath.v1 import (
    common_pb2,
    decoding_pb2,
    decoding_pb2_grpc,
    encoding_pb2,
    encoding_pb2_grpc,
    pathology_pb2,
    pathology_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
    tiling_pb2,
    tiling_pb2_grpc,
)
from tests.conftest import FIXTURES
from tests.services.conftest import API_TOKEN

AUTH = ("authorization", f"Bearer {API_TOKEN}")
BUCKET = "sweep"
TIMEOUT_S = 60
VMS_MISSING_IMAGE = (
    b"[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
    b"ImageFile=image.jpg\nMapFile=map.jpg\n"
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

# What no detail may hold besides this server's configured facts (_server_facts).
FORBIDDEN_TEXT = ("Traceback", 'File "', "/tmp", "pytest-of", "site-packages")
FORBIDDEN_PATTERNS = (
    re.compile(r"\b\w*(Error|Exception|Warning)\("),  # an exception's repr: OSError(2, …)
    re.compile(r"<class '"),
    re.compile(r"object at 0x[0-9a-f]+"),
    re.compile(r"RayTaskError|ray\.exceptions|botocore|openslide\.lowlevel"),
)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 120)).save(buf, format="GIF")
    return buf.getvalue()


def _server_facts(config: SmartPathConfig) -> list[str]:
    """The facts of this server that no error detail may name."""
    endpoint = config.storage.endpoint
    assert endpoint is not None and config.serve.auth_token_file is not None
    facts = {endpoint, endpoint.rsplit(":", 1)[0]}
    for path in (
        config.slide_cache.dir,
        *config.tiling.local_slide_roots,
        config.serve.auth_token_file,
    ):
        facts |= {str(path), str(Path(path).resolve())}
    return sorted(facts)


def _assert_clean(details: str, uri: str, facts: list[str]) -> None:
    """``details`` name none of ``facts`` once the caller's own ``uri`` (or the path of a
    file:// URI) is taken out."""
    rest = details
    for own in {uri, uri.removeprefix("file://")} - {""}:
        rest = rest.replace(own, "")
    for fact in (*facts, *FORBIDDEN_TEXT):
        assert fact not in rest, f"{fact!r} leaked into {details!r}"
    for pattern in FORBIDDEN_PATTERNS:
        assert not pattern.search(rest), f"{pattern.pattern!r} matches {details!r}"


# -- the slides the cases name ------------------------------------------------------------
@dataclass(frozen=True)
class Slides:
    """The slide references the cases send."""

    good: str  # a readable 6144x5120 SVS at 0.25 µm/px, in storage
    corrupt: str  # an SVS zeroed after its first 300 bytes, in storage
    companion: str  # a VMS whose image and map files are missing, in storage
    gif: str  # an image in a format no slide reader takes, in storage
    empty: str  # an empty object
    no_mpp: str  # a PNG: readable, but without a resolution
    local_corrupt: str  # a corrupt slide inside a local slide root
    local_confined: str  # a VMS in a local root naming a companion outside its folder
    local_missing: str  # a path inside a local slide root that does not exist
    outside: str  # an existing file outside every local slide root
    dotdot: str  # a path from a local slide root out of it through ".."
    symlink: str  # a link inside a local slide root to a file outside every root
    outside_file_uri: str  # file:// URI of ``outside``

    def uri(self, slide: str) -> str:
        """The reference a case names: one of these fields, or ``slide`` itself."""
        return getattr(self, slide.replace("-", "_"), slide)


@pytest.fixture(scope="module")
def slides(serve_instance, synthetic_svs, slides_dir: Path, tmp_path_factory) -> Slides:
    store = make_store(serve_instance.storage)
    store.ensure_bucket(BUCKET)

    def put(key: str, data: bytes) -> str:
        ref = ObjectRef(BUCKET, key)
        store.put_bytes(ref, data)
        return ref.uri

    good = ObjectRef(BUCKET, "cases/good.svs")
    store.upload(synthetic_svs.path, good)
    corrupt = bytearray((FIXTURES / "small.svs").read_bytes())
    corrupt[300:] = bytes(len(corrupt) - 300)
    outside = tmp_path_factory.mktemp("outside") / "a.svs"
    outside.write_bytes(bytes(corrupt))
    local = slides_dir / f"sweep-{uuid.uuid4().hex[:8]}"
    (local / "c").mkdir(parents=True)
    (local / "corrupt.svs").write_bytes(bytes(corrupt))
    (local / "c" / "x.vms").write_bytes(VMS_MISSING_IMAGE.replace(b"image.jpg", b"/etc/hostname"))
    (local / "link.svs").symlink_to(outside)
    return Slides(
        good=good.uri,
        corrupt=put("bad/corrupt.svs", bytes(corrupt)),
        companion=put("bad/v/slide.vms", VMS_MISSING_IMAGE),
        gif=put("bad/anim.gif", _gif()),
        empty=put("bad/empty.svs", b""),
        no_mpp=put("bad/no-mpp.png", _png(np.full((256, 256, 3), 200, np.uint8))),
        local_corrupt=str(local / "corrupt.svs"),
        local_confined=str(local / "c" / "x.vms"),
        local_missing=str(local / "none.svs"),
        outside=str(outside),
        dotdot=f"{local}/../../{outside.parent.name}/a.svs",
        symlink=str(local / "link.svs"),
        outside_file_uri=f"file://{outside}",
    )


# -- the calls ------------------------------------------------------------------------------
Call = Callable[[grpc.Channel, str, list[tuple[str, str]]], None]  # (channel, uri, metadata)


def _rpc(app: str, stub: type, method: str, make: Callable[[str], object]) -> Call:
    """A call of ``stub.method`` on ``app`` with the request ``make(uri)``; a server stream
    is drained."""

    def call(channel: grpc.Channel, uri: str, metadata: list[tuple[str, str]]) -> None:
        metadata = [("application", app), AUTH, *metadata]
        rpc = getattr(stub(channel), method)
        result = rpc(make(uri), metadata=metadata, timeout=TIMEOUT_S)
        if isinstance(result, grpc.Call):  # a server stream
            list(result)

    return call


def _ref(uri: str) -> common_pb2.SlideRef:
    return common_pb2.SlideRef(uri=uri)


def describe(**fields) -> Call:
    return _rpc(
        "tiler",
        tiling_pb2_grpc.SlideTilerStub,
        "DescribeSlide",
        lambda uri: tiling_pb2.DescribeSlideRequest(slide=_ref(uri), **fields),
    )


def plan(**spec) -> Call:
    return _rpc(
        "tiler",
        tiling_pb2_grpc.SlideTilerStub,
        "PlanTiles",
        lambda uri: tiling_pb2.PlanTilesRequest(slide=_ref(uri), spec=tiling_pb2.TileSpec(**spec)),
    )


def read(spec: dict | None = None, **fields) -> Call:
    return _rpc(
        "tiler",
        tiling_pb2_grpc.SlideTilerStub,
        "ReadTiles",
        lambda uri: tiling_pb2.ReadTilesRequest(
            slide=_ref(uri), spec=tiling_pb2.TileSpec(**spec or {}), **fields
        ),
    )


def encode_image(image: bytes) -> Call:
    return _rpc(
        "encoder",
        encoding_pb2_grpc.FeatureEncoderStub,
        "EncodeImage",
        lambda uri: encoding_pb2.EncodeImageRequest(image=image),
    )


def encode_tiles(pixels: bytes, tile_size: int) -> Call:
    return _rpc(
        "encoder",
        encoding_pb2_grpc.FeatureEncoderStub,
        "EncodeTiles",
        lambda uri: encoding_pb2.EncodeTilesRequest(pixels=pixels, tile_size=tile_size),
    )


def encode_slide() -> Call:
    return _rpc(
        "encoder",
        encoding_pb2_grpc.FeatureEncoderStub,
        "EncodeSlide",
        lambda uri: encoding_pb2.EncodeSlideRequest(slide=_ref(uri)),
    )


def _tensor(shape: list[int], values: list[float] | None = None) -> common_pb2.Tensor:
    data = np.asarray(values if values is not None else np.zeros(int(np.prod(shape))), "<f4")
    return common_pb2.Tensor(shape=shape, data=data.tobytes())


def route(pooled: common_pb2.Tensor, task: int = common_pb2.TASK_VQA) -> Call:
    return _rpc(
        "router",
        routing_pb2_grpc.ExpertRouterStub,
        "Route",
        lambda uri: routing_pb2.RouteRequest(task=task, scale=common_pb2.SCALE_ROI, pooled=pooled),
    )


def decode(**fields) -> Call:
    request = {
        "task": common_pb2.TASK_VQA,
        "scale": common_pb2.SCALE_ROI,
        "prompt": "Is there tumour?",
        "visual_tokens": _tensor([4, 8]),  # the model's hidden size is not 8
        "image_grid_thw": [1, 2, 2],
        "experts": [common_pb2.ExpertWeight(index=0, weight=1.0)],
        "max_new_tokens": 4,
        **fields,
    }
    return _rpc(
        "decoder",
        decoding_pb2_grpc.DecoderStub,
        "Decode",
        lambda uri: decoding_pb2.DecodeRequest(**request),
    )


CLASSIFY = pathology_pb2.Question(task=common_pb2.TASK_CLASSIFICATION)


def analyze_image(image: bytes) -> Call:
    return _rpc(
        "gateway",
        pathology_pb2_grpc.PathologyStub,
        "AnalyzeRegion",
        lambda uri: pathology_pb2.AnalyzeRegionRequest(image=image, question=CLASSIFY),
    )


def analyze_region(x: int = 0, y: int = 0, w: int = 512, h: int = 512, **resolution) -> Call:
    def request(uri: str) -> pathology_pb2.AnalyzeRegionRequest:
        region = pathology_pb2.SlideRegion(
            slide=_ref(uri), rect=common_pb2.Rect(x=x, y=y, width=w, height=h)
        )
        if resolution:
            region.resolution.CopyFrom(common_pb2.Resolution(**resolution))
        return pathology_pb2.AnalyzeRegionRequest(region=region, question=CLASSIFY)

    return _rpc("gateway", pathology_pb2_grpc.PathologyStub, "AnalyzeRegion", request)


def analyze_slide() -> Call:
    return _rpc(
        "gateway",
        pathology_pb2_grpc.PathologyStub,
        "AnalyzeSlide",
        lambda uri: pathology_pb2.AnalyzeSlideRequest(slide=_ref(uri), question=CLASSIFY),
    )


# -- the cases ------------------------------------------------------------------------------
MISSING_OBJECT = f"s3://{BUCKET}/no/such.svs"
MISSING_BUCKET = "s3://no-such-bucket-sweep/a.svs"
# Each bad slide (a Slides field or a URI) and the code every slide RPC answers for it.
BAD_SLIDES = {
    "missing-object": (MISSING_OBJECT, NOT_FOUND),
    "missing-bucket": (MISSING_BUCKET, NOT_FOUND),
    "missing-folder": (f"s3://{BUCKET}/no/such/folder/", NOT_FOUND),
    "invalid-bucket": ("s3://No_Such/a.svs", INVALID),
    "corrupt": ("corrupt", INVALID),
    "companion": ("companion", INVALID),
    "gif": ("gif", INVALID),
    "empty": ("empty", INVALID),
    "local-corrupt": ("local-corrupt", INVALID),
    "local-confined": ("local-confined", INVALID),
    "local-missing": ("local-missing", NOT_FOUND),
    "outside": ("outside", INVALID),
    "outside-file-uri": ("outside-file-uri", INVALID),
    "dotdot": ("dotdot", INVALID),
    "symlink": ("symlink", INVALID),
    "relative": ("slides/a.svs", INVALID),
}
COMMON = ("missing-object", "missing-bucket", "corrupt", "gif", "outside", "dotdot")


@dataclass(frozen=True)
class Case:
    code: grpc.StatusCode
    call: Call
    slide: str = ""  # a Slides field or a URI; "" for calls without a slide


def _bad_slides(prefix: str, call: Call, names: tuple[str, ...]) -> dict[str, Case]:
    return {f"{prefix}-{n}": Case(BAD_SLIDES[n][1], call, BAD_SLIDES[n][0]) for n in names}


CASES: dict[str, Case] = {
    # tiler
    **_bad_slides("describe", describe(), tuple(BAD_SLIDES)),
    "describe-empty-uri": Case(INVALID, describe()),
    "describe-thumbnail-too-big": Case(INVALID, describe(thumbnail_max_px=100_000), "good"),
    "plan-no-mpp": Case(PRECONDITION, plan(), "no-mpp"),
    **_bad_slides("plan", plan(), ("missing-object", "companion", "local-missing", "symlink")),
    "plan-tile-size-1": Case(INVALID, plan(tile_size=1), "good"),
    "plan-tile-size-huge": Case(INVALID, plan(tile_size=1 << 20), "good"),
    "plan-negative-overlap": Case(INVALID, plan(tile_size=256, overlap=-4), "good"),
    "plan-negative-mpp": Case(INVALID, plan(resolution=common_pb2.Resolution(mpp=-1)), "good"),
    "plan-bad-tissue-fraction": Case(INVALID, plan(min_tissue_fraction=2.0), "good"),
    **_bad_slides("read", read(), COMMON),
    "read-bad-encoding": Case(INVALID, read(encoding=99), "good"),
    "read-negative-batch": Case(INVALID, read(batch_size=-1), "good"),
    "read-tile-size-3": Case(INVALID, read({"tile_size": 3}), "good"),
    "read-tile-outside-slide": Case(
        INVALID, read({"tile_size": 256}, tiles=[tiling_pb2.Tile(x=10**9, y=10**9)]), "good"
    ),
    # encoder
    "encode-image-gif": Case(INVALID, encode_image(_gif())),
    "encode-image-garbage": Case(INVALID, encode_image(b"\x89PNG\r\n\x1a\n" + bytes(64))),
    "encode-image-truncated": Case(
        INVALID, encode_image(_png(np.full((64, 64, 3), 7, np.uint8))[:60])
    ),
    "encode-tiles-size-8": Case(INVALID, encode_tiles(bytes(8 * 8 * 3), 8)),
    "encode-tiles-short-pixels": Case(INVALID, encode_tiles(bytes(1000), 32)),
    "encode-slide-no-mpp": Case(PRECONDITION, encode_slide(), "no-mpp"),
    **_bad_slides("encode-slide", encode_slide(), COMMON),
    # router
    "route-wrong-hidden": Case(INVALID, route(_tensor([7]))),
    "route-2d": Case(INVALID, route(_tensor([2, 3]))),
    "route-short-data": Case(INVALID, route(common_pb2.Tensor(shape=[64], data=bytes(8)))),
    "route-nan": Case(INVALID, route(_tensor([3], [0, float("nan"), 1]))),
    "route-no-task": Case(INVALID, route(_tensor([7]), task=common_pb2.TASK_UNSPECIFIED)),
    # decoder
    "decode-wrong-hidden": Case(INVALID, decode()),
    "decode-infinite-tokens": Case(INVALID, decode(visual_tokens=_tensor([1, 2], [np.inf, 0]))),
    "decode-negative-shape": Case(INVALID, decode(visual_tokens=_tensor([-1, 8], [0] * 8))),
    "decode-roi-without-grid": Case(INVALID, decode(image_grid_thw=[])),
    "decode-no-task": Case(INVALID, decode(task=common_pb2.TASK_UNSPECIFIED)),
    "decode-bad-expert": Case(
        INVALID, decode(experts=[common_pb2.ExpertWeight(index=99, weight=1.0)])
    ),
    # gateway
    "region-image-gif": Case(INVALID, analyze_image(_gif())),
    "region-image-garbage": Case(INVALID, analyze_image(b"GIF89a" + bytes(32))),
    **_bad_slides(
        "region",
        analyze_region(),
        (*COMMON, "companion", "local-corrupt", "local-missing", "symlink"),
    ),
    "region-outside-slide": Case(INVALID, analyze_region(x=6000), "good"),
    "region-negative-size": Case(INVALID, analyze_region(w=-5), "good"),
    "region-too-many-pixels": Case(INVALID, analyze_region(w=6144, h=5120, mpp=0.25), "good"),
    "region-negative-mpp": Case(INVALID, analyze_region(mpp=-2), "good"),
    "slide-no-mpp": Case(PRECONDITION, analyze_slide(), "no-mpp"),
    **_bad_slides(
        "slide",
        analyze_slide(),
        (*COMMON, "companion", "empty", "local-corrupt", "local-missing", "outside-file-uri"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_details_name_no_server_facts(grpc_channel, service_config, slides, case) -> None:
    expected = CASES[case]
    uri = slides.uri(expected.slide)
    with pytest.raises(grpc.RpcError) as error:
        expected.call(grpc_channel, uri, [])
    details = error.value.details() or ""
    assert error.value.code() == expected.code, details
    _assert_clean(details, uri, _server_facts(service_config))


def _serve_log_lines(app: str, marker: str) -> list[str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return [
        line
        for f in logs.glob(f"replica_{app}_*.log")
        for line in f.read_text(errors="replace").splitlines()
        if marker in line
    ]


@pytest.mark.parametrize(
    ("app", "call"),
    [("tiler", describe()), ("gateway", analyze_region())],
    ids=["tiler", "gateway"],
)
def test_the_full_message_is_logged_with_the_request_id(
    grpc_channel, service_config, slides, app, call
) -> None:
    """What the details leave out (the cached file OpenSlide could not open, under the slide
    cache) is in the tiler replica's log, on a line with the request id."""
    rid = f"rid-{uuid.uuid4().hex[:12]}"
    with pytest.raises(grpc.RpcError) as error:
        call(grpc_channel, slides.companion, [("request_id", rid)])
    assert error.value.code() == INVALID
    assert "missing" in (error.value.details() or "")  # still says what is wrong
    cache = str(service_config.slide_cache.dir)
    assert cache not in (error.value.details() or "")
    deadline = time.monotonic() + 10
    while not any(cache in line for line in _serve_log_lines("tiler", rid)):
        assert time.monotonic() < deadline, _serve_log_lines("tiler", rid)
        time.sleep(0.2)
    # The RPC's outcome, with its reason, is in the log of the service that answered.
    outcome = [line for line in _serve_log_lines(app, rid) if "failed: INVALID_ARGUMENT" in line]
    assert outcome and all(slides.companion not in line for line in outcome)
