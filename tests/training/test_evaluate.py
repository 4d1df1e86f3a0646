"""Per-task evaluation: hand-built predictions with known metrics, constant baseline, predict."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch

from smartpath.model.grammar import Task
from smartpath.model.tokenizer import IM_END
from smartpath.training import metrics
from smartpath.training.evaluate import (
    EMPTY_ANSWER,
    Prediction,
    constant_baseline,
    paired_difference,
    predict,
    sample_key,
    score_prediction,
    task_metrics,
)
from smartpath.training.manifest import RoiSample, WsiSample, sample_task
from smartpath.training.rewards import detection_reward, task_reward

CLASSES = ["tumour", "stroma", "necrosis"]
NUCLEI = ["tumour nucleus", "lymphocyte"]


def roi(i: str, task: str, target: str, **kw: Any) -> RoiSample:
    return RoiSample(id=i, image=f"{i}.png", task=task, target=target, split="test", **kw)


def ok(answer: str) -> str:
    return f"<think>because</think><answer>{answer}</answer>"


def boxes(*items: tuple[str, tuple[float, float, float, float]]) -> str:
    return json.dumps([{"label": lab, "box": list(b)} for lab, b in items])


def polys(*items: tuple[str, list[tuple[float, float]]]) -> str:
    return json.dumps([{"label": lab, "polygon": [list(p) for p in pts]} for lab, pts in items])


SQUARE = [(0, 0), (500, 0), (500, 500), (0, 500)]
HALF = [(0, 0), (500, 0), (500, 250), (0, 250)]
A, B, C = (100, 100, 200, 200), (300, 300, 400, 400), (500, 500, 600, 600)


def classification_preds() -> list[Prediction]:
    mk = lambda i, t: roi(i, "classification", t, labels=CLASSES)  # noqa: E731
    return [
        Prediction(mk("c1", "tumour"), ok("tumour")),  # right
        Prediction(mk("c2", "tumour"), ok("stroma")),  # wrong
        Prediction(mk("c3", "stroma"), "<answer>stroma</answer>"),  # right, not well formed
        Prediction(mk("c4", "necrosis"), "necrosis"),  # no answer block: unparseable
    ]


def detection_preds() -> list[Prediction]:
    mk = lambda i, t: roi(i, "detection", t, labels=NUCLEI)  # noqa: E731
    gt1 = boxes(("tumour nucleus", A), ("lymphocyte", B))
    pred1 = boxes(("tumour nucleus", A), ("lymphocyte", (700, 700, 800, 800)))  # 1 TP, 1 FP, 1 FN
    return [
        Prediction(mk("d1", gt1), ok(pred1)),
        Prediction(mk("d2", EMPTY_ANSWER), ok(EMPTY_ANSWER)),  # nothing to find, nothing found
        Prediction(mk("d3", boxes(("tumour nucleus", C))), ok('[{"label": "x", "box": [1, 2]}]')),
    ]


def segmentation_preds() -> list[Prediction]:
    mk = lambda i, t: roi(i, "segmentation", t)  # noqa: E731
    gt = polys(("gland", SQUARE))
    return [
        Prediction(mk("s1", gt), ok(polys(("gland", SQUARE)))),  # dice 1, iou 1
        Prediction(mk("s2", gt), ok(polys(("gland", HALF)))),  # dice 2/3, iou 1/2
        Prediction(mk("s3", EMPTY_ANSWER), ok(EMPTY_ANSWER)),  # both empty: 1, 1
        Prediction(mk("s4", gt), ok("not json")),  # unparseable: 0, 0
    ]


def vqa_preds() -> list[Prediction]:
    yn = ["yes", "no"]
    cells = ["large round cells", "small round cells"]
    return [
        Prediction(roi("v1", "vqa", "yes", prompt="Tumour?", options=yn), ok("Yes.")),
        Prediction(roi("v2", "vqa", "B", prompt="Cells?", options=cells), ok("A")),  # wrong
        Prediction(roi("v3", "vqa", "no", prompt="Necrosis?", options=yn), ok("maybe")),
        Prediction(
            roi("v4", "vqa", "dense lymphoid infiltrate", prompt="Describe."),
            ok("a dense lymphoid infiltrate"),
        ),  # EM 0 (the article), token F1 1
        Prediction(
            roi("v5", "vqa", "wavy pink collagen fibres", prompt="Describe."), ok("pink fibres")
        ),  # token F1 2/3
    ]


def wsi_pred() -> Prediction:
    s = WsiSample(
        id="w1", features="w1.npz", task="classification", target="tumour", labels=CLASSES
    )
    return Prediction(s, ok("tumour"))


@pytest.fixture(scope="module")
def all_metrics() -> dict[str, dict[str, float]]:
    preds = (
        classification_preds()
        + detection_preds()
        + segmentation_preds()
        + vqa_preds()
        + [wsi_pred()]
    )
    return task_metrics(preds)


def test_keys_are_task_and_scale(all_metrics) -> None:
    assert list(all_metrics) == [
        "classification/roi",
        "classification/wsi",
        "detection/roi",
        "segmentation/roi",
        "vqa/roi",
    ]
    assert all_metrics["classification/wsi"]["n"] == 1
    assert all_metrics["classification/wsi"]["accuracy"] == 1.0
    assert all_metrics["classification/wsi"]["score_se"] == 0.0


def test_classification(all_metrics) -> None:
    m = all_metrics["classification/roi"]
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.5)
    # tumour: tp1 fn1 -> 2/3; stroma: tp1 fp1 -> 2/3; necrosis: fn1 -> 0
    assert m["macro_f1"] == pytest.approx(4 / 9)
    assert m["format_rate"] == pytest.approx(0.5)
    assert m["parse_rate"] == pytest.approx(0.75)
    assert m["score"] == m["accuracy"]
    assert m["score_se"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)


def test_detection(all_metrics) -> None:
    m = all_metrics["detection/roi"]
    assert m["f1@0.5"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # mean per image
    assert m["f1@0.5_micro"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))  # tp1 fp1 fn2
    # tumour nucleus: 1 of 2 GT found at precision 1 -> AP 0.5; lymphocyte: AP 0
    assert m["map@0.5"] == pytest.approx(0.25)
    assert m["parse_rate"] == pytest.approx(2 / 3)
    assert m["format_rate"] == 1.0
    assert m["score"] == m["f1@0.5"]


def test_segmentation(all_metrics) -> None:
    m = all_metrics["segmentation/roi"]
    assert m["dice"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert m["iou"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert m["score"] == m["dice"]
    # the per-image values agree with the metrics module's own dice / mask IoU
    p = segmentation_preds()[1]
    from smartpath.model.grammar import parse_polygons

    pred, gt = parse_polygons(polys(("gland", HALF))), parse_polygons(p.sample.target)
    assert task_metrics([p])["segmentation/roi"]["dice"] == pytest.approx(metrics.dice(pred, gt))
    assert task_metrics([p])["segmentation/roi"]["iou"] == pytest.approx(metrics.mask_iou(pred, gt))


def test_vqa(all_metrics) -> None:
    m = all_metrics["vqa/roi"]
    assert m["em"] == pytest.approx(1 / 5)
    assert m["em_closed"] == pytest.approx(1 / 3)
    assert m["f1_open"] == pytest.approx((1 + 2 / 3) / 2)
    # v1 1, v2 "large round cells" vs "small round cells" 2/3, v3 0, v4 1, v5 2/3
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0 + 1 + 2 / 3) / 5)
    assert m["score"] == pytest.approx((1 + 0 + 0 + 1 + 2 / 3) / 5)  # EM closed, F1 open
    only_open = task_metrics(vqa_preds()[3:])["vqa/roi"]
    assert "em_closed" not in only_open and only_open["score"] == only_open["f1_open"]


def test_score_is_the_mean_metric_reward(all_metrics) -> None:
    """The headline score is the mean per-sample reward of the task's metric: the task reward,
    except for detection, whose metric is the ``detection`` reward (F1@0.5) while GRPO's task
    reward is the continuous GIoU score."""
    groups = {
        "classification/roi": classification_preds(),
        "detection/roi": detection_preds(),
        "segmentation/roi": segmentation_preds(),
        "vqa/roi": vqa_preds(),
    }
    for key, preds in groups.items():
        completions = [p.completion for p in preds]
        targets = [p.sample.target for p in preds]
        labels = [p.sample.labels for p in preds]
        if key == "detection/roi":
            rewards = detection_reward(completions, targets, labels=labels)
            giou = task_reward(completions, [Task.DETECTION] * len(preds), targets, labels=labels)
            assert giou != pytest.approx(rewards)  # the two really differ on these predictions
        else:
            rewards = task_reward(
                completions,
                tasks=[sample_task(p.sample) for p in preds],
                targets=targets,
                labels=labels,
                options=[p.sample.options for p in preds],
            )
        assert all_metrics[key]["score"] == pytest.approx(float(np.mean(rewards))), key
        assert [score_prediction(p) for p in preds] == pytest.approx(rewards), key


def test_paired_difference_is_the_mean_per_sample_gain_with_its_se() -> None:
    before = classification_preds() + segmentation_preds()
    after = [Prediction(p.sample, ok(p.sample.target)) for p in before]  # every answer right
    paired = paired_difference(before, after)
    for key in ("classification/roi", "segmentation/roi"):
        group = [p for p in before if sample_key(p.sample) == key]
        gains = [1.0 - score_prediction(p) for p in group]
        assert paired[key]["n"] == len(group)
        assert paired[key]["delta"] == pytest.approx(float(np.mean(gains)))
        assert paired[key]["se"] == pytest.approx(np.std(gains, ddof=1) / math.sqrt(len(gains)))
    assert paired_difference(before, before)["segmentation/roi"] == {
        "delta": 0.0, "se": 0.0, "n": float(len(segmentation_preds()))
    }  # fmt: skip
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(before, after[::-1])


def test_perfect_predictions_score_one() -> None:
    preds = [
        Prediction(p.sample, ok(p.sample.target))
        for p in classification_preds() + detection_preds() + segmentation_preds() + vqa_preds()
    ]
    for key, m in task_metrics(preds).items():
        assert m["score"] == pytest.approx(1.0), key
        assert m["format_rate"] == 1.0 and m["parse_rate"] == 1.0
    assert task_metrics([]) == {}


# ---------------------------------------------------------------------------------------------
# Constant baseline


def cls(i: str, target: str, split: str = "train") -> RoiSample:
    return roi(i, "classification", target, labels=CLASSES).model_copy(update={"split": split})


def test_baseline_is_the_best_constant_not_the_train_majority() -> None:
    train = [cls(f"t{i}", t) for i, t in enumerate(["tumour"] * 3 + ["stroma"] * 2 + ["necrosis"])]
    evals = [cls(f"e{i}", t, "test") for i, t in enumerate(["tumour"] + ["stroma"] * 3)]
    base = constant_baseline(train, evals)
    m = base["classification/roi"]
    assert m["constant"] == "stroma"  # the eval majority class, although train's is tumour
    assert m["accuracy"] == pytest.approx(0.75) and m["score"] == m["accuracy"]
    assert m["macro_f1"] == pytest.approx((6 / 7 + 0) / 2)  # necrosis: no tp/fp/fn, skipped
    assert m["candidates"] == 3
    assert m["format_rate"] == 1.0


def test_baseline_empty_answer_and_fallbacks() -> None:
    det = lambda i, t, s: roi(i, "detection", t, labels=NUCLEI).model_copy(  # noqa: E731
        update={"split": s}
    )
    train = [det("t1", boxes(("lymphocyte", B)), "train")] * 2
    evals = [
        det("e1", EMPTY_ANSWER, "test"),
        det("e2", EMPTY_ANSWER, "test"),
        det("e3", boxes(("tumour nucleus", A)), "test"),
    ]
    m = constant_baseline(train, evals)["detection/roi"]
    assert m["constant"] == EMPTY_ANSWER
    assert m["score"] == pytest.approx(2 / 3)
    assert m["candidates"] == 2
    # no train data: classification falls back to the prompt's labels; open VQA has none
    evals2 = [cls("e1", "necrosis", "test"), roi("v1", "vqa", "pink", prompt="Colour?")]
    base = constant_baseline([], evals2)
    assert base["classification/roi"]["constant"] == "necrosis"
    assert base["classification/roi"]["candidates"] == len(CLASSES)
    assert "vqa/roi" not in base


def test_vqa_baseline_answers_closed_and_open_questions_apart() -> None:
    """Closed questions get their option most often right in train, open ones the best
    constant text: stronger than any one constant for all of them."""
    yes_no, bins = ["yes", "no"], ["0-20", "21-60", "over 60"]
    q = lambda i, t, opts, split: roi(i, "vqa", t, prompt="Q?", options=opts).model_copy(  # noqa: E731
        update={"split": split}
    )
    train = [q(f"p{i}", t, yes_no, "train") for i, t in enumerate(["no"] * 5 + ["yes"] * 2)]
    train += [q(f"c{i}", t, bins, "train") for i, t in enumerate(["21-60"] * 4 + ["0-20"])]
    train += [roi(f"o{i}", "vqa", "crowded glands", prompt="Describe?") for i in range(3)]
    evals = [q(f"e{i}", t, yes_no, "test") for i, t in enumerate(["no", "no", "yes"])]
    evals += [q(f"f{i}", t, bins, "test") for i, t in enumerate(["21-60", "21-60", "over 60"])]
    evals += [
        roi("g1", "vqa", "crowded glands", prompt="Describe?").model_copy(update={"split": "test"})
    ]
    m = constant_baseline(train, evals)["vqa/roi"]
    assert m["em_closed"] == pytest.approx(4 / 6) and m["f1_open"] == pytest.approx(1.0)
    assert m["score"] == pytest.approx((4 + 1) / 7)
    assert m["constant"] == "closed: the option most often right in train; open: crowded glands"
    single = max(
        task_metrics([Prediction(s, ok(c)) for s in evals])["vqa/roi"]["score"]
        for c in ("no", "yes", "21-60", "0-20", "over 60", "crowded glands")
    )
    assert single <= 3 / 7 < m["score"]


def test_baseline_caps_candidates_deterministically() -> None:
    targets = ["common"] * 5 + [f"answer {i}" for i in range(20)]
    train = [roi(f"t{i}", "vqa", t, prompt="Q?") for i, t in enumerate(targets)]
    evals = [roi("e1", "vqa", "answer 7 words", prompt="Q?")]
    a = constant_baseline(train, evals, max_candidates=4, seed=3)["vqa/roi"]
    b = constant_baseline(train, evals, max_candidates=4, seed=3)["vqa/roi"]
    assert a == b and a["candidates"] == 4
    full = constant_baseline(train, evals, max_candidates=64)["vqa/roi"]
    assert full["candidates"] == 21
    assert full["constant"] == "answer 7"  # token F1 2·(2/2·2/3)/(1+2/3) = 0.8 beats the rest
    assert full["score"] == pytest.approx(0.8)
    assert a["score"] <= full["score"]
    with pytest.raises(ValueError):
        constant_baseline(train, evals, max_candidates=0)


# ---------------------------------------------------------------------------------------------
# predict


class _StubModel(torch.nn.Module):
    """Answers each request with a fixed completion that names its prompt length."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict[str, Any]] = []

    def generate(self, batch: Any, **kwargs: Any) -> list[list[int]]:
        lengths = batch.attention_mask.sum(1).tolist()
        self.calls.append({"rows": batch.input_ids.shape[0], "lengths": lengths, **kwargs})
        eos = self.tokenizer.convert_tokens_to_ids(IM_END)
        return [
            self.tokenizer(ok(f"len {n}"), add_special_tokens=False)["input_ids"] + [eos]
            for n in lengths
        ]


@pytest.fixture(scope="module")
def tiny():
    from smartpath.core.config.model import ModelConfig
    from smartpath.model.base import base_from_config
    from smartpath.model.mllm import SmartPathModel
    from smartpath.model.vision import make_image_processor
    from smartpath.training.collate import Collator
    from smartpath.training.synthetic.roi import make_roi_sample

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny")
    base, tokenizer = base_from_config(cfg)
    model = SmartPathModel(cfg, base, tokenizer).eval()
    collator = Collator(make_image_processor(cfg.vision, max_pixels=112 * 112), tokenizer)
    items = []
    for i, (task, size) in enumerate(
        [(Task.VQA, 224), (Task.CLASSIFICATION, 224), (Task.VQA, 256)]
    ):
        syn = make_roi_sample(task, seed=0, index=i, size=size)
        sample = RoiSample(
            id=f"r{i}",
            image="x.png",
            task=task.name.lower(),
            prompt=syn.prompt if i != 1 else "Classify.",  # a short prompt sorts first
            labels=list(syn.labels) if syn.labels else None,
            options=list(syn.options) if syn.options else None,
            target=syn.target_text,
            split="test",
        )
        items.append((sample, syn.image))
    return model, collator, items


def test_predict_orders_batches_by_length_and_returns_input_order(tiny) -> None:
    model, collator, items = tiny
    stub = _StubModel(model.tokenizer)
    lengths = [len(collator.encode_prompt(s, v)[0]) for s, v in items]
    assert len(set(lengths)) == len(lengths)
    preds = predict(stub, collator, items, batch_size=2, max_new_tokens=7)
    assert [p.sample.id for p in preds] == [s.id for s, _ in items]
    # each completion is its own item's (prompt length), without the trailing <|im_end|>
    assert [p.completion for p in preds] == [ok(f"len {n}") for n in lengths]
    assert [c["rows"] for c in stub.calls] == [2, 1]
    assert all(c["max_new_tokens"] == 7 and c["temperature"] == 0.0 for c in stub.calls)
    assert stub.calls[0]["eos_token_id"] == model.tokenizer.convert_tokens_to_ids(IM_END)
    # sorted by prompt length: the two shortest prompts share the first batch
    assert sorted(stub.calls[0]["lengths"]) == sorted(lengths)[:2]
    assert stub.calls[1]["lengths"] == [max(lengths)]
    assert predict(stub, collator, [], batch_size=2) == []
    with pytest.raises(ValueError):
        predict(stub, collator, items, batch_size=0)


def test_predict_with_the_tiny_model(tiny) -> None:
    model, collator, items = tiny
    seen: list[list[int]] = []
    generate = model.generate

    def spy(batch, **kwargs):
        out = generate(batch, **kwargs)
        seen.extend(out)
        return out

    model.train()
    model.generate = spy
    try:
        preds = predict(model, collator, items, batch_size=2, max_new_tokens=5)
    finally:
        del model.generate
    assert model.training  # restored
    model.eval()
    assert len(preds) == len(items)
    assert [p.sample for p in preds] == [s for s, _ in items]
    assert all(isinstance(p.completion, str) for p in preds)
    assert len(seen) == len(items) and all(1 <= len(ids) <= 5 for ids in seen)
    metrics_ = task_metrics(preds)  # garbage completions still evaluate (as wrong)
    assert set(metrics_) == {"classification/roi", "vqa/roi"}
    assert all(0.0 <= m["score"] <= 1.0 and not math.isnan(m["score"]) for m in metrics_.values())
