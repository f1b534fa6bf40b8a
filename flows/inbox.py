"""Inbox flow: run every job manifest dropped into a folder once, then file it.

``INBOX/*.yaml`` or ``*.yml`` (suffix in any case) -> (once it and its inputs have not changed
for ``settle`` seconds) claimed into ``INBOX/processing/`` -> run (pair or stack flow, as a subflow)
-> moved to ``INBOX/done/`` (with ``<name>.result.json``) or ``INBOX/failed/`` (with
``<name>.reason.txt``, one line). Run directories go to ``RUNS/<manifest name>/``. Manifest
paths are relative to the data root and cannot leave it.

One runner at a time works on an inbox: it holds an exclusive lock on ``INBOX/.inbox.lock``
while it runs (another runner finds the inbox busy and returns). The kernel releases the lock
when its holder dies, however it dies, so a manifest found in ``processing/`` by the next runner
was stranded by an interrupted run: it is queued again, and its run directory resumes.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TextIO

from prefect import flow, get_run_logger
from prefect.client.schemas.schedules import CronSchedule
from prefect.settings import get_current_settings
from pydantic import ValidationError

from flows.pair import register_pair
from flows.stack import register_stack
from wsireg_flow.config import load_config
from wsireg_flow.errors import ConfigError, OneLineFormatter, captured_warnings
from wsireg_flow.manifest import load_manifest, manifest_config, resolve, unsettled
from wsireg_flow.pipeline import PairJob, check_inputs, holds_this_job
from wsireg_flow.qc import run_warnings
from wsireg_flow.stack import StackJob, collect_sections, holds_this_stack, sections_folder
from wsireg_flow.stages import exclusive_lock, holds_results

SUBDIRS = ("processing", "done", "failed")
LOCK_NAME = ".inbox.lock"
MANIFEST_SUFFIXES = (".yaml", ".yml")  # compared in lower case: JOB.YAML is a manifest too
REASON_FILES = (".reason.txt", ".traceback.txt")  # failed/NAME<suffix>, beside the manifest
SETTLE_SECONDS = 30.0  # default: a manifest and its inputs unchanged this long are complete

Logger = logging.Logger | logging.LoggerAdapter[Any]


def inbox_lock(box: Path) -> AbstractContextManager[bool]:
    """The inbox's exclusive lock (:func:`~wsireg_flow.stages.exclusive_lock` on
    ``box/.inbox.lock``); yields True when this runner holds it, False when another one does
    (then the block must leave the inbox alone)."""
    return exclusive_lock(box / LOCK_NAME)


@contextmanager
def warnings_to(stream: TextIO) -> Iterator[None]:
    """Write the inbox flow's own warnings and errors to ``stream`` (one line each, prefixed
    ``wsireg-flow: warning:``) while the block runs: a busy inbox, a requeued or replaced job,
    a failed job's reason. Other flow-run messages (Prefect's own, the subflows') stay in the
    flow log."""
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda record: record.pathname == __file__)
    handler.setFormatter(OneLineFormatter(names=False))  # its own records only
    target = logging.getLogger("prefect.flow_runs")
    target.addHandler(handler)
    try:
        yield
    finally:
        target.removeHandler(handler)


def manifests_in(folder: Path, stem: str | None = None) -> list[Path]:
    """The manifests in ``folder`` (those named ``stem`` + suffix only, when given), sorted:
    visible files whose suffix is ``.yaml`` or ``.yml`` in any case."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in MANIFEST_SUFFIXES
        and not p.name.startswith(".")
        and (stem is None or p.stem == stem)
        and p.is_file()
    )


def requeue_stranded(box: Path, logger: Logger) -> list[str]:
    """Move the manifests an interrupted run left in ``processing/`` back into the inbox.

    Call only while holding :func:`inbox_lock`: then no live runner is working on them. A
    manifest dropped again under the same name since then wins over the stranded copy.

    Parameters
    ----------
    box
        The inbox folder.
    logger
        Where to say which manifests were queued again.

    Returns
    -------
    list of str
        The names of the manifests queued again.
    """
    queued = []
    for stranded in manifests_in(box / "processing"):
        again = box / stranded.name
        if again.exists():
            stranded.unlink()
            logger.warning(
                "job %s: a run was interrupted; the manifest dropped since replaces it",
                stranded.name,
            )
            continue
        os.replace(stranded, again)
        logger.warning(
            "job %s: a run was interrupted; queued again (finished stages are kept)",
            stranded.name,
        )
        queued.append(stranded.name)
    return queued


def claim(manifest: Path) -> Path | None:
    """Atomically move a manifest into processing/ (None when another runner took it)."""
    target = manifest.parent / "processing" / manifest.name
    try:
        os.replace(manifest, target)
    except FileNotFoundError:
        return None
    return target


def holds_other_job(job: PairJob | StackJob) -> bool:
    """True when the job's run directory exists and holds the results of another job.

    Another job is one with other inputs (or of the other kind); the same inputs with other
    settings are the same job, whose changed stages re-run.
    """
    if not holds_results(job.run_dir):
        return False
    return not (holds_this_stack(job) if isinstance(job, StackJob) else holds_this_job(job))


def run_manifest(
    path: Path,
    data_root: Path,
    runs: Path,
    config_file: Path | None,
    logger: Logger | None = None,
) -> dict[str, Any]:
    """Run one claimed manifest; returns a JSON-friendly result.

    Dropping a manifest is an instruction to run it: when its run directory
    (``runs/<manifest stem>``) holds another job, from an earlier manifest of the same name,
    that run is replaced (with a warning). The same job resumes, or returns at once when done.
    """
    log = logger or logging.getLogger(__name__)
    m = load_manifest(path)
    cfg = manifest_config(m, load_config(config_file), path)
    out = runs / path.stem
    job: PairJob | StackJob
    if m.kind == "pair":
        job = PairJob(
            resolve(data_root, m.target),  # type: ignore[arg-type]
            resolve(data_root, m.source),  # type: ignore[arg-type]
            out,
            cfg,
            target_landmarks=resolve(data_root, m.target_landmarks),
            source_landmarks=resolve(data_root, m.source_landmarks),
        )
    else:
        named = m.sections if m.sections else [m.folder]
        given = [resolve(data_root, s) for s in named]
        sections = collect_sections(given)  # type: ignore[arg-type]
        landmarks = [resolve(data_root, p) for p in m.landmarks] if m.landmarks else None
        folder = sections_folder(given)  # type: ignore[arg-type]
        job = StackJob(sections, out, cfg, m.reference, landmarks, folder)  # type: ignore[arg-type]
    if isinstance(job, PairJob):  # a job that cannot run leaves the earlier run alone
        check_inputs(job)
    else:
        job.validate()
    replace = holds_other_job(job)
    if replace:
        log.warning(
            "job %s: %s holds the results of another job (an earlier %s manifest); replacing them",
            path.name,
            out,
            path.stem,
        )
    # the library's own warnings (a landmark file shorter than the other...) belong to the job:
    # listed in its result and logged with its name below, not printed on their own
    with captured_warnings("wsireg_flow") as noted:
        try:
            record = _run_job(job, out, replace)
        except Exception:  # a failed job's warnings may tell why: logged before its failure
            for warning in noted:
                log.warning("job %s: %s", path.name, warning)
            raise
    record["warnings"] = [*noted, *run_warnings(out)]  # a result to look at (done/ all the same)
    for warning in record["warnings"]:
        log.warning("job %s: %s", path.name, warning)
    return record


def _run_job(job: PairJob | StackJob, out: Path, replace: bool) -> dict[str, Any]:
    """Run a pair or stack job; returns the JSON-friendly part of its result."""
    if isinstance(job, PairJob):
        ran = register_pair(job, overwrite=replace)
        metrics = json.loads((out / "metrics.json").read_text())
        record: dict[str, Any] = {
            "kind": "pair",
            "out": str(out),
            "stages_run": [k for k, v in ran.items() if v],
            "landmarks": metrics.get("landmarks"),
            "replaced": replace,
        }
    else:
        result = register_stack(job, overwrite=replace)
        record = {
            "kind": "stack",
            "out": str(out),
            "metrics": result["metrics"],
            "replaced": replace,
        }
    return record


def run_and_file(
    manifest: Path, box: Path, root: Path, runs: Path, config_file: Path | None, logger: Logger
) -> str | None:
    """Claim one manifest, run it and file it in ``done/`` or ``failed/``.

    Parameters
    ----------
    manifest
        A manifest in the inbox.
    box, root, runs, config_file
        The inbox, the data root, the parent of the run directories and the base config.
    logger
        The flow's logger.

    Returns
    -------
    str or None
        "done" or "failed"; None when another runner claimed the manifest first.
    """
    claimed = claim(manifest)
    if claimed is None:
        return None
    logger.info("job %s: started", manifest.name)
    try:
        result = run_manifest(claimed, root, runs, config_file, logger)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = reason.replace(str(claimed), manifest.name)
        os.replace(claimed, box / "failed" / claimed.name)
        (box / "failed" / f"{claimed.stem}.reason.txt").write_text(
            f"{type(exc).__name__}: {reason}\n"
        )
        (box / "failed" / f"{claimed.stem}.traceback.txt").write_text(traceback.format_exc())
        logger.error("job %s: failed: %s", manifest.name, reason)
        return "failed"
    (box / "done" / f"{claimed.stem}.result.json").write_text(
        json.dumps(result, indent=2, default=str)
    )
    done = box / "done" / claimed.name
    os.replace(claimed, done)
    # earlier attempts under this name are stale now: a failure, and a success under another
    # suffix (NAME.yml after NAME.yaml; NAME.result.json was just rewritten)
    for ext in REASON_FILES:
        (box / "failed" / f"{claimed.stem}{ext}").unlink(missing_ok=True)
    for stale in manifests_in(box / "failed", claimed.stem) + manifests_in(
        box / "done", claimed.stem
    ):
        if stale != done:
            stale.unlink()
    logger.info("job %s: done", manifest.name)
    return "done"


@flow(name="inbox", validate_parameters=False, persist_result=False)
def process_inbox(
    inbox: str,
    data_root: str | None = None,
    runs: str | None = None,
    config_file: str | None = None,
    settle: float = SETTLE_SECONDS,
) -> dict[str, list[str]]:
    """Run each manifest in ``inbox`` once; returns {"done": [...], "failed": [...],
    "waiting": [...]} (manifest names).

    A manifest is taken when it and every input it names have not been modified for ``settle``
    seconds (see :func:`wsireg_flow.manifest.unsettled`); the others wait in the inbox for the
    next run. Holds the inbox's lock (:func:`inbox_lock`) while it works, and first queues again
    the manifests an interrupted run left in ``processing/``. When another runner holds the lock
    the inbox is busy: nothing is done and the lists are empty.
    """
    logger = get_run_logger()
    box = Path(inbox)
    root = Path(data_root) if data_root else box
    runs_dir = Path(runs) if runs else box / "runs"
    config = Path(config_file) if config_file else None
    for sub in SUBDIRS:
        (box / sub).mkdir(parents=True, exist_ok=True)
    summary: dict[str, list[str]] = {"done": [], "failed": [], "waiting": []}
    with inbox_lock(box) as held:
        if not held:
            logger.warning("inbox %s is busy: another runner holds %s", box, box / LOCK_NAME)
            return summary
        requeue_stranded(box, logger)
        for manifest in manifests_in(box):
            young = unsettled(manifest, root, settle)
            if young:
                logger.info(
                    "job %s: waiting until %s has not changed for %g s",
                    manifest.name,
                    young[0],
                    settle,
                )
                summary["waiting"].append(manifest.name)
                continue
            outcome = run_and_file(manifest, box, root, runs_dir, config, logger)
            if outcome is not None:
                summary[outcome].append(manifest.name)
    return summary


def require_server() -> None:
    """Refuse to serve without PREFECT_API_URL: Prefect cannot schedule runs on the temporary
    server it starts without one, so ``serve`` would wait forever, running nothing.

    Raises
    ------
    ConfigError
        When PREFECT_API_URL is not set.
    """
    if not get_current_settings().api.url:
        raise ConfigError(
            "not set: serving on a schedule needs a Prefect server (prefect server start "
            "--host 127.0.0.1, then PREFECT_API_URL=http://127.0.0.1:4200/api), or run "
            "`wsireg-flow serve --once` from cron",
            "PREFECT_API_URL",
        )


def check_cron(cron: str) -> None:
    """Refuse a schedule Prefect would refuse (its own check: ``CronSchedule``), before serving.

    Parameters
    ----------
    cron
        A cron expression (five fields, e.g. ``*/10 * * * *``).

    Raises
    ------
    ConfigError
        Naming ``--cron`` and the problem, in one line.
    """
    try:
        CronSchedule(cron=cron)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"{msg[:1].lower()}{msg[1:]} (cron syntax has five fields: minute hour "
            'day-of-month month day-of-week, e.g. "*/10 * * * *")',
            "--cron",
        ) from None


def serve(
    inbox: str,
    cron: str,
    data_root: str | None = None,
    runs: str | None = None,
    config_file: str | None = None,
    settle: float = SETTLE_SECONDS,
) -> None:
    """Serve the inbox flow as a deployment on a cron schedule (blocks until interrupted).

    Needs the Prefect server named by PREFECT_API_URL (see :func:`require_server`) and a valid
    ``cron`` (see :func:`check_cron`).
    """
    check_cron(cron)
    require_server()
    process_inbox.serve(
        name="wsireg-inbox",
        cron=cron,
        parameters={
            "inbox": inbox,
            "data_root": data_root,
            "runs": runs,
            "config_file": config_file,
            "settle": settle,
        },
    )
