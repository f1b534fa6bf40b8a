"""Ingesting a 20000 x 20000 RGB slide stays out of core (peak RSS far below the pixel data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

N = 20_000
TILE = 512
RAW_BYTES = N * N * 3  # 1.2 GB of decoded level-0 pixels

# Runs the command given as arguments and reports its exit status, output and peak RSS.
# RUSAGE_CHILDREN of this wrapper covers exactly the one child it waited for.
_WRAPPER = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({
    "returncode": proc.returncode,
    "stdout": proc.stdout,
    "stderr": proc.stderr,
    "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""


def _tile(ty: int, tx: int) -> np.ndarray:
    """A cheap, moderately compressible RGB texture for the tile at pixel (ty, tx)."""
    y = np.arange(ty, ty + TILE, dtype=np.float32)[:, None]
    x = np.arange(tx, tx + TILE, dtype=np.float32)[None, :]
    out = np.empty((TILE, TILE, 3), np.uint8)
    out[..., 0] = np.sin(x / 23.0) * 60 + 120 + ((ty // TILE * 37 + tx // TILE * 11) % 50)
    out[..., 1] = np.cos(y / 17.0) * 50 + 100
    out[..., 2] = (x + y) % 97 + 80
    return out


def _tiles():
    for ty in range(0, N, TILE):
        for tx in range(0, N, TILE):
            yield _tile(ty, tx)


@pytest.mark.slow
def test_ingest_20k_slide_peak_rss(tmp_path: Path) -> None:
    src = tmp_path / "big.tif"
    out = tmp_path / "big.zarr"
    t0 = time.perf_counter()
    tifffile.imwrite(
        src,
        _tiles(),
        shape=(N, N, 3),
        dtype="uint8",
        tile=(TILE, TILE),
        compression="jpeg",
        photometric="rgb",
    )
    t_write = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "wsireg_flow.cli", "ingest", str(src), "--out", str(out)]
        wrapped = subprocess.run(
            [sys.executable, "-c", _WRAPPER, *cmd, "--quiet"],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        t_ingest = time.perf_counter() - t0
        report = json.loads(wrapped.stdout)
        peak = report["maxrss_kib"] * 1024  # ru_maxrss is in KiB on Linux
        print(
            f"\nwrite {t_write:.1f} s, ingest {t_ingest:.1f} s, "
            f"ingest peak RSS {peak / 2**20:.0f} MiB"
        )
        assert report["returncode"] == 0, report["stderr"]
        assert report["stderr"] == ""
        assert report["stdout"].strip() == str(out)
        # the measurement is real (an interpreter with numpy/dask/zarr is > 50 MB) ...
        assert peak > 50e6
        # ... and far below the decoded image: the pyramid is written out of core
        assert peak < 1.5e9
        assert peak < RAW_BYTES

        group = zarr.open_group(str(out), mode="r")
        shapes = [group[str(k)].shape for k in range(6)]
        assert shapes == [
            (3, 20000, 20000),
            (3, 10000, 10000),
            (3, 5000, 5000),
            (3, 2500, 2500),
            (3, 1250, 1250),
            (3, 625, 625),
        ]
        assert sorted(group.array_keys()) == ["0", "1", "2", "3", "4", "5"]
        level0 = group["0"]
        with tifffile.TiffFile(src) as tf:
            assert tf.pages[0].compression == tifffile.COMPRESSION.JPEG
            ref = zarr.open(tf.aszarr(), mode="r")
            # whole output chunks: first, interior, last (partial) row/column
            for cy, cx in [(0, 0), (7, 11), (19, 0), (3, 19), (19, 19)]:
                y0, x0 = cy * 1024, cx * 1024
                y1, x1 = min(N, y0 + 1024), min(N, x0 + 1024)
                chunk = level0[:, y0:y1, x0:x1]
                expected = np.moveaxis(ref[y0:y1, x0:x1], -1, 0)
                np.testing.assert_array_equal(chunk, expected)
                # decoded JPEG stays close to the synthetic texture: the tiles are the right ones
                drawn = np.moveaxis(_tile(y0 - y0 % TILE, x0 - x0 % TILE), -1, 0)[:, :64, :64]
                assert np.abs(chunk[:, :64, :64].astype(int) - drawn).mean() < 8
            # a level-1 pixel is the 2x2 mean of level 0
            block = level0[:, 4000:4002, 6000:6002].astype(int)
            assert group["1"][:, 2000, 3000].tolist() == [
                (int(block[c].sum()) + 2) // 4 for c in range(3)
            ]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        src.unlink(missing_ok=True)
