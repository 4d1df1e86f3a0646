"""Domain errors, each carrying the gRPC status code it means (see DESIGN.md, Conventions).

Library code raises these; the gRPC layer turns them into status codes with the message as
details. Messages say what was received and how to fix it, and never hold a stack trace,
a slide name or patient data beyond what the caller sent.
"""

from __future__ import annotations

import grpc


class SmartPathError(Exception):
    """Base of every error the services report to callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(SmartPathError, ValueError):
    """Bad input: malformed request, unreadable or non-slide file."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SmartPathError, LookupError):
    """No such slide, bucket or object."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(SmartPathError):
    """Valid request, but the system cannot serve it as is (e.g. a slide without MPP)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDeniedError(SmartPathError, PermissionError):
    """Storage refused access (bad credentials or policy)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(SmartPathError):
    """A dependency (object storage) is down or unreachable after retries."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(SmartPathError):
    """A queue or budget is full; the caller should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(SmartPathError, TimeoutError):
    """The request ran past its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(SmartPathError):
    """Missing or wrong credentials on a protected service."""

    code = grpc.StatusCode.UNAUTHENTICATED
