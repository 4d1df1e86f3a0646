"""H&E stain in optical density: augmentation for training, and re-staining as another lab would.

Stain varies between labs (reagents, protocols, scanners) more than anything else a pathology
model meets. Both tools work on the stains' concentrations from colour deconvolution
(Ruifrok & Johnston 2001): optical density ``OD = -ln((I + 1) / 256)`` per RGB channel is a
sum of each stain's OD vector times its concentration, so ``C = OD · M⁻¹`` for the matrix ``M``
of the hematoxylin, eosin and residual (DAB) vectors.

- :func:`jitter_stains`: HED colour augmentation (Tellez et al. 2018, "HED-light/strong"):
  every stain's concentration scaled by ``U(1 - σ, 1 + σ)`` and shifted by ``U(-σ, σ)``, then
  recomposed, so training sees each image in many plausible stainings.
- :func:`restain`: the same tissue as another lab would stain it: concentrations from the
  standard vectors, recomposed with another lab's vectors (and stain strengths). A held-out
  set re-stained this way (:func:`restain_manifest`) measures robustness to stain shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from smartpath.training.manifest import RoiSample, WsiSample, read_manifest, write_manifest

# Rows: hematoxylin, eosin, DAB OD vectors (scikit-image's rgb_from_hed, Ruifrok & Johnston).
HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED /= np.linalg.norm(HED, axis=1, keepdims=True)
# Another lab: a bluer, stronger hematoxylin and a more orange eosin (Macenko-style vectors of
# a different protocol), far outside what jitter_stains at the demo's σ produces.
LAB_B = np.array([[0.50, 0.76, 0.41], [0.03, 0.90, 0.43], [0.27, 0.57, 0.78]], dtype=np.float64)
LAB_B /= np.linalg.norm(LAB_B, axis=1, keepdims=True)
LAB_B_STRENGTH = (1.35, 0.7)  # hematoxylin, eosin concentration scale


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


def jitter_stains(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """HED augmentation: each stain's concentration times ``U(1-σ, 1+σ)`` plus ``U(-σ, σ)``."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return rgb
    conc = concentrations(rgb)
    scale = rng.uniform(1 - sigma, 1 + sigma, size=3)
    shift = rng.uniform(-sigma, sigma, size=3)
    return compose(conc * scale + shift)


def restain(
    rgb: np.ndarray,
    stains: np.ndarray = LAB_B,
    strength: tuple[float, float] = LAB_B_STRENGTH,
) -> np.ndarray:
    """``rgb`` as stained with ``stains`` (rows: H, E, residual) at ``strength`` (H and E
    concentration scales), its concentrations read with the standard vectors."""
    conc = concentrations(rgb)
    conc[..., 0] *= strength[0]
    conc[..., 1] *= strength[1]
    return compose(conc, stains)


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
    stains: np.ndarray = LAB_B,
    strength: tuple[float, float] = LAB_B_STRENGTH,
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
        Image.fromarray(restain(pixels, stains, strength)).save(out / name)
        samples.append(sample.model_copy(update={"image": name, "source": "restained"}))
    if not samples:
        raise ValueError(f"{manifest} holds no ROI samples to re-stain")
    path = out / manifest.name
    write_manifest(samples, path)
    return path
