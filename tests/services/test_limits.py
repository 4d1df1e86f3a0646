"""Requests are bounded by count as well as by size: labels and options per question, tiles
per EncodeTiles call (INVALID_ARGUMENT before any work)."""

from __future__ import annotations

import grpc
import pytest

from smartpath.client.rpc import PathologyClient, question
from smartpath.core.errors import InvalidArgumentError
from smartpath.model.grammar import Scale
from smartpath.services.contracts import make_question
from smartpath.v1 import encoding_pb2, encoding_pb2_grpc
from tests.services.conftest import API_TOKEN

AUTH = ("authorization", f"Bearer {API_TOKEN}")


def test_questions_name_a_bounded_number_of_labels_and_options() -> None:
    limits = {"max_prompt_chars": 2000, "max_new_tokens_cap": 64, "max_labels": 3}
    ok = make_question(1, Scale.ROI, "", ["a", "b", "c"], ["x", "y", "z"], 0, **limits)
    assert ok.labels == ("a", "b", "c")
    for labels, options in ((["a", "b", "c", "d"], []), ([], ["w", "x", "y", "z"])):
        with pytest.raises(InvalidArgumentError, match="a question may name 3"):
            make_question(1, Scale.ROI, "", labels, options, 0, **limits)


def test_the_served_limits_refuse_too_many_labels_and_tiles(serve_instance, grpc_channel) -> None:
    cap = serve_instance.model.max_tiles_per_request
    size = 16
    pixels = bytes((cap + 1) * size * size * 3)
    with pytest.raises(grpc.RpcError) as err:
        encoding_pb2_grpc.FeatureEncoderStub(grpc_channel).EncodeTiles(
            encoding_pb2.EncodeTilesRequest(tile_size=size, pixels=pixels),
            metadata=[("application", "encoder"), AUTH],
            timeout=60,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{cap + 1} tiles" in err.value.details()
    labels = [f"label-{i}" for i in range(serve_instance.model.max_labels + 1)]
    address = f"127.0.0.1:{serve_instance.serve.grpc_port}"
    with PathologyClient(address, token=API_TOKEN) as client, pytest.raises(grpc.RpcError) as err:
        client.analyze_image(b"\x89PNG", question("classification", labels=labels))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a question may name" in err.value.details()
