"""Every gRPC method of every service checks the caller's token before anything else, and
every call leaves an audit record (who, which RPC, which slide as a keyed hash, outcome)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass

from smartpath.core.errors import InvalidArgumentError
from smartpath.services.auth import AuditLog
from smartpath.services.contracts import SERVICES
from smartpath.services.grpc_util import RpcGuard, unary
from smartpath.v1 import (  # noqa: F401 (importing registers the services' descriptors)
    common_pb2,
    decoding_pb2,
    encoding_pb2,
    pathology_pb2,
    routing_pb2,
    tiling_pb2,
)
from tests.services.conftest import API_TOKEN

METHODS = [
    (service, method)
    for service in SERVICES
    for method in descriptor_pool.Default().FindServiceByName(service.grpc_service).methods
]


def _call(channel: grpc.Channel, service, method, token: str | None) -> grpc.StatusCode:
    """The status of calling ``method`` with an empty request (OK if it answered)."""
    request = GetMessageClass(method.input_type)()
    response = GetMessageClass(method.output_type)
    metadata = [("application", service.app)]
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    path = f"/{service.grpc_service}/{method.name}"
    kwargs = {"request_serializer": type(request).SerializeToString,
              "response_deserializer": response.FromString}  # fmt: skip
    try:
        if method.server_streaming:
            list(channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=60))
        else:
            channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=60)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("service", "method"), METHODS, ids=[f"{s.app}.{m.name}" for s, m in METHODS]
)
def test_every_rpc_wants_an_accepted_token(grpc_channel, service, method) -> None:
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    assert _call(grpc_channel, service, method, None) == unauthenticated
    assert _call(grpc_channel, service, method, "not-" + API_TOKEN) == unauthenticated
    # With the token the call gets past authentication (an empty request is then refused
    # by validation, or answered).
    assert _call(grpc_channel, service, method, API_TOKEN) != unauthenticated


class _Context:
    """The part of a gRPC servicer context the wrappers use."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata
        self._code = grpc.StatusCode.OK

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def code(self) -> grpc.StatusCode:
        return self._code


class _Servicer:
    def __init__(self, tokens: Path, key: bytes) -> None:
        self.guard = RpcGuard("tiler", tokens, key)
        self.ran = 0

    @unary(tiling_pb2.DescribeSlideResponse)
    async def DescribeSlide(self, request):
        self.ran += 1
        if not request.slide.uri:
            raise InvalidArgumentError("slide.uri is empty")
        return tiling_pb2.DescribeSlideResponse(width=7)


def _records(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "smartpath.audit"]


def test_audit_records_who_read_which_slide(tmp_path: Path, caplog) -> None:
    import asyncio

    tokens = tmp_path / "tokens"
    tokens.write_text("pacs-gateway:s3cret\n")
    servicer = _Servicer(tokens, b"audit-key")
    uri = "s3://slides/patient-123/case.svs"
    request = tiling_pb2.DescribeSlideRequest(slide=common_pb2.SlideRef(uri=uri))
    caplog.set_level(logging.INFO, logger="smartpath.audit")

    ok = _Context([("authorization", "Bearer s3cret")])
    assert asyncio.run(servicer.DescribeSlide(request, ok)).width == 7
    refused = _Context([("authorization", "Bearer guess")])
    asyncio.run(servicer.DescribeSlide(request, refused))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert servicer.ran == 1  # the refused call never reached the method
    bad = _Context([("authorization", "Bearer s3cret")])
    asyncio.run(servicer.DescribeSlide(tiling_pb2.DescribeSlideRequest(), bad))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT

    first, second, third = _records(caplog)
    assert (first["caller"], first["rpc"], first["code"]) == ("pacs-gateway", "DescribeSlide", "OK")
    assert (second["caller"], second["code"]) == ("unauthenticated", "UNAUTHENTICATED")
    assert third["code"] == "INVALID_ARGUMENT" and third["slide"] is None
    assert first["service"] == "tiler" and first["time"].endswith("+00:00")
    # The slide is a keyed hash: the same on every record, never the URI.
    assert first["slide"] == second["slide"] == AuditLog("tiler", b"audit-key").slide_hash(uri)
    assert first["slide"] != AuditLog("tiler", b"another-key").slide_hash(uri)
    assert all("patient-123" not in json.dumps(r) for r in (first, second, third))


def test_gateway_requests_name_their_slide_for_the_audit(tmp_path: Path) -> None:
    from smartpath.services.grpc_util import _slide_uri

    region = pathology_pb2.AnalyzeRegionRequest(
        region=pathology_pb2.SlideRegion(slide=common_pb2.SlideRef(uri="s3://b/a.svs"))
    )
    assert _slide_uri(region) == "s3://b/a.svs"
    slide = pathology_pb2.AnalyzeSlideRequest(slide=common_pb2.SlideRef(uri="s3://b/c.svs"))
    assert _slide_uri(slide) == "s3://b/c.svs"
    assert _slide_uri(pathology_pb2.AnalyzeRegionRequest(image=b"png")) is None
