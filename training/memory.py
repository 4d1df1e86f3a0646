"""How much GPU memory a SmartPath training run needs per GPU: a pure estimate, no GPU needed.

``python -m smartpath.training.memory --preset qwen2.5-vl-7b --world-size 8`` prints a markdown
table for SFT and GRPO at a few micro-batches, with and without gradient checkpointing.

Design decisions:

- Parameter counts are :func:`smartpath.model.sizes.parameter_counts` (the real classes built
  on the ``meta`` device); the test checks them against a real tiny build.
- Per GPU, in GiB (2**30 bytes), with ``b`` the bytes of the run dtype, ``N`` the world size,
  ``P_f``/``P_t`` the frozen/trainable parameters, ``t = micro_batch × seq_len`` tokens:

  * frozen base weights: ``P_f · b``;
  * trainable weights: ``P_t · b`` in the model plus the fp32 master copy ``P_t · 4 / N``
    (mixed precision only; ZeRO-1/2 shard it with the optimizer state);
  * gradients: ``P_t · 4 / N`` (ZeRO-2 keeps only this rank's partition; stage 0/1 keep all)
    plus ZeRO's reduce bucket (``BUCKET_ELEMENTS · b``, allocated whole);
  * optimizer state: Adam's two fp32 moments, ``P_t · 8 / N`` (not sharded at stage 0);
  * activations of the LM (a frozen base keeps no input of a frozen linear layer for the
    backward, only what the gradient w.r.t. the hidden states needs), per token and decoder
    layer: the attention block's normalised input (read by q/k/v and the LoRA experts), q, k
    and v, and the attention output (flash/SDPA keep no T × T matrix), ``b·(3h + 2kv)``; the
    MLP's normalised input, gate, up and SiLU(gate), ``b·(h + 3i)``; the two RMSNorm inputs in
    float32 (transformers upcasts), ``8h``. Without checkpointing every layer keeps all of it
    (``L × t × that``); with checkpointing every layer keeps only its input (``L × t × b·h``)
    and one layer's activations are live again while it is recomputed in the backward pass.
    Plus the embeddings and final hidden states, ``t · h · (2b + 4)``. The frozen vision tower
    runs without a graph (no saved activations); its transient peak is below the LM's;
  * logits: ``t · V · (2b + 4)``: the model's logits, their gradient, and float32 log-softmax
    (an upper bound: the losses take only the completion positions to float32);
  * GRPO: the reference (a copy of the trainable parameters only, ``P_t · b``) and the
    rollout's KV cache, ``micro_batch × seq_len × L × 2 kv × b`` (GRPO's micro-batch is
    prompts_per_step × group_size rows, all generated in one batch).

  ``total`` is the persistent part (weights, gradients, optimizer state, reference) plus the
  larger of the update's activations + logits and the rollout's KV cache (rollouts and updates
  do not overlap). CUDA context, allocator fragmentation and NCCL buffers come on top (a few
  GiB): keep a margin.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Literal

import torch

from smartpath.core.config.model import PRESETS, ModelConfig
from smartpath.model.devices import resolve_dtype
from smartpath.model.sizes import GIB, ParameterCounts, parameter_counts
from smartpath.training.engine import BUCKET_ELEMENTS

__all__ = [
    "GIB",
    "ParameterCounts",
    "estimate_training_memory",
    "main",
    "memory_table",
    "parameter_counts",
]

Stage = Literal["sft", "grpo"]


def _bytes(dtype: str | torch.dtype) -> tuple[torch.dtype, int]:
    """The run dtype ("auto" is a GPU run's: bfloat16) and its size in bytes."""
    resolved = resolve_dtype(dtype, torch.device("cuda"))
    return resolved, torch.finfo(resolved).bits // 8


def estimate_training_memory(
    model_cfg: ModelConfig,
    *,
    stage: Stage,
    micro_batch: int,
    seq_len: int,
    world_size: int,
    zero_stage: int = 2,
    gradient_checkpointing: bool,
    dtype: str | torch.dtype = "bfloat16",
    counts: ParameterCounts | None = None,
) -> dict[str, float]:
    """GiB per GPU of one training run (formulas in the module docstring), by item.

    Keys: ``base_weights``, ``trainable_weights``, ``gradients``, ``optimizer_states``,
    ``activations`` (decoder layers and embeddings), ``logits``, ``reference`` and
    ``rollout_kv_cache`` (GRPO; 0 for SFT) and ``total``. ``micro_batch`` is the sequences of
    ``seq_len`` tokens each rank trains on per step (GRPO: prompts_per_step × group_size).
    ``counts`` defaults to :func:`parameter_counts` of ``model_cfg``.
    """
    if stage not in ("sft", "grpo"):
        raise ValueError(f"stage must be 'sft' or 'grpo', got {stage!r}")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage {zero_stage} is not estimated (0, 1 or 2)")
    if min(micro_batch, seq_len, world_size) < 1:
        raise ValueError("micro_batch, seq_len and world_size must be ≥ 1")
    counts = counts or parameter_counts(model_cfg)
    resolved, b = _bytes(dtype)
    mixed = resolved != torch.float32
    optim_shards = world_size if zero_stage >= 1 else 1
    grad_shards = world_size if zero_stage >= 2 else 1
    frozen, trainable = counts.frozen, counts.trainable

    text = model_cfg.text
    h, i, layers, vocab = text.hidden_size, text.intermediate_size, text.num_layers, text.vocab_size
    kv = text.num_kv_heads * text.head_dim
    tokens = micro_batch * seq_len
    per_layer_token = b * (3 * h + 2 * kv) + b * (h + 3 * i) + 8 * h
    if gradient_checkpointing:
        layer_bytes = layers * tokens * b * h + tokens * per_layer_token
    else:
        layer_bytes = layers * tokens * per_layer_token
    activations = layer_bytes + tokens * h * (2 * b + 4)
    logits = tokens * vocab * (2 * b + 4)

    items = {
        "base_weights": frozen * b,
        "trainable_weights": trainable * b + (trainable * 4 / optim_shards if mixed else 0),
        "gradients": trainable * 4 / grad_shards + min(BUCKET_ELEMENTS, trainable) * b,
        "optimizer_states": trainable * 8 / optim_shards,
        "activations": activations,
        "logits": logits,
        "reference": trainable * b if stage == "grpo" else 0,
        "rollout_kv_cache": micro_batch * seq_len * layers * 2 * kv * b if stage == "grpo" else 0,
    }
    persistent = sum(
        items[k]
        for k in ("base_weights", "trainable_weights", "gradients", "optimizer_states", "reference")
    )
    items["total"] = persistent + max(activations + logits, items["rollout_kv_cache"])
    return {k: float(v) / GIB for k, v in items.items()}


def memory_table(
    model_cfg: ModelConfig,
    *,
    world_size: int,
    seq_len: int = 2048,
    micro_batches: Sequence[int] = (1, 2, 4),
    dtype: str | torch.dtype = "bfloat16",
    gpu_gib: float = 80.0,
) -> str:
    """A markdown table of :func:`estimate_training_memory` for SFT and GRPO at each
    micro-batch, without and with gradient checkpointing (ZeRO-2)."""
    counts = parameter_counts(model_cfg)
    lines = [
        f"{model_cfg.preset}: {counts.frozen / 1e9:.2f}B frozen + {counts.trainable / 1e6:.0f}M "
        f"trainable parameters; ZeRO-2 on {world_size} GPUs, {seq_len}-token sequences, "
        f"{_bytes(dtype)[0]}; GiB per GPU",
        "",
        "| stage | rows/GPU | checkpointing | base | trainable + grads + Adam | activations "
        f"| logits | GRPO ref + KV | total | fits {gpu_gib:g} GB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for stage in ("sft", "grpo"):
        for rows in micro_batches:
            for ckpt in (False, True):
                m = estimate_training_memory(
                    model_cfg, stage=stage, micro_batch=rows, seq_len=seq_len,
                    world_size=world_size, gradient_checkpointing=ckpt, dtype=dtype,
                    counts=counts,
                )  # fmt: skip
                states = m["trainable_weights"] + m["gradients"] + m["optimizer_states"]
                extra = m["reference"] + m["rollout_kv_cache"]
                fits = m["total"] * GIB <= gpu_gib * 1e9
                lines.append(
                    f"| {stage.upper()} | {rows} | {'on' if ckpt else 'off'} "
                    f"| {m['base_weights']:.1f} | {states:.1f} | {m['activations']:.1f} "
                    f"| {m['logits']:.1f} | {extra:.1f} | {m['total']:.1f} "
                    f"| {'yes' if fits else 'no'} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m smartpath.training.memory --preset qwen2.5-vl-7b --world-size 8``."""
    parser = argparse.ArgumentParser(
        prog="python -m smartpath.training.memory",
        description="Estimated GPU memory per GPU of SmartPath SFT and GRPO (markdown table).",
    )
    parser.add_argument("--preset", default="qwen2.5-vl-7b", choices=sorted(PRESETS))
    parser.add_argument("--world-size", type=int, default=8, help="GPUs (ZeRO-2 ranks)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory, GB (10^9 bytes)")
    args = parser.parse_args(argv)
    # A preset loaded from a checkpoint needs base_path to make a config; its sizes are the
    # preset's, and nothing is read from the path.
    base_path = "/unused" if PRESETS[args.preset].requires_base_path else None
    cfg = ModelConfig(preset=args.preset, base_path=base_path)
    print(
        memory_table(
            cfg,
            world_size=args.world_size,
            seq_len=args.seq_len,
            micro_batches=args.micro_batch,
            dtype=args.dtype,
            gpu_gib=args.gpu_gb,
        )
    )


if __name__ == "__main__":
    main()
