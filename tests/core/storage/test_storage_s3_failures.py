"""S3Store under failure: refused credentials, unreachable or stalled endpoints, throttling,
5xx answers and connections dropped mid-download — all against real servers on loopback.

Bad credentials: a second moto_server, where IAM users and keys are created while moto still
accepts anything, then ``POST /moto-api/reset-auth 0`` switches on moto's IAM request
authentication (signature check + policy evaluation), so a wrong secret gets a genuine
``SignatureDoesNotMatch`` from the server.

Throttling/5xx/truncation: a small HTTP proxy in front of the session's moto_server that
answers the first N requests itself (503 SlowDown, 500 InternalError, or a cut-off body) and
forwards the rest, counting every request.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3  # installed with moto[server]; used only to create IAM users on the test server
import pytest

from smartpath.core.config import StorageConfig
from smartpath.core.errors import NotFoundError, PermissionDeniedError, UnavailableError
from smartpath.core.storage import ObjectRef, S3Store
from tests.conftest import free_port, moto_server

AUTH_BUCKET = "auth-bucket"
ALLOW_ALL_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


@dataclass(frozen=True)
class AuthServer:
    endpoint: str
    good: tuple[str, str]  # access key, secret key of a user allowed s3:*
    no_policy: tuple[str, str]  # valid credentials of a user without any policy

    def config(self, access_key: str, secret_key: str) -> StorageConfig:
        return StorageConfig(
            endpoint=self.endpoint,
            access_key=access_key,
            secret_key=secret_key,
            region="us-east-1",
            retries=3,
            backoff_s=0.5,
            timeout_s=5,
        )


@pytest.fixture(scope="module")
def auth_server() -> Iterator[AuthServer]:
    """A moto_server of its own that enforces IAM authentication and authorization."""
    with moto_server() as moto:
        endpoint = moto.endpoint
        url = f"http://{endpoint}"
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="writer")
        iam.put_user_policy(
            UserName="writer", PolicyName="s3-all", PolicyDocument=json.dumps(ALLOW_ALL_S3)
        )
        good = iam.create_access_key(UserName="writer")["AccessKey"]
        iam.create_user(UserName="nobody")
        weak = iam.create_access_key(UserName="nobody")["AccessKey"]
        server = AuthServer(
            endpoint=endpoint,
            good=(good["AccessKeyId"], good["SecretAccessKey"]),
            no_policy=(weak["AccessKeyId"], weak["SecretAccessKey"]),
        )
        S3Store(server.config(*server.good)).ensure_bucket(AUTH_BUCKET)
        enable = urllib.request.Request(
            f"{url}/moto-api/reset-auth",
            data=b"0",  # authenticate every request from now on
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(enable, timeout=10) as response:
            assert response.status == 200
        yield server


def test_valid_credentials_work_on_auth_server(auth_server: AuthServer) -> None:
    # The control: without it the refusals below could come from a broken server.
    store = S3Store(auth_server.config(*auth_server.good))
    ref = ObjectRef(AUTH_BUCKET, "ok.bin")
    store.put_bytes(ref, b"fine")
    assert store.get_bytes(ref) == b"fine"
    assert store.stat(ref).size == 4
    assert [i.key for i in store.list(AUTH_BUCKET)] == ["ok.bin"]


@pytest.mark.parametrize(
    ("who", "code"),
    [
        ("wrong-secret", "SignatureDoesNotMatch"),
        ("unknown-key", "InvalidAccessKeyId"),
        ("no-policy", "AccessDenied"),
    ],
)
@pytest.mark.parametrize("op", ["get_bytes", "put_bytes", "list", "stat"])
def test_refused_credentials_are_permission_denied(
    auth_server: AuthServer, who: str, code: str, op: str
) -> None:
    access, secret = {
        "wrong-secret": (auth_server.good[0], "not-the-secret"),
        "unknown-key": ("AKIAUNKNOWNKEY000000", "whatever"),
        "no-policy": auth_server.no_policy,
    }[who]
    store = S3Store(auth_server.config(access, secret))
    ref = ObjectRef(AUTH_BUCKET, "ok.bin")
    calls = {
        "get_bytes": lambda: store.get_bytes(ref),
        "put_bytes": lambda: store.put_bytes(ref, b"evil"),
        "list": lambda: list(store.list(AUTH_BUCKET)),
        "stat": lambda: store.stat(ref),
    }
    start = time.monotonic()
    with pytest.raises(PermissionDeniedError) as info:
        calls[op]()
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert info.value.code == "PERMISSION_DENIED"
    assert auth_server.endpoint not in message  # server facts stay in the log
    assert "object storage refused" in message
    # HEAD answers carry no body, so a refused stat can only say 403/AccessDenied.
    assert (code if op != "stat" else "AccessDenied") in message
    assert "secret" not in message or "storage.secret_key" in message
    assert access not in message and secret not in message
    assert elapsed < 1.5  # refusals are final: retrying would sleep 0.5 + 1 + 2 s


# -- unreachable and stalled endpoints ------------------------------------------------------


def _cfg(endpoint: str, **kw: object) -> StorageConfig:
    base: dict[str, object] = dict(
        endpoint=endpoint,
        access_key="k",
        secret_key="s",
        region="us-east-1",
        retries=3,
        backoff_s=0.1,
        timeout_s=5,
    )
    base.update(kw)
    return StorageConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("op", ["stat", "get_bytes", "list", "ensure_bucket", "download"])
def test_unreachable_endpoint_is_unavailable_after_retries(op: str, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    store = S3Store(_cfg(endpoint, backoff_s=0.05))
    ref = ObjectRef("bkt", "a.svs")
    calls = {
        "stat": lambda: store.stat(ref),
        "get_bytes": lambda: store.get_bytes(ref),
        "list": lambda: list(store.list("bkt")),
        "ensure_bucket": lambda: store.ensure_bucket("bkt"),
        "download": lambda: store.download(ref, tmp_path / "a.svs"),
    }
    start = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        calls[op]()
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert elapsed >= 0.05 + 0.1 + 0.2  # three backoffs were slept: it did retry
    assert elapsed < 3
    assert endpoint not in message  # server facts stay in the log
    assert "storage.endpoint" in message  # but it says what to check
    assert "Connection refused" in message and "4 attempts" in message
    assert "Traceback" not in message and " object at 0x" not in message and "\n" not in message
    assert info.value.code == "UNAVAILABLE"
    assert not (tmp_path / "a.svs").exists()


def test_no_retries_when_configured_off() -> None:
    store = S3Store(_cfg(f"127.0.0.1:{free_port()}", retries=0, backoff_s=5))
    start = time.monotonic()
    with pytest.raises(UnavailableError, match="1 attempt\\)"):
        store.stat(ObjectRef("bkt", "a"))
    assert time.monotonic() - start < 1


def test_stalled_endpoint_times_out() -> None:
    # A socket that accepts connections (kernel backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        store = S3Store(_cfg(endpoint, timeout_s=0.3, retries=1, backoff_s=0.05))
        start = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            store.get_bytes(ObjectRef("bkt", "a"))
        elapsed = time.monotonic() - start
    assert "timed out" in str(info.value)
    assert 0.6 <= elapsed < 3  # two attempts of 0.3 s each, then give up


# -- a faulty proxy in front of moto --------------------------------------------------------


@dataclass
class FaultyProxy:
    """Forwards to ``upstream``; the first ``faults`` requests get ``fault`` instead."""

    upstream: str
    fault: str = "none"  # "503", "500", "truncate" (first GET of an object: half a body)
    faults: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_fault(self, method: str) -> str | None:
        with self.lock:
            if self.faults <= 0 or (self.fault == "truncate" and method != "GET"):
                return None
            self.faults -= 1
            return self.fault


_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
    "<RequestId>1</RequestId></Error>"
)


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _any(self) -> None:
            with proxy.lock:
                proxy.requests.append((self.command, self.path))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = proxy.take_fault(self.command)
            if fault in ("503", "500"):
                code, msg = (
                    ("SlowDown", "Please reduce your request rate.")
                    if fault == "503"
                    else ("InternalError", "We encountered an internal error.")
                )
                payload = _ERROR_XML.format(code=code, msg=msg).encode()
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(proxy.upstream, timeout=10)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            declared = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
            if declared is not None:
                self.send_header("Content-Length", str(declared))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault == "truncate":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

    return Handler


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[tuple[FaultyProxy, str]]:
    """(proxy state, proxy endpoint) in front of the session's moto_server."""
    state = FaultyProxy(upstream=s3_endpoint)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("fault", "code"), [("503", "SlowDown"), ("500", "InternalError")])
def test_transient_server_errors_are_retried(
    proxy: tuple[FaultyProxy, str],
    s3_config: StorageConfig,
    bucket_name: str,
    fault: str,
    code: str,
) -> None:
    state, endpoint = proxy
    S3Store(s3_config).ensure_bucket(bucket_name)
    store = S3Store(_cfg(endpoint, retries=3, backoff_s=0.02))
    ref = ObjectRef(bucket_name, "r.bin")
    store.put_bytes(ref, b"payload")

    state.fault, state.faults = fault, 2
    state.requests.clear()
    assert store.get_bytes(ref) == b"payload"
    assert len(state.requests) == 3  # two faults, then the real answer

    state.faults = 10  # more than the retries allow
    state.requests.clear()
    with pytest.raises(UnavailableError) as info:
        store.get_bytes(ref)
    assert len(state.requests) == 4  # 1 try + 3 retries
    assert code in str(info.value) and endpoint not in str(info.value)
    assert "4 attempts" in str(info.value)


def test_throttled_listing_resumes(
    proxy: tuple[FaultyProxy, str], s3_config: StorageConfig, bucket_name: str
) -> None:
    state, endpoint = proxy
    direct = S3Store(s3_config)
    direct.ensure_bucket(bucket_name)
    for i in range(5):
        direct.put_bytes(ObjectRef(bucket_name, f"p/{i}"), b"x")
    store = S3Store(_cfg(endpoint, retries=2, backoff_s=0.02))
    state.fault, state.faults = "503", 2
    assert [i.key for i in store.list(bucket_name, "p/")] == [f"p/{i}" for i in range(5)]
    assert state.faults == 0  # the faults were really served


def test_dropped_download_is_restarted(
    proxy: tuple[FaultyProxy, str], s3_config: StorageConfig, bucket_name: str, tmp_path: Path
) -> None:
    state, endpoint = proxy
    direct = S3Store(s3_config)
    direct.ensure_bucket(bucket_name)
    data = os.urandom(2 * 1024 * 1024 + 5)
    ref = ObjectRef(bucket_name, "cut/slide.svs")
    put = direct.put_bytes(ref, data)
    store = S3Store(_cfg(endpoint, retries=2, backoff_s=0.02))
    state.fault, state.faults = "truncate", 1
    state.requests.clear()
    info = store.download(ref, tmp_path / "slide.svs")
    assert (tmp_path / "slide.svs").read_bytes() == data
    assert info.etag == put.etag and info.size == len(data)
    assert [m for m, _ in state.requests] == ["GET", "GET"]
    assert os.listdir(tmp_path) == ["slide.svs"]  # the partial temp file is gone


def test_not_found_is_not_retried(
    proxy: tuple[FaultyProxy, str], s3_config: StorageConfig, bucket_name: str
) -> None:
    state, endpoint = proxy
    S3Store(s3_config).ensure_bucket(bucket_name)
    store = S3Store(_cfg(endpoint, retries=3, backoff_s=1.0))
    start = time.monotonic()
    with pytest.raises(NotFoundError):
        store.get_bytes(ObjectRef(bucket_name, "missing"))
    assert time.monotonic() - start < 0.9
    # the GET, then one HEAD of the bucket to say whether bucket or object is missing
    assert [m for m, _ in state.requests] == ["GET", "HEAD"]
