"""End-to-end gigapixel benchmark on synthetic pairs with ground truth.

For each size (square, px) and worker count it runs the whole pipeline (ingest both slides,
coarse, non-rigid, stitch, full-resolution warp written as OME-Zarr, landmark evaluation) and
records wall time per stage, peak RSS of the whole process tree (sampled every 0.1 s, children
included; overall and per stage; each case runs in a fresh process), megapixels per second
(target level-0 pixels / total time) and TRE against the ground truth in level-0 pixels.
Prints a table and writes JSON.

    python -m benchmarks_anhir.gigapixel --sizes 10000 20000 40000 --workers 1 2 \\
        --out runs/bench/gigapixel.json [--config F]

Synthetic pairs are cached under ``--data`` (default ``runs/bench``). ``--scheduler threads``
(default) runs the tile tasks on Dask's threaded scheduler with ``num_workers`` threads;
``--scheduler local`` on a LocalCluster of that many single-thread worker processes (the CLI's
default), whose memory is included in the peak. Ingest and warp always use ``num_workers``
threads in the main process; BLAS/OpenCV threads are limited to 1 per worker.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import cv2  # noqa: E402
import dask  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from wsireg_flow.config import Config, DaskConfig, load_config  # noqa: E402
from wsireg_flow.landmarks import read_landmarks  # noqa: E402
from wsireg_flow.parallel import dask_scheduler  # noqa: E402
from wsireg_flow.pipeline import PAIR_STAGES, PairJob, run_pair  # noqa: E402
from wsireg_flow.stages import limit_malloc_arenas  # noqa: E402
from wsireg_flow.synthetic import GENERATOR_VERSION, synthesize_pair  # noqa: E402


class PeakRSS:
    """Sample the RSS of this process and all its descendants; keep the peak (bytes) and the
    samples as ``(unix time [s], bytes)``."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak = interval, 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._sample()
            self.samples.append((time.time(), rss))
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def peak_per_stage(
    samples: list[tuple[float, int]], records: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Peak RSS [GB] sampled while each stage ran.

    ``records`` maps a stage name to its ``.stages/NAME.json`` record, which holds when it
    ``finished`` (unix time, s) and how many ``seconds`` it took. A stage too short to be
    sampled gets the sample nearest its end.
    """
    if not samples:
        return {}
    times = np.array([t for t, _ in samples])
    rss = np.array([b for _, b in samples], dtype=np.float64)
    out = {}
    for name, rec in records.items():
        end = float(rec["finished"])
        inside = (times >= end - float(rec["seconds"])) & (times <= end)
        peak = rss[inside].max() if inside.any() else rss[np.abs(times - end).argmin()]
        out[name] = round(float(peak) / 1e9, 3)
    return out


def ensure_pair(data: Path, size: int, seed: int) -> Path:
    """The synthetic pair ``DATA/synth-SIZE``, made again unless it is of this generator
    version and ``seed`` (a cached pair of another seed used to be reused silently)."""
    d = data / f"synth-{size}"
    info = d / "synth.json"
    made = json.loads(info.read_text()) if info.is_file() else {}
    if (made.get("generator"), made.get("seed")) != (GENERATOR_VERSION, seed):
        t0 = time.perf_counter()
        synthesize_pair(d, (size, size), seed=seed, overwrite=True)
        print(f"synthesised {size}x{size} in {time.perf_counter() - t0:.1f} s", flush=True)
    return d


def run_case(
    pair_dir: Path, size: int, workers: int, work: Path, cfg: Config, scheduler: str = "threads"
) -> dict[str, Any]:
    limit_malloc_arenas()  # as the command line does, before any thread allocates
    run_dir = work / f"run-{size}-w{workers}-{scheduler}"
    shutil.rmtree(run_dir, ignore_errors=True)
    job = PairJob(
        pair_dir / "target.ome.tif",
        pair_dir / "source.ome.tif",
        run_dir,
        cfg,
        target_landmarks=pair_dir / "target.csv",
        source_landmarks=pair_dir / "source.csv",
    )
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    dask_cfg = DaskConfig(scheduler=scheduler, n_workers=workers)
    with (
        dask.config.set(num_workers=workers),
        PeakRSS() as rss,
        dask_scheduler(dask_cfg) as handle,
    ):
        run_pair(job, scheduler=handle)
    total = time.perf_counter() - t0
    records = {n: json.loads((run_dir / ".stages" / f"{n}.json").read_text()) for n in PAIR_STAGES}
    stages = {n: rec["seconds"] for n, rec in records.items()}
    t = read_landmarks(pair_dir / "target.csv")
    w = read_landmarks(run_dir / "warped-source-landmarks.csv")
    tre = np.linalg.norm(w - t, axis=1)
    result = {
        "size": size,
        "workers": workers,
        "scheduler": scheduler,
        "seconds_total": round(total, 2),
        "seconds_per_stage": {k: round(v, 2) for k, v in stages.items()},
        "peak_rss_gb": round(rss.peak / 1e9, 3),
        "peak_rss_gb_per_stage": peak_per_stage(rss.samples, records),
        "megapixels_per_second": round(size * size / 1e6 / total, 2),
        "tre_px_median": round(float(np.median(tre)), 4),
        "tre_px_p90": round(float(np.percentile(tre, 90)), 4),
        "tre_px_max": round(float(tre.max()), 4),
        "landmarks": len(tre),
    }
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def run_case_in_fresh_process(
    pair_dir: Path, size: int, workers: int, work: Path, cfg: Config, scheduler: str = "threads"
) -> dict[str, Any]:
    """:func:`run_case` in a new (spawned) Python process, so that its peak RSS is its own: in
    one process, each case started from the memory the cases before it left behind (at 40000²
    0.96 GB measured after five other cases, against 0.71 GB alone)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(run_case, pair_dir, size, workers, work, cfg, scheduler).result()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scheduler", choices=["threads", "local"], default="threads")
    ap.add_argument("--data", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gigapixel.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, help="YAML config (default: the built-in defaults)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    results = []
    print(
        f"{'size':>7} {'workers':>7} {'total s':>8} {'peak GB':>8} {'MP/s':>7} {'TRE med':>8} "
        f"{'TRE p90':>8}  stages (s)",
        flush=True,
    )
    for size in args.sizes:
        pair = ensure_pair(args.data, size, args.seed)
        for workers in args.workers:
            r = run_case_in_fresh_process(pair, size, workers, args.data, cfg, args.scheduler)
            results.append(r)
            st = " ".join(f"{k}={v}" for k, v in r["seconds_per_stage"].items())
            print(
                f"{size:>7} {workers:>7} {r['seconds_total']:>8} {r['peak_rss_gb']:>8} "
                f"{r['megapixels_per_second']:>7} {r['tre_px_median']:>8} "
                f"{r['tre_px_p90']:>8}  {st}",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(
                    {
                        "machine": {
                            "cores": os.cpu_count(),
                            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
                        },
                        "config": cfg.model_dump(mode="json"),
                        "results": results,
                    },
                    indent=2,
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
