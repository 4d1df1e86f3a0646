"""A real Qwen2.5-VL checkpoint: its tokenizer, `model init`, loading by parts, and generation
checked token for token against transformers' own ``generate`` at the 3B and 7B widths."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from smartpath.model.base import canonical_key, load_base_model, read_hf_config
from smartpath.model.checkpoint import load_checkpoint
from smartpath.model.grammar import Scale, Task
from smartpath.model.initialize import init_checkpoint, matching_preset
from smartpath.model.mllm import PLACEHOLDER_TOKENS, MultimodalBatch, SlideInput, SmartPathModel
from smartpath.model.tokenizer import (
    ANSWER_START,
    SLIDE_PAD,
    THINK_START,
    load_tokenizer,
    prepare_tokenizer,
)
from smartpath.model.vision import make_image_processor, prepare_roi, question_ids
from tests.qwen_shaped import QWEN_IDS

IM_END = QWEN_IDS["<|im_end|>"]


@pytest.fixture(scope="module")
def tiny_ckpt(qwen_base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sp-tiny") / "ckpt"
    init_checkpoint(qwen_base("tiny"), out, seed=3)
    return out


def _roi(seed: int = 0, shape: tuple[int, int] = (84, 112)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_qwen_tokenizer_gets_only_the_slide_pad(qwen_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(qwen_tokenizer_dir)
    assert len(tok) == 151665 and tok.unk_token is None and tok.bos_token is None
    assert prepare_tokenizer(tok) is True
    assert tok.convert_tokens_to_ids(SLIDE_PAD) == 151665 and len(tok) == 151666
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS  # unchanged
    for tag in (THINK_START, ANSWER_START):  # the grammar tags stay plain text
        assert tag not in tok.get_vocab()
        assert len(tok.encode(tag, add_special_tokens=False)) > 1
    assert prepare_tokenizer(tok) is False and len(tok) == 151666


@pytest.mark.parametrize("slide", [False, True])
def test_prompts_render_with_the_checkpoints_own_template(
    qwen_tokenizer_dir: Path, slide: bool
) -> None:
    tok = load_tokenizer(qwen_tokenizer_dir)
    prepare_tokenizer(tok)
    pad = SLIDE_PAD if slide else "<|image_pad|>"
    ids = question_ids(tok, "Grade the tumour.", slide=slide, visual_tokens=5)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{pad * 5}<|vision_end|>Grade the tumour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.decode(ids) == expected
    assert ids.count(tok.convert_tokens_to_ids(pad)) == 5
    assert ids[0] == QWEN_IDS["<|im_start|>"]


def test_model_init_references_the_base_and_writes_only_smartpaths_parts(
    qwen_base, tiny_ckpt: Path
) -> None:
    tensors, manifest, tok_dir = load_checkpoint(tiny_ckpt)
    cfg = manifest.model
    base = qwen_base("tiny")
    assert cfg.base_path == str(base.resolve()) and cfg.preset == "qwen2.5-vl" and cfg.seed == 3
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.vision.depth) == (64, 2, 2)
    assert cfg.tile_encoder == "stain-stats-v1" and cfg.aggregator.feature_dim == 32
    assert all(not k.startswith("base.") or ".lora_" in k for k in tensors)
    assert any(".lora_A" in k for k in tensors) and any(k.startswith("router.") for k in tensors)
    assert any(k.startswith("aggregator.") for k in tensors)
    assert load_tokenizer(tok_dir).convert_tokens_to_ids(SLIDE_PAD) == 151665
    with pytest.raises(FileExistsError):
        init_checkpoint(base, tiny_ckpt)


def test_preset_is_named_by_width(qwen_base) -> None:
    from tests.qwen_shaped import qwen_config

    assert matching_preset(qwen_config("3b")) == "qwen2.5-vl-3b"
    assert matching_preset(qwen_config("7b")) == "qwen2.5-vl-7b"
    assert matching_preset(qwen_config("tiny")) == "qwen2.5-vl"
    with pytest.raises(ValueError, match=r"text\.hidden_size is 64 in the checkpoint but 3584"):
        init_checkpoint(qwen_base("tiny"), "/nonexistent/never-written", preset="qwen2.5-vl-7b")


def test_each_part_loads_alone_and_computes_the_same(tiny_ckpt: Path) -> None:
    full = SmartPathModel.load(tiny_ckpt)
    vision = SmartPathModel.load(tiny_ckpt, parts=("vision",))
    router = SmartPathModel.load(tiny_ckpt, parts=("router",))
    language = SmartPathModel.load(tiny_ckpt, parts=("language",))
    names = {
        p: {n for n, _ in m.named_parameters()}
        for p, m in [("vision", vision), ("router", router), ("language", language)]
    }
    assert not any("language_model" in n or "lm_head" in n for n in names["vision"])
    assert names["router"] and all(n.startswith("router.") for n in names["router"])
    assert not any(
        "visual" in n or n.startswith(("aggregator", "router")) for n in names["language"]
    )
    total = sum(p.numel() for p in full.parameters())
    assert sum(sum(p.numel() for p in m.parameters()) for m in (vision, router, language)) == total

    roi = prepare_roi(_roi(), make_image_processor(full.cfg.vision))
    expected = full.encode_images(roi.pixel_values, roi.image_grid_thw)
    torch.testing.assert_close(vision.encode_images(roi.pixel_values, roi.image_grid_thw), expected)
    slide = SlideInput(torch.randn(7, 32), torch.rand(7, 2) * 5000, 0.5)
    torch.testing.assert_close(vision.slide_tokens_of(slide), full.slide_tokens_of(slide))

    ids = question_ids(
        full.tokenizer, "What is it?", slide=False, visual_tokens=roi.num_image_tokens
    )
    batch = MultimodalBatch(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        task_ids=torch.tensor([int(Task.VQA)]),
        scale_ids=torch.tensor([int(Scale.ROI)]),
        image_grid_thw=roi.image_grid_thw,
        image_embeds=expected,
    )
    _, _, pooled = full.embed(batch)
    routing = full.route(batch, pooled).routing()
    split_routing = router.route(batch, pooled).routing()
    assert torch.equal(split_routing.indices, routing.indices)
    want = full.generate(batch, max_new_tokens=6, routing=routing)
    assert language.generate(batch, max_new_tokens=6, routing=split_routing) == want
    with pytest.raises(RuntimeError, match="'vision' part was not loaded"):
        language.encode_images(roi.pixel_values, roi.image_grid_thw)
    with pytest.raises(RuntimeError, match="cannot be saved"):
        language.save(tiny_ckpt.parent / "partial")


def test_the_published_tensor_layout_loads_the_same_weights(qwen_base) -> None:
    current = load_base_model(qwen_base("tiny"), device="cpu")
    legacy_folder = qwen_base("tiny", legacy_keys=True)
    from safetensors import safe_open

    with safe_open(str(legacy_folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("visual.") for k in keys) and any(
        k.startswith("model.layers.") for k in keys
    )
    assert canonical_key("model.layers.0.mlp.up_proj.weight") == (
        "model.language_model.layers.0.mlp.up_proj.weight"
    )
    legacy = load_base_model(legacy_folder, device="cpu")
    a, b = current.state_dict(), legacy.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_grows_only_when_the_slide_pad_does_not_fit(
    qwen_base, tmp_path: Path, tied: bool
) -> None:
    base = qwen_base("tiny", vocab_size=151665, tie_word_embeddings=tied)
    init_checkpoint(base, tmp_path / "ckpt")
    tensors, _, _ = load_checkpoint(tmp_path / "ckpt")
    stored = tensors["vocab_extension.embed_tokens"]
    assert stored.shape == (1, 64)
    assert ("vocab_extension.lm_head" in tensors) is not tied
    model = SmartPathModel.load(tmp_path / "ckpt")
    emb = model.base.get_input_embeddings().weight
    assert model.vocab_extension == 1 and emb.shape[0] == 151666
    torch.testing.assert_close(emb[-1:], stored)
    assert (model.base.lm_head.weight is emb) is tied
    original = load_base_model(base, device="cpu").get_input_embeddings().weight
    torch.testing.assert_close(emb[:-1], original)
    # Qwen's own sizes have spare rows: nothing grows.
    assert SmartPathModel.load(tmp_path / "ckpt", parts=("vision",)).vocab_extension == 0


def test_bfloat16_keeps_float32_rotary_tables(tiny_ckpt: Path) -> None:
    model = SmartPathModel.load(tiny_ckpt, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tables = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert tables and all(b.dtype == torch.float32 for b in tables)
    roi = prepare_roi(_roi(), make_image_processor(model.cfg.vision))
    ids = question_ids(model.tokenizer, "?", slide=False, visual_tokens=roi.num_image_tokens)
    batch = MultimodalBatch(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        task_ids=torch.tensor([int(Task.VQA)]),
        scale_ids=torch.tensor([int(Scale.ROI)]),
        pixel_values=roi.pixel_values,
        image_grid_thw=roi.image_grid_thw,
    )
    assert len(model.generate(batch, max_new_tokens=3)[0]) == 3


def _hf_greedy(
    folder: Path, prompt: list[int], roi, max_new: int, suppress: list[int]
) -> list[int]:
    """transformers' own greedy generation on the base checkpoint (float32)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True
    ).eval()
    ids = torch.tensor([prompt])
    kwargs = {}
    if roi is not None:  # as Qwen's processor gives them (mm_token_type_ids: M-RoPE for images)
        image = (ids == model.config.image_token_id).int()
        kwargs = {
            "pixel_values": roi.pixel_values,
            "image_grid_thw": roi.image_grid_thw,
            "mm_token_type_ids": image,
        }
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=IM_END,
        pad_token_id=QWEN_IDS["<|endoftext|>"],
        suppress_tokens=suppress,
        **kwargs,
    )
    del model
    gc.collect()
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_generation_matches_transformers_at_full_width(
    qwen_base, tmp_path: Path, size: str
) -> None:
    base = qwen_base(size)
    assert read_hf_config(base).text_config.hidden_size == {"3b": 2048, "7b": 3584}[size]
    init_checkpoint(base, tmp_path / "ckpt")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt" / "tokenizer"))
    processor = make_image_processor(read_hf_config(base).vision_config, max_pixels=112 * 112)
    roi = prepare_roi(_roi(1), processor)
    prompts = [
        question_ids(tok, "Describe the tissue.", slide=False, visual_tokens=roi.num_image_tokens),
        tok("<|im_start|>user\nIs this tumour?<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
    ]
    vocab = tok.get_vocab()
    suppress = [vocab[t] for t in PLACEHOLDER_TOKENS]
    max_new = 8
    want = [
        _hf_greedy(base, prompts[0], roi, max_new, suppress),
        _hf_greedy(base, prompts[1], None, max_new, suppress),
    ]
    model = SmartPathModel.load(tmp_path / "ckpt", dtype="float32")
    length = max(map(len, prompts))
    ids = torch.full((2, length), QWEN_IDS["<|endoftext|>"])
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    batch = MultimodalBatch(
        input_ids=ids,
        attention_mask=mask,
        task_ids=torch.tensor([int(Task.VQA)] * 2),
        scale_ids=torch.tensor([int(Scale.ROI)] * 2),
        pixel_values=roi.pixel_values,
        image_grid_thw=roi.image_grid_thw,
    )
    got = model.generate(batch, max_new_tokens=max_new, eos_token_id=IM_END)
    assert got == want
    assert all(len(g) >= 1 for g in got)


def test_service_sizes_are_what_each_part_loads(tiny_ckpt: Path) -> None:
    from smartpath.model.sizes import parameter_counts, service_parameters, serving_table

    cfg = load_checkpoint(tiny_ckpt)[1].model
    counted = service_parameters(parameter_counts(cfg))
    for service, parts in {"encoder": ("vision",), "router": ("router",),
                           "decoder": ("language",)}.items():  # fmt: skip
        model = SmartPathModel.load(tiny_ckpt, parts=parts)
        assert counted[service] == sum(p.numel() for p in model.parameters()), service
    table = serving_table(cfg, "bfloat16")
    assert f"| decoder | {counted['decoder'] / 1e6:,.2f} M |" in table


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SMARTPATH_SLOW"), reason="set SMARTPATH_SLOW=1")
def test_full_depth_3b_in_bfloat16_on_cpu(qwen_base, tmp_path: Path) -> None:
    """The whole Qwen2.5-VL-3B (36 text, 32 vision layers; ~7.5 GB in bfloat16) loads and
    decodes on CPU, as transformers does."""
    base = qwen_base("3b", text_layers=36, vision_layers=32)
    init_checkpoint(base, tmp_path / "ckpt", preset="qwen2.5-vl-3b")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt" / "tokenizer"))
    prompt = tok("<|im_start|>user\nIs this tumour?<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([prompt["input_ids"]])
    model = SmartPathModel.load(tmp_path / "ckpt", dtype="bfloat16")
    assert model.cfg.text.num_layers == 36 and model.cfg.vision.depth == 32
    batch = MultimodalBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        task_ids=torch.tensor([int(Task.VQA)]),
        scale_ids=torch.tensor([int(Scale.ROI)]),
    )
    with torch.no_grad():
        ours = model(batch).logits[0, -1].float()
    got = model.generate(batch, max_new_tokens=4, eos_token_id=IM_END)[0]
    del model
    gc.collect()
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(base), dtype=torch.bfloat16, local_files_only=True, use_safetensors=True
    ).eval()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    theirs = theirs.float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert len(got) == 4 and got[0] == int(theirs.argmax())


def test_model_init_from_and_to_object_storage(
    qwen_base, s3_config, bucket_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smartpath.core.storage import make_store
    from smartpath.model.checkpoint import upload_folder

    monkeypatch.setenv("HOME", str(tmp_path))  # the download cache lives under ~/.smartpath
    store = make_store(s3_config)
    base_uri = f"s3://{bucket_name}/bases/qwen-tiny/"
    upload_folder(qwen_base("tiny"), base_uri, store)
    out = f"s3://{bucket_name}/models/smartpath-tiny/"
    manifest = init_checkpoint(base_uri, out, store=s3_config)
    assert manifest.model.base_path == base_uri
    decoder = SmartPathModel.load(out, store=s3_config, parts=("language",))
    assert decoder.cfg.base_path == base_uri
    reference = load_base_model(qwen_base("tiny"), device="cpu").state_dict()
    loaded = {k.removeprefix("base."): v for k, v in decoder.state_dict().items()}
    same = [k for k in reference if k.startswith("model.language_model.") and k in loaded]
    assert same and all(torch.equal(reference[k], loaded[k]) for k in same)
