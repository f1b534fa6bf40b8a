"""A tile job rebuilds the dense backward map of its tile from a crop of the coarser residual."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from wsireg_flow.field import resize_field, tile_boxes
from wsireg_flow.register import _job
from wsireg_flow.tissue import IntensityStats


@pytest.mark.parametrize("factor", [2.0, 2.0 * 1001 / 1000])
def test_job_map_equals_the_dense_map(factor: float) -> None:
    rng = np.random.default_rng(3)
    coarse = np.stack(
        [ndimage.gaussian_filter(rng.normal(0, 40, (160, 210)), 8) for _ in range(2)]
    ).astype(np.float32)  # a smooth residual, a few px, on the coarser grid
    shape = (int(160 * factor) - 1, int(210 * factor) + 1)
    dense = resize_field(coarse, shape, factor)  # the whole level, as the stitch uses it
    a_k = np.array([[0.98, 0.17, 12.5], [-0.17, 0.98, -30.25]])
    mask = rng.random(shape) > 0.3
    slide = SimpleNamespace(path="unused")
    stats = IntensityStats(0.0, 1.0)
    worst = 0.0
    boxes = tile_boxes(shape, 128, 32)
    for box in boxes:
        job = _job(slide, 1, slide, 1, box, shape, coarse, factor, a_k, mask, stats, stats)
        y0, x0, y1, x1 = box
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        px, py = xs + dense[1, y0:y1, x0:x1], ys + dense[0, y0:y1, x0:x1]
        expected = np.stack(
            [
                a_k[0, 0] * px + a_k[0, 1] * py + a_k[0, 2],
                a_k[1, 0] * px + a_k[1, 1] * py + a_k[1, 2],
            ]
        )
        worst = max(worst, float(np.abs(job.map_xy() - expected).max()))
        np.testing.assert_array_equal(job.mask, mask[y0:y1, x0:x1])
        assert job.prior is not None
    print(f"\nfactor {factor:.4f}: {len(boxes)} tiles, max |map - dense map| = {worst:.2e} px")
    assert worst < 0.01
    # what ships to a worker is a fraction of a dense (2, h, w) float32 map
    y0, x0, y1, x1 = boxes[len(boxes) // 2]
    dense_bytes = 2 * (y1 - y0) * (x1 - x0) * 4 + (y1 - y0) * (x1 - x0)
    shipped = len(pickle.dumps(_job(slide, 1, slide, 1, boxes[len(boxes) // 2], shape, coarse,
                                    factor, a_k, mask, stats, stats)))  # fmt: skip
    assert shipped < 0.4 * dense_bytes


def test_first_level_job_is_the_affine_alone() -> None:
    shape = (300, 400)
    a_k = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, -7.0]])
    slide = SimpleNamespace(path="unused")
    stats = IntensityStats(0.0, 1.0)
    mask = np.ones(shape, bool)
    job = _job(slide, 0, slide, 0, (100, 200, 228, 328), shape, None, 1.0, a_k, mask, stats, stats)
    assert job.prior is None
    m = job.map_xy()
    assert m.shape == (2, 128, 128)
    assert (m[0, 0, 0], m[1, 0, 0]) == (205.0, 93.0)  # (x, y) = (200 + 5, 100 - 7)
