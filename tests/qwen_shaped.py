"""Qwen2.5-VL-shaped checkpoints built by the tests themselves (nothing is downloaded).

- :func:`qwen_tokenizer`: a byte-level BPE whose added tokens sit at Qwen2.5's real ids
  (151643 ``<|endoftext|>`` … 151664 ``<|file_sep|>``), ``unk_token``/``bos_token`` null,
  ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad, and Qwen2-VL's chat template. It knows no
  ``<|slide_pad|>`` and no grammar tags, like Qwen's own.
- :func:`write_qwen_base`: a randomly initialised ``Qwen2_5_VLForConditionalGeneration`` at
  the real widths of Qwen2.5-VL-3B (tied embeddings, 151936 rows) or -7B (152064 rows), with the
  depth cut, saved in HF format (safetensors, bfloat16 like the published ones) with that
  tokenizer. ``legacy_keys`` writes the published checkpoints' older tensor names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

QWEN_BASE_VOCAB = 151643  # BPE tokens 0..151642; the added tokens follow
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (  # (token, special), in id order from 151643
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN_IDS = {token: QWEN_BASE_VOCAB + i for i, (token, _) in enumerate(QWEN_ADDED_TOKENS)}

# Qwen2-VL's chat template as published in its tokenizer_config.json (written out here, not
# taken from SmartPath, so the tests check SmartPath against the real thing).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS = [
    "Classify this region of interest. The breast tissue shows tumor with mitotic figures.",
    "Detect all nuclei and give their boxes as JSON with label and box [x1, y1, x2, y2].",
    "Segment the stroma regions as polygons. Answer with a single label: necrosis.",
    "What is the most likely diagnosis? Options: tumour, stroma, lymphocytes, necrosis.",
    "<think>The sample shows adenocarcinoma.</think><answer>tumour</answer>",
] + [str(n) for n in range(1001)]

TEXT_SIZES = {  # the published config.json values, and a narrow one for fast tests
    "tiny": {
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    "3b": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "7b": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
}


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer shaped like Qwen2.5-VL's (see the module docstring)."""
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    small.train_from_iterator(_CORPUS, trainer=trainer)
    model = json.loads(small.to_str())["model"]
    vocab = dict(model["vocab"])
    for i in range(len(vocab), QWEN_BASE_VOCAB):  # unreachable fillers up to Qwen's BPE size
        vocab[f"Ġzzfill{i}"] = i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = small.pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    for token, special in QWEN_ADDED_TOKENS:
        added = AddedToken(token, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    wrapped.chat_template = QWEN2_VL_CHAT_TEMPLATE
    assert {t: wrapped.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS
    return wrapped


VISION_SIZES = {
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2},
    "3b": {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16},
    "7b": {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16},
}


def qwen_config(
    size: str, text_layers: int = 2, vision_layers: int = 2, **text_overrides: object
) -> Qwen2_5_VLConfig:
    """The published Qwen2.5-VL-{3B,7B} config (or the narrow "tiny") with the depth cut."""
    text = {**TEXT_SIZES[size], **text_overrides}
    unit = text["hidden_size"] // text["num_attention_heads"] // 16  # M-RoPE's 2:3:3 split
    return Qwen2_5_VLConfig(
        text_config={
            **text,
            "num_hidden_layers": text_layers,
            "max_window_layers": text_layers,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2 * unit, 3 * unit, 3 * unit],
            },
            "bos_token_id": QWEN_IDS["<|endoftext|>"],
            "eos_token_id": QWEN_IDS["<|im_end|>"],
        },
        vision_config={
            "depth": vision_layers,
            **VISION_SIZES[size],
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_layers - 1],
            "tokens_per_second": 2,
        },
        image_token_id=QWEN_IDS["<|image_pad|>"],
        video_token_id=QWEN_IDS["<|video_pad|>"],
        vision_start_token_id=QWEN_IDS["<|vision_start|>"],
        vision_end_token_id=QWEN_IDS["<|vision_end|>"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def write_qwen_base(
    folder: Path,
    size: str,
    *,
    text_layers: int = 2,
    vision_layers: int = 2,
    seed: int = 0,
    legacy_keys: bool = False,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **text_overrides: object,
) -> Path:
    """Save a random Qwen2.5-VL-``size``-shaped base with :func:`qwen_tokenizer` (or the one
    given) to ``folder``; ``text_overrides`` change config.json's text sizes."""
    config = qwen_config(size, text_layers, vision_layers, **text_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if text_layers > 4:  # full depth: initialise in bfloat16 (a float32 3B is 15 GB)
            with torch.device("meta"):
                model = Qwen2_5_VLForConditionalGeneration(config)
            model.to_empty(device="cpu")
            for name, param in model.named_parameters():
                param.data = param.data.to(torch.bfloat16)
                if "norm" in name:
                    param.data.fill_(1.0)
                else:
                    param.data.normal_(0.0, 0.02)
            if config.tie_word_embeddings:  # to_empty gave the head its own storage
                model.lm_head.weight = model.model.language_model.embed_tokens.weight
        else:
            model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    del model
    if legacy_keys:
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        renamed = {}
        for key, tensor in tensors.items():
            if key.startswith("model.visual."):
                key = key[len("model.") :]
            elif key.startswith("model.language_model."):
                key = "model." + key[len("model.language_model.") :]
            renamed[key] = tensor
        save_file(renamed, str(path), metadata={"format": "pt"})
    tokenizer = tokenizer or qwen_tokenizer()
    tokenizer.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(raw, indent=2))
    return folder
