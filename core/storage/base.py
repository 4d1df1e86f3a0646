"""The object-store interface every backend implements, and the factory that picks one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from smartpath.core.storage.refs import ObjectRef

if TYPE_CHECKING:
    from smartpath.core.config import StorageConfig

DEFAULT_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a store knows about one object. ``etag`` changes whenever the content does."""

    bucket: str
    key: str
    size: int
    etag: str
    last_modified: datetime | None

    @property
    def ref(self) -> ObjectRef:
        """The ref naming this object."""
        return ObjectRef(self.bucket, self.key)


@runtime_checkable
class ObjectStore(Protocol):
    """Blob storage for slides, features, models and runs (S3/MinIO or a local folder).

    Every method raises only :mod:`smartpath.core.errors` types: NotFoundError (no such
    bucket/object), InvalidArgumentError (bad bucket name or key), PermissionDeniedError
    (refused credentials) and UnavailableError (unreachable after retries).
    """

    def stat(self, ref: ObjectRef) -> ObjectInfo:
        """Size, ETag and modification time of one object."""
        ...

    def get_bytes(self, ref: ObjectRef) -> bytes:
        """The whole object in memory (small objects only)."""
        ...

    def put_bytes(
        self, ref: ObjectRef, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectInfo:
        """Write ``data`` as the object, replacing any previous content."""
        ...

    def download(self, ref: ObjectRef, dest: Path) -> ObjectInfo:
        """Stream the object to ``dest`` (replaced atomically); returns what was read."""
        ...

    def upload(self, src: Path, ref: ObjectRef) -> ObjectInfo:
        """Stream the local file ``src`` into the object."""
        ...

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object in ``bucket`` whose key starts with ``prefix``, in key order."""
        ...

    def exists(self, ref: ObjectRef) -> bool:
        """True if the object exists (False also when the bucket does not)."""
        ...

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` if it does not exist yet (idempotent)."""
        ...


def make_store(cfg: StorageConfig) -> ObjectStore:
    """The configured store: S3 when an endpoint is set, else the local-folder default."""
    if cfg.endpoint is None:
        from smartpath.core.storage.local import LocalStore

        return LocalStore(Path(cfg.local_root).expanduser())
    from smartpath.core.storage.s3 import S3Store

    return S3Store(cfg)
