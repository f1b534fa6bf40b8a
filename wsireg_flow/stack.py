"""Serial-section stacks: register neighbours, compose toward a reference, warp every section.

Sections are ordered (by name, or as given). Each section is registered onto its neighbour one
step closer to the reference (default: the middle section), and the backward maps are chained
reference -> ... -> section, so every section is warped into the reference frame with one
resampling (no accumulated interpolation blur).

Run directory layout (``DIR``)::

    stack.json                          sections, reference, settings
    pairs/<k>-onto-<j>/                 pair run directories (stages up to evaluate)
    sections/<k>-<name>.zarr            each section warped into the reference frame
    sections/<k>-<name>.json            its transform chain (pair directories, in order)
    sections/<k>-<name>-landmarks.csv   its landmarks in the reference frame (when given)
    metrics.json                        per-section landmark errors before/after (when given)
    qc/stack.png                        previews of all warped sections + overlays
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsireg_flow.config import Config
from wsireg_flow.errors import InputError, WsiregError
from wsireg_flow.geometry import corner_origin
from wsireg_flow.io.slide import open_slide, probe_shape
from wsireg_flow.landmarks import image_diagonal, paired, read_landmarks, write_landmarks
from wsireg_flow.pipeline import PairJob, job_is_complete, validate_landmarks
from wsireg_flow.progress import ProgressFn
from wsireg_flow.qc import html_report, overlay, preview, registration_quality, save_figure
from wsireg_flow.stages import (
    MARKER_DIR,
    check_not_over_inputs,
    check_replaceable,
    check_unlocked,
    check_writable_dir,
    empty_run_dir,
    file_fingerprint,
    fingerprint,
    first_names,
    holds_results,
    is_complete,
    other_results,
    read_json_object,
    remove_partials,
    resolved_path,
    run_stage,
    write_json,
)
from wsireg_flow.transform import Transform, TransformChain
from wsireg_flow.warp import warp_slide

PAIR_STAGES_FOR_STACK = (
    "ingest_target",
    "ingest_source",
    "preprocess",
    "coarse",
    "nonrigid",
    "stitch",
    "evaluate",
)
# everything a stack run directory holds at its top level: what `--overwrite` may replace
STACK_ENTRIES = frozenset({"stack.json", MARKER_DIR, "pairs", "sections", "metrics.json", "qc"})
IMAGE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".jpg", ".jpeg", ".png", ".zarr")


def sections_folder(inputs: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The folder whose images are the sections, when ``inputs`` is one folder (not an
    OME-Zarr pyramid); None for a list of slides."""
    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir() and not (paths[0] / ".zattrs").exists():
        return paths[0]
    return None


def collect_sections(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand a folder into its images (sorted by name); keep an explicit list in its order."""
    paths = [Path(p) for p in inputs]
    if sections_folder(inputs) is not None:
        found = sorted(
            p
            for p in paths[0].iterdir()
            if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
        )
        if not found:
            raise InputError("folder holds no images", paths[0])
        paths = found
    for p in paths:
        if not p.exists():
            raise InputError("file not found", p)
    if len(paths) < 2:
        raise WsiregError("a stack needs at least two sections")
    return paths


@dataclass
class StackJob:
    sections: list[Path]
    run_dir: Path
    cfg: Config
    reference: int | None = None
    landmarks: list[Path] | None = None
    # the folder the sections were collected from (:func:`sections_folder`): an input too,
    # so the run may not be written into it (a later stack of the folder would take the run
    # for a section)
    folder: Path | None = None

    @property
    def ref(self) -> int:
        """Index of the reference section (the middle one unless given)."""
        return len(self.sections) // 2 if self.reference is None else self.reference

    def validate(self) -> None:
        """Check the reference index, that every section opens, and the landmark files
        before any work (raises)."""
        n = len(self.sections)
        if not 0 <= self.ref < n:
            raise WsiregError(f"reference {self.ref} is not a section index (0..{n - 1})")
        if self.landmarks is not None and len(self.landmarks) != n:
            raise WsiregError(f"{len(self.landmarks)} landmark files for {n} sections")
        shapes = [probe_shape(s) for s in self.sections]  # a bad image fails here, before work
        for lm, shape in zip(self.landmarks or [], shapes, strict=False):
            validate_landmarks(read_landmarks(lm), shape, lm)

    def name(self, k: int) -> str:
        """Folder-safe name of section ``k``: its index and file stem."""
        return f"{k:02d}-{self.sections[k].name.split('.')[0]}"

    def neighbour(self, k: int) -> int:
        """The section one step closer to the reference."""
        return k + 1 if k < self.ref else k - 1

    def pair_job(self, k: int) -> PairJob:
        """Section ``k`` (source) registered onto its neighbour toward the reference (target)."""
        j = self.neighbour(k)
        lm = self.landmarks
        return PairJob(
            self.sections[j],
            self.sections[k],
            self.run_dir / "pairs" / f"{k:02d}-onto-{j:02d}",
            self.cfg,
            target_landmarks=lm[j] if lm else None,
            source_landmarks=lm[k] if lm else None,
        )

    def pair_jobs(self) -> list[PairJob]:
        """Every neighbour pair of the stack (one per section but the reference), in order."""
        return [self.pair_job(k) for k in range(len(self.sections)) if k != self.ref]

    def inputs(self) -> list[Path]:
        """The stack's inputs: its sections, its landmark files (if any), and the folder the
        sections came from (if any)."""
        return [*self.sections, *(self.landmarks or []), *([self.folder] if self.folder else [])]

    def chain_pairs(self, k: int) -> list[int]:
        """Sections whose pair transforms map the reference frame into section ``k``, in order."""
        out, i = [], k
        while i != self.ref:
            out.append(i)
            i = self.neighbour(i)
        return list(reversed(out))

    def chain(self, k: int) -> TransformChain:
        """The backward maps from the reference frame to section ``k``, neighbour by neighbour."""
        ref_shape = open_slide(self.pair_or_ingest(self.ref)).shapes[0][:2]
        transforms = [
            Transform.load(self.pair_job(i).run_dir / "transform") for i in self.chain_pairs(k)
        ]
        return TransformChain(transforms, (int(ref_shape[0]), int(ref_shape[1])))

    def pair_or_ingest(self, k: int) -> Path:
        """An ingested OME-Zarr of section ``k`` (from one of the pair runs that used it)."""
        if k != self.ref:
            return self.pair_job(k).run_dir / "ingest" / "source.zarr"
        for i in range(len(self.sections)):
            if i != k and self.neighbour(i) == k:
                return self.pair_job(i).run_dir / "ingest" / "target.zarr"
        raise WsiregError("reference has no neighbour")

    def section_fingerprint(self, k: int) -> str:
        """Fingerprint of everything section ``k``'s warp and landmarks depend on: its chain,
        its file and landmark file (path, size, modification time: a rewritten reference or
        landmark file counts as changed), and the settings."""
        fps = [self.pair_job(i).fingerprints()["stitch"] for i in self.chain_pairs(k)]
        return fingerprint(
            "stack-section",
            k,
            file_fingerprint(self.sections[k]),
            fps,
            self.cfg.io.model_dump(mode="json"),
            None if not self.landmarks else file_fingerprint(self.landmarks[k]),
        )


def _resolved(paths: Sequence[str | os.PathLike[str]] | None) -> list[str | None] | None:
    return None if paths is None else [resolved_path(p) for p in paths]


def _describe(job: StackJob) -> dict[str, Any]:
    """What ``stack.json`` records: paths resolved, so the same stack typed with relative
    paths, or from another directory, is the same stack."""
    return {
        "sections": _resolved(job.sections),
        "reference": job.ref,
        "landmarks": _resolved(job.landmarks),
    }


def holds_this_stack(job: StackJob) -> bool:
    """Whether the run directory's ``stack.json`` records this stack: its sections and
    reference (paths compared resolved). Other landmark files re-run the stages that read them
    (their fingerprints record the files)."""
    old = read_json_object(job.run_dir / "stack.json")
    if old is None:
        return False
    # records written before paths were resolved hold them as typed
    old = {k: _resolved(v) if k == "sections" else v for k, v in old.items()}
    new = _describe(job)
    return all(old.get(k) == new[k] for k in ("sections", "reference"))


def _another_stack(job: StackJob) -> WsiregError:
    """The refusal of a run directory holding other results, naming the stack it holds."""
    old = read_json_object(job.run_dir / "stack.json")
    sections = old.get("sections") if old is not None else None
    whose = ""
    if isinstance(sections, list) and all(isinstance(p, str) for p in sections):
        whose = f" (a stack of {first_names([Path(p).name for p in sections])})"
    return other_results(job.run_dir, whose)


def check_stack_dir(job: StackJob, overwrite: bool = False) -> None:
    """Refuse, before any work, a run directory that is or holds a section or landmark file,
    cannot be written, that another run is writing now, or (with ``overwrite``) that is not a
    wsireg-flow output."""
    check_not_over_inputs(job.run_dir, job.inputs())
    check_writable_dir(job.run_dir)
    check_unlocked(job.run_dir)
    if overwrite:
        check_replaceable(job.run_dir, "stack run", STACK_ENTRIES)
    elif holds_results(job.run_dir) and not holds_this_stack(job):
        raise _another_stack(job)


def prepare_stack_dir(job: StackJob, overwrite: bool = False) -> None:
    """Create the stack run directory and ``stack.json``; refuse one holding another stack
    unless ``overwrite`` (which empties it first). Call with
    :func:`~wsireg_flow.stages.run_dir_lock` held: resuming deletes the temporary outputs an
    interrupted run left."""
    d = job.run_dir
    check_not_over_inputs(d, job.inputs())
    desc = _describe(job)
    f = d / "stack.json"
    if holds_results(d):
        same = holds_this_stack(job)
        if not same and not overwrite:
            raise _another_stack(job)
        if overwrite:
            check_replaceable(d, "stack run", STACK_ENTRIES)
            empty_run_dir(d)
        else:
            remove_partials(d)
    d.mkdir(parents=True, exist_ok=True)
    write_json(f, {**desc, "config": job.cfg.model_dump(mode="json")})


def warp_section(job: StackJob, k: int, progress: ProgressFn | None = None) -> bool:
    """Warp section ``k`` into the reference frame (and its landmarks); True when it ran."""
    name = job.name(k)

    def work() -> list[str]:
        chain = job.chain(k)
        src = open_slide(job.pair_or_ingest(k))
        ref = open_slide(job.pair_or_ingest(job.ref))
        out = job.run_dir / "sections" / f"{name}.zarr"
        warp_slide(
            chain,
            src,
            out,
            ref.pixel_size_um,
            chunk=job.cfg.io.chunk,
            max_side=job.cfg.io.pyramid_max_side,
            codec=job.cfg.io.codec,
            overwrite=True,
            progress=progress,
            frame="reference section",
        )
        pairs = [str(job.pair_job(i).run_dir.relative_to(job.run_dir)) for i in job.chain_pairs(k)]
        write_json(
            job.run_dir / "sections" / f"{name}.json",
            {"section": str(job.sections[k]), "chain": pairs, "reference": job.ref},
        )
        outputs = [f"sections/{name}.zarr", f"sections/{name}.json"]
        warped_landmarks = job.run_dir / "sections" / f"{name}-landmarks.csv"
        warped_landmarks.unlink(missing_ok=True)  # of an earlier run with landmarks
        if job.landmarks:
            pts = corner_origin(chain.source_to_target)(read_landmarks(job.landmarks[k]))
            write_landmarks(warped_landmarks, pts)
            outputs.append(f"sections/{name}-landmarks.csv")
        return outputs

    return run_stage(job.run_dir, f"section-{name}", job.section_fingerprint(k), work)


def _pair_quality(run_dir: Path) -> dict[str, Any]:
    """What a pair run's metrics.json says of its registration (coarse fit, finest tiles)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"pair": run_dir.name, **registration_quality(metrics)}


def stack_metrics(job: StackJob) -> dict[str, Any]:
    """One entry per section: its warped image, the pairs composed to reach the reference and
    their registration quality; with landmarks also the median/mean rTRE to the reference's
    landmarks before and after."""
    out: dict[str, Any] = {"reference": job.ref, "sections": []}
    for k in range(len(job.sections)):
        out["sections"].append(
            {
                "section": job.name(k),
                "is_reference": k == job.ref,
                "warped": f"sections/{job.name(k)}.zarr",
                "chain": [_pair_quality(job.pair_job(i).run_dir) for i in job.chain_pairs(k)],
            }
        )
    if not job.landmarks:
        return out
    ref_pts = read_landmarks(job.landmarks[job.ref])
    shape = open_slide(job.pair_or_ingest(job.ref)).shapes[0][:2]
    diag = image_diagonal(int(shape[0]), int(shape[1]))
    for k, entry in enumerate(out["sections"]):
        before_t, before_s = paired(ref_pts, read_landmarks(job.landmarks[k]))
        after = read_landmarks(job.run_dir / "sections" / f"{job.name(k)}-landmarks.csv")
        after_t, after_s = paired(ref_pts, after)
        b = np.linalg.norm(before_s - before_t, axis=1) / diag
        a = np.linalg.norm(after_s - after_t, axis=1) / diag
        entry.update(
            {
                "initial_median_rtre": float(np.nanmedian(b)),
                "median_rtre": float(np.nanmedian(a)),
                "initial_mean_rtre": float(np.nanmean(b)),
                "mean_rtre": float(np.nanmean(a)),
            }
        )
    return out


def report_fingerprint(job: StackJob) -> str:
    """Fingerprint of the stack report: every section's warp fingerprint."""
    return fingerprint(
        "stack-report", [job.section_fingerprint(k) for k in range(len(job.sections))]
    )


def stack_report(job: StackJob) -> tuple[bool, dict[str, Any]]:
    """Write ``metrics.json`` and the QC figures and page (a resumable stage named "report");
    returns (whether it ran, the metrics)."""

    def work() -> list[str]:
        metrics = stack_metrics(job)
        write_json(job.run_dir / "metrics.json", metrics)
        page = stack_qc(job, metrics)
        return ["metrics.json", str(page.relative_to(job.run_dir))]

    ran = run_stage(job.run_dir, "report", report_fingerprint(job), work)
    return ran, json.loads((job.run_dir / "metrics.json").read_text())


def pairs_left(job: StackJob) -> list[PairJob]:
    """The neighbour pairs with a stage still to run (not complete with current inputs)."""
    return [pj for pj in job.pair_jobs() if not job_is_complete(pj, PAIR_STAGES_FOR_STACK)]


def stack_is_complete(job: StackJob) -> bool:
    """True when the run directory holds this stack with every pair stage, section warp and
    the report complete and current: a re-run has nothing to do (no orchestration needed)."""
    if not holds_this_stack(job):
        return False
    try:
        return (
            not pairs_left(job)
            and all(
                is_complete(job.run_dir, f"section-{job.name(k)}", job.section_fingerprint(k))
                for k in range(len(job.sections))
            )
            and is_complete(job.run_dir, "report", report_fingerprint(job))
        )
    except (OSError, ValueError):
        return False


def stack_qc(job: StackJob, metrics: dict[str, Any] | None = None, size: int = 512) -> Path:
    """Stack figure (all sections + overlays on the reference) and an HTML page with one row
    (section) per warped section: its landmark errors and its overlay on the reference.
    Returns the page.
    """
    imgs = []
    for k in range(len(job.sections)):
        with open_slide(job.run_dir / "sections" / f"{job.name(k)}.zarr") as s:
            imgs.append(preview(s, size)[0])
    ref = imgs[job.ref]
    qc = job.run_dir / "qc"
    panels = [
        (f"{job.name(k)}{' (reference)' if k == job.ref else ''}", im) for k, im in enumerate(imgs)
    ]
    stack_png = save_figure(
        qc / "stack.png", panels, "Sections warped into the reference frame", ncols=4
    )
    by_name = {r["section"]: r for r in (metrics or {}).get("sections", [])}
    rows = [
        ("Stack", [("sections", len(job.sections)), ("reference", job.name(job.ref))], [stack_png])
    ]
    for k, im in enumerate(imgs):
        name = job.name(k)
        fig = save_figure(
            qc / f"{name}-on-reference.png",
            [(f"{name} (green) on reference (red)", overlay(ref, im))],
        )
        m = by_name.get(name, {})
        table: list[tuple[str, object]] = [
            ("section", str(job.sections[k])),
            ("reference", k == job.ref),
        ]
        chain = m.get("chain", [])
        if chain:
            table += [
                ("pairs composed", ", ".join(c["pair"] for c in chain)),
                ("lowest mean tile confidence", min(c["mean_confidence"] or 0.0 for c in chain)),
            ]
        table += [(key, m[key]) for key in ("initial_median_rtre", "median_rtre") if key in m]
        rows.append((name, table, [fig]))
    return html_report(qc / "report.html", "wsireg-flow stack", rows)
