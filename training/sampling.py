"""Scale-balanced sampling for SmartPath's scale-aware SFT, and the task/scale expert key.

Design decisions:

- ``ScaleBalancedSampler`` draws ``num_samples`` indices per epoch: each draw first picks a scale
  with probability ``weight / sum(weights)`` and then an index uniformly *with replacement*
  within that scale, so the scale mix follows the weights however imbalanced the dataset is
  (a 1000-ROI/10-WSI dataset still yields ~50 % WSI draws by default). Small scales are
  therefore repeated within an epoch; large ones are subsampled.
- Deterministic per ``(seed, epoch)``: each epoch uses its own ``torch.Generator`` seeded from
  both (call ``set_epoch`` each epoch, like ``DistributedSampler``); iterating twice in the same
  epoch yields the same order.
- Strict about scales: every scale present in the dataset must have a weight (0 excludes it),
  weights must be ≥ 0 with a positive sum, and a scale with a positive weight but no samples is
  a ValueError (silently renormalising would hide a broken manifest).
- Scales are names (``"roi"``, ``"wsi"``); ``smartpath.model.grammar.Scale`` members and their
  ints are accepted and mapped to the lowercase name.
- Optional task weights (``task_weights``, keyed by task name, or by ``task/scale`` for one
  scale only, which wins over the plain name) split each scale's draws among its tasks: a draw
  picks the scale, then a task of that scale with probability ``weight / sum(weights of the
  scale's tasks present)`` (tasks not named weigh 1, 0 excludes), then a sample of that
  (scale, task) pool. Without them a scale's samples are drawn uniformly, so tasks come in
  their dataset proportions. Tasks compete for a small model's capacity: up-weighting a
  short-answer task (classification) keeps long coordinate answers from crowding it out.
- Not distributed-aware yet: under data parallelism each rank needs its own ``seed`` (e.g.
  ``seed + rank``) or a shard of the index list; the trainer is expected to do that.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from smartpath.model.grammar import Scale, Task, scale_name, task_name

__all__ = ["DEFAULT_SCALE_WEIGHTS", "ScaleBalancedSampler"]

DEFAULT_SCALE_WEIGHTS: Mapping[str, float] = {"roi": 0.5, "wsi": 0.5}

_SEED_MIX = 1_000_003  # keeps (seed, epoch) pairs apart: (0, 1) and (1, 0) differ


def _weight_key(key: str) -> str:
    """A task weight's key: a task name, or ``task/scale`` for one scale only."""
    task, _, scale = key.partition("/")
    name = task_name(task)
    return f"{name}/{scale_name(scale)}" if scale else name


class ScaleBalancedSampler(Sampler[int]):
    """Indices drawn so that each scale appears with its weight (see module docstring)."""

    def __init__(
        self,
        scales: Sequence[str | int | Scale],
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        num_samples: int | None = None,
        *,
        tasks: Sequence[str | int | Task] | None = None,
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        weights = dict(DEFAULT_SCALE_WEIGHTS if weights is None else weights)
        names = [scale_name(s) for s in scales]
        if (tasks is None) != (task_weights is None):
            raise ValueError("tasks and task_weights go together")
        if tasks is not None and len(tasks) != len(names):
            raise ValueError(f"{len(tasks)} tasks for {len(names)} scales")
        norm = {scale_name(k): float(v) for k, v in weights.items()}
        if any(v < 0 or v != v for v in norm.values()):
            raise ValueError(f"scale weights must be >= 0, got {weights}")
        if sum(norm.values()) <= 0:
            raise ValueError(f"scale weights must have a positive sum, got {weights}")
        pools: dict[str, list[int]] = {k: [] for k in norm}
        for i, name in enumerate(names):
            if name not in pools:
                raise ValueError(
                    f"sample {i} has scale {name!r} with no weight in {sorted(norm)}; "
                    "give it a weight (0 to exclude it)"
                )
            pools[name].append(i)
        for name, w in norm.items():
            if w > 0 and not pools[name]:
                raise ValueError(
                    f"scale {name!r} has weight {w} but the dataset has no {name!r} samples; "
                    "set its weight to 0 or add samples"
                )
        active = [k for k, w in norm.items() if w > 0]
        scale_probs = {k: norm[k] / sum(norm[a] for a in active) for k in active}
        # Draw groups: one per active scale, or one per (scale, task) with task weights.
        groups: list[tuple[str, list[int], float]] = []
        if task_weights is None:
            groups = [(k, pools[k], scale_probs[k]) for k in active]
        else:
            task_names = [task_name(t) for t in tasks]  # type: ignore[union-attr]
            tw = {_weight_key(k): float(v) for k, v in task_weights.items()}
            if any(v < 0 or v != v for v in tw.values()):
                raise ValueError(f"task weights must be >= 0, got {task_weights}")
            for scale in active:
                by_task: dict[str, list[int]] = {}
                for i in pools[scale]:
                    by_task.setdefault(task_names[i], []).append(i)
                weight = {t: tw.get(f"{t}/{scale}", tw.get(t, 1.0)) for t in sorted(by_task)}
                present = {t: w for t, w in weight.items() if w > 0}
                if not present:
                    raise ValueError(f"task weights exclude every {scale!r} task")
                total = sum(present.values())
                groups += [
                    (f"{t}/{scale}", by_task[t], scale_probs[scale] * w / total)
                    for t, w in present.items()
                ]
        self._active = [name for name, _, _ in groups]
        self._probs = torch.tensor([p for _, _, p in groups], dtype=torch.float64)
        self._pools = {name: torch.tensor(idx, dtype=torch.long) for name, idx, _ in groups}
        self.seed = int(seed)
        self.epoch = 0
        self.num_samples = len(names) if num_samples is None else int(num_samples)
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")

    @property
    def probabilities(self) -> dict[str, float]:
        """Normalised draw probability per scale (or per ``task/scale`` key with task weights);
        groups with weight 0 are omitted."""
        return {k: float(p) for k, p in zip(self._active, self._probs, strict=True)}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) order ``__iter__`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed((self.seed * _SEED_MIX + self.epoch) % (2**63))
        which = torch.multinomial(self._probs, self.num_samples, replacement=True, generator=g)
        out = torch.empty(self.num_samples, dtype=torch.long)  # (num_samples,)
        for j, name in enumerate(self._active):
            slots = (which == j).nonzero(as_tuple=True)[0]
            pool = self._pools[name]
            picks = torch.randint(len(pool), (len(slots),), generator=g)
            out[slots] = pool[picks]
        return iter(out.tolist())
