"""gRPC plumbing shared by every SmartPath deployment behind Ray Serve's gRPC proxy.

- ``unary`` / ``server_stream`` wrap deployment methods so that domain errors become their
  status code with a plain message, and anything else becomes INTERNAL with only a reference
  id (the stack trace goes to the server log, never to the client). Each outcome is passed
  to the servicer's ``record_rpc(method, code)`` when it has one (Prometheus counters).
- Every wrapped method first authenticates its caller through the servicer's ``guard``
  (:class:`RpcGuard`: the token file of :mod:`smartpath.services.auth`) and ends with one
  audit record, refused calls included.
- ``log_to_replica`` sends the ``smartpath`` loggers to the replica's Serve log, where every
  line of a request carries its request id: what error details leave out (server paths,
  storage facts) is logged there by the code that left it out.
- ``add_health_servicer`` puts a standard ``grpc.health.v1.Health`` on the proxy itself as a
  passthrough service: generic clients and Kubernetes probes send no ``application``
  metadata, which the proxy would need to route to a replica.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import ResourceExhaustedError, SmartPathError, UnavailableError
from smartpath.services.auth import ANONYMOUS, AuditLog, TokenCheck
from smartpath.services.contracts import SERVICE_OF_APP

logger = logging.getLogger("smartpath.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")

HEALTH_POLL_S = 2.0
UNAUTHENTICATED = "unauthenticated"  # the audit log's caller of a refused call


class RpcCounter:
    """Counts RPC outcomes by method and status code as ``smartpath_<service>_rpcs``; a
    deployment sets one as its ``record_rpc`` (what the wrappers below call)."""

    def __init__(self, service: str) -> None:
        from ray.serve import metrics

        self._counter = metrics.Counter(
            f"smartpath_{service}_rpcs",
            description=f"{service} RPCs by method and gRPC status code.",
            tag_keys=("method", "code"),
        )

    def __call__(self, method: str, code: grpc.StatusCode) -> None:
        self._counter.inc(tags={"method": method, "code": code.name})


class _ToServeLog(logging.Handler):
    """Hands records to the replica's Serve logger, whose handlers write the replica's log
    file and tag each line with the current request id."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray.serve").handle(record)


def log_to_replica(config: SmartPathConfig) -> None:
    """In a Serve replica, write the ``smartpath`` loggers (the server-side detail of errors,
    RPC outcomes, the audit) to the replica's log at ``log_level``; elsewhere do nothing."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:  # not in a replica (tests, the KServe adapter)
        return
    ours = logging.getLogger("smartpath")
    if not any(isinstance(h, _ToServeLog) for h in ours.handlers):
        ours.addHandler(_ToServeLog())
    ours.setLevel(config.log_level)
    ours.propagate = False


class RpcGuard:
    """Authentication and audit of one deployment's gRPC methods (a servicer's ``guard``)."""

    def __init__(self, service: str, tokens: Path | None, audit_key: bytes | None) -> None:
        self.auth = TokenCheck(tokens) if tokens is not None else None
        self.audit = AuditLog(service, audit_key)

    @classmethod
    def from_config(cls, config: SmartPathConfig, service: str) -> RpcGuard:
        """The guard of ``service`` from ``serve.auth_token_file`` and ``serve.audit_key``."""
        key = config.serve.audit_key
        return cls(service, config.serve.auth_token_file, key and key.get_secret_value().encode())

    def caller(self, context: Any) -> str:
        """The authenticated caller's name (UNAUTHENTICATED otherwise)."""
        if self.auth is None:
            return ANONYMOUS
        return self.auth.check(context.invocation_metadata() if context is not None else ())

    def record(self, rpc: str, request: Any, caller: str, code: grpc.StatusCode) -> None:
        """The audit record of one call."""
        self.audit.record(
            rpc=rpc, caller=caller, slide=_slide_uri(request), code=code.name, request_id=_rid()
        )


def _slide_uri(request: Any) -> str | None:
    """The slide a request names (``slide.uri`` or ``region.slide.uri``), if any."""
    for path in (("slide",), ("region", "slide")):
        message = request
        for field in path:
            fields = getattr(message, "DESCRIPTOR", None)
            if fields is None or field not in fields.fields_by_name:
                break
            message = getattr(message, field)
        else:
            return getattr(message, "uri", None) or None
    return None


def _rid() -> str:
    from ray.serve import context as serve_context

    try:
        return serve_context._get_serve_request_context().request_id or ""
    except Exception:  # outside a replica
        return ""


def _caller(self: Any, grpc_context: Any) -> str:
    """Authenticate a call before anything else runs; the caller's name."""
    guard = getattr(self, "guard", None)
    return guard.caller(grpc_context) if guard is not None else ANONYMOUS


def _outcome(self: Any, name: str, request: Any, caller: str, code: grpc.StatusCode) -> None:
    """A call's end: its Prometheus count and its audit record."""
    record = getattr(self, "record_rpc", None)
    if record is not None:
        record(name, code)
    guard = getattr(self, "guard", None)
    if guard is not None:
        guard.record(name, request, caller, code)


class RpcFailed(Exception):
    """Ends a failed server stream after its status was set on the context."""


def _redact(details: str) -> str:
    """Blank quoted caller input ('…'): Serve logs a failed stream's details."""
    return re.sub(r"'[^']*'", "'…'", details)


LOST_REPLICA = "a service replica was lost; retry"


def _replica_lost() -> tuple[type[BaseException], ...]:
    """Ray's and Serve's errors for a replica (or its worker process, or its node) that died or
    cannot be reached: the callee is gone, not wrong, so the call may succeed when retried."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    return (
        ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
        ray_errors.LocalRayletDiedError,
        ray_errors.ObjectLostError,  # a result held by a lost worker
        ray_errors.OutOfMemoryError,  # Ray killed the worker to save its node
        serve_errors.DeploymentUnavailableError,
        serve_errors.ReplicaUnavailableError,
    )


def domain_error(error: BaseException) -> BaseException:
    """The error a caller should see: errors from other replicas arrive wrapped in Ray's
    RayTaskError (whose text holds the remote stack trace), a full deployment queue is Serve's
    BackPressureError, and a lost replica (killed, crashed, its node gone) is UNAVAILABLE: a
    retry reaches the replica Serve starts in its place."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    if isinstance(error, BackPressureError):
        return ResourceExhaustedError("the service is at capacity; retry with backoff")
    if isinstance(error, _replica_lost()):
        logger.warning("a replica was lost mid-call: %s", type(error).__name__)
        return UnavailableError(LOST_REPLICA)
    return error


def status_code(error: SmartPathError) -> grpc.StatusCode:
    """The gRPC status code a domain error names."""
    return grpc.StatusCode[error.code]


def _report(context: Any, error: BaseException, method: str, *, redact: bool = False) -> None:
    """Set the status for ``error`` on the context; log the message with quoted caller input
    (slide names) blanked, or the stack trace of a bug."""
    error = domain_error(error)
    if isinstance(error, SmartPathError):
        code, details = status_code(error), str(error)
        logger.info("rpc %s failed: %s: %s", method, code.name, _redact(details))
    else:
        ref = uuid.uuid4().hex[:12]
        code, details = grpc.StatusCode.INTERNAL, f"internal error (reference {ref})"
        logger.error("rpc %s internal error reference=%s", method, ref, exc_info=error)
    if context is None:  # called outside the gRPC proxy (tests, direct calls)
        raise error
    context.set_code(code)
    context.set_details(_redact(details) if redact else details)


def unary(
    response_type: Callable[[], Resp],
) -> Callable[[Callable[[Any, Req], Awaitable[Resp]]], Callable[..., Awaitable[Resp]]]:
    """Wrap ``async def Method(self, request) -> response_type`` as a Serve gRPC method."""

    def wrap(fn: Callable[..., Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
        wants_context = _wants_context(fn)

        async def method(self: Any, request: Req, grpc_context: Any = None) -> Resp:
            caller = UNAUTHENTICATED
            try:
                caller = _caller(self, grpc_context)
                args = (grpc_context,) if wants_context else ()
                response = await fn(self, request, *args)
            except Exception as e:
                # Returning (not raising) with the code set keeps Serve from logging a stack
                # trace for every bad request; the proxy sends the code and details.
                _report(grpc_context, e, fn.__name__)
                _outcome(self, fn.__name__, request, caller, grpc_context.code())
                return response_type()
            _outcome(self, fn.__name__, request, caller, grpc.StatusCode.OK)
            return response

        return _named(method, fn)

    return wrap


def server_stream(fn: Callable[..., AsyncIterator[Resp]]) -> Callable[..., AsyncIterator[Resp]]:
    """Wrap ``async def Method(self, request)`` yielding responses as a streaming method."""

    wants_context = _wants_context(fn)

    async def method(self: Any, request: Req, grpc_context: Any = None) -> AsyncIterator[Resp]:
        caller = UNAUTHENTICATED
        try:
            caller = _caller(self, grpc_context)
            args = (grpc_context,) if wants_context else ()
            async for response in fn(self, request, *args):
                yield response
        except Exception as e:
            _report(grpc_context, e, fn.__name__, redact=True)
            _outcome(self, fn.__name__, request, caller, grpc_context.code())
            # A stream that ends without yielding never carries the context back to the
            # proxy, so raise; the proxy prefers the details set on the context.
            raise RpcFailed(grpc_context.code().name) from None
        _outcome(self, fn.__name__, request, caller, grpc.StatusCode.OK)

    return _named(method, fn)


def _wants_context(fn: Callable[..., Any]) -> bool:
    """Methods declaring a ``context`` parameter get the gRPC context (metadata, peer)."""
    return "context" in inspect.signature(fn).parameters


def _named(method: Any, fn: Callable[..., Any]) -> Any:
    # Not functools.wraps: Serve reads inspect.signature(), which would follow __wrapped__
    # and miss the grpc_context parameter that makes Serve pass the context in.
    method.__name__, method.__qualname__, method.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return method


class ServeHealthServicer(health.aio.HealthServicer):
    """``grpc.health.v1`` answered by the proxy from Serve's application status.

    Service "" is SERVING when every SmartPath application deployed is RUNNING; a service
    name (e.g. ``smartpath.v1.SlideTiler``) is SERVING when its application is RUNNING;
    services not deployed are NOT_FOUND.
    """

    def __init__(self, poll_s: float = HEALTH_POLL_S) -> None:
        super().__init__()
        self._poll_s = poll_s
        self._checked_at = 0.0
        self._poller: asyncio.Task[None] | None = None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        await self._refresh()
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        await self._refresh()
        await super().Watch(request, context)

    async def _poll_forever(self) -> None:
        while self._server_watchers:
            await asyncio.sleep(self._poll_s)
            await self._refresh(force=True)

    async def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._checked_at < self._poll_s:
            return
        self._checked_at = time.monotonic()
        try:
            statuses = await asyncio.to_thread(_application_statuses)
        except Exception:
            logger.warning("health: cannot read Serve status", exc_info=True)
            statuses = {}
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ours = {app: s for app, s in statuses.items() if app in SERVICE_OF_APP}
        for app, status in ours.items():
            await self.set(
                SERVICE_OF_APP[app].grpc_service, serving if status == "RUNNING" else not_serving
            )
        healthy = bool(ours) and all(s == "RUNNING" for s in ours.values())
        await self.set("", serving if healthy else not_serving)


def _application_statuses() -> dict[str, str]:
    from ray import serve

    apps = serve.status().applications
    return {name: str(getattr(app.status, "value", app.status)) for name, app in apps.items()}


NOT_RUNNING = "the SmartPath service is not running here (starting or stopping); retry"


def install_proxy_status_mapping() -> None:
    """Make Serve's gRPC proxy answer UNAVAILABLE where the service is briefly not there, not
    INTERNAL or NOT_FOUND, so that clients retry:

    - the replica holding a call was lost (the gateway SIGKILLed mid-call, its node gone):
      Serve's proxy turns any Ray error into INTERNAL with the error's text, which names actors,
      processes and node addresses; a retry reaches the replica Serve starts in its place;
    - a call names one of the SmartPath applications while it is not deployed (before it
      starts, or while ``smartpath serve`` stops): Serve answers NOT_FOUND, which tells a
      client its request is wrong. Unknown application names stay NOT_FOUND.

    Serve has no hook for either, so two of the proxy's private functions are wrapped, in the
    proxy process (``proxy.get_grpc_response_status`` and ``gRPCProxy.not_found_response``);
    tests/services/test_faults.py checks that both still exist as called here. Idempotent.
    """
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    status_of = proxy.get_grpc_response_status
    if getattr(status_of, "smartpath_wrapped", False):
        return
    not_found = proxy.gRPCProxy.not_found_response

    def status(exc: BaseException, request_timeout_s: float | None, request_id: str) -> Any:
        if isinstance(exc, _replica_lost()):
            logger.warning("rpc %s: a replica was lost: %s", request_id, type(exc).__name__)
            return ResponseStatus(
                code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=LOST_REPLICA
            )
        return status_of(exc, request_timeout_s, request_id)

    async def not_deployed(self: Any, proxy_request: Any) -> AsyncIterator[Any]:
        if getattr(proxy_request, "app_name", None) in SERVICE_OF_APP:
            yield ResponseStatus(
                code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=NOT_RUNNING
            )
            return
        async for response in not_found(self, proxy_request):
            yield response

    status.smartpath_wrapped = True  # type: ignore[attr-defined]
    proxy.get_grpc_response_status = status
    proxy.gRPCProxy.not_found_response = not_deployed


def add_health_servicer(_servicer: Any, server: Any) -> None:
    """Register ``grpc.health.v1.Health`` on Serve's gRPC proxy (a grpc_servicer_functions entry).

    Serve passes a placeholder servicer; the real one runs in the proxy as a passthrough
    service, so it answers without ``application`` metadata. Being the one SmartPath code that
    runs in the proxy, it also installs :func:`install_proxy_status_mapping`.
    """
    from grpc_health.v1 import health_pb2_grpc

    install_proxy_status_mapping()
    if hasattr(server, "add_passthrough_service"):
        server.add_passthrough_service(health.SERVICE_NAME)
    health_pb2_grpc.add_HealthServicer_to_server(ServeHealthServicer(), server)
