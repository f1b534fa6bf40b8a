"""Prefect's own overhead for a pair run: the same job with and without the flow.

    python -m benchmarks_anhir.prefect_overhead --out runs/bench/prefect-overhead.json

Runs one bundled ANHIR pair three ways into fresh directories: the library alone
(``run_pair``), the ``register_pair`` flow against a temporary local server started for the
process (what a plain ``wsireg-flow register`` does), and the flow once more in the same process
(server already up). Prints and writes the wall times and the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from wsireg_flow.config import Config
from wsireg_flow.pipeline import PairJob, run_pair

DATA = Path(__file__).resolve().parents[1] / "data" / "anhir-sample" / "lung-lesion_3" / "scale-5pc"


def _job(out: Path) -> PairJob:
    shutil.rmtree(out, ignore_errors=True)
    return PairJob(
        DATA / "29-041-Izd2-w35-CD31-3-les3.jpg",
        DATA / "29-041-Izd2-w35-He-les3.jpg",
        out,
        Config(),
        target_landmarks=DATA / "29-041-Izd2-w35-CD31-3-les3.csv",
        source_landmarks=DATA / "29-041-Izd2-w35-He-les3.csv",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/prefect-overhead.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    t0 = time.perf_counter()
    run_pair(_job(work / "library"))
    library = time.perf_counter() - t0
    t0 = time.perf_counter()
    from flows.pair import register_pair
    from flows.server import prefect_api

    with prefect_api():  # as the command line does: the server's start counts in the cold run
        register_pair(_job(work / "flow-cold"))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        register_pair(_job(work / "flow-warm"))
        warm = time.perf_counter() - t0
    result = {
        "library_s": round(library, 2),
        "flow_cold_s": round(cold, 2),
        "flow_warm_s": round(warm, 2),
        "overhead_cold_s": round(cold - library, 2),
        "overhead_warm_s": round(warm - library, 2),
        "stages": 9,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
