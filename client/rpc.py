"""A small typed client of SmartPath's gRPC API, used by the CLI, the demo and the tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
import numpy as np

from smartpath.v1 import common_pb2, pathology_pb2, pathology_pb2_grpc, tiling_pb2, tiling_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def tile_spec(
    mpp: float | None = None,
    magnification: float | None = None,
    tile_size: int = 0,
    overlap: int = 0,
    min_tissue_fraction: float | None = None,
) -> tiling_pb2.TileSpec:
    """A TileSpec message; unset values take the server's defaults."""
    spec = tiling_pb2.TileSpec(tile_size=tile_size, overlap=overlap)
    if mpp is not None:
        spec.resolution.mpp = mpp
    elif magnification is not None:
        spec.resolution.magnification = magnification
    if min_tissue_fraction is not None:
        spec.min_tissue_fraction = min_tissue_fraction
    return spec


@dataclass(frozen=True)
class Tls:
    """TLS of a channel: ``ca_file`` is a PEM bundle of trusted roots (None: the system roots
    grpc uses); ``server_name`` overrides the name the server's certificate must carry (for a
    certificate whose name differs from the dialled host, e.g. when dialling an IP)."""

    ca_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials; a ValueError names a CA file that cannot be read or is not PEM."""
        roots = None
        if self.ca_file is not None:
            try:
                roots = Path(self.ca_file).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read CA file {self.ca_file}: {e.strerror or e}") from None
            if b"-----BEGIN CERTIFICATE-----" not in roots:
                raise ValueError(f"CA file {self.ca_file} holds no PEM certificate")
        return grpc.ssl_channel_credentials(root_certificates=roots)


def is_loopback(address: str) -> bool:
    """Whether a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``, ``unix:``)
    is this host."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address.split("///", 1)[-1] if "://" in address else address
    target = target.removeprefix("ipv4:").removeprefix("ipv6:")
    if target.startswith("["):
        host = target[1 : target.find("]")]
    elif target.count(":") == 1:
        host = target.rsplit(":", 1)[0]
    else:
        host = target
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _channel(address: str, tls: Tls | None = None) -> grpc.Channel:
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.credentials(), options=options)


def question(
    task: str | int,
    prompt: str = "",
    labels: Sequence[str] = (),
    options: Sequence[str] = (),
    max_new_tokens: int = 0,
    *,
    constrained: bool = True,
) -> pathology_pb2.Question:
    """A Question message; ``task`` is a name ("vqa") or a ``smartpath.v1.Task`` value.
    ``constrained=False`` asks for free text instead of an answer within the task's grammar."""
    if isinstance(task, str):
        task = common_pb2.Task.Value(f"TASK_{task.upper()}")
    return pathology_pb2.Question(
        task=task,
        prompt=prompt,
        labels=list(labels),
        options=list(options),
        max_new_tokens=max_new_tokens,
        unconstrained=not constrained,
    )


class _Client:
    """A channel to a Serve gRPC proxy with the metadata every call sends: the Serve
    ``application`` and, when given, the bearer token every service checks."""

    def __init__(
        self, address: str, application: str | None, token: str | None, tls: Tls | None
    ) -> None:
        self.channel = _channel(address, tls)
        metadata = [("application", application)] if application else []
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        self.metadata = tuple(metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PathologyClient(_Client):
    """Calls ``smartpath.v1.Pathology`` on a Serve gRPC proxy (the gateway application);
    ``tls`` dials with TLS (e.g. an ingress at ``host:443``), else the channel is plaintext."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        timeout_s: float = 300,
        tls: Tls | None = None,
    ) -> None:
        super().__init__(address, "gateway", token, tls)
        self.stub = pathology_pb2_grpc.PathologyStub(self.channel)
        self.timeout_s = timeout_s

    def model_info(self) -> pathology_pb2.GetModelInfoResponse:
        """GetModelInfo."""
        request = pathology_pb2.GetModelInfoRequest()
        return self.stub.GetModelInfo(request, metadata=self.metadata, timeout=self.timeout_s)

    def analyze_image(self, image: bytes, q: pathology_pb2.Question) -> pathology_pb2.Analysis:
        """AnalyzeRegion on PNG/JPEG bytes."""
        request = pathology_pb2.AnalyzeRegionRequest(image=image, question=q)
        return self.analyze_region(request)

    def analyze_region(self, request: pathology_pb2.AnalyzeRegionRequest) -> pathology_pb2.Analysis:
        """AnalyzeRegion."""
        response = self.stub.AnalyzeRegion(request, metadata=self.metadata, timeout=self.timeout_s)
        return response.analysis

    def analyze_slide(
        self,
        uri: str,
        q: pathology_pb2.Question,
        *,
        mpp_override: float = 0.0,
        on_progress: Callable[[pathology_pb2.Progress], None] | None = None,
    ) -> pathology_pb2.Analysis:
        """AnalyzeSlide; progress events go to ``on_progress``, the analysis is returned."""
        request = slide_request(uri, q, mpp_override)
        stream = self.stub.AnalyzeSlide(request, metadata=self.metadata, timeout=self.timeout_s)
        for event in stream:
            if (analysis := slide_event(event, on_progress)) is not None:
                return analysis
        raise RuntimeError("AnalyzeSlide ended without an analysis")


def slide_request(
    uri: str, q: pathology_pb2.Question, mpp_override: float = 0.0
) -> pathology_pb2.AnalyzeSlideRequest:
    """An AnalyzeSlideRequest message."""
    slide = common_pb2.SlideRef(uri=uri, mpp_override=mpp_override)
    return pathology_pb2.AnalyzeSlideRequest(slide=slide, question=q)


def slide_event(
    event: pathology_pb2.AnalyzeSlideResponse,
    on_progress: Callable[[pathology_pb2.Progress], None] | None,
) -> pathology_pb2.Analysis | None:
    """The analysis an AnalyzeSlide event carries, else None after passing on its progress."""
    if event.HasField("analysis"):
        return event.analysis
    if on_progress is not None:
        on_progress(event.progress)
    return None


class TilerClient(_Client):
    """Calls ``smartpath.v1.SlideTiler`` on a Serve gRPC proxy; ``token`` and ``tls`` as in
    PathologyClient (every service checks the same tokens)."""

    def __init__(
        self,
        address: str,
        application: str | None = "tiler",
        timeout_s: float = 120,
        *,
        token: str | None = None,
        tls: Tls | None = None,
    ) -> None:
        super().__init__(address, application, token, tls)
        self.stub = tiling_pb2_grpc.SlideTilerStub(self.channel)
        self.timeout_s = timeout_s

    def describe(
        self, uri: str, *, mpp_override: float = 0.0, thumbnail_max_px: int = 0
    ) -> tiling_pb2.DescribeSlideResponse:
        """DescribeSlide."""
        request = tiling_pb2.DescribeSlideRequest(
            slide=common_pb2.SlideRef(uri=uri, mpp_override=mpp_override),
            thumbnail_max_px=thumbnail_max_px,
        )
        return self.stub.DescribeSlide(request, metadata=self.metadata, timeout=self.timeout_s)

    def plan(
        self,
        uri: str,
        spec: tiling_pb2.TileSpec | None = None,
        *,
        mpp_override: float = 0.0,
        include_tissue_mask: bool = False,
    ) -> tiling_pb2.PlanTilesResponse:
        """PlanTiles."""
        request = tiling_pb2.PlanTilesRequest(
            slide=common_pb2.SlideRef(uri=uri, mpp_override=mpp_override),
            spec=spec or tiling_pb2.TileSpec(),
            include_tissue_mask=include_tissue_mask,
        )
        return self.stub.PlanTiles(request, metadata=self.metadata, timeout=self.timeout_s)

    def read_tiles(
        self,
        uri: str,
        spec: tiling_pb2.TileSpec | None = None,
        tiles: Sequence[tiling_pb2.Tile] = (),
        *,
        mpp_override: float = 0.0,
        batch_size: int = 0,
    ) -> Iterator[tuple[tiling_pb2.ReadTilesResponse, np.ndarray]]:
        """ReadTiles as raw RGB: yields (response, (n, S, S, 3) uint8 pixels) per batch."""
        request = tiling_pb2.ReadTilesRequest(
            slide=common_pb2.SlideRef(uri=uri, mpp_override=mpp_override),
            spec=spec or tiling_pb2.TileSpec(),
            tiles=list(tiles),
            batch_size=batch_size,
            encoding=tiling_pb2.TILE_ENCODING_RAW_RGB,
        )
        stream = self.stub.ReadTiles(request, metadata=self.metadata, timeout=self.timeout_s)
        for response in stream:
            s = response.tile_size
            pixels = np.frombuffer(response.pixels, dtype=np.uint8).reshape(-1, s, s, 3)
            yield response, pixels
