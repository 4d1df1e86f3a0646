"""Seeded synthetic H&E regions of interest (ROIs) with ground truth for every ROI task.

Design decisions
----------------
- One scene per sample: :func:`render_roi` draws a tissue class (tumour, stroma, normal gland,
  necrosis, lymphocyte-rich) and renders it at 224-448 px with its ground truth (nuclei as
  ellipses with analytic boxes, glands / tumour nests as smooth star-shaped regions with a pixel
  mask and a polygon outline). Every sample type (classification, detection, segmentation, VQA)
  is read off the same scene, so answers are true of the pixels.
- Colour by Beer-Lambert from hematoxylin / eosin concentration maps (as in ``slides.py``), so
  every pixel looks like H&E. Per-sample stain jitter (concentration scale per stain, stain
  vector tilt, brightness) is wide on purpose: class mean colours overlap (tumour vs
  lymphocyte-rich, stroma vs necrosis), so a classifier has to use texture, nuclei size, shape
  and density, and layout (glands' lumina, fibres), not the mean colour.
- Vectorised numpy: smooth noise is a low-resolution Gaussian grid upsampled by PIL (bilinear),
  fibres are warped sinusoids on a randomly rotated axis, and all nuclei are rendered at once as
  stacked patches scattered into the image with one ``np.bincount``. Nuclei sit on a jittered
  grid (one per cell at most, radius below half a cell), so they never overlap and every box
  covers exactly one nucleus. Necrotic debris is sub-nuclear speckle, not detected.
- Boxes are the ellipse's analytic extent (pixel-edge coordinates) clipped to the image,
  normalised to 0-1000 and rounded to 0.1; polygons are 32 samples of the smooth outline,
  clamped to the image, so the polygon rasterises to the generator's mask within a few percent.
- VQA questions never contain their answer: yes/no presence questions are balanced (the queried
  class is the true one half the time), the dominant-class and nuclei-count questions are closed
  with the answer among shuffled options, and the open "describe" question is answered by a short
  class-specific description whose words do not appear in the question.
- Determinism: every random draw comes from ``np.random.default_rng`` seeded from
  ``(seed, task, index)``; PIL resizing is deterministic, so the same arguments give the same
  pixels and targets on every machine.
- Target length is set by a :class:`RoiProfile` (keyword ``profile``; ``RoiProfile()``, the
  default, is the full-size generator described above, byte for byte). :data:`COMPACT` is for a
  tiny demo model: 224 px ROIs and integer coordinates everywhere (``format_answer`` prints
  them without ".0"). Detection scenes keep one of their nuclei (``max_nuclei=1``), picked
  before rendering so the image shows exactly the annotated nucleus (wholly inside the image),
  scaled 8x (shorter box side 30-107 px, median ~49 px; per-class sizes and shapes are kept,
  so stroma's spindle nuclei stay thin), on the class's usual background. The size is what
  lets a tiny model localise at all: a nucleus must cover several of the 64 image tokens
  (28 px each) to draw attention; at 3.5-5x a tiny model's boxes stayed constant whatever the
  image. Segmentation scenes have one region outlined by 4 vertices sampled (from
  a random angle in the first quarter turn, so vertex k always lies in the k-th quadrant
  around the centre) on the smooth outline and snapped to the answer's 0-1000 integer grid;
  the region is painted as that polygon's pixel-centre raster
  (``training.metrics.rasterize_polygon``), lumen and rim nuclei follow the polygon, so the
  generator mask is exactly the answer's raster. The builtin tokenizer splits digits, so a
  box costs ~30-35 tokens and a 4-vertex polygon ~50: detection / segmentation targets are
  ~34 / ~52 tokens (median; p90 34 / 56), from ~2,000 / ~900 by default. Classification and
  VQA scenes change only in size (so the VQA count question still counts the full scene).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from smartpath.model.grammar import (
    Answer,
    Detection,
    DetectionAnswer,
    LabelAnswer,
    Polygon,
    Scale,
    SegmentationAnswer,
    Task,
    TextAnswer,
    format_answer,
)
from smartpath.model.prompts import PromptStyle, build_prompt
from smartpath.training.metrics import rasterize_polygon

__all__ = [
    "COMPACT",
    "COUNT_OPTIONS",
    "NUCLEUS_LABELS",
    "REGION_LABELS",
    "TISSUE_CLASSES",
    "Nucleus",
    "Region",
    "RoiProfile",
    "RoiSample",
    "RoiScene",
    "count_option",
    "generate_roi_samples",
    "make_roi_sample",
    "render_roi",
]

TISSUE_CLASSES: tuple[str, ...] = (
    "tumour",
    "stroma",
    "normal gland",
    "necrosis",
    "lymphocyte-rich",
)
NUCLEUS_LABELS: tuple[str, ...] = ("tumour nucleus", "lymphocyte", "other nucleus")
REGION_LABELS: tuple[str, ...] = ("gland", "tumour")
COUNT_OPTIONS: tuple[str, ...] = ("0-20", "21-60", "61-120", "more than 120")
ROI_SIZES: tuple[int, ...] = (224, 256, 288, 320, 352, 384, 416, 448)

_GLASS_OD = -np.log(np.array([243.0, 242.0, 240.0]) / 255.0)
_H_OD = np.array([0.62, 0.80, 0.28])
_E_OD = np.array([0.10, 0.95, 0.42])
_N_VERTS = 32

_DESCRIPTIONS = {
    "tumour": "sheets of large pleomorphic atypical cells with crowded hyperchromatic nuclei",
    "stroma": "wavy pink collagen fibres with sparse spindle cells",
    "normal gland": "round glands lined by orderly epithelium around open lumina",
    "necrosis": "amorphous eosinophilic debris with scattered karyorrhectic fragments",
    "lymphocyte-rich": "dense infiltrate of small round dark lymphoid cells",
}
_PRESENCE = {
    "tumour": "Is tumour present in this region?",
    "stroma": "Is this region predominantly fibrous stroma?",
    "normal gland": "Are normal glands present?",
    "necrosis": "Is necrosis present?",
    "lymphocyte-rich": "Is there a dense lymphocytic infiltrate?",
}
_VQA_KINDS = ("presence", "dominant", "count", "describe")
_NUCLEUS_GAP = 2.0  # px between the boxes of nuclei kept by ``max_nuclei`` / ``nucleus_scale``


@dataclass(frozen=True)
class RoiProfile:
    """How big and detailed generated samples are; ``RoiProfile()`` is the full-size default.

    ``size`` and ``coord_decimals`` apply to every task; ``max_nuclei`` and ``nucleus_scale``
    shape detection scenes only, ``max_regions``, ``polygon_vertices`` and ``polygon_regions``
    segmentation scenes only (classification and VQA scenes keep their full look).
    """

    size: int | None = None
    """ROI side in px; None: random 224-448 (detection: 224 or 256)."""
    max_nuclei: int | None = None
    """Detection: keep a random 1..max_nuclei of the scene's nuclei (None: all), chosen before
    rendering; kept nuclei lie wholly inside the image and their boxes do not touch."""
    nucleus_scale: float = 1.0
    """Detection: nuclei semi-axes are multiplied by this (shape and orientation kept)."""
    max_regions: int | None = None
    """Segmentation: at most this many glands / tumour nests (None: the class's usual 1-5)."""
    polygon_vertices: int = _N_VERTS
    """Vertices sampled from each region's smooth outline."""
    polygon_regions: bool = False
    """Segmentation: paint each region as its answer polygon (vertices snapped to the answer's
    coordinate grid, pixel-centre rasterised) instead of the smooth outline."""
    coord_decimals: int = 1
    """Decimals of the 0-1000 box / polygon coordinates (0: integers, printed without .0)."""

    def __post_init__(self) -> None:
        if self.size is not None and not 32 <= self.size <= 2048:
            raise ValueError(f"size must be in 32..2048 px, got {self.size}")
        if self.max_nuclei is not None and self.max_nuclei < 1:
            raise ValueError(f"max_nuclei must be >= 1 or None, got {self.max_nuclei}")
        if not 0.25 <= self.nucleus_scale <= 8.0:
            raise ValueError(f"nucleus_scale must be in 0.25..8, got {self.nucleus_scale}")
        if self.max_regions is not None and self.max_regions < 1:
            raise ValueError(f"max_regions must be >= 1 or None, got {self.max_regions}")
        if not 3 <= self.polygon_vertices <= 256:
            raise ValueError(f"polygon_vertices must be in 3..256, got {self.polygon_vertices}")
        if not 0 <= self.coord_decimals <= 3:
            raise ValueError(f"coord_decimals must be in 0..3, got {self.coord_decimals}")


COMPACT = RoiProfile(
    size=224,
    max_nuclei=1,
    nucleus_scale=8.0,
    max_regions=1,
    polygon_vertices=4,
    polygon_regions=True,
    coord_decimals=0,
)
"""Short targets for a tiny demo model: one large nucleus per detection image, one
four-vertex region per segmentation image (targets of ~30-60 builtin tokens)."""


@dataclass(frozen=True)
class Nucleus:
    """One rendered nucleus: an ellipse in pixel coordinates and its box (pixel edges)."""

    label: str
    cx: float
    cy: float
    a: float  # semi-axis along ``angle``
    b: float
    angle: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A gland or tumour nest: its pixel mask and polygon outline (pixel coordinates)."""

    label: str
    points: np.ndarray  # (N, 2) float x, y
    mask: np.ndarray  # (H, W) bool


@dataclass(frozen=True)
class RoiScene:
    """A rendered ROI and its ground truth."""

    image: np.ndarray  # (H, W, 3) uint8
    tissue_class: str
    nuclei: tuple[Nucleus, ...]
    regions: tuple[Region, ...]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.image.shape[0], self.image.shape[1]


@dataclass(frozen=True)
class RoiSample:
    """One training sample: image, prompt and typed target (``target_text`` is canonical)."""

    id: str
    image: np.ndarray
    task: Task
    scale: str
    prompt: str
    labels: tuple[str, ...] | None
    options: tuple[str, ...] | None
    question: str | None
    target: Answer
    target_text: str
    tissue_class: str
    scene: RoiScene


# ---------------------------------------------------------------------------------------------
# Rendering helpers


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth zero-mean, unit-ish noise with features about ``cell`` px across."""
    gh, gw = max(2, math.ceil(h / cell) + 2), max(2, math.ceil(w / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize(
        (w, h), Image.Resampling.BICUBIC, box=(0.5, 0.5, gw - 1.5, gh - 1.5)
    )
    return np.asarray(img, dtype=np.float32)


def _star_shape(
    rng: np.random.Generator, cx: float, cy: float, r: float, irregular: float
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth star-shaped outline: Fourier coefficients (k=2..5) of its radius function."""
    ks = np.arange(2, 6)
    amps = rng.uniform(0.0, irregular, size=4) / ks
    phases = rng.uniform(0.0, 2 * math.pi, size=4)
    return np.stack([amps, phases]), np.array([cx, cy, r])


def _radius(coef: np.ndarray, geo: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Radius function at unit complex directions ``z`` (cos(k theta + phi) = Re(e^(i phi) z^k),
    by repeated products: no trigonometry per pixel)."""
    amps, phases = coef
    zk = z * z
    wave = np.zeros(z.shape, dtype=np.float64)
    for amp, phase in zip(amps, phases, strict=True):
        wave += amp * (zk * complex(math.cos(phase), math.sin(phase))).real
        zk = zk * z
    return geo[2] * (1.0 + wave)


def _unit(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance and unit complex direction of offsets (dx, dy)."""
    d = np.hypot(dx, dy)
    return d, (dx + 1j * dy) / np.maximum(d, 1e-9)


@dataclass(frozen=True)
class _Outline:
    """How a region's outline is sampled: vertex count, first-vertex angle, and the answer's
    coordinate decimals when the region is painted as its polygon (None: smooth mask)."""

    vertices: int
    phase: float
    snap: int | None


def _region(
    coef: np.ndarray,
    geo: np.ndarray,
    label: str,
    yy: np.ndarray,
    xx: np.ndarray,
    outline: _Outline | None = None,
) -> Region:
    """A region from its smooth outline: by default the mask is the outline and the points are
    ``_N_VERTS`` samples of it from angle 0; ``outline`` sets the vertex count and first angle
    and, with ``snap`` decimals, snaps the points to the answer's grid and makes the mask their
    pixel-centre raster (square ROIs)."""
    h, w = yy.shape[0], xx.shape[1]
    n_verts = _N_VERTS if outline is None else outline.vertices
    phase = 0.0 if outline is None else outline.phase
    theta = np.linspace(0.0, 2 * math.pi, n_verts, endpoint=False) + phase
    r = _radius(coef, geo, np.exp(1j * theta))
    pts = np.stack([geo[0] + r * np.cos(theta), geo[1] + r * np.sin(theta)], axis=1)
    pts[:, 0] = np.clip(pts[:, 0], 0.0, w)
    pts[:, 1] = np.clip(pts[:, 1], 0.0, h)
    if outline is None or outline.snap is None:
        d, z = _unit(xx - geo[0], yy - geo[1])
        return Region(label, pts, d < _radius(coef, geo, z))
    # Snap to the answer's grid (as ``_segments`` will print it), drop repeats, raster exactly.
    norm = np.round(pts / np.array([w, h]) * 1000.0, outline.snap)
    norm = np.array(list(dict.fromkeys(map(tuple, norm.tolist()))), dtype=np.float64)
    pts = norm / 1000.0 * np.array([w, h])
    mask = rasterize_polygon(norm, w) if len(norm) >= 3 else np.zeros((h, w), dtype=bool)
    return Region(label, pts, mask)


def _scaled_polygon_mask(pts: np.ndarray, cx: float, cy: float, k: float, n: int) -> np.ndarray:
    """Pixel-centre raster of polygon ``pts`` (pixels) scaled by ``k`` about (cx, cy)."""
    scaled = np.array([cx, cy]) + k * (pts - np.array([cx, cy]))
    return rasterize_polygon(scaled / n * 1000.0, n)


def _polygon_radius(pts: np.ndarray, cx: float, cy: float, angles: np.ndarray) -> np.ndarray:
    """Distance from (cx, cy) to the polygon's boundary along each angle (farthest crossing)."""
    p, q = pts, np.roll(pts, -1, axis=0)
    e = q - p  # (E, 2)
    f = p - np.array([cx, cy])
    dx, dy = np.cos(angles)[:, None], np.sin(angles)[:, None]  # (K, 1)
    den = dx * e[None, :, 1] - dy * e[None, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (f[None, :, 0] * e[None, :, 1] - f[None, :, 1] * e[None, :, 0]) / den
        u = (f[None, :, 0] * dy - f[None, :, 1] * dx) / den
    ok = (np.abs(den) > 1e-12) & (u >= -1e-9) & (u <= 1.0 + 1e-9) & (t > 0)
    return np.where(ok, t, 0.0).max(axis=1)


def _grid_points(rng: np.random.Generator, h: int, w: int, cell: float, keep: float) -> np.ndarray:
    """Jittered-grid points (one per cell at most, kept with probability ``keep``), (N, 2)."""
    nx, ny = math.ceil(w / cell), math.ceil(h / cell)
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    jit = rng.uniform(0.3, 0.7, size=(2, ny, nx))
    pts = np.stack([(gx + jit[0]) * cell, (gy + jit[1]) * cell], axis=-1).reshape(-1, 2)
    pts = pts[rng.random(len(pts)) < keep]
    return pts[(pts[:, 0] < w) & (pts[:, 1] < h)]


def _nuclei_layer(
    nuclei: list[Nucleus], h: int, w: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (0-1) and per-nucleus darkness maps of all nuclei, rendered at once."""
    cover = np.zeros(h * w, dtype=np.float64)
    dark = np.zeros(h * w, dtype=np.float64)
    if not nuclei:
        return cover.reshape(h, w), dark.reshape(h, w)
    arr = np.array([(n.cx, n.cy, n.a, n.b, n.angle) for n in nuclei], dtype=np.float64)
    strength = rng.uniform(0.85, 1.15, size=len(nuclei))
    half = math.ceil(arr[:, 2].max()) + 2
    offs = np.arange(-half, half + 1, dtype=np.float64)
    ix = np.floor(arr[:, 0])[:, None, None] + offs[None, None, :]
    iy = np.floor(arr[:, 1])[:, None, None] + offs[None, :, None]
    dx = ix + 0.5 - arr[:, 0, None, None]
    dy = iy + 0.5 - arr[:, 1, None, None]
    c, s = np.cos(arr[:, 4])[:, None, None], np.sin(arr[:, 4])[:, None, None]
    u, v = dx * c + dy * s, -dx * s + dy * c
    q = np.sqrt((u / arr[:, 2, None, None]) ** 2 + (v / arr[:, 3, None, None]) ** 2)
    cov = np.clip((1.0 - q) * arr[:, 3, None, None] + 0.5, 0.0, 1.0)
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h) & (cov > 0)
    ok = np.broadcast_to(ok, cov.shape)
    flat = (np.broadcast_to(iy, cov.shape) * w + np.broadcast_to(ix, cov.shape))[ok].astype(
        np.int64
    )
    cover += np.bincount(flat, weights=cov[ok], minlength=h * w)
    dark += np.bincount(flat, weights=(cov * strength[:, None, None])[ok], minlength=h * w)
    return np.minimum(cover, 1.0).reshape(h, w), dark.reshape(h, w)


def _make_nucleus(
    label: str, cx: float, cy: float, a: float, b: float, angle: float, h: int, w: int
) -> Nucleus:
    hx = math.sqrt((a * math.cos(angle)) ** 2 + (b * math.sin(angle)) ** 2)
    hy = math.sqrt((a * math.sin(angle)) ** 2 + (b * math.cos(angle)) ** 2)
    box = (max(0.0, cx - hx), max(0.0, cy - hy), min(float(w), cx + hx), min(float(h), cy + hy))
    return Nucleus(label, cx, cy, a, b, angle, box)


def _pick_nuclei(
    rng: np.random.Generator,
    nuclei: list[Nucleus],
    max_nuclei: int | None,
    scale: float,
    h: int,
    w: int,
) -> list[Nucleus]:
    """Scale the scene's nuclei and keep a random 1..``max_nuclei`` (all that fit when None)
    of those wholly inside the image whose boxes stay ``_NUCLEUS_GAP`` px apart."""
    cands = []
    for n in nuclei:
        big = _make_nucleus(n.label, n.cx, n.cy, n.a * scale, n.b * scale, n.angle, h, w)
        hx, hy = (big.box[2] - big.box[0]) / 2, (big.box[3] - big.box[1]) / 2
        if big.cx - hx > 0 and big.cy - hy > 0 and big.cx + hx < w and big.cy + hy < h:
            cands.append(big)  # box not clipped: wholly inside
    want = len(cands) if max_nuclei is None else int(rng.integers(1, max_nuclei + 1))
    kept: list[int] = []
    for i in rng.permutation(len(cands)):
        if len(kept) >= want:
            break
        x1, y1, x2, y2 = cands[i].box
        g = _NUCLEUS_GAP
        if all(
            x1 >= cands[j].box[2] + g
            or x2 <= cands[j].box[0] - g
            or y1 >= cands[j].box[3] + g
            or y2 <= cands[j].box[1] - g
            for j in kept
        ):
            kept.append(int(i))
    return [cands[i] for i in sorted(kept)]


def _add_nuclei(
    out: list[Nucleus],
    rng: np.random.Generator,
    pts: np.ndarray,
    label: str,
    a_range: tuple[float, float],
    aspect: tuple[float, float],
    h: int,
    w: int,
    angle: float | None = None,
) -> None:
    for x, y in pts:
        a = rng.uniform(*a_range)
        b = a / rng.uniform(*aspect)
        ang = rng.uniform(0, math.pi) if angle is None else angle + rng.normal(0, 0.15)
        out.append(_make_nucleus(label, float(x), float(y), a, b, ang, h, w))


# ---------------------------------------------------------------------------------------------
# Scenes


def render_roi(
    rng: np.random.Generator,
    tissue_class: str | None = None,
    size: int | None = None,
    *,
    max_nuclei: int | None = None,
    nucleus_scale: float = 1.0,
    max_regions: int | None = None,
    polygon_vertices: int = _N_VERTS,
    polygon_regions: bool = False,
    coord_decimals: int = 1,
) -> RoiScene:
    """Render one ROI of ``tissue_class`` (random if None) at ``size`` px square (random
    224-448 if None), with its nuclei and regions.

    The keywords are :class:`RoiProfile`'s (defaults: the full scene): ``max_nuclei`` /
    ``nucleus_scale`` pick and scale the nuclei before they are rendered; ``max_regions`` caps
    glands / nests; ``polygon_vertices`` samples each outline; ``polygon_regions`` paints each
    region as its polygon snapped to the ``coord_decimals`` grid of 0-1000 coordinates.
    """
    if tissue_class is None:
        tissue_class = str(rng.choice(TISSUE_CLASSES))
    if tissue_class not in TISSUE_CLASSES:
        raise ValueError(f"unknown tissue class {tissue_class!r}; one of {TISSUE_CLASSES}")
    n = int(rng.choice(ROI_SIZES)) if size is None else int(size)
    if not 32 <= n <= 2048:
        raise ValueError(f"ROI size must be in 32..2048 px, got {n}")
    h = w = n
    yy = np.arange(h, dtype=np.float32)[:, None] + np.float32(0.5)
    xx = np.arange(w, dtype=np.float32)[None, :] + np.float32(0.5)

    # Fibrous background (used by most classes): warped sinusoid on a random axis.
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(7.0, 14.0)
    warp = _noise(rng, h, w, 40.0) * rng.uniform(1.0, 3.0)
    k = np.float32(2 * math.pi / period)
    axis = xx * np.float32(k * math.cos(theta)) + yy * np.float32(k * math.sin(theta))
    fibre = np.sin(axis + warp)
    fibre = 0.5 + 0.5 * fibre
    fibre = fibre * fibre * fibre
    mottle = _noise(rng, h, w, 24.0)
    fine = _noise(rng, h, w, 3.0)

    nuclei: list[Nucleus] = []
    regions: list[Region] = []
    hema = np.full((h, w), 0.08) + 0.03 * fine

    def outline() -> _Outline | None:
        if not polygon_regions and polygon_vertices == _N_VERTS:
            return None  # the default: smooth mask, 32 vertices from angle 0, no draws
        phase = float(rng.uniform(0.0, 2 * math.pi / polygon_vertices))
        return _Outline(polygon_vertices, phase, coord_decimals if polygon_regions else None)

    def n_regions(drawn: int) -> int:
        return drawn if max_regions is None else min(drawn, max_regions)

    eosin = 0.45 + 0.55 * fibre + 0.08 * mottle

    if tissue_class == "stroma":
        pts = _grid_points(rng, h, w, 26.0, rng.uniform(0.25, 0.5))
        _add_nuclei(nuclei, rng, pts, "other nucleus", (6.0, 9.0), (2.5, 3.5), h, w, theta)
    elif tissue_class == "necrosis":
        eosin = 0.75 + 0.18 * mottle + 0.05 * fine
        hema = 0.18 + 0.06 * _noise(rng, h, w, 12.0)
        debris = np.clip(_noise(rng, h, w, 2.0) - 1.6, 0.0, None)
        hema = hema + 1.2 * debris
        pts = _grid_points(rng, h, w, 30.0, rng.uniform(0.1, 0.3))
        _add_nuclei(nuclei, rng, pts, "other nucleus", (2.6, 3.4), (1.0, 1.2), h, w)
    elif tissue_class == "lymphocyte-rich":
        eosin = 0.35 + 0.2 * fibre + 0.08 * mottle
        hema = hema + 0.12
        pts = _grid_points(rng, h, w, rng.uniform(9.5, 12.0), rng.uniform(0.55, 0.85))
        _add_nuclei(nuclei, rng, pts, "lymphocyte", (2.8, 3.8), (1.0, 1.15), h, w)
    elif tissue_class == "normal gland":
        eosin = 0.35 + 0.45 * fibre + 0.08 * mottle
        placed: list[tuple[float, float, float]] = []
        for _ in range(n_regions(int(rng.integers(2, 6)))):
            for _try in range(12):
                r = rng.uniform(0.09, 0.2) * n
                cx, cy = rng.uniform(0.12, 0.88, size=2) * n
                if all(math.hypot(cx - px, cy - py) > 1.5 * (r + pr) for px, py, pr in placed):
                    break
            else:
                continue
            placed.append((cx, cy, r))
            coef, geo = _star_shape(rng, cx, cy, r, 0.35)
            style = outline()
            reg = _region(coef, geo, "gland", yy, xx, style)
            regions.append(reg)
            # Lumen: inner 62 % of the radius function (of the polygon when painted as one).
            if style is not None and style.snap is not None:
                lumen = _scaled_polygon_mask(reg.points, cx, cy, 0.62, n)
            else:
                dist, z = _unit(xx - cx, yy - cy)
                lumen = dist < 0.62 * _radius(coef, geo, z)
            eosin = np.where(reg.mask, np.where(lumen, 0.06, 0.55 + 0.1 * mottle), eosin)
            hema = np.where(reg.mask, np.where(lumen, 0.02, 0.25), hema)
            # Basal nuclei along the rim, oriented radially.
            k = max(6, int(2 * math.pi * r / 11.0))
            angs = np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.uniform(0, 1)
            if style is not None and style.snap is not None and len(reg.points) >= 3:
                rr = _polygon_radius(reg.points, cx, cy, angs) * 0.84
            else:
                rr = _radius(coef, geo, np.exp(1j * angs)) * 0.84
            for ang, rad in zip(angs, rr, strict=True):
                px, py = cx + rad * math.cos(ang), cy + rad * math.sin(ang)
                if 0 <= px < w and 0 <= py < h:
                    a = rng.uniform(4.0, 5.0)
                    nuclei.append(_make_nucleus("other nucleus", px, py, a, a / 1.6, ang, h, w))
        pts = _grid_points(rng, h, w, 30.0, 0.3)
        for px, py, pr in placed:
            pts = pts[np.hypot(pts[:, 0] - px, pts[:, 1] - py) > 1.5 * pr + 8.0]
        _add_nuclei(nuclei, rng, pts, "other nucleus", (6.0, 8.0), (2.5, 3.5), h, w, theta)
    else:  # tumour: large irregular nests of crowded pleomorphic cells in desmoplastic stroma
        eosin = 0.45 + 0.5 * fibre + 0.08 * mottle
        inside = np.zeros((h, w), dtype=bool)
        for _ in range(n_regions(int(rng.integers(1, 4)))):
            r = rng.uniform(0.22, 0.4) * n
            cx, cy = rng.uniform(0.15, 0.85, size=2) * n
            coef, geo = _star_shape(rng, cx, cy, r, 0.6)
            reg = _region(coef, geo, "tumour", yy, xx, outline())
            if reg.mask.sum() < 0.05 * n * n or (reg.mask & inside).any():
                continue
            regions.append(reg)
            inside |= reg.mask
        eosin = np.where(inside, 0.42 + 0.1 * mottle, eosin)
        hema = np.where(inside, 0.38 + 0.06 * fine, hema)
        cell = rng.uniform(17.0, 21.0)
        pts = _grid_points(rng, h, w, cell, 0.9)
        ins = inside[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        _add_nuclei(nuclei, rng, pts[ins], "tumour nucleus", (5.0, 7.8), (1.1, 1.7), h, w)
        lym = _grid_points(rng, h, w, 16.0, 0.2)
        grown = inside.copy()
        grown[:-6] |= inside[6:]
        grown[6:] |= inside[:-6]
        grown[:, :-6] |= inside[:, 6:]
        grown[:, 6:] |= inside[:, :-6]
        lym = lym[~grown[lym[:, 1].astype(int), lym[:, 0].astype(int)]]
        _add_nuclei(nuclei, rng, lym, "lymphocyte", (2.8, 3.6), (1.0, 1.15), h, w)

    if max_nuclei is not None or nucleus_scale != 1.0:
        nuclei = _pick_nuclei(rng, nuclei, max_nuclei, nucleus_scale, h, w)
    cover, dark = _nuclei_layer(nuclei, h, w, rng)
    nuc_h = {"tumour": 1.5, "lymphocyte-rich": 1.7, "necrosis": 1.8}.get(tissue_class, 1.35)
    hema = hema + dark * nuc_h * np.clip(1.0 + 0.2 * fine, 0.75, 1.25)
    eosin = eosin * (1.0 - 0.6 * cover)

    # Stain jitter: per-stain concentration scale, stain-vector tilt, brightness.
    h_scale, e_scale = rng.uniform(0.6, 1.45, size=2)
    h_od = _H_OD * rng.uniform(0.85, 1.15, size=3)
    e_od = _E_OD * rng.uniform(0.85, 1.15, size=3)
    od = (
        _GLASS_OD.astype(np.float32)
        + (h_scale * hema).astype(np.float32)[..., None] * h_od.astype(np.float32)
        + (e_scale * np.clip(eosin, 0.0, None)).astype(np.float32)[..., None]
        * e_od.astype(np.float32)
    )
    rgb = np.exp(-od)
    rgb *= np.float32(255.0 * rng.uniform(0.9, 1.05))
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(2.0)
    image = np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)
    return RoiScene(image, tissue_class, tuple(nuclei), tuple(regions))


# ---------------------------------------------------------------------------------------------
# Samples


def _norm(v: float, extent: int, decimals: int = 1) -> float:
    return round(min(1000.0, max(0.0, v / extent * 1000.0)), decimals)


def count_option(n: int) -> str:
    """The ``COUNT_OPTIONS`` bin holding ``n`` nuclei."""
    if n <= 20:
        return COUNT_OPTIONS[0]
    if n <= 60:
        return COUNT_OPTIONS[1]
    if n <= 120:
        return COUNT_OPTIONS[2]
    return COUNT_OPTIONS[3]


def _detections(scene: RoiScene, decimals: int = 1) -> DetectionAnswer:
    h, w = scene.size
    dets = []
    for nuc in scene.nuclei:
        x1, y1, x2, y2 = nuc.box
        box = (
            _norm(x1, w, decimals),
            _norm(y1, h, decimals),
            _norm(x2, w, decimals),
            _norm(y2, h, decimals),
        )
        if box[2] - box[0] >= 0.5 and box[3] - box[1] >= 0.5:  # drop slivers at the border
            dets.append(Detection(nuc.label, box))
    dets.sort(key=lambda d: (d.box[1], d.box[0]))
    return DetectionAnswer(tuple(dets))


def _segments(scene: RoiScene, decimals: int = 1) -> SegmentationAnswer:
    h, w = scene.size
    polys = []
    for reg in scene.regions:
        pts = tuple((_norm(x, w, decimals), _norm(y, h, decimals)) for x, y in reg.points)
        pts = tuple(dict.fromkeys(pts))  # clamping can repeat vertices
        if len(pts) >= 3:
            polys.append(Polygon(reg.label, pts))
    return SegmentationAnswer(tuple(polys))


def make_roi_sample(
    task: Task,
    seed: int,
    index: int = 0,
    *,
    tissue_class: str | None = None,
    vqa_kind: str | None = None,
    size: int | None = None,
    profile: RoiProfile | None = None,
    prompt_style: PromptStyle = "full",
) -> RoiSample:
    """One seeded sample for ``task``; the same arguments always give the same sample.

    ``vqa_kind`` (VQA only) is one of ``presence``, ``dominant``, ``count`` (closed) or
    ``describe`` (open); random when None. ``profile`` (default ``RoiProfile()``) sets size and
    detail, e.g. :data:`COMPACT`; an explicit ``size`` overrides ``profile.size``.
    ``prompt_style`` is the prompt's (:data:`smartpath.model.prompts.PROMPT_STYLES`).
    """
    task = Task(task)
    prof = RoiProfile() if profile is None else profile
    dec = prof.coord_decimals
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(task), int(index), 0x201])
    if task is Task.SEGMENTATION and tissue_class is None:
        # Mostly classes with regions; some negatives whose answer is [].
        tissue_class = str(rng.choice(["normal gland", "tumour", "stroma"], p=[0.45, 0.45, 0.1]))
    if size is None:
        size = prof.size
    if task is Task.DETECTION and size is None:
        size = int(rng.choice([224, 256]))  # keeps dense-lymphocyte targets a few hundred boxes
    det, seg = task is Task.DETECTION, task is Task.SEGMENTATION  # the only tasks with detail
    scene = render_roi(
        rng,
        tissue_class,
        size,
        max_nuclei=prof.max_nuclei if det else None,
        nucleus_scale=prof.nucleus_scale if det else 1.0,
        max_regions=prof.max_regions if seg else None,
        polygon_vertices=prof.polygon_vertices if seg else _N_VERTS,
        polygon_regions=prof.polygon_regions and seg,
        coord_decimals=dec,
    )
    labels: tuple[str, ...] | None = None
    options: tuple[str, ...] | None = None
    question: str | None = None
    target: Answer
    if task is Task.CLASSIFICATION:
        labels = TISSUE_CLASSES
        target = LabelAnswer(scene.tissue_class)
    elif task is Task.DETECTION:
        labels = NUCLEUS_LABELS
        question = "Detect every nucleus and give its type."
        target = _detections(scene, dec)
    elif task is Task.SEGMENTATION:
        labels = REGION_LABELS
        question = "Segment every gland and tumour region."
        target = _segments(scene, dec)
    elif task is Task.VQA:
        kind = vqa_kind or str(rng.choice(_VQA_KINDS))
        if kind == "presence":
            asked = scene.tissue_class
            if rng.random() < 0.5:
                asked = str(rng.choice([c for c in TISSUE_CLASSES if c != asked]))
            question = _PRESENCE[asked]
            options = ("yes", "no")
            target = TextAnswer("yes" if asked == scene.tissue_class else "no")
        elif kind == "dominant":
            question = "Which tissue type dominates this region?"
            options = tuple(str(c) for c in rng.permutation(TISSUE_CLASSES))
            target = TextAnswer(scene.tissue_class)
        elif kind == "count":
            question = "How many nuclei are visible?"
            options = COUNT_OPTIONS
            target = TextAnswer(count_option(len(_detections(scene, dec).detections)))
        elif kind == "describe":
            question = "Describe the dominant tissue in this region in one short phrase."
            target = TextAnswer(_DESCRIPTIONS[scene.tissue_class])
        else:
            raise ValueError(f"unknown vqa_kind {kind!r}; one of {_VQA_KINDS}")
    else:
        raise ValueError(f"no ROI samples for task {task!r}")
    prompt = build_prompt(
        task, Scale.ROI, question=question, labels=labels, options=options, style=prompt_style
    )
    return RoiSample(
        id=f"roi-{task.name.lower()}-{int(seed)}-{int(index):06d}",
        image=scene.image,
        task=task,
        scale="roi",
        prompt=prompt,
        labels=labels,
        options=options,
        question=question,
        target=target,
        target_text=format_answer(target),
        tissue_class=scene.tissue_class,
        scene=scene,
    )


def roi_sample_classes(
    task: Task, n: int, seed: int, classes: Sequence[str] | None = None
) -> list[str | None]:
    """The tissue class of each of the ``n`` samples :func:`generate_roi_samples` makes
    (None: the sample picks its own)."""
    pool = tuple(classes) if classes is not None else TISSUE_CLASSES
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(Task(task)), 0xBA1])
    order: list[str] = []
    out: list[str | None] = []
    for _ in range(n):
        if not order:
            order = [str(c) for c in rng.permutation(pool)]
        cls = order.pop()
        # segmentation picks its own mix of positives and negatives
        out.append(None if Task(task) is Task.SEGMENTATION and classes is None else cls)
    return out


def generate_roi_samples(
    task: Task,
    n: int,
    seed: int,
    classes: Sequence[str] | None = None,
    *,
    profile: RoiProfile | None = None,
) -> Iterator[RoiSample]:
    """``n`` samples for ``task``; classification/VQA/detection classes cycle through
    ``classes`` (default all) in seeded shuffled rounds, so classes are balanced. ``profile``
    as in :func:`make_roi_sample`."""
    for i, cls in enumerate(roi_sample_classes(task, n, seed, classes)):
        yield make_roi_sample(task, seed, i, tissue_class=cls, profile=profile)
