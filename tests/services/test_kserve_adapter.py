"""The KServe adapter behind kserve's real ModelServer, driven with kserve's own clients.

The server is a subprocess running ``python -m smartpath.services.kserve_adapter`` (what a
KServe InferenceService container runs): ``ModelServer.start`` installs signal handlers, so it
only runs in a main thread, and a subprocess also exercises the entry point. One per module.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import yaml
from google.protobuf import json_format
from PIL import Image

# kserve only through the adapter: kserve parses sys.argv on import (pytest --co would be its
# --configure_logging), and the adapter hides the command line from it.
from smartpath.services.kserve_adapter import (
    MODEL_NAME,
    InferInput,
    InferRequest,
    InferResponse,
    kserve,
)
from smartpath.training.synthetic.dataset import label_taxonomy
from smartpath.training.synthetic.roi import render_roi
from smartpath.training.synthetic.slides import write_synthetic_slide
from smartpath.v1 import pathology_pb2
from tests.conftest import free_port

START_TIMEOUT_S = 120
TOKEN = "kserve-token-7e1d"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class Server:
    def __init__(self, grpc_url: str, http_url: str, root: Path) -> None:
        self.grpc_url, self.http_url, self.root = grpc_url, http_url, root


def _bytes(name: str, *values: bytes | str) -> InferInput:
    data = [v.encode() if isinstance(v, str) else v for v in values]
    return InferInput(name, [len(data)], "BYTES", data)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("kserve")
    write_synthetic_slide(root / "slide.svs", width=2048, height=2048, seed=3)
    (root / "tokens").write_text(f"kserve-test:{TOKEN}\n")
    config = {
        "storage": {"local_root": str(root / "store")},
        "slide_cache": {"dir": str(root / "cache")},
        "tiling": {"local_slide_roots": [str(root)]},
        "serve": {"auth_token_file": str(root / "tokens")},
    }
    (root / "smartpath.yaml").write_text(yaml.safe_dump(config))
    grpc_port, http_port = free_port(), free_port()
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "smartpath.services.kserve_adapter"]
        command += ["--config", str(root / "smartpath.yaml")]
        command += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:  # the gRPC port listens once the model is loaded
                try:
                    socket.create_connection(("127.0.0.1", grpc_port), timeout=0.2).close()
                    socket.create_connection(("127.0.0.1", http_port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = log_path.read_text(errors="replace")[-3000:]
                        pytest.fail(f"kserve adapter did not start (rc={proc.poll()}):\n{tail}")
                    time.sleep(0.2)
            yield Server(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", root)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _infer(
    server: Server, *inputs: InferInput, request_id: str = "", token: str | None = None
) -> InferResponse:
    token = TOKEN if token is None else token

    async def go() -> InferResponse:
        async with kserve.InferenceGRPCClient(server.grpc_url, timeout=60) as client:
            request = InferRequest(MODEL_NAME, list(inputs), request_id=request_id)
            return await client.infer(request, headers=[("authorization", f"Bearer {token}")])

    return asyncio.run(go())


def _outputs(response: InferResponse) -> dict[str, str]:
    assert [o.datatype for o in response.outputs] == ["BYTES"] * 3
    assert all(o.shape == [1] for o in response.outputs)
    return {o.name: o.as_numpy()[0].decode() for o in response.outputs}


def _png() -> bytes:
    scene = render_roi(np.random.default_rng(0), "tumour", 256)
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    return buf.getvalue()


def test_server_and_model_ready(server: Server) -> None:
    async def go() -> tuple[bool, bool, bool]:
        async with kserve.InferenceGRPCClient(server.grpc_url, timeout=10) as client:
            return (
                await client.is_server_live(),
                await client.is_server_ready(),
                await client.is_model_ready(MODEL_NAME),
            )

    assert asyncio.run(go()) == (True, True, True)


def test_roi_classification(server: Server) -> None:
    response = _infer(
        server, _bytes("image", _png()), _bytes("task", "classification"), request_id="req-1"
    )
    assert response.id == "req-1"
    out = _outputs(response)
    analysis = json.loads(out["analysis"])
    assert analysis["task"] == "TASK_CLASSIFICATION"
    assert analysis["scale"] == "SCALE_ROI"
    assert analysis["requestId"] == "req-1"
    labels = label_taxonomy()["classification/roi"]
    assert analysis["label"] in labels
    assert out["label"] == analysis["label"]
    scores = {s["label"]: s["score"] for s in analysis["labelScores"]}
    assert set(scores) <= set(labels)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
    message = json_format.Parse(out["analysis"], pathology_pb2.Analysis())
    assert message.label == analysis["label"]


def test_slide_vqa(server: Server) -> None:
    response = _infer(
        server,
        _bytes("slide_uri", str(server.root / "slide.svs")),
        _bytes("task", "vqa"),
        _bytes("prompt", "Is adipose tissue present on this slide?"),
    )
    out = _outputs(response)
    analysis = json.loads(out["analysis"])
    assert analysis["task"] == "TASK_VQA"
    assert analysis["scale"] == "SCALE_WSI"
    assert analysis["tiles"] > 0
    assert out["answer"] and out["answer"] == analysis["answer"]


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("empty image", grpc.StatusCode.INVALID_ARGUMENT, "is empty"),
        ("unknown task", grpc.StatusCode.INVALID_ARGUMENT, "one of"),
        ("task not BYTES", grpc.StatusCode.INVALID_ARGUMENT, "must be BYTES"),
        ("image and slide", grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        ("no such slide", grpc.StatusCode.NOT_FOUND, "does not exist"),
    ],
)
def test_errors_keep_their_status(
    server: Server, case: str, code: grpc.StatusCode, says: str
) -> None:
    png, slide = _png(), str(server.root / "slide.svs")
    inputs = {
        "empty image": [_bytes("image", b""), _bytes("task", "classification")],
        "unknown task": [_bytes("image", png), _bytes("task", "grading")],
        "task not BYTES": [_bytes("image", png), InferInput("task", [1], "INT32", [1])],
        "image and slide": [
            _bytes("image", png),
            _bytes("slide_uri", slide),
            _bytes("task", "vqa"),
        ],
        "no such slide": [
            _bytes("slide_uri", str(server.root / "missing.svs")),
            _bytes("task", "classification"),
        ],
    }[case]
    with pytest.raises(grpc.RpcError) as caught:
        _infer(server, *inputs)
    assert caught.value.code() == code
    assert says in caught.value.details()
    assert "Traceback" not in caught.value.details()


def test_rest_maps_domain_errors(server: Server) -> None:
    def body(uri: str) -> dict:
        return {
            "inputs": [
                {"name": "slide_uri", "shape": [1], "datatype": "BYTES", "data": [uri]},
                {"name": "task", "shape": [1], "datatype": "BYTES", "data": ["classification"]},
            ]
        }

    url = f"{server.http_url}/v2/models/{MODEL_NAME}/infer"
    missing = httpx.post(url, json=body(str(server.root / "missing.svs")), headers=AUTH, timeout=60)
    assert missing.status_code == 404, missing.text
    assert "does not exist" in missing.json()["error"]
    ok = httpx.post(url, json=body(str(server.root / "slide.svs")), headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text
    outputs = {o["name"]: o["data"][0] for o in ok.json()["outputs"]}
    assert json.loads(outputs["analysis"])["scale"] == "SCALE_WSI"


def test_predictions_want_an_accepted_token(server: Server) -> None:
    inputs = [_bytes("image", _png()), _bytes("task", "classification")]
    for token in ("", "wrong-" + TOKEN):
        with pytest.raises(grpc.RpcError) as err:
            _infer(server, *inputs, token=token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    url = f"{server.http_url}/v2/models/{MODEL_NAME}/infer"
    body = {"inputs": [{"name": "task", "shape": [1], "datatype": "BYTES", "data": ["vqa"]}]}
    refused = httpx.post(url, json=body, timeout=60)
    assert refused.status_code == 401
    # Probes stay open.
    assert httpx.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200
    log = (server.root / "server.log").read_text()
    audit = [json.loads(line.split("smartpath.audit: ", 1)[1]) for line in log.splitlines()
             if "smartpath.audit: " in line]  # fmt: skip
    assert {"kserve-test", "unauthenticated"} <= {a["caller"] for a in audit}
    assert all(a["service"] == "kserve" and a["rpc"] == "predict" for a in audit)
