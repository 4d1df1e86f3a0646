"""Completion text -> the structured ``Analysis``: label, geometry in the caller's frame,
answer, reasoning. Parsing never raises: an unparseable answer is reported as such."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from smartpath.model.coords import box_norm_to_roi, box_norm_to_slide, norm_to_roi, norm_to_slide
from smartpath.model.grammar import (
    DetectionAnswer,
    LabelAnswer,
    Scale,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    parse_answer,
    split_completion,
)
from smartpath.services.contracts import Question, SlideEvidence
from smartpath.v1 import common_pb2, pathology_pb2


def analysis_from_completion(
    text: str,
    question: Question,
    default_labels: Mapping[str, Sequence[str]],
    *,
    size: tuple[int, int],
    region: tuple[int, int, int, int] | None = None,
    label_scores: Sequence[tuple[str, float]] = (),
) -> pathology_pb2.Analysis:
    """Parse ``text`` for ``question``. Geometry goes to ROI pixels of an image of ``size``
    (width, height), or to slide level-0 pixels when ``region`` (x, y, w, h) is given."""
    labels = question.effective_labels(default_labels) or None
    options = question.options or None
    completion = split_completion(text)
    answer = parse_answer(question.task, text, labels, options=options)
    result = pathology_pb2.Analysis(
        task=int(question.task),
        scale=int(question.scale),
        answer=completion.answer or "",
        reasoning=completion.think or "",
        parsed=not isinstance(answer, Unparseable),
        width=size[0],
        height=size[1],
        frame=(
            pathology_pb2.COORDINATE_FRAME_SLIDE_LEVEL0
            if region is not None or question.scale == Scale.WSI
            else pathology_pb2.COORDINATE_FRAME_ROI_PIXELS
        ),
        label_scores=[common_pb2.LabelScore(label=k, score=v) for k, v in label_scores],
    )
    if isinstance(answer, Unparseable):
        result.parse_error = answer.reason
    elif isinstance(answer, LabelAnswer):
        result.label = answer.label
    elif isinstance(answer, DetectionAnswer) and answer.detections:
        boxes = answer.boxes()
        boxes = box_norm_to_slide(boxes, region) if region else box_norm_to_roi(boxes, *size)
        for d, (x1, y1, x2, y2) in zip(answer.detections, boxes.tolist(), strict=True):
            result.detections.add(label=d.label, x1=x1, y1=y1, x2=x2, y2=y2)
    elif isinstance(answer, SegmentationAnswer):
        for polygon in answer.polygons:
            pts = polygon.array()
            pts = norm_to_slide(pts, region) if region else norm_to_roi(pts, *size)
            result.polygons.add(
                label=polygon.label,
                points=[pathology_pb2.Point(x=x, y=y) for x, y in np.asarray(pts).tolist()],
            )
    elif isinstance(answer, TextAnswer) and question.task == Task.VQA:
        result.answer = answer.text
    return result


def add_evidence(analysis: pathology_pb2.Analysis, evidence: SlideEvidence) -> None:
    """Put every tile's rectangle (level-0 px) and evidence weight on a slide analysis."""
    side = max(1, round(evidence.tile_px))
    analysis.evidence.extend(
        pathology_pb2.TileEvidence(
            rect=common_pb2.Rect(x=x, y=y, width=side, height=side), weight=w
        )
        for x, y, w in zip(
            evidence.x.tolist(), evidence.y.tolist(), evidence.weight.tolist(), strict=True
        )
    )
