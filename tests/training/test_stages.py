"""Stages and rewards chosen by name: the registry, and what is refused before any worker starts
(no Ray needed)."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from smartpath.core.config import load_config
from smartpath.core.config.training import GrpoConfig
from smartpath.training.engine import get_stage, run_stage, stages, train_worker
from smartpath.training.grpo import GrpoStage
from smartpath.training.sft import SftStage


def test_registry_holds_the_built_in_stages() -> None:
    known = stages()
    assert known["sft"] is SftStage and known["grpo"] is GrpoStage
    assert get_stage("sft") is SftStage and get_stage("grpo") is GrpoStage


def test_unknown_stage_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown training stage 'dpo'; known stages: grpo, sft"):
        get_stage("dpo")
    with pytest.raises(ValueError, match=r"known stages: grpo, sft"):
        run_stage(load_config(), "dpo")


def test_the_worker_entry_pickles_by_reference() -> None:
    # Ray ships the per-worker function to the workers; the stage travels by name.
    assert pickle.loads(pickle.dumps(train_worker)) is train_worker


def test_grpo_refuses_an_unknown_reward_before_starting() -> None:
    config = load_config(training={"grpo": {"rewards": ["task", "exact"]}})
    with pytest.raises(
        ValueError,
        match=r"unknown reward\(s\) 'exact'; known rewards: "
        r"classification, detection, format, segmentation, task, vqa",
    ):
        run_stage(config, "grpo")


def test_reward_weights_from_the_config() -> None:
    assert GrpoConfig().reward_weights() == {"task": 1.0, "format": 0.1}
    assert GrpoConfig(format_weight=0.5).reward_weights() == {"task": 1.0, "format": 0.5}
    assert GrpoConfig(rewards=["task"], format_weight=0.5).reward_weights() == {"task": 1.0}
    with pytest.raises(ValidationError):
        GrpoConfig(rewards=[])
    with pytest.raises(ValidationError, match="twice"):
        GrpoConfig(rewards=["task", "task"])
