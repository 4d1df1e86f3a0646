"""Errors a caller sees name no server facts: every failure to find, fetch or open a slide
through ``Tiler.resolve/open`` (object storage in a LocalStore or on the test S3 server, or a
local path) says what failed without the server's paths, cache folder, storage root or S3
endpoint; the caller's own slide reference may be echoed. The details go to the log."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from smartpath.core.config import StorageConfig, load_config
from smartpath.core.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SmartPathError,
    UnavailableError,
)
from smartpath.core.slides.tiler import Tiler
from smartpath.core.storage import LocalStore, ObjectRef
from tests.conftest import FIXTURES, free_port

BUCKET = "slides"
VMS_MISSING_IMAGE = (
    b"[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
    b"ImageFile=image.jpg\nMapFile=map.jpg\n"
)


def _tiler(tmp_path: Path, storage: dict | StorageConfig | None = None) -> Tiler:
    config = load_config(
        slide_cache={"dir": tmp_path / "cache"},
        storage=storage if storage is not None else {"local_root": tmp_path / "store"},
        tiling={"local_slide_roots": [tmp_path / "local"]},
    )
    return Tiler(config)


def _assert_clean(message: str, uri: str, *facts: object) -> None:
    """``message`` holds none of ``facts`` once the caller's own ``uri`` is taken out."""
    rest = message.replace(uri, "")
    for fact in facts:
        assert str(fact) not in rest, f"{fact!s} leaked into {message!r}"
    assert "entries" not in rest and "pytest-of" not in rest  # the cache's and tmp's layout


def _gif(path: Path) -> None:
    Image.new("RGB", (8, 8)).save(path, format="GIF")


# Each case stores or writes what it needs under tmp_path and returns the URI to open.
def _store_object(key: str, data: bytes | Callable[[Path], None]) -> Callable[[Tiler, Path], str]:
    def make(tiler: Tiler, tmp_path: Path) -> str:
        ref = ObjectRef(BUCKET, key)
        if callable(data):
            src = tmp_path / "src"
            data(src)
            tiler.store.upload(src, ref)
        else:
            tiler.store.put_bytes(ref, data)
        return ref.uri

    return make


def _local_file(rel: str, data: bytes) -> Callable[[Tiler, Path], str]:
    def make(tiler: Tiler, tmp_path: Path) -> str:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    return make


def _fixture_copy(name: str, corrupt_from: int) -> Callable[[Tiler, Path], str]:
    """A fixture slide in storage with everything after ``corrupt_from`` bytes zeroed."""

    def make(tiler: Tiler, tmp_path: Path) -> str:
        data = bytearray((FIXTURES / name).read_bytes())
        data[corrupt_from:] = bytes(len(data) - corrupt_from)
        ref = ObjectRef(BUCKET, f"bad/{name}")
        tiler.store.put_bytes(ref, bytes(data))
        return ref.uri

    return make


CASES: dict[str, tuple[type[SmartPathError], Callable[[Tiler, Path], str]]] = {
    "missing-object": (NotFoundError, lambda t, p: "s3://slides/no/such.svs"),
    "missing-bucket": (NotFoundError, lambda t, p: "s3://no-such-bucket/a.svs"),
    "missing-folder": (NotFoundError, lambda t, p: "s3://slides/no/such/folder/"),
    "missing-companion": (InvalidArgumentError, _store_object("v/slide.vms", VMS_MISSING_IMAGE)),
    "corrupt-dicom": (InvalidArgumentError, _fixture_copy("boxes_0.dcm", 1000)),
    "corrupt-svs": (InvalidArgumentError, _fixture_copy("small.svs", 300)),
    "empty-object": (InvalidArgumentError, _store_object("e/empty.svs", b"")),
    "text-object": (InvalidArgumentError, _store_object("t/notes.svs", b"not a slide\n" * 50)),
    "unsupported-format": (InvalidArgumentError, _store_object("g/anim.gif", _gif)),
    "folder-object": (InvalidArgumentError, _store_object("f/one/a.txt", b"x")),
    "confinement-store": (
        InvalidArgumentError,
        _store_object("c/escape.vms", VMS_MISSING_IMAGE.replace(b"image.jpg", b"../../x.jpg")),
    ),
    "local-outside-roots": (InvalidArgumentError, _local_file("elsewhere/a.svs", b"x")),
    "local-missing": (NotFoundError, lambda t, p: str(p / "local" / "none.svs")),
    "local-corrupt": (InvalidArgumentError, _local_file("local/v/slide.vms", VMS_MISSING_IMAGE)),
    "local-confinement": (
        InvalidArgumentError,
        _local_file("local/c/x.vms", VMS_MISSING_IMAGE.replace(b"image.jpg", b"/etc/hostname")),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_name_no_server_paths(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    expected, make = CASES[case]
    tiler = _tiler(tmp_path)
    try:
        tiler.store.ensure_bucket(BUCKET)
        uri = make(tiler, tmp_path)
        if case == "folder-object":
            uri = "s3://slides/f/one/"
        with caplog.at_level(logging.WARNING), pytest.raises(SmartPathError) as error:
            opened = tiler.open(tiler.resolve(uri))
            opened.slide.read_region(0, 0, 0, opened.info.width, opened.info.height)
    finally:
        tiler.close()
    assert isinstance(error.value, expected), repr(error.value)
    message = str(error.value)
    _assert_clean(message, uri, tmp_path, tmp_path.resolve(), tiler.cache.root, tiler.store.root)
    if case == "missing-companion":
        # OpenSlide named the file it missed, under the cache: that detail is for the log.
        assert "missing" in message and "companion" in message
        assert any(str(tiler.cache.root) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failure", ["permission", "io"])
def test_local_store_os_errors_name_no_storage_root(
    tmp_path: Path, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    store.ensure_bucket(BUCKET)
    ref = ObjectRef(BUCKET, "a.svs")
    store.put_bytes(ref, b"x")
    path = store.root / BUCKET / "a.svs"

    def refuse(self: Path) -> bytes:
        if failure == "permission":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    kind = PermissionDeniedError if failure == "permission" else UnavailableError
    with pytest.raises(kind) as error:
        store.get_bytes(ref)
    _assert_clean(str(error.value), ref.uri, store.root, tmp_path)
    assert ref.uri in str(error.value)  # still says which object


def test_upload_of_a_missing_source_names_no_local_path(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.ensure_bucket(BUCKET)
    with pytest.raises(NotFoundError) as error:
        store.upload(tmp_path / "nothing.svs", ObjectRef(BUCKET, "a.svs"))
    _assert_clean(str(error.value), "s3://slides/a.svs", tmp_path, "nothing.svs")


# -- the S3 store -------------------------------------------------------------------------------


@pytest.fixture
def s3_tiler(tmp_path: Path, s3_config: StorageConfig, bucket_name: str):
    tiler = _tiler(tmp_path, s3_config)
    tiler.store.ensure_bucket(bucket_name)
    yield tiler
    tiler.close()


def test_s3_errors_name_no_endpoint(
    s3_tiler: Tiler, s3_config: StorageConfig, bucket_name: str, tmp_path: Path
) -> None:
    endpoint = s3_config.endpoint
    assert endpoint is not None
    host, port = endpoint.rsplit(":", 1)
    bad = bytearray((FIXTURES / "small.svs").read_bytes())
    bad[300:] = bytes(len(bad) - 300)
    s3_tiler.store.put_bytes(ObjectRef(bucket_name, "v/slide.vms"), VMS_MISSING_IMAGE)
    s3_tiler.store.put_bytes(ObjectRef(bucket_name, "bad/small.svs"), bytes(bad))
    cases = {
        f"s3://{bucket_name}/no/such.svs": NotFoundError,
        f"s3://{bucket_name}-gone/a.svs": NotFoundError,
        f"s3://{bucket_name}/nothing/here/": NotFoundError,
        f"s3://{bucket_name}/v/slide.vms": InvalidArgumentError,
        f"s3://{bucket_name}/bad/small.svs": InvalidArgumentError,
    }
    for uri, expected in cases.items():
        with pytest.raises(expected) as error:
            s3_tiler.open(s3_tiler.resolve(uri))
        _assert_clean(str(error.value), uri, endpoint, f"{host}:{port}", tmp_path)


def test_unreachable_s3_names_no_endpoint(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    storage = StorageConfig(
        endpoint=endpoint, access_key="k", secret_key="s", region="us-east-1", retries=0
    )
    tiler = _tiler(tmp_path, storage)
    try:
        with pytest.raises(UnavailableError) as error:
            tiler.resolve("s3://slides/a.svs")
    finally:
        tiler.close()
    message = str(error.value)
    _assert_clean(message, "s3://slides/a.svs", endpoint, tmp_path)
    assert "unreachable" in message and "storage.endpoint" in message  # still says what to do


def test_invalid_endpoint_names_no_endpoint(tmp_path: Path) -> None:
    endpoint = "http://secret-host.internal:9000/path"
    with pytest.raises(InvalidArgumentError) as error:
        _tiler(tmp_path, StorageConfig(endpoint=endpoint))
    _assert_clean(str(error.value), "", "secret-host", endpoint)
