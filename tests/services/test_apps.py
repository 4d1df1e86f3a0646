"""The one Serve config: Serve's schema, importable builders, options from the typed config,
no secrets; and the token check of the Pathology service."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from smartpath.core.config import SmartPathConfig
from smartpath.core.errors import UnauthenticatedError, UnavailableError
from smartpath.services.apps import APPS, serve_config
from smartpath.services.auth import TokenCheck


def _config() -> SmartPathConfig:
    return SmartPathConfig(
        storage={"endpoint": "minio:9000", "access_key": "AKIA-ID", "secret_key": "s3cr3t-v4lue"},
        serve={"decoder": {"max_queued_requests": 5, "autoscaling": {"max_replicas": 7}}},
    )


def test_serve_config_is_a_valid_serve_schema_with_the_configured_options() -> None:
    document = serve_config(_config())
    schema = ServeDeploySchema.model_validate(document)
    assert [a.name for a in schema.applications] == list(APPS)
    decoder = next(a for a in schema.applications if a.name == "decoder").deployments[0]
    assert decoder.name == "Decoder" and decoder.max_queued_requests == 5
    assert decoder.autoscaling_config["max_replicas"] == 7
    assert schema.grpc_options.port == 9000 and schema.grpc_options.enable_reflection


def test_autoscaling_defaults_are_serves_own_and_every_knob_reaches_the_deployment() -> None:
    from ray.serve.config import AutoscalingConfig as ServeAutoscaling

    from smartpath.core.config import AutoscalingConfig
    from smartpath.services import apps

    knobs = {"upscale_delay_s": 1.0, "downscale_delay_s": 2.0, "look_back_period_s": 11.0}
    defaults = AutoscalingConfig()
    assert {k: getattr(defaults, k) for k in knobs} == {
        k: getattr(ServeAutoscaling(), k) for k in knobs
    }
    config = SmartPathConfig(serve={"encoder": {"autoscaling": knobs}})
    app = apps.encoder(apps.config_args(config))
    served = app._bound_deployment._deployment_config.autoscaling_config
    assert {k: getattr(served, k) for k in knobs} == knobs


def test_every_import_path_and_servicer_function_imports() -> None:
    document = serve_config(_config())
    paths = [a["import_path"] for a in document["applications"]]
    paths += document["grpc_options"]["grpc_servicer_functions"]
    for path in paths:
        module, _, name = path.replace(":", ".").rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), path


def test_no_secret_in_the_serve_config() -> None:
    text = yaml.safe_dump(serve_config(_config()))
    assert "s3cr3t-v4lue" not in text and "AKIA-ID" not in text
    assert "minio:9000" in text  # the rest of the storage config is there


def test_builders_take_the_options_from_the_config() -> None:
    from smartpath.services import apps

    args = apps.config_args(_config())
    app = apps.decoder(args)
    deployment = app._bound_deployment
    assert deployment.name == "Decoder" and deployment.max_queued_requests == 5


def test_token_check(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nalpha\n\npacs-gateway:beta\n")
    check = TokenCheck(tokens)
    assert check.check([("authorization", "Bearer alpha")]) == "caller-2"  # named by its line
    assert check.check([("Authorization", "bearer beta")]) == "pacs-gateway"
    with pytest.raises(UnauthenticatedError):
        check.check([("authorization", "Bearer pacs-gateway:beta")])
    for metadata in ([], [("authorization", "Bearer gamma")], [("authorization", "alpha")]):
        with pytest.raises(UnauthenticatedError):
            check.check(metadata)
    # Rotation: the file is re-read when it changes.
    tokens.write_text("gamma\n")
    os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    check.check([("authorization", "Bearer gamma")])
    with pytest.raises(UnauthenticatedError):
        check.check([("authorization", "Bearer alpha")])
    tokens.unlink()
    with pytest.raises(UnavailableError):
        check.check([("authorization", "Bearer gamma")])
