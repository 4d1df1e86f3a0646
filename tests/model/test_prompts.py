"""Prompt templates: every (task, scale), validation errors, the registry, examples that parse."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartpath.model import grammar as g
from smartpath.model import prompts as p
from smartpath.model.prompts import PROMPT_TEMPLATES, Scale, Task, build_prompt
from smartpath.v1 import common_pb2

FAST = settings(max_examples=60, deadline=None, database=None)
SUPPORTED = {
    (Task.CLASSIFICATION, Scale.ROI),
    (Task.DETECTION, Scale.ROI),
    (Task.SEGMENTATION, Scale.ROI),
    (Task.VQA, Scale.ROI),
    (Task.CLASSIFICATION, Scale.WSI),
    (Task.VQA, Scale.WSI),
}
LABELS = ["tumor", "stroma", "normal"]


def inputs(task: Task) -> dict:
    if task is Task.VQA:
        return {"question": "Is there necrosis?", "options": ["yes", "no"]}
    return {"labels": LABELS}


def example_of(prompt: str) -> str:
    lines = [line for line in prompt.splitlines() if line.startswith("Example: ")]
    assert len(lines) == 1, prompt
    return lines[0].removeprefix("Example: ")


@pytest.mark.parametrize(
    ("task", "scale"), list(itertools.product(list(Task)[1:], list(Scale)[1:]))
)
def test_every_task_and_scale(task: Task, scale: Scale) -> None:
    if (task, scale) not in SUPPORTED:
        with pytest.raises(
            ValueError, match=f"no prompt template '{p.template_name(task, scale)}'"
        ):
            build_prompt(task, scale, **inputs(task))
        return
    kwargs = inputs(task)
    prompt = build_prompt(task, scale, **kwargs)
    assert g.THINK_OPEN in prompt and g.ANSWER_CLOSE in prompt
    assert ("whole-slide image" in prompt) == (scale is Scale.WSI)
    assert ("region of interest" in prompt) == (scale is Scale.ROI)
    names = kwargs.get("labels") or kwargs.get("options")
    assert all(name in prompt for name in names)
    # The prompt's own example is a well-formed completion that the parsers accept.
    example = example_of(prompt)
    assert g.split_completion(example).well_formed
    answer = g.parse_answer(task, example, kwargs.get("labels"), options=kwargs.get("options"))
    assert not isinstance(answer, g.Unparseable), answer
    # Proto enum ints give the same prompt.
    proto_task = common_pb2.Task.Value(f"TASK_{task.name}")
    proto_scale = common_pb2.Scale.Value(f"SCALE_{scale.name}")
    assert build_prompt(proto_task, proto_scale, **kwargs) == prompt


def test_answer_formats_are_stated() -> None:
    det = build_prompt(Task.DETECTION, Scale.ROI)
    assert '"box": [x1, y1, x2, y2]' in det and "0-1000" in det and "Answer []" in det
    seg = build_prompt(Task.SEGMENTATION, Scale.ROI, labels=["gland"])
    assert '"polygon": [[x, y]' in seg and "at least 3" in seg and '["gland"]' in seg
    cls = build_prompt(Task.CLASSIFICATION, Scale.WSI, labels=LABELS)
    assert json.dumps(LABELS) in cls and "exactly one label" in cls
    closed = build_prompt(Task.VQA, Scale.ROI, "Grade?", options=["low", "high"])
    assert "A. low\nB. high" in closed and "letter" in closed
    opened = build_prompt(Task.VQA, Scale.ROI, "What is shown?")
    assert "free-text" in opened and "Options" not in opened and "Example" not in opened


@pytest.mark.parametrize(("task", "scale"), sorted(SUPPORTED))
@pytest.mark.parametrize("question", [None, "Which one?"])
def test_compact_style_is_the_task_lines_of_the_full_prompt(
    task: Task, scale: Scale, question: str | None
) -> None:
    kwargs = inputs(task) | ({"question": question} if question else {})
    full = build_prompt(task, scale, **kwargs)
    compact = build_prompt(task, scale, **kwargs, style="compact")
    # No scale intro, format instructions or example: what a tiny model cannot read.
    for absent in ("histopathology", g.THINK_OPEN, g.ANSWER_OPEN, "Example", "0-1000"):
        assert absent not in compact, absent
    names = kwargs.get("labels") or kwargs.get("options")
    assert all(name in compact for name in names)
    if question:
        assert question in compact
    lines = full.splitlines()
    start = lines.index(compact.splitlines()[0])
    assert start == 1 and "\n".join(lines[start:]).startswith(compact)
    assert len(compact) < len(full) / 2


def test_unknown_prompt_style_is_refused() -> None:
    with pytest.raises(ValueError, match=r"prompt style must be one of \('full', 'compact'\)"):
        build_prompt(Task.CLASSIFICATION, Scale.ROI, labels=LABELS, style="terse")  # type: ignore[arg-type]


def test_question_is_used() -> None:
    prompt = build_prompt(Task.CLASSIFICATION, Scale.ROI, "  Which grade?  ", labels=["G1", "G2"])
    assert "\nWhich grade?\n" in prompt and "Classify" not in prompt
    assert "Question: What is shown?" in build_prompt(Task.VQA, Scale.WSI, "What is shown?")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": 0, "scale": 1}, "TASK_UNSPECIFIED .*pass one of CLASSIFICATION"),
        ({"task": 1, "scale": 0, "labels": LABELS}, "SCALE_UNSPECIFIED .*pass one of ROI"),
        ({"task": 7, "scale": 1}, "unknown task 7"),
        ({"task": 1, "scale": 1}, "classification needs the candidate labels, got labels=None"),
        ({"task": 1, "scale": 1, "labels": []}, r"got labels=\[\]; pass e.g. labels="),
        ({"task": 1, "scale": 1, "labels": "tumor"}, "got one string 'tumor'"),
        ({"task": 1, "scale": 1, "labels": ["a", " "]}, "non-empty strings, got ' '"),
        ({"task": 1, "scale": 1, "labels": ["a", 3]}, "non-empty strings, got 3"),
        ({"task": 1, "scale": 1, "labels": ["a\nb"]}, "one line of printable text"),
        ({"task": 4, "scale": 1, "question": "q", "options": ["</answer>", "b"]}, "without"),
        (
            {"task": 1, "scale": 1, "labels": ["Tumor", "tumor."]},
            "'Tumor' and 'tumor.' are the same",
        ),
        ({"task": 4, "scale": 1}, "VQA needs a question, got question=None"),
        ({"task": 4, "scale": 1, "question": "  "}, "VQA needs a question"),
        ({"task": 4, "scale": 1, "question": "q", "labels": ["a"]}, "options=.*not labels="),
        ({"task": 4, "scale": 1, "question": "q", "options": ["yes"]}, "2 to 26 options, got 1"),
        (
            {"task": 4, "scale": 1, "question": "q", "options": [str(i) for i in range(27)]},
            "got 27",
        ),
        ({"task": 2, "scale": 1, "options": ["a", "b"]}, "options are for closed VQA only"),
        ({"task": 2, "scale": 1, "question": 3}, "question must be a string"),
    ],
)
def test_invalid_requests_say_what_and_how(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_prompt(**kwargs)


def test_templates_are_swappable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(PROMPT_TEMPLATES) == {p.template_name(t, s) for t, s in SUPPORTED}
    monkeypatch.setitem(PROMPT_TEMPLATES, "roi_vqa", lambda i: f"Q={i.question} O={i.options}")
    assert build_prompt(Task.VQA, Scale.ROI, "q?", options=["a", "b"]) == "Q=q? O=('a', 'b')"
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        p.register_template("roi_vqa", lambda i: "")
    monkeypatch.delitem(PROMPT_TEMPLATES, "wsi_detection", raising=False)
    p.register_template("wsi_detection", lambda i: f"wsi det {i.labels}")
    try:
        assert build_prompt(Task.DETECTION, Scale.WSI, labels=["x"]) == "wsi det ('x',)"
    finally:
        del PROMPT_TEMPLATES["wsi_detection"]


LABEL = st.text(min_size=1, max_size=20).filter(
    lambda s: bool(g.clean_label(s)) and s.isprintable() and not any(t in s for t in g.TAGS)
)


@FAST
@given(
    st.sampled_from(sorted(SUPPORTED)),
    st.lists(LABEL, min_size=2, max_size=8, unique_by=g.label_key),
    st.text(max_size=50),
)
def test_valid_requests_always_build(
    combo: tuple[Task, Scale], names: list[str], question: str
) -> None:
    task, scale = combo
    if task is Task.VQA:
        prompt = build_prompt(task, scale, question + "?", options=names)
        assert all(f"{g.option_letter(i)}. {n}" in prompt for i, n in enumerate(names))
    else:
        prompt = build_prompt(task, scale, question, labels=names)
        assert json.dumps(names, ensure_ascii=False) in prompt
    example = g.split_completion(example_of(prompt))
    assert example.well_formed
