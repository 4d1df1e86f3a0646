"""Training items: manifest samples with their visual input loaded (ROI image or slide features).

Design decisions:

- An item is ``(sample, visual)``: the manifest sample and its decoded ROI image (uint8 HWC) or
  its slide's precomputed features as a :class:`~smartpath.model.mllm.SlideInput`, exactly what
  :class:`~smartpath.training.collate.Collator` takes. Items are loaded once per worker and kept
  in memory (the synthetic and demo datasets are a few hundred MB at most); large real datasets
  would stream instead.
- WSI samples must reference features (``features`` field); a sample with only a ``slide`` is
  refused with a message that names ``smartpath.training.features.featurize_manifest``, which
  writes the featurised manifest.
- Evaluation subsets are capped per task/scale key with a seeded choice, so a run evaluates the
  same samples every time and no key dominates the report.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np

from smartpath.core.storage.base import ObjectStore
from smartpath.core.storage.refs import ObjectRef
from smartpath.model.grammar import task_scale_key
from smartpath.model.mllm import SlideInput
from smartpath.model.slide_features import load_features
from smartpath.training.manifest import (
    ManifestError,
    RoiSample,
    WsiSample,
    load_roi_image,
    read_manifest,
    resolve_ref,
)

__all__ = ["Item", "cap_per_key", "item_key", "load_items"]

Item: TypeAlias = tuple[RoiSample | WsiSample, np.ndarray | SlideInput]


def item_key(sample: RoiSample | WsiSample) -> str:
    """The task/scale key of a sample, e.g. ``"detection/roi"``."""
    return task_scale_key(sample.task, sample.scale)


def _slide_input(sample: WsiSample, manifest: str, store: ObjectStore | None) -> SlideInput:
    if sample.features is None:
        raise ManifestError(
            f"WSI sample {sample.id!r} references a slide, not features; featurise the manifest "
            "first (smartpath.training.features.featurize_manifest)"
        )
    ref = resolve_ref(sample.features, manifest)
    if isinstance(ref, ObjectRef):
        if store is None:
            raise ManifestError(f"reading {ref.uri} needs an ObjectStore (store=...)")
        return load_features(store.get_bytes(ref)).to_slide_input()
    return load_features(ref).to_slide_input()


def load_items(
    manifests: Sequence[str],
    split: str,
    store: ObjectStore | None = None,
    *,
    max_per_key: int | None = None,
    seed: int = 0,
) -> list[Item]:
    """Every sample of ``split`` in ``manifests`` with its visual input, in manifest order
    (capped per task/scale key when ``max_per_key`` is set)."""
    samples: list[tuple[RoiSample | WsiSample, str]] = []
    for manifest in manifests:
        samples += [(s, manifest) for s in read_manifest(manifest, store) if s.split == split]
    if max_per_key is not None:
        keep = {id(s) for s in cap_per_key([s for s, _ in samples], max_per_key, seed)}
        samples = [(s, m) for s, m in samples if id(s) in keep]
    items: list[Item] = []
    for sample, manifest in samples:
        if isinstance(sample, RoiSample):
            items.append((sample, load_roi_image(sample, manifest, store)))
        else:
            items.append((sample, _slide_input(sample, manifest, store)))
    return items


def cap_per_key(
    samples: Sequence[RoiSample | WsiSample], limit: int, seed: int = 0
) -> list[RoiSample | WsiSample]:
    """At most ``limit`` samples per task/scale key (seeded choice), in input order."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_key[item_key(s)].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for key in sorted(by_key):
        idx = by_key[key]
        keep.update(idx if len(idx) <= limit else rng.sample(idx, limit))
    return [s for i, s in enumerate(samples) if i in keep]
