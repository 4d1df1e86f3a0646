"""The evaluation report: ``report.json``, ``report.md`` and PNG plots of one training run.

Design decisions:

- **Inputs are plain data**: ``stages`` maps a stage name (``"sft"``, ``"grpo"``, …, in training
  order) to :func:`smartpath.training.evaluate.task_metrics` output, ``baseline`` is
  :func:`~smartpath.training.evaluate.constant_baseline` output, ``history`` maps a stage to its
  per-step metric dicts. Anything missing (a stage without history, a task a stage did not
  evaluate, no examples, no image loader) is skipped, never an error.
- **Verdicts use the headline ``score``** and its standard error ``score_se``. A stage is *above
  chance* on a task iff its score beats the constant baseline's; the verdict is ``yes`` when the
  margin exceeds 2 SE, ``marginal`` when it is positive but within 2 SE, ``no`` otherwise. Each
  stage is compared with the stage before it (so ``grpo`` with ``sft``): ``improved``/``worse``
  when the change exceeds 2 SE of the difference, ``within noise`` otherwise. That SE is the
  paired one (of the per-sample differences on the same samples) when the caller passes it,
  else the unpaired, conservative √(SE₁² + SE₂²). The baseline is the best constant chosen *on
  the eval set*, so it is an optimistic chance level.
- **Other held-out sets** (:class:`HeldOut`, e.g. the same samples in another lab's stain) get
  a summary table and scores plot of their own, against the same baseline (a constant answer
  does not depend on the pixels).
- **report.json** holds everything (inputs, verdicts, example scores, plot paths) with NaN/inf
  written as ``null`` (strict JSON); ``extra`` values that JSON cannot hold are written as text.
- **Plots** are drawn with matplotlib's Agg canvas on ``Figure`` objects (no ``pyplot``, so no
  global backend switch and no GUI state): ``plots/history_<stage>.png`` (panels: losses; mean and
  per-task reward; KL; learning rate; up to four other numeric series, each raw plus an
  exponential moving average when long), ``plots/scores.png`` (headline score per task: baseline
  vs stages, ±1 SE) and ``plots/examples/NNN_<id>.png`` (ROI detection/segmentation overlays, GT
  green and prediction red, drawn in the image's pixel space from the 0–1000 coordinates; a text
  card, with the image beside it when there is one, for classification and VQA).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon as PolygonPatch
from matplotlib.patches import Rectangle

from smartpath.model.coords import box_norm_to_roi, norm_to_roi
from smartpath.model.grammar import (
    DetectionAnswer,
    LabelAnswer,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    option_letter,
    parse_answer,
)
from smartpath.training.evaluate import HEADLINE, Prediction, sample_key, score_prediction
from smartpath.training.manifest import RoiSample, parse_target, sample_task

__all__ = ["HeldOut", "write_report"]

Metrics = Mapping[str, Mapping[str, Any]]
Paired = Mapping[str, Mapping[str, Mapping[str, float]]]
"""Per stage, per task: its paired difference with the stage before it (``delta``, ``se``,
``n``; :func:`smartpath.training.evaluate.paired_difference`)."""


@dataclass(frozen=True)
class HeldOut:
    """Another held-out set's results (e.g. stain-shifted): metrics and paired differences per
    stage, reported in a summary of their own against the same baseline."""

    name: str
    stages: Mapping[str, Metrics]
    paired: Paired = field(default_factory=dict)


GT_COLOUR = "#1a9641"
PRED_COLOUR = "#d7191c"
BASELINE_COLOUR = "#9e9e9e"
_NOISE_SE = 2.0
_EPS = 1e-12
_MAX_OTHER_PANELS = 4
_NOT_SERIES = ("step", "epoch", "resumes")  # bookkeeping, not curves
_DPI = 110

# ---------------------------------------------------------------------------------------------
# Small helpers


def _num(value: Any) -> float | None:
    """A finite float, or None (missing, non-numeric, NaN or inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _num(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump())
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    return str(value)


def _fmt(value: Any, metric: str = "") -> str:
    x = _num(value)
    if x is None:
        return "–"
    if metric in ("n", "candidates"):
        return str(int(x))
    return f"{x:.3f}"


def _md(text: str, limit: int = 80) -> str:
    """Text safe for one markdown table cell."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _headline(key: str) -> str:
    return HEADLINE.get(key.split("/")[0], "score")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60] or "sample"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    return path


# ---------------------------------------------------------------------------------------------
# Verdicts


def _score(metrics: Metrics, key: str) -> tuple[float | None, float]:
    m = metrics.get(key) or {}
    return _num(m.get("score")), _num(m.get("score_se")) or 0.0


def _chance_verdict(diff: float, se: float) -> str:
    if diff <= _EPS:
        return "no"
    return "yes" if diff > _NOISE_SE * se else "marginal"


def _change_verdict(delta: float, se: float) -> str:
    bound = max(_NOISE_SE * se, _EPS)
    if delta > bound:
        return "improved"
    if delta < -bound:
        return "worse"
    return "within noise"


def _comparison(
    keys: Sequence[str],
    stages: Mapping[str, Metrics],
    baseline: Metrics,
    paired: Paired | None = None,
) -> dict[str, dict[str, Any]]:
    """Per task: headline, baseline score, and per stage the score and verdicts (a stage's change
    judged by the paired SE when ``paired`` has it, else by the unpaired bound)."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        base, _ = _score(baseline, key)
        entry: dict[str, Any] = {"headline": _headline(key), "baseline": base, "stages": {}}
        prev: tuple[str, float, float] | None = None
        for name, metrics in stages.items():
            score, se = _score(metrics, key)
            if score is None:
                continue
            st: dict[str, Any] = {"score": score, "score_se": se}
            if base is not None:
                diff = score - base
                st["vs_baseline"] = diff
                st["above_chance"] = diff > _EPS
                st["above_chance_verdict"] = _chance_verdict(diff, se)
            if prev is not None:
                delta, change_se = score - prev[1], math.hypot(se, prev[2])
                pair = ((paired or {}).get(name) or {}).get(key)
                if pair is not None:
                    delta, change_se = pair["delta"], pair["se"]
                st["vs_previous"] = {
                    "stage": prev[0],
                    "delta": delta,
                    "se": change_se,
                    "paired": pair is not None,
                    "improved": delta > _EPS,
                    "verdict": _change_verdict(delta, change_se),
                }
            entry["stages"][name] = st
            prev = (name, score, se)
        sft, grpo = entry["stages"].get("sft"), entry["stages"].get("grpo")
        if sft is not None and grpo is not None:
            entry["grpo_improved_on_sft"] = grpo["score"] - sft["score"] > _EPS
        out[key] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Plots: training curves and scores


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (no lag; shorter windows at the ends)."""
    kernel = np.ones(window)
    total = np.convolve(values, kernel, mode="same")
    count = np.convolve(np.ones_like(values), kernel, mode="same")
    return total / count


def _series(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Numeric series of a history: name -> (steps, values); ``step`` (else the row) is x."""
    points: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        step = _num(row.get("step"))
        x = float(i) if step is None else step
        for name, value in row.items():
            v = _num(value)
            if name in _NOT_SERIES or v is None:
                continue
            points.setdefault(name, []).append((x, v))
    return {
        k: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for k, v in points.items()
    }


def _panels(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {"loss": [], "reward": [], "KL": [], "learning rate": []}
    other: list[str] = []
    for name in names:
        low = name.lower()
        if "loss" in low:
            groups["loss"].append(name)
        elif "reward" in low:
            groups["reward"].append(name)
        elif low == "kl" or low.startswith(("kl/", "kl_")) or low.endswith(("/kl", "_kl")):
            groups["KL"].append(name)
        elif low in ("lr", "learning_rate") or low.startswith("lr/"):
            groups["learning rate"].append(name)
        else:
            other.append(name)
    panels = [
        (title, sorted(keys, key=lambda k: (k.count("/"), k))) for title, keys in groups.items()
    ]
    other.sort(key=lambda k: (k.endswith(("_s", "_time", "time")), k))  # timings last
    panels += [(name, [name]) for name in other[:_MAX_OTHER_PANELS]]
    return [(title, keys) for title, keys in panels if keys]


def _history_plot(stage: str, rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    series = _series(rows)
    panels = _panels(list(series))
    if not panels:
        return None
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.2 * nrows), layout="constrained")
    fig.suptitle(f"{stage}: training curves", fontsize=12)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, names) in zip(axes, panels, strict=False):
        for j, name in enumerate(names):
            x, y = series[name]
            mean_line = name in ("reward", "loss", "kl")
            colour = "black" if mean_line and len(names) > 1 else f"C{j % 10}"
            width = 2.0 if mean_line else 1.4
            if len(y) > 25 and title != "learning rate":
                ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
                window = max(5, len(y) // 20) | 1  # odd: centred
                ax.plot(x, _smooth(y, window), color=colour, linewidth=width, label=name)
            elif len(y) > 25:
                ax.plot(x, y, color=colour, linewidth=width, label=name)
            else:
                ax.plot(x, y, color=colour, linewidth=width, marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(names) > 1:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, path)


def _scores_plot(
    keys: Sequence[str], stages: Mapping[str, Metrics], baseline: Metrics, path: Path
) -> Path | None:
    bars = [("baseline (constant)", baseline, BASELINE_COLOUR)]
    bars += [(name, m, f"C{i % 10}") for i, (name, m) in enumerate(stages.items())]
    if not keys or all(_score(m, k)[0] is None for _, m, _ in bars for k in keys):
        return None
    width = 0.8 / len(bars)
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) * len(bars) + 2.0), 4.2), layout="constrained")
    ax = fig.subplots()
    xs = np.arange(len(keys))
    for i, (name, metrics, colour) in enumerate(bars):
        vals = [_score(metrics, k) for k in keys]
        ys = [v[0] if v[0] is not None else 0.0 for v in vals]
        errs = [v[1] if v[0] is not None else 0.0 for v in vals]
        pos = xs - 0.4 + width * (i + 0.5)
        hatch = "//" if i == 0 else None
        ax.bar(
            pos,
            ys,
            width,
            yerr=errs,
            capsize=2,
            color=colour,
            label=name,
            hatch=hatch,
            edgecolor="white" if i else "#616161",
            linewidth=0.5,
        )
        for p, (v, se) in zip(pos, vals, strict=True):
            text = "n/a" if v is None else f"{v:.2f}"
            top = min((v or 0.0) + (se if v is not None else 0.0), 1.12)
            ax.text(p, top + 0.015, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [f"{k}\n({_headline(k)})" for k in keys], fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("headline score")
    ax.set_title("Headline score per task: constant baseline vs stages (±1 SE)", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncols=len(bars))
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Plots: examples


def _load_image(
    sample: Any, image_loader: Callable[[RoiSample], np.ndarray] | None
) -> np.ndarray | None:
    if image_loader is None or not isinstance(sample, RoiSample):
        return None
    try:
        image = np.asarray(image_loader(sample))
    except Exception as e:  # a report should not die on one unreadable image
        warnings.warn(f"report: no image for sample {sample.id!r}: {e}", stacklevel=3)
        return None
    return image if image.ndim in (2, 3) and image.size else None


def _answer_text(answer: Any) -> str:
    if isinstance(answer, LabelAnswer):
        return answer.label
    if isinstance(answer, TextAnswer):
        return answer.text
    if isinstance(answer, DetectionAnswer):
        return f"{len(answer.detections)} boxes"
    if isinstance(answer, SegmentationAnswer):
        return f"{len(answer.polygons)} polygons"
    if isinstance(answer, Unparseable):
        return f"unparseable ({answer.reason})"
    return str(answer)


def _draw_overlay(ax: Any, image: np.ndarray | None, target: Any, answer: Any) -> None:
    if image is None:
        h = w = 1000
        ax.imshow(np.full((8, 8, 3), 245, np.uint8), extent=(0, w, h, 0))
        ax.text(15, h - 15, "(no image)", ha="left", va="bottom", color="#9e9e9e", fontsize=8)
    else:
        h, w = image.shape[:2]
        ax.imshow(image, extent=(0, w, h, 0), cmap="gray" if image.ndim == 2 else None)
    for answer_, colour, style, fill in (
        (target, GT_COLOUR, "-", 0.18),
        (answer, PRED_COLOUR, "--", 0.0),
    ):
        if isinstance(answer_, DetectionAnswer) and answer_.detections:
            for x1, y1, x2, y2 in box_norm_to_roi(answer_.boxes(), w, h):
                ax.add_patch(
                    Rectangle(
                        (x1, y1),
                        x2 - x1,
                        y2 - y1,
                        fill=False,
                        edgecolor=colour,
                        linestyle=style,
                        linewidth=1.3,
                    )
                )
        elif isinstance(answer_, SegmentationAnswer):
            for poly in answer_.polygons:
                pts = norm_to_roi(poly.array(), w, h)
                if fill:
                    ax.add_patch(PolygonPatch(pts, closed=True, facecolor=colour, alpha=fill))
                ax.add_patch(
                    PolygonPatch(
                        pts,
                        closed=True,
                        fill=False,
                        edgecolor=colour,
                        linestyle=style,
                        linewidth=1.6,
                    )
                )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.plot([], [], color=GT_COLOUR, label="ground truth")
    ax.plot([], [], color=PRED_COLOUR, linestyle="--", label="prediction")
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)


def _wrap(text: str, width: int = 64, lines: int = 5) -> str:
    wrapped = textwrap.wrap(" ".join(text.split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], wrapped[lines - 1][: width - 1] + "…"]
    return "\n".join(wrapped)


def _text_card(ax: Any, sample: Any, answer: Any, completion: str, score: float) -> None:
    ax.axis("off")
    parts = [("prompt", sample.prompt or "(task's default prompt)", 4)]
    if sample.options:
        opts = "   ".join(f"{option_letter(i)}. {o}" for i, o in enumerate(sample.options))
        parts.append(("options", opts, 3))
    elif sample.labels:
        parts.append(("labels", ", ".join(sample.labels), 3))
    parts += [
        ("target", sample.target, 3),
        ("prediction", _answer_text(answer), 3),
        ("raw completion", completion, 3),
    ]
    y = 0.98
    for name, text, lines in parts:
        ax.text(0.0, y, name, fontsize=8, fontweight="bold", va="top", transform=ax.transAxes)
        body = _wrap(text, lines=lines)
        colour = "black"
        if name == "prediction":
            colour = GT_COLOUR if score >= 1.0 - 1e-9 else PRED_COLOUR
        ax.text(
            0.0,
            y - 0.055,
            body,
            fontsize=8,
            va="top",
            color=colour,
            transform=ax.transAxes,
            family="monospace" if name == "raw completion" else None,
        )
        y -= 0.075 + 0.052 * (body.count("\n") + 1)


def _example_plot(
    index: int,
    pred: Prediction,
    image_loader: Callable[[RoiSample], np.ndarray] | None,
    path: Path,
) -> tuple[Path, float]:
    sample = pred.sample
    task = sample_task(sample)
    key = sample_key(sample)
    score = score_prediction(pred)
    answer = parse_answer(task, pred.completion, sample.labels, options=sample.options)
    target = parse_target(sample)
    image = _load_image(sample, image_loader)
    metric = _headline(key)
    if task is Task.VQA:
        metric = "exact match" if (sample.options or sample.labels) else "token F1"
    title = f"#{index} {sample.id} · {key} · {metric} = {score:.2f}"
    # fixed layouts (no constrained layout): one draw per figure, and images dominate the cost
    if isinstance(target, DetectionAnswer | SegmentationAnswer):
        fig = Figure(figsize=(5.6, 6.0))
        if isinstance(answer, Unparseable):
            title += "\n" + _wrap(_answer_text(answer), width=80, lines=2)
        ax = fig.add_axes((0.02, 0.02, 0.96, 0.9 - 0.03 * title.count("\n")))
        _draw_overlay(ax, image, target, answer)
        fig.suptitle(title, fontsize=9, y=0.985, va="top")
    else:
        if image is None:
            fig = Figure(figsize=(6.4, 4.0))
            _text_card(
                fig.add_axes((0.03, 0.03, 0.94, 0.86)), sample, answer, pred.completion, score
            )
        else:
            fig = Figure(figsize=(9.6, 4.0))
            ax_img = fig.add_axes((0.01, 0.03, 0.37, 0.86))
            ax_img.imshow(image, cmap="gray" if image.ndim == 2 else None)
            ax_img.axis("off")
            ax_txt = fig.add_axes((0.40, 0.03, 0.59, 0.86))
            _text_card(ax_txt, sample, answer, pred.completion, score)
        fig.suptitle(title, fontsize=9, y=0.975, va="top")
    return _save(fig, path), score


# ---------------------------------------------------------------------------------------------
# Markdown


_FIRST = ("n", "score", "score_se")
_LAST = ("format_rate", "parse_rate")
_NOT_METRICS = ("constant", "candidates")


def _metric_rows(columns: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for m in columns:
        for name in m:
            if name not in _NOT_METRICS:
                seen.setdefault(name, None)
    middle = [k for k in seen if k not in _FIRST and k not in _LAST]
    return [k for k in _FIRST if k in seen] + middle + [k for k in _LAST if k in seen]


def _summary_md(
    comparison: Mapping[str, Any], stage_metrics: Mapping[str, Metrics], baseline: Metrics
) -> str:
    stages = list(stage_metrics)
    pairs = list(itertools.pairwise(stages))
    head = ["task", "headline", "n", "baseline", *stages]
    head += [f"{s} above chance" for s in stages] + [f"{b} vs {a}" for a, b in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, entry in comparison.items():
        st = entry["stages"]
        sources = [baseline, *stage_metrics.values()]
        n = next((m[key]["n"] for m in sources if "n" in (m.get(key) or {})), None)
        row = [f"`{key}`", entry["headline"], _fmt(n, "n"), _fmt(entry["baseline"])]
        for s in stages:
            if s in st:
                row.append(f"{st[s]['score']:.3f} ± {st[s]['score_se']:.3f}")
            else:
                row.append("–")
        for s in stages:
            if s in st and "above_chance_verdict" in st[s]:
                row.append(f"{st[s]['above_chance_verdict']} ({st[s]['vs_baseline']:+.3f})")
            else:
                row.append("–")
        for a, b in pairs:
            vs = st.get(b, {}).get("vs_previous")
            if vs is not None and vs["stage"] == a:
                how = "paired " if vs.get("paired") else ""
                row.append(f"{vs['verdict']} ({vs['delta']:+.3f} ± {how}{vs['se']:.3f})")
            else:
                row.append("–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _task_md(key: str, stages: Mapping[str, Metrics], baseline: Metrics) -> str:
    columns = [("baseline", baseline.get(key) or {})]
    columns += [(name, m.get(key) or {}) for name, m in stages.items()]
    rows = _metric_rows([c for _, c in columns])
    head = ["metric"] + [name for name, _ in columns]
    lines = [f"### `{key}` (headline: {_headline(key)})", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in rows:
        lines.append(
            "| " + " | ".join([metric] + [_fmt(c.get(metric), metric) for _, c in columns]) + " |"
        )
    base = baseline.get(key)
    if base and "constant" in base:
        lines += [
            "",
            f"Constant baseline answer: `{_md(str(base['constant']), 120)}` (best of "
            f"{_fmt(base.get('candidates'), 'n')} candidates).",
        ]
    return "\n".join(lines)


def _history_md(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    lines: list[str] = []
    for stage, rows in history.items():
        if not rows:
            continue
        last = {k: v for k, v in rows[-1].items() if _num(v) is not None and k not in _NOT_SERIES}
        shown = ", ".join(f"{k} = {float(v):.4g}" for k, v in list(last.items())[:10])
        lines.append(f"- **{stage}**: {len(rows)} logged steps; last: {shown or '–'}")
    return lines


# ---------------------------------------------------------------------------------------------
# Entry point


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    stages: Mapping[str, Metrics],
    baseline: Metrics,
    history: Mapping[str, Sequence[Mapping[str, Any]]],
    paired: Paired | None = None,
    held_out: Sequence[HeldOut] = (),
    examples: Sequence[Prediction] | None = None,
    image_loader: Callable[[RoiSample], np.ndarray] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` under ``out_dir``.

    ``stages`` are the main held-out set's metrics (``paired``: their paired differences);
    ``held_out`` adds other sets, each with its summary table and scores plot.

    Returns the written files keyed by their path relative to ``out_dir`` (e.g.
    ``"plots/scores.png"``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({*baseline, *(k for m in stages.values() for k in m)})
    comparison = _comparison(keys, stages, baseline, paired)
    written: dict[str, Path] = {}

    def rel(path: Path) -> str:
        return path.relative_to(out).as_posix()

    scores_png = _scores_plot(keys, stages, baseline, out / "plots" / "scores.png")
    if scores_png is not None:
        written[rel(scores_png)] = scores_png
    others: list[dict[str, Any]] = []
    for other in held_out:
        path = out / "plots" / f"scores_{_safe_name(other.name)}.png"
        png = _scores_plot(keys, other.stages, baseline, path)
        if png is not None:
            written[rel(png)] = png
        others.append(
            {
                "name": other.name,
                "stages": other.stages,
                "comparison": _comparison(keys, other.stages, baseline, other.paired),
                "plot": None if png is None else rel(png),
            }
        )
    history_pngs: dict[str, str] = {}
    for stage, rows in history.items():
        if rows:
            path = out / "plots" / f"history_{_safe_name(stage)}.png"
            png = _history_plot(stage, rows, path)
            if png is not None:
                history_pngs[stage] = rel(png)
                written[rel(png)] = png
    example_rows: list[dict[str, Any]] = []
    for stale in (out / "plots" / "examples").glob("*.png"):  # a previous report's overlays
        stale.unlink()
    for i, pred in enumerate(examples or ()):
        path = out / "plots" / "examples" / f"{i:03d}_{_safe_name(pred.sample.id)}.png"
        png, score = _example_plot(i, pred, image_loader, path)
        written[rel(png)] = png
        example_rows.append(
            {
                "id": pred.sample.id,
                "key": sample_key(pred.sample),
                "prompt": pred.sample.prompt,
                "target": pred.sample.target,
                "completion": pred.completion,
                "score": score,
                "plot": rel(png),
            }
        )

    report = {
        "title": title,
        "tasks": keys,
        "headline": {k: _headline(k) for k in keys},
        "baseline": baseline,
        "stages": stages,
        "comparison": comparison,
        "held_out": others,
        "history": history,
        "examples": example_rows,
        "plots": sorted(written),
        "extra": extra or {},
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    written["report.json"] = json_path

    md = [f"# {title}", ""]
    md += [
        "Headline score per task: classification accuracy, detection mean per-image F1 at IoU "
        "0.5, segmentation mean per-image Dice, VQA exact match (closed) / token F1 (open). "
        "*Baseline* is the best constant answer on the eval set (an optimistic chance level). "
        f"*Above chance*: `yes` beats it by more than {_NOISE_SE:g} SE, `marginal` by less; "
        f"stage changes are `improved`/`worse` beyond {_NOISE_SE:g} SE of the difference.",
        "",
        "## Summary",
        "",
    ]
    md += [_summary_md(comparison, stages, baseline) if keys else "No tasks evaluated.", ""]
    if scores_png is not None:
        md += [f"![headline scores]({rel(scores_png)})", ""]
    for other in others:
        md += [f"## Held-out set: {other['name']}", ""]
        md += [_summary_md(other["comparison"], other["stages"], baseline) if keys else "", ""]
        if other["plot"] is not None:
            md += [f"![headline scores, {other['name']}]({other['plot']})", ""]
    if keys:
        md += ["## Metrics per task", ""]
        for key in keys:
            md += [_task_md(key, stages, baseline), ""]
    history_lines = _history_md(history)
    if history_lines or history_pngs:
        md += ["## Training curves", "", *history_lines, ""]
        for stage, png in history_pngs.items():
            md += [f"![{stage} training curves]({png})", ""]
    if example_rows:
        md += ["## Examples", "", "| # | id | task | score | target | completion |"]
        md += ["|---|---|---|---|---|---|"]
        for i, ex in enumerate(example_rows):
            md.append(
                f"| {i} | {_md(ex['id'], 40)} | `{ex['key']}` | {ex['score']:.3f} | "
                f"{_md(ex['target'])} | {_md(ex['completion'])} |"
            )
        md.append("")
        for i, ex in enumerate(example_rows):
            md += [f"![example {i}: {_md(ex['id'], 40)}]({ex['plot']})", ""]
    if extra:
        md += ["## Run details", "", "```json", json.dumps(_jsonable(extra), indent=2), "```", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    written["report.md"] = md_path
    return written
