"""OME-Zarr outputs open with the reference ``ome-zarr`` reader (what napari's plugin uses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from wsireg_flow.io.omezarr import ingest
from wsireg_flow.io.slide import open_slide

DATA = Path(__file__).resolve().parents[1] / "data"


def _read(path: Path) -> tuple[list[np.ndarray], dict]:
    nodes = list(Reader(parse_url(str(path)))())
    assert len(nodes) >= 1
    return nodes[0].data, nodes[0].metadata


@pytest.fixture(scope="module")
def cmu_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("viewers") / "cmu.zarr"
    with open_slide(DATA / "wsi" / "CMU-1-Small-Region.svs") as slide:
        ingest(slide, out)
    return out


def test_ingested_pyramid_opens_with_ome_zarr_reader(cmu_zarr: Path) -> None:
    data, meta = _read(cmu_zarr)
    assert [tuple(d.shape) for d in data] == [(3, 2967, 2220), (3, 1484, 1110), (3, 742, 555)]
    assert [a["name"] for a in meta["axes"]] == ["c", "y", "x"]
    assert meta["axes"][2]["unit"] == "micrometer"
    scales = [t[0]["scale"] for t in meta["coordinateTransformations"]]
    assert scales[0] == pytest.approx([1.0, 0.499, 0.499])
    # the factor the level was made with (2), not the size ratio (2967 -> 1484 rows: 1.99933)
    assert scales[1] == pytest.approx([1.0, 0.499 * 2.0, 0.499 * 2.0])
    # the reader keeps each level's translation: level-1 pixel centres on level-0 block centres
    assert meta["coordinateTransformations"][1][1]["translation"] == pytest.approx(
        [0.0, 0.499 / 2, 0.499 / 2]
    )
    ours = open_slide(cmu_zarr).read_region(1, 100, 200, 300, 500)
    theirs = np.moveaxis(np.asarray(data[1][:, 100:300, 200:500]), 0, -1)
    np.testing.assert_array_equal(ours, theirs)


def test_warped_output_opens_with_ome_zarr_reader(
    tmp_path_factory: pytest.TempPathFactory, prefect_env: None
) -> None:
    from test_qc_report import register_lung_pair

    run = register_lung_pair(tmp_path_factory)
    data, _meta = _read(run / "warped.zarr")
    assert tuple(data[0].shape) == (3, 660, 895)
    level0 = np.moveaxis(np.asarray(data[0]), 0, -1)
    np.testing.assert_array_equal(
        level0, open_slide(run / "warped.zarr").read_region(0, 0, 0, 660, 895)
    )
    assert 100 < float(level0.mean()) < 250  # real tissue, not an empty canvas
