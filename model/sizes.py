"""How big a SmartPath model is, by part and by service, counted without memory.

Parameter counts come from the real classes, never from a table: the transformers Qwen2.5-VL
is built on the ``meta`` device (no memory, no weights) from the config's sizes, and
SmartPath's slide aggregator, router and image positions are built on ``meta`` the way
:class:`~smartpath.model.mllm.SmartPathModel` builds them. LoRA experts are counted as
``num_experts × rank × (in + out)`` per targeted linear layer of the LM (what
:func:`~smartpath.model.experts.attach_experts` allocates).

``python -m smartpath.model.sizes --preset qwen2.5-vl-7b`` prints what each service loads
(:data:`SERVICE_PARTS` of the deployments) and its weights' memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from smartpath.core.config.model import PRESETS, ModelConfig
from smartpath.model.aggregator import SlideAggregator
from smartpath.model.devices import DTYPES
from smartpath.model.grammar import Scale, Task
from smartpath.model.image_position import ImagePositionEmbedding
from smartpath.model.router import ExpertRouter

GIB = 2**30


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a SmartPath model by part (tied weights counted once)."""

    language_model: int  # embeddings, decoder layers, final norm, LM head (frozen)
    vision: int  # the Qwen2.5-VL vision tower and merger (frozen)
    experts: int  # LoRA experts (trainable)
    aggregator: int  # slide aggregator (trainable)
    router: int  # expert router (trainable)
    image_position: int  # learnt ROI image positions (trainable; 0 when off)

    @property
    def frozen(self) -> int:
        """The base's parameters."""
        return self.language_model + self.vision

    @property
    def trainable(self) -> int:
        """SmartPath's own parameters: what the optimizer gets."""
        return self.experts + self.aggregator + self.router + self.image_position

    @property
    def total(self) -> int:
        return self.frozen + self.trainable


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _base_config(cfg: ModelConfig, vocab_size: int) -> Qwen2_5_VLConfig:
    """The transformers Qwen2.5-VL config of ``cfg``'s sizes (token ids irrelevant for sizes)."""
    t, v = cfg.text, cfg.vision
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "max_window_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": t.mrope_section,
            },
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        },
        vision_config={
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": t.hidden_size,
        },
        tie_word_embeddings=t.tie_word_embeddings,
    )


def parameter_counts(cfg: ModelConfig, vocab_size: int | None = None) -> ParameterCounts:
    """Parameters of ``cfg``'s model, counted on a ``meta``-device build (no memory used).

    ``vocab_size`` is the embedding's rows (default ``cfg.text.vocab_size``, the real
    checkpoint's; a built preset sizes it to its tokenizer instead).
    """
    hidden = cfg.text.hidden_size
    e, a = cfg.experts, cfg.aggregator
    with torch.device("meta"):
        base = Qwen2_5_VLForConditionalGeneration(
            _base_config(cfg, vocab_size or cfg.text.vocab_size)
        )
        aggregator = SlideAggregator(
            a.feature_dim,
            hidden,
            hidden_dim=hidden,
            num_tokens=a.num_tokens,
            num_heads=a.num_heads,
            chunk_size=a.chunk_size,
        )
        router = ExpertRouter(
            num_tasks=max(Task) + 1,
            num_scales=max(Scale) + 1,
            visual_dim=hidden,
            num_experts=e.num_experts,
            top_k=e.top_k,
            hidden_dim=cfg.router.hidden_size,
        )
        position = ImagePositionEmbedding(hidden) if cfg.image_positions else None
    vision = _numel(base.model.visual)
    experts = sum(
        e.num_experts * e.rank * (m.in_features + m.out_features)
        for name, m in base.model.language_model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in e.target_modules
    )
    return ParameterCounts(
        language_model=_numel(base) - vision,
        vision=vision,
        experts=experts,
        aggregator=_numel(aggregator),
        router=_numel(router),
        image_position=_numel(position),
    )


def service_parameters(counts: ParameterCounts) -> dict[str, int]:
    """Parameters each model-serving deployment loads: the encoder the vision tower, image
    positions and aggregator (plus its tile encoder's, not counted here); the router its MLP;
    the decoder the language model and the experts."""
    return {
        "encoder": counts.vision + counts.image_position + counts.aggregator,
        "router": counts.router,
        "decoder": counts.language_model + counts.experts,
    }


def serving_table(cfg: ModelConfig, dtype: str, vocab_size: int | None = None) -> str:
    """A markdown table of each service's parameters and weight memory in ``dtype``."""
    counts = parameter_counts(cfg, vocab_size)
    size = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    parts = {**service_parameters(counts), "one process (all parts)": counts.total}
    rows = [f"| {name} | {n / 1e6:,.2f} M | {_memory(n * size)} |" for name, n in parts.items()]
    head = f"| service ({cfg.preset}, {dtype}) | parameters | weights |\n|---|---:|---:|"
    return "\n".join([head, *rows])


def _memory(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parameters and weight memory per service.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--vocab-size", type=int, help="embedding rows (default: the preset's)")
    args = parser.parse_args(argv)
    base_path = "/unused" if PRESETS[args.preset].requires_base_path else None
    cfg = ModelConfig(preset=args.preset, base_path=base_path)
    print(serving_table(cfg, args.dtype, args.vocab_size))


if __name__ == "__main__":
    main()
