"""The serving pods' preStop hook (smartpath.services.drain): Ray's CLI accepts its drain request,
and the wait ends when the Serve proxy stops answering, or at the timeout, never earlier."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from smartpath.services import drain


class _Proxy(http.server.ThreadingHTTPServer):
    """A stand-in for a Serve proxy's health endpoint: ``status`` for every GET."""

    status = 200
    hits = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, _Proxy)
        server.hits += 1
        self.send_response(server.status)
        self.end_headers()
        self.wfile.write(b"success" if server.status == 200 else b"This node is being drained.")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    server = _Proxy(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: _Proxy) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/-/healthz"


def test_ray_cli_accepts_the_drain_request() -> None:
    from ray.scripts.scripts import drain_node

    # Parsing only (make_context runs no command): option names and the reason are Ray's.
    ctx = drain_node.make_context("drain-node", drain.drain_node_args(150))
    assert ctx.params["reason"] == drain.REASON
    assert ctx.params["deadline_remaining_seconds"] == 150
    assert ctx.params["node_id"] is None  # Ray's default: the node the hook runs on


def test_wait_ends_when_the_draining_proxy_stops(proxy: _Proxy) -> None:
    proxy.status = 503
    polls = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:  # the proxy drained its calls and Serve stopped it
            proxy.shutdown()
            proxy.server_close()

    assert drain.wait_until_stopped(_url(proxy), 60, poll_s=0.01, sleep=sleep)
    assert proxy.hits == 3 and len(polls) == 3


def test_wait_times_out_while_the_proxy_answers(proxy: _Proxy) -> None:
    start = time.monotonic()
    assert not drain.wait_until_stopped(_url(proxy), 0.3, poll_s=0.05)
    assert 0.25 <= time.monotonic() - start < 5
    assert proxy.hits >= 3


def test_wait_ends_at_once_without_a_proxy() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    assert drain.wait_until_stopped(f"http://127.0.0.1:{port}/-/healthz", 60, poll_s=1.0)
    assert time.monotonic() - start < 1


def test_hook_waits_even_when_the_drain_request_fails(
    proxy: _Proxy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(timeout_s: int) -> None:
        raise SystemExit("The drain request is not accepted")

    monkeypatch.setattr(drain, "request_drain", refused)
    start = time.monotonic()
    assert drain.main(["--timeout-s", "1", "--health-url", _url(proxy), "--poll-s", "0.1"]) == 0
    assert time.monotonic() - start >= 0.9
    out = capsys.readouterr().out
    assert "drain request failed" in out and "timed out with the proxy still up" in out
