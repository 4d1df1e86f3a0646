"""The tiling service's logic, free of Ray and gRPC: slide references in, plans and tiles out.

A request resolves its slide reference once (:meth:`Tiler.resolve`: one metadata lookup
that names the content); everything after takes the :class:`ResolvedSlide`. Opening one
makes it a local file (object store + slide cache, or an allowed local path) and keeps it
open among recently used slides, keyed by content; tissue is detected once per slide, and
tiles are read on a shared thread pool. The tiler owns resolution (µm/px or magnification,
see :class:`~smartpath.core.slides.resolution.Resolution`) and plan keys.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import numpy as np
import openslide

from smartpath.core.config import SmartPathConfig, TilingConfig
from smartpath.core.errors import InvalidArgumentError, UnavailableError
from smartpath.core.slides.plan import TileGeometry, TilePlan, plan_hash, plan_tiles
from smartpath.core.slides.plan import tile_geometry as make_geometry
from smartpath.core.slides.reader import TileReader
from smartpath.core.slides.resolution import Resolution
from smartpath.core.slides.slide import Slide, SlideInfo
from smartpath.core.slides.tissue import detect_tissue
from smartpath.core.storage import (
    ObjectRef,
    ObjectStore,
    SlideCache,
    make_store,
    parse_slide_ref,
    resolve_local_path,
)

OPEN_SLIDES = 16  # handles kept open (file descriptors); their memory is bounded apart
TISSUE_MASKS = 64
S3_ID, FILE_ID = "s3:", "file:"  # slide id prefixes: object ETag, local file digest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSlide:
    """A slide reference resolved to the content it names (:meth:`Tiler.resolve`): what a
    request's later calls take, so the slide is looked up in storage once. Picklable, so it
    travels through DeploymentHandles."""

    uri: str
    slide_id: str  # content id: "s3:<ETag>" or "file:<digest of path, size, mtime, inode>"
    mpp_override: float | None = None

    @property
    def key(self) -> str:
        """The content id with the MPP override: plans and plan keys of the slide use it."""
        if self.mpp_override is None:
            return self.slide_id
        return f"{self.slide_id}@mpp={self.mpp_override}"


@dataclass(frozen=True)
class TileRequest:
    """What tiles a caller wants; None fields take the configured defaults.

    ``mpp=`` or ``magnification=`` is shorthand for ``resolution=Resolution(...)``.
    """

    resolution: Resolution | None = None
    tile_size: int | None = None
    overlap: int = 0
    min_tissue_fraction: float | None = None
    mpp: InitVar[float | None] = None
    magnification: InitVar[float | None] = None

    def __post_init__(self, mpp: float | None, magnification: float | None) -> None:
        if mpp is None and magnification is None:
            return
        if self.resolution is not None:
            raise InvalidArgumentError("give the resolution once: resolution, mpp or magnification")
        object.__setattr__(self, "resolution", Resolution(mpp=mpp, magnification=magnification))


@dataclass(frozen=True)
class TissueMask:
    """Detected tissue at thumbnail scale."""

    mask: np.ndarray  # (H, W) bool
    downsample: float  # level-0 px per mask px

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


@dataclass(frozen=True)
class OpenedSlide:
    """An open slide, the resolved reference it was opened from, and its slide-cache lease."""

    slide: Slide
    resolved: ResolvedSlide
    lease: ExitStack = field(default_factory=ExitStack, repr=False, compare=False)

    @property
    def info(self) -> SlideInfo:
        return self.slide.info

    @property
    def slide_id(self) -> str:
        """The content id of the slide."""
        return self.resolved.slide_id


class Tiler:
    """Describe, plan and read slides. Thread-safe; one per replica."""

    def __init__(self, config: SmartPathConfig, store: ObjectStore | None = None) -> None:
        self.config: TilingConfig = config.tiling
        self.store = store if store is not None else make_store(config.storage)
        self.cache = SlideCache(config.slide_cache, self.store)
        self.tile_resolution = Resolution(mpp=self.config.target_mpp)  # plans' default
        self.region_resolution = Resolution(mpp=config.model.region_mpp)  # regions' default
        workers = self.config.read_workers or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="tile-decode")
        self.tile_cache = openslide.OpenSlideCache(self.config.openslide_cache_bytes)
        self._lock = threading.Lock()
        self._slides: OrderedDict[tuple[str, float | None], OpenedSlide] = OrderedDict()
        self._masks: OrderedDict[str, TissueMask] = OrderedDict()

    def close(self) -> None:
        """Close open slides and stop the decode pool."""
        with self._lock:
            for opened in self._slides.values():
                opened.lease.close()
                opened.slide.close()
            self._slides.clear()
        self.pool.shutdown(wait=True)

    # -- slides ------------------------------------------------------------------------
    def resolve(self, uri: str, mpp_override: float | None = None) -> ResolvedSlide:
        """Name the content of the slide at ``uri`` (``s3://bucket/key`` or a local path)
        from metadata only: one storage lookup, nothing downloaded."""
        ref = parse_slide_ref(uri)
        if isinstance(ref, ObjectRef):
            slide_id = S3_ID + self.cache.identify(ref)
        else:
            slide_id = self._local(ref)[1]
        return ResolvedSlide(uri, slide_id, mpp_override)

    def open(self, slide: ResolvedSlide | str) -> OpenedSlide:
        """Open (or reuse) a resolved slide; a URI is resolved first (no MPP override).

        An open slide of the same content is reused with no storage lookup. Otherwise a
        slide from object storage is leased from the slide cache by its ETag (no second
        metadata lookup after :meth:`resolve` in this process) and stays leased (safe from
        eviction) while it is among the open slides. Content that changed since it was
        resolved is UNAVAILABLE (try again).
        """
        if isinstance(slide, str):
            slide = self.resolve(slide)
        key = (slide.slide_id, slide.mpp_override)
        with self._lock:
            opened = self._slides.get(key)
            if opened is not None:
                self._slides.move_to_end(key)
                return opened
        ref = parse_slide_ref(slide.uri)
        with ExitStack() as lease:
            if isinstance(ref, ObjectRef):
                etag = slide.slide_id.removeprefix(S3_ID)
                path = lease.enter_context(self.cache.lease(ref, etag)).path
            else:
                path, slide_id = self._local(ref)
                if slide_id != slide.slide_id:
                    raise UnavailableError(
                        "the slide file changed while this request used it; try again"
                    )
            opened = OpenedSlide(
                Slide.open(path, slide.mpp_override, self.tile_cache), slide, lease.pop_all()
            )
        if opened.slide.resident_bytes > self.config.open_slide_bytes:
            opened.lease.close()
            raise InvalidArgumentError(
                f"image decodes to {opened.slide.resident_bytes >> 20} MiB, over the "
                f"{self.config.open_slide_bytes >> 20} MiB the tiler keeps open; store it as a "
                "tiled slide"
            )
        with self._lock:
            raced = self._slides.get(key)
            if raced is None:
                self._slides[key] = opened
            evicted = [] if raced is None else [opened]
            while len(self._slides) > 1 and (
                len(self._slides) > OPEN_SLIDES or self._open_bytes() > self.config.open_slide_bytes
            ):
                evicted.append(self._slides.popitem(last=False)[1])
        for old in evicted:
            # Readers in flight keep their own references and file descriptors; the
            # OpenSlide handle closes when the last reference goes.
            old.lease.close()
        return opened if raced is None else raced

    def _open_bytes(self) -> int:
        """Memory the open slides hold (:attr:`Slide.resident_bytes`); hold the lock."""
        return sum(o.slide.resident_bytes for o in self._slides.values())

    def _local(self, path: Path) -> tuple[Path, str]:
        path = resolve_local_path(path, self.config.local_slide_roots)
        try:
            st = path.stat()
        except OSError as e:
            logger.warning("cannot stat local slide %s: %s", path, e)
            raise InvalidArgumentError("local slide file cannot be read on the server") from None
        ident = f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        return path, FILE_ID + hashlib.sha256(ident.encode()).hexdigest()[:32]

    def thumbnail(self, opened: OpenedSlide, max_px: int) -> np.ndarray:
        """RGB thumbnail with long side ``max_px`` (1–4096), or less where reading that much
        would pass ``tiling.max_read_pixels``."""
        if not 1 <= max_px <= 4096:
            raise InvalidArgumentError(f"thumbnail_max_px={max_px} must be in 1–4096")
        return opened.slide.thumbnail(max_px, max_read_px=self.config.max_read_pixels)

    # -- tissue and plans ----------------------------------------------------------------
    def tissue(self, opened: OpenedSlide) -> TissueMask:
        """Tissue mask of the slide at ``tiling.tissue_mpp`` (cached per slide)."""
        mpp = opened.info.require_mpp()
        key = f"{opened.slide_id}:{mpp}"
        with self._lock:
            cached = self._masks.get(key)
        if cached is not None:
            return cached
        info, cfg = opened.info, self.config
        downsample = max(cfg.tissue_mpp / mpp, max(info.width, info.height) / cfg.tissue_max_px)
        downsample = max(downsample, 1.0)
        budget = cfg.max_read_pixels
        out_w, out_h = opened.slide.fit_size(
            info.width,
            info.height,
            max(1, round(info.width / downsample)),
            max(1, round(info.height / downsample)),
            budget,
        )
        thumb = opened.slide.region_at(
            0, 0, info.width, info.height, out_w, out_h, max_read_px=budget
        )
        downsample = info.width / out_w
        mask = detect_tissue(
            thumb,
            um_per_px=mpp * downsample,
            min_area_um2=cfg.min_tissue_area_um2,
            max_hole_area_um2=cfg.max_hole_area_um2,
        )
        tissue = TissueMask(mask, downsample)
        with self._lock:
            self._masks[key] = tissue
            while len(self._masks) > TISSUE_MASKS:
                self._masks.popitem(last=False)
        return tissue

    def geometry(self, opened: OpenedSlide, request: TileRequest) -> TileGeometry:
        """The tile lattice for ``request`` on this slide."""
        resolution = request.resolution or self.tile_resolution
        return make_geometry(
            opened.info,
            mpp=resolution.to_mpp(opened.info),
            tile_size=request.tile_size or self.config.tile_size,
            overlap=request.overlap,
        )

    def plan_key(self, slide: ResolvedSlide, request: TileRequest) -> str:
        """The hash :meth:`plan` gives the plan of ``request`` on ``slide`` (the feature
        cache's key), known without opening or reading the slide."""
        cfg = self.config
        return plan_hash(
            slide.key,
            resolution=request.resolution or self.tile_resolution,
            tile_size=request.tile_size or cfg.tile_size,
            overlap=request.overlap,
            min_tissue_fraction=self._min_tissue_fraction(request),
            tissue_params={
                "mpp": cfg.tissue_mpp,
                "max_px": cfg.tissue_max_px,
                "min_area": cfg.min_tissue_area_um2,
                "max_hole": cfg.max_hole_area_um2,
            },
        )

    def plan(self, opened: OpenedSlide, request: TileRequest) -> tuple[TilePlan, TissueMask]:
        """The tissue tiles of the slide for ``request``, and the mask they came from."""
        geometry = self.geometry(opened, request)
        tissue = self.tissue(opened)
        plan = plan_tiles(
            geometry,
            key=self.plan_key(opened.resolved, request),
            tissue_mask=tissue.mask,
            mask_downsample=tissue.downsample,
            min_tissue_fraction=self._min_tissue_fraction(request),
        )
        return plan, tissue

    def _min_tissue_fraction(self, request: TileRequest) -> float:
        if request.min_tissue_fraction is None:
            return self.config.min_tissue_fraction
        return request.min_tissue_fraction

    def read_region(
        self,
        opened: OpenedSlide,
        x: int,
        y: int,
        width: int,
        height: int,
        resolution: Resolution | None = None,
    ) -> np.ndarray:
        """The level-0 rectangle (x, y, width, height) as RGB at ``resolution`` (default:
        ``model.region_mpp``)."""
        info = opened.info
        mpp = (resolution or self.region_resolution).to_mpp(info)
        if width <= 0 or height <= 0:
            raise InvalidArgumentError(f"region {width}x{height} must have a positive size")
        if x < 0 or y < 0 or x + width > info.width or y + height > info.height:
            raise InvalidArgumentError(
                f"region ({x}, {y}, {width}x{height}) does not lie inside the "
                f"{info.width}x{info.height} slide"
            )
        scale = info.require_mpp() / mpp  # output px per level-0 px
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        if out_w * out_h > self.config.max_region_pixels:
            raise InvalidArgumentError(
                f"region would be {out_w}x{out_h} px at {mpp} µm/px; the limit is "
                f"{self.config.max_region_pixels} px (ask for a smaller region or a coarser mpp)"
            )
        return opened.slide.region_at(
            x, y, width, height, out_w, out_h, max_read_px=self.config.max_read_pixels
        )

    # -- tiles -----------------------------------------------------------------------------
    def read(
        self,
        opened: OpenedSlide,
        geometry: TileGeometry,
        xs: np.ndarray,
        ys: np.ndarray,
        batch_size: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (offset, (n, S, S, 3) uint8) batches of the tiles at level-0 (xs, ys)."""
        info = opened.info
        xs = np.asarray(xs, dtype=np.int64)
        ys = np.asarray(ys, dtype=np.int64)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise InvalidArgumentError("tile x and y lists must have the same length")
        limit = self.config.max_tiles_per_request
        if limit and len(xs) > limit:
            raise InvalidArgumentError(f"{len(xs)} tiles requested; the limit is {limit}")
        outside = (xs < 0) | (ys < 0) | (xs >= info.width) | (ys >= info.height)
        if outside.any():
            i = int(np.argmax(outside))
            raise InvalidArgumentError(
                f"tile {i} at ({xs[i]}, {ys[i]}) lies outside the {info.width}x{info.height} slide"
            )
        with TileReader(opened.slide, geometry, self.pool) as reader:
            yield from reader.iter_batches(
                xs, ys, batch_size or self.config.batch_size, self.config.prefetch_batches
            )
