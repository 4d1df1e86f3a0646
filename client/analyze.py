"""``smartpath analyze``: ask a running SmartPath about an image, a slide region or a slide,
print the answer and write the overlay PNG, QuPath GeoJSON and the Analysis as JSON."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from smartpath.client.render import write_analysis_outputs
from smartpath.client.rpc import PathologyClient, TilerClient, tile_spec
from smartpath.core.storage import ObjectRef, ObjectStore
from smartpath.v1 import common_pb2, pathology_pb2, tiling_pb2

THUMBNAIL_PX = 2048
UPLOAD_BUCKET = "slides"


@dataclass(frozen=True)
class Target:
    """What to analyse: an image file, or a slide (optionally one level-0 region of it)."""

    image: Path | None = None
    slide_uri: str | None = None
    region: tuple[int, int, int, int] | None = None


def slide_uri_for(path_or_uri: str, store: ObjectStore, local_roots: list[Path]) -> str:
    """An ``s3://`` URI stays; a local file the server may read stays a path; any other local
    file is uploaded to the object store (content-addressed) and named by its URI."""
    if path_or_uri.startswith("s3://"):
        return path_or_uri
    path = Path(path_or_uri).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"{path_or_uri} is neither s3://bucket/key nor an existing file")
    if any(path.is_relative_to(Path(root).expanduser().resolve()) for root in local_roots):
        return str(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    ref = ObjectRef(UPLOAD_BUCKET, f"uploads/{digest.hexdigest()[:16]}/{path.name}")
    store.ensure_bucket(ref.bucket)
    if not store.exists(ref):
        store.upload(path, ref)
    return ref.uri


def analyze(
    client: PathologyClient,
    tiler: TilerClient,
    target: Target,
    question: pathology_pb2.Question,
    out: Path,
    stem: str = "analysis",
    *,
    region_mpp: float = 0.5,
    progress: bool = True,
) -> tuple[pathology_pb2.Analysis, dict[str, Path]]:
    """Run one analysis and write its outputs to ``out``; returns the analysis and paths.

    Overlays are drawn on the image, on the region read at ``region_mpp`` µm/px, or on the
    slide's thumbnail."""
    if target.image is not None:
        data = target.image.read_bytes()
        analysis = client.analyze_image(data, question)
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        return analysis, write_analysis_outputs(out, stem, image, analysis)
    assert target.slide_uri is not None
    if target.region is not None:
        x, y, w, h = target.region
        request = pathology_pb2.AnalyzeRegionRequest(
            region=pathology_pb2.SlideRegion(
                slide=common_pb2.SlideRef(uri=target.slide_uri),
                rect=common_pb2.Rect(x=x, y=y, width=w, height=h),
            ),
            question=question,
        )
        analysis = client.analyze_region(request)
    else:
        analysis = _analyze_slide(client, target.slide_uri, question, progress)
    if target.region is not None:
        image, scale = region_image(tiler, target.slide_uri, target.region, region_mpp)
        offset = (float(target.region[0]), float(target.region[1]))
        paths = write_analysis_outputs(out, stem, image, analysis, scale=scale, offset=offset)
        return analysis, paths
    info = tiler.describe(target.slide_uri, thumbnail_max_px=THUMBNAIL_PX)
    thumb = np.asarray(Image.open(io.BytesIO(info.thumbnail.data)).convert("RGB"))
    scale = thumb.shape[1] / info.width
    return analysis, write_analysis_outputs(out, stem, thumb, analysis, scale=scale)


def region_image(
    tiler: TilerClient, uri: str, region: tuple[int, int, int, int], mpp: float
) -> tuple[np.ndarray, float]:
    """The slide region at ``mpp`` µm/px (one square tile from its top-left corner, as big
    as the region's longer side) and its pixels per level-0 pixel."""
    x, y, w, h = region
    scale = tiler.describe(uri).mpp_x / mpp
    spec = tile_spec(mpp=mpp, tile_size=math.ceil(max(w, h) * scale))
    _, pixels = next(tiler.read_tiles(uri, spec, [tiling_pb2.Tile(x=x, y=y)]))
    return pixels[0], scale


def best_region(tiler: TilerClient, uri: str, mpp: float, size_px: int) -> tuple[int, ...]:
    """The tissue-richest square region of ``size_px`` pixels at ``mpp`` (level-0 x, y, w, h)."""
    plan = tiler.plan(uri, tile_spec(mpp=mpp, tile_size=size_px)).plan
    best = max(plan.tiles, key=lambda t: t.tissue_fraction)
    side = round(plan.footprint)
    return best.x, best.y, side, side


def _analyze_slide(
    client: PathologyClient, uri: str, question: pathology_pb2.Question, progress: bool
) -> pathology_pb2.Analysis:
    """AnalyzeSlide with a progress bar over the slide's tiles while they are encoded."""
    bar = tqdm(total=0, unit="tile", desc="encoding tiles", disable=not progress, leave=True)

    def on_progress(event: pathology_pb2.Progress) -> None:
        if event.stage == pathology_pb2.STAGE_ENCODING and not bar.disable:
            if event.cache_hit:
                bar.set_description("tile features from cache")
            bar.total = event.total
            bar.update(event.done - bar.n)

    try:
        return client.analyze_slide(uri, question, on_progress=on_progress)
    finally:
        bar.close()


def summary(analysis: pathology_pb2.Analysis, paths: dict[str, Path]) -> dict:
    """A short, printable view of an analysis."""
    out = {
        "task": common_pb2.Task.Name(analysis.task).removeprefix("TASK_").lower(),
        "scale": common_pb2.Scale.Name(analysis.scale).removeprefix("SCALE_").lower(),
        "answer": analysis.answer,
        "parsed": analysis.parsed,
        "experts": {e.name: round(e.weight, 3) for e in analysis.experts},
        "model_version": analysis.model_version,
        "timings_ms": {
            pathology_pb2.Stage.Name(t.stage).removeprefix("STAGE_").lower(): round(t.ms, 1)
            for t in analysis.timings
        },
    }
    if analysis.label:
        out["label"] = analysis.label
    if analysis.label_scores:  # also when the answer did not parse: P(label) by scoring
        out["label_scores"] = {s.label: round(s.score, 3) for s in analysis.label_scores}
    if analysis.detections:
        out["detections"] = len(analysis.detections)
    if analysis.polygons:
        out["polygons"] = len(analysis.polygons)
    if analysis.tiles:
        out["tiles"] = analysis.tiles
        out["feature_cache_hit"] = analysis.feature_cache_hit
    if not analysis.parsed:
        out["parse_error"] = analysis.parse_error
    out["files"] = {k: str(v) for k, v in paths.items()}
    return out
