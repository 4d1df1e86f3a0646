"""The synthetic datasets are valid manifests: the generator and the reader agree."""

from __future__ import annotations

from pathlib import Path

from smartpath.model.grammar import Task, parse_answer
from smartpath.training.manifest import load_roi_image, read_manifest
from smartpath.training.synthetic.dataset import generate_roi_dataset, generate_wsi_dataset


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
