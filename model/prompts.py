"""Instruction prompts per (task, scale), asking for the ``<think>…</think><answer>…</answer>``
format and stating the answer format the parsers in ``smartpath.model.grammar`` accept.

Templates are plain callables registered by name (``roi_classification``, ``wsi_vqa``, …) in
``PROMPT_TEMPLATES``; replace one with ``register_template(name, fn, replace=True)``. SmartPath
supports ROI classification, detection, segmentation and VQA, and WSI classification and VQA
(DESIGN.md); other combinations need a template registered first. Prompts are text only: the
image or slide tokens are placed by the tokenizer's chat template. Each template writes two
styles (:data:`PROMPT_STYLES`): the full instructions, or only the task lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

from smartpath.core.config.model import PromptStyle
from smartpath.model.grammar import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    MAX_OPTIONS,
    TAGS,
    THINK_CLOSE,
    THINK_OPEN,
    Detection,
    DetectionAnswer,
    Polygon,
    Scale,
    SegmentationAnswer,
    Task,
    clean_label,
    coerce_scale,
    coerce_task,
    format_answer,
    format_completion,
    label_key,
    option_letter,
)

__all__ = [
    "PROMPT_STYLES",
    "PROMPT_TEMPLATES",
    "PromptInputs",
    "PromptStyle",
    "PromptTemplate",
    "Scale",
    "Task",
    "build_prompt",
    "register_template",
    "template_name",
]


PROMPT_STYLES: tuple[PromptStyle, ...] = get_args(PromptStyle)
"""``full``: SmartPath-R1's instruction prompts (scale, task, labels or options, the
``<think>``/``<answer>`` format, the answer's syntax and an example), for a pretrained LLM that
reads instructions. ``compact``: the task with its labels, options or question only, for a tiny
model trained from scratch, which cannot read instructions and whose training cost is mostly
prompt tokens. A model answers in the style it was trained with (``ModelConfig.prompt_style``)."""


@dataclass(frozen=True)
class PromptInputs:
    """Validated inputs handed to a template."""

    task: Task
    scale: Scale
    question: str | None
    labels: tuple[str, ...] | None
    options: tuple[str, ...] | None
    style: PromptStyle = "full"


PromptTemplate = Callable[[PromptInputs], str]
PROMPT_TEMPLATES: dict[str, PromptTemplate] = {}


def template_name(task: int, scale: int) -> str:
    """Registry key for a (task, scale), e.g. ``roi_detection``."""
    return f"{coerce_scale(scale).name.lower()}_{coerce_task(task).name.lower()}"


def register_template(name: str, template: PromptTemplate, *, replace: bool = False) -> None:
    """Register ``template`` under ``name``; ValueError if taken and not ``replace``."""
    if name in PROMPT_TEMPLATES and not replace:
        raise ValueError(f"prompt template {name!r} already registered; pass replace=True")
    PROMPT_TEMPLATES[name] = template


def _names(values: Sequence[str] | None, what: str, how: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise ValueError(f"{what} must be a list of strings, got one string {values!r}; {how}")
    out = tuple(values)
    seen: dict[str, str] = {}
    for v in out:
        if not isinstance(v, str) or not clean_label(v):
            raise ValueError(f"{what} must be non-empty strings, got {v!r}; {how}")
        if not v.isprintable() or any(tag in v for tag in TAGS):
            raise ValueError(
                f"{what} must be one line of printable text without {'/'.join(TAGS)} tags, "
                f"got {v!r}; {how}"
            )
        if label_key(v) in seen:
            raise ValueError(
                f"{what} {seen[label_key(v)]!r} and {v!r} are the same ignoring case, spaces and "
                f"quotes, so answers could not tell them apart; {how}"
            )
        seen[label_key(v)] = v
    return out


def build_prompt(
    task: int,
    scale: int,
    question: str | None = None,
    labels: Sequence[str] | None = None,
    options: Sequence[str] | None = None,
    style: PromptStyle = "full",
) -> str:
    """The instruction prompt for ``task`` at ``scale`` (``Task``/``Scale`` or proto enum ints).

    Classification needs ``labels``; detection and segmentation may restrict labels; VQA needs a
    ``question`` and takes ``options`` for closed VQA (answered by letter or text). ``style``
    is the model's prompt style (:data:`PROMPT_STYLES`).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    t, s = coerce_task(task), coerce_scale(scale)
    if question is not None and not isinstance(question, str):
        raise ValueError(f"question must be a string or None, got {type(question).__name__}")
    q = question.strip() if question and question.strip() else None
    names = _names(labels, "labels", "pass e.g. labels=['tumor', 'stroma', 'normal']")
    opts = _names(options, "options", "pass e.g. options=['yes', 'no']")
    if t is Task.CLASSIFICATION and not names:
        raise ValueError(
            f"classification needs the candidate labels, got labels={labels!r}; "
            "pass e.g. labels=['tumor', 'stroma', 'normal']"
        )
    if t is Task.VQA:
        if q is None:
            raise ValueError(f"VQA needs a question, got question={question!r}")
        if names is not None:
            raise ValueError("VQA takes options=[...] for closed questions, not labels=")
        if opts is not None and not 2 <= len(opts) <= MAX_OPTIONS:
            raise ValueError(f"closed VQA needs 2 to {MAX_OPTIONS} options, got {len(opts)}")
    elif opts is not None:
        raise ValueError(f"options are for closed VQA only; task is {t.name}, use labels=")
    name = template_name(t, s)
    template = PROMPT_TEMPLATES.get(name)
    if template is None:
        raise ValueError(
            f"no prompt template {name!r} for task {t.name} at scale {s.name}; registered: "
            f"{', '.join(sorted(PROMPT_TEMPLATES))}; add one with register_template()"
        )
    return template(PromptInputs(t, s, q, names, opts, style))


# ---------------------------------------------------------------------------------------------
# Default templates

_SCALE_INTRO = {
    Scale.ROI: "The image is a region of interest (ROI) from a histopathology slide.",
    Scale.WSI: "The input is a whole-slide image (WSI) of a histopathology slide, seen "
    "through its tissue tiles.",
}
_FORMAT = (
    f"First reason step by step inside {THINK_OPEN}{THINK_CLOSE}, then give only the final "
    f"answer inside {ANSWER_OPEN}{ANSWER_CLOSE}."
)
_SPACE = (
    "Coordinates are in a 0-1000 normalised space: (0, 0) is the top-left corner of the image "
    "and (1000, 1000) its bottom-right corner."
)


def _labels_json(labels: Sequence[str]) -> str:
    return json.dumps(list(labels), ensure_ascii=False)


def _example(answer: str) -> str:
    return "Example: " + format_completion("...", answer)


def _lines(p: PromptInputs, task: list[str], answer_format: list[str]) -> str:
    """The prompt: scale intro, task lines, then the answer format; task lines only when
    compact."""
    if p.style == "compact":
        return "\n".join(task)
    return "\n".join([_SCALE_INTRO[p.scale], *task, _FORMAT, *answer_format])


def _classification(p: PromptInputs) -> str:
    assert p.labels is not None
    subject = "this region" if p.scale is Scale.ROI else "this slide"
    return _lines(
        p,
        [
            p.question or f"Classify {subject} into one of the labels below.",
            f"Labels: {_labels_json(p.labels)}",
        ],
        [
            "The answer is exactly one label from the list, written as listed.",
            _example(p.labels[0]),
        ],
    )


def _detection(p: PromptInputs) -> str:
    label = p.labels[0] if p.labels else "nucleus"
    lines = [p.question or "Detect every object of interest."]
    if p.labels:
        lines.append(f"Labels (each detection's label is one of these): {_labels_json(p.labels)}")
    example = DetectionAnswer((Detection(label, (120.0, 340.0, 180.0, 410.0)),))
    answer_format = [
        "The answer is a JSON list with one object per detection: "
        '[{"label": <label>, "box": [x1, y1, x2, y2]}], with x1 < x2 and y1 < y2. '
        + _SPACE
        + " Answer [] if there is nothing to detect.",
        _example(format_answer(example)),
    ]
    return _lines(p, lines, answer_format)


def _segmentation(p: PromptInputs) -> str:
    label = p.labels[0] if p.labels else "gland"
    lines = [p.question or "Segment every object of interest."]
    if p.labels:
        lines.append(f"Labels (each region's label is one of these): {_labels_json(p.labels)}")
    points = ((200.0, 150.0), (320.0, 170.0), (300.0, 290.0), (190.0, 260.0))
    example = SegmentationAnswer((Polygon(label, points),))
    answer_format = [
        "The answer is a JSON list with one object per region, its outline as a polygon of at "
        'least 3 [x, y] vertices: [{"label": <label>, "polygon": [[x, y], [x, y], [x, y]]}]. '
        + _SPACE
        + " Answer [] if there is nothing to segment.",
        _example(format_answer(example)),
    ]
    return _lines(p, lines, answer_format)


def _vqa(p: PromptInputs) -> str:
    assert p.question is not None
    lines = [f"Question: {p.question}"]
    if not p.options:
        return _lines(p, lines, ["The answer is a short free-text answer to the question."])
    lines.append("Options:")
    lines += [f"{option_letter(i)}. {o}" for i, o in enumerate(p.options)]
    answer_format = [
        "The answer is the letter of exactly one option, e.g. A, or that option's text.",
        _example(option_letter(0)),
    ]
    return _lines(p, lines, answer_format)


for _scale in (Scale.ROI, Scale.WSI):
    register_template(template_name(Task.CLASSIFICATION, _scale), _classification)
    register_template(template_name(Task.VQA, _scale), _vqa)
register_template(template_name(Task.DETECTION, Scale.ROI), _detection)
register_template(template_name(Task.SEGMENTATION, Scale.ROI), _segmentation)
