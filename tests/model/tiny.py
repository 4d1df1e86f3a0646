"""A tiny Qwen2.5-VL and expert helpers shared by the model tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from smartpath.model.experts import expert_modules

VOCAB = 128


def tiny_qwen(seed: int = 0, init_std: float = 0.3) -> Qwen2_5_VLForConditionalGeneration:
    """A tiny Qwen2.5-VL (2 text layers, hidden 32, vocab 128) with peaky random weights."""
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
                "rope_theta": 10000.0,
            },
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
        },
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, init_std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def randomise_experts(model: nn.Module, seed: int = 1, std: float = 0.5) -> None:
    """Non-zero B (and fresh A) so that every expert changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in expert_modules(model).values():
            m.lora_A.normal_(0.0, std, generator=gen)
            m.lora_B.normal_(0.0, std, generator=gen)
