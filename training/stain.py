"""H&E stain in optical density: augmentation for training, and re-staining as another lab would.

Stain varies between labs (reagents, protocols, scanners) more than anything else a pathology
model meets. Both tools work on the stains' concentrations from colour deconvolution
(Ruifrok & Johnston 2001): optical density ``OD = -ln((I + 1) / 256)`` per RGB channel is a
sum of each stain's OD vector times its concentration, so ``C = OD · M⁻¹`` for the matrix ``M``
of the hematoxylin, eosin and residual (DAB) vectors.

- A :class:`Staining` is one lab's stain: OD vectors plus a scale and shift per stain. The
  tissue's concentrations are read with the standard vectors and recomposed with it.
- :func:`jitter_stains`: colour augmentation, each image in a :func:`random_staining`: HED
  jitter (Tellez et al. 2018: every stain's concentration scaled by ``U(1 - σ, 1 + σ)`` and
  shifted by ``U(-σ, σ)``) plus a random tilt of the H and E vectors, since labs differ in hue
  too, so training sees each image in many plausible stainings.
- :func:`restain`: the same tissue as another lab stains it (:data:`LAB_B_STAINING`, never
  drawn in training). A held-out set re-stained this way (:func:`restain_manifest`, and
  :class:`Restaining` for slides) measures robustness to stain shift.
- Slides are featurised once, so their augmentation is a few stain-jittered copies of the
  training slides' features (:class:`Restaining` with a :func:`random_staining`).
- A slide's tiles are re-stained as read, before the model's stain normalisation
  (``ModelConfig.slide_tiles.stain_norm``) and the encoder: the normaliser sees the other lab's
  stain, as it would in serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from smartpath.model.tile_encoder import TileEncoder
from smartpath.training.features import featurize_manifest
from smartpath.training.manifest import RoiSample, WsiSample, read_manifest, write_manifest

# Rows: hematoxylin, eosin, DAB OD vectors (scikit-image's rgb_from_hed, Ruifrok & Johnston).
HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED /= np.linalg.norm(HED, axis=1, keepdims=True)
# Another lab's stain vectors: a bluer hematoxylin (11.6° from HED's) and a more orange eosin
# (19.3°), as Macenko-style estimates of a different protocol give (LAB_B_STAINING below).
LAB_B = np.array([[0.50, 0.76, 0.41], [0.03, 0.90, 0.43], [0.27, 0.57, 0.78]], dtype=np.float64)
LAB_B /= np.linalg.norm(LAB_B, axis=1, keepdims=True)


def to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density (H, W, 3) float64 of an RGB uint8 image."""
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def from_od(od: np.ndarray) -> np.ndarray:
    """The RGB uint8 image of an optical density (inverse of :func:`to_od`)."""
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def concentrations(rgb: np.ndarray, stains: np.ndarray = HED) -> np.ndarray:
    """Per-pixel stain concentrations (H, W, 3) for the stain vectors ``stains`` (rows)."""
    return to_od(rgb) @ np.linalg.inv(stains)


def compose(conc: np.ndarray, stains: np.ndarray = HED) -> np.ndarray:
    """The RGB uint8 image of stain concentrations (inverse of :func:`concentrations`)."""
    return from_od(conc @ stains)


@dataclass(frozen=True)
class Staining:
    """One lab's stain: its H, E, residual OD vectors (rows), a scale and a shift per stain."""

    stains: np.ndarray
    scale: np.ndarray
    shift: np.ndarray

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb``'s tissue (concentrations read with :data:`HED`) as this staining shows it."""
        return compose(concentrations(rgb) * self.scale + self.shift, self.stains)


def random_staining(rng: np.random.Generator, sigma: float) -> Staining:
    """A random staining around :data:`HED`: each stain's concentration times ``U(1-σ, 1+σ)``
    plus ``U(-σ, σ)`` (Tellez et al.'s HED jitter), and the H and E vectors tilted by
    ``N(0, σ/2)`` per component (median tilt 10° and 7° at σ = 0.3), since labs differ in hue as
    well as in strength."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    stains = HED.copy()
    stains[:2] += rng.normal(0.0, sigma / 2, size=(2, 3))
    stains[:2] = np.abs(stains[:2])  # OD is non-negative
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    scale = rng.uniform(1 - sigma, 1 + sigma, size=3)
    shift = rng.uniform(-sigma, sigma, size=3)
    return Staining(stains, scale, shift)


def jitter_stains(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """HED augmentation: ``rgb`` in a :func:`random_staining` of spread ``sigma``."""
    staining = random_staining(rng, sigma)
    return rgb if sigma == 0 else staining.apply(rgb)


# The stain-shifted held-out sets' lab (never drawn in training): LAB_B's vectors with a
# stronger hematoxylin (x1.35) and a weaker eosin (x0.7).
LAB_B_STAINING = Staining(LAB_B, np.array([1.35, 0.7, 1.0]), np.zeros(3))


def restain(rgb: np.ndarray, staining: Staining = LAB_B_STAINING) -> np.ndarray:
    """``rgb`` as another lab would have stained it (default: :data:`LAB_B_STAINING`)."""
    return staining.apply(rgb)


Item = tuple[RoiSample | WsiSample, object]


def augment_items(items: Sequence[Item], rng: np.random.Generator, sigma: float) -> list[Item]:
    """The items with every ROI image stain-jittered (slides' features are left as they are)."""
    if sigma == 0:
        return list(items)
    out: list[Item] = []
    for sample, visual in items:
        if isinstance(sample, RoiSample):
            visual = jitter_stains(np.asarray(visual, dtype=np.uint8)[..., :3], rng, sigma)
        out.append((sample, visual))
    return out


def restain_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    split: str | None = None,
    staining: Staining = LAB_B_STAINING,
) -> Path:
    """A copy of a local ROI manifest (``split`` only, when given) whose images are re-stained
    (:func:`restain`), written as PNGs under ``out_dir/images``; returns the new manifest.
    WSI samples are left out (their tiles are encoded already)."""
    manifest = Path(manifest)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for sample in read_manifest(str(manifest)):
        if not isinstance(sample, RoiSample) or (split is not None and sample.split != split):
            continue
        source = Path(sample.image)
        source = source if source.is_absolute() else manifest.parent / source
        with Image.open(source) as image:
            pixels = np.asarray(image.convert("RGB"))
        name = f"images/{len(samples):06d}.png"
        Image.fromarray(restain(pixels, staining)).save(out / name)
        samples.append(sample.model_copy(update={"image": name, "source": "restained"}))
    if not samples:
        raise ValueError(f"{manifest} holds no ROI samples to re-stain")
    path = out / manifest.name
    write_manifest(samples, path)
    return path


@dataclass(frozen=True)
class Restaining:
    """Every tile of a slide in another staining (``tag`` names it), as read and before stain
    normalisation and the encoder (``featurize_manifest``'s ``transform``): slides featurised
    through it form a stain-shifted WSI set, or a stain-augmented copy of a training set. Its
    ``name`` joins the features' name, so feature caches never mix them."""

    staining: Staining
    tag: str

    @property
    def name(self) -> str:
        return f"stain-{self.tag}"

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.staining.apply(tiles[..., :3])


def featurize_stained(
    manifest: str | Path,
    stainings: Sequence[tuple[str, Staining]],
    out_manifest: str | Path,
    *,
    split: str,
    encoder: TileEncoder | str = "stain-stats-v1",
    stain_norm: str | None = None,
    progress: bool = True,
) -> Path:
    """The WSI samples of ``split`` in a local manifest, featurised once per named staining
    (:class:`Restaining`, then the stain normalisation ``stain_norm``): one manifest of them
    all, ids suffixed ``~<name>`` when there is more than one staining. Re-stained held-out
    slides (one staining) or stain-augmented training copies (several :func:`random_staining`
    draws)."""
    manifest = Path(manifest)
    samples = [s for s in read_manifest(str(manifest)) if isinstance(s, WsiSample)]
    samples = [s for s in samples if s.split == split]
    if not samples:
        raise ValueError(f"{manifest} holds no WSI samples in split {split!r}")
    subset = manifest.with_name(f"{manifest.stem}.{split}.jsonl")  # beside it: refs stay valid
    write_manifest(samples, subset)
    out: list[RoiSample | WsiSample] = []
    try:
        for name, staining in stainings:
            featured = featurize_manifest(
                subset,
                encoder=encoder,
                stain_norm=stain_norm,
                transform=Restaining(staining, name),
                out_manifest=Path(out_manifest).with_suffix(f".{name}.jsonl"),
                progress=progress,
            )
            renamed = read_manifest(str(featured))
            if len(stainings) > 1:
                renamed = [s.model_copy(update={"id": f"{s.id}~{name}"}) for s in renamed]
            out += renamed
            featured.unlink()
    finally:
        subset.unlink()
    write_manifest(out, out_manifest)
    return Path(out_manifest)
