"""How big a SmartPath model is, by part and by service, counted without memory.

Parameter counts come from the real classes, never from a table: the transformers Qwen2.5-VL
is built on the ``meta`` device (no memory, no weights) from the config's sizes, and
SmartPath's slide aggregator, router and image positions on ``meta`` by the builders
:class:`~smartpath.model.mllm.SmartPathModel` uses. LoRA experts are counted as
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
from transformers import Qwen2_5_VLForConditionalGeneration

from smartpath.core.config.model import PRESETS, ModelConfig
from smartpath.model.base import qwen_config
from smartpath.model.devices import DTYPES
from smartpath.model.image_position import ImagePositionEmbedding
from smartpath.model.mllm import make_aggregator, make_router

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


def parameter_counts(cfg: ModelConfig, vocab_size: int | None = None) -> ParameterCounts:
    """Parameters of ``cfg``'s model, counted on a ``meta``-device build (no memory used).

    ``vocab_size`` is the embedding's rows (default ``cfg.text.vocab_size``, the real
    checkpoint's; a built preset sizes it to its tokenizer instead).
    """
    e, hidden = cfg.experts, cfg.text.hidden_size
    with torch.device("meta"):
        base = Qwen2_5_VLForConditionalGeneration(
            qwen_config(cfg, vocab_size or cfg.text.vocab_size)
        )
        aggregator, router = make_aggregator(cfg), make_router(cfg)
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
