"""Service fixtures: synthetic slides written once, and one Ray Serve instance per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from smartpath.core.config import SmartPathConfig, StorageConfig, load_config
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, free_port

API_TOKEN = "test-token-4f1c"


@pytest.fixture(scope="session")
def service_config(
    s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory, slides_dir: Path, openslide_fixtures
) -> SmartPathConfig:
    """Config of the session's Serve instance: S3 on loopback, small cache, fixed ports."""
    root = tmp_path_factory.mktemp("service")
    tokens = root / "tokens"
    tokens.write_text(f"# accepted bearer tokens\n{API_TOKEN}\nanother-token\n")
    small = {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    return load_config(
        storage=StorageConfig(
            endpoint=s3_endpoint,
            access_key=S3_ACCESS_KEY,
            secret_key=S3_SECRET_KEY,
            region="us-east-1",
            retries=1,
            backoff_s=0.05,
            timeout_s=5,
        ),
        slide_cache={"dir": root / "cache", "max_bytes": 512 * 1024 * 1024},
        tiling={"local_slide_roots": [slides_dir, openslide_fixtures], "batch_size": 16},
        serve={
            "grpc_port": free_port(),
            "http_port": free_port(),
            "tiler": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            "encoder": small,
            "router": small,
            "decoder": {**small, "max_ongoing_requests": 16},
            # A small gateway queue, so 64 concurrent calls meet backpressure.
            "gateway": {**small, "max_ongoing_requests": 8, "max_queued_requests": 8},
            "auth_token_file": tokens,
        },
        model={"features_bucket": "features"},
    )


@pytest.fixture(scope="session")
def serve_instance(service_config: SmartPathConfig, ray_session: None) -> Iterator[SmartPathConfig]:
    """Serve with the SmartPath applications on the session's Ray, once per session."""
    from smartpath.services import serving

    serving.start(service_config)
    serving.deploy(service_config)
    yield service_config
    serving.shutdown()


@pytest.fixture(scope="session")
def grpc_channel(serve_instance: SmartPathConfig) -> Iterator[grpc.Channel]:
    """A plain gRPC channel to the Serve proxy."""
    channel = grpc.insecure_channel(
        f"127.0.0.1:{serve_instance.serve.grpc_port}",
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    grpc.channel_ready_future(channel).result(timeout=30)
    yield channel
    channel.close()
