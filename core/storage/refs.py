"""Slide references: ``s3://bucket/key`` object refs and (opt-in) local paths.

Parsing never touches the network or the disk; :func:`resolve_local_path` is the one place
that decides whether a local path may be used, against the configured allowed roots.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from smartpath.core.errors import InvalidArgumentError, NotFoundError

MAX_KEY_BYTES = 1024
_SHOW_CHARS = 120
_EXPECTED = (
    "expected s3://bucket/key (or, where local slides are enabled, /abs/path or file:///abs/path)"
)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_BUCKET_BAD_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_BAD_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One object (or, with a key ending in ``/``, one folder of objects) in a bucket."""

    bucket: str
    key: str

    @property
    def is_folder(self) -> bool:
        """True for a folder slide (key ends with ``/``), e.g. a DICOM series."""
        return self.key.endswith("/")

    @property
    def uri(self) -> str:
        """The ``s3://bucket/key`` form of this ref."""
        return f"s3://{self.bucket}/{self.key}"

    def __str__(self) -> str:
        # Quoted like show(): messages read "object 's3://b/k'", and callers can redact quotes.
        return repr(self.uri)


def show(value: object, limit: int = _SHOW_CHARS) -> str:
    """``repr`` of a caller-supplied value for an error message, truncated if huge."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}… ({size} chars)"


def validate_bucket(bucket: str) -> str:
    """Return ``bucket`` if it follows S3's bucket naming rules, else raise InvalidArgumentError."""
    problem = _bucket_problem(bucket)
    if problem:
        raise InvalidArgumentError(
            f"invalid bucket name {show(bucket)}: {problem} (S3 bucket names are 3-63 "
            "characters of lowercase letters, digits, '.' and '-', starting and ending with a "
            "letter or digit)"
        )
    return bucket


def _bucket_problem(bucket: object) -> str | None:
    if not isinstance(bucket, str):
        return f"must be a string, got {type(bucket).__name__}"
    if not _BUCKET_RE.match(bucket):
        return "wrong length or characters"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "'..', '.-' and '-.' are not allowed"
    if _IPV4_RE.match(bucket):
        return "must not look like an IP address"
    if bucket.startswith(_BUCKET_BAD_PREFIXES) or bucket.endswith(_BUCKET_BAD_SUFFIXES):
        return "uses a prefix or suffix that S3 reserves"
    return None


def validate_key(key: str, *, allow_folder: bool = False) -> str:
    """Return ``key`` if it is a safe object key, else raise InvalidArgumentError.

    Safe means: non-empty, at most 1024 UTF-8 bytes, no NUL or backslash, no leading ``/``,
    and no empty, ``.`` or ``..`` path segments, so that it maps one-to-one onto a relative
    path that stays inside whatever folder it is joined to. A trailing ``/`` (a folder) is
    accepted only with ``allow_folder``.
    """
    problem = key_problem(key, allow_folder=allow_folder)
    if problem:
        raise InvalidArgumentError(f"invalid object key {show(key)}: {problem}")
    return key


def key_problem(key: object, *, allow_folder: bool = False) -> str | None:
    """Why ``key`` is not a safe object key, or None if it is (see :func:`validate_key`)."""
    if not isinstance(key, str):
        return f"must be a string, got {type(key).__name__}"
    if not key:
        return "must not be empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_KEY_BYTES:
        return f"is {size} bytes long; at most {MAX_KEY_BYTES} are allowed"
    if "\x00" in key:
        return "must not contain NUL characters"
    if "\\" in key:
        return "must not contain backslashes"
    if key.startswith("/"):
        return "must not start with '/'"
    body = key
    if key.endswith("/"):
        if not allow_folder:
            return "must not end with '/' (that names a folder, not an object)"
        body = key[:-1]
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            return "must not contain empty, '.' or '..' path segments"
    return None


def parse_slide_ref(uri: str) -> ObjectRef | Path:
    """Parse a slide reference into an :class:`ObjectRef` or a local absolute ``Path``.

    Accepts ``s3://bucket/key`` (a key ending in ``/`` is a folder slide), ``/abs/path`` and
    ``file:///abs/path``. A returned Path is not yet allowed: pass it through
    :func:`resolve_local_path` with the configured roots.
    """
    if not isinstance(uri, str):
        raise InvalidArgumentError(
            f"slide reference must be a string, got {type(uri).__name__}; {_EXPECTED}"
        )
    if not uri:
        raise InvalidArgumentError(f"slide reference is empty; {_EXPECTED}")
    if uri.startswith("s3://"):
        bucket, sep, key = uri[len("s3://") :].partition("/")
        if not sep or not key:
            raise InvalidArgumentError(
                f"slide reference {show(uri)} has no object key; {_EXPECTED}"
            )
        bucket_problem = _bucket_problem(bucket)
        if bucket_problem:
            raise InvalidArgumentError(
                f"slide reference {show(uri)} has an invalid bucket name: {bucket_problem}; "
                f"{_EXPECTED}"
            )
        problem = key_problem(key, allow_folder=True)
        if problem:
            raise InvalidArgumentError(
                f"slide reference {show(uri)} has an invalid object key: it {problem}; {_EXPECTED}"
            )
        return ObjectRef(bucket, key)
    if uri.startswith("file://"):
        rest = uri[len("file://") :]
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise InvalidArgumentError(
                f"slide reference {show(uri)} names a remote host; only local file:///abs/path "
                "URIs are supported"
            )
        return _local_path(uri, "/" + unquote(path))
    if uri.startswith("/"):
        return _local_path(uri, uri)
    raise InvalidArgumentError(f"unsupported slide reference {show(uri)}; {_EXPECTED}")


def _local_path(uri: str, path: str) -> Path:
    if "\x00" in path:
        raise InvalidArgumentError(f"slide reference {show(uri)} contains a NUL character")
    if path.endswith("/") and path.strip("/") == "":
        raise InvalidArgumentError(f"slide reference {show(uri)} names the filesystem root")
    return Path(path)


def resolve_local_path(path: str | Path, allowed_roots: Sequence[Path]) -> Path:
    """Resolve ``path`` (following symlinks) and return it if it lies inside an allowed root.

    Raises InvalidArgumentError when no roots are configured (local paths refused) or the
    resolved path is outside every root, and NotFoundError when it is inside but missing.
    """
    if not allowed_roots:
        raise InvalidArgumentError(
            "local slide paths are disabled on this server; reference the slide as "
            "s3://bucket/key (operators can allow folders with tiling.local_slide_roots)"
        )
    candidate = Path(path)
    if not candidate.is_absolute():
        raise InvalidArgumentError(f"local slide path {show(str(path))} must be absolute")
    try:
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise InvalidArgumentError(
            f"local slide path {show(str(path))} cannot be resolved ({type(exc).__name__}; "
            "a symlink loop?)"
        ) from None
    for root in allowed_roots:
        root_resolved = Path(root).expanduser().resolve(strict=False)
        if resolved == root_resolved or resolved.is_relative_to(root_resolved):
            break
    else:
        raise InvalidArgumentError(
            f"local slide path {show(str(path))} is outside the folders this server may read "
            "(tiling.local_slide_roots)"
        )
    try:
        exists = resolved.exists()
    except OSError as exc:
        raise InvalidArgumentError(
            f"local slide path {show(str(path))} cannot be read on the server "
            f"({type(exc).__name__})"
        ) from None
    if not exists:
        raise NotFoundError(f"local slide path {show(str(path))} does not exist")
    return resolved
