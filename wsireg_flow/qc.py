"""Quality-control figures (PNG): overlays before/after, checkerboard, confidence, landmarks.

All images are low-resolution previews (the target level closest to ``size`` px), built from
(y, x, c) arrays; landmark points are (x, y) level-0 pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from wsireg_flow.tissue import optical_density


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


def save_figure(
    path: str | os.PathLike[str],
    panels: list[tuple[str, np.ndarray]],
    title: str = "",
    points: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> Path:
    """Save panels side by side; ``points[i]`` = (start (N,2), end (N,2)) arrows in panel px."""
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 5), squeeze=False)
    for i, (name, img) in enumerate(panels):
        ax = axes[0, i]
        ax.imshow(img, cmap="magma" if img.ndim == 2 else None, interpolation="nearest")
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
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=80)
    plt.close(fig)
    return p
