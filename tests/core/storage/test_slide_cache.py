"""SlideCache: single download under thread and process concurrency, LRU eviction under the
byte bound, atomicity after failed or crashed downloads, key-escape refusal, ETag refresh,
MRXS sibling folders and folder slides.

Downloads are counted by ``CountingStore``, a test double at our own ObjectStore interface
that delegates to a real store and appends one line per download to a file (so counts add up
across processes).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import openslide
import pytest

from smartpath.core.config import SlideCacheConfig, StorageConfig
from smartpath.core.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from smartpath.core.storage import (
    LocalStore,
    ObjectInfo,
    ObjectRef,
    ObjectStore,
    S3Store,
    SlideCache,
)
from smartpath.core.storage.base import DEFAULT_CONTENT_TYPE

BUCKET = "slides"


class CountingStore:
    """Delegates to ``inner``; logs every download to ``log`` and can slow it down; counts
    metadata requests (``stats``, this process only)."""

    def __init__(self, inner: ObjectStore, log: Path, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.log = log
        self.delay_s = delay_s
        self.stats = 0

    def downloads(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def download(self, ref: ObjectRef, dest: Path) -> ObjectInfo:
        with open(self.log, "a") as f:
            f.write(ref.key + "\n")
        time.sleep(self.delay_s)
        return self.inner.download(ref, dest)

    def stat(self, ref: ObjectRef) -> ObjectInfo:
        self.stats += 1
        return self.inner.stat(ref)

    def get_bytes(self, ref: ObjectRef) -> bytes:
        return self.inner.get_bytes(ref)

    def put_bytes(
        self, ref: ObjectRef, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectInfo:
        return self.inner.put_bytes(ref, data, content_type)

    def upload(self, src: Path, ref: ObjectRef) -> ObjectInfo:
        return self.inner.upload(src, ref)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(bucket, prefix)

    def exists(self, ref: ObjectRef) -> bool:
        return self.inner.exists(ref)

    def ensure_bucket(self, bucket: str) -> None:
        self.inner.ensure_bucket(bucket)


class BreakingStore(CountingStore):
    """Writes half of the object to ``dest`` and then fails (or kills the process)."""

    def __init__(self, inner: ObjectStore, log: Path, crash: bool = False) -> None:
        super().__init__(inner, log)
        self.crash = crash

    def download(self, ref: ObjectRef, dest: Path) -> ObjectInfo:
        with open(self.log, "a") as f:
            f.write(ref.key + "\n")
        data = self.inner.get_bytes(ref)
        dest.write_bytes(data[: len(data) // 2])
        if self.crash:
            os._exit(17)
        raise UnavailableError("storage went away mid-download")


class ListingStore(CountingStore):
    """Lists extra, hostile keys alongside the real ones."""

    def __init__(self, inner: ObjectStore, log: Path, extra_keys: list[str]) -> None:
        super().__init__(inner, log)
        self.extra_keys = extra_keys

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        yield from self.inner.list(bucket, prefix)
        for key in self.extra_keys:
            yield ObjectInfo(bucket, key, 1, "e", None)


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "objects")
    store.ensure_bucket(BUCKET)
    return store


def _cache(tmp_path: Path, store: ObjectStore, max_bytes: int = 10**9) -> SlideCache:
    return SlideCache(SlideCacheConfig(dir=tmp_path / "cache", max_bytes=max_bytes), store)


def _entries(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "cache" / "entries"))


def test_fetch_keeps_basename_and_counts_hits(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "case/slide.svs")
    local.put_bytes(ref, b"svs-bytes")
    counting = CountingStore(local, tmp_path / "log")
    cache = _cache(tmp_path, counting)
    path = cache.fetch(ref)
    assert path.name == "slide.svs"
    assert path.read_bytes() == b"svs-bytes"
    assert path.is_relative_to(tmp_path / "cache")
    entry = cache.fetch_entry(ref)
    assert (entry.path, entry.ref, entry.size) == (path, ref, 9)
    assert entry.etag == local.stat(ref).etag
    assert counting.downloads() == ["case/slide.svs"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.downloads) == (1, 1, 1)
    assert (stats.entries, stats.bytes_cached, stats.bytes_downloaded) == (1, 9, 9)
    # a second cache instance over the same folder (another replica) finds it too
    other = _cache(tmp_path, counting)
    assert other.fetch(ref) == path
    assert len(counting.downloads()) == 1


def test_fetch_of_missing_object_is_not_found(tmp_path: Path, local: LocalStore) -> None:
    cache = _cache(tmp_path, local)
    with pytest.raises(NotFoundError):
        cache.fetch(ObjectRef(BUCKET, "nope.svs"))
    with pytest.raises(NotFoundError):
        cache.fetch(ObjectRef(BUCKET, "empty-folder/"))
    assert _entries(tmp_path) == []


def test_threads_share_one_download(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "t/slide.ndpi")
    local.put_bytes(ref, os.urandom(100_000))
    counting = CountingStore(local, tmp_path / "log", delay_s=0.3)
    cache = _cache(tmp_path, counting)
    barrier = threading.Barrier(8)

    def fetch() -> Path:
        barrier.wait()
        return cache.fetch(ref)

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: fetch(), range(8)))
    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == local.get_bytes(ref)
    assert counting.downloads() == ["t/slide.ndpi"]
    stats = cache.stats()
    assert (stats.misses, stats.hits) == (1, 7)


def _process_fetch(
    cache_dir: str,
    store_root: str,
    log: str,
    key: str,
    barrier: threading.Barrier,
    out: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    store = CountingStore(LocalStore(store_root), Path(log), delay_s=0.3)
    cache = SlideCache(SlideCacheConfig(dir=Path(cache_dir), max_bytes=10**9), store)
    try:
        barrier.wait(timeout=30)
        with ThreadPoolExecutor(3) as pool:
            paths = list(pool.map(lambda _: cache.fetch(ObjectRef(BUCKET, key)), range(3)))
        out.put([str(p) for p in paths])
    except Exception as exc:  # report instead of leaving the parent waiting
        out.put(f"{type(exc).__name__}: {exc}")


def test_processes_share_one_download(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "p/slide.mrxs")
    local.put_bytes(ref, b"mrxs-index")
    local.put_bytes(ObjectRef(BUCKET, "p/slide/Data0000.dat"), os.urandom(50_000))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    out = ctx.Queue()
    log = tmp_path / "log"
    args = (str(tmp_path / "cache"), str(local.root), str(log), ref.key, barrier, out)
    procs = [ctx.Process(target=_process_fetch, args=args) for _ in range(3)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert all(isinstance(r, list) for r in results), results
    paths = {p for result in results for p in result}
    assert len(paths) == 1  # 3 processes x 3 threads, one entry
    # one download per object of the slide (index + one data file), not per fetcher
    assert sorted(CountingStore(local, log).downloads()) == ["p/slide.mrxs", "p/slide/Data0000.dat"]
    assert Path(paths.pop()).read_bytes() == b"mrxs-index"


def test_lru_eviction_keeps_within_bound(tmp_path: Path, local: LocalStore) -> None:
    refs = {name: ObjectRef(BUCKET, f"lru/{name}.svs") for name in "abcd"}
    for ref in refs.values():
        local.put_bytes(ref, os.urandom(100))
    counting = CountingStore(local, tmp_path / "log")
    cache = _cache(tmp_path, counting, max_bytes=250)
    path_a = cache.fetch(refs["a"])
    cache.fetch(refs["b"])
    cache.fetch(refs["a"])  # a is now more recently used than b
    cache.fetch(refs["c"])  # 300 > 250: b goes
    assert cache.stats().bytes_cached <= 250
    assert cache.stats().evictions == 1
    assert path_a.exists()
    counting.log.unlink()
    cache.fetch(refs["a"])
    cache.fetch(refs["c"])
    assert counting.downloads() == []  # both still cached
    cache.fetch(refs["b"])  # evicts a (c was used after a)
    assert counting.downloads() == ["lru/b.svs"]
    assert not path_a.exists()
    assert cache.stats().entries == 2
    assert cache.stats().bytes_cached <= 250


def test_room_is_made_before_downloading(tmp_path: Path, local: LocalStore) -> None:
    refs = [ObjectRef(BUCKET, f"room/{i}.svs") for i in range(3)]
    for ref in refs:
        local.put_bytes(ref, os.urandom(100))
    seen: list[int] = []

    class Watching(CountingStore):
        def download(self, ref: ObjectRef, dest: Path) -> ObjectInfo:
            seen.append(cache.stats().bytes_cached)
            return super().download(ref, dest)

    cache = _cache(tmp_path, Watching(local, tmp_path / "log"), max_bytes=250)
    for ref in refs:
        cache.fetch(ref)
    assert seen == [0, 100, 100]  # the third download started after the first was evicted


def test_concurrent_fetches_of_different_slides_stay_within_bound(
    tmp_path: Path, local: LocalStore
) -> None:
    refs = [ObjectRef(BUCKET, f"bound/{i}.svs") for i in range(3)]
    for ref in refs:
        local.put_bytes(ref, os.urandom(100))
    cache = _cache(tmp_path, CountingStore(local, tmp_path / "log", delay_s=0.3), max_bytes=250)
    cache.fetch(refs[0])
    # Both make room for themselves alone (100 + 100 <= 250) while downloading in parallel;
    # the total only overflows once both land, and must be brought back under the bound.
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(cache.fetch, refs[1:]))
    assert all(p.exists() for p in paths)
    assert cache.stats().bytes_cached <= 250
    assert cache.stats().entries == 2


def test_lease_pins_an_entry_against_eviction(tmp_path: Path, local: LocalStore) -> None:
    refs = [ObjectRef(BUCKET, f"pin/{i}.svs") for i in range(3)]
    for ref in refs:
        local.put_bytes(ref, os.urandom(100))
    cache = _cache(tmp_path, local, max_bytes=150)
    with cache.lease(refs[0]) as pinned:
        cache.fetch(refs[1])  # would evict refs[0] if it were not leased
        assert pinned.path.exists()
        assert cache.stats().evictions == 0
    cache.fetch(refs[2])  # now the least recently used unpinned ones can go
    assert not pinned.path.exists()
    assert cache.stats().bytes_cached <= 150


def test_entry_larger_than_cache_is_resource_exhausted(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "huge.svs")
    local.put_bytes(ref, os.urandom(1000))
    counting = CountingStore(local, tmp_path / "log")
    cache = _cache(tmp_path, counting, max_bytes=999)
    with pytest.raises(ResourceExhaustedError) as info:
        cache.fetch(ref)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "1000 bytes" in str(info.value) and "999" in str(info.value)
    assert "slide_cache.max_bytes" in str(info.value)
    assert counting.downloads() == []
    assert _entries(tmp_path) == []


def test_failed_download_is_never_served(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "f/slide.svs")
    data = os.urandom(10_000)
    local.put_bytes(ref, data)
    broken = _cache(tmp_path, BreakingStore(local, tmp_path / "log"))
    with pytest.raises(UnavailableError, match="mid-download"):
        broken.fetch(ref)
    assert _entries(tmp_path) == []
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    assert os.listdir(tmp_path / "cache" / "locks") == ["evict.lock"]  # no leaked lock files
    with pytest.raises(UnavailableError):  # still not served from a half entry
        broken.fetch(ref)
    good = _cache(tmp_path, local)
    assert good.fetch(ref).read_bytes() == data


def _crashing_fetch(cache_dir: str, store_root: str, log: str, key: str) -> None:
    store = BreakingStore(LocalStore(store_root), Path(log), crash=True)
    SlideCache(SlideCacheConfig(dir=Path(cache_dir)), store).fetch(ObjectRef(BUCKET, key))


def _crash(tmp_path: Path, local: LocalStore, ref: ObjectRef) -> None:
    ctx = multiprocessing.get_context("spawn")
    args = (str(tmp_path / "cache"), str(local.root), str(tmp_path / "log"), ref.key)
    proc = ctx.Process(target=_crashing_fetch, args=args)
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 17


def test_crash_mid_download_leaves_nothing_served(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "crash/slide.svs")
    other = ObjectRef(BUCKET, "crash/other.svs")
    data = os.urandom(10_000)
    local.put_bytes(ref, data)
    local.put_bytes(other, b"other")
    tmp_area = tmp_path / "cache" / "tmp"

    _crash(tmp_path, local, ref)
    assert _entries(tmp_path) == []
    assert len(os.listdir(tmp_area)) == 1  # the half download, in the temp area only
    counting = CountingStore(local, tmp_path / "log2")
    cache = _cache(tmp_path, counting)
    cache.fetch(other)  # any download sweeps leftovers nobody is writing
    assert os.listdir(tmp_area) == []

    _crash(tmp_path, local, ref)
    assert len(os.listdir(tmp_area)) == 1
    path = cache.fetch(ref)  # the same entry: its leftover goes too
    assert path.read_bytes() == data
    assert counting.downloads() == ["crash/other.svs", "crash/slide.svs"]
    assert os.listdir(tmp_area) == []
    assert len(_entries(tmp_path)) == 2


@pytest.mark.parametrize(
    "hostile",
    [
        "esc/slide/../../../../outside.txt",
        "esc/slide/a/../../../x",
        "esc/slide//abs",
        "esc/slide/a\\..\\..\\x",
        "other/prefix.txt",
    ],
)
def test_hostile_listed_keys_are_refused(tmp_path: Path, local: LocalStore, hostile: str) -> None:
    ref = ObjectRef(BUCKET, "esc/slide.mrxs")
    local.put_bytes(ref, b"index")
    local.put_bytes(ObjectRef(BUCKET, "esc/slide/Data0000.dat"), b"data")
    store = ListingStore(local, tmp_path / "log", [hostile])
    with pytest.raises(InvalidArgumentError, match="refusing to cache"):
        _cache(tmp_path, store).fetch(ref)
    assert store.downloads() == []  # refused before anything was fetched
    assert _entries(tmp_path) == []
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize("key", ["../up.svs", "a/../../up.svs", "/abs.svs", "a\\b.svs", ""])
def test_unsafe_refs_are_refused(tmp_path: Path, local: LocalStore, key: str) -> None:
    with pytest.raises(InvalidArgumentError):
        _cache(tmp_path, local).fetch(ObjectRef(BUCKET, key))


def test_changed_etag_gets_a_new_entry(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "v/slide.svs")
    local.put_bytes(ref, b"version-1")
    counting = CountingStore(local, tmp_path / "log")
    cache = _cache(tmp_path, counting)
    old = cache.fetch(ref)
    assert old.read_bytes() == b"version-1"
    local.put_bytes(ref, b"version-2")
    new = cache.fetch(ref)
    assert new != old and new.name == "slide.svs"
    assert new.read_bytes() == b"version-2"
    assert old.read_bytes() == b"version-1"  # readers of the old entry are undisturbed
    assert cache.fetch(ref) == new
    assert counting.downloads() == ["v/slide.svs", "v/slide.svs"]


def test_lease_of_identified_content_needs_no_second_stat(tmp_path: Path, local: LocalStore):
    ref = ObjectRef(BUCKET, "known/slide.svs")
    local.put_bytes(ref, b"content")
    counting = CountingStore(local, tmp_path / "log")
    cache = _cache(tmp_path, counting)
    etag = cache.identify(ref)
    with cache.lease(ref, etag) as entry:  # a miss: downloads, no second stat
        assert entry.path.read_bytes() == b"content" and entry.etag == etag
    with cache.lease(ref, etag) as again:  # a hit
        assert again.path == entry.path
    assert (counting.stats, len(counting.downloads())) == (1, 1)
    # Another process knows nothing of what this one saw: it asks the store once.
    other = _cache(tmp_path, counting)
    with other.lease(ref, etag) as entry_there:
        assert entry_there.path == entry.path
    assert (counting.stats, len(counting.downloads())) == (2, 1)


def test_lease_of_content_changed_since_identify_is_unavailable(
    tmp_path: Path, local: LocalStore
) -> None:
    ref = ObjectRef(BUCKET, "moved/slide.svs")
    local.put_bytes(ref, b"version-1")
    counting = CountingStore(local, tmp_path / "log")
    cache = _cache(tmp_path, counting)
    etag = cache.identify(ref)
    local.put_bytes(ref, b"version-2")
    with pytest.raises(UnavailableError), cache.lease(ref, etag):
        pass  # downloaded version-2, whose ETag is not the one identified
    with pytest.raises(UnavailableError), _cache(tmp_path, counting).lease(ref, etag):
        pass  # the store says so before any download
    assert _entries(tmp_path) == []
    with cache.lease(ref, cache.identify(ref)) as entry:
        assert entry.path.read_bytes() == b"version-2"


def test_object_changing_during_download_is_refetched(tmp_path: Path, local: LocalStore) -> None:
    ref = ObjectRef(BUCKET, "race/slide.svs")
    local.put_bytes(ref, b"before")

    class ChangingStore(CountingStore):
        def download(self, r: ObjectRef, dest: Path) -> ObjectInfo:
            if not self.downloads():
                self.inner.put_bytes(r, b"after!")  # lands between stat and download
            return super().download(r, dest)

    store = ChangingStore(local, tmp_path / "log")
    path = _cache(tmp_path, store).fetch(ref)
    assert path.read_bytes() == b"after!"
    assert len(store.downloads()) == 2
    assert len(_entries(tmp_path)) == 1  # the mismatched download was not kept


def test_mrxs_fetches_sibling_folder(tmp_path: Path, s3_config: StorageConfig) -> None:
    s3 = S3Store(s3_config)
    bucket = f"mrxs-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    s3.ensure_bucket(bucket)
    files = {
        "cases/42/slide.mrxs": b"[GENERAL]",
        "cases/42/slide/Slidedat.ini": b"[HIERARCHICAL]",
        "cases/42/slide/Data0000.dat": os.urandom(20_000),
        "cases/42/slide/sub/Data0001.dat": os.urandom(3_000),
        "cases/42/slide2/Other.dat": b"not ours",
        "cases/42/slideX.txt": b"not ours either",
    }
    for key, data in files.items():
        s3.put_bytes(ObjectRef(bucket, key), data)
    counting = CountingStore(s3, tmp_path / "log")
    cache = _cache(tmp_path, counting)
    entry = cache.fetch_entry(ObjectRef(bucket, "cases/42/slide.mrxs"))
    path = entry.path
    assert path.name == "slide.mrxs"
    assert path.read_bytes() == files["cases/42/slide.mrxs"]
    folder = path.parent / "slide"
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == ["Data0000.dat", "Slidedat.ini", "sub/Data0001.dat"]
    for rel in got:
        assert (folder / rel).read_bytes() == files[f"cases/42/slide/{rel}"]
    assert sorted(os.listdir(path.parent)) == [".smartpath-entry.json", "slide", "slide.mrxs"]
    assert cache.stats().bytes_cached == sum(
        len(v)
        for k, v in files.items()
        if k.startswith("cases/42/slide") and "slide2" not in k and "slideX" not in k
    )
    # a changed file in the sibling folder makes a new entry
    s3.put_bytes(ObjectRef(bucket, "cases/42/slide/Slidedat.ini"), b"[CHANGED]")
    again_entry = cache.fetch_entry(ObjectRef(bucket, "cases/42/slide.mrxs"))
    again = again_entry.path
    assert again != path
    assert again_entry.etag != entry.etag  # the slide's content id covers the sibling folder
    assert entry.etag != s3.stat(ObjectRef(bucket, "cases/42/slide.mrxs")).etag
    assert (again.parent / "slide" / "Slidedat.ini").read_bytes() == b"[CHANGED]"


def test_folder_slide_and_real_slides_open_with_openslide(
    tmp_path: Path, s3_config: StorageConfig, openslide_fixtures: Path
) -> None:
    s3 = S3Store(s3_config)
    bucket = f"dicom-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    s3.ensure_bucket(bucket)
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        s3.upload(openslide_fixtures / name, ObjectRef(bucket, f"series/1.2.3/{name}"))
    s3.upload(openslide_fixtures / "small.svs", ObjectRef(bucket, "svs/small.svs"))
    cache = _cache(tmp_path, s3)

    folder = cache.fetch(ObjectRef(bucket, "series/1.2.3/"))
    assert folder.is_dir() and folder.name == "1.2.3"
    assert sorted(os.listdir(folder)) == ["boxes_0.dcm", "boxes_1.dcm"]
    with openslide.OpenSlide(folder / "boxes_0.dcm") as slide:
        assert (
            slide.dimensions == openslide.OpenSlide(openslide_fixtures / "boxes_0.dcm").dimensions
        )

    svs = cache.fetch(ObjectRef(bucket, "svs/small.svs"))
    assert openslide.OpenSlide.detect_format(svs) == "aperio"
    with openslide.OpenSlide(svs) as slide:
        assert slide.dimensions == (16, 16)


def test_cache_config_home_is_expanded(
    tmp_path: Path, local: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = SlideCache(SlideCacheConfig(dir=Path("~/c"), max_bytes=100), local)
    assert cache.root == (tmp_path / "home" / "c").resolve()
    assert replace(cache.stats(), max_bytes=0).entries == 0
