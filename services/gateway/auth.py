"""Optional bearer-token check on the Pathology service.

Tokens come from a mounted file (a Kubernetes Secret), one per line; blank lines and
``#`` comments are ignored. The file is re-read when it changes, so rotating the Secret
needs no restart. Callers send ``authorization: Bearer <token>`` metadata.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from smartpath.core.errors import UnauthenticatedError, UnavailableError

logger = logging.getLogger("smartpath.auth")


class TokenCheck:
    """Accepts a request when its bearer token is one of the file's tokens."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._tokens: tuple[bytes, ...] = ()

    def _current(self) -> tuple[bytes, ...]:
        try:
            st = self.path.stat()
        except OSError:
            logger.error("auth token file is missing or unreadable")
            raise UnavailableError("authentication is not configured correctly") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                lines = self.path.read_text().splitlines()
                self._tokens = tuple(
                    line.strip().encode()
                    for line in lines
                    if line.strip() and not line.lstrip().startswith("#")
                )
                self._stamp = stamp
            return self._tokens

    def check(self, metadata: Iterable[tuple[str, str]]) -> None:
        """Raise UNAUTHENTICATED unless the metadata carries an accepted bearer token."""
        header = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if header is None:
            raise UnauthenticatedError("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
        given = token.strip().encode()
        # Compare against every token so timing does not reveal which one nearly matched.
        ok = False
        for accepted in self._current():
            ok |= hmac.compare_digest(given, accepted)
        if not ok:
            raise UnauthenticatedError("the bearer token is not accepted")
