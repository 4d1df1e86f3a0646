"""External S3 behind a private CA, as the chart sets it up (extraVolumes + SSL_CERT_FILE): the
S3 store trusts the CA that SSL_CERT_FILE names and refuses the endpoint without it.

The endpoint is the session's real S3 server behind a TLS terminator on loopback whose certificate
a CA made here signs (only the TLS hop is ours; every S3 call is answered by the S3 server).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartpath.core.config import StorageConfig
from smartpath.core.errors import SmartPathError
from smartpath.core.storage.base import ObjectRef
from smartpath.core.storage.s3 import S3Store
from tests.services.test_tls import Ca


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ca, Path]:
    ca = Ca.make("SmartPath test private CA")
    path = tmp_path_factory.mktemp("ca") / "ca.crt"
    path.write_bytes(ca.pem)
    return ca, path


@pytest.fixture(scope="module")
def tls_endpoint(
    s3_endpoint: str, private_ca: tuple[Ca, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """host:port of a TLS terminator (certificate for 127.0.0.1 from the private CA) in front of
    the session's S3 server."""
    ca, _ = private_ca
    key_pem, cert_pem = ca.issue(["localhost"], ips=["127.0.0.1"])
    folder = tmp_path_factory.mktemp("tls")
    (folder / "key.pem").write_bytes(key_pem)
    (folder / "cert.pem").write_bytes(cert_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    host, port = s3_endpoint.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                tls = context.wrap_socket(client, server_side=True)
            except (ssl.SSLError, OSError):  # a client that does not trust us hangs up
                client.close()
                continue
            upstream = socket.create_connection((host, int(port)))
            for a, b in ((tls, upstream), (upstream, tls)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def _store(s3_config: StorageConfig, endpoint: str) -> S3Store:
    return S3Store(s3_config.model_copy(update={"endpoint": endpoint, "secure": True}))


def test_trusts_the_ca_ssl_cert_file_names(
    s3_config: StorageConfig,
    tls_endpoint: str,
    private_ca: tuple[Ca, Path],
    bucket_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(private_ca[1]))
    store = _store(s3_config, tls_endpoint)
    store.ensure_bucket(bucket_name)
    ref = ObjectRef(bucket_name, "slides/case.txt")
    store.put_bytes(ref, b"over TLS")
    assert store.get_bytes(ref) == b"over TLS"


def test_refuses_the_endpoint_without_the_ca(
    s3_config: StorageConfig,
    tls_endpoint: str,
    bucket_name: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    other = tmp_path / "other.crt"  # some other CA: the private one is not trusted
    other.write_bytes(Ca.make("Another CA").pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    store = _store(s3_config, tls_endpoint)
    with pytest.raises(SmartPathError) as raised:
        store.ensure_bucket(bucket_name)
    assert tls_endpoint not in str(raised.value)  # no endpoint in what callers see
