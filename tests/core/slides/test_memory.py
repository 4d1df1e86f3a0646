"""Memory stays bounded by the batch, not the slide or the plan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from smartpath.core.slides.plan import plan_tiles, tile_geometry
from smartpath.core.slides.reader import TileReader
from smartpath.core.slides.slide import Slide


def test_streaming_a_plan_holds_about_two_batches(synthetic_svs) -> None:
    slide = Slide.open(synthetic_svs.path)
    g = tile_geometry(slide.info, mpp=0.25, tile_size=256, overlap=0)
    plan = plan_tiles(
        g,
        key="m",
        tissue_mask=np.ones((4, 4), bool),
        mask_downsample=slide.info.width / 4,
        min_tissue_fraction=0.0,
    )
    batch = 16
    batch_bytes = batch * 256 * 256 * 3
    total_bytes = len(plan) * 256 * 256 * 3
    assert total_bytes > 20 * batch_bytes
    with ThreadPoolExecutor(2) as pool, TileReader(slide, g, pool) as reader:
        tracemalloc.start()
        seen = 0
        for _, tiles in reader.iter_batches(plan.x, plan.y, batch):
            seen += len(tiles)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert seen == len(plan)
    # The batch in use, two being read (each with its decoded source tiles, one batch's
    # worth at this scale), and slack: a constant number of batches, not the plan.
    assert peak < 7 * batch_bytes, (peak, batch_bytes, total_bytes)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SMARTPATH_SLOW"), reason="set SMARTPATH_SLOW=1")
def test_100k_slide_plans_and_reads_in_bounded_memory(tmp_path: Path) -> None:
    """Write, plan and read every tissue tile of a 100,000² px slide in a fresh process."""
    script = textwrap.dedent(
        f"""
        import json, re
        from concurrent.futures import ThreadPoolExecutor
        from smartpath.core.config import load_config
        from smartpath.core.slides.reader import TileReader
        from smartpath.core.slides.tiler import Tiler, TileRequest
        from smartpath.training.synthetic.slides import write_synthetic_slide

        path = write_synthetic_slide({str(tmp_path / "big.svs")!r}, width=100_000,
                                     height=100_000, seed=5).path
        tiler = Tiler(load_config(tiling={{"local_slide_roots": [{str(tmp_path)!r}]}}))
        opened = tiler.open(str(path))
        plan, tissue = tiler.plan(opened, TileRequest(mpp=1.0, tile_size=256))
        n = sum(len(b) for _, b in tiler.read(opened, plan.geometry, plan.x, plan.y, 64))
        # VmHWM: the peak of this process image (ru_maxrss would include the forked parent's).
        status = open("/proc/self/status").read()
        rss = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024
        print(json.dumps({{"tiles": n, "planned": len(plan), "rss_mb": rss}}))
        tiler.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=1800
    )
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tiles"] == result["planned"] > 1000
    # A 100k² RGB level is 30 GB; the process must stay far below even one level-1 image.
    assert result["rss_mb"] < 2048, result
