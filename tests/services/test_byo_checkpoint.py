"""Bring your own Qwen2.5-VL checkpoint, as a new user would: ``smartpath model init`` on an
HF-format folder, ``smartpath analyze --local`` on an ROI and a slide, and the same checkpoint
served by ``smartpath serve`` giving the same answers over gRPC."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from smartpath.client.cli import main
from smartpath.client.rpc import PathologyClient
from smartpath.training.synthetic.slides import write_synthetic_slide
from tests.conftest import free_port

EXPECTED_PRESET = {"tiny": "qwen2.5-vl", "3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An ROI image and a small synthetic slide."""
    root = tmp_path_factory.mktemp("byo-inputs")
    roi = root / "roi.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)).save(roi)
    slide = write_synthetic_slide(root / "slide.svs", width=2048, height=2048, seed=5).path
    return roi, slide


def _config(tmp: Path, **extra: object) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"storage": {"local_root": str(tmp / "store")}, **extra}))
    return path


def _analyses(
    cli: list[str], roi: Path, slide: Path, out: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, dict]:
    """An ROI VQA and a slide classification through the CLI, as printed."""
    results = {}
    for stem, args in {
        "roi": [str(roi), "--image", "--task", "vqa", "--prompt", "What is shown?"],
        "wsi": [str(slide), "--task", "classification", "--labels", "tumour,stroma,necrosis"],
    }.items():
        assert main([*cli[:2], "analyze", *args, *cli[2:], "--max-new-tokens", "12",
                     "--out", str(out), "--stem", stem]) == 0  # fmt: skip
        results[stem] = json.loads(capsys.readouterr().out)
    return results


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_model_init_then_analyze_locally(
    qwen_base,
    inputs: tuple[Path, Path],
    tmp_path: Path,
    size: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = tmp_path / "ckpt"
    config = _config(tmp_path)
    base = qwen_base(size)
    capsys.readouterr()  # what writing the base printed
    assert main(["--config", str(config), "model", "init", "--base", str(base),
                 "--out", str(ckpt)]) == 0  # fmt: skip
    made = json.loads(capsys.readouterr().out)
    assert made["preset"] == EXPECTED_PRESET[size] and made["text_layers"] == 2
    roi, slide = inputs
    cli = ["--config", str(config), "--local", "--model", str(ckpt)]
    results = _analyses(cli, roi, slide, tmp_path / "out", capsys)
    for scale, result in results.items():
        assert result["scale"] == scale
        assert result["model_version"].startswith(EXPECTED_PRESET[size] + "@")
        assert len(result["experts"]) == 2 and "decoding" in result["timings_ms"]
        assert Path(result["files"]["overlay"]).is_file()
    wsi = results["wsi"]
    assert wsi["tiles"] > 0 and set(wsi["label_scores"]) == {"tumour", "stroma", "necrosis"}
    assert sum(wsi["label_scores"].values()) == pytest.approx(1.0, abs=2e-3)


def test_local_refuses_server_options_and_bad_checkpoints(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roi, _ = inputs
    args = ["--config", str(_config(tmp_path)), "analyze", str(roi), "--image", "--task", "vqa"]
    assert main([*args, "--local", "--address", "127.0.0.1:1"]) == 2
    assert "leave out --address" in capsys.readouterr().err
    assert main([*args, "--model", str(tmp_path)]) == 2
    assert "--model picks the checkpoint of --local" in capsys.readouterr().err
    assert main([*args, "--local", "--model", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["model", "init", "--base", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "no config.json" in capsys.readouterr().err


@contextlib.contextmanager
def _serving(config: Path, port: int) -> Iterator[subprocess.Popen]:
    """``smartpath serve`` in its own process (and its own local Ray), stopped afterwards."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartpath.client.cli", "--config", str(config), "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        with PathologyClient(f"127.0.0.1:{port}", timeout_s=5) as client:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read().decode(errors="replace")[-3000:])
                try:
                    client.model_info()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_the_same_checkpoint_serves_with_the_same_answers(
    qwen_base,
    inputs: tuple[Path, Path],
    tmp_path: Path,
    size: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    roi, slide = inputs
    ckpt = tmp_path / "ckpt"
    base = qwen_base(size)
    assert main(["model", "init", "--base", str(base), "--out", str(ckpt)]) == 0
    capsys.readouterr()
    port = free_port()
    small = {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    config = _config(
        tmp_path,
        model={"uri": str(ckpt)},
        tiling={"local_slide_roots": [str(slide.parent)]},
        slide_cache={"dir": str(tmp_path / "cache")},
        serve={
            "grpc_port": port,
            "http_port": free_port(),
            **{name: small for name in ("tiler", "encoder", "router", "decoder", "gateway")},
        },
    )
    local = _analyses(["--config", str(config), "--local"], roi, slide, tmp_path / "l", capsys)
    gc.collect()  # the in-process model, before the replicas load theirs
    with _serving(config, port):
        served = _analyses(["--config", str(config)], roi, slide, tmp_path / "s", capsys)
    for key in ("roi", "wsi"):
        a, b = local[key], served[key]
        for volatile in ("timings_ms", "files", "feature_cache_hit"):
            a.pop(volatile, None), b.pop(volatile, None)
        scores_a, scores_b = a.pop("label_scores", {}), b.pop("label_scores", {})
        assert a == b
        assert scores_a.keys() == scores_b.keys()
        assert all(scores_a[k] == pytest.approx(scores_b[k], abs=2e-3) for k in scores_a)


def test_a_learned_tile_encoder_travels_with_the_checkpoint(
    qwen_base, inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import ViTConfig, ViTModel

    from smartpath.model.checkpoint import load_checkpoint
    from smartpath.model.tile_encoder import tile_encoder_for
    from smartpath.training.features import featurize_manifest
    from smartpath.training.manifest import WsiSample, read_manifest, write_manifest

    vit_dir = tmp_path / "vit"
    vit = ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, image_size=32, patch_size=8)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ViTModel(vit).save_pretrained(str(vit_dir), safe_serialization=True)
    base = qwen_base("tiny")
    capsys.readouterr()
    config = _config(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert main(["--config", str(config), "model", "init", "--base", str(base), "--out",
                 str(ckpt), "--tile-encoder", str(vit_dir)]) == 0  # fmt: skip
    made = json.loads(capsys.readouterr().out)
    assert made["tile_encoder"].startswith("vit:")
    cfg = load_checkpoint(ckpt)[1].model
    assert cfg.aggregator.feature_dim == 48 and cfg.tile_encoder_path == str(vit_dir)

    # Training features are made with the same encoder, named in the feature files.
    _, slide = inputs
    manifest = tmp_path / "wsi.jsonl"
    write_manifest([WsiSample(id="s", slide=str(slide), task="classification",
                              labels=["a", "b"], target="a")], manifest)  # fmt: skip
    encoder = tile_encoder_for(cfg)
    rows = read_manifest(featurize_manifest(manifest, encoder=encoder, progress=False))
    from smartpath.model.slide_features import load_features

    feats = load_features(manifest.parent / rows[0].features)
    assert feats.encoder == made["tile_encoder"] and feats.features.shape[1] == 48

    # Serving encodes the slide's tiles with it.
    cli = ["--config", str(config), "--local", "--model", str(ckpt)]
    assert main([*cli[:2], "analyze", str(slide), "--task", "vqa", "--prompt", "?", *cli[2:],
                 "--max-new-tokens", "4", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["tiles"] > 0
