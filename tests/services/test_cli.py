"""The CLI against the session's Serve instance: synthetic slide, plan overlay and GeoJSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smartpath.client.cli import main


def test_synth_slide_then_plan_outputs(
    serve_instance, slides_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = slides_dir / "cli.tiff"
    assert main(["synth-slide", str(slide), "--width", "3072", "--format", "tiff"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["width"] == 3072

    from tests.services.conftest import API_TOKEN

    address = f"127.0.0.1:{serve_instance.serve.grpc_port}"
    out = tmp_path / "plan"
    token = tmp_path / "token"
    token.write_text(API_TOKEN + "\n")
    args = ["plan", str(slide), "--address", address, "--out", str(out)]
    assert main(args) == 1  # the tiler, like every service, wants a token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*args, "--token-file", str(token)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tiles"] > 0

    overlay = np.asarray(Image.open(summary["overlay"]))
    assert overlay.ndim == 3 and max(overlay.shape[:2]) == 1024
    blue = (overlay[..., 2] > 180) & (overlay[..., 0] < 60) & (overlay[..., 1] < 100)
    assert blue.sum() > 100, "tile grid should be drawn"

    collection = json.loads(Path(summary["geojson"]).read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == summary["tiles"]
    ring = collection["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    side = ring[1][0] - ring[0][0]
    assert side == pytest.approx(256 * 0.5 / 0.25)  # 256 px at 0.5 µm/px on a 0.25 slide


def test_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling:\n  tile_size: 1\n")
    with pytest.raises(SystemExit) as err:
        main(["--config", str(bad), "serve"])
    assert err.value.code == 2


def test_train_submit_dry_run_prints_a_valid_rayjob(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from smartpath.training.rayjob import validate_rayjob

    argv = ["train", "submit", "grpo", "--image", "smartpath:dev", "--workers", "2"]
    assert main([*argv, "--gpus", "1", "--dry-run"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    validate_rayjob(job)
    assert job["kind"] == "RayJob" and "smartpath.training.grpo" in job["spec"]["entrypoint"]
    assert job["metadata"]["name"] == "smartpath-grpo-smartpath"  # one RayJob per run name
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] in (1, "1")
    assert main([*argv, "--name", "Not_DNS", "--dry-run"]) == 2
    assert "DNS-1035" in capsys.readouterr().err


def test_serve_print_config_is_the_serve_schema(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    assert main(["serve", "--print-config"]) == 0
    schema = ServeDeploySchema.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert [a.name for a in schema.applications] == [
        "tiler",
        "encoder",
        "router",
        "decoder",
        "gateway",
    ]


def test_analyze_an_image_a_slide_and_a_region(
    serve_instance,
    synthetic_tiff,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import yaml

    from smartpath.training.synthetic.roi import render_roi
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
    from tests.services.conftest import API_TOKEN

    # The CLI's own config: the server's object store (a local slide outside the server's
    # roots is uploaded there first) and its gRPC port.
    monkeypatch.setenv("SMARTPATH_STORAGE__ACCESS_KEY", S3_ACCESS_KEY)
    monkeypatch.setenv("SMARTPATH_STORAGE__SECRET_KEY", S3_SECRET_KEY)
    config = tmp_path / "cli.yaml"
    storage = serve_instance.storage.model_dump(mode="json", exclude={"access_key", "secret_key"})
    config.write_text(
        yaml.safe_dump({"storage": storage, "serve": {"grpc_port": serve_instance.serve.grpc_port}})
    )
    token = tmp_path / "token"
    token.write_text(API_TOKEN + "\n")
    common = ["--token-file", str(token), "--out", str(tmp_path / "out")]

    image = tmp_path / "roi.png"
    Image.fromarray(render_roi(np.random.default_rng(1), "stroma", 288).image).save(image)
    args = ["--config", str(config), "analyze", str(image), "--image", "--task", "classification"]
    assert main([*args, *common, "--stem", "roi"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "classification" and result["label"] in result["label_scores"]
    assert Image.open(result["files"]["overlay"]).size == (288, 288)

    slide = tmp_path / "outside-roots.tiff"  # not under the server's local roots: uploaded
    slide.write_bytes(synthetic_tiff.path.read_bytes())
    args = ["--config", str(config), "analyze", str(slide), "--task", "vqa"]
    assert main([*args, "--prompt", "Is adipose tissue present?", *common, "--stem", "wsi"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["scale"] == "wsi" and result["tiles"] > 0 and "tiles" in out.err  # progress bar
    assert Path(result["files"]["overlay"]).is_file()

    args = ["--config", str(config), "analyze", str(slide), "--task", "detection"]
    assert main([*args, "--region", "512,512,448,448", *common, "--stem", "region"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert Image.open(result["files"]["overlay"]).size == (448, 448)  # the region at 0.5 µm/px
    geojson = json.loads(Path(result["files"]["geojson"]).read_text())
    for feature in geojson["features"]:
        for x, y in feature["geometry"]["coordinates"][0]:
            assert 512 <= x <= 960 and 512 <= y <= 960  # slide level-0 pixels


def test_local_ray_hides_gpus_from_replicas_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.accelerators import RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR as name

    from smartpath.client.cli import _setup_environment

    monkeypatch.delenv(name, raising=False)
    _setup_environment()
    assert os.environ[name] == "1"
