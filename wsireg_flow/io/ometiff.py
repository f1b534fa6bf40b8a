"""Export OME-Zarr pyramids as tiled, pyramidal OME-TIFF (SubIFDs), strip by strip.

Level 0 is the main image; coarser levels are SubIFDs of it (the layout QuPath, OMERO and
Bio-Formats read as a pyramid). Pixels stream in tile order from one strip of the Zarr level at
a time (a strip is one chunk row, at most a few tiles high), so memory is bounded by one strip
whatever the slide size.
The physical pixel size goes into the OME-XML (``PhysicalSizeX/Y`` in µm) and into the TIFF
resolution tags (pixels per centimetre).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile

from wsireg_flow.io.omezarr import is_label_pyramid
from wsireg_flow.io.slide import Slide, open_slide
from wsireg_flow.progress import ProgressFn
from wsireg_flow.stages import check_file_output, temp_sibling


def _tiles(
    slide: Slide, level: int, tile: int, progress: ProgressFn | None, stage: str
) -> Iterator[np.ndarray]:
    """Yield (tile, tile, c) blocks of a level in row-major tile order, padded at the edges."""
    h, w, c = slide.shapes[level]
    strip = max(tile, _chunk_rows(slide, level, tile))
    n_rows = -(-h // tile)
    done = 0
    for y0 in range(0, h, strip):
        block = slide.read_region(level, y0, 0, min(h, y0 + strip), w)
        for ty in range(0, block.shape[0], tile):
            row = block[ty : ty + tile]
            for tx in range(0, w, tile):
                t = row[:, tx : tx + tile]
                if t.shape[0] != tile or t.shape[1] != tile:
                    pad = np.zeros((tile, tile, c), block.dtype)
                    pad[: t.shape[0], : t.shape[1]] = t
                    t = pad
                yield np.ascontiguousarray(t)
            done += 1
            if progress:
                progress(stage, done, n_rows)


MAX_STRIP_TILES = 4
"""A strip is at most this many tile rows, whatever the input's chunks (a stripped TIFF of one
strip would otherwise be read whole)."""


def _chunk_rows(slide: Slide, level: int, tile: int) -> int:
    """Rows read at a time: the level's chunk rows (one chunk row of an OME-Zarr level) as a
    whole number of tiles, from 1 to ``MAX_STRIP_TILES`` tiles."""
    rows = getattr(slide.levels[level], "chunk_rows", None) or tile
    return min(max(tile, (rows // tile) * tile), MAX_STRIP_TILES * tile)


def export_ome_tiff(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    compression: Literal["jpeg", "deflate"] = "jpeg",
    quality: int = 90,
    tile: int = 512,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    slide: Slide | None = None,
) -> Path:
    """Write every level of ``source`` (OME-Zarr or any readable slide) as one OME-TIFF.

    ``slide`` may supply the pixels instead (an already opened, possibly lazy, view).

    JPEG needs uint8 with 1 or 3 channels, and is lossy: label pyramids (``warp --labels``),
    whose values must survive exactly, and anything else are written with deflate.
    Written to a temporary name and renamed when complete.
    """
    out = check_file_output(out, overwrite, [source])
    labels = slide is None and is_label_pyramid(source)
    slide = slide if slide is not None else open_slide(source)
    _h, _w, c = slide.shapes[0]
    if compression == "jpeg" and (labels or not (slide.dtype == np.uint8 and c in (1, 3))):
        compression = "deflate"
    codec = "jpeg" if compression == "jpeg" else "zlib"
    codec_args = {"level": quality if compression == "jpeg" else 6}
    photometric = "rgb" if c == 3 else "minisblack"
    mpp = slide.pixel_size_um
    metadata: dict[str, object] = {"axes": "YXS" if c > 1 else "YX", "Name": Path(source).name}
    if mpp:
        metadata.update(
            PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm"
        )
    tmp = temp_sibling(out)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for k in range(len(slide.levels)):
                lh, lw, _ = slide.shapes[k]
                shape = (lh, lw, c) if c > 1 else (lh, lw)
                tiles = _tiles(slide, k, tile, progress, f"export level {k}")
                if c == 1:
                    tiles = (t[..., 0] for t in tiles)
                kwargs: dict[str, object] = {
                    "shape": shape,
                    "dtype": slide.dtype,
                    "tile": (tile, tile),
                    "photometric": photometric,
                    "compression": codec,
                    "compressionargs": codec_args,
                }
                if mpp:
                    ppcm = 1e4 / (mpp * slide.downsamples[k])
                    kwargs.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
                if k == 0:
                    tif.write(tiles, subifds=len(slide.levels) - 1, metadata=metadata, **kwargs)
                else:
                    tif.write(tiles, subfiletype=1, metadata=None, **kwargs)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        slide.close()
    return out
