"""The evaluation report: files, JSON round trip, markdown rows, verdicts and readable PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from smartpath.model.grammar import (
    DetectionAnswer,
    SegmentationAnswer,
    Task,
    format_completion,
    parse_detections,
    parse_polygons,
)
from smartpath.training.evaluate import (
    Prediction,
    constant_baseline,
    paired_difference,
    task_metrics,
)
from smartpath.training.manifest import RoiSample
from smartpath.training.report import HeldOut, write_report
from smartpath.training.synthetic.roi import make_roi_sample


def ok(answer: str) -> str:
    return format_completion("", answer)


def _manifest_sample(task: Task, index: int, split: str) -> tuple[RoiSample, np.ndarray]:
    syn = make_roi_sample(task, seed=7, index=index)
    sample = RoiSample(
        id=f"{task.name.lower()}-{split}-{index}",
        image="x.png",
        task=task.name.lower(),
        prompt=syn.prompt,
        labels=list(syn.labels) if syn.labels else None,
        options=list(syn.options) if syn.options else None,
        target=syn.target_text,
        split=split,
    )
    return sample, syn.image


def _shifted_boxes(target: str, dx: float) -> str:
    ans = parse_detections(target)
    assert isinstance(ans, DetectionAnswer)
    items = []
    for k, d in enumerate(ans.detections):
        if k % 3 == 0:
            continue  # drop every third box
        fits = max(d.box) + dx <= 1000
        items.append({"label": d.label, "box": [v + dx if fits else v for v in d.box]})
    return json.dumps(items)


def _shrunk_polygons(target: str, factor: float) -> str:
    ans = parse_polygons(target)
    assert isinstance(ans, SegmentationAnswer)
    items = []
    for p in ans.polygons:
        pts = p.array()
        c = pts.mean(0)
        items.append({"label": p.label, "polygon": (c + (pts - c) * factor).round(1).tolist()})
    return json.dumps(items)


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    """A small fake run: eval samples, SFT/GRPO predictions, baseline and histories."""
    images: dict[str, np.ndarray] = {}
    evals: list[RoiSample] = []
    train: list[RoiSample] = []
    for task in (Task.CLASSIFICATION, Task.DETECTION, Task.SEGMENTATION, Task.VQA):
        for i in range(3):
            s, img = _manifest_sample(task, i, "test")
            evals.append(s)
            images[s.id] = img
        for i in range(3, 6):
            train.append(_manifest_sample(task, i, "train")[0])

    def preds(quality: float) -> list[Prediction]:
        out = []
        for k, s in enumerate(evals):
            if s.task == "classification":
                right = k % 3 < round(3 * quality)
                other = next(lab for lab in s.labels or [] if lab != s.target)
                out.append(Prediction(s, ok(s.target if right else other)))
            elif s.task == "detection":
                out.append(Prediction(s, ok(_shifted_boxes(s.target, 30 * (1 - quality)))))
            elif s.task == "segmentation":
                out.append(Prediction(s, ok(_shrunk_polygons(s.target, 0.5 + 0.5 * quality))))
            else:
                text = s.target if quality > 0.5 else "no"
                out.append(Prediction(s, ok(text) if k % 3 else "unformatted " + text))
        return out

    sft, grpo = preds(1 / 3), preds(1.0)
    rng = np.random.default_rng(0)
    sft_hist = [
        {"step": i, "loss": 3.0 * math.exp(-i / 15) + 0.1 * rng.random(), "lr": 1e-4 * (1 - i / 60)}
        for i in range(60)
    ]
    for row in sft_hist:
        row["lm_loss"] = row["loss"] * 0.9
    grpo_hist = [
        {
            "step": i,
            "reward": 0.3 + 0.05 * i,
            "reward/classification/roi": 0.2 + 0.06 * i,
            "reward/detection/roi": 0.4 + 0.02 * i,
            "task_reward": 0.25 + 0.05 * i,
            "kl": 0.001 * i,
            "lr": 1e-6,
            "format_rate": min(1.0, 0.5 + 0.1 * i),
            "resumes": 0,
            "rollout_s": 1.5,
        }
        for i in range(12)
    ]
    return {
        "evals": evals,
        "images": images,
        "baseline": constant_baseline(train, evals),
        "stages": {"sft": task_metrics(sft), "grpo": task_metrics(grpo)},
        "history": {"sft": sft_hist, "grpo": grpo_hist},
        "examples": [grpo[0], sft[4], grpo[6], sft[9], grpo[10]],
        "predictions": {"sft": sft, "grpo": grpo, "weak": preds(0.0)},
    }


@pytest.fixture(scope="module")
def report(run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("report")
    written = write_report(
        out,
        title="Tiny run",
        stages=run["stages"],
        baseline=run["baseline"],
        history=run["history"],
        examples=run["examples"],
        image_loader=lambda s: run["images"][s.id],
        extra={"config": {"lr": 1e-4}, "path": Path("/tmp/x"), "nan": math.nan},
    )
    return out, written


def test_files_exist(report) -> None:
    out, written = report
    assert {"report.json", "report.md", "plots/scores.png"} <= set(written)
    assert {"plots/history_sft.png", "plots/history_grpo.png"} <= set(written)
    assert sum(k.startswith("plots/examples/") for k in written) == 5
    for rel, path in written.items():
        assert path == out / rel and path.is_file() and path.stat().st_size > 0


def test_json_round_trips(report, run) -> None:
    out, written = report

    def no_nan(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name}")

    data = json.loads((out / "report.json").read_text(), parse_constant=no_nan)
    assert data["title"] == "Tiny run"
    for stage, metrics in run["stages"].items():
        for key, m in metrics.items():
            for name, value in m.items():
                assert data["stages"][stage][key][name] == pytest.approx(value), (stage, key)
    assert (
        data["baseline"]["classification/roi"]["constant"]
        == (run["baseline"]["classification/roi"]["constant"])
    )
    assert data["history"]["sft"][5]["loss"] == pytest.approx(run["history"]["sft"][5]["loss"])
    assert data["extra"] == {"config": {"lr": 1e-4}, "path": "/tmp/x", "nan": None}
    assert sorted(data["plots"]) == sorted(k for k in written if k.startswith("plots/"))
    assert [e["id"] for e in data["examples"]] == [p.sample.id for p in run["examples"]]
    assert data["examples"][0]["score"] == pytest.approx(1.0)  # grpo's classification is right


def test_verdicts(report, run) -> None:
    out, _ = report
    comp = json.loads((out / "report.json").read_text())["comparison"]
    assert set(comp) == {"classification/roi", "detection/roi", "segmentation/roi", "vqa/roi"}
    for key, entry in comp.items():
        grpo, sft = entry["stages"]["grpo"], entry["stages"]["sft"]
        base = run["baseline"][key]["score"]
        assert entry["baseline"] == pytest.approx(base)
        assert grpo["score"] == pytest.approx(run["stages"]["grpo"][key]["score"])
        assert grpo["above_chance"] == (grpo["score"] > base)
        assert grpo["vs_previous"]["stage"] == "sft"
        assert grpo["vs_previous"]["delta"] == pytest.approx(grpo["score"] - sft["score"])
        assert not grpo["vs_previous"]["paired"]  # no paired differences given: the unpaired SE
        assert grpo["vs_previous"]["se"] == pytest.approx(
            math.hypot(grpo["score_se"], sft["score_se"])
        )
        assert entry["grpo_improved_on_sft"] == (grpo["score"] > sft["score"])
        assert "vs_previous" not in sft
    # GRPO's predictions are perfect: it beats SFT and chance everywhere
    assert all(e["grpo_improved_on_sft"] for e in comp.values())
    assert all(e["stages"]["grpo"]["above_chance"] for e in comp.values())
    assert comp["classification/roi"]["headline"] == "accuracy"
    assert comp["detection/roi"]["headline"] == "f1@0.5"


def test_paired_verdicts_and_another_held_out_set(run, tmp_path: Path) -> None:
    """GRPO vs SFT is judged by the paired SE when given; a second held-out set (GRPO as weak as
    the weak predictions there) gets its own comparison, table and plot."""
    p = run["predictions"]
    paired = {"grpo": paired_difference(p["sft"], p["grpo"])}
    shifted = HeldOut(
        "stain-shifted",
        {"sft": task_metrics(p["sft"]), "grpo": task_metrics(p["weak"])},
        {"grpo": paired_difference(p["sft"], p["weak"])},
    )
    written = write_report(
        tmp_path, title="Paired", stages=run["stages"], baseline=run["baseline"],
        history={}, paired=paired, held_out=[shifted],
    )  # fmt: skip
    data = json.loads((tmp_path / "report.json").read_text())
    for key, vs in ((k, e["stages"]["grpo"]["vs_previous"]) for k, e in data["comparison"].items()):
        assert vs["paired"] and vs["se"] == pytest.approx(paired["grpo"][key]["se"])
        assert vs["delta"] == pytest.approx(paired["grpo"][key]["delta"])
    [other] = data["held_out"]
    assert other["name"] == "stain-shifted" and other["plot"] in written
    for key, entry in other["comparison"].items():
        vs, pair = entry["stages"]["grpo"]["vs_previous"], shifted.paired["grpo"][key]
        assert entry["stages"]["grpo"]["score"] == pytest.approx(
            shifted.stages["grpo"][key]["score"]
        )
        assert vs["delta"] == pytest.approx(pair["delta"])
        worse, better = vs["delta"] < -2 * pair["se"], vs["delta"] > 2 * pair["se"]
        assert vs["verdict"] == ("worse" if worse else "improved" if better else "within noise")
    md = (tmp_path / "report.md").read_text()
    assert "## Held-out set: stain-shifted" in md and "± paired" in md


def test_markdown(report, run) -> None:
    out, written = report
    md = (out / "report.md").read_text()
    assert md.startswith("# Tiny run")
    for key in run["stages"]["grpo"]:
        assert f"| `{key}` |" in md  # summary row
        assert f"### `{key}`" in md  # per-task table
    assert "grpo vs sft" in md and "grpo above chance" in md
    acc = run["stages"]["sft"]["classification/roi"]["accuracy"]
    assert (
        f"| accuracy | {run['baseline']['classification/roi']['accuracy']:.3f} | {acc:.3f} |" in md
    )
    for rel in written:
        if rel.endswith(".png"):
            assert f"]({rel})" in md, rel
    assert "## Run details" in md and '"lr": 0.0001' in md


def test_pngs_are_real_images(report) -> None:
    _, written = report
    for rel, path in written.items():
        if not rel.endswith(".png"):
            continue
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.width >= 400 and im.height >= 300, rel
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.std() > 10, rel  # not a blank canvas
        if "examples" in rel and ("detection" in rel or "segmentation" in rel):
            red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
            green = (pixels[..., 1] > 120) & (pixels[..., 0] < 80) & (pixels[..., 2] < 110)
            assert red.sum() > 50 and green.sum() > 50, rel  # prediction and GT are drawn


def test_missing_pieces_are_skipped(tmp_path: Path, run) -> None:
    only_cls = {"sft": {"classification/roi": run["stages"]["sft"]["classification/roi"]}}
    seg = run["evals"][6]
    written = write_report(
        tmp_path,
        title="Partial",
        stages={**only_cls, "grpo": {}},
        baseline={},
        history={"sft": [], "grpo": [{"step": 0, "note": "text only"}]},
        examples=[Prediction(seg, "garbage")],  # no image loader: drawn on a blank canvas
    )
    assert not any(k.startswith("plots/history") for k in written)
    assert sum(k.startswith("plots/examples/") for k in written) == 1
    data = json.loads((tmp_path / "report.json").read_text())
    entry = data["comparison"]["classification/roi"]
    assert entry["baseline"] is None and "above_chance" not in entry["stages"]["sft"]
    assert "grpo" not in entry["stages"] and "grpo_improved_on_sft" not in entry
    assert data["examples"][0]["score"] == 0.0
    md = (tmp_path / "report.md").read_text()
    assert "| `classification/roi` |" in md and "training curves](" not in md
    empty = write_report(tmp_path / "empty", title="Empty", stages={}, baseline={}, history={})
    assert set(empty) == {"report.json", "report.md"}
    assert "No tasks evaluated." in empty["report.md"].read_text()
    (tmp_path / "plots" / "examples" / "099_old-run.png").write_bytes(b"stale")
    write_report(tmp_path, title="Again", stages={}, baseline={}, history={}, examples=[])
    assert not list((tmp_path / "plots" / "examples").glob("*.png"))  # no stale overlays
