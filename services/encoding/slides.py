"""Whole-slide encoding: tile plan -> tiles -> tile features (cached) -> slide tokens.

The same orchestration runs inside the FeatureEncoder deployment (talking to the SlideTiler
deployment through a handle) and in-process (talking to a local Tiler); both give it a
:class:`SlideSource`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from smartpath.core.errors import FailedPreconditionError
from smartpath.core.slides.plan import TilePlan
from smartpath.core.slides.tiler import TileRequest
from smartpath.model.slide_features import SlideFeatures
from smartpath.model.stain_norm import feature_name, slide_normaliser
from smartpath.services.contracts import SlideEncoding, SlideProgress, SlideSource
from smartpath.services.encoding.cache import FeatureCache
from smartpath.services.encoding.encoder import VisualEncoder


async def encode_slide(
    uri: str,
    mpp_override: float | None,
    *,
    source: SlideSource,
    encode_tiles: Callable[[np.ndarray], Awaitable[np.ndarray]],
    encoder: VisualEncoder,
    cache: FeatureCache,
) -> AsyncIterator[SlideProgress | SlideEncoding]:
    """Yield progress while tiles are encoded, then the :class:`SlideEncoding`.

    The slide is resolved once (one metadata lookup). Storage reads and writes and the
    aggregator run in worker threads, so a slow store or a big slide never stalls the other
    requests of the replica's event loop. The cache key is the tiler's plan key
    for the slide's content and the model's slide tile spec, known without reading the
    slide, so a hit neither downloads nor tiles it.

    When the model's tile spec names a stain normalisation, it is fitted on this slide's first
    tiles and applied to every batch before ``encode_tiles`` (whose batches mix slides), as
    training's ``extract_slide_features`` does; the features' name (and cache key) says so.
    """
    spec = encoder.model.cfg.slide_tiles
    request = TileRequest(
        mpp=spec.mpp, tile_size=spec.tile_size, min_tissue_fraction=spec.min_tissue
    )
    name = feature_name(encoder.tile_encoder.name, spec.stain_norm)
    slide = await source.resolve(uri, mpp_override)
    key = await source.plan_key(slide, request)
    ref = cache.ref(slide.slide_id, name, key)
    features = await asyncio.to_thread(cache.get, ref)
    hit = features is not None
    if features is None:
        plan, _ = await source.plan(slide, request)
        if len(plan) == 0:
            raise FailedPreconditionError(
                "no tissue found on the slide at the configured tissue threshold"
            )
        total = len(plan)
        yield SlideProgress(0, total)
        parts: list[np.ndarray] = []
        done = 0
        batches = source.read_tiles(slide, plan.geometry, plan.x, plan.y)
        async for tiles in _normalised(batches, spec.stain_norm):
            parts.append(await encode_tiles(tiles))
            done += len(tiles)
            yield SlideProgress(done, total)
        features = SlideFeatures(
            features=np.concatenate(parts),
            coords=np.stack([plan.x, plan.y], axis=1),
            mpp=_level0_mpp(plan),
            tile_size_px=plan.geometry.footprint,
            encoder=name,
        )
        await asyncio.to_thread(cache.put, ref, features)
    visual, evidence = await asyncio.to_thread(encoder.slide_tokens, features)
    yield SlideEncoding(
        visual=visual,
        evidence=evidence,
        slide_id=slide.slide_id,
        plan_hash=key,
        tiles=len(features),
        cache_hit=hit,
    )


async def _normalised(
    batches: AsyncIterator[tuple[int, np.ndarray]], stain_norm: str | None
) -> AsyncIterator[np.ndarray]:
    """The slide's tile batches, stain-normalised per slide when ``stain_norm`` names a method
    (in worker threads; batches are held back until the fit sample is in)."""
    normaliser = slide_normaliser(stain_norm)
    async for _, tiles in batches:
        ready = [tiles] if normaliser is None else await asyncio.to_thread(normaliser.feed, tiles)
        for batch in ready:
            yield batch
    if normaliser is not None:
        for batch in await asyncio.to_thread(normaliser.finish):
            yield batch


def _level0_mpp(plan: TilePlan) -> float:
    """Level-0 µm/px of the slide the plan was made for (tile mpp x level-0 px per tile px)."""
    g = plan.geometry
    return g.mpp * g.tile_size / g.footprint
