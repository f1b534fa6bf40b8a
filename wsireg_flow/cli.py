"""The ``wsireg-flow`` command line.

Errors a user can fix (bad input, bad config) print one line on stderr naming the file and the
problem and exit with status 2; unexpected errors print one line and exit 1. ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wsireg_flow import __version__
from wsireg_flow.config import (
    SCHEDULER_HELP,
    Config,
    config_to_yaml,
    is_scheduler,
    load_config,
)
from wsireg_flow.errors import (
    ConfigError,
    InputError,
    OneLineFormatter,
    OutputError,
    WsiregError,
    output_error,
)
from wsireg_flow.stages import check_not_over_inputs, check_writable_dir, limit_malloc_arenas
from wsireg_flow.watchdog import descendants, start_watchdog, stop_watchdog

Handler = Callable[[argparse.Namespace], int]
LOG = logging.getLogger("wsireg_flow.cli")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config (see configs/).")
    p.add_argument("--debug", action="store_true", help="Show tracebacks.")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="No progress output.")
    shown.add_argument(
        "--progress", action="store_true", help="Show progress even when stderr is not a terminal."
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        default=None,
        help="'local' (default: a Dask LocalCluster sized to this machine), 'threads', 'sync' "
        "(one thread, for debugging) or a Dask scheduler address (tcp://host:8786).",
    )
    p.add_argument("--pixel-size", type=float, default=None, help="Micrometres per pixel.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing run directory.")


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    if getattr(args, "pixel_size", None) is not None:
        try:
            cfg.io.pixel_size_um = args.pixel_size
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].lower()
            raise ConfigError(f"{msg}, got {args.pixel_size:g}", "--pixel-size") from None
    if getattr(args, "scheduler", None):
        if not is_scheduler(args.scheduler):
            raise ConfigError(SCHEDULER_HELP.format(value=args.scheduler), "--scheduler")
        cfg.dask.scheduler = args.scheduler
    return cfg


def _progress(args: argparse.Namespace):
    from wsireg_flow.progress import StderrProgress

    # progress goes to an interactive stderr only (or with --progress), so that logs and error
    # output stay one line per problem
    show = args.progress or (not args.quiet and sys.stderr.isatty())
    return StderrProgress() if show else None


def cmd_info(args: argparse.Namespace) -> int:
    """`wsireg-flow info`: print a slide's levels, downsamples and pixel size."""
    from wsireg_flow.io.slide import open_slide

    cfg = _config(args)
    with open_slide(args.slide, cfg.io.pixel_size_um) as slide:
        print(json.dumps(slide.describe(), indent=2))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """`wsireg-flow ingest`: tile a slide into an OME-Zarr pyramid."""
    from wsireg_flow.io.omezarr import ingest
    from wsireg_flow.io.slide import open_slide

    cfg = _config(args)
    with open_slide(args.slide, cfg.io.pixel_size_um) as slide:
        out = ingest(
            slide,
            args.out,
            chunk=cfg.io.chunk,
            max_side=cfg.io.pyramid_max_side,
            codec=cfg.io.codec,
            overwrite=args.overwrite,
            progress=_progress(args),
        )
    print(out)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """`wsireg-flow register`: register SOURCE onto TARGET (the pair flow) and print its summary."""
    from wsireg_flow.pipeline import (
        PAIR_STAGES,
        PairJob,
        check_inputs,
        check_run_dir,
        job_is_complete,
    )
    from wsireg_flow.qc import quality_warnings, registration_quality

    cfg = _config(args)
    job = PairJob(
        args.target,
        args.source,
        args.out,
        cfg,
        target_landmarks=args.target_landmarks,
        source_landmarks=args.source_landmarks,
    )
    check_inputs(job)  # fail before any orchestration starts
    check_run_dir(job, args.overwrite)
    if (args.target_landmarks is None) != (args.source_landmarks is None):
        given, missing = (
            ("--target-landmarks", "--source-landmarks")
            if args.source_landmarks is None
            else ("--source-landmarks", "--target-landmarks")
        )
        LOG.warning("%s is warped but not scored: rTRE needs %s too", given, missing)
    if not args.overwrite and job_is_complete(job):
        # a finished job with unchanged inputs and settings: nothing to orchestrate
        ran = dict.fromkeys(PAIR_STAGES, False)
    else:
        from flows.pair import register_pair
        from flows.server import prefect_api

        with prefect_api():
            ran = register_pair(job, overwrite=args.overwrite, echo=_progress(args))
    metrics = json.loads((args.out / "metrics.json").read_text())
    quality = registration_quality(metrics)
    for warning in quality_warnings(metrics):
        LOG.warning("%s: %s", args.out, warning)
    summary: dict[str, object] = {
        "out": str(args.out),
        "rigid": quality["coarse_method"],
        "tiles_ok": f"{quality['tiles_ok']}/{quality['tiles']}",
        "folding_fraction": round(quality["folding_fraction"], 6),
        "report": str(args.out / "qc" / "report.html"),
        "stages_run": [k for k, v in ran.items() if v],
    }
    if "landmarks" in metrics:
        lm = metrics["landmarks"]
        summary.update(
            {
                k: round(lm[k], 5)
                for k in ("initial_median_rtre", "median_rtre", "max_rtre", "robustness")
            }
        )
    print(json.dumps(summary))
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    """`wsireg-flow stack`: register serial sections to a reference section."""
    from wsireg_flow.qc import run_warnings
    from wsireg_flow.stack import (
        StackJob,
        check_stack_dir,
        collect_sections,
        sections_folder,
        stack_is_complete,
    )

    cfg = _config(args)
    sections = collect_sections(args.slides)
    landmarks = args.landmarks
    if landmarks is not None and len(landmarks) != len(sections):
        raise WsiregError(f"{len(landmarks)} landmark files for {len(sections)} sections")
    if args.sort:  # keep each section with its landmark file
        order = sorted(range(len(sections)), key=lambda k: sections[k].name)
        sections = [sections[k] for k in order]
        landmarks = None if landmarks is None else [landmarks[k] for k in order]
    job = StackJob(sections, args.out, cfg, args.reference, landmarks, sections_folder(args.slides))
    job.validate()
    check_stack_dir(job, args.overwrite)
    if not args.overwrite and stack_is_complete(job):
        # a finished stack with unchanged inputs and settings: nothing to orchestrate
        metrics = json.loads((args.out / "metrics.json").read_text())
        result: dict[str, Any] = {"ran": {}, "metrics": metrics}
    else:
        from flows.server import prefect_api
        from flows.stack import register_stack

        with prefect_api():
            result = register_stack(job, overwrite=args.overwrite, echo=_progress(args))
    for warning in run_warnings(args.out):
        LOG.warning("%s: %s", args.out, warning)
    summary = {
        "out": str(args.out),
        "reference": job.name(job.ref),
        "stages_run": sum(bool(v) for v in result["ran"].values()),
        "sections": result["metrics"]["sections"],
    }
    print(json.dumps(summary, indent=1))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`wsireg-flow serve`: serve the inbox flow as a Prefect deployment on a cron schedule, or
    run it once (``--once``: exit 1 when a manifest failed)."""
    from flows.inbox import check_cron, process_inbox, require_server, serve, warnings_to

    # a typo here would fail every waiting manifest: refused before the inbox is touched
    for folder, what in ((args.inbox, "inbox"), (args.data_root, "--data-root")):
        if folder is not None and not folder.is_dir():
            problem = "is a file, not a folder" if folder.exists() else f"{what} folder not found"
            raise WsiregError(problem, folder)
    check_writable_dir(args.runs if args.runs is not None else args.inbox / "runs")
    if not args.once:
        check_cron(args.cron)
    if not 0 <= args.settle < float("inf"):
        raise ConfigError(f"must be a number of seconds >= 0, got {args.settle:g}", "--settle")
    if args.config is not None:
        load_config(args.config)  # refuse a bad config before serving
    params = {
        "inbox": str(args.inbox),
        "data_root": None if args.data_root is None else str(args.data_root),
        "runs": None if args.runs is None else str(args.runs),
        "config_file": None if args.config is None else str(args.config),
        "settle": args.settle,
    }
    if args.once:
        from flows.server import prefect_api

        with prefect_api(), warnings_to(sys.stderr):
            summary = process_inbox(**params)
        print(json.dumps(summary))
        if summary["failed"]:  # for cron: a failed manifest is an alert (waiting ones are not)
            print(
                f"wsireg-flow: {len(summary['failed'])} manifest(s) failed: see "
                f"{args.inbox / 'failed'}",
                file=sys.stderr,
            )
            return 1
        return 0
    require_server()
    print(f"serving inbox {args.inbox} on schedule '{args.cron}' (Ctrl-C to stop)", file=sys.stderr)
    serve(cron=args.cron, **params)  # runs flows in subprocesses: their messages go to the log
    return 0


def cmd_anhir(args: argparse.Namespace) -> int:
    """`wsireg-flow anhir`: register and score an ANHIR-layout dataset."""
    from benchmarks_anhir.run import benchmark_is_complete, check_benchmark_dir, run_benchmark

    cfg = _config(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"must be at least 1, got {args.limit}", "--limit")
    where = (args.dataset, args.pairs, args.out, cfg)
    check_writable_dir(args.out)
    check_benchmark_dir(*where, args.status, args.limit)
    if benchmark_is_complete(*where, args.status, args.limit):
        # every pair finished with unchanged inputs and settings: rescore, no orchestration
        summary = run_benchmark(*where, status=args.status, limit=args.limit)
    else:
        from flows.anhir import anhir_benchmark
        from flows.server import prefect_api

        with prefect_api():
            summary = anhir_benchmark(
                *where, status=args.status, limit=args.limit, echo=_progress(args)
            )
    print((args.out / "scores" / "summary.md").read_text())
    figures = args.out / "figures"  # none when no pair was scored
    where = f"  figures: {figures}" if figures.is_dir() else ""
    print(f"report: {args.out / 'scores' / 'summary.md'}{where}")
    for index, warnings in summary["warnings"].items():
        for warning in warnings:
            LOG.warning("%s: %s", args.out / "pairs" / index, warning)
    if summary["failed_pairs"]:
        print(
            f"wsireg-flow: {summary['failed_pairs']} pair(s) failed: see "
            f"{args.out / 'failures.json'}",
            file=sys.stderr,
        )
        return 3 if args.strict else 0
    return 0


def cmd_warp_annotations(args: argparse.Namespace) -> int:
    """`wsireg-flow warp-annotations`: map GeoJSON annotations through a finished run."""
    from wsireg_flow.annotations import warp_geojson_file

    out = warp_geojson_file(
        args.transform, args.geojson, args.out, args.direction, args.densify, args.overwrite
    )
    print(out)
    return 0


def cmd_warp(args: argparse.Namespace) -> int:
    """`wsireg-flow warp`: warp another image (or a label mask) through a finished run."""
    from wsireg_flow.io.slide import open_slide
    from wsireg_flow.transform import InverseView, Transform
    from wsireg_flow.warp import warp_slide

    cfg = _config(args)
    check_not_over_inputs(args.out, [args.transform])  # --overwrite would delete the run
    transform = Transform.load(args.transform)
    forward = args.direction == "source-to-target"
    view = transform if forward else InverseView(transform)
    frame, into = ("source", "target") if forward else ("target", "source")
    expected = transform.source_shape if forward else transform.target_shape
    with open_slide(args.image, cfg.io.pixel_size_um) as image:
        h, w = image.shapes[0][:2]
        if (h, w) != tuple(expected):
            raise InputError(
                f"image is {w}x{h} px but the run's {frame} is {expected[1]}x{expected[0]} px: "
                f"{args.direction} warps images of the {frame}'s size",
                args.image,
            )
        # the output is in the other slide's frame: label it with that slide's pixel size
        pixel_size = transform.meta.get(f"{into}_pixel_size_um", image.pixel_size_um)
        out = warp_slide(
            view,
            image,
            args.out,
            pixel_size,
            chunk=cfg.io.chunk,
            max_side=cfg.io.pyramid_max_side,
            codec=cfg.io.codec,
            nearest=args.labels,
            overwrite=args.overwrite,
            progress=_progress(args),
            frame=into,
        )
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`wsireg-flow export`: write an OME-Zarr pyramid as a pyramidal OME-TIFF."""
    from wsireg_flow.io.ometiff import export_ome_tiff

    print(
        export_ome_tiff(
            args.zarr,
            args.out,
            compression=args.compression,
            overwrite=args.overwrite,
            progress=_progress(args),
        )
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """`wsireg-flow synth`: write a synthetic pair with a known deformation."""
    from wsireg_flow.synthetic import synthesize_pair

    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise WsiregError(f"--size must look like 40000x40000, got {args.size!r}") from None
    info = synthesize_pair(
        args.out, (h, w), seed=args.seed, overwrite=args.overwrite, progress=_progress(args)
    )
    print(json.dumps({"out": str(args.out), **info}))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`wsireg-flow config`: print the default configuration as YAML."""
    print(config_to_yaml(_config(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``wsireg-flow`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="wsireg-flow", description="Register whole-slide histology images."
    )
    parser.add_argument("--version", action="version", version=f"wsireg-flow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="Show a slide's levels, downsamples and pixel size.")
    p.add_argument("slide", type=Path)
    p.add_argument("--pixel-size", type=float, default=None, help="Micrometres per pixel.")
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ingest", help="Write a slide as an OME-Zarr (NGFF 0.4) pyramid.")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", type=Path, required=True, help="Output .zarr directory.")
    p.add_argument("--pixel-size", type=float, default=None, help="Micrometres per pixel.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    _add_common(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("register", help="Register SOURCE onto TARGET and warp it.")
    p.add_argument("target", type=Path)
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, required=True, help="Run directory to create.")
    p.add_argument("--target-landmarks", type=Path, default=None, help="ANHIR CSV (x, y).")
    p.add_argument("--source-landmarks", type=Path, default=None, help="ANHIR CSV (x, y).")
    _add_run_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("stack", help="Register serial sections to a reference section.")
    p.add_argument("slides", nargs="+", type=Path, help="Sections in order, or one folder.")
    p.add_argument("--out", type=Path, required=True, help="Run directory to create.")
    p.add_argument(
        "--reference",
        type=int,
        default=None,
        help="Index of the reference section, counted in the final order (after --sort), from "
        "0 (default: the middle one).",
    )
    p.add_argument("--sort", action="store_true", help="Order the given sections by file name.")
    p.add_argument(
        "--landmarks",
        type=Path,
        nargs="+",
        default=None,
        help="One ANHIR landmark CSV per section (same order) to score the stack.",
    )
    _add_run_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("serve", help="Serve a scheduled deployment that runs inbox manifests.")
    p.add_argument(
        "--inbox", type=Path, required=True, help="Folder watched for jobs (*.yaml, *.yml)."
    )
    p.add_argument("--cron", default="*/10 * * * *", help="Schedule (cron syntax).")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="Manifest paths are relative to this (default: the inbox).",
    )
    p.add_argument("--runs", type=Path, default=None, help="Run directories (default: INBOX/runs).")
    p.add_argument("--once", action="store_true", help="Process the inbox once and exit.")
    p.add_argument(
        "--settle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="Take a manifest only when it and its inputs have not changed for this long "
        "(files still being copied wait for the next run; default: 30).",
    )
    _add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("anhir", help="Register and score an ANHIR-layout dataset.")
    p.add_argument("--dataset", type=Path, required=True, help="Dataset root (paths are relative).")
    p.add_argument("--pairs", type=Path, required=True, help="Pair table (ANHIR columns).")
    p.add_argument("--out", type=Path, required=True, help="Submission / report folder.")
    p.add_argument(
        "--status",
        choices=["training", "evaluation"],
        default=None,
        help="Only the pairs with this status in the table (default: all).",
    )
    p.add_argument("--limit", type=int, default=None, help="At most this many pairs.")
    p.add_argument(
        "--scheduler",
        default=None,
        help="'local' (default), 'threads', 'sync' or a Dask scheduler address: pairs run in "
        "parallel on a cluster.",
    )
    p.add_argument("--strict", action="store_true", help="Exit non-zero when a pair fails.")
    _add_common(p)
    p.set_defaults(func=cmd_anhir)

    directions = ["source-to-target", "target-to-source"]
    p = sub.add_parser("warp-annotations", help="Warp QuPath-style GeoJSON with a transform.")
    p.add_argument("transform", type=Path, help="A run's transform/ directory.")
    p.add_argument("geojson", type=Path, help="GeoJSON (FeatureCollection, Feature or list).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--direction", choices=directions, default="source-to-target")
    p.add_argument(
        "--densify",
        type=float,
        default=0.0,
        help="Add vertices every PX level-0 pixels along edges before warping.",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    _add_common(p)
    p.set_defaults(func=cmd_warp_annotations)

    p = sub.add_parser("warp", help="Warp another image (or a label mask) with a transform.")
    p.add_argument("transform", type=Path, help="A run's transform/ directory.")
    p.add_argument(
        "image",
        type=Path,
        help="Image in the source frame (target frame with --direction target-to-source).",
    )
    p.add_argument("--out", type=Path, required=True, help="Output OME-Zarr.")
    p.add_argument("--direction", choices=directions, default="source-to-target")
    p.add_argument("--labels", action="store_true", help="Nearest-neighbour (label masks).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    _add_common(p)
    p.set_defaults(func=cmd_warp)

    p = sub.add_parser("export", help="Export an OME-Zarr pyramid as a pyramidal OME-TIFF.")
    p.add_argument("zarr", type=Path, help="OME-Zarr pyramid (e.g. a run's warped.zarr).")
    p.add_argument("--out", type=Path, required=True, help="Output .ome.tif")
    p.add_argument("--compression", choices=["jpeg", "deflate"], default="jpeg")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    _add_common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="Write a synthetic slide pair with ground truth.")
    p.add_argument("--size", default="10000x10000", help="HEIGHTxWIDTH in pixels.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output.")
    _add_common(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("config", help="Print the effective configuration as YAML.")
    _add_common(p)
    p.set_defaults(func=cmd_config)
    return parser


# commands that may run Prefect flows: on Ctrl-C the temporary Prefect server (same process
# group) dies too, and the client would spend about 70 s retrying it before failing
ORCHESTRATED = frozenset({"register", "stack", "anhir", "serve"})


@contextmanager
def _interrupts(command: str) -> Iterator[None]:
    """How SIGINT (Ctrl-C) and SIGTERM stop a command.

    Orchestrated commands stop at once: one line on stderr, child processes (the temporary
    Prefect server, Dask workers) terminated, exit status 128 + signal. Every stage writes
    its outputs under temporary names and renames them when complete, so a re-run resumes
    from the last finished stage. Other commands turn SIGTERM into the KeyboardInterrupt of
    Ctrl-C, so their clean-up (partial outputs removed) runs as it does for Ctrl-C. Against
    SIGKILL, which no handler sees, orchestrated commands start a watchdog process
    (:mod:`wsireg_flow.watchdog`) that terminates their child processes once they are gone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopping: list[int] = []

    def stop_now(signum: int, frame: object) -> None:
        # once: GNU timeout signals the command and then its whole process group, so the
        # command gets the signal twice (it printed the line twice); a second signal arriving
        # before the first handler ignores them runs this handler again, inside the first
        if stopping:
            return
        stopping.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        print(
            "wsireg-flow: interrupted (run the same command again to resume)",
            file=sys.stderr,
            flush=True,
        )
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        os._exit(128 + signum)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    watchdog = None
    if command in ORCHESTRATED:
        signal.signal(signal.SIGINT, stop_now)
        signal.signal(signal.SIGTERM, stop_now)
        watchdog = start_watchdog()  # for SIGKILL, which no handler sees
    else:
        signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        stop_watchdog(watchdog)
        for s, handler in previous.items():
            signal.signal(s, handler)


class WorkerRestartNotices(logging.Filter):
    """On Dask's ``distributed.nanny`` logger (at INFO): drops the "Restarting worker" notice
    that follows a worker process killed by SIGTERM, SIGINT or SIGHUP, and every INFO record
    (hidden as before).

    A signal to the whole process group (Ctrl-C, ``timeout``, ``kill -- -PGID``, a service
    stop) ends a local cluster's workers too; their nanny, in this process, could log the
    restart before the command's own handler stopped it: two lines of noise under the
    one-line "interrupted" message. The nanny logs each death at INFO first ("Worker process
    PID was killed by signal N"), so the notice can be matched to its cause. A worker that dies
    otherwise (a crash, SIGKILL) is still reported.
    """

    TERMINATING = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

    def __init__(self) -> None:
        super().__init__()
        self.pending = 0  # deaths by a terminating signal whose restart notice is due

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            if message.startswith("Worker process"):  # a death: by a stop signal or not
                prefix, _, number = message.rpartition(" was killed by signal ")
                stopped = bool(prefix) and number.isdigit() and int(number) in self.TERMINATING
                # any other death's restart is reported, whatever an earlier stop left due
                self.pending = self.pending + 1 if stopped else 0
            return False
        if message.startswith("Restarting worker") and self.pending:
            self.pending -= 1
            return False
        return True


def _naming_output(exc: WsiregError, args: argparse.Namespace) -> WsiregError:
    """An output error that names no file (a full disk fails a write, not an open) names the
    command's ``--out``."""
    out = getattr(args, "out", None)
    if isinstance(exc, OutputError) and exc.path is None and out is not None:
        return OutputError(str(exc), out)
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 1 failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    limit_malloc_arenas()  # before any thread allocates: freed memory can go back at each stage
    if not args.debug:
        # Prefect prints tracebacks of failed runs on its console handler: our one-line error
        # says it; the run's logs still reach a Prefect server's API handler.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        logging.getLogger("prefect").propagate = False  # not to the root handler below
    handler = logging.StreamHandler()  # sys.stderr
    handler.setFormatter(OneLineFormatter(debug=args.debug))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    if not args.debug:
        # a LocalCluster's scheduler, nannies and workers log every start and stop at INFO;
        # distributed reads its log level from Dask's config when first imported, here and in
        # the worker processes (which inherit the environment)
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        logging.getLogger("distributed").setLevel(logging.WARNING)  # if already imported
        # after an interrupt, multiprocessing's resource tracker (a child process) frees the
        # semaphores a local cluster held and warns about each on stderr: the freeing is the
        # cleanup, the warning only noise under the one-line message
        quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
        before = os.environ.get("PYTHONWARNINGS", "")
        if quiet not in before:
            os.environ["PYTHONWARNINGS"] = f"{before},{quiet}" if before else quiet
    nanny, notices = logging.getLogger("distributed.nanny"), WorkerRestartNotices()
    level = nanny.level
    if not args.debug:
        nanny.setLevel(logging.INFO)  # the deaths' causes reach the filter, which hides them
        nanny.addFilter(notices)
    try:
        if getattr(args, "config", None) is not None and getattr(args, "out", None) is not None:
            check_not_over_inputs(args.out, [args.config])  # the config is an input of all
        with _interrupts(args.command):
            return int(args.func(args) or 0)
    except WsiregError as exc:
        if args.debug:
            raise
        print(f"wsireg-flow: error: {_naming_output(exc, args)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`info SLIDE | head -1`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("wsireg-flow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        failed_write = output_error(exc)
        if failed_write is not None:  # disk full, read-only, no permission: say where
            print(f"wsireg-flow: error: {_naming_output(failed_write, args)}", file=sys.stderr)
            return 2
        first = (str(exc).strip().splitlines() or [""])[0]
        print(
            f"wsireg-flow: error: {type(exc).__name__}: {first} (run with --debug for details)",
            file=sys.stderr,
        )
        return 1
    finally:
        nanny.removeFilter(notices)
        nanny.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
