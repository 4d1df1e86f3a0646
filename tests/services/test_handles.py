"""The gateway's handles pick Serve's transport per call by the size of its tensors."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import numpy as np
import pytest
from ray.serve.handle import DeploymentHandle

from smartpath.core.config import SmartPathConfig
from smartpath.model.grammar import Scale, Task
from smartpath.services import handles
from smartpath.services.contracts import DecodeRequest, Question, VisualTokens


class _Handle:
    """Stands in for a DeploymentHandle (no Serve here): records each call's options."""

    def __init__(self, calls: list[tuple[str, dict[str, Any]]], options: dict[str, Any]) -> None:
        self.calls, self._options = calls, options

    def options(self, **options: Any) -> _Handle:
        assert set(options) <= set(inspect.signature(DeploymentHandle.options).parameters)
        return _Handle(self.calls, {**self._options, **options})

    def __getattr__(self, method: str) -> Any:
        calls, options = self.calls, self._options

        class _Method:
            def remote(self, *args: Any) -> _Response:
                calls.append((method, options))
                return _Response()

        return _Method()


class _Response:
    """An empty unary result or response stream."""

    def __await__(self) -> Any:
        return asyncio.sleep(0).__await__()

    def __aiter__(self) -> _Response:
        return self

    async def __anext__(self) -> None:
        raise StopAsyncIteration


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    recorded: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(handles, "handle", lambda app: _Handle(recorded, {}))
    return recorded


def _request(tokens: int) -> DecodeRequest:
    question = Question(task=Task.CLASSIFICATION, scale=Scale.ROI, prompt="what tissue?")
    visual = VisualTokens(np.zeros((tokens, 256), np.float32))
    return DecodeRequest(question=question, visual=visual, experts=(0,), weights=(1.0,))


def test_small_calls_go_inline_and_large_tensors_through_the_object_store(
    calls: list[tuple[str, dict[str, Any]]],
) -> None:
    config = SmartPathConfig(serve={"inline_message_bytes": 1 << 20})
    backends = handles.HandleBackends(config)

    async def run() -> None:
        await backends.encode_image(np.zeros((256, 256, 3), np.uint8))  # 192 KiB
        await backends.encode_image(np.zeros((1024, 1024, 3), np.uint8))  # 3 MiB
        await backends.route(Task.CLASSIFICATION, Scale.ROI, np.zeros(256, np.float32))
        await backends.complete(_request(64), "0")  # 64 KiB of visual tokens
        await backends.complete(_request(2048), "0")  # 2 MiB
        async for _ in backends.decode(_request(64), "1"):
            pass

    asyncio.run(run())
    by_reference = [(method, options["_by_reference"]) for method, options in calls]
    assert by_reference == [
        ("encode_image", False),
        ("encode_image", True),
        ("route", False),
        ("complete", False),
        ("complete", True),
        ("decode", False),
    ]
    # Decoder calls keep their expert-set routing and streaming whatever the transport.
    assert calls[3][1]["multiplexed_model_id"] == "0" and calls[3][1]["stream"] is False
    assert calls[5][1]["multiplexed_model_id"] == "1" and calls[5][1]["stream"] is True


def test_inline_zero_sends_every_tensor_through_the_object_store(
    calls: list[tuple[str, dict[str, Any]]],
) -> None:
    backends = handles.HandleBackends(SmartPathConfig(serve={"inline_message_bytes": 0}))

    async def run() -> None:
        await backends.encode_image(np.zeros((8, 8, 3), np.uint8))
        await backends.route(Task.CLASSIFICATION, Scale.ROI, np.zeros(4, np.float32))
        await backends.complete(_request(1), "0")

    asyncio.run(run())
    assert [options["_by_reference"] for _, options in calls] == [True, True, True]
