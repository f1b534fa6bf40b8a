"""Register one slide pair with palom and write what it computed as JSON (runs in palom's venv).

Measured with palom 2026.4.1 (PyPI). Executed by ``benchmarks_anhir.compare_palom`` with the
Python of a separate venv that has palom installed (palom is not a dependency of wsireg-flow);
it imports only palom, its dependencies and the standard library, never ``wsireg_flow``.

It follows palom's README recipe for a pair of (OME-)TIFF files ("Scripting / For TIFF and
OME-TIFF files"), with palom's defaults unless stated:

1. ``palom.reader.OmePyramidReader`` for both slides (REF = the ANHIR target, MOVING = the
   source); registration channel 1 (green) of both RGB slides, as the README does for
   brightfield; level 0 (full resolution); thumbnail level
   ``reader.get_thumbnail_level_of_size(2000)`` (the README's suggested starting point).
2. ``Aligner.coarse_register_affine(n_keypoints=4000)`` (the README's value; ORB + RANSAC on the
   thumbnails). ``plot_match_result=False``: the QC plot changes nothing in the result.
   ``--coarse search`` uses instead the coarse step of palom's ``palom-align-he`` command
   (``palom.register_dev.search_then_register``: tries flips and intensity inversion, entropy
   mask, 10000 keypoints), a variant, not the README recipe.
3. ``Aligner.compute_shifts()`` (phase correlation per block of the reference level; a block is
   one chunk of the reference dask array, i.e. one TIFF tile, unless ``--block`` rechunks it)
   then ``Aligner.constrain_shifts()``. When that raises (its triangle threshold fails on a few
   blocks with identical integer shifts) the measured shifts are kept, non-finite ones set to
   0 (the coarse affine), and the error is recorded as ``constrain_error``.
4. Optionally (``--out-tif``) ``palom.align.block_affine_transformed_moving_img`` on all three
   RGB channels of the moving slide and ``palom.pyramid.write_pyramid`` (zlib, 1024 px tiles,
   downscale 2, ``save_RAM=True``), as ``palom-align-he`` writes a registered RGB slide.

Output JSON (all matrices 3x3, row-major, acting on homogeneous ``(x, y, 1)`` points in
level-0 pixels, pixel centres at integer coordinates as in OpenCV/scikit-image):

* ``affine_matrix``: MOVING -> REF (coarse affine, scaled to level 0);
* ``block_affine_matrices``: one per block, row-major over the block grid, MOVING -> REF, valid
  for REF pixels inside that block (``T(shift_b) @ affine_matrix``);
* ``shifts_yx`` / ``original_shifts_yx``: constrained / raw block shifts ``(dy, dx)`` in px;
* ``block_edges_y`` / ``block_edges_x``: block boundaries in REF level-0 rows / columns
  (block ``(i, j)`` covers rows ``[edges_y[i], edges_y[i+1])``);
* ``seconds``: wall time of each step; ``palom_version``; ``thumbnail_levels``.

    PALOM_PY benchmarks_anhir/palom_driver.py REF MOVING --json OUT.json [--out-tif OUT.ome.tif]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def register(
    ref: Path,
    moving: Path,
    *,
    channel: int = 1,
    thumbnail_size: int = 2000,
    n_keypoints: int = 4000,
    block: int | None = None,
    coarse: str = "readme",
    out_tif: Path | None = None,
) -> dict[str, Any]:
    """Run palom on one pair; returns the JSON-ready record described in the module doc."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import palom

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    r1 = palom.reader.OmePyramidReader(ref)
    r2 = palom.reader.OmePyramidReader(moving)
    level = 0
    tl1 = int(r1.get_thumbnail_level_of_size(thumbnail_size))
    tl2 = int(r2.get_thumbnail_level_of_size(thumbnail_size))
    ref_img = r1.read_level_channels(level, channel)
    if block is not None:
        ref_img = ref_img.rechunk((block, block))
    aligner = palom.align.Aligner(
        ref_img=ref_img,
        moving_img=r2.read_level_channels(level, channel),
        ref_thumbnail=r1.read_level_channels(tl1, channel).compute(),
        moving_thumbnail=r2.read_level_channels(tl2, channel).compute(),
        ref_thumbnail_down_factor=r1.level_downsamples[tl1] / r1.level_downsamples[level],
        moving_thumbnail_down_factor=r2.level_downsamples[tl2] / r2.level_downsamples[level],
    )
    seconds["open"] = time.perf_counter() - t0

    t = time.perf_counter()
    if coarse == "readme":
        aligner.coarse_register_affine(n_keypoints=n_keypoints, plot_match_result=False)
    else:  # palom-align-he's coarse step: search flip / intensity inversion, then match
        mx = palom.register_dev.search_then_register(
            np.asarray(aligner.ref_thumbnail),
            np.asarray(aligner.moving_thumbnail),
            n_keypoints=10_000,
            auto_mask=True,
            max_size=2000,
            plot_match_result=False,
        )
        aligner.coarse_affine_matrix = np.vstack([mx, [0, 0, 1]])
    seconds["coarse"] = time.perf_counter() - t
    t = time.perf_counter()
    aligner.compute_shifts()
    seconds["shifts"] = time.perf_counter() - t
    t = time.perf_counter()
    constrain_error = None
    try:
        aligner.constrain_shifts()
    except Exception as exc:  # palom's outlier threshold fails on small, uniform grids
        # what a user does next: keep the measured shifts, the coarse affine where none is
        constrain_error = f"{type(exc).__name__}: {exc}"
        aligner.original_shifts = aligner.shifts.copy()
        aligner.shifts = np.where(np.isfinite(aligner.shifts), aligner.shifts, 0.0)
    seconds["constrain"] = time.perf_counter() - t
    mxs = aligner.block_affine_matrices

    if out_tif is not None:
        t = time.perf_counter()
        mosaic = palom.align.block_affine_transformed_moving_img(
            ref_img=aligner.ref_img,
            moving_img=r2.pyramid[level],
            mxs=aligner.block_affine_matrices_da,
        )
        palom.pyramid.write_pyramid(
            mosaics=[mosaic],
            output_path=out_tif,
            pixel_size=r1.pixel_size * r1.level_downsamples[level],
            channel_names=[list("RGB")],
            compression="zlib",
            downscale_factor=2,
            save_RAM=True,
            tile_size=1024,
            kwargs_tifffile={"photometric": "rgb", "planarconfig": "separate"},
        )
        seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    edges_y = np.concatenate([[0], np.cumsum(aligner.ref_img.chunks[0])])
    edges_x = np.concatenate([[0], np.cumsum(aligner.ref_img.chunks[1])])
    return {
        "palom_version": palom.__version__,
        "ref": str(ref),
        "moving": str(moving),
        "ref_shape_yx": list(aligner.ref_img.shape),
        "moving_shape_yx": list(aligner.moving_img.shape),
        "channel": channel,
        "n_keypoints": n_keypoints,
        "coarse": coarse,
        "thumbnail_levels": [tl1, tl2],
        "thumbnail_down_factors": [
            float(aligner.ref_thumbnail_down_factor),
            float(aligner.moving_thumbnail_down_factor),
        ],
        "grid_shape": [int(n) for n in aligner.grid_shape],
        "block_edges_y": [int(v) for v in edges_y],
        "block_edges_x": [int(v) for v in edges_x],
        "affine_matrix": np.asarray(aligner.affine_matrix).tolist(),
        "coarse_affine_matrix": np.asarray(aligner.coarse_affine_matrix).tolist(),
        "shifts_yx": np.asarray(aligner.shifts, dtype=float).tolist(),
        "original_shifts_yx": [
            [v if np.isfinite(v) else None for v in row]
            for row in np.asarray(aligner.original_shifts, dtype=float).tolist()
        ],
        "block_affine_matrices": np.asarray(mxs).tolist(),
        "constrain_error": constrain_error,
        "out_tif": None if out_tif is None else str(out_tif),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref", type=Path, nargs="?", help="Reference (ANHIR target) OME-TIFF.")
    p.add_argument("moving", type=Path, nargs="?", help="Moving (ANHIR source) OME-TIFF.")
    p.add_argument("--json", type=Path, help="Where to write the record.")
    p.add_argument("--out-tif", type=Path, default=None, help="Write the registered slide.")
    p.add_argument("--channel", type=int, default=1, help="Registration channel (1 = green).")
    p.add_argument("--thumbnail-size", type=int, default=2000)
    p.add_argument("--n-keypoints", type=int, default=4000)
    p.add_argument("--block", type=int, default=None, help="Rechunk the reference (px).")
    p.add_argument(
        "--coarse",
        choices=["readme", "search"],
        default="readme",
        help="readme: Aligner.coarse_register_affine; search: palom-align-he's coarse step.",
    )
    p.add_argument("--check", action="store_true", help="Only import palom and print its version.")
    args = p.parse_args(argv)
    if args.check:
        import palom

        print(palom.__version__)
        return 0
    if args.ref is None or args.moving is None or args.json is None:
        p.error("REF, MOVING and --json are required (unless --check)")
    rec = register(
        args.ref,
        args.moving,
        channel=args.channel,
        thumbnail_size=args.thumbnail_size,
        n_keypoints=args.n_keypoints,
        block=args.block,
        coarse=args.coarse,
        out_tif=args.out_tif,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
