"""Tests for smartpath.training.sampling: scale-balanced sampler and the task/scale key."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from smartpath.model.grammar import Scale, Task, scale_name, task_scale_key
from smartpath.training.sampling import ScaleBalancedSampler

IMBALANCED = ["roi"] * 1000 + ["wsi"] * 10  # wsi indices are 1000..1009


def _wsi_fraction(indices: list[int]) -> float:
    return sum(IMBALANCED[i] == "wsi" for i in indices) / len(indices)


def test_default_weights_balance_an_imbalanced_dataset() -> None:
    sampler = ScaleBalancedSampler(IMBALANCED, seed=0, num_samples=10_000)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 10_000
    assert all(0 <= i < len(IMBALANCED) for i in draws)
    assert abs(_wsi_fraction(draws) - 0.5) < 0.03  # natural fraction would be ~0.01
    counts = Counter(i for i in draws if i >= 1000)
    assert set(counts) == set(range(1000, 1010))  # every WSI sample is reused
    # within a scale, indices are uniform: each WSI sample ~ 500 of 5000 draws
    assert max(counts.values()) < 650 and min(counts.values()) > 350


def test_custom_weights_and_zero_weight_excludes_a_scale() -> None:
    weights = {"roi": 0.8, "wsi": 0.2}
    draws = list(ScaleBalancedSampler(IMBALANCED, weights, seed=1, num_samples=10_000))
    assert abs(_wsi_fraction(draws) - 0.2) < 0.02
    only_roi = list(ScaleBalancedSampler(IMBALANCED, {"roi": 1, "wsi": 0}, num_samples=2000))
    assert _wsi_fraction(only_roi) == 0.0
    # a zero-weight scale may be absent from the dataset
    assert len(list(ScaleBalancedSampler(["roi"] * 5, {"roi": 1.0, "wsi": 0.0}))) == 5


def test_deterministic_per_seed_and_epoch() -> None:
    a = ScaleBalancedSampler(IMBALANCED, seed=7, num_samples=500)
    b = ScaleBalancedSampler(IMBALANCED, seed=7, num_samples=500)
    first = list(a)
    assert first == list(b) == list(a)  # same seed/epoch; re-iterating repeats
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first
    assert list(ScaleBalancedSampler(IMBALANCED, seed=8, num_samples=500)) != first
    # (seed, epoch) = (0, 1) and (1, 0) are different streams
    c = ScaleBalancedSampler(IMBALANCED, seed=0, num_samples=500)
    c.set_epoch(1)
    assert list(c) != list(ScaleBalancedSampler(IMBALANCED, seed=1, num_samples=500))


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"'wsi'.*no 'wsi' samples"):
        ScaleBalancedSampler(["roi"] * 10)
    with pytest.raises(ValueError, match="no weight"):
        ScaleBalancedSampler(["roi", "wsi"], {"roi": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        ScaleBalancedSampler(["roi", "wsi"], {"roi": 1.0, "wsi": -0.5})
    with pytest.raises(ValueError, match="positive sum"):
        ScaleBalancedSampler(["roi", "wsi"], {"roi": 0.0, "wsi": 0.0})
    with pytest.raises(ValueError, match="unknown scale"):
        ScaleBalancedSampler(["roi", "tile"])
    with pytest.raises(ValueError, match="num_samples"):
        ScaleBalancedSampler(["roi", "wsi"], num_samples=0)


def test_scale_enums_and_dataloader() -> None:
    scales = [Scale.ROI] * 30 + [int(Scale.WSI)] * 2
    sampler = ScaleBalancedSampler(scales, seed=3, num_samples=64)
    loader = DataLoader(list(range(len(scales))), batch_size=16, sampler=sampler)
    batches = list(loader)
    assert len(batches) == 4
    assert torch.cat(batches).tolist() == list(sampler)
    assert sampler.probabilities == {"roi": 0.5, "wsi": 0.5}


def test_task_scale_key() -> None:
    assert task_scale_key(Task.DETECTION, Scale.WSI) == "detection/wsi"
    assert task_scale_key(int(Task.VQA), "ROI") == "vqa/roi"
    assert task_scale_key("classification", 2) == "classification/wsi"
    keys = {task_scale_key(t, s) for t in list(Task)[1:] for s in list(Scale)[1:]}
    assert len(keys) == 8
    assert scale_name(Scale.ROI) == "roi"
    with pytest.raises(ValueError):
        task_scale_key(Task.UNSPECIFIED, Scale.ROI)
    with pytest.raises(ValueError):
        task_scale_key("classification", "unspecified")
    with pytest.raises(ValueError):
        task_scale_key("captioning", "roi")


def test_task_weights_split_each_scale_among_its_tasks() -> None:
    # ROI: 900 detection samples and 100 classification ones; WSI: 10 classification.
    scales = ["roi"] * 1000 + ["wsi"] * 10
    tasks = ["detection"] * 900 + ["classification"] * 100 + ["classification"] * 10
    sampler = ScaleBalancedSampler(
        scales,
        {"roi": 0.8, "wsi": 0.2},
        seed=2,
        num_samples=20_000,
        tasks=tasks,
        task_weights={"classification": 3.0},  # detection is not named: weight 1
    )
    assert sampler.probabilities == pytest.approx(
        {"classification/roi": 0.6, "detection/roi": 0.2, "classification/wsi": 0.2}
    )
    draws = Counter(
        f"{tasks[i]}/{scales[i]}" for i in sampler
    )  # natural ROI mix would be 90 % detection
    assert draws["classification/roi"] / 20_000 == pytest.approx(0.6, abs=0.02)
    assert draws["detection/roi"] / 20_000 == pytest.approx(0.2, abs=0.02)
    assert draws["classification/wsi"] / 20_000 == pytest.approx(0.2, abs=0.02)
    # task weight 0 excludes a task; excluding every task of an active scale is an error
    only_cls = ScaleBalancedSampler(
        scales, {"roi": 1, "wsi": 0}, tasks=tasks, task_weights={"detection": 0}
    )
    assert {tasks[i] for i in only_cls} == {"classification"}
    with pytest.raises(ValueError, match="exclude every 'roi' task"):
        ScaleBalancedSampler(
            scales, tasks=tasks, task_weights={"detection": 0, "classification": 0}
        )
    # a task/scale key wins over the task's name on its scale only
    per_scale = ScaleBalancedSampler(
        scales + ["wsi"] * 10,
        seed=3,
        tasks=tasks + ["vqa"] * 10,
        task_weights={"classification": 3.0, "classification/wsi": 0.0},
    )
    assert per_scale.probabilities == pytest.approx(
        {"classification/roi": 0.375, "detection/roi": 0.125, "vqa/wsi": 0.5}
    )
    with pytest.raises(ValueError, match="unknown scale"):
        ScaleBalancedSampler(scales, tasks=tasks, task_weights={"classification/tile": 1.0})
    with pytest.raises(ValueError, match="go together"):
        ScaleBalancedSampler(scales, tasks=tasks)
    with pytest.raises(ValueError, match="unknown task"):
        ScaleBalancedSampler(scales, tasks=tasks, task_weights={"captioning": 1.0})


def test_without_task_weights_tasks_come_in_dataset_proportions() -> None:
    scales = ["roi"] * 1000
    tasks = ["detection"] * 900 + ["classification"] * 100
    draws = list(ScaleBalancedSampler(scales, {"roi": 1.0}, seed=4, num_samples=10_000))
    share = sum(tasks[i] == "detection" for i in draws) / len(draws)
    assert share == pytest.approx(0.9, abs=0.02)


def test_sft_curriculum_phases_set_the_task_mix_per_step() -> None:
    from smartpath.core.config.training import SftConfig, TrainingConfig
    from smartpath.training.manifest import RoiSample
    from smartpath.training.sft import step_batch

    sft = SftConfig(
        curriculum=[
            {"until_step": 3, "task_weights": {"detection": 0}},
            {"until_step": 5, "task_weights": {"classification": 0}},
        ]
    )
    assert sft.task_weights_at(0, None) == {"detection": 0}
    assert sft.task_weights_at(2, None) == {"detection": 0}
    assert sft.task_weights_at(3, None) == {"classification": 0}
    assert sft.task_weights_at(5, {"vqa": 2.0}) == {"vqa": 2.0}
    with pytest.raises(ValueError, match="strictly increasing"):
        SftConfig(
            curriculum=[
                {"until_step": 5, "task_weights": {}},
                {"until_step": 5, "task_weights": {}},
            ]
        )

    def sample(i: int, task: str) -> RoiSample:
        box = '[{"label": "lymphocyte", "box": [1, 2, 3, 4]}]'
        target = "tumour" if task == "classification" else box
        labels = ["tumour", "stroma"] if task == "classification" else ["lymphocyte"]
        return RoiSample(id=f"s{i}", image="a.png", task=task, labels=labels, target=target)

    items = [(sample(i, "classification"), None) for i in range(10)]
    items += [(sample(10 + i, "detection"), None) for i in range(10)]
    t = TrainingConfig(data={"scale_weights": {"roi": 1.0, "wsi": 0.0}}, sft=sft)
    early = step_batch(items, t, 0, 1, 64, sft.task_weights_at(1, None))
    assert {s.task for s, _ in early} == {"classification"}
    later = step_batch(items, t, 0, 4, 64, sft.task_weights_at(4, None))
    assert {s.task for s, _ in later} == {"detection"}
    mixed = step_batch(items, t, 0, 6, 64, sft.task_weights_at(6, None))
    assert {s.task for s, _ in mixed} == {"classification", "detection"}


def test_sft_fits_the_slide_scaler_on_training_slides_only_when_building() -> None:
    from smartpath.core.config.training import TrainingConfig
    from smartpath.model.mllm import SlideInput
    from smartpath.training.manifest import RoiSample, WsiSample
    from smartpath.training.sft import build_model

    t = TrainingConfig(model={"preset": "tiny", "aggregator": {"feature_dim": 4}})
    g = torch.Generator().manual_seed(0)
    slides = [SlideInput(torch.randn(20, 4, generator=g) + i, torch.zeros(20, 2)) for i in range(3)]
    wsi = [
        (WsiSample(id=f"w{i}", features=f"w{i}.safetensors", task="vqa", target="yes"), s)
        for i, s in enumerate(slides)
    ]
    roi = [(RoiSample(id="r", image="a.png", task="vqa", target="yes"), None)]
    model = build_model(t, None, roi + wsi)
    agg = model.aggregator
    means = torch.stack([s.features.mean(0) for s in slides])
    torch.testing.assert_close(agg.pooled_centre[:4], means.mean(0))
    assert (agg.pooled_scale[:4] - means.std(0, correction=0)).abs().max() < 1e-5
    untouched = build_model(t, None, roi)  # no slides: the scaler stays the identity
    assert untouched.aggregator.pooled_centre.abs().max() == 0
