"""The SlideTiler over real Ray Serve and a real gRPC client, slides in a real S3 server."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from smartpath.client.rpc import TilerClient, tile_spec
from smartpath.core.slides.plan import tile_geometry
from smartpath.core.slides.reader import TileReader
from smartpath.core.slides.slide import Slide
from smartpath.core.storage import ObjectRef, make_store
from smartpath.training.synthetic.slides import write_synthetic_slide
from smartpath.v1 import tiling_pb2
from tests.services.conftest import API_TOKEN

BUCKET = "slides"


@pytest.fixture(scope="module")
def store(serve_instance):
    s = make_store(serve_instance.storage)
    s.ensure_bucket(BUCKET)
    return s


@pytest.fixture(scope="module")
def svs_uri(store, synthetic_svs) -> str:
    ref = ObjectRef(BUCKET, "cases/synthetic.svs")
    store.upload(synthetic_svs.path, ref)
    return f"s3://{ref.bucket}/{ref.key}"


@pytest.fixture(scope="module")
def client(serve_instance, grpc_channel):
    address = f"127.0.0.1:{serve_instance.serve.grpc_port}"
    with TilerClient(address, token=API_TOKEN) as c:
        yield c


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_describe_from_s3(client, svs_uri) -> None:
    info = client.describe(svs_uri, thumbnail_max_px=256)
    assert (info.width, info.height) == (6144, 5120)
    assert info.vendor == "aperio"
    assert info.mpp_x == pytest.approx(0.25) and info.objective_power == pytest.approx(40)
    assert info.levels[0].downsample == 1.0
    assert info.levels[1].mpp == pytest.approx(0.25 * info.levels[1].downsample)
    assert {a.name for a in info.associated_images} >= {"thumbnail", "label", "macro"}
    assert info.slide_id.startswith("s3:")
    assert (
        info.thumbnail.media_type == "image/jpeg"
        and max(info.thumbnail.width, info.thumbnail.height) == 256
    )


def test_plan_and_read_tiles_match_library(client, svs_uri, synthetic_svs) -> None:
    spec = tile_spec(mpp=0.5, tile_size=256, min_tissue_fraction=0.25)
    plan = client.plan(svs_uri, spec, include_tissue_mask=True)
    assert plan.plan.mpp == 0.5 and plan.plan.footprint == pytest.approx(512)
    assert 0.05 < plan.tissue_fraction < 0.9
    assert plan.tissue_mask.media_type == "image/png"
    tiles = plan.plan.tiles
    assert len(tiles) > 0 and all(t.tissue_fraction >= 0.25 for t in tiles)
    assert plan.plan.plan_hash == client.plan(svs_uri, spec).plan.plan_hash

    n = min(40, len(tiles))
    assert n > 16
    got, offsets = [], []
    for response, pixels in client.read_tiles(svs_uri, spec, tiles[:n], batch_size=16):
        assert response.total == n
        offsets.append(response.offset)
        got.append(pixels)
    assert offsets == list(range(0, n, 16))
    pixels = np.concatenate(got)
    slide = Slide.open(synthetic_svs.path)
    g = tile_geometry(slide.info, mpp=0.5, tile_size=256, overlap=0)
    xs = np.array([t.x for t in tiles[:n]])
    ys = np.array([t.y for t in tiles[:n]])
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, TileReader(slide, g, pool) as reader:
        expected = reader.read(xs, ys)
    assert np.array_equal(pixels, expected)


def test_magnification_follows_the_slide_objective(client, store, tmp_path: Path) -> None:
    path = write_synthetic_slide(
        tmp_path / "mag.svs", width=2048, height=2048, mpp=0.2527, app_mag=40, seed=4
    ).path
    ref = ObjectRef(BUCKET, "cases/mag.svs")
    store.upload(path, ref)
    info = client.describe(ref.uri)
    assert info.objective_power == 40 and info.mpp_x == pytest.approx(0.2527)
    plan = client.plan(ref.uri, tile_spec(magnification=20, tile_size=128)).plan
    assert plan.mpp == pytest.approx(0.2527 * 40 / 20) and plan.footprint == pytest.approx(256)


def test_read_whole_plan_when_no_tiles_given(client, svs_uri) -> None:
    spec = tile_spec(mpp=2.0, tile_size=128)
    planned = len(client.plan(svs_uri, spec).plan.tiles)
    streamed = sum(len(r.tiles) for r, _ in client.read_tiles(svs_uri, spec))
    assert streamed == planned > 0


def test_missing_object_and_bucket_are_not_found(client) -> None:
    assert _code(lambda: client.describe(f"s3://{BUCKET}/nope.svs")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.describe("s3://no-such-bucket/a.svs")) == grpc.StatusCode.NOT_FOUND


def _bad_payloads(synthetic_svs, openslide_fixtures: Path) -> dict[str, bytes]:
    svs = synthetic_svs.path.read_bytes()
    tiff = bytearray((openslide_fixtures / "boxes.tiff").read_bytes())
    tiff[len(tiff) // 4 :] = (
        np.random.default_rng(1)
        .integers(0, 256, len(tiff) - len(tiff) // 4, dtype=np.uint8)
        .tobytes()
    )
    return {
        "zero.svs": b"",
        "truncated.svs": svs[: len(svs) // 3],
        "corrupted.tiff": bytes(tiff),
        "notes.svs": b"this is not a slide\n" * 50,
    }


def test_bad_slides_are_invalid_argument_and_replica_survives(
    client, store, svs_uri, synthetic_svs, openslide_fixtures
) -> None:
    for name, payload in _bad_payloads(synthetic_svs, openslide_fixtures).items():
        ref = ObjectRef(BUCKET, f"bad/{name}")
        store.put_bytes(ref, payload)
        uri = f"s3://{BUCKET}/bad/{name}"

        def describe_and_read(uri: str = uri):
            client.describe(uri)
            spec = tile_spec(mpp=0.25, min_tissue_fraction=0.0)
            return list(client.read_tiles(uri, spec))

        with pytest.raises(grpc.RpcError) as err:
            describe_and_read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
        assert "Traceback" not in err.value.details()
        assert client.describe(svs_uri).width == 6144  # still serving


def test_bad_requests(client, svs_uri) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: client.describe("")) == invalid
    assert _code(lambda: client.describe("s3://Bad_Bucket/x.svs")) == invalid
    assert _code(lambda: client.describe("s3://slides/../etc/passwd")) == invalid
    assert _code(lambda: client.describe("/etc/passwd")) == invalid  # outside local roots
    assert _code(lambda: client.plan(svs_uri, tile_spec(tile_size=8))) == invalid
    assert _code(lambda: client.plan(svs_uri, tile_spec(mpp=0.5, overlap=300))) == invalid
    outside = tiling_pb2.Tile(x=10**9, y=0)
    assert _code(lambda: list(client.read_tiles(svs_uri, tile_spec(), [outside]))) == invalid


def test_roi_without_mpp_is_failed_precondition(client, store, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "roi.png"
    Image.fromarray(np.full((64, 64, 3), (180, 60, 140), np.uint8)).save(path)
    store.upload(path, ObjectRef(BUCKET, "roi/roi.png"))
    uri = f"s3://{BUCKET}/roi/roi.png"
    assert client.describe(uri).vendor == "image"
    assert _code(lambda: client.plan(uri)) == grpc.StatusCode.FAILED_PRECONDITION
    plan = client.plan(
        uri, tile_spec(mpp=0.5, tile_size=32, min_tissue_fraction=0), mpp_override=0.5
    )
    assert len(plan.plan.tiles) == 4


def test_local_fixture_paths_within_roots(client, openslide_fixtures: Path) -> None:
    for name in ("small.svs", "boxes.tiff", "boxes_0.dcm", "boxes_1.dcm"):
        info = client.describe(str(openslide_fixtures / name))
        assert info.width > 0


def test_concurrent_clients(client, svs_uri) -> None:
    errors: list[BaseException] = []
    spec = tile_spec(mpp=1.0, tile_size=128)

    def work() -> None:
        try:
            assert sum(len(r.tiles) for r, _ in client.read_tiles(svs_uri, spec)) > 0
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_health_without_application_metadata(grpc_channel) -> None:
    stub = health_pb2_grpc.HealthStub(grpc_channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == serving
    tiler = health_pb2.HealthCheckRequest(service="smartpath.v1.SlideTiler")
    assert stub.Check(tiler, timeout=10).status == serving
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(iter(watch)).status == serving
    watch.cancel()


def test_reflection_lists_services(grpc_channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {"smartpath.v1.SlideTiler", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("encoding", "magic"),
    [(tiling_pb2.TILE_ENCODING_JPEG, b"\xff\xd8"), (tiling_pb2.TILE_ENCODING_PNG, b"\x89PNG")],
)
def test_encoded_tiles(client, svs_uri, encoding, magic) -> None:
    from io import BytesIO

    from PIL import Image

    from smartpath.v1 import common_pb2

    spec = tile_spec(mpp=1.0, tile_size=128)
    tiles = client.plan(svs_uri, spec).plan.tiles[:5]
    request = tiling_pb2.ReadTilesRequest(
        slide=common_pb2.SlideRef(uri=svs_uri), spec=spec, tiles=tiles, encoding=encoding
    )
    responses = list(client.stub.ReadTiles(request, metadata=client.metadata, timeout=60))
    images = [img for r in responses for img in r.images]
    assert len(images) == 5 and all(img.startswith(magic) for img in images)
    assert not any(r.pixels for r in responses)
    raw = np.concatenate([p for _, p in client.read_tiles(svs_uri, spec, tiles)])
    decoded = np.stack([np.asarray(Image.open(BytesIO(img))) for img in images])
    tolerance = 0 if encoding == tiling_pb2.TILE_ENCODING_PNG else 4
    assert np.abs(decoded.astype(int) - raw).mean() <= tolerance


def test_failed_stream_details_do_not_echo_slide_names(client) -> None:
    uri = f"s3://{BUCKET}/patients/jane-doe-1234.svs"
    with pytest.raises(grpc.RpcError) as err:
        list(client.read_tiles(uri, tile_spec()))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "jane-doe" not in err.value.details()


def test_python_methods_through_a_deployment_handle(serve_instance, svs_uri) -> None:
    from ray import serve

    from smartpath.core.slides.tiler import TileRequest

    handle = serve.get_deployment_handle("SlideTiler", app_name="tiler")
    slide = handle.resolve.remote(svs_uri).result(timeout_s=60)
    info = handle.describe.remote(slide).result(timeout_s=60)
    assert (info.width, info.height) == (6144, 5120) and slide.slide_id.startswith("s3:")
    request = TileRequest(mpp=1.0, tile_size=128)
    plan, tissue = handle.plan.remote(slide, request).result(timeout_s=60)
    assert len(plan) > 0 and 0 < tissue.fraction < 1
    assert handle.plan_key.remote(slide, request).result(timeout_s=60) == plan.plan_hash
    stream = handle.options(stream=True).read_tiles.remote(
        slide, plan.geometry, plan.x[:20], plan.y[:20], batch_size=8
    )
    batches = list(stream)
    assert [offset for offset, _ in batches] == [0, 8, 16]
    assert sum(len(tiles) for _, tiles in batches) == 20
    assert batches[0][1].shape[1:] == (128, 128, 3)
