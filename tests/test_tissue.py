"""Tissue masks: glass found and left out, pale counterstained tissue kept, padding ignored."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsireg_flow.config import Config, DaskConfig
from wsireg_flow.io.slide import open_slide
from wsireg_flow.landmarks import read_landmarks
from wsireg_flow.parallel import dask_scheduler
from wsireg_flow.pipeline import PairJob, run_pair
from wsireg_flow.pyramid import level_for_max_side
from wsireg_flow.qc import tissue_figure
from wsireg_flow.register import Prepared
from wsireg_flow.synthetic import synthesize_pair
from wsireg_flow.tissue import (
    data_region,
    glass_level,
    ink_mask,
    optical_density,
    scanned_box,
    stained,
    tissue_mask,
)

DATA = Path(__file__).resolve().parents[1] / "data"
FLAGSHIP = DATA / "extra-unlabeled" / "flagship_case001"
TCGA = DATA / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"

GLASS_RGB = (240, 240, 236)


def _od_rgb(od_per_channel: float) -> int:
    return round(255 * 10 ** (-od_per_channel))


def _slide_like(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(400, 600, 3) uint8: white padding | glass | pale counterstained tissue with DAB spots.

    Returns the image and the (y, x) bool region masks. Every region has +-2 grey-level noise
    except the padding, which is exactly white like the no-data area of a scan.
    """
    img = np.empty((400, 600, 3), np.float32)
    img[:, :100] = 255
    img[:, 100:250] = GLASS_RGB
    pale = _od_rgb(0.06)  # summed OD about 0.18 above white, 0.12 above the glass
    img[:, 250:] = (pale, pale, _od_rgb(0.03))
    dab = np.zeros((400, 600), bool)
    for y in range(20, 400, 60):
        for x in range(270, 600, 60):
            dab[y : y + 22, x : x + 22] = True  # ~13 % of the tissue is dark stain
    img[dab] = (110, 70, 40)
    img[:, 100:] += rng.uniform(-2, 2, (400, 500, 3))
    regions = {"padding": np.zeros((400, 600), bool), "glass": np.zeros((400, 600), bool)}
    regions["padding"][:, :100] = True
    regions["glass"][:, 100:250] = True
    regions["tissue"] = ~(regions["padding"] | regions["glass"])
    return np.clip(img, 0, 255).astype(np.uint8), regions


def test_glass_level_is_the_glass_not_the_white_padding() -> None:
    rgb, _ = _slide_like(np.random.default_rng(0))
    od = optical_density(rgb)
    glass = glass_level(rgb, od, below=1.0)
    assert glass is not None
    expected = float(optical_density(np.array([[GLASS_RGB]], np.uint8))[0, 0])
    assert abs(glass.level - expected) < 0.006
    assert glass.spread < 0.01


def test_glass_white_balanced_to_near_white() -> None:
    """Some scanners make glass (nearly) pure white: JPEG noise leaves it at 252-255."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(252, 256, (300, 400, 3)).astype(np.uint8)
    rgb[:, 200:] = np.clip(rng.normal((225, 222, 232), 2, (300, 200, 3)), 0, 255).astype(np.uint8)
    od = cv2.GaussianBlur(optical_density(rgb), (0, 0), 1.0)
    glass = glass_level(rgb, od, below=float(od.max()))
    assert glass is not None and glass.level < 0.02
    mask = tissue_mask(rgb)
    assert mask[:, 210:].mean() > 0.97 and mask[:, :190].mean() < 0.01


def test_no_glass_level_when_tissue_fills_the_image() -> None:
    rng = np.random.default_rng(1)
    noise = cv2.GaussianBlur(rng.uniform(0, 1, (300, 300)).astype(np.float32), (0, 0), 3)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    rgb = np.stack([60 + 150 * noise, 30 + 120 * noise, 90 + 140 * noise], -1).astype(np.uint8)
    od = optical_density(rgb)
    assert glass_level(rgb, od, below=float(od.max())) is None
    assert tissue_mask(rgb).mean() > 0.9


def test_mask_keeps_pale_tissue_around_dark_stain_and_drops_glass() -> None:
    rgb, regions = _slide_like(np.random.default_rng(2))
    mask = tissue_mask(rgb)
    # Otsu alone takes the dark spots only (13 % of the tissue)
    assert mask[regions["tissue"]].mean() > 0.97  # the closing trims the image border
    assert mask[regions["glass"]].mean() < 0.02
    assert not mask[regions["padding"]].any()


def _rigid_level(path: Path) -> np.ndarray:
    with open_slide(path) as s:
        k = level_for_max_side(s.shapes, 1024)  # the preprocessing level
        return s.read_region(k, 0, 0, *s.shapes[k][:2])


def test_real_ihc_slide_with_pale_counterstain_masks_like_its_he_neighbour() -> None:
    """Consecutive sections of one block: the cytokeratin mask covers the same tissue as H&E.

    Before the glass level was used, Otsu split dark DAB from pale tissue on the cytokeratin
    slide: 10.5 % of the image against 57 % for H&E.
    """
    he = tissue_mask(_rigid_level(FLAGSHIP / "Case001_HE.jpg"))
    ck = tissue_mask(_rigid_level(FLAGSHIP / "Case001_Cytokeratin.jpg"))
    ki67 = tissue_mask(_rigid_level(FLAGSHIP / "Case001_Ki67.jpg"))
    assert 0.45 < he.mean() < 0.7
    for m in (ck, ki67):
        assert abs(m.mean() - he.mean()) < 0.06
    h = min(he.shape[0], ck.shape[0])
    inter = (he[:h] & ck[:h]).sum()
    assert inter / (he[:h] | ck[:h]).sum() > 0.8  # the sections sit in about the same place


def test_real_scan_with_white_padding_keeps_the_glass_out() -> None:
    """The TCGA slide has exactly white padding outside its scanned tiles and grey glass."""
    rgb = _rigid_level(TCGA)
    od = cv2.GaussianBlur(optical_density(rgb), (0, 0), 1.0)
    assert (rgb.min(axis=-1) == 255).mean() > 0.1
    glass = glass_level(rgb, od, below=0.4)
    assert glass is not None and 0.06 < glass.level < 0.11
    mask = tissue_mask(rgb)
    glassy = (np.abs(od - glass.level) < 2 * glass.spread) & (rgb.min(axis=-1) < 255)
    assert mask[glassy].mean() < 0.1
    assert 0.55 < mask.mean() < 0.7


def test_wide_white_margin_does_not_make_the_whole_scan_tissue() -> None:
    """A pale section pasted on a wide white canvas (scanner padding): the padding once pulled
    Otsu's threshold between padding and glass, and the whole pasted rectangle was "tissue"
    (100 % of it instead of 87 %); Otsu now sees the scanned pixels only."""
    lung = DATA / "anhir-sample" / "lung-lesion_3" / "scale-5pc" / "29-041-Izd2-w35-Cc10-5-les3.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(lung)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    canvas = np.full((800, 2000, 3), 255, np.uint8)
    canvas[70 : 70 + h, 500 : 500 + w] = rgb
    alone, padded = tissue_mask(rgb), tissue_mask(canvas)[70 : 70 + h, 500 : 500 + w]
    assert 0.8 < alone.mean() < 0.9
    assert padded.mean() == pytest.approx(alone.mean(), abs=0.01)
    assert (alone & padded).sum() / (alone | padded).sum() > 0.98


def test_black_padding_is_no_data_not_tissue() -> None:
    """Exactly black pixels are padding, like exactly white ones: a section on a canvas padded
    black (a rotated export) was all tissue (its black margin had the highest optical
    density); near-black (1 in every channel) is still dense, and so is a lone black pixel
    (the darkest nucleus of a JPEG scan: 47 pixels of CMU-1, which turned from the densest to
    glass, salt noise in the non-rigid tiles' input)."""
    lung = DATA / "anhir-sample" / "lung-lesion_3" / "scale-5pc" / "29-041-Izd2-w35-Cc10-5-les3.jpg"
    rgb = cv2.cvtColor(cv2.imread(str(lung)), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    canvas = np.zeros((800, 2000, 3), np.uint8)
    canvas[70 : 70 + h, 500 : 500 + w] = rgb
    patch = np.full((5, 9, 3), 255, np.uint8)
    patch[1:4, 1:4] = 0  # a black region (3x3)
    patch[2, 5] = 1  # near-black
    patch[2, 7] = 0  # a lone black pixel
    od = optical_density(patch)
    assert (od[1:4, 1:4] == 0.0).all() and od[2, 5] > 6.0 and od[2, 7] > 7.0
    assert od[0, 0] == 0.0
    mask = tissue_mask(canvas)
    assert not mask[:70].any() and not mask[:, :500].any()
    inside = mask[70 : 70 + h, 500 : 500 + w]
    alone = tissue_mask(rgb)
    assert (alone & inside).sum() / (alone | inside).sum() > 0.98
    assert scanned_box(canvas) == (slice(70, 70 + h), slice(500, 500 + w))
    data = data_region(canvas)
    assert data is not None and data.sum() == pytest.approx(h * w, rel=0.001)


def test_ink_mask_finds_marker_strokes_and_no_stain_on_the_bundled_slides() -> None:
    """Marker ink is told from stains by colour and by being one stroke: at most 0.1 % of the
    pixels of the bundled H&E, IHC and Ki67 slides is ink, also at full resolution, where
    dense nuclei and DAB can be as dark (CMU-1: 3.9 % of its tissue by colour alone); a dark
    blue, green or black stroke drawn over an H&E slide is, rim included (a pale blue one is
    only in part: eosin under it lowers its red/green ratio), and exactly black padding is
    not ink."""
    slides = sorted((DATA / "anhir-sample").glob("*/scale-5pc/*.jpg"))
    cmu = DATA / "wsi" / "CMU-1-Small-Region.svs"  # one level: read at full resolution
    for path in [*slides, *sorted(FLAGSHIP.glob("*.jpg")), TCGA, cmu]:
        assert ink_mask(_rigid_level(path)).mean() < 0.001, path.name
    rgb = cv2.resize(_rigid_level(FLAGSHIP / "Case001_HE.jpg"), (600, 400))
    for ink in ((20, 60, 90), (30, 110, 70), (25, 25, 35)):
        layer = np.full_like(rgb, 255)
        cv2.line(layer, (100, 100), (500, 300), ink, 9)
        marked = (rgb * (layer / 255.0)).round().astype(np.uint8)
        stroke = (layer != 255).any(axis=-1)
        found = ink_mask(marked)
        assert found[stroke].mean() > 0.95 and found[~stroke].mean() < 0.01, ink
    assert not ink_mask(np.zeros((20, 30, 3), np.uint8)).any()
    assert not ink_mask(np.zeros((20, 30), np.uint8)).any()  # grey: no colour to tell by


def test_scanned_box_is_the_box_of_pixels_that_are_not_exactly_white() -> None:
    img = np.full((50, 80, 3), 255, np.uint8)
    img[10:30, 20:60] = 240  # glass
    img[12, 70] = (255, 255, 254)  # one scanned pixel, almost white
    assert scanned_box(img) == (slice(10, 30), slice(20, 71))
    assert scanned_box(np.full((5, 6, 3), 255, np.uint8)) == (slice(0, 5), slice(0, 6))
    deep = np.full((5, 6, 1), 65535, np.uint16)
    deep[1:3, 2:4] = 65534
    assert scanned_box(deep) == (slice(1, 3), slice(2, 4))


def test_16_bit_scan_masks_like_its_8_bit_version() -> None:
    """White is the dtype's maximum: a 16-bit scan (values x 257) once had optical densities
    near -4.8 instead of 0 at white, a different mask, and a tissue-area ratio that sent the
    rotation search to scale 0.75 on a same-scale pair."""
    rgb = _rigid_level(TCGA)
    deep = rgb.astype(np.uint16) * 257
    np.testing.assert_allclose(optical_density(deep), optical_density(rgb), atol=0.02)
    assert optical_density(np.full((2, 2, 3), 65535, np.uint16)).max() == pytest.approx(0.0)
    eight, sixteen = tissue_mask(rgb), tissue_mask(deep)
    assert (eight & sixteen).sum() / (eight | sixteen).sum() > 0.99
    # the exactly white padding (20 % of this scan) is still left out of the glass peak
    glass8, glass16 = (glass_level(im, optical_density(im), 0.4) for im in (rgb, deep))
    assert glass8 is not None and glass16 is not None
    assert glass16.level == pytest.approx(glass8.level, abs=0.005) and glass8.level > 0.06


@pytest.mark.parametrize("min_stain", [0.05, 0.2])
def test_stained_drops_empty_space_inside_the_mask(min_stain: float) -> None:
    intensity = np.zeros((64, 64), np.float32)
    intensity[:, 32:] = 0.5  # stain on the right half, empty lumen on the left
    mask = np.ones((64, 64), bool)
    mask[:4] = False
    got = stained(intensity, mask, min_stain)
    assert not got[:, :30].any()
    assert got[4:, 34:].all()
    assert not got[:4].any()


def test_ihc_target_with_pale_tissue_registers_everywhere(tmp_path: Path) -> None:
    """A 3000^2 synthetic pair (seed 1) whose IHC target is half pale counterstain.

    With Otsu's mask the pale half was "no tissue": its tiles were skipped and landmarks there
    ended up to 156 px off (p90 0.34 px). Every landmark lies on tissue by construction.
    """
    pair = tmp_path / "pair"
    synthesize_pair(pair, (3000, 3000), seed=1)
    run = tmp_path / "run"
    job = PairJob(
        pair / "target.ome.tif",
        pair / "source.ome.tif",
        run,
        Config(),
        target_landmarks=pair / "target.csv",
        source_landmarks=pair / "source.csv",
    )
    with dask_scheduler(DaskConfig(scheduler="threads")) as handle:
        run_pair(job, scheduler=handle)
    target = read_landmarks(pair / "target.csv")
    mask = Prepared.load(run / "preprocess.npz").target_mask
    f = mask.shape[0] / 3000
    iy, ix = (target[:, 1] * f).astype(int), (target[:, 0] * f).astype(int)
    assert mask[iy, ix].mean() > 0.97
    tre = np.linalg.norm(read_landmarks(run / "warped-source-landmarks.csv") - target, axis=1)
    print(
        f"\n[pale tissue] TRE median {np.median(tre):.3f} p90 {np.percentile(tre, 90):.3f} "
        f"max {tre.max():.2f} px"
    )
    assert np.median(tre) < 0.1
    assert np.percentile(tre, 90) < 0.3
    assert tre.max() < 3.0


def test_tissue_figure_outlines_each_mask(tmp_path: Path) -> None:
    rgb, regions = _slide_like(np.random.default_rng(4))
    empty = np.zeros((100, 150), bool)  # no outline, and the mask may be coarser than the image
    panels = [("a", rgb, regions["tissue"]), ("b", rgb, empty)]
    path = tissue_figure(tmp_path / "tissue.png", panels)
    png = cv2.imread(str(path))[..., ::-1].astype(int)
    lime = (png[..., 1] > 200) & (png[..., 0] < 80) & (png[..., 2] < 80)
    half = png.shape[1] // 2
    # the outline: the glass/tissue border, 400 image px tall, is about 250 px in the figure
    assert lime[:, :half].sum() > 150
    assert lime[:, half:].sum() == 0
