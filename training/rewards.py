"""SmartPath-R1's task-aware GRPO rewards: plain, keyword-tolerant callables over completions.

Each reward has trl's shape, ``reward(completions, **kwargs) -> list[float]`` (one float in
[0, 1] per completion; extra dataset columns and trl's own keywords such as ``prompts`` are
accepted and ignored), and scores with the evaluation metric in ``smartpath.training.metrics``
so reward and evaluation cannot drift apart. Design decisions:

- **Completions** may be strings or trl's conversational form (a list of messages; the last
  message's ``content`` is scored). Anything else scores 0. No completion string makes a reward
  raise; answers that do not parse (``model.grammar.Unparseable``) score 0.
- **Answer rewards do not require a well-formed completion**: they score the single answer block
  (as ``parse_answer`` finds it), so format and correctness are separate signals; sum them (with
  weights) in the trainer.
- **Targets** are typed answers (``LabelAnswer``, ``DetectionAnswer``, ``SegmentationAnswer``,
  ``TextAnswer``) or their canonical strings (``format_answer``). A target that does not parse is a
  data bug and raises ValueError, as do a wrong number of targets or an unspecified task.
- **Per-sample keywords** (``labels``, ``options``) are either one list of strings shared by every
  sample, or a per-sample list (each entry None or a list of strings), as trl passes dataset
  columns.
- classification: 1 iff the parsed label ``exact_match``-es the target (``metrics.accuracy``);
  detection: ``metrics.detection_f1`` at IoU 0.5 (1.0 for correctly predicting no boxes), the
  evaluation metric; ``detection_giou``: ``metrics.matched_giou``, continuous, so a box that
  moves closer earns more even below IoU 0.5 (VLM-R1, Visual-RFT): the detection part of the
  ``task`` reward, because F1@0.5 is 0 for almost every early rollout and a group of zeros
  has no advantage to learn from;
  segmentation: label-aware ``metrics.dice``; VQA: closed (options given) ``exact_match`` of the
  chosen option (by text or letter), open ``metrics.token_f1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from smartpath.model.grammar import (
    Answer,
    DetectionAnswer,
    LabelAnswer,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    coerce_task,
    parse_answer,
    parse_detections,
    parse_label,
    parse_option,
    parse_polygons,
    split_completion,
)
from smartpath.training import metrics

RewardFn = Callable[..., list[float]]

# ---------------------------------------------------------------------------------------------
# Helpers


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message's ``content`` (trl chat form);
    ``""`` for anything else."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        last = completion[-1]
        if isinstance(last, dict) and isinstance(last.get("content"), str):
            return last["content"]
    return ""


def _clip(x: float) -> float:
    return 0.0 if not math.isfinite(x) else min(max(float(x), 0.0), 1.0)


def _per_sample(value: Any, n: int, name: str) -> list[Any]:
    """``value`` spread over ``n`` samples: None, one shared list of strings, or one per sample."""
    if value is None:
        return [None] * n
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of strings or a per-sample list, not a string")
    values = list(value)
    if values and all(isinstance(v, str) for v in values):
        return [values] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} completions")
    return values


def _check_len(targets: Sequence[Any], n: int) -> None:
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} completions")


def _target(value: Any, parse: Callable[[str], Answer], kind: type, what: str) -> Any:
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        parsed = parse(value)
        if isinstance(parsed, kind):
            return parsed
        reason = parsed.reason if isinstance(parsed, Unparseable) else type(parsed).__name__
        raise ValueError(f"{what} target does not parse: {reason}")
    raise TypeError(f"{what} target must be {kind.__name__} or str, got {type(value).__name__}")


def _parse(task: Task, completion: Any, labels: Any, options: Any = None) -> Answer:
    return parse_answer(task, completion_text(completion), labels, options=options)


# ---------------------------------------------------------------------------------------------
# Per-sample scores (shared by the list rewards and ``task_reward``)


def _score_classification(completion: Any, target: Any, labels: Any) -> float:
    gt = _target(target, lambda s: parse_label(s), LabelAnswer, "classification")
    pred = _parse(Task.CLASSIFICATION, completion, labels)
    if not isinstance(pred, LabelAnswer):
        return 0.0
    return _clip(metrics.accuracy([gt.label], [pred.label]))


def _boxes_scorer(metric: Callable[..., float]) -> Callable[[Any, Any, Any], float]:
    """A detection score: ``metric(pred boxes, pred labels, target boxes, target labels)``."""

    def score(completion: Any, target: Any, labels: Any) -> float:
        gt = _target(target, lambda s: parse_detections(s), DetectionAnswer, "detection")
        pred = _parse(Task.DETECTION, completion, labels)
        if not isinstance(pred, DetectionAnswer):
            return 0.0
        return _clip(metric(pred.boxes(), pred.labels(), gt.boxes(), gt.labels()))

    return score


_score_detection = _boxes_scorer(metrics.detection_f1)
_score_detection_giou = _boxes_scorer(metrics.matched_giou)


def _score_segmentation(completion: Any, target: Any, labels: Any) -> float:
    gt = _target(target, lambda s: parse_polygons(s), SegmentationAnswer, "segmentation")
    pred = _parse(Task.SEGMENTATION, completion, labels)
    if not isinstance(pred, SegmentationAnswer):
        return 0.0
    return _clip(metrics.dice(pred, gt))


def _score_vqa(completion: Any, target: Any, options: Any) -> float:
    if isinstance(target, TextAnswer):
        ref = target.text
    elif isinstance(target, str):
        ref = target
    else:
        raise TypeError(f"vqa target must be TextAnswer or str, got {type(target).__name__}")
    if options:
        closed = parse_option(ref, options)  # a target given as a letter names its option
        ref = closed.text if isinstance(closed, TextAnswer) else ref
        pred = _parse(Task.VQA, completion, None, options)
        if not isinstance(pred, TextAnswer):
            return 0.0
        return float(metrics.exact_match(pred.text, ref))
    pred = _parse(Task.VQA, completion, None)
    if not isinstance(pred, TextAnswer):
        return 0.0
    return _clip(metrics.token_f1(pred.text, ref))


# ---------------------------------------------------------------------------------------------
# Rewards


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 iff the completion is exactly ``<think>…</think><answer>…</answer>`` (non-empty
    answer, only whitespace outside the blocks), else 0.0."""
    return [float(split_completion(completion_text(c)).well_formed) for c in completions]


def _labelled(
    score: Callable[[Any, Any, Any], float],
    completions: Sequence[Any],
    targets: Sequence[Any],
    labels: Sequence[Any] | None,
) -> list[float]:
    """``score(completion, target, labels)`` of each sample."""
    n = len(completions)
    _check_len(targets, n)
    labs = _per_sample(labels, n, "labels")
    return [score(c, t, lab) for c, t, lab in zip(completions, targets, labs, strict=True)]


def classification_reward(
    completions: Sequence[Any],
    targets: Sequence[Any],
    labels: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 iff the answer's label matches the target label (``labels`` constrain the answer)."""
    return _labelled(_score_classification, completions, targets, labels)


def detection_reward(
    completions: Sequence[Any],
    targets: Sequence[Any],
    labels: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """F1 of greedy same-label box matching at IoU 0.5 against the target boxes."""
    return _labelled(_score_detection, completions, targets, labels)


def detection_giou_reward(
    completions: Sequence[Any],
    targets: Sequence[Any],
    labels: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Mean (GIoU + 1) / 2 of the best same-label box matching, over the larger box count."""
    return _labelled(_score_detection_giou, completions, targets, labels)


def segmentation_reward(
    completions: Sequence[Any],
    targets: Sequence[Any],
    labels: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Label-aware Dice of the answer's polygons against the target polygons."""
    return _labelled(_score_segmentation, completions, targets, labels)


def vqa_reward(
    completions: Sequence[Any],
    targets: Sequence[Any],
    options: Sequence[Any] | None = None,
    labels: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Closed VQA (``options``, or else ``labels``, given): exact match of the chosen option;
    open: token F1."""
    n = len(completions)
    _check_len(targets, n)
    opts = _per_sample(options, n, "options")
    labs = _per_sample(labels, n, "labels")
    return [
        _score_vqa(c, t, o if o is not None else lab)
        for c, t, o, lab in zip(completions, targets, opts, labs, strict=True)
    ]


def task_reward(
    completions: Sequence[Any],
    tasks: Sequence[int],
    targets: Sequence[Any],
    labels: Sequence[Any] | None = None,
    options: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Each sample scored by its task's reward (``tasks``: ``Task`` or proto enum values);
    detection by the continuous ``detection_giou``."""
    n = len(completions)
    _check_len(targets, n)
    if len(tasks) != n:
        raise ValueError(f"{len(tasks)} tasks for {n} completions")
    labs = _per_sample(labels, n, "labels")
    opts = _per_sample(options, n, "options")
    out = []
    for c, task, t, lab, opt in zip(completions, tasks, targets, labs, opts, strict=True):
        kind = coerce_task(task)
        if kind is Task.CLASSIFICATION:
            out.append(_score_classification(c, t, lab))
        elif kind is Task.DETECTION:
            out.append(_score_detection_giou(c, t, lab))
        elif kind is Task.SEGMENTATION:
            out.append(_score_segmentation(c, t, lab))
        else:
            out.append(_score_vqa(c, t, opt if opt is not None else lab))
    return out


REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "classification": classification_reward,
    "detection": detection_reward,
    "detection_giou": detection_giou_reward,
    "segmentation": segmentation_reward,
    "vqa": vqa_reward,
    "task": task_reward,
}
"""Rewards by name, so a config can pick and swap them."""


def get_rewards(names: Iterable[str]) -> dict[str, RewardFn]:
    """The rewards registered as ``names``, in order; ValueError naming the known rewards for an
    unknown name."""
    names = list(names)
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ValueError(
            f"unknown reward(s) {', '.join(map(repr, unknown))}; "
            f"known rewards: {', '.join(sorted(REWARDS))}"
        )
    return {name: REWARDS[name] for name in names}
