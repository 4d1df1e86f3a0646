"""Output grammar: completion splitting, tolerant parsers that never raise, round trips."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from smartpath.model import grammar as g
from smartpath.model.grammar import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    MAX_ANSWER_CHARS,
    MAX_RAW_CHARS,
    THINK_CLOSE,
    THINK_OPEN,
    Detection,
    DetectionAnswer,
    LabelAnswer,
    Polygon,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    clean_label,
    format_answer,
    format_completion,
    parse_answer,
    parse_detections,
    parse_label,
    parse_option,
    parse_polygons,
    parse_text,
    split_completion,
)
from smartpath.v1 import common_pb2

FAST = settings(max_examples=150, deadline=None, database=None)
SLOW = settings(max_examples=40, deadline=None, database=None)
TASKS = [Task.CLASSIFICATION, Task.DETECTION, Task.SEGMENTATION, Task.VQA]
ANSWER_TYPES = (LabelAnswer, DetectionAnswer, SegmentationAnswer, TextAnswer, Unparseable)


def wrap(answer: str, think: str = "x") -> str:
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def check_invariants(result: object) -> None:
    """What every parser result promises, whatever the input."""
    assert isinstance(result, ANSWER_TYPES), type(result)
    if isinstance(result, Unparseable):
        assert result.reason
        assert len(result.raw) <= MAX_RAW_CHARS
    elif isinstance(result, DetectionAnswer):
        for d in result.detections:
            x1, y1, x2, y2 = d.box
            assert all(isinstance(v, float) and math.isfinite(v) for v in d.box)
            assert 0.0 <= x1 < x2 <= 1000.0 and 0.0 <= y1 < y2 <= 1000.0
            assert d.label == d.label.strip() and d.label
    elif isinstance(result, SegmentationAnswer):
        for p in result.polygons:
            assert len(set(p.points)) >= 3 and p.points[0] != p.points[-1]
            assert all(0.0 <= v <= 1000.0 for pt in p.points for v in pt)
            assert g.polygon_area(p.points) > 0.0
    elif isinstance(result, LabelAnswer):
        assert result.label and result.label == clean_label(result.label)
    else:
        assert result.text and result.text == result.text.strip()


def all_parsers(text: str) -> list[object]:
    out: list[object] = [
        split_completion(text),
        parse_label(text),
        parse_label(text, ["tumor", "stroma"]),
        parse_detections(text),
        parse_polygons(text),
        parse_text(text),
        parse_option(text, ["yes", "no", "maybe"]),
    ]
    for task in TASKS:
        out.append(parse_answer(task, text))
        out.append(parse_answer(task, wrap(text)))
    return out


# --------------------------------------------------------------------------------- enums


@pytest.mark.parametrize(
    ("ours", "proto", "prefix"),
    [(g.Task, common_pb2.Task, "TASK_"), (g.Scale, common_pb2.Scale, "SCALE_")],
)
def test_enums_mirror_the_proto(ours, proto, prefix) -> None:
    assert {f"{prefix}{m.name}": m.value for m in ours} == dict(proto.items())


def test_coerce_rejects_unspecified_and_unknown() -> None:
    assert g.coerce_task(common_pb2.TASK_DETECTION) is Task.DETECTION
    with pytest.raises(ValueError, match=r"TASK_UNSPECIFIED.*DETECTION \(2\)"):
        g.coerce_task(0)
    with pytest.raises(ValueError, match="unknown task 9"):
        g.coerce_task(9)
    with pytest.raises(ValueError, match="int enum"):
        g.coerce_task("detection")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SCALE_UNSPECIFIED"):
        g.coerce_scale(common_pb2.SCALE_UNSPECIFIED)


# --------------------------------------------------------------------------- completions


def test_split_well_formed() -> None:
    c = split_completion("  <think> a b </think>\n <answer> tumor </answer>\n")
    assert c == g.Completion(think="a b", answer="tumor", well_formed=True)
    assert split_completion("<think></think><answer>x</answer>").well_formed


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<answer>x</answer>", "x"),  # no think block
        ("hi <think>t</think><answer>x</answer>", "x"),  # text before
        ("<think>t</think>so<answer>x</answer>", "x"),  # text between
        ("<think>t</think><answer>x</answer> bye", "x"),  # text after
        ("<answer>x</answer><think>t</think>", "x"),  # order
        ("<think>t</think><answer>   </answer>", ""),  # empty answer
        ("<think>t<think>u</think><answer>x</answer>", "x"),  # two think opens
        ("<think>t</think><answer>x</answer><answer>y</answer>", None),  # two answers
        ("<think>t</think><answer>x", None),  # unclosed
        ("<think>t</think>x</answer>", None),  # unopened
        ("<think>t</think></answer>x<answer>", None),  # reversed
        ("<think><answer>x</answer></think>", "x"),  # answer nested in think
        ("<think>t</think><answer>a<think>b</think>c</answer>", None),  # tag inside answer
        ("<THINK>t</THINK><ANSWER>x</ANSWER>", None),  # tags are case-sensitive
        ("", None),
    ],
)
def test_split_not_well_formed(text: str, answer: str | None) -> None:
    c = split_completion(text)
    assert not c.well_formed
    assert c.answer == answer


@FAST
@given(st.text(), st.text())
def test_format_completion_round_trip(think: str, answer: str) -> None:
    assume(not any(tag in think + answer for tag in g.TAGS))
    c = split_completion(format_completion(think, answer))
    assert (c.think, c.answer) == (think.strip(), answer.strip())
    assert c.well_formed == bool(answer.strip())


def test_format_completion_rejects_tags() -> None:
    with pytest.raises(ValueError, match="answer text contains a grammar tag"):
        format_completion("ok", "a</answer>b")
    with pytest.raises(ValueError, match="think text"):
        format_completion("<think>", "a")


def test_parse_answer_reports_why_the_answer_is_missing() -> None:
    assert parse_answer(Task.VQA, "just text").reason == "no <answer> block"
    two = wrap("a") + "<answer>b</answer>"
    assert parse_answer(Task.VQA, two).reason == "more than one <answer> block"
    assert parse_answer(Task.VQA, "<answer>a").reason == "unbalanced <answer> tags"
    huge = wrap("a" * (g.MAX_COMPLETION_CHARS + 1))
    assert "longer than" in parse_answer(Task.VQA, huge).reason
    with pytest.raises(ValueError, match="UNSPECIFIED"):
        parse_answer(Task.UNSPECIFIED, wrap("a"))


# -------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Tumor", "tumor"),
        ("  TUMOR.  ", "tumor"),
        ('"tumor"', "tumor"),
        ("\u201cTumor\u201d", "tumor"),
        ("lymph   node", "Lymph Node"),
        ("lymph\nnode", "Lymph Node"),
        ("etc.", "etc."),  # exact spelling wins over period stripping
    ],
)
def test_parse_label_matches_known_labels(text: str, expected: str) -> None:
    assert parse_label(text, ["tumor", "Lymph Node", "etc."]) == LabelAnswer(expected)


@pytest.mark.parametrize(
    ("text", "labels", "reason"),
    [
        ("necrosis", ["tumor", "stroma"], "not one of the 2 given"),
        ("  ", None, "empty label"),
        ('""', None, "empty label"),
        ("x" * 300, None, "longer than 256"),
        ("tumor", ["Tumor", "TUMOR"], "ambiguous"),
        ("tumor stroma", ["tumor", "stroma"], "not one of"),
    ],
)
def test_parse_label_rejects(text: str, labels: list[str] | None, reason: str) -> None:
    result = parse_label(text, labels)
    assert isinstance(result, Unparseable) and reason in result.reason


def test_parse_label_without_labels_cleans_text() -> None:
    assert parse_label("  Some  Tissue. ") == LabelAnswer("Some Tissue")


def test_labels_as_one_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not one string"):
        parse_label("t", "tumor")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no", "no"),
        ("NO.", "no"),
        ("B", "no"),
        ("(B)", "no"),
        ("B.", "no"),
        ("B)", "no"),
        ("B. no", "no"),
        ("(B) No", "no"),
        ("C: maybe", "maybe"),
        ("A", "yes"),
    ],
)
def test_parse_option(text: str, expected: str) -> None:
    assert parse_option(text, ["yes", "no", "maybe"]) == TextAnswer(expected)
    assert parse_answer(Task.VQA, wrap(text), options=["yes", "no", "maybe"]) == TextAnswer(
        expected
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("D", "beyond the 3 options"),
        ("B. yes", "does not match"),
        ("b", "not one of"),  # lowercase letters are not option letters
        ("perhaps", "not one of"),
        ("", "empty"),
    ],
)
def test_parse_option_rejects(text: str, reason: str) -> None:
    result = parse_option(text, ["yes", "no", "maybe"])
    assert isinstance(result, Unparseable) and reason in result.reason


def test_option_text_equal_to_a_letter_wins_over_the_letter() -> None:
    assert parse_option("B", ["B", "A"]) == TextAnswer("B")


def test_parse_text() -> None:
    assert parse_text("  the nuclei are enlarged \n") == TextAnswer("the nuclei are enlarged")
    assert isinstance(parse_text(" \n\t"), Unparseable)
    assert parse_answer(Task.VQA, wrap(" big ")) == TextAnswer("big")
    # For VQA, labels stand in for options when options are not given.
    assert parse_answer(Task.VQA, wrap("A"), labels=["yes", "no"]) == TextAnswer("yes")


# ---------------------------------------------------------------------------- detections

D = Detection
BOX = [10, 20, 30, 40]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"label": "nucleus", "box": [10, 20, 30, 40]}]', [D("nucleus", (10, 20, 30, 40))]),
        ('{"label": "nucleus", "box": [10, 20, 30, 40]}', [D("nucleus", (10, 20, 30, 40))]),
        ("[]", []),
        ("```json\n[]\n```", []),
        ('```\n[{"label": "a", "box": [1,2,3,4],},]\n```', [D("a", (1, 2, 3, 4))]),
        ('[{"label": "a", "box": ["1", " 2.5 ", "3e1", 4]}]', [D("a", (1, 2.5, 30, 4))]),
        ('[{"label": "a", "bbox_2d": [1, 2, 3, 4]}]', [D("a", (1, 2, 3, 4))]),
        ('[{"label": "a", "bbox": [1, 2, 3, 4], "score": 0.9}]', [D("a", (1, 2, 3, 4))]),
        ('[{"label": "a", "box": [30, 40, 10, 20]}]', [D("a", (10, 20, 30, 40))]),  # reordered
        ('[{"label": "a", "box": [-1e-7, 0, 1000.0000005, 1000]}]', [D("a", (0, 0, 1000, 1000))]),
        ('[{"label": "a, ]", "box": [1, 2, 3, 4]}]', [D("a, ]", (1, 2, 3, 4))]),  # comma in str
        ('[{"label": "a \\" ,]", "box": [1, 2, 3, 4]}]', [D('a " ,]', (1, 2, 3, 4))]),
        (
            '[{"label": "a", "box": [1, 2, 3, 4]}, {"label": "b", "box": [5, 6, 7, 8]}]',
            [D("a", (1, 2, 3, 4)), D("b", (5, 6, 7, 8))],
        ),
    ],
)
def test_parse_detections_tolerates(text: str, expected: list[Detection]) -> None:
    result = parse_detections(text)
    assert result == DetectionAnswer(tuple(expected))
    check_invariants(result)
    assert parse_answer(Task.DETECTION, wrap(text)) == result


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty answer"),
        ("nucleus at 10, 20", "not valid JSON"),
        ('"nucleus"', "not a list of objects"),
        ("[1, 2]", "item 0: not an object"),
        ('[{"box": [1, 2, 3, 4]}]', "missing string label"),
        ('[{"label": 3, "box": [1, 2, 3, 4]}]', "missing string label"),
        ('[{"label": "a"}]', "needs exactly one of box"),
        ('[{"label": "a", "box": [1, 2, 3, 4], "bbox": [1, 2, 3, 4]}]', "exactly one of"),
        ('[{"label": "a", "box": [1, 2, 3]}]', "not 4 numbers"),
        ('[{"label": "a", "box": [1, 2, 3, true]}]', "not a number"),
        ('[{"label": "a", "box": [1, 2, 3, "4px"]}]', "not a number"),
        ('[{"label": "a", "box": [1, 2, 3, "NaN"]}]', "not a number"),
        ('[{"label": "a", "box": [1, 2, 3, NaN]}]', "non-finite"),
        ('[{"label": "a", "box": [1, 2, 3, Infinity]}]', "non-finite"),
        ('[{"label": "a", "box": [1, 2, 3, 1e999]}]', "not finite"),
        ('[{"label": "a", "box": [1, 2, 3, ' + "9" * 5000 + "]}]", "not finite"),
        ('[{"label": "a", "box": [1, 2, 3, 1000.01]}]', "above 1000"),
        ('[{"label": "a", "box": [-0.5, 2, 3, 4]}]', "below 0"),
        ('[{"label": "a", "box": [1, 2, 1, 4]}]', "zero width or height"),
        ('[{"label": "", "box": [1, 2, 3, 4]}]', "empty label"),
        ('[{"label": "a", "box": [1, 2, 3, 4]}', "not valid JSON"),
        ('[{"label": "a, "box": [1, 2, 3, 4]}]', "unterminated string"),
        ('[{"label": "a" "box": [1, 2, 3, 4]}]', "not valid JSON"),
        ('[{"label": "a', "unterminated string"),
        ("[" * 17 + "]" * 17, "nested deeper than 16"),
        ("[" + ",".join(['{"label": "a", "box": [1, 2, 3, 4]}'] * 1025) + "]", "more than 1024"),
        ("```json\n[]", "not valid JSON"),
    ],
)
def test_parse_detections_rejects(text: str, reason: str) -> None:
    result = parse_detections(text)
    assert isinstance(result, Unparseable), result
    assert reason in result.reason
    assert result.raw == text[:MAX_RAW_CHARS]


def test_detection_labels_are_canonicalised_and_checked() -> None:
    text = '[{"label": "Tumor Cell", "box": [1, 2, 3, 4]}]'
    assert parse_detections(text, ["tumor cell"]).detections[0].label == "tumor cell"
    bad = parse_answer(Task.DETECTION, wrap(text), ["lymphocyte"])
    assert isinstance(bad, Unparseable) and "item 0: label" in bad.reason


def test_detection_answer_helpers() -> None:
    a = parse_detections('[{"label": "a", "box": [1, 2, 3, 4]}, {"label": "b", "box": [5,6,7,8]}]')
    assert a.boxes().tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert a.boxes().dtype.name == "float64" and a.labels() == ["a", "b"]
    assert DetectionAnswer(()).boxes().shape == (0, 4)


# ------------------------------------------------------------------------------ polygons

TRI = "[[0, 0], [100, 0], [0, 100]]"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'[{{"label": "gland", "polygon": {TRI}}}]', [((0, 0), (100, 0), (0, 100))]),
        (f'{{"label": "gland", "points": {TRI}}}', [((0, 0), (100, 0), (0, 100))]),
        (
            '[{"label": "gland", "polygon": [[0,0],[100,0],[0,100],[0,0]]}]',
            [((0, 0), (100, 0), (0, 100))],
        ),  # closing vertex dropped
        (
            '[{"label": "gland", "polygon": [["0","0"],[100,0],[0,100],],},]',
            [((0, 0), (100, 0), (0, 100))],
        ),
        ("[]", []),
    ],
)
def test_parse_polygons_tolerates(text: str, expected: list) -> None:
    result = parse_polygons(text)
    assert result == SegmentationAnswer(tuple(Polygon("gland", pts) for pts in expected))
    check_invariants(result)
    assert parse_answer(Task.SEGMENTATION, wrap(text), ["Gland"]) == SegmentationAnswer(
        tuple(Polygon("Gland", pts) for pts in expected)
    )


@pytest.mark.parametrize(
    ("points", "reason"),
    [
        ("[[0, 0], [100, 0]]", "fewer than 3 distinct"),
        ("[[0, 0], [100, 0], [0, 0]]", "fewer than 3 distinct"),
        ("[[0, 0], [100, 0], [100, 0], [0, 0]]", "fewer than 3 distinct"),
        ("[[0, 0], [50, 50], [100, 100]]", "zero area"),
        ("[[0, 0], [100, 0], [0, 1001]]", "above 1000"),
        ("[[0, 0], [100, 0], [0]]", "not [x, y]"),
        ("[[0, 0], [100, 0], [0, 1, 2]]", "not [x, y]"),
        ('{"x": 1}', "not a list"),
        ("[" + ",".join(["[1, 2]"] * 4097) + "]", "more than 4096 points"),
    ],
)
def test_parse_polygons_rejects(points: str, reason: str) -> None:
    result = parse_polygons(f'[{{"label": "gland", "polygon": {points}}}]')
    assert isinstance(result, Unparseable) and reason in result.reason, result


def test_polygon_array() -> None:
    p = parse_polygons(f'[{{"label": "g", "polygon": {TRI}}}]').polygons[0]
    assert p.array().shape == (3, 2) and p.array()[1].tolist() == [100, 0]


# ------------------------------------------------------------------- adversarial inputs

ADVERSARIAL = [
    "[" * 100_000,
    "[" * 100_000 + "]" * 100_000,
    "{" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    '"' + '\\"' * 30_000,  # unterminated string full of escaped quotes
    '"\\' * 30_000,
    '["' + "\\" * 60_001,
    "," * 60_000 + "]",
    "[" + "1," * 30_000 + "]",
    "9" * 60_000,
    "-" + "9" * 4400 + ".5e99999",
    "[NaN, Infinity, -Infinity, 1e309]",
    "\x00\x01\x02\ufffd\ud800\U0010ffff",
    "<answer>" * 10_000,
    "</answer><answer>" * 10_000,
    "<think><answer></think></answer>",
    "<answer><answer>x</answer></answer>",
    wrap("a") * 1000,
    "```" * 20_000,
    "```json\n" + "[" * 20 + "\n```",
    "x" * (MAX_ANSWER_CHARS + 1),
    '[{"label": "\u0000\ud800", "box": [1, 2, 3, 4]}]',
    '[{"label": "' + "é" * 300 + '", "box": [1, 2, 3, 4]}]',
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_never_raise_and_stay_fast(text: str) -> None:
    start = time.perf_counter()
    for result in all_parsers(text):
        if not isinstance(result, g.Completion):
            check_invariants(result)
    # Linear-time parsing: quadratic behaviour on these inputs would take far longer.
    assert time.perf_counter() - start < 3.0


@FAST
@given(st.text())
def test_parsers_never_raise_on_text(text: str) -> None:
    for result in all_parsers(text):
        if not isinstance(result, g.Completion):
            check_invariants(result)


@FAST
@given(st.binary(max_size=2000).map(lambda b: b.decode("utf-8", errors="replace")))
def test_parsers_never_raise_on_decoded_bytes(text: str) -> None:
    for result in all_parsers(text):
        if not isinstance(result, g.Completion):
            check_invariants(result)


FRAGMENTS = st.lists(
    st.sampled_from(
        [
            *g.TAGS,
            "[",
            "]",
            "{",
            "}",
            ",",
            '"',
            "\\",
            ":",
            "```json\n",
            "```",
            '"label"',
            '"box"',
            '"polygon"',
            "1000",
            "-1",
            "1e999",
            "NaN",
            "0.5",
            '"12"',
            " ",
            "\n",
            "<think",
            "answer>",
        ]
    )
    | st.text(max_size=4),
    max_size=60,
).map("".join)


@FAST
@given(FRAGMENTS)
def test_parsers_never_raise_on_grammar_fragments(text: str) -> None:
    for result in all_parsers(text):
        if not isinstance(result, g.Completion):
            check_invariants(result)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.text(max_size=8)
    | st.sampled_from(["label", "box", "polygon", "bbox_2d", "12", "gland"]),
    lambda kids: (
        st.lists(kids, max_size=5)
        | st.dictionaries(st.sampled_from(["label", "box", "polygon", "points", "bbox"]), kids)
    ),
    max_leaves=30,
)


@FAST
@given(JSON, st.integers(min_value=0, max_value=400))
def test_parsers_never_raise_on_json_like_text(value: object, cut: int) -> None:
    text = json.dumps(value)
    for candidate in (text, text[:cut], text.replace("]", ",]")):
        for parse in (parse_detections, parse_polygons):
            check_invariants(parse(candidate))


# --------------------------------------------------------------------------- round trips

COORD = st.floats(min_value=0, max_value=1000, allow_nan=False) | st.integers(0, 1000).map(float)
LABEL = st.text(min_size=1, max_size=40).filter(
    lambda s: clean_label(s) == s and not any(t in s for t in g.TAGS)
)


@st.composite
def detections(draw: st.DrawFn) -> DetectionAnswer:
    out = []
    for _ in range(draw(st.integers(0, 5))):
        x1, x2 = sorted(draw(st.lists(COORD, min_size=2, max_size=2, unique=True)))
        y1, y2 = sorted(draw(st.lists(COORD, min_size=2, max_size=2, unique=True)))
        out.append(Detection(draw(LABEL), (x1, y1, x2, y2)))
    return DetectionAnswer(tuple(out))


@st.composite
def segmentations(draw: st.DrawFn) -> SegmentationAnswer:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        pts = draw(st.lists(st.tuples(COORD, COORD), min_size=3, max_size=12, unique=True))
        assume(g.polygon_area(pts) > 0)
        out.append(Polygon(draw(LABEL), tuple(pts)))
    return SegmentationAnswer(tuple(out))


@FAST
@given(detections())
def test_detection_round_trip(answer: DetectionAnswer) -> None:
    text = format_answer(answer)
    assert parse_detections(text) == answer
    assert parse_answer(Task.DETECTION, format_completion("t", text)) == answer


@FAST
@given(segmentations())
def test_segmentation_round_trip(answer: SegmentationAnswer) -> None:
    text = format_answer(answer)
    assert parse_polygons(text) == answer
    assert parse_answer(Task.SEGMENTATION, format_completion("t", text)) == answer


@FAST
@given(st.lists(LABEL, min_size=1, max_size=6, unique_by=g.label_key), st.data())
def test_label_round_trip(labels: list[str], data: st.DataObject) -> None:
    answer = LabelAnswer(data.draw(st.sampled_from(labels)))
    completion = format_completion("t", format_answer(answer))
    assert parse_answer(Task.CLASSIFICATION, completion, labels) == answer
    assert parse_answer(Task.CLASSIFICATION, completion) == answer


@FAST
@given(st.text(min_size=1).filter(lambda s: s == s.strip() and not any(t in s for t in g.TAGS)))
def test_text_round_trip(text: str) -> None:
    assume(len(text) <= MAX_ANSWER_CHARS)
    answer = TextAnswer(text)
    assert parse_answer(Task.VQA, format_completion("t", format_answer(answer))) == answer


def test_format_answer_canonical_form() -> None:
    answer = DetectionAnswer((Detection("é", (1.0, 2.5, 3.0, 4.0)),))
    assert format_answer(answer) == '[{"label": "é", "box": [1, 2.5, 3, 4]}]'
    seg = SegmentationAnswer((Polygon("g", ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0))),))
    assert format_answer(seg) == '[{"label": "g", "polygon": [[0, 0], [1, 0], [0, 1]]}]'
    assert format_answer(DetectionAnswer(())) == "[]"
    assert format_answer(LabelAnswer("tumor")) == "tumor"


def test_format_answer_rejects_unparseable_and_non_finite() -> None:
    with pytest.raises(ValueError, match="unparseable"):
        format_answer(Unparseable("x", "y"))
    with pytest.raises(ValueError, match="not finite"):
        format_answer(DetectionAnswer((Detection("a", (0.0, 0.0, math.nan, 1.0)),)))
    with pytest.raises(TypeError, match="not an Answer"):
        format_answer("tumor")  # type: ignore[arg-type]
