"""Read plan tiles as uint8 RGB batches, decoding each source tile once, on all cores.

Design decisions:
- Fast path for JPEG-tiled TIFF levels (Aperio SVS, generic tiled TIFF): read the compressed
  source tiles straight from the file (``os.pread``), decode each tile needed by a batch
  exactly once, at the output scale where libjpeg-turbo's DCT scaling allows it (1/2, 1/4,
  1/8), then assemble output tiles by copying straight into the batch array and finish any
  remaining integer downsample with a block mean. Decoding releases the GIL, so a thread
  pool uses every core.
- Colour follows OpenSlide: Photometric YCbCr is ordinary JPEG, decoded by simplejpeg
  (libjpeg-turbo's TurboJPEG API, no Python header parsing); Photometric RGB means the JPEG
  data are RGB with no YCbCr conversion (as Aperio writes them), which only Pillow's decoder
  can be told, so those go through Pillow's ``draft``.
- Everything else (NDPI, MRXS, DICOM, non-JPEG TIFF, PNG/JPEG ROIs) reads through OpenSlide's
  ``read_region`` in parallel and resamples with an area filter.
- Memory is bounded by the batch being used plus those in flight, whatever the slide's size.
"""

from __future__ import annotations

import io
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import simplejpeg
import tifffile
from PIL import Image, JpegImagePlugin

from smartpath.core.errors import InvalidArgumentError
from smartpath.core.slides.plan import TileGeometry
from smartpath.core.slides.slide import Slide, resize

FAST_VENDORS = {"aperio", "generic-tiff"}
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
DCT_SCALES = (8, 4, 2)

# Work per pool task, large enough to amortise the pool's per-task cost (~30 µs, GIL-bound).
DECODE_TASK = 64  # source tiles
ASSEMBLE_TASK = 16  # output tiles

T = TypeVar("T")
SourceKey = tuple[int, int, int]  # (tile column, tile row, DCT scale)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JpegLevel:
    """Where the compressed JPEG tiles of one pyramid level lie in a TIFF file."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    grid_cols: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    tables: bytes | None
    rgb_colorspace: bool  # Photometric RGB: JPEG data are RGB, not YCbCr

    @classmethod
    def find(cls, slide: Slide, level: int) -> JpegLevel | None:
        """The level's JPEG tile layout, or None if the fast path does not apply."""
        if slide.info.vendor not in FAST_VENDORS or not slide.path.is_file():
            return None
        width, height = slide.info.level_dimensions[level]
        try:
            with tifffile.TiffFile(slide.path) as tif:
                for page in tif.pages:
                    if (
                        page.is_tiled
                        and page.compression == 7
                        and page.photometric in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR)
                        and page.samplesperpixel == 3
                        and page.bitspersample == 8
                        and page.planarconfig == 1
                        and page.imagedepth == 1
                        and (page.imagewidth, page.imagelength) == (width, height)
                    ):
                        return cls(
                            width=width,
                            height=height,
                            tile_width=page.tilewidth,
                            tile_height=page.tilelength,
                            grid_cols=-(-width // page.tilewidth),
                            offsets=np.asarray(page.dataoffsets, dtype=np.int64),
                            bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
                            tables=page.jpegtables,
                            rgb_colorspace=page.photometric == PHOTOMETRIC_RGB,
                        )
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError):
            return None
        return None


class TileReader:
    """Reads tiles of one geometry from one slide; share one thread pool across readers."""

    def __init__(self, slide: Slide, geometry: TileGeometry, pool: Executor) -> None:
        self._slide = slide
        self._geometry = geometry
        self._pool = pool
        self._jpeg = JpegLevel.find(slide, geometry.level)
        try:
            self._fd = os.open(slide.path, os.O_RDONLY) if self._jpeg is not None else None
        except OSError as e:
            logger.warning("cannot open slide %s for reading: %s", slide.path, e)
            raise InvalidArgumentError(
                "slide file cannot be read on the server (was it removed?); try again"
            ) from None

    @property
    def fast_path(self) -> bool:
        """True when tiles decode straight from compressed JPEG tiles."""
        return self._jpeg is not None

    def close(self) -> None:
        """Close the reader's file descriptor."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Tiles whose level-0 top-left corners are (xs[i], ys[i]): (N, S, S, 3) uint8."""
        if len(xs) == 0:
            s = self._geometry.tile_size
            return np.empty((0, s, s, 3), dtype=np.uint8)
        if self._jpeg is None:
            tiles = list(self._pool.map(self._read_via_openslide, xs.tolist(), ys.tolist()))
            return np.stack(tiles)
        return self._read_jpeg(xs, ys)

    def iter_batches(
        self, xs: np.ndarray, ys: np.ndarray, batch_size: int, prefetch: int = 2
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (offset, tiles) batches in order, reading ``prefetch`` batches ahead."""
        starts = list(range(0, len(xs), batch_size))
        with ThreadPoolExecutor(prefetch, thread_name_prefix="tile-prefetch") as workers:
            pending: deque[tuple[int, Future[np.ndarray]]] = deque()
            for start in starts:
                end = start + batch_size
                pending.append((start, workers.submit(self.read, xs[start:end], ys[start:end])))
                if len(pending) > prefetch:
                    offset, future = pending.popleft()
                    yield offset, future.result()
            while pending:
                offset, future = pending.popleft()
                yield offset, future.result()

    # -- OpenSlide path ------------------------------------------------------------------
    def _read_via_openslide(self, x: int, y: int) -> np.ndarray:
        g = self._geometry
        region = self._slide.read_region(g.level, x, y, g.read_size, g.read_size)
        return resize(region, g.tile_size, g.tile_size)

    # -- JPEG fast path ------------------------------------------------------------------
    def _dct_scale(self, lx: int, ly: int) -> int:
        """Largest DCT reduction that keeps the region aligned and never needs upsampling."""
        g, j = self._geometry, self._jpeg
        assert j is not None
        r = g.read_size
        for k in DCT_SCALES:
            if (
                r // k >= g.tile_size
                and r % k == 0
                and lx % k == 0
                and ly % k == 0
                and j.tile_width % k == 0
                and j.tile_height % k == 0
            ):
                return k
        return 1

    def _read_jpeg(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        g, j = self._geometry, self._jpeg
        assert j is not None
        r = g.read_size
        lxs = np.round(xs / g.level_downsample).astype(np.int64).tolist()
        lys = np.round(ys / g.level_downsample).astype(np.int64).tolist()
        jobs = []
        needed: set[SourceKey] = set()
        for lx, ly in zip(lxs, lys, strict=True):
            k = self._dct_scale(lx, ly)
            tx0, tx1 = max(lx, 0) // j.tile_width, (min(lx + r, j.width) - 1) // j.tile_width
            ty0, ty1 = max(ly, 0) // j.tile_height, (min(ly + r, j.height) - 1) // j.tile_height
            keys = [(tx, ty, k) for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
            needed.update(keys)
            jobs.append((lx, ly, k, keys))
        order = sorted(needed, key=lambda key: (key[1], key[0]))  # file order: rows of tiles
        decoded: dict[SourceKey, np.ndarray | None] = {}
        for chunk in self._pool.map(self._decode_chunk, _chunks(order, DECODE_TASK)):
            decoded.update(chunk)
        out = np.empty((len(jobs), g.tile_size, g.tile_size, 3), dtype=np.uint8)

        def assemble(indices: range) -> None:
            for i in indices:
                self._assemble(jobs[i], decoded, out[i])

        list(self._pool.map(assemble, _chunks(range(len(jobs)), ASSEMBLE_TASK)))
        return out

    def _decode_chunk(self, keys: list[SourceKey]) -> list[tuple[SourceKey, np.ndarray | None]]:
        return [(key, self._decode(key)) for key in keys]

    def _decode(self, key: SourceKey) -> np.ndarray | None:
        j = self._jpeg
        assert j is not None and self._fd is not None
        tx, ty, k = key
        index = ty * j.grid_cols + tx
        count = int(j.bytecounts[index])
        if count == 0:
            return None  # sparse tile: glass
        data = os.pread(self._fd, count, int(j.offsets[index]))
        if len(data) != count:
            raise InvalidArgumentError("slide file is truncated (a tile lies past its end)")
        if j.tables:
            data = j.tables[:-2] + data[2:]  # tables' SOI..DQT/DHT, then the tile after its SOI
        width, height = j.tile_width // k, j.tile_height // k
        try:
            if not j.rgb_colorspace:
                tile = simplejpeg.decode_jpeg(
                    data, min_factor=k, min_width=width, min_height=height
                )
            else:
                image = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
                image.draft("RGB", (width, height))
                # Pillow has no public switch for "these components are RGB, not YCbCr";
                # the decoder args (rawmode, jpegmode) are that switch.
                image.tile = [image.tile[0]._replace(args=("RGB", "RGB"))]
                tile = np.asarray(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            logger.warning("decoding tile %s of slide %s failed: %s", key, self._slide.path, e)
            raise InvalidArgumentError(f"slide data is corrupt ({type(e).__name__})") from None
        if tile.shape[:2] != (height, width):
            raise InvalidArgumentError("slide tile has a different size than its TIFF says")
        return tile

    def _assemble(
        self,
        job: tuple[int, int, int, list[SourceKey]],
        decoded: dict[SourceKey, np.ndarray | None],
        out: np.ndarray,
    ) -> None:
        """Write one output tile into ``out`` from its decoded source tiles."""
        g, j = self._geometry, self._jpeg
        assert j is not None
        lx, ly, k, keys = job
        side = g.read_size // k
        direct = side == g.tile_size  # no resampling left: copy straight into the batch
        region = out if direct else np.empty((side, side, 3), dtype=np.uint8)
        tw, th = j.tile_width // k, j.tile_height // k
        level_w, level_h = -(-j.width // k), -(-j.height // k)
        rx, ry = lx // k, ly // k  # region origin in reduced level pixels
        covered = 0
        for tx, ty, _ in keys:
            tile = decoded[(tx, ty, k)]
            if tile is None:
                continue
            # Intersection of the source tile (clipped to the level) with the region.
            sx0, sy0 = tx * tw, ty * th
            x0, x1 = max(sx0, rx), min(sx0 + tw, rx + side, level_w)
            y0, y1 = max(sy0, ry), min(sy0 + th, ry + side, level_h)
            if x0 < x1 and y0 < y1:
                region[y0 - ry : y1 - ry, x0 - rx : x1 - rx] = tile[
                    y0 - sy0 : y1 - sy0, x0 - sx0 : x1 - sx0
                ]
                covered += (x1 - x0) * (y1 - y0)
        if covered < side * side:
            _whiten_uncovered(region, keys, decoded, rx, ry, tw, th, level_w, level_h)
        if not direct:
            out[:] = resize(region, g.tile_size, g.tile_size)


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _whiten_uncovered(
    region: np.ndarray,
    keys: list[SourceKey],
    decoded: dict[SourceKey, np.ndarray | None],
    rx: int,
    ry: int,
    tw: int,
    th: int,
    level_w: int,
    level_h: int,
) -> None:
    """Paint white what no decoded tile covered: beyond the level's edge, or sparse tiles."""
    side = region.shape[0]
    covered = np.zeros((side, side), dtype=bool)
    for key in keys:
        if decoded[key] is None:
            continue
        tx, ty, _ = key
        x0, x1 = max(tx * tw, rx), min(tx * tw + tw, rx + side, level_w)
        y0, y1 = max(ty * th, ry), min(ty * th + th, ry + side, level_h)
        if x0 < x1 and y0 < y1:
            covered[y0 - ry : y1 - ry, x0 - rx : x1 - rx] = True
    region[~covered] = 255
