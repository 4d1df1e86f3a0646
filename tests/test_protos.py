"""The public API: generated code is current and follows protobuf style."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from smartpath.v1 import common_pb2, tiling_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_enums_start_unspecified() -> None:
    for enum in (common_pb2.Task, common_pb2.Scale, tiling_pb2.TileEncoding):
        zero = enum.Name(0)
        assert zero.endswith("_UNSPECIFIED"), zero


def test_one_request_and_response_message_per_rpc() -> None:
    service = tiling_pb2.DESCRIPTOR.services_by_name["SlideTiler"]
    inputs = [m.input_type.name for m in service.methods]
    outputs = [m.output_type.name for m in service.methods]
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
    assert len(set(inputs)) == len(inputs) and len(set(outputs)) == len(outputs)
    assert service.full_name == "smartpath.v1.SlideTiler"
