"""The model's output grammar: ``<think>…</think><answer>…</answer>``, typed answers and parsers.

Answers by task:

- classification: one label, e.g. ``adenocarcinoma``;
- detection: ``[{"label": "...", "box": [x1, y1, x2, y2]}]``;
- segmentation: ``[{"label": "...", "polygon": [[x, y], [x, y], [x, y], ...]}]``;
- VQA: free text (open), or one of the given options (closed).

Coordinates live in the 0–1000 normalised image space (see ``smartpath.model.coords``).

Parsers never raise on any text: malformed input gives ``Unparseable(reason, raw)``, which a
reward scores 0. They are tolerant where intent is unambiguous and strict where it is not:

- JSON may be one object instead of a list, wrapped in a code fence (```` ```json ````), carry
  trailing commas, and write coordinates as clean numeric strings (``"12.5"``); ``bbox`` and
  ``bbox_2d`` (Qwen2.5-VL's key) are accepted for ``box``, ``points`` for ``polygon``;
- coordinates must be finite and within [0, 1000]; values outside by at most ``COORD_TOLERANCE``
  (float noise) are clipped, anything further out makes the whole answer unparseable;
- box corners given in the wrong order are reordered (x1 < x2, y1 < y2); zero-width or
  zero-height boxes are unparseable;
- polygons need at least 3 distinct vertices and a non-zero area; a closing vertex equal to
  the first is dropped;
- when a label list is given, labels match case-, whitespace- and trailing-period-insensitively
  and come back in the list's spelling; a label not in the list makes the answer unparseable;
- sizes are capped (``MAX_COMPLETION_CHARS``, ``MAX_ANSWER_CHARS``, ``MAX_ITEMS``,
  ``MAX_POLYGON_POINTS``, ``MAX_JSON_DEPTH``) so adversarial input costs linear time.

``format_answer``/``format_completion`` write the canonical form; parsing it gives the same
answer back.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

import numpy as np

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

NORM_MAX = 1000.0
COORD_TOLERANCE = 1e-6
MAX_COMPLETION_CHARS = 256 * 1024
MAX_ANSWER_CHARS = 64 * 1024
MAX_LABEL_CHARS = 256
MAX_ITEMS = 1024
MAX_POLYGON_POINTS = 4096
MAX_JSON_DEPTH = 16
MAX_RAW_CHARS = 1024

BOX_KEYS = ("box", "bbox", "bbox_2d")
POLYGON_KEYS = ("polygon", "points")


class Task(IntEnum):
    """Mirror of ``smartpath.v1.common_pb2.Task`` (same values)."""

    UNSPECIFIED = 0
    CLASSIFICATION = 1
    DETECTION = 2
    SEGMENTATION = 3
    VQA = 4


class Scale(IntEnum):
    """Mirror of ``smartpath.v1.common_pb2.Scale`` (same values)."""

    UNSPECIFIED = 0
    ROI = 1
    WSI = 2


def coerce_task(task: int) -> Task:
    """``Task`` from a ``Task``, a proto enum value or an int; ValueError if unspecified."""
    return _coerce_enum(Task, task, "task", "TASK")


def coerce_scale(scale: int) -> Scale:
    """``Scale`` from a ``Scale``, a proto enum value or an int; ValueError if unspecified."""
    return _coerce_enum(Scale, scale, "scale", "SCALE")


def _enum_name(enum: type[IntEnum], value: object, coerce: Callable[[int], IntEnum]) -> str:
    if isinstance(value, str):
        name = value.strip().lower()
        if name.upper() not in enum.__members__ or name == "unspecified":
            valid = ", ".join(m.name.lower() for m in enum if m.value != 0)
            raise ValueError(f"unknown {enum.__name__.lower()} {value!r}; use one of {valid}")
        return name
    return coerce(operator.index(value)).name.lower()


def scale_name(scale: str | int | Scale) -> str:
    """Lowercase scale name (``"roi"``/``"wsi"``) from a name, a ``Scale`` or its int."""
    return _enum_name(Scale, scale, coerce_scale)


def task_name(task: str | int | Task) -> str:
    """Lowercase task name (``"detection"`` …) from a name, a ``Task`` or its int."""
    return _enum_name(Task, task, coerce_task)


def task_scale_key(task: str | int | Task, scale: str | int | Scale) -> str:
    """Stable key for per-task/per-scale expert assignment, e.g. ``"classification/roi"``."""
    return f"{task_name(task)}/{scale_name(scale)}"


_E = TypeVar("_E", bound=IntEnum)


def _coerce_enum(enum: type[_E], value: int, what: str, prefix: str) -> _E:
    valid = ", ".join(f"{m.name} ({m.value})" for m in enum if m.value != 0)
    hint = f"pass one of {valid} (smartpath.model.{enum.__name__} or smartpath.v1 {prefix}_*)"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an int enum value, got {value!r}; {hint}") from None
    try:
        member = enum(number)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; {hint}") from None
    if member.value == 0:
        raise ValueError(f"{what} is {prefix}_UNSPECIFIED (0); {hint}")
    return member


# ---------------------------------------------------------------------------------------------
# Typed answers


@dataclass(frozen=True)
class Completion:
    """A completion split into its blocks; fields are stripped, None when absent or ambiguous."""

    think: str | None
    answer: str | None
    well_formed: bool


@dataclass(frozen=True)
class LabelAnswer:
    label: str


@dataclass(frozen=True)
class Detection:
    """One box in 0–1000 space, ``(x1, y1, x2, y2)`` with x1 < x2 and y1 < y2."""

    label: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class DetectionAnswer:
    detections: tuple[Detection, ...]

    def boxes(self) -> np.ndarray:
        """Boxes as a float64 array of shape (N, 4)."""
        return np.array([d.box for d in self.detections], dtype=np.float64).reshape(-1, 4)

    def labels(self) -> list[str]:
        return [d.label for d in self.detections]


@dataclass(frozen=True)
class Polygon:
    """One polygon in 0–1000 space, vertices ``(x, y)``, not closed (last != first)."""

    label: str
    points: tuple[tuple[float, float], ...]

    def array(self) -> np.ndarray:
        """Vertices as a float64 array of shape (N, 2)."""
        return np.array(self.points, dtype=np.float64).reshape(-1, 2)


@dataclass(frozen=True)
class SegmentationAnswer:
    polygons: tuple[Polygon, ...]


@dataclass(frozen=True)
class TextAnswer:
    text: str


@dataclass(frozen=True)
class Unparseable:
    """What could not be parsed and why; ``raw`` is truncated to ``MAX_RAW_CHARS``."""

    reason: str
    raw: str


Answer = LabelAnswer | DetectionAnswer | SegmentationAnswer | TextAnswer | Unparseable


def _bad(reason: str, raw: str) -> Unparseable:
    return Unparseable(reason, raw[:MAX_RAW_CHARS])


# ---------------------------------------------------------------------------------------------
# Completion


_TAG_RE = re.compile(r"</?(?:think|answer)>")


def _split(text: str) -> tuple[Completion, str]:
    """The completion and, when its answer is missing, why."""
    if len(text) > MAX_COMPLETION_CHARS:
        return Completion(None, None, False), f"completion longer than {MAX_COMPLETION_CHARS}"
    tags = [(m.group(), m.start(), m.end()) for m in _TAG_RE.finditer(text)]
    names = [t[0] for t in tags]

    def block(open_tag: str, close_tag: str) -> str | None:
        if names.count(open_tag) != 1 or names.count(close_tag) != 1:
            return None
        i, j = names.index(open_tag), names.index(close_tag)
        if j != i + 1:  # close before open, or another tag in between
            return None
        return text[tags[i][2] : tags[j][1]].strip()

    think = block(THINK_OPEN, THINK_CLOSE)
    answer = block(ANSWER_OPEN, ANSWER_CLOSE)
    well_formed = (
        names == list(TAGS)
        and not text[: tags[0][1]].strip()
        and not text[tags[1][2] : tags[2][1]].strip()
        and not text[tags[3][2] :].strip()
        and bool(answer)
    )
    reason = ""
    if answer is None:
        n_open, n_close = names.count(ANSWER_OPEN), names.count(ANSWER_CLOSE)
        if n_open == 0 and n_close == 0:
            reason = "no <answer> block"
        elif n_open > 1 or n_close > 1:
            reason = "more than one <answer> block"
        elif n_open != n_close:
            reason = "unbalanced <answer> tags"
        else:
            reason = "tags out of order or nested in <answer>"
    return Completion(think, answer, well_formed), reason


def split_completion(text: str) -> Completion:
    """Split a completion into its think and answer blocks.

    ``well_formed`` iff the text is exactly one think block then exactly one non-empty answer
    block, with only whitespace outside them (the think block may be empty). ``answer`` is set
    whenever there is exactly one answer block containing no other tag, well-formed or not, so
    answer rewards do not depend on the format reward. Text longer than
    ``MAX_COMPLETION_CHARS`` is not split: ``Completion(None, None, False)``.
    """
    return _split(text)[0]


def format_completion(think: str, answer: str) -> str:
    """The canonical completion text; ValueError if either part contains a grammar tag."""
    for name, part in (("think", think), ("answer", answer)):
        if _TAG_RE.search(part):
            raise ValueError(f"{name} text contains a grammar tag ({', '.join(TAGS)})")
    return f"{THINK_OPEN}{think.strip()}{THINK_CLOSE}{ANSWER_OPEN}{answer.strip()}{ANSWER_CLOSE}"


# ---------------------------------------------------------------------------------------------
# Labels, options and text


_WS_RE = re.compile(r"\s+")
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}


def _norm_ws(text: str) -> str:
    return _WS_RE.sub(" ", text).strip()


def clean_label(text: str) -> str:
    """A label as the parsers read it: whitespace collapsed, surrounding quotes and trailing
    periods dropped."""
    s, prev = _norm_ws(text), None
    while s != prev:  # until stable, so that clean_label(clean_label(x)) == clean_label(x)
        prev = s
        if len(s) >= 2 and _QUOTE_PAIRS.get(s[0]) == s[-1]:
            s = s[1:-1].strip()
        s = s.rstrip(".").rstrip()
    return s


def label_key(text: str) -> str:
    """The key labels match on: ``clean_label`` casefolded."""
    return clean_label(text).casefold()


def _check_labels(labels: Sequence[str] | None, what: str = "labels") -> None:
    if isinstance(labels, str):
        raise TypeError(f"{what} must be a sequence of strings, not one string ({labels!r})")


def _match(text: str, choices: Sequence[str], what: str) -> str | Unparseable:
    """The choice ``text`` names (exact spelling first, then normalised), or why not."""
    spaced = _norm_ws(text)
    if spaced in choices:
        return spaced
    cleaned = clean_label(text)
    if cleaned in choices:
        return cleaned
    key = cleaned.casefold()
    hits = list(dict.fromkeys(c for c in choices if label_key(c) == key))
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        return _bad(f"{what} is ambiguous among {len(hits)} matches", text)
    return _bad(f"{what} {cleaned[:64]!r} is not one of the {len(choices)} given", text)


def parse_label(answer_text: str, labels: Sequence[str] | None = None) -> LabelAnswer | Unparseable:
    """A class label; with ``labels``, the matching label in its given spelling."""
    _check_labels(labels)
    if len(answer_text) > MAX_ANSWER_CHARS:
        return _bad(f"answer longer than {MAX_ANSWER_CHARS}", answer_text)
    cleaned = clean_label(answer_text)
    if not cleaned:
        return _bad("empty label", answer_text)
    if len(cleaned) > MAX_LABEL_CHARS:
        return _bad(f"label longer than {MAX_LABEL_CHARS}", answer_text)
    if labels is None:
        return LabelAnswer(cleaned)
    hit = _match(cleaned, labels, "label")
    return hit if isinstance(hit, Unparseable) else LabelAnswer(hit)


def parse_text(text: str) -> TextAnswer | Unparseable:
    """Free text (open VQA), stripped; empty text is unparseable."""
    if len(text) > MAX_ANSWER_CHARS:
        return _bad(f"answer longer than {MAX_ANSWER_CHARS}", text)
    stripped = text.strip()
    if not stripped:
        return _bad("empty answer", text)
    return TextAnswer(stripped)


def option_letter(index: int) -> str:
    """``A`` for the first option, ``B`` for the second, …"""
    return chr(ord("A") + index)


MAX_OPTIONS = 26
_LETTER_RE = re.compile(r"\(?([A-Z])\s*(?:[.):]\s*(.*)|\)?\s*)", re.DOTALL)


def parse_option(text: str, options: Sequence[str]) -> TextAnswer | Unparseable:
    """Closed VQA: the chosen option's text, from its text, its letter (``B``, ``(B)``, ``B.``)
    or both (``B. text``, which must agree)."""
    _check_labels(options, "options")
    if len(text) > MAX_ANSWER_CHARS:
        return _bad(f"answer longer than {MAX_ANSWER_CHARS}", text)
    if not options or len(options) > MAX_OPTIONS:
        return _bad(f"need 1 to {MAX_OPTIONS} options, got {len(options)}", text)
    cleaned = clean_label(text)
    if not cleaned:
        return _bad("empty answer", text)
    hit = _match(cleaned, options, "option")
    if not isinstance(hit, Unparseable):
        return TextAnswer(hit)
    m = _LETTER_RE.fullmatch(cleaned)
    if m is None:
        return hit
    index = ord(m.group(1).upper()) - ord("A")
    if index >= len(options):
        return _bad(f"option letter {m.group(1)!r} beyond the {len(options)} options", text)
    rest = (m.group(2) or "").strip()
    if rest and label_key(rest) != label_key(options[index]):
        return _bad(f"option letter {m.group(1)!r} does not match its text", text)
    return TextAnswer(options[index])


# ---------------------------------------------------------------------------------------------
# Tolerant JSON


_STRING_STOP_RE = re.compile(r'["\\]')
_STRUCT_RE = re.compile(r'["\[\]{},]')
_SPACE_RE = re.compile(r"\s*")
_NUMBER_RE = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")


class _Reject(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _Reject(f"non-finite number {name}")


def _unfence(text: str) -> str:
    s = text.strip()
    if len(s) >= 6 and s.startswith("```") and s.endswith("```"):
        body = s[3:-3]
        first, newline, rest = body.partition("\n")
        if newline and re.fullmatch(r"[A-Za-z0-9_+-]*\s*", first):
            body = rest
        return body.strip()
    return s


def _clean_json(text: str) -> str:
    """Drop trailing commas outside strings and bound the nesting depth, in linear time."""
    drops: list[int] = []
    depth = 0
    i, n = 0, len(text)
    while True:
        m = _STRUCT_RE.search(text, i)
        if m is None:
            break
        i = m.start()
        c = text[i]
        if c == '"':
            j = i + 1
            while True:
                stop = _STRING_STOP_RE.search(text, j)
                if stop is None:
                    raise _Reject("unterminated string")
                if text[stop.start()] == "\\":
                    j = stop.start() + 2
                    continue
                i = stop.start() + 1
                break
            continue
        if c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise _Reject(f"JSON nested deeper than {MAX_JSON_DEPTH}")
        elif c in "]}":
            depth -= 1
        else:  # a comma
            after = _SPACE_RE.match(text, i + 1).end()
            if after < n and text[after] in "]}":
                drops.append(i)
        i += 1
    if not drops:
        return text
    parts, prev = [], 0
    for d in drops:
        parts.append(text[prev:d])
        prev = d + 1
    parts.append(text[prev:])
    return "".join(parts)


def _load_items(text: str) -> list[Any]:
    """The list of JSON objects in an answer (one object counts as a list of one)."""
    if len(text) > MAX_ANSWER_CHARS:
        raise _Reject(f"answer longer than {MAX_ANSWER_CHARS}")
    body = _unfence(text)
    if not body:
        raise _Reject("empty answer")
    try:
        value = json.loads(_clean_json(body), parse_constant=_reject_constant, parse_int=float)
    except (ValueError, RecursionError):
        raise _Reject("not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _Reject("JSON is not a list of objects")
    if len(value) > MAX_ITEMS:
        raise _Reject(f"more than {MAX_ITEMS} items")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise _Reject(f"{where}: not a number")
    if isinstance(value, str):
        if len(value) > 64 or not _NUMBER_RE.fullmatch(value):
            raise _Reject(f"{where}: not a number")
        value = float(value)
    if not isinstance(value, (int, float)):
        raise _Reject(f"{where}: not a number")
    x = float(value)
    if not math.isfinite(x):
        raise _Reject(f"{where}: not finite")
    if x < 0.0:
        if x < -COORD_TOLERANCE:
            raise _Reject(f"{where}: below 0")
        x = 0.0
    elif x > NORM_MAX:
        if x > NORM_MAX + COORD_TOLERANCE:
            raise _Reject(f"{where}: above {NORM_MAX:g}")
        x = NORM_MAX
    return x


def _item_label(item: Any, where: str, labels: Sequence[str] | None) -> str:
    if not isinstance(item, dict):
        raise _Reject(f"{where}: not an object")
    label = item.get("label")
    if not isinstance(label, str):
        raise _Reject(f"{where}: missing string label")
    result = parse_label(label, labels)
    if isinstance(result, Unparseable):
        raise _Reject(f"{where}: {result.reason}")
    return result.label


def _item_value(item: dict[str, Any], keys: Sequence[str], where: str) -> Any:
    present = [k for k in keys if k in item]
    if len(present) != 1:
        raise _Reject(f"{where}: needs exactly one of {', '.join(keys)}")
    return item[present[0]]


def _detection(item: Any, where: str, labels: Sequence[str] | None) -> Detection:
    label = _item_label(item, where, labels)
    box = _item_value(item, BOX_KEYS, where)
    if not isinstance(box, list) or len(box) != 4:
        raise _Reject(f"{where}: box is not 4 numbers")
    x1, y1, x2, y2 = (_number(v, f"{where} box") for v in box)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if x1 == x2 or y1 == y2:
        raise _Reject(f"{where}: box has zero width or height")
    return Detection(label, (x1, y1, x2, y2))


def _polygon(item: Any, where: str, labels: Sequence[str] | None) -> Polygon:
    label = _item_label(item, where, labels)
    raw_points = _item_value(item, POLYGON_KEYS, where)
    if not isinstance(raw_points, list):
        raise _Reject(f"{where}: polygon is not a list of [x, y] points")
    if len(raw_points) > MAX_POLYGON_POINTS:
        raise _Reject(f"{where}: more than {MAX_POLYGON_POINTS} points")
    points: list[tuple[float, float]] = []
    for p in raw_points:
        if not isinstance(p, list) or len(p) != 2:
            raise _Reject(f"{where}: polygon point is not [x, y]")
        points.append((_number(p[0], f"{where} point"), _number(p[1], f"{where} point")))
    if len(points) > 1 and points[-1] == points[0]:
        points.pop()
    if len(set(points)) < 3:
        raise _Reject(f"{where}: polygon has fewer than 3 distinct points")
    if polygon_area(points) == 0.0:
        raise _Reject(f"{where}: polygon has zero area")
    return Polygon(label, tuple(points))


def polygon_area(points: Sequence[tuple[float, float]]) -> float:
    """Unsigned shoelace area of a polygon given by its vertices."""
    a = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = a[:, 0], a[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def parse_detections(
    text: str, labels: Sequence[str] | None = None
) -> DetectionAnswer | Unparseable:
    """Boxes from ``[{"label": ..., "box": [x1, y1, x2, y2]}, ...]``; ``[]`` means none."""
    _check_labels(labels)
    try:
        items = _load_items(text)
        dets = tuple(_detection(it, f"item {i}", labels) for i, it in enumerate(items))
    except _Reject as e:
        return _bad(str(e), text)
    return DetectionAnswer(dets)


def parse_polygons(
    text: str, labels: Sequence[str] | None = None
) -> SegmentationAnswer | Unparseable:
    """Polygons from ``[{"label": ..., "polygon": [[x, y], ...]}, ...]``; ``[]`` means none."""
    _check_labels(labels)
    try:
        items = _load_items(text)
        polys = tuple(_polygon(it, f"item {i}", labels) for i, it in enumerate(items))
    except _Reject as e:
        return _bad(str(e), text)
    return SegmentationAnswer(polys)


def parse_answer(
    task: int,
    completion_text: str,
    labels: Sequence[str] | None = None,
    *,
    options: Sequence[str] | None = None,
) -> Answer:
    """Parse the answer block of a completion for ``task`` (a ``Task`` or proto enum value).

    ``labels`` constrain classification, detection and segmentation labels. For VQA, ``options``
    (or, when it is None, ``labels``) make it closed VQA; without either it is open VQA.
    ValueError for an unknown or unspecified task; never raises on the text.
    """
    t = coerce_task(task)
    _check_labels(labels)
    _check_labels(options, "options")
    completion, why = _split(completion_text)
    if completion.answer is None:
        return _bad(why, completion_text)
    answer = completion.answer
    if t is Task.CLASSIFICATION:
        return parse_label(answer, labels)
    if t is Task.DETECTION:
        return parse_detections(answer, labels)
    if t is Task.SEGMENTATION:
        return parse_polygons(answer, labels)
    choices = options if options is not None else labels
    return parse_option(answer, choices) if choices is not None else parse_text(answer)


# ---------------------------------------------------------------------------------------------
# Canonical serialisation


def _coord(x: float) -> float | int:
    if not math.isfinite(x):
        raise ValueError(f"coordinate {x!r} is not finite")
    return int(x) if float(x).is_integer() else float(x)


def format_answer(answer: Answer) -> str:
    """The canonical answer text (the inside of the answer block)."""
    if isinstance(answer, LabelAnswer):
        return answer.label
    if isinstance(answer, TextAnswer):
        return answer.text
    if isinstance(answer, DetectionAnswer):
        items: list[dict[str, Any]] = [
            {"label": d.label, "box": [_coord(v) for v in d.box]} for d in answer.detections
        ]
    elif isinstance(answer, SegmentationAnswer):
        items = [
            {"label": p.label, "polygon": [[_coord(x), _coord(y)] for x, y in p.points]}
            for p in answer.polygons
        ]
    elif isinstance(answer, Unparseable):
        raise ValueError(f"cannot format an unparseable answer ({answer.reason})")
    else:
        raise TypeError(f"not an Answer: {type(answer).__name__}")
    return json.dumps(items, ensure_ascii=False, allow_nan=False)
