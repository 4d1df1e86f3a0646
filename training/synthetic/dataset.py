"""Write seeded synthetic ROI and WSI datasets as files plus JSONL manifests.

Design decisions
----------------
- ROI manifest (``roi.jsonl``): one JSON object per line with exactly the fields ``id``,
  ``scale`` ("roi"), ``image`` (PNG path relative to the manifest's folder), ``task`` (the
  ``Task`` name in lower case, e.g. "detection"), ``prompt``, ``labels`` and ``options`` (lists
  or null), ``target`` (the canonical ``format_answer`` string) and ``split``.
- ROI profile: ``generate_roi_dataset(..., profile=COMPACT)`` writes the same line schema; a
  non-default :class:`~smartpath.training.synthetic.roi.RoiProfile` is recorded next to the
  manifest as ``roi_profile.json`` (its fields), and no such file means the default profile (a
  stale one is removed), so default outputs are unchanged file for file.
- WSI manifest (``wsi.jsonl``): ``id``, ``scale`` ("wsi"), ``slide`` (relative SVS path),
  ``task``, ``prompt``, ``labels``, ``options``, ``target``, ``split``; three lines per slide
  (classification, closed VQA, open VQA), all in the same split so no slide leaks across splits.
- Slide labels come from the slide's own procedural texture map, not from a new renderer:
  ``SyntheticTissue`` (unchanged) blends cellular, fat and fibrous-stroma textures by smooth
  weight fields; the slide label is derived from each component's share of tissue area,
  measured on a coarse overview inside the tissue mask (``slide_composition``), then thresholded
  (``slide_label``): stroma dominates most slides, so "largest share" would be ~80 % stroma.
  This reads the private ``_class_planes`` of ``SyntheticTissue``; if its internals change, this
  breaks loudly.
- Splits: per task, a seeded permutation of sample indices is cut by the given fractions, so
  split sizes are exact and the same seed always gives the same assignment.
- Everything is deterministic for a seed (PNG encoding and the SVS writer are byte-stable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from smartpath.model.grammar import LabelAnswer, Scale, Task, TextAnswer, format_answer
from smartpath.model.prompts import PromptStyle, build_prompt
from smartpath.training.synthetic.roi import (
    NUCLEUS_LABELS,
    REGION_LABELS,
    TISSUE_CLASSES,
    RoiProfile,
    make_roi_sample,
    roi_sample_classes,
)
from smartpath.training.synthetic.slides import SyntheticTissue, write_synthetic_slide

__all__ = [
    "ROI_PROFILE_FILE",
    "ROI_TASKS",
    "WSI_CLASSES",
    "assign_splits",
    "generate_roi_dataset",
    "generate_wsi_dataset",
    "label_taxonomy",
    "slide_composition",
    "slide_label",
]

ROI_TASKS: tuple[Task, ...] = (Task.CLASSIFICATION, Task.DETECTION, Task.SEGMENTATION, Task.VQA)
WSI_CLASSES: tuple[str, ...] = ("cellular-rich", "stroma-rich", "adipose-rich")


def label_taxonomy() -> dict[str, list[str]]:
    """The synthetic data's labels per "task/scale": the taxonomy a model trained on it carries
    in its checkpoint (``ModelConfig.labels``)."""
    return {
        "classification/roi": list(TISSUE_CLASSES),
        "classification/wsi": list(WSI_CLASSES),
        "detection/roi": list(NUCLEUS_LABELS),
        "segmentation/roi": list(REGION_LABELS),
    }


COMPONENTS: tuple[str, ...] = ("cellular", "stroma", "adipose")
# A slide is cellular-rich above this cellular share, else adipose-rich above this fat share,
# else stroma-rich (stroma dominates most slides; thresholds near the 60th/70th percentiles give
# roughly 40/25/35 % of slides per class).
_CELLULAR_RICH = 0.30
_ADIPOSE_RICH = 0.15
SPLIT_NAMES = ("train", "val", "test")
ROI_PROFILE_FILE = "roi_profile.json"
_PRESENT_FRACTION = 0.1  # a component "is present" above this share of tissue


def assign_splits(n: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Split names for ``n`` items: a seeded permutation cut by ``fractions`` (train, val,
    test; normalised), rounding so that the counts sum to ``n``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"splits must be 3 non-negative fractions, got {fractions!r}")
    total = float(sum(fractions))
    bounds = np.rint(np.cumsum(fractions) / total * n).astype(int)
    names = np.empty(n, dtype=object)
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5B17]).permutation(n)
    start = 0
    for name, stop in zip(SPLIT_NAMES, bounds, strict=True):
        names[order[start:stop]] = name
        start = stop
    return [str(v) for v in names]


def generate_roi_dataset(
    out_dir: str | Path,
    n_per_task: int,
    seed: int,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    tasks: Sequence[Task] = ROI_TASKS,
    progress: bool = False,
    profile: RoiProfile | None = None,
    workers: int = 1,
    prompt_style: PromptStyle = "full",
) -> Path:
    """Write ``n_per_task`` ROI samples per task as ``images/<id>.png`` under ``out_dir`` and
    return the manifest path (``out_dir/roi.jsonl``).

    ``profile`` (default ``RoiProfile()``) sets ROI size and target detail, e.g. ``COMPACT``;
    a non-default one is recorded in ``out_dir/roi_profile.json``. ``workers`` > 1 renders in
    that many processes (same files: every sample is seeded by its own index).
    ``prompt_style`` is that of the model to train (``ModelConfig.prompt_style``).
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    prof = RoiProfile() if profile is None else profile
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / "roi.jsonl"
    profile_file = out / ROI_PROFILE_FILE
    if prof == RoiProfile():
        profile_file.unlink(missing_ok=True)
    else:
        text = json.dumps(dataclasses.asdict(prof), indent=2, sort_keys=True) + "\n"
        profile_file.write_text(text, encoding="utf-8")
    jobs = []
    for task in tasks:
        task = Task(task)
        split = assign_splits(n_per_task, splits, seed * 31 + int(task))
        for i, cls in enumerate(roi_sample_classes(task, n_per_task, seed)):
            jobs.append((out, task, seed, i, cls, prof, prompt_style, split[i]))
    with contextlib.ExitStack() as stack:
        records = map(_write_roi, jobs)
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers))
            records = pool.map(_write_roi, jobs, chunksize=16)
        if progress:
            records = tqdm(records, total=len(jobs), unit="roi", desc="roi")
        with manifest.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return manifest


def _write_roi(job: tuple) -> dict:
    """Render one ROI sample, write its PNG, return its manifest record."""
    out, task, seed, index, tissue_class, profile, prompt_style, split = job
    sample = make_roi_sample(
        task, seed, index, tissue_class=tissue_class, profile=profile, prompt_style=prompt_style
    )
    rel = f"images/{sample.id}.png"
    Image.fromarray(sample.image).save(out / rel, optimize=False)
    return {
        "id": sample.id,
        "scale": "roi",
        "image": rel,
        "task": task.name.lower(),
        "prompt": sample.prompt,
        "labels": list(sample.labels) if sample.labels is not None else None,
        "options": list(sample.options) if sample.options is not None else None,
        "target": sample.target_text,
        "split": split,
    }


def slide_composition(tissue: SyntheticTissue, overview_px: int = 128) -> dict[str, float]:
    """Share of tissue area that is cellular, stroma and adipose (sums to 1; all 0 without
    tissue), from the slide's own texture weight fields on a coarse overview."""
    d = max(1.0, max(tissue.width, tissue.height) / overview_px)
    w, h = max(1, math.ceil(tissue.width / d)), max(1, math.ceil(tissue.height / d))
    mask = tissue.tissue_mask(0, 0, w, h, d)
    w_cell, w_fat, _ = tissue._class_planes(0.0, 0.0, w, h, d)
    cell = np.broadcast_to(np.asarray(w_cell, dtype=np.float64), (h, w))[mask]
    fat = np.broadcast_to(np.asarray(w_fat, dtype=np.float64), (h, w))[mask]
    if cell.size == 0:
        return dict.fromkeys(COMPONENTS, 0.0)
    shares = np.array([cell.mean(), (1.0 - cell - fat).mean(), fat.mean()])
    return {c: float(v) for c, v in zip(COMPONENTS, shares / shares.sum(), strict=True)}


def slide_label(comp: dict[str, float]) -> str:
    """The slide-level class (``WSI_CLASSES``) of a ``slide_composition``."""
    if comp["cellular"] >= _CELLULAR_RICH:
        return "cellular-rich"
    if comp["adipose"] >= _ADIPOSE_RICH:
        return "adipose-rich"
    return "stroma-rich"


def _describe(comp: dict[str, float]) -> str:
    ranked = sorted(comp, key=comp.__getitem__, reverse=True)
    text = f"mostly {ranked[0]} tissue"
    if comp[ranked[1]] >= _PRESENT_FRACTION:
        text += f" with some {ranked[1]} tissue"
    return text


def generate_wsi_dataset(
    out_dir: str | Path,
    n_slides: int,
    seed: int,
    size_px: int = 2048,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    progress: bool = False,
    prompt_style: PromptStyle = "full",
) -> Path:
    """Write ``n_slides`` small pyramidal SVS slides (``slides/<id>.svs``, ``size_px`` square)
    with slide-level classification and VQA lines; return the manifest (``out_dir/wsi.jsonl``).
    ``prompt_style`` is that of the model to train (``ModelConfig.prompt_style``).
    """
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if not 256 <= size_px <= 16384:
        raise ValueError(f"size_px must be in 256..16384, got {size_px}")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    manifest = out / "wsi.jsonl"
    split = assign_splits(n_slides, splits, seed * 31 + 7)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x3151])
    slide_seeds = rng.integers(0, 2**31 - 1, size=n_slides)
    it = range(n_slides)
    with manifest.open("w", encoding="utf-8") as f:
        for i in tqdm(it, unit="slide", desc="wsi") if progress else it:
            sid = f"wsi-{int(seed)}-{i:05d}"
            rel = f"slides/{sid}.svs"
            s_seed = int(slide_seeds[i])
            write_synthetic_slide(out / rel, width=size_px, height=size_px, seed=s_seed, workers=1)
            comp = slide_composition(SyntheticTissue(size_px, size_px, s_seed))
            label = slide_label(comp)
            srng = np.random.default_rng([s_seed, 0x51DE])
            asked = str(srng.choice(COMPONENTS))
            items: list[tuple[str, Task, list[str] | None, list[str] | None, str | None, str]] = [
                ("cls", Task.CLASSIFICATION, list(WSI_CLASSES), None, None,
                 format_answer(LabelAnswer(label))),
                ("present", Task.VQA, None, ["yes", "no"],
                 f"Does {asked} tissue make up a noticeable part of this slide?",
                 "yes" if comp[asked] >= _PRESENT_FRACTION else "no"),
                ("describe", Task.VQA, None, None,
                 "Summarise the tissue composition of this slide.",
                 format_answer(TextAnswer(_describe(comp)))),
            ]  # fmt: skip
            for suffix, task, labels, options, question, target in items:
                prompt = build_prompt(
                    task,
                    Scale.WSI,
                    question=question,
                    labels=labels,
                    options=options,
                    style=prompt_style,
                )
                record = {
                    "id": f"{sid}-{suffix}",
                    "scale": "wsi",
                    "slide": rel,
                    "task": task.name.lower(),
                    "prompt": prompt,
                    "labels": labels,
                    "options": options,
                    "target": target,
                    "split": split[i],
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return manifest
