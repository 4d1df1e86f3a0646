"""The training memory estimate: parameter counts from a meta-device build against a real tiny
build, and whether a 7B run fits on 80 GB GPUs."""

from __future__ import annotations

import pytest

from smartpath.core.config.model import ModelConfig
from smartpath.model.base import base_from_config
from smartpath.model.mllm import SmartPathModel
from smartpath.training.memory import (
    GIB,
    estimate_training_memory,
    main,
    parameter_counts,
)

GPU_BYTES = 80e9  # an 80 GB GPU
QWEN_7B = ModelConfig(preset="qwen2.5-vl-7b", base_path="/unused")


@pytest.fixture(scope="module")
def counts_7b():
    return parameter_counts(QWEN_7B)


def test_counts_equal_a_real_tiny_build() -> None:
    cfg = ModelConfig(
        preset="tiny",
        image_positions=True,
        experts={"num_experts": 3, "rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    )
    base, tokenizer = base_from_config(cfg)
    model = SmartPathModel(cfg, base, tokenizer)
    named = dict(model.named_parameters())

    def part(prefix: str) -> int:
        return sum(p.numel() for n, p in named.items() if n.startswith(prefix))

    lora = sum(p.numel() for n, p in named.items() if ".lora_" in n)
    vision = part("base.model.visual.")
    real = {
        "language_model": part("base.") - vision - lora,
        "vision": vision,
        "experts": lora,
        "aggregator": part("aggregator."),
        "router": part("router."),
        "image_position": part("image_position."),
    }
    counts = parameter_counts(cfg, vocab_size=base.get_input_embeddings().num_embeddings)
    assert {k: getattr(counts, k) for k in real} == real
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.trainable == lora + real["aggregator"] + real["router"] + real["image_position"]


def test_7b_counts(counts_7b) -> None:
    # Qwen2.5-VL-7B has 8.29B parameters (7.6B language model, 0.68B vision tower).
    assert 8.2e9 < counts_7b.frozen < 8.4e9
    assert 0.6e9 < counts_7b.vision < 0.7e9
    # 4 experts of rank 8 on q_proj (3584→3584) and v_proj (3584→512) in 28 layers.
    assert counts_7b.experts == 28 * 4 * 8 * ((3584 + 3584) + (3584 + 512))
    assert counts_7b.trainable < 0.03 * counts_7b.frozen


def test_7b_fits_on_80gb_with_checkpointing_and_not_at_a_large_batch_without(counts_7b) -> None:
    kw = dict(stage="sft", world_size=8, zero_stage=2, dtype="bfloat16", counts=counts_7b)
    small = estimate_training_memory(
        QWEN_7B, micro_batch=1, seq_len=2048, gradient_checkpointing=True, **kw
    )
    assert small["total"] * GIB < GPU_BYTES
    assert small["base_weights"] == pytest.approx(counts_7b.frozen * 2 / GIB)  # bf16 base
    large = estimate_training_memory(
        QWEN_7B, micro_batch=8, seq_len=1800, gradient_checkpointing=False, **kw
    )
    assert large["total"] * GIB > GPU_BYTES
    assert 50 < large["activations"] < 80  # the issue's ~60 GB of activations
    # Checkpointing keeps one layer plus the layer inputs: far less than all layers.
    ckpt = estimate_training_memory(
        QWEN_7B, micro_batch=8, seq_len=1800, gradient_checkpointing=True, **kw
    )
    assert ckpt["activations"] < large["activations"] / 10
    assert ckpt["logits"] == large["logits"]


def test_items_follow_zero_dtype_and_stage(counts_7b) -> None:
    kw = dict(micro_batch=1, seq_len=1024, gradient_checkpointing=True, counts=counts_7b)
    one = estimate_training_memory(QWEN_7B, stage="sft", world_size=1, **kw)
    eight = estimate_training_memory(QWEN_7B, stage="sft", world_size=8, **kw)
    assert eight["optimizer_states"] == pytest.approx(one["optimizer_states"] / 8)
    assert eight["base_weights"] == one["base_weights"]  # ZeRO-2 never shards weights
    assert one["optimizer_states"] * GIB == pytest.approx(counts_7b.trainable * 8)
    fp32 = estimate_training_memory(QWEN_7B, stage="sft", world_size=1, dtype="float32", **kw)
    assert fp32["base_weights"] == pytest.approx(2 * one["base_weights"])
    assert one["reference"] == one["rollout_kv_cache"] == 0
    grpo = estimate_training_memory(QWEN_7B, stage="grpo", world_size=1, **kw)
    # The reference is the trainable parameters only, in bf16.
    assert grpo["reference"] * GIB == pytest.approx(counts_7b.trainable * 2)
    assert grpo["reference"] < 0.05 * grpo["base_weights"]
    kv = 1024 * 28 * 2 * (4 * 128) * 2  # tokens × layers × (k, v) × kv width × bf16
    assert grpo["rollout_kv_cache"] * GIB == pytest.approx(kv)
    assert grpo["total"] > one["total"]
    with pytest.raises(ValueError, match="stage"):
        estimate_training_memory(QWEN_7B, stage="dpo", world_size=1, **kw)  # type: ignore[arg-type]


def test_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--preset", "qwen2.5-vl-7b", "--world-size", "8"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| SFT", "| GRPO"))]
    assert len(rows) == 12  # 2 stages × micro-batches 1/2/4 × checkpointing off/on
    assert "| SFT | 1 | on |" in out and "| GRPO | 4 | off |" in out
