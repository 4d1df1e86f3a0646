"""Learned tile encoders: HF-format ViT / DINOv2 checkpoints (pathology foundation models).

A checkpoint is a folder or an ``s3://bucket/prefix/`` holding ``config.json`` (``model_type``
``vit`` or ``dinov2``), safetensors weights (``model.safetensors``, or shards listed by
``model.safetensors.index.json``) and optionally ``preprocessor_config.json``: the layout of
Phikon (ViT-B/16 ``ViTModel``) or UNI-style DINOv2 ViTs saved with ``save_pretrained``.

Design decisions:

- Loading is ``from_pretrained(folder, local_files_only=True, use_safetensors=True)`` with the
  concrete ``ViTModel`` / ``Dinov2Model`` class: never a hub download, never a pickle, never
  remote code. ``config.json`` is read as plain JSON first, so an unsupported ``model_type`` or
  a folder with pickle weights only is refused before transformers touches it; so is a
  checkpoint that lacks weights the forward uses (they would be random). An ``s3://``
  prefix is downloaded through :func:`smartpath.model.checkpoint.download_prefix` into a local
  cache folder keyed by the objects' ETags.
- Features are the CLS token of the last hidden state, after the final layernorm
  (``last_hidden_state[:, 0]``); ``ViTModel`` is built without its pooler (a dense + tanh head
  that these models' features do not use). Returned as float32 numpy on the CPU.
- The encoder's ``name`` is ``"<model_type>:<digest12>"``, the first 12 hex digits of the
  SHA-256 of the weights (of ``model.safetensors`` itself, so ``sha256sum`` checks it; of the
  shards' bytes in file-name order when sharded). The name travels with saved features and
  with SmartPath checkpoints, so features of two different checkpoints never share a name.
- Preprocessing mirrors the models' HF image processors but runs vectorised in torch on the
  encoder's device: uint8 tiles are moved to the device as uint8 (4x less traffic than float),
  resized to the model's input size with bilinear + antialias interpolation in float32, scaled
  to [0, 1] and normalised with ``preprocessor_config.json``'s ``image_mean`` / ``image_std``
  (ImageNet's when there is no preprocessor config). ViT's input size is ``config.image_size``
  (its position embeddings are fixed); DINOv2 interpolates its position embeddings, so its
  size is the preprocessor's ``crop_size`` (224 when absent), as the HF processor feeds it.
  Unlike the HF processor, the resized pixels are not rounded back to uint8.
- One forward covers at most ``batch_size`` tiles (bounds activation memory), under
  ``torch.inference_mode()``; the code is device- and dtype-generic (CPU float32 in tests,
  CUDA bfloat16 in production), preprocessing stays float32 and is cast to the model's dtype.
- :func:`tile_encoder_for` picks the encoder of a :class:`ModelConfig`: the built-in named by
  ``tile_encoder`` when ``tile_encoder_path`` is None, else the checkpoint at that path, which
  must hash to the configured name (features made by another encoder must never be served with
  this one); either way its ``dim`` must equal the aggregator's ``feature_dim``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, Dinov2Model, PreTrainedModel, ViTModel

from smartpath.core.config import StorageConfig
from smartpath.core.config.model import ModelConfig
from smartpath.core.storage import ObjectStore
from smartpath.model.checkpoint import download_prefix, is_s3_uri, resolve_store
from smartpath.model.tile_encoder import (
    LEARNED_MODEL_TYPES,
    TileEncoder,
    _check_tiles,
    make_tile_encoder,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HFTileEncoder",
    "load_hf_tile_encoder",
    "tile_encoder_for",
    "weights_digest",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_DEFAULT_SIZE = 224
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {"vit": ViTModel, "dinov2": Dinov2Model}
assert tuple(_MODEL_CLASSES) == LEARNED_MODEL_TYPES
# Parameters a checkpoint may lack: only used with bool_masked_pos (masked-image pretraining).
_UNUSED_KEYS = {"embeddings.mask_token"}


class HFTileEncoder:
    """A ViT / DINOv2 tile encoder on a device: uint8 tiles -> CLS features (see module doc).

    Build it with :func:`load_hf_tile_encoder`; the constructor takes an already loaded model.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        name: str,
        image_size: tuple[int, int],
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 channel means and positive stds, got {mean} / {std}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.name = name
        self.dim = int(model.config.hidden_size)
        self.model_type = str(model.config.model_type)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"HFTileEncoder(name={self.name!r}, dim={self.dim}, image_size={self.image_size}, "
            f"device={str(self.device)!r}, dtype={self.dtype})"
        )

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 tiles (B, H, W, 3) on any device -> model input (B, 3, h, w) in ``dtype``."""
        x = tiles.to(self.device).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(
                x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True
            )
        return ((x - self._mean) / self._std).to(self.dtype)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """CLS features (B, dim) float32 of uint8 RGB tiles (B, H, W, 3), in forwards of at
        most ``batch_size`` tiles."""
        tiles = _check_tiles(tiles)
        if len(tiles) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(tiles), self.batch_size):
                chunk = np.ascontiguousarray(tiles[start : start + self.batch_size])
                pixels = self.preprocess(torch.from_numpy(chunk))
                hidden = self.model(pixel_values=pixels).last_hidden_state
                out.append(hidden[:, 0].to(device="cpu", dtype=torch.float32))
        return torch.cat(out).numpy()


def weights_digest(folder: str | Path) -> str:
    """SHA-256 (hex) of an HF folder's safetensors weights (see module docstring).

    Raises FileNotFoundError when the folder has no safetensors weights (naming any pickle
    files, which are never loaded).
    """
    files = _weights_files(Path(folder))
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _weights_files(folder: Path) -> list[Path]:
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise FileNotFoundError(f"{folder} lacks the shards {missing or '(none listed)'}")
        return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    hint = f" (only pickle files {pickles}, which are never loaded)" if pickles else ""
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}{hint}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _size_pair(value: Any, where: str) -> tuple[int, int]:
    """(height, width) of an int, a [h, w] pair or an HF size dict."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    raise ValueError(f"cannot read an image size from {where} = {value!r}")


def _channels(value: Any, where: str) -> tuple[float, float, float]:
    """RGB statistics of a preprocessor config: 3 numbers, or one for all channels."""
    values = [value] * 3 if isinstance(value, int | float) else list(value)
    if len(values) != 3:
        raise ValueError(f"{PREPROCESSOR_FILE} {where} must have 3 channels, got {value!r}")
    return float(values[0]), float(values[1]), float(values[2])


def _fetch(
    path_or_s3: str | Path,
    store: ObjectStore | StorageConfig | None,
    cache_dir: str | Path | None,
) -> Path:
    """A local folder holding the checkpoint: the path itself, or a cached S3 download."""
    if is_s3_uri(path_or_s3):
        return download_prefix(str(path_or_s3), resolve_store(store), cache_dir)
    folder = Path(path_or_s3).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"tile encoder folder {folder} does not exist")
    return folder


def load_hf_tile_encoder(
    path_or_s3: str | Path,
    *,
    store: ObjectStore | StorageConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
) -> HFTileEncoder:
    """The ViT / DINOv2 tile encoder of an HF-format folder or ``s3://bucket/prefix/``.

    Raises ValueError for another ``model_type`` and FileNotFoundError for a folder without
    ``config.json`` or safetensors weights. ``store`` (an ObjectStore or a StorageConfig;
    default: the local store) and ``cache_dir`` serve ``s3://`` sources only.
    """
    folder = _fetch(path_or_s3, store, cache_dir)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path_or_s3} has no {CONFIG_FILE}: not an HF-format checkpoint")
    model_type = _read_json(config_path).get("model_type")
    if model_type not in _MODEL_CLASSES:
        raise ValueError(
            f"{path_or_s3} holds a {model_type!r} model; tile encoders must be one of "
            f"{list(LEARNED_MODEL_TYPES)} (HF ViTModel / Dinov2Model)"
        )
    digest = weights_digest(folder)  # also refuses pickle-only folders, before loading
    pre_path = folder / PREPROCESSOR_FILE
    pre = _read_json(pre_path) if pre_path.is_file() else {}
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if model_type == "vit":
        image_size = _size_pair(config.image_size, f"{CONFIG_FILE} image_size")
        extra: dict[str, Any] = {"add_pooling_layer": False}
    else:
        crop = pre.get("crop_size")
        image_size = (
            _size_pair(crop, f"{PREPROCESSOR_FILE} crop_size")
            if crop is not None
            else (DINOV2_DEFAULT_SIZE, DINOV2_DEFAULT_SIZE)
        )
        extra = {}
    model, info = _MODEL_CLASSES[model_type].from_pretrained(
        str(folder),
        config=config,
        local_files_only=True,
        use_safetensors=True,
        dtype=dtype,
        output_loading_info=True,
        **extra,
    )
    missing = sorted(set(info["missing_keys"]) - _UNUSED_KEYS)
    if missing:
        raise ValueError(
            f"{path_or_s3} lacks the weights {missing} of its {model_type!r} model (they would "
            "be random): not a complete ViTModel / Dinov2Model checkpoint"
        )
    return HFTileEncoder(
        model,
        name=f"{model_type}:{digest[:12]}",
        image_size=image_size,
        mean=_channels(pre.get("image_mean", IMAGENET_MEAN), "image_mean"),
        std=_channels(pre.get("image_std", IMAGENET_STD), "image_std"),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )


def tile_encoder_for(
    cfg: ModelConfig,
    *,
    store: ObjectStore | StorageConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> TileEncoder:
    """The tile encoder a model config names (see module docstring); ValueError on mismatch."""
    if cfg.tile_encoder_path is None:
        encoder: TileEncoder = make_tile_encoder(cfg.tile_encoder)
    else:
        encoder = load_hf_tile_encoder(
            cfg.tile_encoder_path, store=store, device=device, dtype=dtype, cache_dir=cache_dir
        )
        if encoder.name != cfg.tile_encoder:
            raise ValueError(
                f"tile_encoder_path {cfg.tile_encoder_path} holds the tile encoder "
                f"{encoder.name!r}, but the model config names {cfg.tile_encoder!r}: the model "
                "was trained on features of another encoder. Point tile_encoder_path at the "
                "checkpoint the model was trained with"
            )
    if encoder.dim != cfg.aggregator.feature_dim:
        raise ValueError(
            f"tile encoder {encoder.name!r} makes {encoder.dim}-dim features but "
            f"aggregator.feature_dim is {cfg.aggregator.feature_dim}: they must match"
        )
    return encoder
