"""Manifest samples → SFT batches, and SFT steps on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smartpath.core.config.model import ModelConfig
from smartpath.model.base import base_from_config
from smartpath.model.grammar import Scale, Task
from smartpath.model.mllm import IGNORE_INDEX, SlideInput, SmartPathModel
from smartpath.model.prompts import build_prompt
from smartpath.model.tokenizer import IMAGE_PAD, SLIDE_PAD
from smartpath.model.vision import make_image_processor
from smartpath.training.collate import Collator, sft_completion
from smartpath.training.engine import trainable_parameters
from smartpath.training.manifest import RoiSample, WsiSample, load_roi_image, read_manifest
from smartpath.training.synthetic.dataset import generate_roi_dataset

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", aggregator={"feature_dim": FEATURE_DIM, "num_tokens": 4})
    base, tokenizer = base_from_config(cfg)
    model = SmartPathModel(cfg, base, tokenizer)
    # A random tiny base with a unit final norm cannot produce logits sharper than ~1 (hidden 64,
    # small embeddings), so no adapter could fit any target; a 10x norm stands in for a trained
    # base's sharp output layer (a frozen base weight, set once before training).
    with torch.no_grad():
        base.model.language_model.norm.weight.mul_(10.0)
    out = Path(tmp_path_factory.mktemp("roi"))
    manifest = generate_roi_dataset(
        out, n_per_task=2, seed=0, tasks=(Task.CLASSIFICATION, Task.VQA)
    )
    samples = [s for s in read_manifest(manifest) if isinstance(s, RoiSample)]
    pairs = [(s, load_roi_image(s, manifest)) for s in samples[:4]]
    processor = make_image_processor(cfg.vision, max_pixels=112 * 112)
    collator = Collator(processor, tokenizer, model.slide_tokens)
    return model, collator, pairs


def test_labels_cover_exactly_the_completion(setup) -> None:
    model, collator, pairs = setup
    tok = model.tokenizer
    batch, labels = collator(pairs)
    assert labels.shape == batch.input_ids.shape
    assert batch.task_ids.tolist() == [int(Task[s.task.upper()]) for s, _ in pairs]
    assert batch.scale_ids.tolist() == [int(Scale.ROI)] * len(pairs)
    assert batch.slides is None
    for i, (sample, _) in enumerate(pairs):
        keep = labels[i] != IGNORE_INDEX
        expected = sft_completion(sample.target)
        assert expected.startswith("<think></think><answer>") and expected.endswith("<|im_end|>")
        assert tok.decode(labels[i][keep].tolist()) == expected
        # the labelled tokens are the row's last tokens (left padding), equal to the input ids
        n = int(keep.sum())
        assert bool(keep[-n:].all()) and not bool(keep[:-n].any())
        assert torch.equal(labels[i][keep], batch.input_ids[i][keep])
        real = batch.attention_mask[i].bool()
        assert bool(real[-int(real.sum()) :].all())  # left padded
        assert not bool(batch.attention_mask[i][: (~real).sum()].any())
    # image pads: one per LM image token, images in request order
    pad_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    merge = collator.processor.merge_size
    assert batch.image_grid_thw is not None and batch.image_grid_thw.shape == (len(pairs), 3)
    per_row = (batch.input_ids == pad_id).sum(1).tolist()
    assert per_row == [int(t.prod()) // merge**2 for t in batch.image_grid_thw]
    assert batch.pixel_values is not None
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(-1).sum())


def test_samples_without_a_prompt_get_the_model_prompt_style(setup) -> None:
    model, collator, pairs = setup
    sample, image = next((s, i) for s, i in pairs if s.task == "classification")
    bare = [(sample.model_copy(update={"prompt": None}), image)]
    full = build_prompt(Task.CLASSIFICATION, Scale.ROI, labels=sample.labels)
    compact = build_prompt(Task.CLASSIFICATION, Scale.ROI, labels=sample.labels, style="compact")
    cfg = model.cfg.model_copy(update={"prompt_style": "compact"})
    texts = {}
    for name, c in (("processor", collator), ("compact model", Collator(cfg, model.tokenizer))):
        batch, _ = c(bare)
        texts[name] = model.tokenizer.decode(batch.input_ids[0].tolist())
    assert full in texts["processor"] and compact in texts["compact model"]
    assert full not in texts["compact model"]
    # A sample's own prompt is used as written, whatever the style.
    batch, _ = Collator(cfg, model.tokenizer)(pairs[:1])
    assert pairs[0][0].prompt in model.tokenizer.decode(batch.input_ids[0].tolist())


def test_wsi_needs_precomputed_features(setup) -> None:
    model, collator, pairs = setup
    roi = pairs[0][0]
    wsi = WsiSample(
        id="w", slide="s.svs", task="vqa", prompt="What is this?", target="tumor", labels=None
    )
    with pytest.raises(NotImplementedError, match="precomputed"):
        collator([(wsi, pairs[0][1])])
    slide = SlideInput(torch.randn(20, FEATURE_DIM), torch.randint(0, 5000, (20, 2)).float())
    batch, labels = collator([(wsi, slide), pairs[0]])
    assert batch.scale_ids.tolist() == [int(Scale.WSI), int(Scale.ROI)]
    assert batch.task_ids.tolist() == [int(Task.VQA), int(Task[roi.task.upper()])]
    slide_id = model.tokenizer.convert_tokens_to_ids(SLIDE_PAD)
    assert int((batch.input_ids[0] == slide_id).sum()) == model.slide_tokens
    assert batch.slides is not None and batch.slides[0] is slide and batch.slides[1] is None
    with torch.no_grad():
        out = model(batch, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_sft_steps_reduce_the_loss_and_keep_the_base(setup) -> None:
    model, collator, pairs = setup
    batch, labels = collator(pairs)
    params = trainable_parameters(model, train_base=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(
        n.startswith(("aggregator.", "router.")) or n.endswith((".lora_A", ".lora_B"))
        for n in names
    )
    assert any(n.endswith(".lora_B") for n in names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(30):  # the SFT objective: LM loss on the completion + load balancing
        out = model(batch, labels=labels)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
