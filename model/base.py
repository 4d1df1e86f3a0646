"""The base multimodal model: transformers' Qwen2.5-VL, built from a preset or loaded (HF format).

Design decisions:

- No model code of our own for the base: ``Qwen2_5_VLForConditionalGeneration`` as shipped by
  transformers, so a real Qwen2.5-VL checkpoint (HF format, safetensors) loads unchanged and
  the tiny/bench presets exercise exactly the same code path on CPU.
- Built presets are randomly initialised from ``cfg.seed`` inside a forked RNG (the caller's
  global RNG is untouched), in float32 then cast to ``cfg.dtype``, so the same config gives
  bit-identical weights. The embedding is sized to the tokenizer (``len(tokenizer)``) and the
  tokenizer's control-token ids are wired into the config (image/video/vision start/end, eos,
  pad, plus ``slide_token_id``), so the tokenizer and the model cannot disagree.
- Loading is ``from_pretrained(..., local_files_only=True, use_safetensors=True)``: never a hub
  download, never a pickle. An ``s3://`` prefix is first downloaded through the storage layer
  into a local cache folder keyed by the objects' ETags. The checkpoint's config.json is
  checked against the ModelConfig's sizes and the tokenizer's ids before weights are read.
- Forward-pass shapes (B batch, T tokens, V vocab, P patches): ``input_ids`` (B, T),
  ``pixel_values`` (P, 3·temporal·patch²), ``image_grid_thw`` (images, 3) → ``logits`` (B, T, V).
  Each image occupies ``P / merge²`` consecutive ``<|image_pad|>`` positions of ``input_ids``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from smartpath.core.config import StorageConfig
from smartpath.core.config.model import ModelConfig
from smartpath.core.storage import ObjectStore
from smartpath.model.checkpoint import (
    download_prefix,
    is_s3_uri,
    resolve_store,
    upload_folder,
)
from smartpath.model.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    SLIDE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    load_tokenizer,
    token_ids,
    train_builtin_tokenizer,
)

MODEL_TYPE = "qwen2_5_vl"


class BaseModelMismatchError(ValueError):
    """A base checkpoint whose config disagrees with the ModelConfig or the tokenizer."""


def hf_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    """The transformers config of ``cfg``'s built preset, wired to ``tokenizer``'s ids."""
    ids = token_ids(
        tokenizer,
        [ENDOFTEXT, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, SLIDE_PAD],
    )
    t, v = cfg.text, cfg.vision
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
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
            "eos_token_id": ids[IM_END],
            "pad_token_id": ids[ENDOFTEXT],
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
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        slide_token_id=ids[SLIDE_PAD],
        tie_word_embeddings=t.tie_word_embeddings,
    )


def build_base_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL of ``cfg``'s preset, deterministic from ``cfg.seed``.

    Returned in eval mode and ``cfg.dtype``.
    """
    if cfg.base_path is not None:
        raise ValueError(
            f"config has base_path {cfg.base_path!r}: load it with load_base_model, or set "
            "base_path to null to build the preset randomly"
        )
    config = hf_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    _wire_generation(model, tokenizer)
    return model.to(cfg.torch_dtype).eval()


def _wire_generation(
    model: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = token_ids(tokenizer, [IM_END, ENDOFTEXT])
    gen = model.generation_config
    gen.eos_token_id = [ids[IM_END], ids[ENDOFTEXT]]
    gen.pad_token_id = ids[ENDOFTEXT]
    gen.bos_token_id = None


def save_base_model(
    model: Qwen2_5_VLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    dest: str | Path,
    store: ObjectStore | StorageConfig | None = None,
) -> None:
    """Save model and tokenizer in HF format (safetensors) to a folder or ``s3://`` prefix."""
    if is_s3_uri(dest):
        with tempfile.TemporaryDirectory(prefix="smartpath-base-") as tmp:
            save_base_model(model, tokenizer, tmp)
            upload_folder(tmp, str(dest), resolve_store(store), last=("config.json",))
        return
    folder = Path(dest).expanduser()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def fetch_pretrained(
    path_or_s3: str | Path,
    store: ObjectStore | StorageConfig | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """A local folder holding the HF checkpoint: the path itself, or a cached S3 download."""
    if is_s3_uri(path_or_s3):
        return download_prefix(str(path_or_s3), resolve_store(store), cache_dir)
    folder = Path(path_or_s3).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"base model folder {folder} does not exist")
    return folder


def read_hf_config(folder: str | Path) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config.json of an HF checkpoint folder, with a clear error otherwise."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not an HF-format checkpoint")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise BaseModelMismatchError(
            f"{folder} holds a {raw.get('model_type')!r} model; SmartPath's base must be "
            f"{MODEL_TYPE!r} (Qwen2.5-VL)"
        )
    return Qwen2_5_VLConfig.from_pretrained(str(folder), local_files_only=True)


def check_hf_config(
    cfg: ModelConfig | None,
    config: Qwen2_5_VLConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise BaseModelMismatchError if ``config`` disagrees with ``cfg``'s sizes or tokenizer."""
    problems: list[str] = []

    def same(what: str, got: Any, want: Any) -> None:
        if got != want:
            problems.append(f"{what} is {got!r} in the checkpoint but {want!r} in the config")

    if cfg is not None:
        text, vision = config.text_config, config.vision_config
        same("text.hidden_size", text.hidden_size, cfg.text.hidden_size)
        same("text.num_layers", text.num_hidden_layers, cfg.text.num_layers)
        same("text.num_heads", text.num_attention_heads, cfg.text.num_heads)
        same("text.num_kv_heads", text.num_key_value_heads, cfg.text.num_kv_heads)
        same("text.intermediate_size", text.intermediate_size, cfg.text.intermediate_size)
        same("vision.depth", vision.depth, cfg.vision.depth)
        same("vision.hidden_size", vision.hidden_size, cfg.vision.hidden_size)
        same("vision.num_heads", vision.num_heads, cfg.vision.num_heads)
        same("vision.patch_size", vision.patch_size, cfg.vision.patch_size)
        same("vision.spatial_merge_size", vision.spatial_merge_size, cfg.vision.spatial_merge_size)
        same(
            "vision.temporal_patch_size",
            vision.temporal_patch_size,
            cfg.vision.temporal_patch_size,
        )
    if tokenizer is not None:
        ids = token_ids(tokenizer, [IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END])
        same("image_token_id", config.image_token_id, ids[IMAGE_PAD])
        same("video_token_id", config.video_token_id, ids[VIDEO_PAD])
        same("vision_start_token_id", config.vision_start_token_id, ids[VISION_START])
        same("vision_end_token_id", config.vision_end_token_id, ids[VISION_END])
        if config.text_config.vocab_size < len(tokenizer):
            problems.append(
                f"the embedding has {config.text_config.vocab_size} rows but the tokenizer has "
                f"{len(tokenizer)} tokens"
            )
    if problems:
        preset = f"preset {cfg.preset!r}" if cfg is not None else "the tokenizer"
        raise BaseModelMismatchError(
            f"base checkpoint does not match {preset}: "
            + "; ".join(problems)
            + ". Pick the preset of this checkpoint (or override text/vision sizes), or point "
            "base_path at the checkpoint the config was made for"
        )


def load_base_model(
    path_or_s3: str | Path,
    cfg: ModelConfig | None = None,
    *,
    store: ObjectStore | StorageConfig | None = None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """Load an HF-format Qwen2.5-VL (safetensors) from a folder or ``s3://`` prefix, eval mode.

    The checkpoint's config is checked against ``cfg`` and ``tokenizer`` when given. ``dtype``
    defaults to ``cfg.dtype``, else the checkpoint's own.
    """
    folder = fetch_pretrained(path_or_s3, store, cache_dir)
    config = read_hf_config(folder)
    check_hf_config(cfg, config, tokenizer)
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        raise FileNotFoundError(
            f"{path_or_s3} has no *.safetensors weights"
            + (f" (only pickle files {pickles}, which are never loaded)" if pickles else "")
        )
    if dtype is None:
        dtype = cfg.torch_dtype if cfg is not None else None
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(folder),
        config=config,
        local_files_only=True,
        use_safetensors=True,
        dtype=dtype if dtype is not None else "auto",
    )
    return model.eval()


def load_base(
    path_or_s3: str | Path,
    cfg: ModelConfig | None = None,
    *,
    store: ObjectStore | StorageConfig | None = None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Model and its own tokenizer from an HF-format folder or ``s3://`` prefix."""
    folder = fetch_pretrained(path_or_s3, store, cache_dir)
    tokenizer = load_tokenizer(folder)
    model = load_base_model(folder, cfg, dtype=dtype, tokenizer=tokenizer)
    return model, tokenizer


def base_from_config(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    store: ObjectStore | StorageConfig | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """The base of ``cfg``: loaded from ``cfg.base_path``, else built (training the preset's
    tokenizer on the built-in corpus unless one is given)."""
    if cfg.base_path is not None:
        return load_base(cfg.base_path, cfg, store=store, cache_dir=cache_dir)
    tokenizer = tokenizer or train_builtin_tokenizer(cfg.text.vocab_size)
    return build_base_model(cfg, tokenizer), tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
