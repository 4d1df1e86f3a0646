"""Tokenizers: a project-trained byte-level BPE for the built presets, or a checkpoint's own.

Design decisions:

- Same shape as Qwen2.5's tokenizer so the model code never cares which one it has: Qwen's
  pre-tokenizer regex (digits split one by one, so 0–1000 coordinates are short and regular),
  byte-level BPE (no unknown token: every string round-trips), ``<|endoftext|>`` as pad and
  ``<|im_end|>`` as end of turn, and Qwen2.5-VL's chat template structure.
- Control tokens are *added tokens*, so each always encodes to exactly one id and is never
  split or merged with neighbouring text: Qwen's vision tokens, the chat tokens, the slide
  placeholder ``<|slide_pad|>`` (special: dropped by ``skip_special_tokens``), and the output
  grammar tags ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` (not special: they stay in
  decoded text, where the answer parsers need them).
- Training is in-process and deterministic: :func:`builtin_corpus` generates pathology words,
  prompts, JSON-ish answers and the numbers 0–1000 from a fixed seed; the tiny tokenizer
  trains in about a second. The tokenizer is saved with every checkpoint and loaded from there
  (:func:`load_tokenizer`, local files only: nothing is downloaded from a hub).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Qwen2/2.5's pre-tokenizer split (the GPT-4 pattern with single digits).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SLIDE_PAD = "<|slide_pad|>"
THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"

# Special (control) tokens: one id each, removed by decode(skip_special_tokens=True).
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
    SLIDE_PAD,
)
# Output grammar tags: one id each, but kept in decoded text.
GRAMMAR_TOKENS: tuple[str, ...] = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL's / Qwen2.5-VL's chat template, verbatim (render_chat turns slide parts into text).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _added_tokens() -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS] + [
        AddedToken(t, special=False, normalized=False) for t in GRAMMAR_TOKENS
    ]


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a Qwen-style byte-level BPE on ``corpus`` with SmartPath's control tokens.

    ``vocab_size`` counts everything (256 byte symbols, merges and the 12 added tokens); the
    result can be smaller when the corpus has no more pairs worth merging.
    """
    floor = 256 + len(SPECIAL_TOKENS) + len(GRAMMAR_TOKENS)
    if vocab_size <= floor:
        raise ValueError(
            f"vocab_size must exceed {floor} (bytes + control tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_added_tokens(),  # ids 0..11, never merged
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([t for t in _added_tokens() if not t.special])  # mark tags as added
    tok.add_special_tokens([t for t in _added_tokens() if t.special])
    return _wrap(tok)


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    out.chat_template = CHAT_TEMPLATE
    return out


# -- built-in corpus ----------------------------------------------------------------------

_TISSUES = [
    "breast",
    "lung",
    "colon",
    "prostate",
    "skin",
    "liver",
    "kidney",
    "lymph",
    "node",
    "stomach",
    "bladder",
    "pancreas",
    "ovary",
    "thyroid",
    "brain",
    "bone",
    "cervix",
    "endometrium",
    "esophagus",
]
_CLASSES = [
    "tumor",
    "stroma",
    "necrosis",
    "lymphocytes",
    "mucosa",
    "adipose",
    "muscle",
    "debris",
    "background",
    "normal",
    "adenocarcinoma",
    "carcinoma",
    "lymphoma",
    "melanoma",
    "sarcoma",
    "metastasis",
    "benign",
    "malignant",
    "invasive",
    "in-situ",
    "dysplasia",
    "hyperplasia",
    "inflammation",
    "fibrosis",
]
_CELLS = [
    "mitotic",
    "figure",
    "nucleus",
    "nuclei",
    "epithelial",
    "cell",
    "gland",
    "duct",
    "lumen",
    "vessel",
    "macrophage",
    "neutrophil",
    "plasma",
    "cell",
    "fibroblast",
    "tumor-infiltrating",
    "lymphocyte",
    "keratin",
    "pearl",
]
_GRADES = ("grade 1", "grade 2", "grade 3", "low grade", "high grade", "well differentiated")
_STAINS = ("H&E", "IHC", "Ki-67", "HER2", "ER", "PR", "PD-L1", "CD3", "CD8", "p53")
_PROMPTS = (
    "What is the most likely diagnosis?",
    "Classify this region of interest.",
    "Detect all {c} in the image and give their boxes.",
    "Segment the {c} regions as polygons.",
    "Is there evidence of {c}?",
    "Describe the {t} tissue in this slide.",
    "Which tissue type is shown?",
    "Grade the tumor according to the Nottingham system.",
    "Count the {c} visible in this field.",
    "Answer with a single label.",
)


def _box(rng: random.Random) -> list[int]:
    x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
    return [x1, y1, rng.randint(x1, 1000), rng.randint(y1, 1000)]


def _answer(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(_CLASSES)
    if kind == 1:
        items = [
            {"label": rng.choice(_CELLS + _CLASSES), "box": _box(rng)}
            for _ in range(rng.randint(1, 3))
        ]
        return json.dumps(items)
    if kind == 2:
        poly = [[rng.randint(0, 1000), rng.randint(0, 1000)] for _ in range(rng.randint(3, 6))]
        return json.dumps([{"label": rng.choice(_CLASSES), "polygon": poly}])
    return (
        f"The {rng.choice(_TISSUES)} tissue shows {rng.choice(_CLASSES)} with "
        f"{rng.choice(_CELLS)}s, {rng.choice(_GRADES)}, stained with {rng.choice(_STAINS)}."
    )


def builtin_corpus(num_samples: int = 2000, seed: int = 0) -> list[str]:
    """A deterministic pathology corpus: prompts, think/answer turns, JSON answers, 0–1000."""
    rng = random.Random(seed)
    lines = [str(n) for n in range(1001)]
    lines += [" ".join(words) for words in (_TISSUES, _CLASSES, _CELLS, _GRADES, _STAINS)]
    for _ in range(num_samples):
        prompt = rng.choice(_PROMPTS).format(c=rng.choice(_CELLS), t=rng.choice(_TISSUES))
        context = rng.choice((IMAGE_PAD, SLIDE_PAD))
        lines.append(
            f"{IM_START}user\n{VISION_START}{context}{VISION_END}{prompt}{IM_END}\n"
            f"{IM_START}assistant\n{THINK_START}The {rng.choice(_TISSUES)} sample shows "
            f"{rng.choice(_CLASSES)}.{THINK_END}{ANSWER_START}{_answer(rng)}{ANSWER_END}{IM_END}"
        )
    return lines


def train_builtin_tokenizer(vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """The tokenizer of the built presets, trained on :func:`builtin_corpus` (about 1 s)."""
    return train_tokenizer(builtin_corpus(seed=seed), vocab_size)


# -- checkpoints' tokenizers ------------------------------------------------------------


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A checkpoint's own tokenizer from a local folder (never downloads).

    Adds SmartPath's chat template if the folder has none.
    """
    folder = Path(path)
    if (
        not (folder / "tokenizer.json").is_file()
        and not (folder / "tokenizer_config.json").is_file()
    ):
        raise FileNotFoundError(
            f"no tokenizer in {folder}: expected tokenizer.json/tokenizer_config.json (save one "
            "with tokenizer.save_pretrained(folder))"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give a checkpoint's (e.g. Qwen's) tokenizer ``<|slide_pad|>``, the one token SmartPath
    adds (special, so it is one id and never split); return True if it was added.

    Qwen's own vision and chat tokens are used as they are, and the grammar tags (``<think>``,
    ``<answer>``, …) stay plain text. Then fit the model's embeddings to the tokenizer
    (:func:`smartpath.model.base.fit_embeddings`).
    """
    if SLIDE_PAD in tokenizer.get_vocab():
        return False
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(SLIDE_PAD, special=True, normalized=False)]},
        replace_extra_special_tokens=False,
    )
    return True


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> dict[str, int]:
    """Ids of single tokens; raises ValueError if one is missing or not a single token."""
    out: dict[str, int] = {}
    for token in tokens:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"tokenizer encodes {token!r} as {len(ids)} ids, not one: it is not a "
                "Qwen2.5-VL tokenizer prepared for SmartPath (smartpath model init adds "
                f"{SLIDE_PAD})"
            )
        out[token] = ids[0]
    return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """Render messages (content: str or parts of type text/image/slide) with the tokenizer's
    own chat template (SmartPath's Qwen2.5-VL-style one if it has none).

    Images render as ``<|vision_start|><|image_pad|><|vision_end|>``. A slide part becomes the
    text ``<|vision_start|><|slide_pad|><|vision_end|>`` before rendering, so a checkpoint's
    template that knows nothing of slides (Qwen's) renders it too. Expand the single pad to the
    real token count afterwards.
    """
    slide = {"type": "text", "text": f"{VISION_START}{SLIDE_PAD}{VISION_END}"}
    messages = [
        {
            **m,
            "content": m["content"]
            if isinstance(m["content"], str)
            else [slide if part.get("type") == "slide" else part for part in m["content"]],
        }
        for m in messages
    ]
    return tokenizer.apply_chat_template(
        messages,
        chat_template=tokenizer.chat_template or CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
