"""Per-task evaluation of completions, the constant ("chance") baseline, and greedy prediction.

Everything scores with ``smartpath.training.metrics`` and parses with ``smartpath.model.grammar``
exactly as the GRPO rewards (``smartpath.training.rewards``) do, so evaluation and reward cannot
drift apart. Design decisions:

- **Grouping**: metrics are computed per ``task_scale_key(task, scale)`` (``"classification/roi"``,
  ``"vqa/wsi"``, …), the same key the expert assignment uses. Each group reports ``n``,
  ``format_rate`` (share of completions that are exactly ``<think>…</think><answer>…</answer>``,
  i.e. the mean format reward) and ``parse_rate`` (share whose answer block parses for the task
  under the sample's ``labels``/``options``, whether or not the completion is well formed).
- **Unparseable answers are wrong**: they score 0 on every per-sample metric, like the rewards.
- **classification**: ``accuracy``; ``macro_f1`` over the union of the samples' label lists,
  their targets and the parsed predictions (an unparseable answer is a miss of the true label
  and a false positive of no label).
- **detection**: ``f1@0.5`` is the **mean per-image** F1 of greedy same-label matching at IoU 0.5
  (an image with no ground truth and no prediction scores 1; unparseable scores 0), i.e. the mean
  detection reward; ``f1@0.5_micro`` pools TP/FP/FN over images (unparseable = no boxes);
  ``map@0.5`` is ``metrics.mean_average_precision`` with the output order as the rank
  (unparseable = no boxes; omitted when no image has ground truth).
- **segmentation**: ``dice`` and ``iou`` are label-aware (``metrics.dice``/``mask_iou``, 512²
  raster) **means per image**; target and prediction both empty scores 1, unparseable 0.
- **vqa**: a sample is closed when it has ``options`` (or, failing those, ``labels``: the parser
  then treats them as the options), else open. ``em`` is exact match over all samples (closed:
  the chosen option vs the target option, by text or letter); ``em_closed`` over closed ones;
  ``f1_open`` token F1 over open ones; ``f1`` token F1 over all. ``em_closed``/``f1_open`` are
  omitted when there are no such samples.
- **score** (the headline, used for "above chance" and stage comparisons) is the mean per-sample
  reward of the task's metric: classification ``accuracy``, detection ``f1@0.5`` (the
  ``detection`` reward; GRPO's task reward for detection is the continuous GIoU score instead),
  segmentation ``dice``, VQA the
  mean of exact match on closed samples and token F1 on open ones (so it equals ``em_closed`` on
  an all-closed set and ``f1_open`` on an all-open one). ``score_se`` is its standard error
  (sample std / √n; 0 for n = 1). ``HEADLINE`` names the metric per task.
- **Constant baseline** (the chance level): per key, each of up to ``max_candidates`` distinct
  train targets (the most frequent always, the rest a seeded choice), plus the empty answer
  ``[]`` for detection/segmentation, is predicted for every eval sample; the candidate with the
  best ``score`` (first in candidate order on ties: ``[]``, then by train frequency) is kept.
  Picking the best constant *on the eval set* makes this an optimistic chance level (for
  classification it is at least the eval majority-class accuracy among labels seen in train).
  Without train samples for a key, the eval samples' allowed ``labels``/``options`` (part of the
  prompt, not the answer) are the candidates; a key with no candidate at all (open VQA without
  train data) has no baseline. VQA mixes closed and open questions, and one constant text for
  both is a weak chance level, so its baseline answers each closed question with its option
  most often right in train (a majority answer per option set, e.g. "no" for presence
  questions) and every open one with the best constant on the open ones.
- **predict** is greedy (temperature 0) and stops at ``<|im_end|>``; items are sorted by prompt
  token length before batching (less left padding), which encodes each prompt once more to
  measure it, and predictions come back in input order. Completions are decoded with special
  tokens kept (the grammar tags are plain text anyway) minus the trailing ``<|im_end|>``/pad.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from smartpath.model.grammar import (
    Answer,
    DetectionAnswer,
    LabelAnswer,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    format_completion,
    label_key,
    parse_answer,
    parse_option,
    split_completion,
    task_scale_key,
)
from smartpath.model.tokenizer import IM_END
from smartpath.training import metrics
from smartpath.training.manifest import (
    RoiSample,
    WsiSample,
    parse_target,
    sample_constraint,
    sample_task,
)

if TYPE_CHECKING:
    from PIL import Image

    from smartpath.model.mllm import SlideInput, SmartPathModel
    from smartpath.training.collate import Collator

__all__ = [
    "EMPTY_ANSWER",
    "HEADLINE",
    "Prediction",
    "constant_baseline",
    "paired_difference",
    "predict",
    "sample_key",
    "score_prediction",
    "task_metrics",
]

Sample = RoiSample | WsiSample

HEADLINE: dict[str, str] = {
    "classification": "accuracy",
    "detection": "f1@0.5",
    "segmentation": "dice",
    "vqa": "em/f1",
}
"""The metric ``score`` stands for, by task name (VQA: EM on closed, token F1 on open)."""

EMPTY_ANSWER = "[]"
"""The "nothing here" answer of detection and segmentation."""

_MISS = "\x00<unparseable>"  # a classification prediction no label can equal


@dataclass
class Prediction:
    """One evaluated sample and the model's raw completion text."""

    sample: Sample
    completion: str


def sample_key(sample: Sample) -> str:
    """The sample's ``task/scale`` key, e.g. ``"detection/roi"``."""
    return task_scale_key(sample.task, sample.scale)


# ---------------------------------------------------------------------------------------------
# Per-sample parsing (cached: a constant completion parses once per label/option set)


def _tuple(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


@lru_cache(maxsize=4096)
def _parse_cached(
    task: Task, completion: str, labels: tuple[str, ...] | None, options: tuple[str, ...] | None
) -> Answer:
    return parse_answer(task, completion, labels, options=options)


def _parse(task: Task, sample: Sample, completion: str) -> Answer:
    labels, options = _tuple(sample.labels), _tuple(sample.options)
    if len(completion) <= 4096:
        return _parse_cached(task, completion, labels, options)
    return parse_answer(task, completion, labels, options=options)


@lru_cache(maxsize=16)  # a constant answer's masks; each is resolution² bytes per label
def _masks_cached(answer: SegmentationAnswer) -> dict[str, np.ndarray]:
    return metrics.rasterize(answer)


def _masks(answer: SegmentationAnswer) -> dict[str, np.ndarray]:
    return _masks_cached(answer) if len(answer.polygons) <= 64 else metrics.rasterize(answer)


def _dice(pred: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> float:
    """Label-aware pooled Dice of rasterised masks (as ``metrics.dice``; 1.0 if both empty)."""
    inter = sum(int(np.count_nonzero(m & gt[k])) for k, m in pred.items() if k in gt)
    p = sum(int(np.count_nonzero(m)) for m in pred.values())
    g = sum(int(np.count_nonzero(m)) for m in gt.values())
    return 1.0 if p + g == 0 else 2.0 * inter / (p + g)


def _closed_choices(sample: Sample) -> list[str] | None:
    return sample.options if sample.options is not None else sample.labels


def _vqa_ref(sample: Sample, target: Answer) -> str:
    ref = target.text if isinstance(target, TextAnswer) else sample.target
    choices = _closed_choices(sample)
    if choices:
        as_option = parse_option(ref, choices)  # a target given as a letter names its option
        if isinstance(as_option, TextAnswer):
            return as_option.text
    return ref


# ---------------------------------------------------------------------------------------------
# Metrics of one task/scale group


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _se(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _group_metrics(
    task: Task,
    samples: Sequence[Sample],
    completions: Sequence[str],
    targets: Sequence[Answer],
    gt_masks: list[dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, float], list[float]]:
    """(metrics, per-sample headline scores) of samples sharing one task (``targets`` are their
    parsed targets)."""
    n = len(samples)
    answers = [_parse(task, s, c) for s, c in zip(samples, completions, strict=True)]
    out: dict[str, float] = {
        "n": float(n),
        "format_rate": _mean([float(split_completion(c).well_formed) for c in completions]),
        "parse_rate": _mean([float(not isinstance(a, Unparseable)) for a in answers]),
    }
    per: list[float]  # the per-sample headline score (= the task reward)
    if task is Task.CLASSIFICATION:
        y_true = [t.label for t in targets if isinstance(t, LabelAnswer)]
        y_pred = [a.label if isinstance(a, LabelAnswer) else _MISS for a in answers]
        allowed = [lab for s in samples for lab in (s.labels or ())]
        parsed = [p for p in y_pred if p != _MISS]
        labels = list(dict.fromkeys([*allowed, *y_true, *parsed]))
        per = [float(metrics.exact_match(t, p)) for t, p in zip(y_true, y_pred, strict=True)]
        out["accuracy"] = _mean(per)
        out["macro_f1"] = metrics.macro_f1(y_true, y_pred, labels=labels)
    elif task is Task.DETECTION:
        per, tp, fp, fn = [], 0, 0, 0
        pred_boxes, pred_labels, gt_boxes, gt_labels = [], [], [], []
        for a, t in zip(answers, targets, strict=True):
            assert isinstance(t, DetectionAnswer)
            pa = a if isinstance(a, DetectionAnswer) else DetectionAnswer(())
            counts = metrics.match_detections(pa.boxes(), pa.labels(), t.boxes(), t.labels())
            per.append(metrics.f1_from_counts(*counts) if isinstance(a, DetectionAnswer) else 0.0)
            tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
            pred_boxes.append(pa.boxes())
            pred_labels.append(pa.labels())
            gt_boxes.append(t.boxes())
            gt_labels.append(t.labels())
        out["f1@0.5"] = _mean(per)
        out["f1@0.5_micro"] = metrics.f1_from_counts(tp, fp, fn)
        m_ap = metrics.mean_average_precision(pred_boxes, pred_labels, gt_boxes, gt_labels)
        if math.isfinite(m_ap):
            out["map@0.5"] = m_ap
    elif task is Task.SEGMENTATION:
        if gt_masks is None:
            gt_masks = [metrics.rasterize(t) for t in targets]  # type: ignore[arg-type]
        per = [
            _dice(_masks(a), g) if isinstance(a, SegmentationAnswer) else 0.0
            for a, g in zip(answers, gt_masks, strict=True)
        ]
        out["dice"] = _mean(per)
        out["iou"] = _mean([d / (2.0 - d) for d in per])  # IoU = D / (2 - D), per image
    else:
        em, f1, closed = [], [], []
        for s, a, t in zip(samples, answers, targets, strict=True):
            ref = _vqa_ref(s, t)
            ok = isinstance(a, TextAnswer)
            em.append(float(ok and metrics.exact_match(a.text, ref)))
            f1.append(metrics.token_f1(a.text, ref) if ok else 0.0)
            closed.append(bool(_closed_choices(s)))
        per = [e if c else f for e, f, c in zip(em, f1, closed, strict=True)]
        out["em"] = _mean(em)
        out["f1"] = _mean(f1)
        if any(closed):
            out["em_closed"] = _mean([e for e, c in zip(em, closed, strict=True) if c])
        if not all(closed):
            out["f1_open"] = _mean([f for f, c in zip(f1, closed, strict=True) if not c])
    out["score"] = _mean(per)
    out["score_se"] = _se(per)
    return out, per


def _group(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(sample_key(s), []).append(s)
    return dict(sorted(groups.items()))


def _scored(predictions: Iterable[Prediction]) -> dict[str, tuple[dict[str, float], list[float]]]:
    """(metrics, per-sample headline scores in input order) per ``task/scale`` key."""
    by_key: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_key.setdefault(sample_key(p.sample), []).append(p)
    out = {}
    for key, preds in sorted(by_key.items()):
        samples = [p.sample for p in preds]
        targets = [parse_target(s) for s in samples]
        task = sample_task(samples[0])
        out[key] = _group_metrics(task, samples, [p.completion for p in preds], targets)
    return out


def task_metrics(predictions: Iterable[Prediction]) -> dict[str, dict[str, float]]:
    """Metrics per ``task/scale`` key (see the module docstring for the definitions)."""
    return {key: metrics for key, (metrics, _) in _scored(predictions).items()}


def paired_difference(
    before: Sequence[Prediction], after: Sequence[Prediction]
) -> dict[str, dict[str, float]]:
    """Per ``task/scale`` key, how much ``after`` beats ``before`` on the same samples: the mean
    per-sample headline difference (``delta``), its standard error (``se``, of the paired
    differences: tighter than the unpaired bound when both answer alike) and ``n``."""
    if [p.sample.id for p in before] != [p.sample.id for p in after]:
        raise ValueError("paired_difference needs predictions of the same samples, in order")
    a, b = _scored(before), _scored(after)
    out = {}
    for key, (_, scores) in a.items():
        diff = np.asarray(b[key][1]) - np.asarray(scores)
        out[key] = {"delta": _mean(diff), "se": _se(diff), "n": float(len(diff))}
    return out


def score_prediction(prediction: Prediction) -> float:
    """The per-sample headline score (the task reward) of one prediction."""
    return task_metrics([prediction])[sample_key(prediction.sample)]["score"]


# ---------------------------------------------------------------------------------------------
# Constant baseline


def _candidates(
    task: Task,
    key: str,
    train: Sequence[Sample],
    evals: Sequence[Sample],
    max_candidates: int,
    seed: int,
) -> list[str]:
    counts = Counter(s.target for s in train)
    ranked = sorted(counts, key=lambda t: -counts[t])  # stable: first seen first on ties
    if not ranked:  # no train data: the choices the prompt itself offers
        ranked = list(dict.fromkeys(c for s in evals for c in (_closed_choices(s) or ())))
    if len(ranked) > max_candidates:
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        rest = rng.choice(len(ranked) - 1, size=max_candidates - 1, replace=False) + 1
        ranked = [ranked[0]] + [ranked[i] for i in sorted(rest.tolist())]
    if task in (Task.DETECTION, Task.SEGMENTATION):
        ranked = [EMPTY_ANSWER] + [c for c in ranked if c != EMPTY_ANSWER]
    return ranked


def constant_baseline(
    train: Iterable[Sample],
    eval_samples: Iterable[Sample],
    max_candidates: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Best constant answer per ``task/scale`` key, scored on ``eval_samples``.

    Each key maps to the ``task_metrics`` entry of that constant plus ``"constant"`` (its answer
    text) and ``"candidates"`` (how many constants were tried). Keys without any candidate are
    left out.
    """
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    train_by = _group(train)
    out: dict[str, dict[str, Any]] = {}
    for key, samples in _group(eval_samples).items():
        task = sample_task(samples[0])
        if task is Task.VQA:
            vqa = _vqa_baseline(key, train_by.get(key, []), samples, max_candidates, seed)
            if vqa is not None:
                out[key] = vqa
            continue
        cands = _candidates(task, key, train_by.get(key, []), samples, max_candidates, seed)
        if not cands:
            continue
        targets = [parse_target(s) for s in samples]
        gt_masks = (
            [metrics.rasterize(t) for t in targets]  # type: ignore[arg-type]
            if task is Task.SEGMENTATION
            else None
        )
        best: tuple[dict[str, float], str] | None = None
        for cand in cands:
            completion = format_completion("", cand)
            m, _ = _group_metrics(task, samples, [completion] * len(samples), targets, gt_masks)
            if best is None or m["score"] > best[0]["score"]:
                best = (m, cand)
        assert best is not None
        out[key] = {**best[0], "constant": best[1], "candidates": float(len(cands))}
    return out


def _vqa_baseline(
    key: str, train: Sequence[Sample], evals: Sequence[Sample], max_candidates: int, seed: int
) -> dict[str, Any] | None:
    """Closed questions answered with their option most often right in train (the first on
    ties or without train data), open ones with the best constant text on the open ones."""
    closed = [bool(_closed_choices(s)) for s in evals]
    right = Counter(label_key(_vqa_ref(s, parse_target(s))) for s in train if _closed_choices(s))
    open_train = [s for s in train if not _closed_choices(s)]
    open_evals = [s for s, c in zip(evals, closed, strict=True) if not c]
    best_open, cands = "", []
    if open_evals:
        cands = _candidates(Task.VQA, key, open_train, open_evals, max_candidates, seed)
        if not cands:
            return None  # open questions and nothing to answer them with
        targets = [parse_target(s) for s in open_evals]

        def open_score(cand: str) -> float:
            completions = [format_completion("", cand)] * len(open_evals)
            return _group_metrics(Task.VQA, open_evals, completions, targets)[0]["score"]

        best_open = max(cands, key=open_score)  # first on ties
    answers = [
        max(_closed_choices(s), key=lambda o: right[label_key(o)]) if c else best_open
        for s, c in zip(evals, closed, strict=True)
    ]
    targets = [parse_target(s) for s in evals]
    m, _ = _group_metrics(Task.VQA, evals, [format_completion("", a) for a in answers], targets)
    constant = best_open
    if any(closed):
        constant = "closed: the option most often right in train"
        constant += f"; open: {best_open}" if open_evals else ""
    return {**m, "constant": constant, "candidates": float(len(cands))}


# ---------------------------------------------------------------------------------------------
# Greedy prediction


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _to_device(getattr(value, f.name), device) for f in fields(value)}
        return replace(value, **changes)
    return value


def predict(
    model: SmartPathModel,
    collator: Collator,
    items: Sequence[tuple[Sample, np.ndarray | Image.Image | SlideInput]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: bool = False,
    constrained: bool = True,
) -> list[Prediction]:
    """Greedy completions for ``(sample, image or SlideInput)`` pairs, in input order, each
    within its sample's answer grammar unless ``constrained`` is False.

    ``model`` is a :class:`~smartpath.model.mllm.SmartPathModel`, ``collator`` a
    :class:`~smartpath.training.collate.Collator`. The model is put in eval mode for the call
    (and restored after).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = list(items)
    if not items:
        return []
    tokenizer = model.tokenizer
    eos = int(tokenizer.convert_tokens_to_ids(IM_END))
    strip = {eos} | ({int(tokenizer.pad_token_id)} if tokenizer.pad_token_id is not None else set())
    device = next(model.parameters()).device
    lengths = [len(collator.encode_prompt(s, v)[0]) for s, v in items]
    order = sorted(range(len(items)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="predict", unit="batch")
    completions: list[str] = [""] * len(items)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in batches:
                batch = _to_device(collator.prompts([items[i] for i in idx]), device)
                outputs = model.generate(
                    batch,
                    max_new_tokens=max_new_tokens,
                    temperature=0.0,
                    eos_token_id=eos,
                    constraints=[sample_constraint(items[i][0], max_new_tokens) for i in idx]
                    if constrained
                    else None,
                )
                for i, ids in zip(idx, outputs, strict=True):
                    ids = list(ids)
                    while ids and ids[-1] in strip:
                        ids.pop()
                    completions[i] = tokenizer.decode(ids, skip_special_tokens=False)
    finally:
        model.train(was_training)
    return [Prediction(s, c) for (s, _), c in zip(items, completions, strict=True)]
