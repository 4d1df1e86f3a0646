"""Tests for smartpath.training.sampling: scale-balanced sampler and the task/scale key."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from smartpath.model.grammar import Scale, Task
from smartpath.training.sampling import ScaleBalancedSampler, scale_name, task_scale_key

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
