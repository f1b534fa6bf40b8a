"""Quality-control figures (PNG): overlays before/after, checkerboard, confidence, landmarks,
tissue masks, deformation grid, Jacobian map; the self-contained HTML page that shows them with
a run's metrics table (:func:`qc_figures`, :func:`metrics_rows`, :func:`html_report`).

All images are low-resolution previews (the target level closest to ``size`` px), built from
(y, x, c) arrays; landmark points are (x, y) level-0 pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from wsireg_flow.field import jacobian_determinant, sample
from wsireg_flow.geometry import corner_origin
from wsireg_flow.io.slide import Slide
from wsireg_flow.pyramid import level_for_max_side
from wsireg_flow.register import LevelReport
from wsireg_flow.stages import temp_sibling
from wsireg_flow.tissue import optical_density, white_level
from wsireg_flow.transform import Transform

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def to_uint8(img: np.ndarray) -> np.ndarray:
    """(y, x, c) image of any dtype as uint8 for display, white kept white (16-bit values are
    divided by 257; floats are taken as 0-255, like :func:`wsireg_flow.tissue.white_level`)."""
    if img.dtype == np.uint8:
        return img
    scaled = img.astype(np.float32) * np.float32(255.0 / white_level(img.dtype))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def preview(slide: Slide, size: int) -> tuple[np.ndarray, float]:
    """The slide's level whose longest side is closest to ``size`` px, whole, as a (y, x, 3)
    uint8 RGB image (grey repeated, alpha dropped), and that level's downsample."""
    k = level_for_max_side(slide.shapes, size)
    h, w = slide.shapes[k][:2]
    img = slide.read_region(k, 0, 0, h, w)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return to_uint8(img[..., :3]), slide.downsamples[k]


def _gray(rgb: np.ndarray) -> np.ndarray:
    od = optical_density(rgb)
    hi = float(np.percentile(od, 99.5)) or 1.0
    return np.clip(od / hi, 0, 1)


def overlay(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Red/green composite of two same-shape RGB images (target red, source green)."""
    t, s = _gray(target), _gray(source)
    return np.stack([t, s, np.zeros_like(t)], axis=-1)


def checkerboard(target: np.ndarray, source: np.ndarray, n: int = 8) -> np.ndarray:
    """Alternate squares of target and source (RGB, same shape)."""
    h, w = target.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    cell = max(h, w) // n or 1
    sel = ((yy // cell + xx // cell) % 2).astype(bool)
    out = target.copy()
    out[sel] = source[sel]
    return out


def new_figure(
    rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (6, 6), squeeze: bool = True
) -> tuple[Figure, Any]:
    """A figure and its grid of axes (``Figure.subplots``), drawn off-screen.

    Without pyplot: no global backend is switched and no figure manager keeps the figure
    alive (it is freed with its last reference). Matplotlib is imported here, on first use, so
    commands that draw nothing (an error, a finished job) start about 1 s faster.

    Parameters
    ----------
    rows, cols : int
        Grid of axes.
    figsize : (width, height)
        Inches.
    squeeze : bool
        As in ``Figure.subplots``: a single axes (or a 1-D array) instead of a 2-D array.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def write_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 80) -> Path:
    """Lay out and write a figure as PNG (the Agg renderer); creates the parent folder."""
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    return p


def save_figure(
    path: str | os.PathLike[str],
    panels: list[tuple[str, np.ndarray]],
    title: str = "",
    points: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
    ncols: int | None = None,
    value_range: tuple[float, float] | None = None,
    value_label: str = "",
) -> Path:
    """Save panels in a grid (``ncols`` per row, default all in one row);
    ``points[i]`` = (start (N,2), end (N,2)) arrows in panel px. With ``value_range`` (low,
    high) single-channel panels share that colour scale and show a colour bar labelled
    ``value_label`` (otherwise each is scaled to its own range: a constant map draws black)."""
    n = len(panels)
    cols = min(n, ncols or n)
    rows = -(-n // cols)
    fig, axes = new_figure(rows, cols, figsize=(5 * cols, 5 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for i, (name, img) in enumerate(panels):
        ax = axes.ravel()[i]
        lo, hi = value_range if value_range is not None else (None, None)
        im = ax.imshow(
            img,
            cmap="magma" if img.ndim == 2 else None,
            vmin=lo,
            vmax=hi,
            interpolation="nearest",
        )
        if value_range is not None and img.ndim == 2:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=value_label)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
        if points and points[i] is not None:
            a, b = points[i]
            ax.quiver(
                a[:, 0],
                a[:, 1],
                b[:, 0] - a[:, 0],
                b[:, 1] - a[:, 1],
                color="cyan",
                angles="xy",
                scale_units="xy",
                scale=1,
                width=0.003,
            )
            ax.plot(b[:, 0], b[:, 1], "o", ms=2, color="yellow")
    if title:
        fig.suptitle(title)
    return write_figure(fig, path)


def deformation_grid_figure(
    path: str | os.PathLike[str],
    background: np.ndarray,
    residual_yx: np.ndarray,
    spacing_px: float,
    step: int = 24,
    gain: float = 1.0,
) -> Path:
    """Grid lines of the target frame displaced by the non-rigid residual, over ``background``.

    ``residual_yx`` is (2, H, W) (dy, dx) in ``background`` pixels on the background grid;
    ``gain`` exaggerates small displacements (stated in the title).
    """
    h, w = residual_yx.shape[1:]
    fig, ax = new_figure(figsize=(6, 6 * h / max(w, 1)))
    ax.imshow(background, interpolation="nearest")
    for y in range(0, h, step):
        xs = np.arange(w)
        ax.plot(xs + gain * residual_yx[1, y], y + gain * residual_yx[0, y], color="cyan", lw=0.6)
    for x in range(0, w, step):
        ys = np.arange(h)
        ax.plot(
            x + gain * residual_yx[1, :, x], ys + gain * residual_yx[0, :, x], color="cyan", lw=0.6
        )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    ax.set_title(f"deformation grid (non-rigid part x{gain:g}, grid {step * spacing_px:.0f} px)")
    return write_figure(fig, path)


def tissue_figure(
    path: str | os.PathLike[str], panels: list[tuple[str, np.ndarray, np.ndarray]]
) -> Path:
    """Each image with its tissue mask outlined: ``panels`` are (name, (y, x, 3) uint8 image,
    (y', x') bool mask over the same extent at any resolution).

    The title gives the share of the image the mask covers, so a mask that misses pale tissue
    (its tiles are skipped as "no tissue") shows at a glance.
    """
    fig, axes = new_figure(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (name, img, mask) in zip(axes.ravel(), panels, strict=True):
        h, w = img.shape[:2]
        m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        ax.imshow(img, interpolation="nearest")
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_title(f"{name}: tissue {100 * float(mask.mean()):.0f} % of the image", fontsize=10)
        ax.axis("off")
    fig.suptitle("Tissue masks (green outline)")
    return write_figure(fig, path)


def block_reduce_for_display(
    image: np.ndarray, max_side: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Reduce a (y, x) map to at most ``max_side`` px per side by square blocks.

    Returns ``(mean, minimum, factor)``: the mean and the minimum of each ``factor`` x
    ``factor`` block (edge blocks are partial). The minimum keeps a single folded grid pixel
    visible after reduction; the mean gives the colour. Works one block row at a time, so the
    temporaries stay of the size of the output (a 2500² Jacobian drawn whole made matplotlib
    use 0.7 GB).
    """
    h, w = image.shape
    k = max(1, -(-max(h, w) // max_side))
    if k == 1:
        return image.astype(np.float32), image.astype(np.float32), 1
    oh, ow = -(-h // k), -(-w // k)
    mean = np.empty((oh, ow), np.float32)
    low = np.empty((oh, ow), np.float32)
    edges = np.arange(0, w, k)
    counts = np.diff(np.append(edges, w)).astype(np.float32)
    for i in range(oh):
        rows = image[i * k : (i + 1) * k].astype(np.float32)
        mean[i] = np.add.reduceat(rows.sum(axis=0), edges) / (counts * rows.shape[0])
        low[i] = np.minimum.reduceat(rows.min(axis=0), edges)
    return mean, low, k


def jacobian_figure(path: str | os.PathLike[str], jac: np.ndarray, max_side: int = 1024) -> Path:
    """Jacobian determinant map (1 = no area change) with folds (det <= 0) marked in black.

    ``jac`` is (y, x) on the field grid; it is drawn reduced to ``max_side`` px (block mean for
    the colour; a block is black when any of its grid pixels folds). The title's fold share is
    over every grid pixel.
    """
    mean, low, _ = block_reduce_for_display(jac, max_side)
    fig, ax = new_figure(figsize=(6, 6 * jac.shape[0] / max(jac.shape[1], 1)))
    im = ax.imshow(mean, cmap="RdBu_r", vmin=0.5, vmax=1.5, interpolation="nearest")
    folds = np.ma.masked_where(low > 0, np.ones_like(low))
    ax.imshow(folds, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    share = float(np.count_nonzero(jac <= 0)) / max(jac.size, 1)
    ax.set_title(f"Jacobian determinant (folds: {100 * share:.3f} % of grid, black)")
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return write_figure(fig, path)


def _data_uri(png: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


_CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.getElementById('load-status').textContent = 'images loaded: ' + ok + '/' + imgs.length;
});
</script>"""


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(v: object) -> str:
    import html

    if isinstance(v, float):
        return f"{v:.5g}"
    return html.escape(str(v))


def html_report(
    path: str | os.PathLike[str],
    title: str,
    sections: list[tuple[str, list[tuple[str, object]], list[Path]]],
) -> Path:
    """One self-contained HTML page: per section a metrics table and its figures (embedded).

    A small script reports, once the page has loaded, how many images decoded
    (``#load-status``), which the tests read from headless Chromium.
    """
    import html

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}img{max-width:48%;margin:4px;"
        "border:1px solid #ccc}table{border-collapse:collapse;margin:.5em 0}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "section{border-top:2px solid #888;margin-top:1em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p id='load-status'>loading</p>",
    ]
    for name, rows, figures in sections:
        parts.append(f"<section><h2>{html.escape(name)}</h2>{_table(rows)}")
        for fig in figures:
            parts.append(f"<img alt='{html.escape(fig.stem)}' src='{_data_uri(fig)}'>")
        parts.append("</section>")
    parts.append(_CHECK_SCRIPT + "</body></html>")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(p)
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, p)
    return p


def registration_quality(metrics: dict[str, Any]) -> dict[str, Any]:
    """Quality figures of a finished pair from its ``metrics.json`` dict: the coarse method, the
    finest level's accepted / total tiles and mean tile confidence, and the folding fraction."""
    finest = (metrics.get("levels") or [{}])[-1]
    return {
        "coarse_method": metrics["rigid"]["method"],
        "tiles_ok": finest.get("tiles_ok", 0),
        "tiles": finest.get("tiles", 0),
        "mean_confidence": finest.get("mean_confidence"),
        "folding_fraction": float(metrics.get("folding_fraction") or 0.0),
    }


# the coarse selection score (-7.5..2.5, see rigid.RigidResult) of a fit the tiles cannot
# improve: identical images and exact synthetic copies score 2.50; the bundled ANHIR pairs
# 1.14-2.05
EXACT_FIT_SCORE = 2.3


def quality_warnings(metrics: dict[str, Any]) -> list[str]:
    """What a user should hear about a finished pair, from its ``metrics.json`` dict: a tissue
    scale outside the plausible range (a resolution mismatch no pixel size states), and no
    tile on tissue registered at any level (the result is the coarse alignment alone). Not
    when every tile on tissue only gained nothing ("no gain") over a coarse fit that scored at
    least :data:`EXACT_FIT_SCORE`: the images already matched (identical images warned); a
    "no gain" after a poorer fit still counts as a failure."""
    from wsireg_flow.rigid import SCALE_NOTE

    rigid = metrics.get("rigid", {})
    found = [n for n in rigid.get("notes", []) if n.startswith(SCALE_NOTE)]
    statuses: dict[str, int] = {}
    for lv in metrics.get("levels", []):
        for status, n in lv.get("statuses", {}).items():
            statuses[status] = statuses.get(status, 0) + n
    exact = float(rigid.get("score_final", float("nan"))) >= EXACT_FIT_SCORE
    passed = ("ok", "no tissue", "no gain") if exact else ("ok", "no tissue")
    failed = sum(n for s, n in statuses.items() if s not in passed)
    if failed and not statuses.get("ok"):
        shown = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        found.append(
            f"no tile on tissue registered at any level ({shown}): the result is the coarse "
            "alignment alone; look at qc/overlay.png"
        )
    return found


def run_warnings(run_dir: Path) -> list[str]:
    """:func:`quality_warnings` of a finished register run, or of every pair of a stack run
    (each prefixed with the pair's folder name)."""
    pairs = run_dir / "pairs"
    if (run_dir / "stack.json").is_file() and pairs.is_dir():
        return [
            f"pair {d.name}: {w}"
            for d in sorted(pairs.iterdir())
            if (d / "metrics.json").is_file()
            for w in quality_warnings(json.loads((d / "metrics.json").read_text()))
        ]
    return quality_warnings(json.loads((run_dir / "metrics.json").read_text()))


def metrics_rows(metrics: dict[str, Any]) -> list[tuple[str, object]]:
    """The metrics table of the QC page, from ``metrics.json`` content."""
    rigid = metrics.get("rigid", {})
    rows: list[tuple[str, object]] = [
        ("target", metrics.get("inputs", {}).get("target")),
        ("source", metrics.get("inputs", {}).get("source")),
        ("coarse method", rigid.get("method")),
        (
            "coarse scale / rotation (deg)",
            f"{rigid.get('scale', 0):.4f} / {rigid.get('rotation_deg', 0):.2f}",
        ),
        ("mirrored", rigid.get("flipped")),
        ("folding share (max over levels)", metrics.get("folding_fraction")),
    ]
    for lv in metrics.get("levels", []):
        rows.append(
            (
                f"level {lv['target_level']} tiles ok / total",
                f"{lv['tiles_ok']} / {lv['tiles']} (mean confidence {lv['mean_confidence']:.3f})",
            )
        )
    lm = metrics.get("landmarks")
    if lm:
        for k in ("initial_median_rtre", "median_rtre", "mean_rtre", "max_rtre", "robustness"):
            rows.append((k, lm[k]))
    for name, sec in metrics.get("stage_seconds", {}).items():
        rows.append((f"stage {name} (s)", sec))
    return rows


def qc_figures(
    target: Slide,
    source: Slide,
    warped: Slide,
    transform: Transform,
    reports: Sequence[LevelReport],
    qc_dir: Path,
    landmarks: tuple[np.ndarray, np.ndarray] | None = None,
    size: int = 1024,
    masks: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Path]:
    """QC PNGs: overlays before/after, landmark arrows before/after (when given), checkerboard,
    tile confidence per level, the (target, source) tissue masks (when given, (y, x) bool over
    each whole slide), deformation grid and Jacobian map."""
    t_img, dt = preview(target, size)
    w_img, _ = preview(warped, size)
    w_img = cv2.resize(w_img, (t_img.shape[1], t_img.shape[0]), interpolation=cv2.INTER_AREA)
    s_img, ds = preview(source, int(size * max(source.shapes[0][:2]) / max(target.shapes[0][:2])))
    before = np.full_like(t_img, 255)
    hh, ww = min(before.shape[0], s_img.shape[0]), min(before.shape[1], s_img.shape[1])
    before[:hh, :ww] = s_img[:hh, :ww]
    paths = [
        save_figure(
            qc_dir / "overlay.png",
            [
                ("before (target red, source green)", overlay(t_img, before)),
                ("after", overlay(t_img, w_img)),
            ],
            "Registration overlay",
        ),
    ]
    if landmarks is not None:
        t_pts, s_pts = landmarks
        warped_pts = corner_origin(transform.source_to_target)(s_pts)
        paths.append(
            save_figure(
                qc_dir / "landmarks.png",
                [("before: source -> target", t_img), ("after: warped source -> target", t_img)],
                "Landmark errors (arrows end at the target landmarks)",
                [(s_pts / ds, t_pts / dt), (warped_pts / dt, t_pts / dt)],
            )
        )
    paths += [
        save_figure(
            qc_dir / "checkerboard.png", [("checkerboard after", checkerboard(t_img, w_img))]
        ),
    ]
    if reports:
        panels = [
            (f"level {r.target_level} tile confidence", np.nan_to_num(r.confidence_map, nan=0.0))
            for r in reports
        ]
        paths.append(
            save_figure(
                qc_dir / "tile-confidence.png",
                panels,
                value_range=(0.0, 1.0),
                value_label="tile confidence (0: no tile or coarse kept)",
            )
        )
    if masks is not None:
        paths.append(
            tissue_figure(
                qc_dir / "tissue.png", [("target", t_img, masks[0]), ("source", s_img, masks[1])]
            )
        )
    f = transform.backward
    if f is not None:
        h, w = t_img.shape[:2]
        centres_y = (np.arange(h) + 0.5) * dt - 0.5
        centres_x = (np.arange(w) + 0.5) * dt - 0.5
        yy, xx = np.meshgrid(
            (centres_y - f.origin) / f.spacing, (centres_x - f.origin) / f.spacing, indexing="ij"
        )
        residual = sample(f.data, yy, xx) / np.float32(dt)
        peak = float(np.abs(residual).max())
        gain = float(np.clip(8.0 / peak, 1.0, 10.0)) if peak > 0 else 1.0
        paths.append(
            deformation_grid_figure(
                qc_dir / "deformation-grid.png", t_img, residual, dt, gain=round(gain, 1)
            )
        )
        paths.append(
            jacobian_figure(qc_dir / "jacobian.png", jacobian_determinant(f.data, 1.0 / f.spacing))
        )
    return paths
