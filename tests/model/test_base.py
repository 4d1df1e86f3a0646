"""Model config and presets; the tiny Qwen2.5-VL built from a seed; forward passes with and
without an ROI on CPU; and the real HF-format path: save_pretrained (local and S3) → load →
identical logits."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

from smartpath.core.config import StorageConfig
from smartpath.core.config.model import PRESETS, ModelConfig
from smartpath.core.storage import S3Store
from smartpath.model.base import (
    BaseModelMismatchError,
    base_from_config,
    build_base_model,
    count_parameters,
    load_base,
    load_base_model,
    save_base_model,
)
from smartpath.model.tokenizer import (
    IMAGE_PAD,
    SLIDE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    render_chat,
    token_ids,
    train_builtin_tokenizer,
)
from smartpath.model.vision import RoiInput, expand_image_pads, make_image_processor, prepare_roi

TINY = ModelConfig(preset="tiny")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread, so no OpenMP barrier stalls when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_builtin_tokenizer(TINY.text.vocab_size)


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerFast) -> Qwen2_5_VLForConditionalGeneration:
    return build_base_model(TINY, tok)


def _roi(seed: int = 0, hw: tuple[int, int] = (56, 84)) -> RoiInput:
    img = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    return prepare_roi(img, make_image_processor(TINY.vision))


def _image_inputs(tok: PreTrainedTokenizerFast, roi: RoiInput) -> dict[str, torch.Tensor]:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Diagnosis?"}]}
    ]
    text = expand_image_pads(render_chat(tok, messages), roi.num_image_tokens)
    enc = tok(text, return_tensors="pt")
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "pixel_values": roi.pixel_values,
        "image_grid_thw": roi.image_grid_thw,
    }


def _text_inputs(tok: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    batch = tok(
        ["Classify this region of interest.", "Is there evidence of necrosis in 12 of 1000?"],
        return_tensors="pt",
        padding=True,
    )
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


@torch.no_grad()
def _logits(m: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return m(**inputs).logits


# -- config ---------------------------------------------------------------------------------


def test_presets_and_defaults() -> None:
    assert set(PRESETS) >= {"tiny", "bench", "qwen2.5-vl-7b"}
    t = TINY.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size) == (
        64,
        2,
        4,
        2,
        128,
    )
    v = TINY.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.patch_size, v.spatial_merge_size) == (
        2,
        32,
        2,
        14,
        2,
    )
    e = TINY.experts
    assert (e.num_experts, e.rank, e.alpha, e.top_k, e.target_modules) == (
        4,
        8,
        16,
        2,
        ["q_proj", "v_proj"],
    )
    assert (TINY.aggregator.feature_dim, TINY.aggregator.num_tokens) == (32, 32)  # stain-stats
    assert TINY.aggregator.chunk_size == 4096
    assert (TINY.device, TINY.dtype) == ("auto", "auto")
    assert t.mrope_section == [2, 3, 3]
    assert PRESETS["qwen2.5-vl-7b"].text.mrope_section == [16, 24, 24]


def test_every_field_is_described() -> None:
    from smartpath.core.config import model as mod

    for cls in (
        mod.ModelConfig,
        mod.TextSizes,
        mod.VisionSizes,
        mod.ExpertsConfig,
        mod.RouterConfig,
        mod.AggregatorConfig,
        mod.SlideTiles,
    ):
        undocumented = [n for n, f in cls.model_fields.items() if not f.description]
        assert undocumented == [], f"{cls.__name__}: {undocumented}"


def test_overrides_merge_and_dump_round_trips() -> None:
    cfg = ModelConfig(preset="tiny", text={"num_layers": 3}, experts={"top_k": 1})
    assert cfg.text.num_layers == 3
    assert cfg.text.hidden_size == 64
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError, match="frozen"):
        cfg.preset = "bench"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "huge"}, "unknown model preset 'huge'"),
        ({"preset": "qwen2.5-vl-7b"}, "set base_path"),
        ({"text": {"num_heads": 3}}, r"text.hidden_size \(64\) must be divisible"),
        ({"text": {"num_kv_heads": 3}}, "multiple of text.num_kv_heads"),
        ({"text": {"hidden_size": 48, "num_heads": 4}}, "multiple of 16"),
        ({"vision": {"fullatt_block_indexes": [2]}}, "outside 0..1"),
        ({"vision": {"min_pixels": 10**6}}, "must not exceed vision.max_pixels"),
        ({"vision": {"window_size": 100}}, "window_size"),
        ({"experts": {"top_k": 5}}, r"top_k \(5\) cannot exceed"),
        ({"experts": {"target_modules": ["qkv"]}}, "unknown experts.target_modules"),
        ({"experts": {"target_modules": []}}, "at least 1 item"),
        ({"base_path": "s3://"}, "names no bucket"),
        ({"dtype": "float64"}, "float32"),
        ({"sizes": {}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_combinations_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        ModelConfig(**kwargs)


def test_real_preset_with_base_path_is_valid() -> None:
    cfg = ModelConfig(preset="qwen2.5-vl-7b", base_path="s3://models/qwen2.5-vl-7b/")
    assert cfg.text.hidden_size == 3584 and cfg.vision.depth == 32


# -- build and forward ----------------------------------------------------------------------


def test_build_is_deterministic_and_leaves_global_rng_alone(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_base_model(TINY, tok)
    assert torch.equal(torch.rand(3), expected_next)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_base_model(ModelConfig(preset="tiny", seed=1), tok).state_dict()
    assert not torch.equal(a["lm_head.weight"], other["lm_head.weight"])


def test_build_wires_tokenizer(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    ids = token_ids(tok, [IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, SLIDE_PAD])
    c = model.config
    assert c.image_token_id == ids[IMAGE_PAD]
    assert c.video_token_id == ids[VIDEO_PAD]
    assert c.vision_start_token_id == ids[VISION_START]
    assert c.vision_end_token_id == ids[VISION_END]
    assert c.slide_token_id == ids[SLIDE_PAD]
    assert c.text_config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape == (len(tok), 64)
    assert model.lm_head.weight.shape == (len(tok), 64)
    assert c.vision_config.out_hidden_size == 64
    assert c.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert c.text_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert not model.training


def test_parameter_counts() -> None:
    tiny = count_parameters(build_base_model(TINY, train_builtin_tokenizer(1024)))
    assert 100_000 < tiny < 1_000_000
    bench_cfg = ModelConfig(preset="bench")
    bench = count_parameters(build_base_model(bench_cfg, train_builtin_tokenizer(8192)))
    assert 20_000_000 <= bench <= 60_000_000


def test_bfloat16_build(tok: PreTrainedTokenizerFast) -> None:
    m = build_base_model(ModelConfig(preset="tiny", dtype="bfloat16"), tok)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_build_refuses_a_config_with_base_path(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="load_base_model"):
        build_base_model(ModelConfig(preset="tiny", base_path="/models/tiny"), tok)


def test_forward_text_only(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    inputs = _text_inputs(tok)
    logits = _logits(model, inputs)
    assert logits.shape == (*inputs["input_ids"].shape, len(tok))
    assert torch.isfinite(logits).all()


def test_forward_with_an_roi_uses_the_image(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    roi = _roi(0)
    inputs = _image_inputs(tok, roi)
    n_pad = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_pad == roi.num_image_tokens == 6
    logits = _logits(model, inputs)
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    other = _logits(model, {**inputs, "pixel_values": _roi(1).pixel_values})
    assert not torch.allclose(logits[0, -1], other[0, -1])


def test_wrong_number_of_image_pads_fails(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    roi = _roi(0)
    inputs = _image_inputs(tok, roi)
    ids = inputs["input_ids"]
    pad = model.config.image_token_id
    first = int((ids[0] == pad).nonzero()[0])
    fewer = torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)
    with pytest.raises(ValueError, match=r"(?i)image"):
        _logits(model, {**inputs, "input_ids": fewer, "attention_mask": torch.ones_like(fewer)})


def test_generate_with_an_roi(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration
) -> None:
    inputs = _image_inputs(tok, _roi(0, (112, 84)))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape[0] == 1 and prompt_len < out.shape[1] <= prompt_len + 4
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])


# -- HF format save / load --------------------------------------------------------------------


def _assert_same_logits(
    a: Qwen2_5_VLForConditionalGeneration,
    b: Qwen2_5_VLForConditionalGeneration,
    tok: PreTrainedTokenizerFast,
) -> None:
    for inputs in (_text_inputs(tok), _image_inputs(tok, _roi(2))):
        assert torch.equal(_logits(a, inputs), _logits(b, inputs))


def test_hf_format_round_trip_local(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration, tmp_path: Path
) -> None:
    save_base_model(model, tok, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_vl"

    loaded = load_base_model(tmp_path, TINY, tokenizer=tok)
    assert isinstance(loaded, Qwen2_5_VLForConditionalGeneration)
    assert not loaded.training
    _assert_same_logits(model, loaded, tok)

    loaded2, tok2 = load_base(str(tmp_path), TINY)
    assert tok2.encode("<think>x</think>") == tok.encode("<think>x</think>")
    assert loaded2.config.slide_token_id == model.config.slide_token_id
    _assert_same_logits(model, loaded2, tok)


def test_hf_format_round_trip_s3(
    tok: PreTrainedTokenizerFast,
    model: Qwen2_5_VLForConditionalGeneration,
    s3_config: StorageConfig,
    bucket_name: str,
    tmp_path: Path,
) -> None:
    store = S3Store(s3_config)
    uri = f"s3://{bucket_name}/base/tiny/"
    save_base_model(model, tok, uri, store)
    keys = [i.key for i in store.list(bucket_name, "base/tiny/")]
    assert "base/tiny/model.safetensors" in keys and "base/tiny/config.json" in keys
    assert not [k for k in keys if k.endswith((".bin", ".pt"))]

    cache = tmp_path / "cache"
    loaded = load_base_model(uri, TINY, store=s3_config, cache_dir=cache)
    _assert_same_logits(model, loaded, tok)

    # a second load is served from the cache: no download at all
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded again")

    store.download = no_download  # type: ignore[method-assign]
    again, tok2 = load_base(uri, TINY, store=store, cache_dir=cache)
    assert len([p for p in cache.iterdir() if not p.name.startswith("tmp-")]) == 1
    _assert_same_logits(model, again, tok2)


def test_base_from_config_builds_or_loads(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration, tmp_path: Path
) -> None:
    built, built_tok = base_from_config(TINY)
    assert len(built_tok) == len(tok)
    _assert_same_logits(model, built, tok)
    save_base_model(model, tok, tmp_path)
    loaded, _ = base_from_config(ModelConfig(preset="tiny", base_path=str(tmp_path)))
    _assert_same_logits(model, loaded, tok)


def test_load_refuses_mismatched_or_foreign_checkpoints(
    tok: PreTrainedTokenizerFast, model: Qwen2_5_VLForConditionalGeneration, tmp_path: Path
) -> None:
    good = tmp_path / "good"
    save_base_model(model, tok, good)
    with pytest.raises(BaseModelMismatchError, match=r"text.hidden_size is 64 .* 512"):
        load_base_model(good, ModelConfig(preset="bench"))

    foreign = tmp_path / "foreign"
    shutil.copytree(good, foreign)
    raw = json.loads((foreign / "config.json").read_text())
    raw["model_type"] = "llama"
    (foreign / "config.json").write_text(json.dumps(raw))
    with pytest.raises(BaseModelMismatchError, match="'llama' model"):
        load_base_model(foreign)

    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        load_base_model(pickled)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base_model(tmp_path / "missing")
