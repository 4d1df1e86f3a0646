"""SFT → GRPO on 2 Ray Train workers with DeepSpeed ZeRO-2, checkpoints in S3, and resume after
a worker is killed. Real Ray Train, real DeepSpeed (CPU), real S3 (moto_server on loopback)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from smartpath.core.config import SmartPathConfig, StorageConfig, load_config
from smartpath.core.storage import make_store
from smartpath.model.grammar import Task
from smartpath.model.mllm import SmartPathModel
from smartpath.training.engine import read_history, run_stage
from smartpath.training.features import featurize_manifest
from smartpath.training.synthetic.dataset import generate_roi_dataset, generate_wsi_dataset

FEATURE_DIM = 32  # stain-stats-v1


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("data")
    roi = generate_roi_dataset(root / "roi", 6, seed=0, tasks=(Task.CLASSIFICATION, Task.VQA))
    wsi = generate_wsi_dataset(root / "wsi", 3, seed=0, size_px=1024, splits=(1.0, 0.0, 0.0))
    return [str(roi), str(featurize_manifest(wsi, progress=False))]


def training_config(
    storage: StorageConfig, manifests: list[str], run_root: str, **training
) -> SmartPathConfig:
    return load_config(
        storage=storage,
        training={
            "run_root": run_root,
            "model": {"aggregator": {"feature_dim": FEATURE_DIM, "num_tokens": 4}},
            "data": {"manifests": manifests},
            "sft": {"steps": 4, "batch_size": 2, "train_base": True},
            "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 12},
            "distributed": {"num_workers": 2, "max_failures": 1},
            "checkpoint_every": 2,
            **training,
        },
    )


def test_sft_then_grpo_on_two_workers_with_checkpoints_in_s3(
    ray_session: None, s3_config: StorageConfig, manifests: list[str], bucket_name: str
) -> None:
    config = training_config(s3_config, manifests, f"s3://{bucket_name}/runs", name="smoke")
    store = make_store(s3_config)

    sft = run_stage(config, "sft")
    assert sft.error is None
    history = read_history(config.training.stage_dir("sft"), store)
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
    keys = [o.ref.key for o in store.list(bucket_name, "runs/smoke/sft/")]
    # Two checkpoints (steps 2 and 4) in S3, each with both ranks' optimizer shards.
    shards = [k for k in keys if k.endswith("_optim_states.pt")]
    assert len({k.split("/")[3] for k in shards}) == 2 and len(shards) == 4, keys
    sft_model = SmartPathModel.load(config.training.model_uri("sft"), store)

    grpo = run_stage(config, "grpo")
    assert grpo.error is None
    rows = read_history(config.training.stage_dir("grpo"), store)
    assert [row["step"] for row in rows] == [1, 2]
    assert {"reward", "kl", "clip_fraction", "format_rate"} <= set(rows[0])
    assert any(k.startswith("reward/") for k in rows[0])
    grpo_model = SmartPathModel.load(config.training.model_uri("grpo"), store)
    changed = [
        n
        for n, p in grpo_model.state_dict().items()
        if not torch.equal(p, sft_model.state_dict()[n])
    ]
    # GRPO trains experts/aggregator/router only (train_base False) and moved some of them.
    assert changed and all(
        n.startswith(("aggregator.", "router.")) or ".lora_" in n for n in changed
    ), changed


def test_killed_worker_resumes_from_the_last_checkpoint(
    ray_session: None, s3_config: StorageConfig, manifests: list[str], bucket_name: str
) -> None:
    steps = 14
    config = training_config(
        s3_config,
        manifests,
        f"s3://{bucket_name}/runs",
        name="resume",
        sft={"steps": steps, "batch_size": 2, "train_base": True},
        checkpoint_every=3,
    )
    store = make_store(s3_config)
    store.ensure_bucket(bucket_name)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(run_stage(config, "sft")))
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        keys = [o.ref.key for o in store.list(bucket_name, "runs/resume/sft/")]
        # Ray Train writes its snapshot once a checkpoint of every rank is registered.
        if any(k.endswith("checkpoint_manager_snapshot.json") for k in keys):
            workers = train_worker_pids()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    thread.join(timeout=400)
    assert killed is not None, "no checkpoint appeared before the run ended"
    assert not thread.is_alive() and results and results[0].error is None
    history = read_history(config.training.stage_dir("sft"), store)
    # Every step exactly once in the final history, and the run restarted once from a
    # checkpoint (rows after the restart carry resumes == 1).
    assert [row["step"] for row in history] == list(range(1, steps + 1))
    assert max(row["resumes"] for row in history) == 1
    first_resumed = min(row["step"] for row in history if row["resumes"] == 1)
    assert (first_resumed - 1) % 3 == 0 and first_resumed > 1
    SmartPathModel.load(config.training.model_uri("sft"), store)


def train_worker_pids() -> list[int]:
    """PIDs of this machine's Ray Train workers (Ray names them ``ray::RayTrainWorker``)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
            pids.append(proc.info["pid"])
    return sorted(pids)


def test_entry_point_parses_config(tmp_path: Path) -> None:
    from smartpath.training.engine import stage_main

    with pytest.raises(SystemExit):
        stage_main("sft", ["--config", str(tmp_path / "missing.yaml"), "--bogus"])
