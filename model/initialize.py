"""Bring your own base: turn an HF-format Qwen2.5-VL checkpoint into a SmartPath checkpoint.

Design decisions:

- The SmartPath checkpoint references the base (``model.base_path``) instead of copying it,
  and holds only what SmartPath adds: new LoRA experts, router and slide aggregator (seeded
  from ``seed``), the base's tokenizer with ``<|slide_pad|>``, and the model's facts (tile
  encoder, slide tile spec). It is ready to serve or to fine-tune. With a learned tile encoder
  (``tile_encoder_path``), its name and feature width go into the config.
- The base's weights are not read: SmartPath's parts are built around a meta-device base, so
  initialising from a 7B checkpoint takes seconds and no memory. The exception is a tokenizer
  whose ``<|slide_pad|>`` id does not fit the embedding: then the language model is loaded on
  CPU to grow the embedding, and the new rows go into the checkpoint.
- Sizes come from the checkpoint's own config.json; ``preset`` names the base, and its widths
  must match. Without one, the preset whose widths match is named, else the generic
  ``qwen2.5-vl``. A folder with fewer layers than its preset (a test or pruned model) is fine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from smartpath.core.config import StorageConfig
from smartpath.core.config.model import PRESETS, ModelConfig
from smartpath.core.storage import ObjectStore
from smartpath.model.base import (
    check_hf_config,
    fetch_pretrained,
    is_s3_uri,
    load_base_model,
    read_hf_config,
    sizes_of,
)
from smartpath.model.checkpoint import Manifest
from smartpath.model.mllm import SmartPathModel
from smartpath.model.tile_encoder import load_hf_tile_encoder, make_tile_encoder
from smartpath.model.tokenizer import load_tokenizer, prepare_tokenizer

GENERIC_PRESET = "qwen2.5-vl"


_WIDTHS = ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")


def _width_problems(config: Qwen2_5_VLConfig, preset: str) -> list[str]:
    text = sizes_of(config)["text"]
    want = PRESETS[preset].text
    return [
        f"text.{w} is {text[w]} in the checkpoint but {getattr(want, w)} in preset {preset!r}"
        for w in _WIDTHS
        if getattr(want, w) != text[w]
    ]


def matching_preset(config: Qwen2_5_VLConfig) -> str:
    """The checkpoint-backed preset with this checkpoint's widths, else the generic one."""
    for name, preset in PRESETS.items():
        named = preset.requires_base_path and name != GENERIC_PRESET
        if named and not _width_problems(config, name):
            return name
    return GENERIC_PRESET


def model_config_for_base(
    config: Qwen2_5_VLConfig, base_path: str, preset: str | None = None, **fields: Any
) -> ModelConfig:
    """The ModelConfig of a SmartPath model on this base (sizes from its config.json)."""
    sizes = sizes_of(config)
    name = preset or matching_preset(config)
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    if name != GENERIC_PRESET and (problems := _width_problems(config, name)):
        raise ValueError(
            f"{base_path} is not a {name} checkpoint: " + "; ".join(problems) + ". Leave out "
            "the preset to take every size from the checkpoint's config.json"
        )
    pixels = PRESETS[name].vision
    sizes["vision"].update(min_pixels=pixels.min_pixels, max_pixels=pixels.max_pixels)
    return ModelConfig(preset=name, base_path=base_path, **sizes, **fields)


def init_checkpoint(
    base: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    store: ObjectStore | StorageConfig | None = None,
    overwrite: bool = False,
    **fields: Any,
) -> Manifest:
    """Write a SmartPath checkpoint for the HF base ``base`` (folder or ``s3://`` prefix) to
    ``out`` (folder or ``s3://`` prefix); ``fields`` set ModelConfig fields (``seed``,
    ``experts``, ``labels``, …). Returns the written manifest."""
    folder = fetch_pretrained(base, store)
    config = read_hf_config(folder)
    base_path = str(base) if is_s3_uri(base) else str(Path(base).expanduser().resolve())
    if fields.get("tile_encoder_path") is not None:
        encoder = load_hf_tile_encoder(fields["tile_encoder_path"], store=store)
    else:
        encoder = make_tile_encoder(fields.get("tile_encoder", "stain-stats-v1"))
    fields["tile_encoder"] = encoder.name
    fields["aggregator"] = {"feature_dim": encoder.dim, **fields.get("aggregator", {})}
    cfg = model_config_for_base(config, base_path, preset, **fields)
    tokenizer = load_tokenizer(folder)
    prepare_tokenizer(tokenizer)
    check_hf_config(cfg, config, tokenizer)
    if len(tokenizer) > config.text_config.vocab_size:  # grow the real embedding
        shell = load_base_model(folder, cfg, parts=("language",), device="cpu", dtype=torch.float32)
    else:
        with torch.device("meta"):
            shell = Qwen2_5_VLForConditionalGeneration(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SmartPathModel(cfg, shell, tokenizer, device="cpu")
    return model.save(out, store, overwrite=overwrite)
