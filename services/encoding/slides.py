"""Whole-slide encoding: tile plan -> tiles -> tile features (cached) -> slide tokens.

The same orchestration runs inside the FeatureEncoder deployment (talking to the SlideTiler
deployment through a handle) and in-process (talking to a local Tiler); both give it a
:class:`SlideSource`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from smartpath.core.errors import FailedPreconditionError
from smartpath.core.slides.plan import TilePlan, plan_hash
from smartpath.core.slides.tiler import TileRequest
from smartpath.model.slide_features import SlideFeatures
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

    The cache key is known from the slide's content id and the model's slide tile spec
    alone, so a hit neither downloads nor tiles the slide.
    """
    spec = encoder.model.cfg.slide_tiles
    slide_id = await source.identify(uri)
    key = plan_hash(
        slide_id if mpp_override is None else f"{slide_id}@mpp={mpp_override}",
        mpp=spec.mpp,
        tile_size=spec.tile_size,
        overlap=0,
        min_tissue_fraction=spec.min_tissue,
        tissue_params=await source.tissue_params(),
    )
    ref = cache.ref(slide_id, encoder.tile_encoder.name, key)
    features = cache.get(ref)
    hit = features is not None
    if features is None:
        request = TileRequest(
            mpp=spec.mpp,
            tile_size=spec.tile_size,
            min_tissue_fraction=spec.min_tissue,
        )
        plan, _ = await source.plan(uri, request, mpp_override)
        if len(plan) == 0:
            raise FailedPreconditionError(
                "no tissue found on the slide at the configured tissue threshold"
            )
        total = len(plan)
        yield SlideProgress(0, total)
        parts: list[np.ndarray] = []
        done = 0
        async for _, tiles in source.read_tiles(uri, plan.geometry, plan.x, plan.y, mpp_override):
            parts.append(await encode_tiles(tiles))
            done += len(tiles)
            yield SlideProgress(done, total)
        features = SlideFeatures(
            features=np.concatenate(parts),
            coords=np.stack([plan.x, plan.y], axis=1),
            mpp=_level0_mpp(plan),
            tile_size_px=plan.geometry.footprint,
            encoder=encoder.tile_encoder.name,
        )
        cache.put(ref, features)
    yield SlideEncoding(
        visual=encoder.slide_tokens(features),
        slide_id=slide_id,
        plan_hash=key,
        tiles=len(features),
        cache_hit=hit,
    )


def _level0_mpp(plan: TilePlan) -> float:
    """Level-0 µm/px of the slide the plan was made for (tile mpp x level-0 px per tile px)."""
    g = plan.geometry
    return g.mpp * g.tile_size / g.footprint
