"""Benchmark: GRPO step throughput with batched mixed-expert rollouts vs sequential rollouts.

One GRPO step = rollouts (P prompts × G samples, sampled at temperature 1) + the update (old
and reference log-probs, clipped surrogate + KL, backward, AdamW step), in one process on the
CPU. The prompts are a scale-balanced mix of synthetic ROI tasks (COMPACT profile) and WSI
samples (stain-stats features), so the router sends rows of one batch to different experts.

- ours: :func:`smartpath.training.rollout.rollout` generates all P·G rows in one batch, each
  row with its own expert mix (``SmartPathModel.generate``), then one update.
- naive: the same rollouts one prompt-sample at a time (``sequential=True``: batch 1, its own
  router decision), then the same update.

Both use the same model (the demo's tiny configuration, random init) and the same prompts;
a random model rarely emits ``<|im_end|>``, so completions run to ``--new-tokens`` in both
paths and the work per sample is equal. Before timing, a sanity check: greedy batched
rollouts equal greedy sequential ones token for token. Each path is timed over ``--steps``
steps after one warm-up step; samples/s = P·G·steps / seconds. Prints one JSON line last.

    python bench/training.py [--prompts 8] [--group 4] [--new-tokens 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from smartpath.core.config.model import ModelConfig
from smartpath.core.config.training import GrpoConfig, TrainingConfig
from smartpath.model.base import base_from_config
from smartpath.model.mllm import SmartPathModel
from smartpath.training.collate import Collator
from smartpath.training.data import load_items
from smartpath.training.features import featurize_manifest
from smartpath.training.grpo import grpo_update
from smartpath.training.rollout import rollout
from smartpath.training.sft import step_batch
from smartpath.training.synthetic.dataset import generate_roi_dataset, generate_wsi_dataset
from smartpath.training.synthetic.roi import COMPACT


def make_items(root: Path) -> list:
    roi = generate_roi_dataset(root / "roi", 16, seed=0, profile=COMPACT)
    wsi = featurize_manifest(generate_wsi_dataset(root / "wsi", 6, seed=0), progress=False)
    return load_items([str(roi), str(wsi)], "train")


def grpo_steps(model, reference, collator, items, t, g, *, steps, sequential, seed0) -> float:
    """Seconds for ``steps`` GRPO steps (rollout + update)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tic = time.perf_counter()
    for i in range(steps):
        prompts = step_batch(items, t, 0, seed0 + i, g.prompts_per_step)
        rolls = rollout(
            model, collator, prompts, group_size=g.group_size, max_new_tokens=g.max_new_tokens,
            temperature=g.temperature, seed=seed0 + i, sequential=sequential,
        )  # fmt: skip
        grpo_update(
            model, model, reference, collator, rolls, g, backward=lambda x: x.backward(), step=step
        )
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", aggregator={"feature_dim": 32, "num_tokens": 8})
    base, tokenizer = base_from_config(cfg)
    model = SmartPathModel(cfg, base, tokenizer)
    reference = SmartPathModel(cfg, base_from_config(cfg, tokenizer)[0], tokenizer).eval()
    reference.load_state_dict(model.state_dict())
    t = TrainingConfig(model=cfg)
    g = GrpoConfig(
        prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens
    )
    with tempfile.TemporaryDirectory() as tmp:
        print("writing synthetic ROI and WSI samples…", flush=True)
        items = make_items(Path(tmp))
    collator = Collator(cfg, tokenizer, model.slide_tokens)

    prompts = step_batch(items, t, 0, 0, args.prompts)
    kw = dict(group_size=1, max_new_tokens=16, temperature=0.0)
    same = (
        rollout(model, collator, prompts, **kw).completions
        == rollout(model, collator, prompts, sequential=True, **kw).completions
    )
    print(f"greedy batched == sequential rollouts: {same}", flush=True)
    if not same:
        raise SystemExit("batched rollouts differ from sequential ones")

    results = {}
    for name, sequential in (("ours", False), ("naive", True)):
        grpo_steps(model, reference, collator, items, t, g, steps=1, sequential=sequential,
                   seed0=100)  # fmt: skip
        seconds = grpo_steps(model, reference, collator, items, t, g, steps=args.steps,
                             sequential=sequential, seed0=1)  # fmt: skip
        results[name] = args.prompts * args.group * args.steps / seconds
        print(f"{name}: {results[name]:.2f} samples/s ({seconds:.1f} s)", flush=True)

    print(
        json.dumps(
            {
                "benchmark": "training",
                "prompts_per_step": args.prompts,
                "group_size": args.group,
                "new_tokens": args.new_tokens,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "samples_per_s": round(results["ours"], 2),
                "naive_samples_per_s": round(results["naive"], 2),
                "ratio": round(results["ours"] / results["naive"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
