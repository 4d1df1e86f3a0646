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
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
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
from smartpath.model.devices import resolve_device, resolve_dtype
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

BasePart = Literal["vision", "language"]
BASE_PARTS: tuple[BasePart, ...] = ("vision", "language")
"""The base's two halves: the vision tower (ROI images → LM-space tokens) and the language model
(embeddings, decoder layers, LM head). A service loads only the half it runs."""
_PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision": ("model.visual.",),
    "language": ("model.language_model.", "lm_head."),
}


# What a checkpoint's weights must agree on with the config (the rest only shapes behaviour).
_CHECKED_TEXT = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
_CHECKED_VISION = (
    "depth",
    "hidden_size",
    "num_heads",
    "patch_size",
    "spatial_merge_size",
    "temporal_patch_size",
)


class BaseModelMismatchError(ValueError):
    """A base checkpoint whose config disagrees with the ModelConfig or the tokenizer."""


# (SmartPath size field, transformers config field): the two spellings of the base's sizes.
TEXT_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("intermediate_size", "intermediate_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("rms_norm_eps", "rms_norm_eps"),
)
VISION_FIELDS = (
    ("depth", "depth"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("num_heads", "num_heads"),
    ("patch_size", "patch_size"),
    ("spatial_merge_size", "spatial_merge_size"),
    ("temporal_patch_size", "temporal_patch_size"),
    ("window_size", "window_size"),
    ("fullatt_block_indexes", "fullatt_block_indexes"),
)


def qwen_config(
    cfg: ModelConfig, vocab_size: int, ids: dict[str, int] | None = None
) -> Qwen2_5_VLConfig:
    """The transformers config of ``cfg``'s sizes with ``vocab_size`` embedding rows, wired to
    the control-token ``ids`` when given (sizes alone suffice to count parameters)."""
    t, v = cfg.text, cfg.vision
    ids = ids or {}
    return Qwen2_5_VLConfig(
        text_config={
            **{hf: getattr(t, ours) for ours, hf in TEXT_FIELDS},
            "vocab_size": vocab_size,
            "max_window_layers": t.num_layers,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": t.mrope_section,
            },
            "bos_token_id": None,
            "eos_token_id": ids.get(IM_END),
            "pad_token_id": ids.get(ENDOFTEXT),
        },
        vision_config={
            **{hf: getattr(v, ours) for ours, hf in VISION_FIELDS},
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": t.hidden_size,
        },
        tie_word_embeddings=t.tie_word_embeddings,
        **{
            field: ids[token]
            for field, token in [
                ("image_token_id", IMAGE_PAD),
                ("video_token_id", VIDEO_PAD),
                ("vision_start_token_id", VISION_START),
                ("vision_end_token_id", VISION_END),
                ("slide_token_id", SLIDE_PAD),
            ]
            if token in ids
        },
    )


def hf_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    """The transformers config of ``cfg``'s built preset, wired to ``tokenizer``'s ids."""
    ids = token_ids(
        tokenizer,
        [ENDOFTEXT, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, SLIDE_PAD],
    )
    return qwen_config(cfg, len(tokenizer), ids)


def sizes_of(config: Qwen2_5_VLConfig) -> dict[str, dict[str, Any]]:
    """``text``/``vision`` sizes of a ModelConfig, read from a checkpoint's config."""
    t, v = config.text_config, config.vision_config
    rope = t.rope_parameters or {}
    return {
        "text": {
            **{ours: getattr(t, hf) for ours, hf in TEXT_FIELDS},
            "rope_theta": float(rope.get("rope_theta", 1_000_000.0)),
            "tie_word_embeddings": bool(config.tie_word_embeddings),
        },
        "vision": {ours: getattr(v, hf) for ours, hf in VISION_FIELDS},
    }


def build_base_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    parts: Sequence[BasePart] = BASE_PARTS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL of ``cfg``'s preset (only ``parts``), deterministic
    from ``cfg.seed`` for a given device.

    Returned in eval mode on ``device`` in ``dtype`` (default: ``cfg.dtype`` resolved there).
    """
    if cfg.base_path is not None:
        raise ValueError(
            f"config has base_path {cfg.base_path!r}: load it with load_base_model, or set "
            "base_path to null to build the preset randomly"
        )
    device = resolve_device(device)
    config = hf_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    _drop_parts(model, parts)
    _wire_generation(model, tokenizer)
    _cast_parameters(model, dtype or resolve_dtype(cfg.dtype, device))
    return model.eval()


def _drop_parts(model: Qwen2_5_VLForConditionalGeneration, parts: Sequence[BasePart]) -> None:
    """Remove the halves not in ``parts`` (their weights are then never allocated or read)."""
    unknown = set(parts) - set(BASE_PARTS)
    if unknown:
        raise ValueError(f"unknown base parts {sorted(unknown)}; choose from {list(BASE_PARTS)}")
    if "vision" not in parts:
        model.model.visual = None
    if "language" not in parts:
        model.model.language_model = None
        model.lm_head = None


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters to ``dtype``; the rotary tables (buffers) stay float32 as transformers keeps
    them, so positions are as exact as in a checkpoint loaded by ``from_pretrained``."""
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


def _restore_rotary_tables(model: Qwen2_5_VLForConditionalGeneration) -> None:
    """Recompute the rotary embeddings' inverse frequencies (non-persistent buffers, so never
    in a checkpoint, and uninitialised after materialising a meta-device model) in float32."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            module.inv_freq = torch.empty_like(module.inv_freq, dtype=torch.float32)
            module.original_inv_freq = torch.empty_like(module.inv_freq)
            model._init_weights(module)


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
        checked = {"text": _CHECKED_TEXT, "vision": _CHECKED_VISION}
        sizes = sizes_of(config)
        for part, fields in checked.items():
            want = getattr(cfg, part)
            for field in fields:
                same(f"{part}.{field}", sizes[part][field], getattr(want, field))
    if tokenizer is not None:
        ids = token_ids(tokenizer, [IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END])
        same("image_token_id", config.image_token_id, ids[IMAGE_PAD])
        same("video_token_id", config.video_token_id, ids[VIDEO_PAD])
        same("vision_start_token_id", config.vision_start_token_id, ids[VISION_START])
        same("vision_end_token_id", config.vision_end_token_id, ids[VISION_END])
        # <|slide_pad|> may be the one token past the embedding (fit_embeddings adds its row).
        needed = len(tokenizer) - int(tokenizer.get_vocab().get(SLIDE_PAD) == len(tokenizer) - 1)
        if config.text_config.vocab_size < needed:
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


def canonical_key(key: str) -> str:
    """A checkpoint tensor name in transformers' current Qwen2.5-VL layout.

    Published Qwen2.5-VL checkpoints use the older layout (``visual.*``, ``model.layers.*``);
    transformers ≥ 4.52 saves ``model.visual.*`` and ``model.language_model.*``."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not re.match(r"model\.(visual|language_model)\.", key):
        return "model.language_model." + key[len("model.") :]
    return key


def _checkpoint_tensors(
    folder: Path, wanted: Sequence[str], device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) of every tensor under the ``wanted`` prefixes, read lazily from
    the folder's safetensors files (sharded or not) straight onto ``device``."""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = canonical_key(key)
                if name.startswith(tuple(wanted)):
                    yield name, f.get_tensor(key)


def materialize_base(
    model: Qwen2_5_VLForConditionalGeneration,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    where: str,
) -> Qwen2_5_VLForConditionalGeneration:
    """Allocate a meta-device (part of a) base on ``device`` and fill every parameter from
    ``tensors``; raises BaseModelMismatchError naming what the checkpoint lacks or mis-shapes."""
    tied = bool(model.config.tie_word_embeddings) and model.lm_head is not None
    _cast_parameters(model, dtype)  # on meta: the parameters are allocated in dtype, once
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    if tied:
        params.pop("lm_head.weight", None)
    loaded: set[str] = set()
    for name, tensor in tensors:
        param = params.get(name)
        if param is None:
            continue
        if param.shape != tensor.shape:
            raise BaseModelMismatchError(
                f"{where}: tensor {name} has shape {list(tensor.shape)}, the config needs "
                f"{list(param.shape)}"
            )
        param.data.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise BaseModelMismatchError(
            f"{where} lacks {len(missing)} tensor(s) of the base, e.g. {missing[:3]}"
        )
    if tied:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    _restore_rotary_tables(model)
    return model.eval()


def load_base_model(
    path_or_s3: str | Path,
    cfg: ModelConfig | None = None,
    *,
    store: ObjectStore | StorageConfig | None = None,
    cache_dir: str | Path | None = None,
    parts: Sequence[BasePart] = BASE_PARTS,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """Load ``parts`` of an HF-format Qwen2.5-VL (safetensors) from a folder or ``s3://``
    prefix, in eval mode. Only those parts' tensors are read, straight onto the device.

    The checkpoint's config is checked against ``cfg`` and ``tokenizer`` when given. ``device``
    and ``dtype`` default to ``cfg``'s (resolved; "auto" without a config).
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
    device = resolve_device(device or (cfg.device if cfg is not None else "auto"))
    dtype = dtype or resolve_dtype(cfg.dtype if cfg is not None else "auto", device)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    _drop_parts(model, parts)
    wanted = [prefix for part in parts for prefix in _PART_PREFIXES[part]]
    tensors = _checkpoint_tensors(folder, wanted, device)
    model = materialize_base(model, tensors, device=device, dtype=dtype, where=str(path_or_s3))
    if tokenizer is not None:
        _wire_generation(model, tokenizer)
    return model


def load_base(
    path_or_s3: str | Path,
    cfg: ModelConfig | None = None,
    *,
    store: ObjectStore | StorageConfig | None = None,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Model and its own tokenizer from an HF-format folder or ``s3://`` prefix."""
    folder = fetch_pretrained(path_or_s3, store, cache_dir)
    tokenizer = load_tokenizer(folder)
    model = load_base_model(folder, cfg, device=device, dtype=dtype, tokenizer=tokenizer)
    return model, tokenizer


def fit_embeddings(
    model: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerBase
) -> int:
    """Grow the embedding (and an untied LM head) when the tokenizer has ids past its rows;
    return the number of rows added (0 for Qwen's checkpoints, which have spare rows).

    New rows start at the mean of the old ones (transformers' ``mean_resizing``); a tied head
    stays tied."""
    rows = model.config.text_config.vocab_size
    if len(tokenizer) <= rows:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.text_config.vocab_size = len(tokenizer)
    return len(tokenizer) - rows


def base_from_config(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    store: ObjectStore | StorageConfig | None = None,
    cache_dir: str | Path | None = None,
    parts: Sequence[BasePart] = BASE_PARTS,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerBase]:
    """The base of ``cfg`` (only ``parts``): loaded from ``cfg.base_path``, else built
    (training the preset's tokenizer on the built-in corpus unless one is given). A given
    tokenizer wins over the checkpoint's own."""
    device = resolve_device(device or cfg.device)
    if cfg.base_path is not None:
        folder = fetch_pretrained(cfg.base_path, store, cache_dir)
        tokenizer = tokenizer or load_tokenizer(folder)
        model = load_base_model(
            folder, cfg, parts=parts, device=device, dtype=dtype, tokenizer=tokenizer
        )
        return model, tokenizer
    tokenizer = tokenizer or train_builtin_tokenizer(cfg.text.vocab_size)
    return build_base_model(cfg, tokenizer, parts=parts, device=device, dtype=dtype), tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
