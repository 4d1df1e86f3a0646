"""Per-slide stain normalisation (Macenko et al. 2009) of tiles before the tile encoder.

Stain differs between labs more than anything else a slide model meets, and the weight-free
``stain-stats-v1`` encoder reads stain directly, so a slide from another lab lands elsewhere in
feature space. ``macenko-v1`` estimates each slide's hematoxylin and eosin optical-density (OD)
vectors and stain strengths on a sample of its tiles and re-composes every tile with the
encoder's own Ruifrok vectors at reference strengths.

Design decisions:
- Per slide, not per tile or per batch: the estimate needs many tissue pixels, and a tile
  encoder's batch may mix slides (the serving encoder batches concurrent requests). So the
  caller fits once per slide (:class:`SlideNormaliser` fits :class:`SlideStain` on the slide's
  first :data:`FIT_TILES` plan tiles, whatever the read batch size) and applies the fit to every
  batch before encoding. Serving (``services.encoding.slides.encode_slide``) and training
  (``training.features.extract_slide_features``) both run it, so their features are equal.
- Macenko: OD pixels above ``beta`` on every channel (tissue), their plane of largest variance,
  the extreme angles (``alpha`` / ``100 - alpha`` percentiles) in it as the H and E vectors
  (H absorbs more red), the 99th-percentile concentrations as the stain strengths.
- The residual (third) stain is dropped: re-composed tiles carry only H and E. In a probe on
  240 synthetic slides, keeping it left the largest share of the paired plain-vs-``LAB_B``
  feature shift (0.52 against 0.30 without it, 2.27 with no normalisation).
- Do no harm: with too little tissue in the sample (``MIN_PIXELS``), or an estimate that is
  implausible for H&E (H more than 30°, E more than 40° from Ruifrok's, or H and E nearly
  parallel), the fit falls back to the reference vectors with no rescale (``fallback``). Nothing
  about the slide is logged. The limits reject DAB (37° from H, 48° from E) and pass every fit
  of the probe's slides, plain (H ≤ 6°, E ≤ 20°), as ``LAB_B`` stains them (H ≤ 14°, E ≤ 35°:
  Macenko's E lies ~15° off ``LAB_B``'s true 20°) and in training's random stainings (H ≤ 26°,
  E ≤ 32°).
- Reference constants are fixed, like the encoder's ``_STANDARDISATION``, not fitted at run
  time: the vectors are the encoder's (``tile_encoder.ruifrok_stains``); the strengths
  (:data:`REFERENCE_MAX_CONC`) are the median 99th-percentile H and E concentrations
  (OD = -ln((I + 1) / 256)) of 120 plain synthetic training slides (seed 0), first 16 tiles each.
- numpy only: no stain library (torchstain, staintools, scikit-image) is installed, and the
  method is a few lines of linear algebra. Applying is elementwise per pixel (a 3 x 3 map in
  OD space), so a tile's result does not depend on the batch it comes in. About 0.02 s per
  43-tile slide on two cores.
- A model uses it when its ``ModelConfig.slide_tiles.stain_norm`` says so (saved with the
  checkpoint); its name joins the features' encoder name (:func:`feature_name`), so feature
  caches and checkpoints never mix normalised and raw features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smartpath.model.tile_encoder import ruifrok_stains

__all__ = [
    "FIT_TILES",
    "MACENKO",
    "REFERENCE_MAX_CONC",
    "SlideNormaliser",
    "SlideStain",
    "feature_name",
    "slide_normaliser",
]

MACENKO = "macenko-v1"  # the method's name in ModelConfig.slide_tiles.stain_norm
FIT_TILES = 16  # a slide's stain is fitted on its first this many plan tiles
MIN_PIXELS = 2_000  # tissue pixels a fit needs, else the fallback
MAX_ANGLE_DEG = (30.0, 40.0)  # estimated H, E farther than this from Ruifrok's: fallback
MIN_SEPARATION_DEG = 5.0  # estimated H and E closer than this to each other: fallback
REFERENCE_STAINS = ruifrok_stains()  # rows H, E, residual
REFERENCE_MAX_CONC = np.array([2.289, 1.377])  # H, E (see the module docstring)

_OD = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)  # uint8 -> OD, as a table


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


@dataclass(frozen=True)
class SlideStain:
    """One slide's stain: its H and E unit OD vectors (rows) and the factors that bring their
    concentrations to :data:`REFERENCE_MAX_CONC`; ``fallback`` when the fit fell back to the
    reference vectors with no rescale."""

    stains: np.ndarray  # (2, 3) float64
    scale: np.ndarray  # (2,) float64
    fallback: bool

    @classmethod
    def reference(cls) -> SlideStain:
        """The fallback: the reference vectors, no rescale (only the residual is dropped)."""
        return cls(REFERENCE_STAINS[:2].copy(), np.ones(2), True)

    @classmethod
    def fit(
        cls,
        tiles: np.ndarray,
        *,
        beta: float = 0.15,
        alpha: float = 1.0,
        max_pixels: int = 200_000,
        seed: int = 0,
    ) -> SlideStain:
        """Macenko's estimate on uint8 RGB tiles (B, H, W, 3) of one slide (deterministic)."""
        od = _OD[np.asarray(tiles)[..., :3].reshape(-1, 3)].astype(np.float64)
        od = od[(od > beta).all(axis=1)]  # tissue: no channel transparent
        if len(od) < MIN_PIXELS:
            return cls.reference()
        if len(od) > max_pixels:
            od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
        _, vectors = np.linalg.eigh(np.cov(od.T))  # ascending eigenvalues
        plane = vectors[:, 1:] * np.sign(vectors[:, 1:].sum(axis=0) + 1e-12)  # OD-positive
        projected = od @ plane
        phi = np.arctan2(projected[:, 1], projected[:, 0])
        lo, hi = np.percentile(phi, [alpha, 100 - alpha])
        v1, v2 = (plane @ np.array([np.cos(a), np.sin(a)]) for a in (lo, hi))
        h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)  # hematoxylin absorbs more red
        h, e = np.abs(h) / np.linalg.norm(h), np.abs(e) / np.linalg.norm(e)
        if (
            _angle(h, REFERENCE_STAINS[0]) > MAX_ANGLE_DEG[0]
            or _angle(e, REFERENCE_STAINS[1]) > MAX_ANGLE_DEG[1]
            or _angle(h, e) < MIN_SEPARATION_DEG
        ):
            return cls.reference()
        stains = np.stack([h, e])
        max_conc = np.percentile(od @ np.linalg.inv(_with_residual(stains))[:, :2], 99, axis=0)
        return cls(stains, REFERENCE_MAX_CONC / np.maximum(max_conc, 1e-3), False)

    def od_map(self) -> np.ndarray:
        """(3, 3) float32 map of OD rows: this slide's H, E concentrations, rescaled, re-composed
        with the reference H and E vectors (the residual dropped)."""
        scale = np.diag(np.append(self.scale, 0.0))
        return (np.linalg.inv(_with_residual(self.stains)) @ scale @ REFERENCE_STAINS).astype(
            np.float32
        )

    def apply(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 RGB tiles (B, H, W, 3) of the slide, normalised (uint8, same shape)."""
        m = self.od_map()
        od = _OD[np.asarray(tiles)[..., :3]]
        out = np.empty(od.shape, dtype=np.uint8)
        for k in range(3):  # elementwise, so no result depends on the batch around it
            channel = od[..., 0] * m[0, k] + od[..., 1] * m[1, k] + od[..., 2] * m[2, k]
            out[..., k] = np.clip(np.rint(256.0 * np.exp(-channel) - 1.0), 0, 255)
        return out


def _with_residual(stains: np.ndarray) -> np.ndarray:
    """(3, 3) rows H, E and their unit cross product."""
    r = np.cross(stains[0], stains[1])
    return np.vstack([stains, r / max(np.linalg.norm(r), 1e-8)])


class SlideNormaliser:
    """Normalises one slide's stream of tile batches: holds batches back until
    :data:`FIT_TILES` tiles (or the end, :meth:`finish`) are in, fits :class:`SlideStain` on
    exactly the first :data:`FIT_TILES`, then returns every batch normalised, in order."""

    def __init__(self) -> None:
        self.stain: SlideStain | None = None
        self._held: list[np.ndarray] = []

    def feed(self, tiles: np.ndarray) -> list[np.ndarray]:
        """The batches ready to encode after ``tiles`` (none while the fit sample fills)."""
        if self.stain is not None:
            return [self.stain.apply(tiles)]
        self._held.append(tiles)
        return self._fit() if sum(map(len, self._held)) >= FIT_TILES else []

    def finish(self) -> list[np.ndarray]:
        """The batches still held (a slide with fewer than :data:`FIT_TILES` tiles)."""
        return self._fit() if self._held else []

    def _fit(self) -> list[np.ndarray]:
        held = np.concatenate(self._held)
        self._held = []
        self.stain = SlideStain.fit(held[:FIT_TILES])
        return [self.stain.apply(held)]


def slide_normaliser(stain_norm: str | None) -> SlideNormaliser | None:
    """A fresh per-slide normaliser for ``ModelConfig.slide_tiles.stain_norm``; None when off."""
    if stain_norm is None:
        return None
    if stain_norm != MACENKO:
        raise ValueError(f"unknown stain normalisation {stain_norm!r}; known: {MACENKO!r}")
    return SlideNormaliser()


def feature_name(encoder: str, stain_norm: str | None) -> str:
    """The name slide features carry (and caches key on): the tile encoder's, then
    ``+<stain_norm>`` when tiles are normalised first."""
    return encoder if stain_norm is None else f"{encoder}+{stain_norm}"
