"""Typed training configuration: the ``training`` section of the SmartPath config tree.

Design decisions:

- One tree for both stages: data, model, distribution and checkpointing are shared; ``sft`` and
  ``grpo`` hold what differs (steps, batch, optimizer, sampling). The same YAML drives a laptop
  run (1 CPU worker), the CI smoke run (2 CPU workers) and a cluster (N GPU workers): only
  ``distributed`` changes.
- A run lives under ``{run_root}/{name}/``, a local folder or an ``s3://bucket/prefix``: Ray
  Train's checkpoints per stage (``sft/``, ``grpo/``), the exported models (``sft/model``,
  ``grpo/model``, SmartPath safetensors checkpoints) and the per-step history.
- GRPO starts from the SFT model of the same run unless ``grpo.init`` names another checkpoint;
  that starting model is also the frozen KL reference (kept as a copy of its trainable
  parameters only, see :mod:`smartpath.training.grpo`).
- What decides whether a run fits on its GPUs sits in ``distributed``: the ZeRO stage and
  ``gradient_checkpointing``; the parameter dtype is the model's (``model.dtype``: "auto" is
  bfloat16 on GPU workers, float32 on CPU), and DeepSpeed runs bf16/fp16 mixed precision when
  that dtype is bfloat16/float16.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from smartpath.core.config.model import ModelConfig

__all__ = [
    "DataConfig",
    "DistributedConfig",
    "GrpoConfig",
    "OptimConfig",
    "SftConfig",
    "TaskPhase",
    "TrainingConfig",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio · lr``."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None: off).")


class DataConfig(_Strict):
    """Where samples come from and how they are mixed."""

    manifests: list[str] = Field(
        default_factory=list,
        description="JSONL manifests (local paths or s3:// URIs); WSI samples must reference "
        "precomputed features (see smartpath.training.features).",
    )
    train_split: str = Field("train", description="Split trained on.")
    eval_split: str = Field("test", description="Held-out split evaluated on.")
    scale_weights: dict[str, float] = Field(
        default_factory=lambda: {"roi": 0.5, "wsi": 0.5},
        description="Scale-balanced sampling: draw probability per scale (0 excludes a scale).",
    )
    task_weights: dict[str, float] | None = Field(
        None,
        description="Task-balanced sampling within each scale: weight per task name "
        "(classification, detection, segmentation, vqa) or per task/scale key "
        "(classification/wsi); unnamed tasks weigh 1, 0 excludes. "
        "None draws a scale's samples uniformly (tasks in their dataset proportions).",
    )
    max_eval_per_task: int = Field(
        40, ge=1, description="Held-out samples evaluated per task/scale key."
    )
    stain_jitter: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="HED stain augmentation of training ROIs (SFT batches and GRPO prompts): "
        "each stain's concentration scaled by U(1-σ, 1+σ) and shifted by U(-σ, σ); 0 is off. "
        "0.05 is Tellez et al.'s HED-light, 0.2 HED-strong.",
    )


class DistributedConfig(_Strict):
    """Ray Train workers and DeepSpeed ZeRO."""

    num_workers: int = Field(1, ge=1, description="Data-parallel Ray Train workers.")
    use_gpu: bool = Field(
        False,
        description="One GPU per worker (bf16 when model.dtype is auto); False runs on CPU.",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    zero_stage: Literal[2] = Field(
        2,
        description="DeepSpeed ZeRO stage. Stage 2 (sharded optimizer state and gradients) "
        "keeps whole weights on every rank, which GRPO's rollouts need.",
    )
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts from the last checkpoint before giving up."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder (and vision) block's activations in the backward "
        "pass instead of keeping them (non-reentrant activation checkpointing, SFT and GRPO "
        "updates): about a third more compute for activation memory of one block plus the "
        "block inputs (python -m smartpath.training.memory estimates both).",
    )


class TaskPhase(_Strict):
    """One phase of an SFT curriculum: task weights used until a step."""

    until_step: int = Field(ge=1, description="The phase covers steps before this one.")
    task_weights: dict[str, float] = Field(
        description="Task weights in this phase (as data.task_weights; 0 excludes a task)."
    )


class SftConfig(_Strict):
    """Scale-aware supervised fine-tuning."""

    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Samples per worker per step.")
    train_base: bool = Field(
        False,
        description="Also train the base model's weights (for a randomly initialised preset "
        "such as the demo's; a real Qwen2.5-VL base stays frozen).",
    )
    aux_weight: float | None = Field(
        None, ge=0, description="Load-balancing loss weight; None uses model.router's."
    )
    curriculum: list[TaskPhase] = Field(
        default_factory=list,
        description="Task-weight phases from step 0, in order; after the last phase "
        "data.task_weights applies. A small model first learns to see from short-answer "
        "tasks (classification, VQA), then adds long coordinate answers.",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @model_validator(mode="after")
    def _check_curriculum(self) -> SftConfig:
        ends = [phase.until_step for phase in self.curriculum]
        if ends != sorted(set(ends)):
            raise ValueError("sft.curriculum phases need strictly increasing until_step")
        return self

    def task_weights_at(
        self, step: int, default: dict[str, float] | None
    ) -> dict[str, float] | None:
        """The task weights of ``step`` (0-based): its curriculum phase's, else ``default``."""
        for phase in self.curriculum:
            if step < phase.until_step:
                return phase.task_weights
        return default


class GrpoConfig(_Strict):
    """Task-aware GRPO."""

    steps: int = Field(50, ge=1, description="Rollout + update steps.")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per worker per step.")
    group_size: int = Field(4, ge=2, description="Samples per prompt (G).")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus sampling.")
    max_new_tokens: int = Field(128, ge=1, description="Rollout completion budget.")
    constrained: bool = Field(
        True, description="Sample rollouts within each task's answer grammar (always parse)."
    )
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range ε.")
    kl_beta: float = Field(0.04, ge=0, description="Weight β of the k3 KL to the reference.")
    updates_per_rollout: int = Field(
        1, ge=1, description="Policy updates per batch of rollouts (μ; >1 makes clipping bite)."
    )
    rewards: list[str] = Field(
        default_factory=lambda: ["task", "format"],
        min_length=1,
        description="Rewards summed into each completion's reward, by name in "
        "smartpath.training.rewards.REWARDS (task, format, classification, detection, "
        "detection_giou, segmentation, vqa; unknown names are refused when the stage starts). "
        "'format' weighs "
        "format_weight, every other reward 1. The task reward is logged whether named or not.",
    )
    format_weight: float = Field(
        0.1, ge=0, description="Weight of the format reward, when rewards names it."
    )
    train_base: bool = Field(False, description="Also train the base model's weights.")
    init: str | None = Field(
        None, description="Checkpoint to start from (and KL reference); None: this run's SFT."
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=0, min_lr_ratio=1.0)
    )

    @model_validator(mode="after")
    def _check_rewards(self) -> GrpoConfig:
        if len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"grpo.rewards names a reward twice: {self.rewards}")
        return self

    def reward_weights(self) -> dict[str, float]:
        """The weight of each reward in ``rewards``: ``format_weight`` for ``format``, else 1."""
        return {name: self.format_weight if name == "format" else 1.0 for name in self.rewards}


class TrainingConfig(_Strict):
    """Everything a training run needs besides storage credentials."""

    name: str = Field("smartpath", pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Run name.")
    run_root: str = Field(
        "~/.smartpath/runs", description="Folder or s3://bucket/prefix holding runs."
    )
    seed: int = Field(0, description="Seed of model init, sampling and rollouts.")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Model built for SFT when sft_init is None."
    )
    sft_init: str | None = Field(None, description="Checkpoint SFT starts from (None: build).")
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint_every: int = Field(
        50, ge=1, description="Checkpoint every N steps (and at the end)."
    )
    report_every: int = Field(
        10,
        ge=1,
        description="Report metrics to Ray Train every N steps (each report is a synchronous "
        "round trip to the controller); the history keeps every step.",
    )
    eval_max_new_tokens: int = Field(192, ge=1, description="Generation budget at evaluation.")

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if not any(w > 0 for w in self.data.scale_weights.values()):
            raise ValueError("training.data.scale_weights needs a positive weight")
        return self

    def run_dir(self) -> str:
        """``{run_root}/{name}`` (a local path or an s3:// URI, without a trailing slash)."""
        return f"{self.run_root.rstrip('/')}/{self.name}"

    def stage_dir(self, stage: str) -> str:
        """Where a stage keeps its checkpoints and history."""
        return f"{self.run_dir()}/{stage}"

    def model_uri(self, stage: str) -> str:
        """The exported SmartPath checkpoint of a stage."""
        return f"{self.stage_dir(stage)}/model"
