"""The SmartPath analysis pipeline as a KServe ``kserve.Model`` (Open Inference Protocol v2).

This is what a KServe ``InferenceService`` custom-predictor container runs
(``python -m smartpath.services.kserve_adapter --config smartpath.yaml``): the whole pipeline
in one process (:func:`~smartpath.services.local.local_pipeline`) behind KServe's own
``ModelServer``, so generic OIP v2 clients (``kserve.InferenceGRPCClient``, Triton clients,
``/v2/models/smartpath/infer`` over REST) can ask SmartPath about an image or a slide.

Inputs (all BYTES): ``image`` [1] (PNG/JPEG) or ``slide_uri`` [1] (``s3://bucket/key`` or a
local path under ``tiling.local_slide_roots``); ``task`` [1], one of :data:`TASKS`; optional
``prompt`` [1], ``labels`` [n], ``options`` [n]. Outputs (all BYTES [1]): ``analysis``, the
``smartpath.v1.Analysis`` as proto3 JSON; ``label`` and ``answer``, copied from it.

Callers authenticate as on every SmartPath service (``authorization: Bearer <token>`` header
or metadata, the tokens of ``serve.auth_token_file``; UNAUTHENTICATED / HTTP 401 otherwise),
and every prediction leaves an audit record; health and metadata endpoints stay open.

Bad input raises kserve's ``InvalidInput`` (gRPC INVALID_ARGUMENT, HTTP 400). Other
:class:`~smartpath.core.errors.SmartPathError` subclasses keep their gRPC status (as a
``grpc_interceptor`` ``GrpcException``, which KServe's gRPC interceptor passes through;
:func:`main` maps it to an HTTP status for REST). Anything else is INTERNAL with a reference
id only; stack traces stay in the server log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import grpc
from google.protobuf.json_format import MessageToJson
from grpc_interceptor.exceptions import GrpcException

from smartpath.core.config import SmartPathConfig, load_config
from smartpath.core.errors import InvalidArgumentError, SmartPathError
from smartpath.model.mllm import SmartPathModel
from smartpath.services.gateway.pipeline import Pipeline
from smartpath.services.grpc_util import UNAUTHENTICATED, RpcGuard, status_code
from smartpath.services.local import LocalBackends, local_pipeline
from smartpath.v1 import common_pb2, pathology_pb2

# kserve.model_server parses sys.argv when imported (argparse with prefix matching: our
# ``--config F`` would be read as its ``--configure_logging F`` and exit), so hide the command
# line from it. kserve's own CLI flags are therefore not read; main() has its own.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv

logger = logging.getLogger("smartpath.kserve")

MODEL_NAME = "smartpath"
TASKS: dict[str, int] = {
    "classification": common_pb2.TASK_CLASSIFICATION,
    "detection": common_pb2.TASK_DETECTION,
    "segmentation": common_pb2.TASK_SEGMENTATION,
    "vqa": common_pb2.TASK_VQA,
}
INPUTS = ("image", "slide_uri", "task", "prompt", "labels", "options")
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}


class StatusError(GrpcException):
    """A SmartPath error with its gRPC status, as KServe's gRPC interceptor passes it on."""


def _values(request: InferRequest, name: str, *, single: bool) -> list[bytes] | None:
    """The BYTES elements of input ``name`` (None when absent); InvalidInput when malformed."""
    tensor: InferInput | None = request.get_input_by_name(name)
    if tensor is None:
        return None
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input '{name}' must be BYTES, got {tensor.datatype}")
    shape = list(tensor.shape)
    if len(shape) != 1 or (single and shape[0] != 1):
        want = "[1]" if single else "[n]"
        raise InvalidInput(f"input '{name}' must have shape {want}, got {shape}")
    try:
        values = tensor.as_numpy().reshape(-1).tolist()
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"input '{name}' does not match its shape {shape}") from e
    return [v if isinstance(v, bytes) else str(v).encode() for v in values]


def _text(request: InferRequest, name: str) -> str:
    values = _values(request, name, single=True)
    if values is None:
        return ""
    try:
        return values[0].decode()
    except UnicodeDecodeError as e:
        raise InvalidInput(f"input '{name}' must be UTF-8 text") from e


def _texts(request: InferRequest, name: str) -> list[str]:
    try:
        return [v.decode() for v in _values(request, name, single=False) or []]
    except UnicodeDecodeError as e:
        raise InvalidInput(f"input '{name}' must be UTF-8 text") from e


def _bytes_output(name: str, value: str) -> InferOutput:
    return InferOutput(name=name, shape=[1], datatype="BYTES", data=[value])


class SmartPathKServeModel(kserve.Model):
    """SmartPath behind KServe: ``load()`` builds the in-process pipeline from ``config``;
    ``predict()`` answers one OIP v2 request (inputs and outputs: see the module docstring)."""

    def __init__(
        self,
        config: SmartPathConfig,
        name: str = MODEL_NAME,
        model: SmartPathModel | None = None,
    ) -> None:
        super().__init__(name)
        self.config = config
        self.guard = RpcGuard.from_config(config, "kserve")
        self._model = model
        self.pipeline: Pipeline | None = None
        self.backends: LocalBackends | None = None

    def load(self) -> bool:
        self.pipeline, self.backends = local_pipeline(self.config, self._model)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.backends is not None:
            self.backends.close()
        self.pipeline = self.backends = None
        self.ready = False

    async def predict(
        self,
        payload: InferRequest | dict[str, Any],
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        caller, slide = UNAUTHENTICATED, common_pb2.SlideRef()
        try:
            try:  # first of all: who is asking
                caller = self.guard.caller(_Metadata(headers))
            except SmartPathError as e:
                raise StatusError(str(e), status_code(e)) from None
            if not isinstance(payload, InferRequest):
                raise InvalidInput(
                    "send an Open Inference Protocol v2 request (/v2/models/…/infer)"
                )
            slide.uri = _text(payload, "slide_uri")
            if self.pipeline is None:
                raise StatusError("the model is not loaded", grpc.StatusCode.UNAVAILABLE)
            analysis = await self._analyze(payload, headers)
        except Exception as e:
            code = (
                e.status_code if isinstance(e, GrpcException) else grpc.StatusCode.INVALID_ARGUMENT
            )
            self.guard.record("predict", _audited(slide), caller, code)
            raise
        self.guard.record("predict", _audited(slide), caller, grpc.StatusCode.OK)
        outputs = [
            _bytes_output("analysis", MessageToJson(analysis, indent=None)),
            _bytes_output("label", analysis.label),
            _bytes_output("answer", analysis.answer),
        ]
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
        )

    def _question(self, request: InferRequest) -> pathology_pb2.Question:
        unknown = sorted({t.name for t in request.inputs} - set(INPUTS))
        if unknown:
            raise InvalidInput(f"unknown inputs {unknown}; expected some of {list(INPUTS)}")
        task = _text(request, "task")
        if task not in TASKS:
            raise InvalidInput(f"input 'task' must be one of {list(TASKS)}, got {task[:40]!r}")
        return pathology_pb2.Question(
            task=TASKS[task],
            prompt=_text(request, "prompt"),
            labels=_texts(request, "labels"),
            options=_texts(request, "options"),
        )

    async def _analyze(
        self, request: InferRequest, headers: dict[str, str]
    ) -> pathology_pb2.Analysis:
        assert self.pipeline is not None
        question = self._question(request)
        image = _values(request, "image", single=True)
        uri = _text(request, "slide_uri")
        if (image is None) == (not uri):
            raise InvalidInput("send exactly one of the inputs 'image' and 'slide_uri'")
        if image is not None and not image[0]:
            raise InvalidInput("input 'image' is empty; send PNG or JPEG bytes")
        request_id = request.id or headers.get("x-request-id", "")
        try:
            if image is not None:
                region = pathology_pb2.AnalyzeRegionRequest(image=image[0], question=question)
                return await self.pipeline.analyze_region(region, request_id=request_id)
            slide = pathology_pb2.AnalyzeSlideRequest(
                slide=common_pb2.SlideRef(uri=uri), question=question
            )
            analysis = None
            async for event in self.pipeline.analyze_slide(slide, request_id=request_id):
                if event.HasField("analysis"):
                    analysis = event.analysis
            assert analysis is not None
            return analysis
        except InvalidArgumentError as e:
            raise InvalidInput(str(e)) from None
        except SmartPathError as e:
            logger.info("request %s failed: %s", request_id, e.code)
            raise StatusError(str(e), status_code(e)) from None
        except Exception as e:
            ref = uuid.uuid4().hex[:12]
            logger.error("request %s internal error reference=%s", request_id, ref, exc_info=e)
            raise StatusError(
                f"internal error (reference {ref})", grpc.StatusCode.INTERNAL
            ) from None


def _audited(slide: common_pb2.SlideRef) -> pathology_pb2.AnalyzeSlideRequest:
    """A request naming the predicted slide (if any), as the audit log reads requests."""
    return pathology_pb2.AnalyzeSlideRequest(slide=slide)


class _Metadata:
    """Request headers where the guard expects a gRPC context's metadata."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.headers.items())


def _install_rest_handler() -> None:
    """Answer :class:`StatusError` on REST with the matching HTTP status (KServe would say 500)."""
    from fastapi.responses import JSONResponse
    from kserve import model_server

    async def handler(_: Any, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StatusError)
        status = _HTTP_STATUS.get(exc.status_code, HTTPStatus.INTERNAL_SERVER_ERROR)
        return JSONResponse(status_code=status, content={"error": exc.details})

    model_server.app.add_exception_handler(StatusError, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve :class:`SmartPathKServeModel` with ``kserve.ModelServer`` until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m smartpath.services.kserve_adapter",
        description="Serve SmartPath over the Open Inference Protocol v2 (KServe ModelServer).",
    )
    parser.add_argument("--config", help="SmartPath YAML config (env overrides apply)")
    parser.add_argument("--grpc-port", type=int, help="OIP v2 gRPC port (default serve.grpc_port)")
    parser.add_argument("--http-port", type=int, help="OIP v2 REST port (default serve.http_port)")
    parser.add_argument("--model-name", default=MODEL_NAME, help="model name on the endpoints")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    # As the CLI does; ModelServer configures only the kserve and uvicorn loggers.
    logging.basicConfig(level=config.log_level, format="%(levelname)s %(name)s: %(message)s")
    model = SmartPathKServeModel(config, name=args.model_name)
    model.load()
    _install_rest_handler()
    server = kserve.ModelServer(
        grpc_port=args.grpc_port or config.serve.grpc_port,
        http_port=args.http_port or config.serve.http_port,
    )
    server.start([model])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
