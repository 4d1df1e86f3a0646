"""Domain errors, each carrying the gRPC status code it means (see DESIGN.md, Conventions).

Library code raises these; the gRPC layer turns them into status codes
(``smartpath.services.grpc_util.status_code``; an error names its code, so the core does not
import grpc) with the message as details. Messages say what was received and how to fix it,
and never hold a stack trace, a slide name or patient data beyond what the caller sent.
"""

from __future__ import annotations


class SmartPathError(Exception):
    """Base of every error the services report to callers."""

    code: str = "INTERNAL"  # the name of its grpc.StatusCode


class InvalidArgumentError(SmartPathError, ValueError):
    """Bad input: malformed request, unreadable or non-slide file."""

    code = "INVALID_ARGUMENT"


class NotFoundError(SmartPathError, LookupError):
    """No such slide, bucket or object."""

    code = "NOT_FOUND"


class FailedPreconditionError(SmartPathError):
    """Valid request, but the system cannot serve it as is (e.g. a slide without MPP)."""

    code = "FAILED_PRECONDITION"


class PermissionDeniedError(SmartPathError, PermissionError):
    """Storage refused access (bad credentials or policy)."""

    code = "PERMISSION_DENIED"


class UnavailableError(SmartPathError):
    """A dependency (object storage) is down or unreachable after retries."""

    code = "UNAVAILABLE"


class ResourceExhaustedError(SmartPathError):
    """A queue or budget is full; the caller should back off and retry."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(SmartPathError, TimeoutError):
    """The request ran past its deadline."""

    code = "DEADLINE_EXCEEDED"


class UnauthenticatedError(SmartPathError):
    """Missing or wrong credentials on a protected service."""

    code = "UNAUTHENTICATED"
