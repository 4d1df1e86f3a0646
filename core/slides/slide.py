"""Open slides and ROI images behind one MPP-aware interface.

Design decisions:
- OpenSlide reads every whole-slide format (SVS, NDPI, MRXS, SCN, generic tiled TIFF, DICOM…);
  plain PNG/JPEG ROIs go through Pillow, and nothing else is accepted (no BMP/GIF surprises).
- Every failure to open or read becomes ``InvalidArgumentError``; messages never carry the
  file's path (slide names can be patient data) nor OpenSlide's own words (they hold server
  paths): those go to the server log.
- A slide is resolved (symlinks followed) and its companion files are confined to its own
  folder (:mod:`~smartpath.core.slides.companions`) before OpenSlide opens it.
- Geometry is in level-0 pixels; ``read_region`` returns RGB composited on white.
- An MPP outside [0.01, 50] µm/px is treated as unknown: generic TIFFs often carry a default
  72-dpi resolution (≈ 353 µm/px) that is not a scan resolution.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
from openslide import lowlevel
from PIL import Image, UnidentifiedImageError

from smartpath.core.errors import FailedPreconditionError, InvalidArgumentError
from smartpath.core.slides.companions import check_companions

logger = logging.getLogger(__name__)

PLAUSIBLE_MPP = (0.01, 50.0)
ROI_FORMATS = {"PNG", "JPEG"}
MAX_ROI_PIXELS = 8192 * 8192  # an ROI is a region: bigger images belong in a tiled slide
HANDLE_BYTES = 1 << 20  # nominal memory of an OpenSlide handle beside the shared tile cache
READ_CHUNK_PX = 1 << 22  # source pixels per read_region call of a large read (16 MiB RGBA)


@dataclass(frozen=True)
class SlideInfo:
    """What a caller needs to know about a slide to plan work on it."""

    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_from_override: bool
    objective_power: float | None
    vendor: str
    associated_images: dict[str, tuple[int, int]] = field(default_factory=dict)
    reported_mpp: float | None = None  # the slide's own MPP even when implausible, for messages

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px (mean of x and y), or None when unknown."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2

    def require_mpp(self) -> float:
        """The level-0 MPP, or FAILED_PRECONDITION saying how to supply one."""
        if self.mpp is not None:
            return self.mpp
        if self.reported_mpp is not None:
            raise FailedPreconditionError(
                f"slide reports mpp={self.reported_mpp:g} µm/px, outside the plausible range "
                f"{PLAUSIBLE_MPP[0]}–{PLAUSIBLE_MPP[1]} (often a default 72-dpi TIFF resolution); "
                "pass the slide's real mpp as SlideRef.mpp_override"
            )
        raise FailedPreconditionError(
            "slide has no MPP (µm/px) metadata; pass SlideRef.mpp_override with the scan "
            "resolution, e.g. 0.25 for a 40x scan"
        )

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as ``downsample`` (never upsample)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = level
        return best


def _float_property(props: dict[str, str], name: str) -> float | None:
    try:
        value = float(props[name])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class Slide:
    """An open slide or ROI image. Reads are thread-safe (OpenSlide is; Pillow is locked)."""

    def __init__(self, path: Path, handle: openslide.AbstractSlide, info: SlideInfo) -> None:
        self.path = path
        self.info = info
        self._handle = handle
        # Pillow images are not safe to crop from several threads; OpenSlide handles are.
        self._lock = threading.Lock() if isinstance(handle, openslide.ImageSlide) else None

    @classmethod
    def open(
        cls,
        path: str | Path,
        mpp_override: float | None = None,
        tile_cache: openslide.OpenSlideCache | None = None,
    ) -> Slide:
        """Open ``path``; ``mpp_override`` (µm/px) replaces missing or wrong slide MPP, and
        ``tile_cache`` (shared by many slides) replaces OpenSlide's own cache per handle."""
        path = Path(path)
        if mpp_override is not None and not (
            math.isfinite(mpp_override) and PLAUSIBLE_MPP[0] <= mpp_override <= PLAUSIBLE_MPP[1]
        ):
            raise InvalidArgumentError(
                f"mpp_override={mpp_override!r} is outside {PLAUSIBLE_MPP[0]}–"
                f"{PLAUSIBLE_MPP[1]} µm/px"
            )
        path, handle = _open_handle(path)
        try:
            if tile_cache is not None and isinstance(handle, openslide.OpenSlide):
                handle.set_cache(tile_cache)
            info = _describe(handle, mpp_override)
        except Exception:
            handle.close()
            raise
        return cls(path, handle, info)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level`` whose top-left is level-0 (x, y).

        Pixels outside the slide are white.
        """
        if not 0 <= level < len(self.info.level_downsamples):
            raise InvalidArgumentError(f"level {level} does not exist")
        try:
            if self._lock is None:
                rgba = self._handle.read_region((x, y), level, (width, height))
            else:
                with self._lock:
                    rgba = self._handle.read_region((x, y), level, (width, height))
        except (openslide.OpenSlideError, OSError, ValueError) as e:
            logger.warning("reading slide %s failed: %s", self.path, e)
            raise InvalidArgumentError(
                f"slide data is unreadable ({type(e).__name__}); the slide file may be corrupt "
                "or truncated"
            ) from None
        return rgba_on_white(np.asarray(rgba))

    @property
    def resident_bytes(self) -> int:
        """Memory this open slide holds: a decoded ROI image in full, an OpenSlide handle a
        nominal 1 MiB (its decoded tiles live in the shared tile cache)."""
        if isinstance(self._handle, openslide.ImageSlide):
            return self.info.width * self.info.height * 3
        return HANDLE_BYTES

    def thumbnail(self, max_px: int, *, max_read_px: int) -> np.ndarray:
        """RGB thumbnail whose long side is at most ``max_px``, from at most ``max_read_px``
        source pixels (smaller than ``max_px`` when that is what fits)."""
        w, h = self.info.width, self.info.height
        scale = max(w, h) / max_px
        out_w, out_h = self.fit_size(
            w, h, max(1, round(w / scale)), max(1, round(h / scale)), max_read_px
        )
        return self.region_at(0, 0, w, h, out_w, out_h, max_read_px=max_read_px)

    def fit_size(
        self, w0: int, h0: int, out_w: int, out_h: int, max_read_px: int
    ) -> tuple[int, int]:
        """The largest output size, no larger than (out_w, out_h) and of the same aspect,
        that :meth:`region_at` can make of a w0 x h0 level-0 rectangle within
        ``max_read_px`` source pixels; INVALID_ARGUMENT when not even one row fits."""
        for _ in range(4):  # a smaller output may pick a coarser level: settles in one or two
            level, width, height = self._source_size(w0, h0, out_w, out_h)
            if width * min(height, out_h) <= max_read_px:
                return out_w, out_h
            rows = max_read_px // width
            if rows < 1:
                break
            out_w, out_h = max(1, out_w * rows // out_h), rows
        raise self._over_budget(level, width, max_read_px)

    def region_at(
        self, x: int, y: int, w0: int, h0: int, out_w: int, out_h: int, *, max_read_px: int
    ) -> np.ndarray:
        """Level-0 rectangle (x, y, w0, h0) resampled to (out_h, out_w, 3) from the best
        level, reading at most ``max_read_px`` source pixels.

        Within the budget the whole rectangle is read, in bands of rows, and area-averaged.
        Over it (a level far finer than the output, as in a single-level slide) each output
        row averages a band of source rows at its centre: a strided downsample. When even
        one source row per output row is over the budget: INVALID_ARGUMENT.
        """
        level, width, height = self._source_size(w0, h0, out_w, out_h)
        if width * min(height, out_h) > max_read_px:
            raise self._over_budget(level, width, max_read_px)
        ds = self.info.level_downsamples[level]

        def band(top: int, rows: int) -> np.ndarray:
            return self.read_region(level, x, y + round(top * ds), width, rows)

        if width * height <= READ_CHUNK_PX:
            return resize(band(0, height), out_w, out_h)
        out = np.empty((out_h, out_w, 3), np.uint8)
        edges = np.round(np.linspace(0, height, out_h + 1)).astype(np.int64)
        if width * height <= max_read_px:
            per_band = max(1, READ_CHUNK_PX // (width * max(1, height // out_h)))
            for r0 in range(0, out_h, per_band):
                r1 = min(out_h, r0 + per_band)
                top, rows = int(edges[r0]), max(1, int(edges[r1] - edges[r0]))
                out[r0:r1] = resize(band(top, rows), out_w, r1 - r0)
            return out
        rows = max(1, min(height // out_h, max_read_px // (width * out_h)))
        for r in range(out_h):
            top = min(max(0, int((edges[r] + edges[r + 1] - rows) // 2)), height - rows)
            out[r : r + 1] = resize(band(top, rows), out_w, 1)
        return out

    def _source_size(self, w0: int, h0: int, out_w: int, out_h: int) -> tuple[int, int, int]:
        """The level a (w0, h0) -> (out_w, out_h) resampling reads, and the rectangle's size
        there."""
        level = self.info.best_level(min(w0 / out_w, h0 / out_h))
        ds = self.info.level_downsamples[level]
        return level, max(1, round(w0 / ds)), max(1, round(h0 / ds))

    def _over_budget(self, level: int, width: int, max_read_px: int) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"this read needs rows of {width} px from pyramid level {level}, the coarsest level "
            f"fine enough, over the limit of {max_read_px} source px per read; ask for a "
            "smaller region or output, or store the slide as a pyramidal TIFF with coarser "
            "levels"
        )

    def close(self) -> None:
        """Release the file handle."""
        self._handle.close()


def rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 array on white; transparent pixels are outside the slide."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average down (box filter) or bilinear up to (height, width, 3)."""
    src_h, src_w = rgb.shape[:2]
    if (src_h, src_w) == (height, width):
        return rgb
    shrinking = src_w >= width and src_h >= height
    if shrinking and src_w % width == 0 and src_h % height == 0:
        fy, fx = src_h // height, src_w // width
        blocks = rgb.reshape(height, fy, width, fx, 3).astype(np.uint32)
        return ((blocks.sum(axis=(1, 3)) + fy * fx // 2) // (fy * fx)).astype(np.uint8)
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize((width, height), method))


def _open_handle(path: Path) -> tuple[Path, openslide.AbstractSlide]:
    """The resolved path and its open handle, its companion files checked first."""
    try:
        if not path.exists():
            raise InvalidArgumentError("slide file does not exist")
        path = path.resolve(strict=True)
        if path.is_dir():
            check_companions(path)
            path = _folder_entry(path)
        if path.stat().st_size == 0:
            raise InvalidArgumentError("slide file is empty (0 bytes)")
        check_companions(path)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        logger.warning("cannot read slide %s: %s", path, e)
        raise InvalidArgumentError("slide file cannot be read on the server") from None
    try:
        return path, openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        pass
    except (openslide.OpenSlideError, OSError) as e:
        logger.warning("OpenSlide cannot open slide %s: %s", path, e)
        raise InvalidArgumentError(_open_failure(e)) from None
    return path, _open_roi_image(path)


def _folder_entry(folder: Path) -> Path:
    """The file OpenSlide opens for a folder slide: any instance of a DICOM series (OpenSlide
    finds the others beside it), else the folder's one slide file (a VMS with its images)."""
    found: dict[str, list[Path]] = {}
    for child in sorted(folder.iterdir()):
        if child.is_file() and (vendor := openslide.OpenSlide.detect_format(child)):
            found.setdefault(vendor, []).append(child)
    if len(found) == 1:
        ((vendor, files),) = found.items()
        if vendor == "dicom" or len(files) == 1:
            return files[0]
    count = sum(len(files) for files in found.values())
    raise InvalidArgumentError(
        "folder holds no slide OpenSlide can read"
        if not count
        else f"folder holds {count} slides; name one of them, or store one slide per folder"
    )


def _open_failure(error: Exception) -> str:
    """What to tell the caller about an OpenSlide open failure, without its words (paths)."""
    if isinstance(error, FileNotFoundError) or "No such file" in str(error):
        return (
            "a file the slide names is missing; re-upload the slide with its companion files "
            "in the same folder (an MRXS needs its sibling folder, a VMS its image and map "
            "files)"
        )
    return "slide file is corrupt or truncated (OpenSlide cannot open it); re-upload the slide"


def _open_roi_image(path: Path) -> openslide.ImageSlide:
    try:
        with Image.open(path) as probe:
            fmt, size = probe.format, probe.size
        if fmt not in ROI_FORMATS:
            raise InvalidArgumentError(
                f"unsupported image format {fmt}; ROIs must be PNG or JPEG, slides any "
                "format OpenSlide reads"
            )
        if size[0] * size[1] > MAX_ROI_PIXELS:
            raise InvalidArgumentError(
                f"ROI image of {size[0]}x{size[1]} px is too large; store it as a tiled slide"
            )
        image = Image.open(path)
        image.load()  # decode now so a truncated file fails here, not mid-request
        if image.mode != "RGB":
            image = image.convert("RGB")
    except InvalidArgumentError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InvalidArgumentError(
            "file is not a slide or image that SmartPath reads (OpenSlide formats, PNG, JPEG), "
            "or it is corrupt or truncated"
        ) from None
    return openslide.ImageSlide(image)


def _describe(handle: openslide.AbstractSlide, mpp_override: float | None) -> SlideInfo:
    props = dict(handle.properties)
    mpp_x = _float_property(props, openslide.PROPERTY_NAME_MPP_X)
    mpp_y = _float_property(props, openslide.PROPERTY_NAME_MPP_Y)
    reported = mpp_x
    plausible = (
        mpp_x is not None
        and mpp_y is not None
        and all(PLAUSIBLE_MPP[0] <= m <= PLAUSIBLE_MPP[1] for m in (mpp_x, mpp_y))
    )
    if not plausible:
        mpp_x = mpp_y = None
    if mpp_override is not None:
        mpp_x = mpp_y = mpp_override
    width, height = handle.dimensions
    if width <= 0 or height <= 0:
        raise InvalidArgumentError("slide has no pixels")
    associated = _associated_image_sizes(handle)
    return SlideInfo(
        width=width,
        height=height,
        level_dimensions=tuple(handle.level_dimensions),
        level_downsamples=tuple(float(d) for d in handle.level_downsamples),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        mpp_from_override=mpp_override is not None,
        objective_power=_float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or "image",
        associated_images=associated,
        reported_mpp=None if plausible else reported,
    )


def _associated_image_sizes(handle: openslide.AbstractSlide) -> dict[str, tuple[int, int]]:
    """Names and sizes of associated images, without decoding them."""
    if not isinstance(handle, openslide.OpenSlide):
        return {}
    try:
        return {
            name: tuple(lowlevel.get_associated_image_dimensions(handle._osr, name))
            for name in handle.associated_images
        }
    except (openslide.OpenSlideError, OSError):
        return {}
