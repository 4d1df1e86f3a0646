"""The same ObjectStore contract, run against LocalStore and S3Store (real moto_server)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from smartpath.core.config import StorageConfig
from smartpath.core.errors import InvalidArgumentError, NotFoundError
from smartpath.core.storage import (
    LocalStore,
    ObjectInfo,
    ObjectRef,
    ObjectStore,
    S3Store,
    make_store,
)

BIG = 3 * 1024 * 1024 + 17  # more than one 1 MiB download chunk


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, bucket_name: str) -> ObjectStore:
    """A store with an empty bucket ``bucket_name``, on each backend."""
    if request.param == "local":
        st: ObjectStore = LocalStore(tmp_path / "objects")
    else:
        st = S3Store(request.getfixturevalue("s3_config"))
    st.ensure_bucket(bucket_name)
    return st


def test_both_backends_satisfy_the_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_put_get_stat_round_trip(store: ObjectStore, bucket_name: str) -> None:
    ref = ObjectRef(bucket_name, "case-1/slide.svs")
    put = store.put_bytes(ref, b"pixels")
    got = store.stat(ref)
    assert store.get_bytes(ref) == b"pixels"
    assert (got.bucket, got.key, got.size) == (bucket_name, "case-1/slide.svs", 6)
    assert got.etag and got.etag == put.etag
    assert got.last_modified is not None and got.last_modified.tzinfo is not None


def test_etag_changes_with_content_and_is_stable_without(
    store: ObjectStore, bucket_name: str
) -> None:
    ref = ObjectRef(bucket_name, "a.bin")
    first = store.put_bytes(ref, b"version-1").etag
    assert store.stat(ref).etag == first
    assert store.stat(ref).etag == first
    second = store.put_bytes(ref, b"version-2").etag  # same size, other bytes
    assert second != first
    assert store.stat(ref).etag == second
    assert store.get_bytes(ref) == b"version-2"


def test_list_by_prefix_in_key_order(store: ObjectStore, bucket_name: str) -> None:
    keys = ["s/b.txt", "s/a.txt", "s/sub/c.txt", "s2/x.txt", "t/y.txt", "s/a.txt.bak"]
    for i, key in enumerate(keys):
        store.put_bytes(ObjectRef(bucket_name, key), b"x" * (i + 1))
    listed = list(store.list(bucket_name, "s/"))
    assert [info.key for info in listed] == ["s/a.txt", "s/a.txt.bak", "s/b.txt", "s/sub/c.txt"]
    assert all(isinstance(info, ObjectInfo) and info.bucket == bucket_name for info in listed)
    assert {info.key: info.size for info in listed}["s/sub/c.txt"] == 3
    assert [i.key for i in store.list(bucket_name, "s")] == sorted(k for k in keys if k[0] == "s")
    assert len(list(store.list(bucket_name))) == len(keys)
    assert list(store.list(bucket_name, "nothing/")) == []
    # list's ETags agree with stat's
    assert listed[0].etag == store.stat(ObjectRef(bucket_name, "s/a.txt")).etag


def test_download_streams_to_dest(store: ObjectStore, bucket_name: str, tmp_path: Path) -> None:
    data = os.urandom(BIG)
    ref = ObjectRef(bucket_name, "big/slide.ndpi")
    put = store.put_bytes(ref, data)
    dest = tmp_path / "out" / "nested" / "slide.ndpi"  # parent folders are created
    info = store.download(ref, dest)
    assert dest.read_bytes() == data
    assert (info.size, info.etag) == (BIG, put.etag)
    # an existing file is replaced, and no temp files stay behind
    store.put_bytes(ref, b"small")
    store.download(ref, dest)
    assert dest.read_bytes() == b"small"
    assert os.listdir(dest.parent) == ["slide.ndpi"]


def test_upload_from_file(store: ObjectStore, bucket_name: str, tmp_path: Path) -> None:
    src = tmp_path / "src.tiff"
    data = os.urandom(BIG)
    src.write_bytes(data)
    ref = ObjectRef(bucket_name, "up/src.tiff")
    info = store.upload(src, ref)
    assert info.size == BIG
    assert store.get_bytes(ref) == data
    assert store.stat(ref).etag == info.etag
    with pytest.raises(NotFoundError, match="not a file"):
        store.upload(tmp_path / "missing.tiff", ref)


def test_exists(store: ObjectStore, bucket_name: str) -> None:
    ref = ObjectRef(bucket_name, "e/x.bin")
    assert not store.exists(ref)
    store.put_bytes(ref, b"1")
    assert store.exists(ref)
    assert not store.exists(ObjectRef(bucket_name, "e/x"))  # a prefix is not an object
    assert not store.exists(ObjectRef(bucket_name + "-missing", "e/x.bin"))


def _ops(store: ObjectStore, tmp_path: Path) -> dict[str, Callable[[ObjectRef], object]]:
    return {
        "stat": store.stat,
        "get_bytes": store.get_bytes,
        "download": lambda ref: store.download(ref, tmp_path / "dl" / "file"),
    }


@pytest.mark.parametrize("op", ["stat", "get_bytes", "download"])
def test_missing_object_is_not_found(
    store: ObjectStore, bucket_name: str, tmp_path: Path, op: str
) -> None:
    ref = ObjectRef(bucket_name, "no/such.svs")
    with pytest.raises(NotFoundError) as info:
        _ops(store, tmp_path)[op](ref)
    assert "no/such.svs" in str(info.value)
    assert not (tmp_path / "dl" / "file").exists()


@pytest.mark.parametrize("op", ["stat", "get_bytes", "download", "put_bytes", "list"])
def test_missing_bucket_is_not_found(
    store: ObjectStore, bucket_name: str, tmp_path: Path, op: str
) -> None:
    missing = bucket_name + "-missing"
    ref = ObjectRef(missing, "a.svs")
    ops = _ops(store, tmp_path)
    ops["put_bytes"] = lambda r: store.put_bytes(r, b"x")
    ops["list"] = lambda r: list(store.list(r.bucket))
    with pytest.raises(NotFoundError) as info:
        ops[op](ref)
    assert f"bucket {missing!r}" in str(info.value)


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../b", "/abs", "a\\b", "", "a\x00b", "a//b", "./a", "k" * 1025]
)
def test_unsafe_keys_refused(store: ObjectStore, bucket_name: str, key: str) -> None:
    ref = ObjectRef(bucket_name, key)
    with pytest.raises(InvalidArgumentError, match="invalid object key"):
        store.put_bytes(ref, b"x")
    with pytest.raises(InvalidArgumentError, match="invalid object key"):
        store.stat(ref)


def test_folder_key_is_not_an_object(store: ObjectStore, bucket_name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="folder"):
        store.put_bytes(ObjectRef(bucket_name, "dir/"), b"x")


@pytest.mark.parametrize("bucket", ["ab", "UPPER", "under_score", "192.168.0.1", "-x-bucket"])
def test_bad_bucket_names_refused(store: ObjectStore, bucket: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid bucket name"):
        store.ensure_bucket(bucket)
    with pytest.raises(InvalidArgumentError, match="invalid bucket name"):
        store.stat(ObjectRef(bucket, "a"))


def test_ensure_bucket_is_idempotent(store: ObjectStore, bucket_name: str) -> None:
    ref = ObjectRef(bucket_name, "keep.bin")
    store.put_bytes(ref, b"keep")
    store.ensure_bucket(bucket_name)
    assert store.get_bytes(ref) == b"keep"


# -- backend specifics ------------------------------------------------------------------------


def test_make_store_picks_backend(tmp_path: Path, s3_config: StorageConfig) -> None:
    local = make_store(StorageConfig(local_root=tmp_path / "root"))
    assert isinstance(local, LocalStore)
    assert local.root == (tmp_path / "root").resolve()
    assert isinstance(make_store(s3_config), S3Store)


def test_make_store_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = make_store(StorageConfig(local_root=Path("~/objects")))
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "objects").resolve()


def test_local_store_refuses_symlink_escape(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.ensure_bucket("bkt")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.symlink(outside, tmp_path / "root" / "bkt" / "link")
    with pytest.raises(InvalidArgumentError, match="leaves its bucket"):
        store.get_bytes(ObjectRef("bkt", "link/secret"))
    with pytest.raises(InvalidArgumentError, match="leaves its bucket"):
        store.put_bytes(ObjectRef("bkt", "link/new"), b"x")
    assert not (outside / "new").exists()
    assert list(store.list("bkt")) == []
