"""The synthetic datasets are valid manifests: the generator and the reader agree."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from smartpath.model.grammar import Task, parse_answer
from smartpath.training.manifest import load_roi_image, read_manifest
from smartpath.training.synthetic.dataset import (
    ROI_PROFILE_FILE,
    generate_roi_dataset,
    generate_wsi_dataset,
)
from smartpath.training.synthetic.roi import COMPACT


def test_generated_datasets_read_back(tmp_path: Path) -> None:
    roi = read_manifest(generate_roi_dataset(tmp_path / "roi", n_per_task=2, seed=0))
    assert {s.task for s in roi} == {"classification", "detection", "segmentation", "vqa"}
    image = load_roi_image(roi[0], tmp_path / "roi" / "roi.jsonl")
    assert image.ndim == 3 and 224 <= image.shape[0] <= 448
    for sample in roi:
        answer = parse_answer(
            Task[sample.task.upper()],
            f"<answer>{sample.target}</answer>",
            sample.labels,
            options=sample.options,
        )
        assert type(answer).__name__ != "Unparseable", sample.id
    wsi = read_manifest(generate_wsi_dataset(tmp_path / "wsi", n_slides=1, seed=0, size_px=1024))
    assert {s.scale for s in wsi} == {"wsi"} and len(wsi) == 3
    assert (tmp_path / "wsi" / wsi[0].slide).is_file()


def test_compact_profile_dataset(tmp_path: Path) -> None:
    """A profile changes the samples, not the manifest schema; it is recorded next to the
    manifest, and a default run in the same folder removes the record."""
    manifest = generate_roi_dataset(tmp_path, n_per_task=2, seed=0, profile=COMPACT)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    default_lines = [
        json.loads(line)
        for line in generate_roi_dataset(tmp_path / "plain", n_per_task=2, seed=0)
        .read_text()
        .splitlines()
    ]
    assert [set(r) for r in lines] == [set(r) for r in default_lines]
    assert [r["id"] for r in lines] == [r["id"] for r in default_lines]
    assert json.loads((tmp_path / ROI_PROFILE_FILE).read_text()) == dataclasses.asdict(COMPACT)
    assert not (tmp_path / "plain" / ROI_PROFILE_FILE).exists()
    roi = read_manifest(manifest)
    for sample in roi:
        assert load_roi_image(sample, manifest).shape == (224, 224, 3)
        parsed = parse_answer(
            Task[sample.task.upper()],
            f"<answer>{sample.target}</answer>",
            sample.labels,
            options=sample.options,
        )
        assert type(parsed).__name__ != "Unparseable", sample.id
    det = [r["target"] for r in lines if r["task"] == "detection"]
    assert all("." not in t for t in det) and det != [
        r["target"] for r in default_lines if r["task"] == "detection"
    ]
    generate_roi_dataset(tmp_path, n_per_task=1, seed=0)
    assert not (tmp_path / ROI_PROFILE_FILE).exists()


def test_parallel_roi_generation_writes_the_same_files(tmp_path: Path) -> None:
    one = generate_roi_dataset(tmp_path / "one", 3, seed=5, profile=COMPACT)
    two = generate_roi_dataset(tmp_path / "two", 3, seed=5, profile=COMPACT, workers=2)
    assert one.read_text() == two.read_text()
    for image in sorted((tmp_path / "one" / "images").iterdir()):
        assert image.read_bytes() == (tmp_path / "two" / "images" / image.name).read_bytes()


def test_compact_prompt_style_changes_only_the_prompts(tmp_path: Path) -> None:
    """A dataset for a compact-prompt model: same samples and targets, the prompts are the
    compact ones build_prompt gives (what the served model is then asked)."""
    full = read_manifest(generate_roi_dataset(tmp_path / "full", 1, seed=3, profile=COMPACT))
    compact = read_manifest(
        generate_roi_dataset(
            tmp_path / "compact", 1, seed=3, profile=COMPACT, prompt_style="compact"
        )
    )
    wsi_full = read_manifest(generate_wsi_dataset(tmp_path / "wf", 1, seed=3, size_px=1024))
    wsi_compact = read_manifest(
        generate_wsi_dataset(tmp_path / "wc", 1, seed=3, size_px=1024, prompt_style="compact")
    )
    for a, b in zip(full + wsi_full, compact + wsi_compact, strict=True):
        assert a.model_dump(exclude={"prompt"}) == b.model_dump(exclude={"prompt"})
        assert b.prompt and b.prompt != a.prompt and a.prompt.startswith(("The image", "The input"))
        assert "<answer>" in a.prompt and "<answer>" not in b.prompt
        assert a.prompt.splitlines()[1] == b.prompt.splitlines()[0]  # the task line, kept
