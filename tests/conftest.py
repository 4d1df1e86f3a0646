"""Session-wide fixtures: one real S3 server on loopback (moto_server) and shared paths.

Ray is started once per session (``ray_session``; Serve and the training tests share it) because
start-up costs seconds and the machine has two cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smartpath.core.config import StorageConfig, load_config
from smartpath.training.synthetic.slides import SyntheticSlide, write_synthetic_slide

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "openslide"
S3_ACCESS_KEY = "smartpath-test"
S3_SECRET_KEY = "smartpath-test-secret"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_process_env() -> dict[str, str]:
    """The environment of a one-rank DeepSpeed process on CPU, on a free loopback port."""
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }


def run_deepspeed_script(script: str, *args: str, cwd: Path) -> dict:
    """Run ``python -c script args`` as a one-rank DeepSpeed process on CPU; the JSON object
    its last line of output prints."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=deepspeed_process_env(),
        capture_output=True,
        text=True,
        timeout=280,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """Folder of OpenSlide's small test slides (../shared/fixtures/openslide)."""
    if not FIXTURES.is_dir():
        pytest.fail(f"missing shared fixtures at {FIXTURES}")
    return FIXTURES


@dataclass(frozen=True)
class MotoServer:
    """A running moto_server: its host:port, and a way to make it stop answering for a while."""

    endpoint: str
    process: subprocess.Popen

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The server hangs (SIGSTOP): connections open, nothing answers, as a storage outage
        looks to clients; it answers again (SIGCONT) on leaving the block."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def moto_server() -> Iterator[MotoServer]:
    """Run a real S3 API server (moto_server) on 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start within 30 s")
                time.sleep(0.1)
        yield MotoServer(f"127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """The session's S3 server."""
    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: MotoServer) -> str:
    """The session's S3 server, as host:port."""
    return s3_server.endpoint


@pytest.fixture
def s3_config(s3_endpoint: str) -> StorageConfig:
    """Storage config pointing at the session's S3 server, with fast retries."""
    return StorageConfig(
        endpoint=s3_endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        region="us-east-1",
        retries=2,
        backoff_s=0.05,
        timeout_s=5,
    )


@pytest.fixture
def bucket_name() -> str:
    """A fresh, valid bucket name per test."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the session: 4 logical CPUs on the 2 cores, so Serve's replicas and
    two Ray Train workers fit at once."""
    import ray

    from smartpath.services.serving import proxy_environment

    if not ray.is_initialized():
        os.environ.update(proxy_environment(load_config()))
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def synthetic_svs(slides_dir: Path) -> SyntheticSlide:
    """A 6144×5120 px Aperio SVS at 0.25 µm/px (40x) with 256-px JPEG tiles."""
    return write_synthetic_slide(slides_dir / "synthetic.svs", width=6144, height=5120, seed=7)


@pytest.fixture(scope="session")
def synthetic_tiff(slides_dir: Path) -> SyntheticSlide:
    """A 3000×2600 px generic tiled TIFF at 0.5 µm/px (sizes not multiples of the tile)."""
    return write_synthetic_slide(
        slides_dir / "synthetic.tiff", width=3000, height=2600, fmt="tiff", mpp=0.5, seed=3
    )


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2.5-VL-shaped tokenizer (tests/qwen_shaped.py), built once and saved."""
    from tests.qwen_shaped import qwen_tokenizer

    folder = tmp_path_factory.mktemp("qwen-tokenizer")
    qwen_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def qwen_base(
    tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path
) -> Iterator[object]:
    """``qwen_base(size, **overrides)``: the folder of a Qwen2.5-VL-shaped HF checkpoint of that
    size ("tiny", "3b", "7b"; 2 text and 2 vision layers), written once per session."""
    from transformers import AutoTokenizer

    from tests.qwen_shaped import write_qwen_base

    made: dict[tuple, Path] = {}

    def make(size: str, **overrides: object) -> Path:
        key = (size, *sorted(overrides.items()))
        if key not in made:
            tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
            folder = tmp_path_factory.mktemp(f"qwen-{size}")
            made[key] = write_qwen_base(folder, size, tokenizer=tokenizer, **overrides)
        return made[key]

    yield make
