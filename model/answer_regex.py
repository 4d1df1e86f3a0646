"""The output grammar as regular expressions, for constrained decoding.

One pattern per request says what a well-formed completion of its task may be:
``<think>…</think><answer>ANSWER</answer>``, where ANSWER is

- classification: one of the request's labels, exactly as spelled;
- closed VQA: one of its options, exactly as spelled;
- detection: ``[{"label": L, "box": [x1, y1, x2, y2]}, …]`` with L one of the labels (any JSON
  string when none are given) and integer coordinates in 0–1000;
- segmentation: ``[{"label": L, "polygon": [[x, y], [x, y], [x, y], …]}, …]``, likewise;
- open VQA: free text.

The spacing is :func:`~smartpath.model.grammar.format_answer`'s (``json.dumps``), so a
constrained completion is the canonical one and parses. The think block and free text may
hold anything but ``<``, so no grammar tag can appear inside them, and at most
``MAX_TEXT_CHARS`` characters, so that a model that would write on and on still closes them.

Patterns use only what the regex dialects of llguidance, xgrammar and outlines-core share:
literals, character classes, plain groups, alternation and ``*``/``+``/``{m,}`` repeats.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from smartpath.model.grammar import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    NORM_MAX,
    THINK_CLOSE,
    THINK_OPEN,
    Task,
    coerce_task,
)

_META = set("\\.^$|?*+()[]{}")
MAX_TEXT_CHARS = 1024
JSON_STRING = '"([^"\\\\<]|\\\\["\\\\/bfnrt])*"'
COORD = "(1000|[1-9][0-9][0-9]|[1-9][0-9]|[0-9])"
assert NORM_MAX == 1000


def escape(text: str) -> str:
    """``text`` as a regex literal (only the metacharacters escaped, which all three dialects
    read alike)."""
    return "".join("\\" + c if c in _META else c for c in text)


def _one_of(choices: Sequence[str]) -> str:
    return "(" + "|".join(escape(c) for c in choices) + ")"


def _json_list(item: str) -> str:
    return f"\\[({item}(, {item})*)?\\]"


def _text(min_chars: int, max_chars: int) -> str:
    if max_chars < max(min_chars, 0):
        raise ValueError(f"max_text_chars must be >= {min_chars}, got {max_chars}")
    return f"[^<]{{{min_chars},{max_chars}}}"


def answer_regex(
    task: int,
    labels: Sequence[str] | None = None,
    options: Sequence[str] | None = None,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> str:
    """The pattern of the answer block's inside for ``task`` (as :func:`parse_answer` reads
    ``labels`` and ``options``: for VQA, options or else labels make it closed)."""
    t = coerce_task(task)
    if t is Task.CLASSIFICATION:
        if not labels:
            raise ValueError("classification needs labels to constrain its answer")
        return _one_of(labels)
    if t is Task.VQA:
        choices = options if options is not None else labels
        return _one_of(choices) if choices else _text(1, max_text_chars)
    label = _one_of([json.dumps(v, ensure_ascii=False) for v in labels]) if labels else JSON_STRING
    if t is Task.DETECTION:
        box = f"\\[{COORD}, {COORD}, {COORD}, {COORD}\\]"
        return _json_list(f'\\{{"label": {label}, "box": {box}\\}}')
    point = f"\\[{COORD}, {COORD}\\]"
    polygon = f"\\[{point}(, {point}){{2,}}\\]"
    return _json_list(f'\\{{"label": {label}, "polygon": {polygon}\\}}')


def completion_regex(
    task: int,
    labels: Sequence[str] | None = None,
    options: Sequence[str] | None = None,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> str:
    """The pattern of a whole completion: a think block, then the answer block; free text
    in either is at most ``max_text_chars`` characters."""
    return (
        escape(THINK_OPEN)
        + _text(0, max_text_chars)
        + escape(THINK_CLOSE + ANSWER_OPEN)
        + answer_regex(task, labels, options, max_text_chars)
        + escape(ANSWER_CLOSE)
    )
