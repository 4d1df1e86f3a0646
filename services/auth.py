"""Who may call SmartPath's gRPC services, and the audit trail of who read which slide.

- Tokens come from a mounted file (a Kubernetes Secret), one per line as ``name:token`` (the
  caller's name goes into the audit log) or a bare ``token`` (named ``caller-N`` by its
  line); blank lines and ``#`` comments are ignored. The file is re-read when it changes, so
  rotating the Secret needs no restart. Callers send ``authorization: Bearer <token>``.
- Every gRPC method of every deployment (tiler, encoder, router, decoder, gateway) is checked
  by the shared wrappers in :mod:`smartpath.services.grpc_util` before any validation or work;
  a token is compared with every accepted one in constant time. Calls between deployments go
  through DeploymentHandles (Python methods) inside the cluster and carry no token; health
  and reflection stay open for probes.
- One audit record per call, authenticated or refused, on the ``smartpath.audit`` logger as
  a JSON line: UTC time, service, RPC, caller name, the slide reference as a keyed hash
  (HMAC-SHA256 with ``serve.audit_key``, so the log links calls on one slide without naming
  it), the outcome's status code and the request id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from smartpath.core.errors import UnauthenticatedError, UnavailableError

logger = logging.getLogger("smartpath.auth")
audit_logger = logging.getLogger("smartpath.audit")

_NAMED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._@-]{0,63}):(\S+)$")
ANONYMOUS = "anonymous"  # the caller when no token file is configured


class TokenCheck:
    """Accepts a request when its bearer token is one of the file's; names the caller."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: tuple[tuple[bytes, str], ...] = ()

    def _current(self) -> tuple[tuple[bytes, str], ...]:
        try:
            st = self.path.stat()
        except OSError:
            logger.error("auth token file is missing or unreadable")
            raise UnavailableError("authentication is not configured correctly") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                tokens = []
                for n, raw in enumerate(self.path.read_text().splitlines(), 1):
                    line = raw.strip()
                    if not line or line.startswith("#"):
                        continue
                    named = _NAMED.match(line)
                    name, token = named.groups() if named else (f"caller-{n}", line)
                    tokens.append((token.encode(), name))
                self._tokens = tuple(tokens)
                self._stamp = stamp
            return self._tokens

    def check(self, metadata: Iterable[tuple[str, str]]) -> str:
        """The caller's name; UNAUTHENTICATED unless the metadata carries an accepted token."""
        header = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if header is None:
            raise UnauthenticatedError("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
        given = token.strip().encode()
        # Compare against every token so timing does not reveal which one nearly matched.
        caller = None
        for accepted, name in self._current():
            if hmac.compare_digest(given, accepted) and caller is None:
                caller = name
        if caller is None:
            raise UnauthenticatedError("the bearer token is not accepted")
        return caller


class AuditLog:
    """Writes one JSON line per RPC to the ``smartpath.audit`` logger."""

    def __init__(self, service: str, key: bytes | None = None) -> None:
        self.service = service
        if key is None:
            logger.warning(
                "serve.audit_key is not set: slide hashes in the audit log are keyed per "
                "process and cannot be linked across replicas or restarts"
            )
        self._key = key or secrets.token_bytes(32)

    def slide_hash(self, uri: str) -> str:
        """A keyed hash of a slide reference (the same slide gives the same hash)."""
        return hmac.new(self._key, uri.encode(), hashlib.sha256).hexdigest()[:24]

    def record(
        self, *, rpc: str, caller: str, slide: str | None, code: str, request_id: str
    ) -> None:
        """Log one call's outcome."""
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "service": self.service,
            "rpc": rpc,
            "caller": caller,
            "slide": self.slide_hash(slide) if slide else None,
            "code": code,
            "request_id": request_id,
        }
        audit_logger.info(json.dumps(entry, sort_keys=True))
