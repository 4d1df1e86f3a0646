"""The tiler's bounded local disk cache of slides (OpenSlide needs files on disk).

Layout under ``cfg.dir``::

    entries/<id>/<basename>          one complete slide; <id> hashes bucket, key and ETag(s)
    entries/<id>/.smartpath-entry.json   what the entry holds and its size
    tmp/<id>.<random>/               downloads in progress; renamed to entries/<id> when done
    locks/<id>.lock, locks/evict.lock    flock(2) files

A slide becomes visible only by ``rename(tmp/…, entries/<id>)``, so a crash mid-download never
leaves an entry that is served. ``flock`` locks belong to open file descriptions, so they
exclude threads of one process as well as other processes: the first fetcher of an entry
downloads under an exclusive lock, the others wait and then find the entry in place. Fetches
(and :meth:`SlideCache.lease` blocks) hold a shared lock, and eviction only removes entries it
can lock exclusively without waiting (best effort: the byte bound can be overshot while every
old entry is in use).

:meth:`SlideCache.identify` looks a slide's objects up once and remembers what it saw, so a
:meth:`~SlideCache.lease` of that content (named by the ETag ``identify`` returned) in the
same process needs no second metadata request: a cached entry is used as it is, and a miss
downloads and checks that the ETags still match.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from smartpath.core.config import SlideCacheConfig
from smartpath.core.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from smartpath.core.storage.base import ObjectInfo, ObjectStore
from smartpath.core.storage.refs import (
    ObjectRef,
    key_problem,
    show,
    validate_bucket,
    validate_key,
)

META_NAME = ".smartpath-entry.json"
_EVICT_LOCK = "evict.lock"
_MAX_ATTEMPTS = 3
_KNOWN_MANIFESTS = 256  # slide contents identified recently, per process


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of this SlideCache instance plus what is on disk now (shared by processes)."""

    hits: int
    misses: int
    downloads: int
    bytes_downloaded: int
    evictions: int
    entries: int
    bytes_cached: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A cached slide: where it is and which content it holds."""

    ref: ObjectRef
    path: Path  # the slide file, or its folder for a folder ref
    etag: str  # the object's ETag; for multi-object slides a digest of all their ETags
    size: int  # bytes of all its files


@dataclass(frozen=True, slots=True)
class _Manifest:
    ref: ObjectRef
    files: tuple[tuple[str, ObjectInfo], ...]  # (path relative to the entry folder, object)
    result: str  # what fetch returns, relative to the entry folder
    entry_id: str
    size: int

    @property
    def etag(self) -> str:
        if len(self.files) == 1:
            return self.files[0][1].etag
        digest = hashlib.sha256()
        for rel, info in sorted(self.files):
            digest.update(json.dumps([rel, info.etag, info.size]).encode())
        return digest.hexdigest()[:32]

    def entry(self, folder: Path) -> CacheEntry:
        return CacheEntry(self.ref, folder / self.result, self.etag, self.size)


def _try_lock(path: Path, op: int) -> int | None:
    """Open and flock ``path``; the returned fd holds the lock. None if LOCK_NB and busy.

    Lock files are unlinked when their entry is evicted, so after locking, check that the
    path still names the file we locked; otherwise retry on the new file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _lock(path: Path, op: int) -> int:
    """Like :func:`_try_lock`, waiting as long as it takes."""
    fd = _try_lock(path, op & ~fcntl.LOCK_NB)
    if fd is None:  # cannot happen without LOCK_NB
        raise RuntimeError("a blocking flock returned without the lock")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st_path = os.stat(path)
    except FileNotFoundError:
        return False
    st_fd = os.fstat(fd)
    return (st_path.st_ino, st_path.st_dev) == (st_fd.st_ino, st_fd.st_dev)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class SlideCache:
    """Local copies of slides from an :class:`ObjectStore`, keyed by (bucket, key, ETag)."""

    def __init__(self, cfg: SlideCacheConfig, store: ObjectStore) -> None:
        self.root = Path(cfg.dir).expanduser().resolve()
        self.max_bytes = cfg.max_bytes
        self.store = store
        self._entries = self.root / "entries"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        for folder in (self._entries, self._tmp, self._locks):
            folder.mkdir(parents=True, exist_ok=True)
        self._counts_lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "downloads": 0, "bytes": 0, "evictions": 0}
        self._known_lock = threading.Lock()
        self._known: OrderedDict[tuple[ObjectRef, str], _Manifest] = OrderedDict()

    def __repr__(self) -> str:
        return f"SlideCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # -- public --------------------------------------------------------------------------

    def fetch(self, ref: ObjectRef) -> Path:
        """A local path to the slide: its file, or its folder for a folder ref (key ending ``/``).

        Downloads on a miss (once, however many threads and processes ask at the same time).
        The path stays valid until the entry is evicted; use :meth:`lease` to pin it.
        """
        return self.fetch_entry(ref).path

    def fetch_entry(self, ref: ObjectRef) -> CacheEntry:
        """Like :meth:`fetch`, but also says which content the path holds (its ETag)."""
        with self.lease(ref) as entry:
            return entry

    def identify(self, ref: ObjectRef) -> str:
        """The ETag :meth:`fetch_entry` would report, from object metadata only (no download)."""
        return self._fresh(ref, None).etag

    @contextlib.contextmanager
    def lease(self, ref: ObjectRef, etag: str | None = None) -> Iterator[CacheEntry]:
        """Like :meth:`fetch_entry`; the entry cannot be evicted until the block exits.

        With ``etag`` (from :meth:`identify`) the entry holds exactly that content: what
        ``identify`` saw in this process is reused without asking the store again, and
        content that has changed since is UNAVAILABLE (the caller resolves again).
        """
        fd, entry = self._acquire(ref, etag)
        try:
            yield entry
        finally:
            os.close(fd)

    def stats(self) -> CacheStats:
        """Hit/miss/download/eviction counters of this instance and the cache's current size."""
        entries = self._scan()
        with self._counts_lock:
            c = dict(self._counts)
        return CacheStats(
            hits=c["hits"],
            misses=c["misses"],
            downloads=c["downloads"],
            bytes_downloaded=c["bytes"],
            evictions=c["evictions"],
            entries=len(entries),
            bytes_cached=sum(size for _, _, size in entries),
            max_bytes=self.max_bytes,
        )

    # -- manifest ------------------------------------------------------------------------

    def _known_or_fresh(self, ref: ObjectRef, etag: str | None) -> _Manifest:
        """The manifest of content ``etag`` as this process last saw it, else from the store."""
        if etag is not None:
            with self._known_lock:
                known = self._known.get((ref, etag))
            if known is not None:
                return known
        return self._fresh(ref, etag)

    def _fresh(self, ref: ObjectRef, etag: str | None) -> _Manifest:
        """The manifest from the store, remembered; it must hold content ``etag`` if given."""
        manifest = self._manifest(ref)
        if etag is not None and manifest.etag != etag:
            raise UnavailableError("the slide changed in storage while it was in use; try again")
        with self._known_lock:
            self._known[(ref, manifest.etag)] = manifest
            self._known.move_to_end((ref, manifest.etag))
            while len(self._known) > _KNOWN_MANIFESTS:
                self._known.popitem(last=False)
        return manifest

    def _manifest(self, ref: ObjectRef) -> _Manifest:
        if not isinstance(ref, ObjectRef):
            raise InvalidArgumentError(f"slide cache needs an ObjectRef, got {type(ref).__name__}")
        validate_bucket(ref.bucket)
        validate_key(ref.key, allow_folder=True)
        parent, _, base = ref.key.rstrip("/").rpartition("/")
        parent_prefix = f"{parent}/" if parent else ""
        files: list[tuple[str, ObjectInfo]] = []
        if ref.is_folder:
            files.extend(self._listed(ref, ref.key, parent_prefix))
            if not files:
                raise NotFoundError(f"no objects under folder slide {ref}")
        else:
            files.append((base, self.store.stat(ref)))
            if ref.key.lower().endswith(".mrxs"):
                files.extend(self._listed(ref, ref.key[: -len(".mrxs")] + "/", parent_prefix))
        self._check_layout(ref, files)
        digest = hashlib.sha256()
        digest.update(json.dumps([ref.bucket, ref.key]).encode())
        for rel, info in sorted(files):
            digest.update(json.dumps([rel, info.etag, info.size]).encode())
        return _Manifest(
            ref=ref,
            files=tuple(files),
            result=base,
            entry_id=digest.hexdigest()[:40],
            size=sum(info.size for _, info in files),
        )

    def _listed(
        self, ref: ObjectRef, prefix: str, parent_prefix: str
    ) -> Iterator[tuple[str, ObjectInfo]]:
        for info in self.store.list(ref.bucket, prefix):
            if info.bucket != ref.bucket or not info.key.startswith(prefix):
                raise InvalidArgumentError(
                    f"refusing to cache {show(info.key)}: the store listed it for prefix "
                    f"{show(prefix)}, which it does not start with"
                )
            if info.key.endswith("/"):  # zero-byte "folder marker" objects
                continue
            rel = info.key[len(parent_prefix) :]
            if key_problem(info.key) is not None or key_problem(rel) is not None:
                raise InvalidArgumentError(
                    f"refusing to cache object key {show(info.key)} of slide {ref}: it would "
                    "escape the cache folder"
                )
            yield rel, info

    @staticmethod
    def _check_layout(ref: ObjectRef, files: list[tuple[str, ObjectInfo]]) -> None:
        paths = {rel for rel, _ in files}
        if len(paths) != len(files):
            raise InvalidArgumentError(f"slide {ref} lists the same object twice")
        for rel in paths:
            parts = rel.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in paths:
                    raise InvalidArgumentError(
                        f"slide {ref} holds both an object and a folder named "
                        f"{show('/'.join(parts[:i]))}; it cannot be laid out on disk"
                    )

    # -- fetch ---------------------------------------------------------------------------

    def _acquire(self, ref: ObjectRef, etag: str | None) -> tuple[int, CacheEntry]:
        """Make the entry present; return (fd holding a shared lock on it, the entry)."""
        manifest = self._known_or_fresh(ref, etag)
        for _ in range(_MAX_ATTEMPTS):
            if manifest.size > self.max_bytes:
                raise ResourceExhaustedError(
                    f"slide {ref} is {manifest.size} bytes, more than the whole slide cache "
                    f"({self.max_bytes} bytes); raise slide_cache.max_bytes"
                )
            entry = self._entries / manifest.entry_id
            lock_path = self._locks / f"{manifest.entry_id}.lock"
            fd = _lock(lock_path, fcntl.LOCK_SH)
            if entry.is_dir():
                self._touch(entry)
                self._count(hits=1)
                return fd, manifest.entry(entry)
            os.close(fd)

            fd = _lock(lock_path, fcntl.LOCK_EX)
            try:
                downloaded = moved = False
                if not entry.is_dir():
                    downloaded = self._download(manifest, entry)
                    moved = not downloaded
                if not moved:
                    self._touch(entry)
                    # Converting EX to SH is not atomic for flock; an evictor may slip in
                    # between, so check again that the entry and our lock file are still
                    # the live ones.
                    fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                self._drop_lock(fd, lock_path, entry)
                raise
            if moved:
                # The object changed between listing and download: start over.
                self._drop_lock(fd, lock_path, entry)
                manifest = self._fresh(ref, etag)
                continue
            if entry.is_dir() and _same_file(fd, lock_path):
                if downloaded:
                    self._count(misses=1)
                else:
                    self._count(hits=1)
                return fd, manifest.entry(entry)
            os.close(fd)
        raise UnavailableError(
            f"slide {ref} kept changing or being evicted while it was fetched; try again"
        )

    def _download(self, manifest: _Manifest, entry: Path) -> bool:
        """Download into a temp folder and rename it to ``entry``; False if ETags moved."""
        self._evict(need=manifest.size, keep=manifest.entry_id)
        tmp = self._tmp / f"{manifest.entry_id}.{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            tmp_resolved = tmp.resolve()
            got: list[ObjectInfo] = []
            for rel, info in manifest.files:
                dest = tmp / rel
                if not dest.resolve(strict=False).is_relative_to(tmp_resolved):
                    raise InvalidArgumentError(
                        f"refusing to cache object key {show(info.key)}: it would escape the "
                        "cache folder"
                    )
                dest.parent.mkdir(parents=True, exist_ok=True)
                got.append(self.store.download(info.ref, dest))
            self._count(downloads=len(got), bytes=sum(g.size for g in got))
            if any(g.etag != info.etag for g, (_, info) in zip(got, manifest.files, strict=True)):
                return False
            meta = {
                "bucket": manifest.ref.bucket,
                "key": manifest.ref.key,
                "size": manifest.size,
                "files": [
                    {"path": rel, "etag": i.etag, "size": i.size} for rel, i in manifest.files
                ],
                "created": time.time(),
            }
            (tmp / META_NAME).write_text(json.dumps(meta))
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
        self._evict(need=0, keep=manifest.entry_id)
        return True

    # -- eviction ------------------------------------------------------------------------

    def _scan(self) -> list[tuple[int, str, int]]:
        """(last use ns, entry id, bytes) of every complete entry."""
        out = []
        with os.scandir(self._entries) as it:
            for item in it:
                try:
                    if not item.is_dir(follow_symlinks=False):
                        continue
                    used = item.stat(follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:
                    continue
                out.append((used, item.name, self._entry_size(Path(item.path))))
        return out

    @staticmethod
    def _entry_size(entry: Path) -> int:
        try:
            return int(json.loads((entry / META_NAME).read_text())["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return _tree_size(entry)

    def _evict(self, need: int, keep: str) -> None:
        """Remove least recently used, unlocked entries until ``need`` more bytes fit."""
        evict_fd = _lock(self._locks / _EVICT_LOCK, fcntl.LOCK_EX)
        try:
            self._sweep_tmp(held=keep)
            entries = sorted(self._scan())
            total = sum(size for _, _, size in entries)
            budget = self.max_bytes - need
            for _, entry_id, size in entries:
                if total <= budget:
                    break
                if entry_id == keep:
                    continue
                lock_path = self._locks / f"{entry_id}.lock"
                fd = _try_lock(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if fd is None:
                    continue  # in use by someone else
                try:
                    trash = self._tmp / f"evict-{entry_id}.{uuid.uuid4().hex}"
                    try:
                        os.rename(self._entries / entry_id, trash)
                    except FileNotFoundError:
                        continue
                    os.unlink(lock_path)
                finally:
                    os.close(fd)
                shutil.rmtree(trash, ignore_errors=True)
                total -= size
                self._count(evictions=1)
        finally:
            os.close(evict_fd)

    def _sweep_tmp(self, held: str) -> None:
        """Delete temp folders left by crashed fetchers (called under the eviction lock).

        ``held`` is the entry whose lock the caller holds exclusively; none of its temp
        folders can belong to a live download.
        """
        with os.scandir(self._tmp) as it:
            names = [item.name for item in it]
        for name in names:
            path = self._tmp / name
            if name.startswith("evict-"):
                shutil.rmtree(path, ignore_errors=True)
                continue
            entry_id = name.split(".", 1)[0]
            if entry_id == held:
                shutil.rmtree(path, ignore_errors=True)
                continue
            fd = _try_lock(self._locks / f"{entry_id}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                continue  # its download may still be running
            try:
                shutil.rmtree(path, ignore_errors=True)
                if not (self._entries / entry_id).exists():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._locks / f"{entry_id}.lock")
            finally:
                os.close(fd)

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _drop_lock(fd: int, lock_path: Path, entry: Path) -> None:
        """Release an exclusive entry lock; remove its file if no entry was made."""
        try:
            if not entry.is_dir() and _same_file(fd, lock_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
        finally:
            os.close(fd)

    @staticmethod
    def _touch(entry: Path) -> None:
        # Explicit fine-grained time: kernel file timestamps tick only every few ms, which
        # would tie entries used in quick succession.
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(entry, ns=(now, now))

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            for name, delta in deltas.items():
                self._counts[name] += delta
