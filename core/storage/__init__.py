"""Object storage (S3/MinIO or a local folder behind one interface) and the tiler's slide cache."""

from smartpath.core.storage.base import (
    DEFAULT_CONTENT_TYPE,
    ObjectInfo,
    ObjectStore,
    make_store,
)
from smartpath.core.storage.cache import CacheEntry, CacheStats, SlideCache
from smartpath.core.storage.local import LocalStore
from smartpath.core.storage.refs import (
    ObjectRef,
    parse_slide_ref,
    resolve_local_path,
    validate_bucket,
    validate_key,
)
from smartpath.core.storage.s3 import S3Store

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "CacheEntry",
    "CacheStats",
    "LocalStore",
    "ObjectInfo",
    "ObjectRef",
    "ObjectStore",
    "S3Store",
    "SlideCache",
    "make_store",
    "parse_slide_ref",
    "resolve_local_path",
    "validate_bucket",
    "validate_key",
]
