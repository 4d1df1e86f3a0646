"""The S3/MinIO store, on the ``minio`` client, with retries and domain-error mapping."""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from smartpath.core.config import StorageConfig
from smartpath.core.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SmartPathError,
    UnavailableError,
)
from smartpath.core.storage.base import DEFAULT_CONTENT_TYPE, ObjectInfo
from smartpath.core.storage.refs import ObjectRef, validate_bucket, validate_key

T = TypeVar("T")

_CHUNK = 1024 * 1024
_TMP_PREFIX = ".smartpath-tmp-"

logger = logging.getLogger(__name__)

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "InvalidSecurity",
    }
)
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "SlowDownRead",
        "SlowDownWrite",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestThrottled",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "OperationAborted",
        "XMinioServerNotInitialized",
        "XMinioStorageFull",
    }
)
_AUTH_HINTS = {
    "InvalidAccessKeyId": "the server does not know this access key (check storage.access_key)",
    "SignatureDoesNotMatch": "the secret key does not match the access key "
    "(check storage.secret_key)",
    "AccessDenied": "the credentials are wrong or lack permission for this bucket/object "
    "(check storage.access_key / storage.secret_key and the bucket policy)",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
}
BAD_INPUT_CODES = frozenset(
    {"InvalidBucketName", "InvalidObjectName", "KeyTooLongError", "InvalidArgument"}
)


class _Transient(Exception):
    """A failure worth retrying; ``final`` is what to raise once retries are spent."""

    def __init__(self, final: SmartPathError) -> None:
        super().__init__(str(final))
        self.final = final


def _short_reason(exc: BaseException) -> str:
    """One line saying why a connection failed, without urllib3's object reprs."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not seen for seen in chain):
        chain.append(cur)
        nxt = getattr(cur, "reason", None)
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
    for item in chain:  # the OS's own words first ("Connection refused", …)
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
    for item in chain:
        if isinstance(item, urllib3.exceptions.TimeoutError | TimeoutError):
            return "timed out"
        if isinstance(item, urllib3.exceptions.ProtocolError | http.client.HTTPException):
            return "connection dropped mid-response"
    return type(exc).__name__


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, S3Error):
        response = exc.response
        return getattr(response, "status", None)
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        code = getattr(exc, "_code", None)
        return code if isinstance(code, int) else None
    return None


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


class S3Store:
    """An :class:`~smartpath.core.storage.base.ObjectStore` on an S3 API (MinIO, AWS, moto).

    Every public call runs as a unit of retry: connection errors, timeouts, 5xx/429 answers and
    throttling codes (``SlowDown``…) are retried ``cfg.retries`` times, sleeping
    ``cfg.backoff_s`` and doubling each time (+≤10 % jitter); a download or listing restarts
    or resumes as a whole. urllib3's own retries are off so the two layers never multiply.
    """

    def __init__(self, cfg: StorageConfig) -> None:
        if cfg.endpoint is None:
            raise InvalidArgumentError("S3Store needs storage.endpoint (host:port)")
        self.endpoint = cfg.endpoint
        self.retries = cfg.retries
        self.backoff_s = cfg.backoff_s
        self._region = cfg.region
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s),
            maxsize=16,
            retries=False,
        )
        try:
            self._client = Minio(
                cfg.endpoint,
                access_key=cfg.access_key.get_secret_value() if cfg.access_key else None,
                secret_key=cfg.secret_key.get_secret_value() if cfg.secret_key else None,
                secure=cfg.secure,
                region=cfg.region,
                http_client=http,
            )
        except ValueError as exc:
            logger.warning("storage.endpoint %r is not a valid host:port: %s", cfg.endpoint, exc)
            raise InvalidArgumentError(
                "storage.endpoint is not a valid host:port (see the server log)"
            ) from None

    def __repr__(self) -> str:
        return f"S3Store({self.endpoint!r})"

    # -- retry + error mapping -----------------------------------------------------------

    def _map(self, exc: Exception, what: str) -> SmartPathError | _Transient:
        """Turn a client exception into a domain error (wrapped in _Transient if retryable).

        Messages name the storage but never its endpoint, nor repeat the server's or the
        client's own words (they can hold hosts and paths); those go to the log.
        """
        mapped = self._map_error(exc, what)
        final = mapped.final if isinstance(mapped, _Transient) else mapped
        log = logger.debug if isinstance(final, NotFoundError) else logger.warning
        log("object storage at %s: %s failed: %r", self.endpoint, what, exc)
        return mapped

    def _map_error(self, exc: Exception, what: str) -> SmartPathError | _Transient:
        where = "object storage"
        if isinstance(exc, S3Error):
            code = exc.code or ""
            status = _status(exc)
            if code == "NoSuchBucket" and exc.bucket_name:
                return NotFoundError(f"no such bucket {exc.bucket_name!r} in object storage")
            if code in NOT_FOUND_CODES or status == 404:
                return NotFoundError(f"{where}: {what} failed: {code or 'not found'}")
            if code in AUTH_CODES or status == 403:
                hint = _AUTH_HINTS.get(code, _AUTH_HINTS["AccessDenied"])
                return PermissionDeniedError(
                    f"{where} refused {what} with {code or 'HTTP 403'}: {hint}"
                )
            if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
                return _Transient(
                    UnavailableError(f"{where} is overloaded or failing ({code}) on {what}")
                )
            if code in BAD_INPUT_CODES:
                return InvalidArgumentError(f"{where} rejected {what} ({code})")
            return UnavailableError(f"{where} answered {code or status} to {what}")
        if isinstance(exc, ServerError | InvalidResponseError):
            status = _status(exc)
            if status == 404:
                return NotFoundError(f"{where}: {what} failed: HTTP 404")
            if status == 403:
                return PermissionDeniedError(f"{where} refused {what} (HTTP 403)")
            if status is None or status >= 500 or status == 429:
                return _Transient(UnavailableError(f"{where} is failing (HTTP {status}) on {what}"))
            return UnavailableError(
                f"{where} gave an unexpected HTTP {status} answer to {what}; is storage.endpoint "
                "an S3 API?"
            )
        if isinstance(
            exc,
            urllib3.exceptions.HTTPError
            | http.client.HTTPException
            | ConnectionError
            | TimeoutError,
        ):
            return _Transient(
                UnavailableError(
                    f"{where} is unreachable ({_short_reason(exc)}); check storage.endpoint "
                    "and that the server is up"
                )
            )
        if isinstance(exc, MinioException):
            return UnavailableError(f"{where} failed on {what}: {type(exc).__name__}")
        if isinstance(exc, ValueError | TypeError):
            return InvalidArgumentError(
                f"{what} was refused by the S3 client ({type(exc).__name__})"
            )
        raise exc  # local file errors (OSError) and bugs pass through unchanged

    def _sleep(self, attempt: int) -> None:
        delay = self.backoff_s * (2**attempt)
        time.sleep(delay * (1 + 0.1 * random.random()))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries of transient failures; raise only domain errors."""
        attempt = 0
        while True:
            try:
                return fn()
            except SmartPathError:
                raise
            except Exception as exc:
                mapped = self._map(exc, what)
                if not isinstance(mapped, _Transient):
                    raise mapped from exc
                if attempt >= self.retries:
                    raise self._exhausted(mapped, attempt) from exc
                self._sleep(attempt)
                attempt += 1

    def _exhausted(self, transient: _Transient, attempt: int) -> SmartPathError:
        tries = attempt + 1
        return type(transient.final)(
            f"{transient.final} (gave up after {tries} attempt{'s' if tries > 1 else ''})"
        )

    def _missing(self, ref: ObjectRef) -> NotFoundError:
        """A precise NotFoundError: say whether the bucket or the object is missing."""
        try:
            bucket_ok = self._call(
                "checking the bucket", lambda: self._client.bucket_exists(ref.bucket)
            )
        except SmartPathError:
            bucket_ok = True
        if not bucket_ok:
            return NotFoundError(f"no such bucket {ref.bucket!r} in object storage")
        return NotFoundError(f"no such object {ref} in object storage")

    def _checked(self, ref: ObjectRef) -> ObjectRef:
        validate_bucket(ref.bucket)
        validate_key(ref.key)
        return ref

    # -- ObjectStore ---------------------------------------------------------------------

    def _stat(self, ref: ObjectRef) -> ObjectInfo:
        self._checked(ref)
        obj = self._call(f"stat of {ref}", lambda: self._client.stat_object(ref.bucket, ref.key))
        return ObjectInfo(
            bucket=ref.bucket,
            key=ref.key,
            size=int(obj.size or 0),
            etag=_strip_etag(obj.etag),
            last_modified=obj.last_modified,
        )

    def stat(self, ref: ObjectRef) -> ObjectInfo:
        """Size, ETag and modification time of one object."""
        try:
            return self._stat(ref)
        except NotFoundError:
            raise self._missing(ref) from None

    def get_bytes(self, ref: ObjectRef) -> bytes:
        """The whole object in memory."""
        self._checked(ref)

        def fetch() -> bytes:
            response = self._client.get_object(ref.bucket, ref.key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call(f"read of {ref}", fetch)
        except NotFoundError:
            raise self._missing(ref) from None

    def put_bytes(
        self, ref: ObjectRef, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> ObjectInfo:
        """Write ``data`` as the object."""
        self._checked(ref)
        result = self._call(
            f"write of {ref}",
            lambda: self._client.put_object(
                ref.bucket, ref.key, io.BytesIO(data), len(data), content_type=content_type
            ),
        )
        return ObjectInfo(
            ref.bucket, ref.key, len(data), _strip_etag(result.etag), result.last_modified
        )

    def download(self, ref: ObjectRef, dest: Path) -> ObjectInfo:
        """Stream the object to ``dest`` via a temp file in the same folder, then rename."""
        self._checked(ref)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> ObjectInfo:
            response = self._client.get_object(ref.bucket, ref.key)
            fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
            try:
                written = 0
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.stream(_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                expected = response.headers.get("Content-Length")
                if expected is not None and int(expected) != written:
                    raise urllib3.exceptions.ProtocolError("short read")
                info = ObjectInfo(
                    bucket=ref.bucket,
                    key=ref.key,
                    size=written,
                    etag=_strip_etag(response.headers.get("ETag")),
                    last_modified=_http_date(response.headers.get("Last-Modified")),
                )
                os.replace(tmp_name, dest)
                return info
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call(f"download of {ref}", fetch)
        except NotFoundError:
            raise self._missing(ref) from None

    def upload(self, src: Path, ref: ObjectRef) -> ObjectInfo:
        """Stream the local file ``src`` into the object (multipart when large)."""
        self._checked(ref)
        src = Path(src)
        if not src.is_file():
            logger.warning("upload source %s is not a file", src)
            raise NotFoundError(f"upload source for {ref} is not a file")
        size = src.stat().st_size
        result = self._call(
            f"upload to {ref}", lambda: self._client.fput_object(ref.bucket, ref.key, str(src))
        )
        return ObjectInfo(ref.bucket, ref.key, size, _strip_etag(result.etag), result.last_modified)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order; resumes after transient errors.

        Errors surface while iterating.
        """
        validate_bucket(bucket)
        last: str | None = None
        attempt = 0
        what = f"listing of s3://{bucket}/{prefix}"
        while True:
            try:
                for obj in self._client.list_objects(
                    bucket, prefix=prefix or None, recursive=True, start_after=last
                ):
                    if obj.is_dir or obj.object_name is None:
                        continue
                    last = obj.object_name
                    yield ObjectInfo(
                        bucket=bucket,
                        key=obj.object_name,
                        size=int(obj.size or 0),
                        etag=_strip_etag(obj.etag),
                        last_modified=obj.last_modified,
                    )
                return
            except Exception as exc:
                mapped = self._map(exc, what)
                if isinstance(mapped, NotFoundError):
                    raise NotFoundError(f"no such bucket {bucket!r} in object storage") from exc
                if not isinstance(mapped, _Transient):
                    raise mapped from exc
                if attempt >= self.retries:
                    raise self._exhausted(mapped, attempt) from exc
                self._sleep(attempt)
                attempt += 1

    def exists(self, ref: ObjectRef) -> bool:
        """True if the object exists (one HEAD request)."""
        try:
            self._stat(ref)
        except NotFoundError:
            return False
        return True

    def ensure_bucket(self, bucket: str) -> None:
        """Create the bucket if it does not exist yet; tolerates a concurrent creator."""
        validate_bucket(bucket)

        def create() -> None:
            if self._client.bucket_exists(bucket):
                return
            try:
                self._client.make_bucket(bucket, location=self._region)
            except S3Error as exc:
                if exc.code == "BucketAlreadyOwnedByYou":
                    return
                if exc.code == "BucketAlreadyExists" and self._client.bucket_exists(bucket):
                    return
                raise

        self._call(f"creation of bucket {bucket!r}", create)


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
