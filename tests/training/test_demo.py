"""The demo recipe's evaluation pieces, and the published demo model with its report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smartpath.client.cli import main as cli_main
from smartpath.core.config import StorageConfig
from smartpath.core.config.model import ModelConfig
from smartpath.core.storage import make_store
from smartpath.model.base import base_from_config
from smartpath.model.checkpoint import load_checkpoint
from smartpath.model.grammar import Task, Unparseable, parse_answer
from smartpath.model.mllm import SmartPathModel
from smartpath.model.slide_features import load_features
from smartpath.training.collate import Collator
from smartpath.training.data import load_items
from smartpath.training.demo import (
    DEMO_MODEL_DIR,
    PROMPT_STYLE,
    REPORT_DIR,
    WSI_STAIN_COPIES,
    demo_config,
    evaluate_model,
    expert_usage,
    generate_demo_data,
)
from smartpath.training.evaluate import constant_baseline, predict, task_metrics
from smartpath.training.manifest import WsiSample, read_manifest
from smartpath.training.stain import restain_manifest
from smartpath.training.synthetic.dataset import generate_roi_dataset
from smartpath.training.synthetic.roi import COMPACT

ALL_KEYS = (
    "classification/roi", "classification/wsi", "detection/roi", "segmentation/roi", "vqa/roi",
    "vqa/wsi",
)  # fmt: skip
# What README.md claims for the bundled model, on the plain and the stain-shifted held-out set.
ABOVE_CHANCE = {
    "plain": ("classification/roi", "classification/wsi", "detection/roi", "segmentation/roi",
              "vqa/roi"),
    "stain-shifted": ("classification/roi", "classification/wsi", "detection/roi",
                      "segmentation/roi", "vqa/roi"),
}  # fmt: skip
GRPO_IMPROVES_ON_SFT: tuple[str, ...] = ()  # by more than 2 SE of the paired difference: none now


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("demo-data")
    manifest = generate_roi_dataset(
        root, 4, seed=1, profile=COMPACT, splits=(0, 0, 1), prompt_style=PROMPT_STYLE
    )
    return load_items([str(manifest)], "test")


def test_evaluate_model_and_expert_usage(items, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", aggregator={"feature_dim": 32, "num_tokens": 8})
    base, tokenizer = base_from_config(cfg)
    model = SmartPathModel(cfg, base, tokenizer)
    model.save(tmp_path / "m")
    store = make_store(StorageConfig(local_root=tmp_path / "storage"))
    [(metrics, predictions)], usage = evaluate_model(
        str(tmp_path / "m"), [items], store, max_new_tokens=8
    )
    assert set(metrics) == {"classification/roi", "detection/roi", "segmentation/roi", "vqa/roi"}
    assert all(m["n"] == 4 for m in metrics.values())
    assert [p.sample.id for p in predictions] == [s.id for s, _ in items]
    # Mean gate weights per key: E entries that sum to 1 (top-k weights sum to 1 per request).
    assert set(usage) == set(metrics)
    for weights in usage.values():
        assert len(weights) == cfg.experts.num_experts
        assert sum(weights) == pytest.approx(1.0, abs=0.01)
    direct = expert_usage(model, Collator(cfg, tokenizer, model.slide_tokens), items[:1])
    assert sum(direct[next(iter(direct))]) == pytest.approx(1.0, abs=0.01)


def test_demo_data_holds_plain_and_stain_shifted_held_out_sets(tmp_path: Path) -> None:
    """The stain-shifted set is the held-out set's samples (same ids and targets) in another
    lab's stain; training adds stain-jittered copies of the training slides only."""
    data = generate_demo_data(tmp_path, roi_per_task=12, wsi_slides=8, seed=3)
    assert data.held_out == data.train[:2]

    def test_split(manifests: list[str]) -> list:
        return [s for m in manifests for s in read_manifest(m) if s.split == "test"]

    plain, shifted = test_split(data.held_out), test_split(data.stain_shifted)
    assert plain and [(s.id, s.target) for s in shifted] == [(s.id, s.target) for s in plain]
    wsi_plain = {s.id: s for s in plain if isinstance(s, WsiSample)}
    for s in shifted:
        if isinstance(s, WsiSample):
            a = load_features(Path(data.held_out[1]).parent / wsi_plain[s.id].features)
            b = load_features(Path(data.stain_shifted[1]).parent / s.features)
            assert a.features.shape == b.features.shape and not np.allclose(a.features, b.features)
    copies = read_manifest(data.train[2])
    train_wsi = [s for s in read_manifest(data.train[1]) if s.split == "train"]
    assert len(copies) == WSI_STAIN_COPIES * len(train_wsi) > 0
    assert {s.id.split("~")[0] for s in copies} == {s.id for s in train_wsi}
    assert len({s.id for s in copies}) == len(copies) and {s.split for s in copies} == {"train"}
    assert generate_demo_data(tmp_path, roi_per_task=12, wsi_slides=8, seed=3) == data  # reused


def test_train_commands_refuse_an_empty_manifest_list(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["train", "sft"]) == 2
    assert "training.data.manifests is empty" in capsys.readouterr().err


def test_published_demo_model_and_its_report(items) -> None:
    report = json.loads((REPORT_DIR / "report.json").read_text())
    baseline, grpo = report["baseline"], report["stages"]["grpo"]
    assert set(grpo) == set(ALL_KEYS)
    [shifted] = report["held_out"]
    comparisons = {"plain": report["comparison"], "stain-shifted": shifted["comparison"]}
    for name, comparison in comparisons.items():
        assert set(comparison) == set(ALL_KEYS)
        for key, entry in comparison.items():
            after, before = entry["stages"]["grpo"], entry["stages"]["sft"]
            # The verdicts follow from the numbers: "yes" beats the best constant answer by
            # more than 2 standard errors, "marginal" by less, "no" not at all; GRPO's change
            # is judged by the paired SE of its per-sample differences with SFT.
            margin = after["score"] - baseline[key]["score"]
            expected = (
                "yes" if margin > 2 * after["score_se"] else "marginal" if margin > 0 else "no"
            )
            assert after["above_chance_verdict"] == expected, (name, key)
            change = after["vs_previous"]
            assert change["paired"] and change["stage"] == "sft"
            assert abs(change["delta"] - (after["score"] - before["score"])) < 1e-9
            bound = 2 * change["se"]
            expected = (
                "improved" if change["delta"] > bound
                else "worse" if change["delta"] < -bound
                else "within noise"
            )  # fmt: skip
            assert change["verdict"] == expected, (name, key)
        for key in ABOVE_CHANCE[name]:
            assert comparison[key]["stages"]["grpo"]["above_chance_verdict"] == "yes", (name, key)
    for key in GRPO_IMPROVES_ON_SFT:
        assert report["comparison"][key]["stages"]["grpo"]["vs_previous"]["verdict"] == "improved"
    assert report["extra"]["total_s"] < 60 * 60
    # The report was made by the recipe in the code (model, data mix, curriculum, optimizers).
    recipe = demo_config(Path("unused"), [], sft_steps=1, grpo_steps=1).training
    recorded = report["extra"]["training"]
    # Read through today's schema: fields added since the report take their defaults.
    for section, skip in [("model", "manifests"), ("data", "manifests"), ("distributed", ""),
                          ("sft", "steps"), ("grpo", "steps")]:  # fmt: skip
        schema = type(getattr(recipe, section))
        expected = getattr(recipe, section).model_dump(mode="json", exclude={skip})
        got = {k: v for k, v in recorded[section].items() if k != skip}
        if section == "data":
            got["manifests"] = []
        assert schema.model_validate(got).model_dump(mode="json", exclude={skip}) == expected
    assert (REPORT_DIR / "report.md").read_text().count("|") > 20
    # The published checkpoint records the report's numbers and answers in the grammar.
    _, manifest, _ = load_checkpoint(DEMO_MODEL_DIR)
    for key in ALL_KEYS:
        assert manifest.metrics[f"grpo/{key}/score"] == pytest.approx(grpo[key]["score"])
    model = SmartPathModel.load(DEMO_MODEL_DIR)
    collator = Collator(model.cfg, model.tokenizer, model.slide_tokens)
    predictions = predict(model, collator, items, batch_size=8, max_new_tokens=160)
    parsed = [
        parse_answer(Task[p.sample.task.upper()], p.completion, p.sample.labels,
                     options=p.sample.options)
        for p in predictions
    ]  # fmt: skip
    assert not any(isinstance(a, Unparseable) for a in parsed)  # decoded within the grammar


LIVE_ABOVE_CHANCE = {
    "plain": ("classification/roi", "detection/roi", "segmentation/roi", "vqa/roi"),
    "lab-b": ("classification/roi", "detection/roi", "segmentation/roi", "vqa/roi"),
}


@pytest.fixture(scope="module")
def fresh_rois(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 train and 60 test ROIs per task from a seed no recipe uses."""
    return generate_roi_dataset(
        tmp_path_factory.mktemp("fresh"), 120, seed=4242, profile=COMPACT, splits=(0.5, 0, 0.5),
        prompt_style=PROMPT_STYLE,
    )  # fmt: skip


@pytest.mark.parametrize("stain", list(LIVE_ABOVE_CHANCE))
def test_the_published_model_beats_chance_on_fresh_rois(
    fresh_rois: Path, stain: str, tmp_path: Path
) -> None:
    """Recomputed, not read from the report: the committed model on 60 fresh ROIs per task, as
    generated and re-stained as another lab would (``stain.LAB_B_STAINING``), against the
    constant baseline fitted on 60 more. Every answer parses; where the README claims more than
    chance, the score is more than 2 SE above it."""
    manifest = fresh_rois
    if stain == "lab-b":
        manifest = restain_manifest(fresh_rois, tmp_path / "lab-b", split="test")
    train = load_items([str(fresh_rois)], "train")
    test = load_items([str(manifest)], "test")
    model = SmartPathModel.load(DEMO_MODEL_DIR)
    collator = Collator(model.cfg, model.tokenizer, model.slide_tokens)
    scores = task_metrics(predict(model, collator, test, batch_size=16, max_new_tokens=160))
    chance = constant_baseline([s for s, _ in train], [s for s, _ in test])
    assert set(scores) == {"classification/roi", "detection/roi", "segmentation/roi", "vqa/roi"}
    for key, m in scores.items():
        assert m["n"] == 60 and m["parse_rate"] == 1.0, key
    for key in LIVE_ABOVE_CHANCE[stain]:
        margin = scores[key]["score"] - chance[key]["score"]
        assert margin > 2 * scores[key]["score_se"], (key, scores[key], chance[key])
