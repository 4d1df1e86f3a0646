"""Rewards: hand-built perfect / partial / malformed cases, dispatch, and robustness."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartpath.model.grammar import (
    Detection,
    DetectionAnswer,
    LabelAnswer,
    Polygon,
    SegmentationAnswer,
    Task,
    TextAnswer,
    format_answer,
    format_completion,
)
from smartpath.training import metrics
from smartpath.training.rewards import (
    REWARDS,
    classification_reward,
    detection_giou_reward,
    detection_reward,
    format_reward,
    segmentation_reward,
    task_reward,
    vqa_reward,
)

LABELS = ["tumour", "stroma", "lymphocyte"]
OPTIONS = ["yes", "no", "cannot tell"]


def done(answer: str, think: str = "looking") -> str:
    return format_completion(think, answer)


def det_json(*items) -> str:
    return json.dumps([{"label": lab, "box": list(box)} for lab, box in items])


BOX_A = (100, 100, 200, 200)
BOX_B = (500, 500, 650, 650)
DET_GT = DetectionAnswer((Detection("tumour", BOX_A), Detection("lymphocyte", BOX_B)))
SQ = ((0, 0), (500, 0), (500, 500), (0, 500))
SQ_SHIFT_HALF = ((250, 0), (750, 0), (750, 500), (250, 500))
SEG_GT = SegmentationAnswer((Polygon("tumour", SQ),))


def seg_json(label: str, pts) -> str:
    return json.dumps([{"label": label, "polygon": [list(p) for p in pts]}])


# ---------------------------------------------------------------------------------------------
# format


def test_format_reward():
    good = done("tumour")
    got = format_reward(
        [
            good,
            "<think></think><answer>tumour</answer>",  # empty think is fine
            "<answer>tumour</answer>",  # no think
            good + " trailing",
            "<think>x</think><answer></answer>",  # empty answer
            "<think>x</think><answer>a</answer><answer>b</answer>",
            "plain text",
            [{"role": "assistant", "content": good}],  # trl conversational form
            12345,
        ],
        prompts=["ignored"],
    )
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# classification


def test_classification_reward_cases():
    comps = [
        done("tumour"),
        done("Tumour."),  # normalised
        done("stroma"),
        done("carcinoma"),  # not in labels
        "<think>x</think>",  # no answer
        "<answer>tumour</answer>",  # malformed format, right answer: answer reward still 1
    ]
    targets = [LabelAnswer("tumour"), "tumour", "tumour", "tumour", "tumour", "tumour"]
    assert classification_reward(comps, targets, labels=LABELS) == [1, 1, 0, 0, 0, 1]
    # without labels, any label is parsed and compared
    assert classification_reward([done("carcinoma")], ["Carcinoma"]) == [1.0]
    # per-sample label lists as trl passes dataset columns
    got = classification_reward([done("a"), done("a")], ["a", "a"], labels=[["a", "b"], ["b", "c"]])
    assert got == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# detection


def test_detection_reward_cases():
    perfect = done(format_answer(DET_GT))
    partial = done(det_json(("tumour", BOX_A)))  # 1 of 2 -> F1 2/3
    shifted = done(det_json(("tumour", (150, 150, 250, 250)), ("lymphocyte", BOX_B)))  # IoU 1/7
    wrong_label = done(det_json(("stroma", BOX_A), ("stroma", BOX_B)))
    extra = done(det_json(("tumour", BOX_A), ("lymphocyte", BOX_B), ("tumour", (0, 0, 50, 50))))
    malformed = done('[{"label": "tumour", "box": [1, 2, 3]}]')
    out_of_range = done(det_json(("tumour", (0, 0, 1200, 50))))
    comps = [perfect, partial, shifted, wrong_label, extra, malformed, out_of_range, "junk"]
    got = detection_reward(comps, [DET_GT] * len(comps), labels=LABELS)
    assert got == pytest.approx([1.0, 2 / 3, 0.5, 0.0, 0.8, 0.0, 0.0, 0.0])
    # target as its canonical string; empty vs empty is a perfect answer
    assert detection_reward([perfect], [format_answer(DET_GT)]) == [1.0]
    assert detection_reward([done("[]")], ["[]"]) == [1.0]
    assert detection_reward([done("[]")], [DET_GT]) == [0.0]


def test_detection_giou_reward_climbs_where_f1_is_flat():
    """Boxes walking towards the targets: F1@0.5 stays 0 until they overlap enough, the
    continuous reward rises at every step; the task reward for detection is the latter."""
    steps = [det_json(("tumour", (100 + d, 100 + d, 200 + d, 200 + d)), ("lymphocyte", BOX_B))
             for d in (300, 200, 120, 60)]  # fmt: skip
    comps = [done(c) for c in steps]
    f1 = detection_reward(comps, [DET_GT] * 4, labels=LABELS)
    giou = detection_giou_reward(comps, [DET_GT] * 4, labels=LABELS)
    assert f1 == pytest.approx([0.5] * 4)  # only the lymphocyte box counts, at every step
    assert giou == sorted(giou) and len(set(giou)) == 4 and giou[-1] < 1
    assert detection_giou_reward([done(format_answer(DET_GT)), "junk"], [DET_GT] * 2) == [1.0, 0.0]
    tasks = [Task.DETECTION] * 4
    assert task_reward(comps, tasks, [DET_GT] * 4, labels=LABELS) == pytest.approx(giou)


def test_detection_reward_reuses_metric():
    pred = DetectionAnswer((Detection("tumour", (110, 100, 205, 210)),))
    want = metrics.detection_f1(pred.boxes(), pred.labels(), DET_GT.boxes(), DET_GT.labels())
    assert detection_reward([done(format_answer(pred))], [DET_GT]) == [want]
    assert 0 < want < 1


# ---------------------------------------------------------------------------------------------
# segmentation


def test_segmentation_reward_cases():
    comps = [
        done(format_answer(SEG_GT)),
        done(seg_json("tumour", SQ_SHIFT_HALF)),  # half overlap -> 0.5
        done(seg_json("stroma", SQ)),  # right place, wrong label
        done(seg_json("tumour", ((600, 600), (900, 600), (900, 900)))),  # disjoint
        done('[{"label": "tumour", "polygon": [[0, 0], [1, 1]]}]'),  # too few points
        done("[]"),
    ]
    got = segmentation_reward(comps, [SEG_GT] * len(comps), labels=LABELS)
    assert got == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert segmentation_reward([comps[0]], [format_answer(SEG_GT)]) == [1.0]


# ---------------------------------------------------------------------------------------------
# VQA


def test_vqa_closed_reward():
    comps = [done("no"), done("B"), done("(B)"), done("B. no"), done("A"), done("D"), done("maybe")]
    got = vqa_reward(comps, ["no"] * len(comps), options=OPTIONS)
    assert got == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # a target given as the option letter names its option
    assert vqa_reward([done("no")], ["B"], options=OPTIONS) == [1.0]
    # labels stand in for options, as in parse_answer
    assert vqa_reward([done("B")], [TextAnswer("no")], labels=OPTIONS) == [1.0]


def test_vqa_open_reward():
    comps = [done("Mitotic figures are present."), done("cells sat"), done("nothing alike"), "x"]
    ref = "mitotic figures are present"
    got = vqa_reward(comps, [TextAnswer(ref)] * 4)
    assert got == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert vqa_reward([done("the cat sat")], ["a cat sat down"]) == pytest.approx([0.8])


# ---------------------------------------------------------------------------------------------
# dispatch and registry


def test_task_reward_dispatches_per_sample():
    comps = [
        done("tumour"),
        done(det_json(("tumour", BOX_A))),
        done(seg_json("tumour", SQ_SHIFT_HALF)),
        done("B"),
        done("the cat sat"),
    ]
    tasks = [Task.CLASSIFICATION, 2, Task.SEGMENTATION, Task.VQA, Task.VQA]
    targets = ["tumour", DET_GT, SEG_GT, "no", "a cat sat down"]
    options = [None, None, None, OPTIONS, None]
    got = task_reward(comps, tasks, targets, options=options, unrelated=1)
    # Detection by the continuous matched GIoU: one exact box of two targets scores 1/2.
    assert got == pytest.approx([1.0, 0.5, 0.5, 1.0, 0.8])
    assert got[1] == detection_giou_reward([comps[1]], [DET_GT])[0]


def test_registry_and_bad_inputs():
    assert set(REWARDS) == {
        "format", "classification", "detection", "detection_giou", "segmentation", "vqa", "task"
    }  # fmt: skip
    assert REWARDS["format"] is format_reward
    with pytest.raises(ValueError, match="targets"):
        classification_reward([done("a")], [])
    with pytest.raises(ValueError, match="does not parse"):
        detection_reward([done("[]")], ["not json"])
    with pytest.raises(ValueError):
        task_reward([done("a")], [0], ["a"])  # unspecified task
    with pytest.raises(ValueError, match="labels"):
        classification_reward([done("a")] * 3, ["a"] * 3, labels=[["a"], ["a"]])


# ---------------------------------------------------------------------------------------------
# robustness

FRAGMENTS = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "[",
        "]",
        "{",
        "}",
        ",",
        '"label"',
        ":",
        '"box"',
        '"polygon"',
        '"tumour"',
        "[0, 0]",
        "[1000, 1000]",
        "1e309",
        "NaN",
        "-1",
        "B",
        "yes",
        "```json\n",
        "```",
        " ",
        "\n",
        "[[0,0],[10,0],[0,10]]",
        "[1,2,3,4]",
    ]
)
TEXT = st.one_of(st.text(max_size=300), st.lists(FRAGMENTS, max_size=40).map("".join))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TEXT, min_size=1, max_size=4))
def test_rewards_never_raise_and_stay_in_unit_interval(texts):
    n = len(texts)
    comps = texts + [f"<think>x</think><answer>{t}</answer>" for t in texts]
    m = len(comps)
    tasks = [1 + i % 4 for i in range(m)]
    targets = [["tumour", DET_GT, SEG_GT, "no"][i % 4] for i in range(m)]
    results = [
        format_reward(comps),
        classification_reward(comps, ["tumour"] * m, labels=LABELS),
        classification_reward(comps, ["tumour"] * m),
        detection_reward(comps, [DET_GT] * m),
        segmentation_reward(comps, [SEG_GT] * m, labels=LABELS),
        vqa_reward(comps, ["no"] * m, options=OPTIONS),
        vqa_reward(comps, ["mitotic figures"] * m),
        task_reward(comps, tasks, targets, labels=LABELS),
    ]
    for r in results:
        assert len(r) == m == 2 * n
        assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in r)
