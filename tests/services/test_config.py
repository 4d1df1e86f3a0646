"""The typed config tree: YAML, environment overrides, validation at load."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from smartpath.core.config import load_config


def test_defaults_are_the_embedded_mode() -> None:
    config = load_config()
    assert config.storage.endpoint is None
    assert config.tiling.target_mpp == 0.5 and config.tiling.tile_size == 256
    assert config.tiling.local_slide_roots == []


def test_yaml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "smartpath.yaml"
    path.write_text(
        "storage:\n  endpoint: minio:9000\n  access_key: a\n  secret_key: s3cr3t-value\n"
        "tiling:\n  tile_size: 512\n"
        "serve:\n  tiler:\n    autoscaling:\n      max_replicas: 8\n"
    )
    monkeypatch.setenv("SMARTPATH_TILING__TILE_SIZE", "224")
    config = load_config(path)
    assert config.storage.endpoint == "minio:9000"
    assert config.storage.secret_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(config)  # secrets are masked in reprs and logs
    assert config.tiling.tile_size == 224  # environment wins
    assert config.serve.tiler.autoscaling.max_replicas == 8


@pytest.mark.parametrize(
    "overrides",
    [
        {"tiling": {"tile_size": 3}},
        {"tiling": {"min_tissue_fraction": 1.5}},
        {"storage": {"access_key": "only-one"}},
        {"serve": {"tiler": {"autoscaling": {"min_replicas": 5, "max_replicas": 2}}}},
        {"no_such_section": {}},
    ],
)
def test_invalid_config_is_refused_at_load(overrides: dict) -> None:
    with pytest.raises(ValidationError):
        load_config(**overrides)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)
