"""The embedded default store: a local folder with one sub-folder per bucket."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from smartpath.core.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SmartPathError,
    UnavailableError,
)
from smartpath.core.storage.base import DEFAULT_CONTENT_TYPE, ObjectInfo
from smartpath.core.storage.refs import (
    ObjectRef,
    key_problem,
    show,
    validate_bucket,
    validate_key,
)

TMP_PREFIX = ".smartpath-tmp-"
_CHUNK = 1024 * 1024

logger = logging.getLogger(__name__)


def _etag(st: os.stat_result) -> str:
    # A metadata hash rather than a content hash: hashing multi-GB slides on every stat would
    # be far too slow. Writes go through a new temp file + os.replace, so every write gets a
    # new inode and mtime; in-place edits change mtime/ctime (and usually size).
    raw = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"
    return hashlib.md5(raw.encode(), usedforsecurity=False).hexdigest()


def _info(ref: ObjectRef, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(
        bucket=ref.bucket,
        key=ref.key,
        size=st.st_size,
        etag=_etag(st),
        last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
    )


class LocalStore:
    """An :class:`~smartpath.core.storage.base.ObjectStore` over ``root/<bucket>/<key>``.

    Writes are atomic (temp file in the same folder, then ``os.replace``); keys that would
    leave the bucket folder, including through symlinks, are refused.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------

    def _bucket_dir(self, bucket: str, *, must_exist: bool = True) -> Path:
        validate_bucket(bucket)
        path = self.root / bucket
        if must_exist and not path.is_dir():
            raise NotFoundError(f"no such bucket {bucket!r} in local storage")
        return path

    def _object_path(self, ref: ObjectRef) -> Path:
        bucket_dir = self._bucket_dir(ref.bucket)
        validate_key(ref.key)
        path = bucket_dir / ref.key
        if not path.resolve(strict=False).is_relative_to(bucket_dir.resolve()):
            raise InvalidArgumentError(f"object key {show(ref.key)} leaves its bucket folder")
        return path

    @contextlib.contextmanager
    def _os_errors(self, ref: ObjectRef | None, bucket: str | None = None) -> Iterator[None]:
        what = f"object {ref}" if ref is not None else f"bucket {bucket!r}"
        try:
            yield
        except SmartPathError:
            raise
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFoundError(f"no such {what} in local storage") from exc
        except (NotADirectoryError, FileExistsError) as exc:
            raise InvalidArgumentError(
                f"{what} clashes with an existing object or folder in local storage (a key "
                "cannot be both an object and a prefix of other keys here)"
            ) from exc
        except PermissionError as exc:
            logger.warning("local storage at %s refused access to %s: %s", self.root, what, exc)
            raise PermissionDeniedError(
                f"local storage refused access to {what} (the server's file permissions)"
            ) from None
        except OSError as exc:
            logger.warning("local storage at %s failed on %s: %s", self.root, what, exc)
            reason = f": {exc.strerror}" if exc.strerror else ""
            raise UnavailableError(f"local storage failed on {what}{reason}") from None

    def _write_atomic(self, path: Path, fill: Callable[[BinaryIO], None]) -> os.stat_result:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as tmp:
                fill(tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        return path.stat()

    # -- ObjectStore ---------------------------------------------------------------------

    def stat(self, ref: ObjectRef) -> ObjectInfo:
        """Size, ETag and modification time of one object."""
        with self._os_errors(ref):
            path = self._object_path(ref)
            if not path.is_file():
                raise NotFoundError(f"no such object {ref} in local storage")
            return _info(ref, path.stat())

    def get_bytes(self, ref: ObjectRef) -> bytes:
        """The whole object in memory."""
        with self._os_errors(ref):
            return self._object_path(ref).read_bytes()

    def put_bytes(
        self, ref: ObjectRef, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectInfo:
        """Write ``data`` atomically as the object. ``content_type`` is not kept locally."""
        with self._os_errors(ref):
            path = self._object_path(ref)
            return _info(ref, self._write_atomic(path, lambda f: f.write(data)))

    def download(self, ref: ObjectRef, dest: Path) -> ObjectInfo:
        """Copy the object to ``dest`` in chunks, replacing ``dest`` atomically."""
        dest = Path(dest)
        with self._os_errors(ref):
            path = self._object_path(ref)
            with open(path, "rb") as src:
                # fstat of the open file: the info matches the bytes copied even if the
                # object is replaced meanwhile.
                st = os.fstat(src.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise NotFoundError(f"no such object {ref} in local storage")
                self._write_atomic(dest, lambda f: shutil.copyfileobj(src, f, _CHUNK))
            return _info(ref, st)

    def upload(self, src: Path, ref: ObjectRef) -> ObjectInfo:
        """Copy the local file ``src`` into the object atomically."""
        src = Path(src)
        if not src.is_file():
            logger.warning("upload source %s is not a file", src)
            raise NotFoundError(f"upload source for {ref} is not a file")
        with self._os_errors(ref):
            path = self._object_path(ref)
            with open(src, "rb") as fsrc:
                st = self._write_atomic(path, lambda f: shutil.copyfileobj(fsrc, f, _CHUNK))
            return _info(ref, st)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key (UTF-8 byte) order."""
        bucket_dir = self._bucket_dir(bucket)
        start = bucket_dir
        # Walk only the folder the prefix pins down; a prefix with unsafe segments cannot
        # match a valid key anyway, so it just walks the bucket and filters.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if head and key_problem(head) is None:
            start = bucket_dir / head
        found: list[tuple[bytes, str, os.stat_result]] = []
        with self._os_errors(None, bucket):
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
                rel_dir = os.path.relpath(dirpath, bucket_dir)
                for name in filenames:
                    if name.startswith(TMP_PREFIX):
                        continue
                    full = os.path.join(dirpath, name)
                    if os.path.islink(full):
                        continue
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if not key.startswith(prefix) or key_problem(key) is not None:
                        continue
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    found.append((key.encode("utf-8", "surrogateescape"), key, st))
        found.sort(key=lambda item: item[0])
        for _, key, st in found:
            yield _info(ObjectRef(bucket, key), st)

    def exists(self, ref: ObjectRef) -> bool:
        """True if the object exists."""
        try:
            self.stat(ref)
        except NotFoundError:
            return False
        return True

    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket folder if missing."""
        with self._os_errors(None, bucket):
            self._bucket_dir(bucket, must_exist=False).mkdir(parents=True, exist_ok=True)
