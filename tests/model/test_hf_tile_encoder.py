"""Learned tile encoders (HF-format ViT / DINOv2): features equal transformers' own CLS token on
the same pixels, batching, names bound to the weights, refusal of pickles and foreign models,
selection from a ModelConfig, and loading from s3:// (local store and a real S3 server)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model, PreTrainedModel, ViTConfig, ViTModel

import smartpath.model.tile_encoder as tile_encoder_module
from smartpath.core.config import StorageConfig
from smartpath.core.config.model import ModelConfig
from smartpath.core.storage import LocalStore, S3Store
from smartpath.model.checkpoint import upload_folder
from smartpath.model.hf_tile_encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFTileEncoder,
    load_hf_tile_encoder,
    tile_encoder_for,
    weights_digest,
)
from smartpath.model.tile_encoder import StainStatsEncoder, TileEncoder

HIDDEN = 32
VIT_PRE = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size": 32}
DINO_CROP = 24  # the preprocessor's crop size, not config.image_size (64), is DINOv2's input


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread, so no OpenMP barrier stalls when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_vit(seed: int) -> ViTModel:
    """A random ViT-B/16-shaped ViTModel, shrunk: hidden 32, 2 layers, 32 px, 8 px patches."""
    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        initializer_range=0.2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ViTModel(config).eval()  # with its pooler, as public checkpoints ship it


def _tiny_dinov2(seed: int) -> Dinov2Model:
    """A random DINOv2-style ViT: hidden 32, 2 layers, 8 px patches, layerscale."""
    config = Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=64,
        patch_size=8,
        initializer_range=0.2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Dinov2Model(config).eval()


def _save(model: PreTrainedModel, folder: Path, preprocessor: dict | None) -> Path:
    model.save_pretrained(str(folder))  # transformers 5 always writes model.safetensors
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[ViTModel, Path]:
    model = _tiny_vit(0)
    return model, _save(model, tmp_path_factory.mktemp("vit"), VIT_PRE)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dinov2Model, Path]:
    model = _tiny_dinov2(0)
    pre = {"crop_size": {"height": DINO_CROP, "width": DINO_CROP}, "size": {"shortest_edge": 32}}
    return model, _save(model, tmp_path_factory.mktemp("dinov2"), pre)


def _tiles(n: int, size: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference_pixels(tiles: np.ndarray, size: int, mean: list, std: list) -> torch.Tensor:
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _cfg(name: str, path: str | Path | None, feature_dim: int = HIDDEN) -> ModelConfig:
    return ModelConfig(
        tile_encoder=name,
        tile_encoder_path=None if path is None else str(path),
        aggregator={"feature_dim": feature_dim, "num_tokens": 4},
    )


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# -- features ---------------------------------------------------------------------------------


def test_vit_features_are_transformers_cls_token(vit: tuple[ViTModel, Path]) -> None:
    model, folder = vit
    enc = load_hf_tile_encoder(folder)
    assert isinstance(enc, HFTileEncoder) and isinstance(enc, TileEncoder)
    assert enc.dim == HIDDEN and enc.image_size == (32, 32)
    assert enc.name == f"vit:{_sha12(folder / 'model.safetensors')}"
    assert getattr(enc.model, "pooler", None) is None  # built with add_pooling_layer=False
    tiles = _tiles(5)
    pixels = _reference_pixels(tiles, 32, VIT_PRE["image_mean"], VIT_PRE["image_std"])
    torch.testing.assert_close(enc.preprocess(torch.from_numpy(tiles)), pixels)
    out = enc.encode(tiles)
    assert out.shape == (5, HIDDEN) and out.dtype == np.float32 and isinstance(out, np.ndarray)
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[0], out[1], atol=1e-3)  # the pixels reach the model
    # Tiles already at the input size skip the resize and still match.
    small = _tiles(2, size=32, seed=1)
    pixels = _reference_pixels(small, 32, VIT_PRE["image_mean"], VIT_PRE["image_std"])
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(enc.encode(small), ref, rtol=1e-5, atol=1e-5)


def test_dinov2_features_are_transformers_cls_token(dinov2: tuple[Dinov2Model, Path]) -> None:
    model, folder = dinov2
    enc = load_hf_tile_encoder(folder)
    assert enc.name == f"dinov2:{_sha12(folder / 'model.safetensors')}" and enc.dim == HIDDEN
    assert enc.image_size == (DINO_CROP, DINO_CROP)
    tiles = _tiles(4, size=50)
    pixels = _reference_pixels(tiles, DINO_CROP, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(enc.preprocess(torch.from_numpy(tiles)), pixels)
    out = enc.encode(tiles)
    assert out.shape == (4, HIDDEN) and out.dtype == np.float32
    with torch.no_grad():
        hf = model(pixel_values=pixels)
    np.testing.assert_allclose(out, hf.last_hidden_state[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, hf.pooler_output.numpy(), rtol=1e-5, atol=1e-5)


def test_dinov2_without_preprocessor_uses_224_and_imagenet_stats(tmp_path: Path) -> None:
    model = _tiny_dinov2(1)
    enc = load_hf_tile_encoder(_save(model, tmp_path, None))
    assert enc.image_size == (224, 224)
    tiles = _tiles(1, size=64)
    pixels = _reference_pixels(tiles, 224, list(IMAGENET_MEAN), list(IMAGENET_STD))
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(enc.encode(tiles), ref, rtol=1e-5, atol=1e-5)


def test_batches_are_split_and_give_the_same_features(vit: tuple[ViTModel, Path]) -> None:
    _, folder = vit
    tiles = _tiles(7, seed=2)
    whole = load_hf_tile_encoder(folder).encode(tiles)
    enc = load_hf_tile_encoder(folder, batch_size=3)
    sizes: list[int] = []
    enc.model.register_forward_hook(
        lambda _m, args, kwargs, _o: sizes.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    split = enc.encode(tiles)
    assert sizes == [3, 3, 1]
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
    assert enc.encode(tiles[:0]).shape == (0, HIDDEN)
    with pytest.raises(ValueError, match="batch_size"):
        load_hf_tile_encoder(folder, batch_size=0)


def test_rejects_bad_tiles(vit: tuple[ViTModel, Path]) -> None:
    enc = load_hf_tile_encoder(vit[1])
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(_tiles(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enc.encode(_tiles(2)[..., :2])


def test_bfloat16_runs_and_returns_float32(vit: tuple[ViTModel, Path]) -> None:
    _, folder = vit
    tiles = _tiles(3, seed=3)
    enc = load_hf_tile_encoder(folder, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    assert enc.preprocess(torch.from_numpy(tiles)).dtype == torch.bfloat16
    out = enc.encode(tiles)
    assert out.dtype == np.float32 and out.shape == (3, HIDDEN)
    np.testing.assert_allclose(out, load_hf_tile_encoder(folder).encode(tiles), atol=0.15)


# -- names and refusals -----------------------------------------------------------------------


def test_name_follows_the_weights(vit: tuple[ViTModel, Path], tmp_path: Path) -> None:
    _, folder = vit
    name = load_hf_tile_encoder(folder).name
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert load_hf_tile_encoder(copy).name == name  # same weights elsewhere: same name
    other = _save(_tiny_vit(1), tmp_path / "other", VIT_PRE)
    assert load_hf_tile_encoder(other).name != name
    assert weights_digest(other)[:12] == load_hf_tile_encoder(other).name.split(":")[1]


def test_sharded_weights_hash_the_shards(vit: tuple[ViTModel, Path], tmp_path: Path) -> None:
    model, _ = vit
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    joined = hashlib.sha256(b"".join(p.read_bytes() for p in shards)).hexdigest()
    assert weights_digest(tmp_path) == joined
    assert load_hf_tile_encoder(tmp_path).name == f"vit:{joined[:12]}"


def test_pickle_only_folder_is_refused_without_unpickling(
    vit: tuple[ViTModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(vit[1] / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*never loaded"):
        load_hf_tile_encoder(tmp_path)


def test_incomplete_weights_are_refused(vit: tuple[ViTModel, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(vit[1], tmp_path / "vit")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["layernorm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks the weights \['layernorm\.weight'\]"):
        load_hf_tile_encoder(folder)


def test_unsupported_or_missing_models_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match=r"'clip_vision_model'.*\['vit', 'dinov2'\]"):
        load_hf_tile_encoder(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf_tile_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_tile_encoder(tmp_path / "missing")


# -- selection from the model config ----------------------------------------------------------


def test_tile_encoder_for_checks_name_and_feature_dim(vit: tuple[ViTModel, Path]) -> None:
    _, folder = vit
    name = load_hf_tile_encoder(folder).name
    enc = tile_encoder_for(_cfg(name, folder))
    assert isinstance(enc, HFTileEncoder) and enc.name == name
    with pytest.raises(ValueError, match=rf"'{name}'.*'vit:000000000000'"):
        tile_encoder_for(_cfg("vit:000000000000", folder))
    with pytest.raises(ValueError, match=r"32-dim features but aggregator.feature_dim is 64"):
        tile_encoder_for(_cfg(name, folder, feature_dim=64))


def test_tile_encoder_for_builtins(vit: tuple[ViTModel, Path]) -> None:
    assert isinstance(tile_encoder_for(_cfg("stain-stats-v1", None)), StainStatsEncoder)
    assert isinstance(tile_encoder_for(ModelConfig()), StainStatsEncoder)  # defaults agree
    with pytest.raises(ValueError, match=r"aggregator\.feature_dim is 768"):
        tile_encoder_for(ModelConfig(aggregator={"feature_dim": 768}))
    with pytest.raises(ValueError, match="tile_encoder_path"):
        tile_encoder_for(_cfg(load_hf_tile_encoder(vit[1]).name, None))


def test_learned_api_is_reexported_lazily() -> None:
    assert tile_encoder_module.tile_encoder_for is tile_encoder_for
    assert tile_encoder_module.load_hf_tile_encoder is load_hf_tile_encoder
    assert tile_encoder_module.HFTileEncoder is HFTileEncoder
    with pytest.raises(AttributeError):
        _ = tile_encoder_module.no_such_thing


# -- s3:// ------------------------------------------------------------------------------------


def test_load_from_s3_prefix_through_the_local_store(
    vit: tuple[ViTModel, Path], tmp_path: Path
) -> None:
    _, folder = vit
    local = load_hf_tile_encoder(folder)
    store = LocalStore(tmp_path / "objects")
    upload_folder(folder, "s3://encoders/vit-tiny", store)
    cache = tmp_path / "cache"
    enc = load_hf_tile_encoder("s3://encoders/vit-tiny/", store=store, cache_dir=cache)
    tiles = _tiles(3, seed=4)
    assert enc.name == local.name
    np.testing.assert_allclose(enc.encode(tiles), local.encode(tiles), rtol=1e-6, atol=1e-6)
    # Through a StorageConfig and a model config too.
    config = StorageConfig(local_root=tmp_path / "objects")
    cfg = _cfg(local.name, "s3://encoders/vit-tiny/")
    assert tile_encoder_for(cfg, store=config, cache_dir=cache).name == local.name


def test_load_from_s3_server(
    dinov2: tuple[Dinov2Model, Path], tmp_path: Path, s3_config: StorageConfig, bucket_name: str
) -> None:
    _, folder = dinov2
    uri = f"s3://{bucket_name}/encoders/dinov2/"
    upload_folder(folder, uri, S3Store(s3_config))
    enc = load_hf_tile_encoder(uri, store=s3_config, cache_dir=tmp_path / "cache")
    local = load_hf_tile_encoder(folder)
    tiles = _tiles(2, seed=5)
    assert enc.name == local.name and enc.image_size == (DINO_CROP, DINO_CROP)
    np.testing.assert_allclose(enc.encode(tiles), local.encode(tiles), rtol=1e-6, atol=1e-6)
