"""The QC pages (``DIR/qc/report.html``) of a pair run and of a stack run, opened in a browser.

A page must be one self-contained file (figures embedded as ``data:`` URIs) that a browser
renders completely: headless Chromium loads it, the page's script writes
``images loaded: N/M`` into ``#load-status`` on ``load``, and the dumped DOM is parsed here.

:func:`register_lung_pair` is shared with other test modules (no conftest): it registers
lung-lesion_3 CD31 (target) <- HE (source) with landmarks through ``wsireg-flow register`` into
one directory per pytest session; later calls resume the finished run at no cost.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "data" / "anhir-sample" / "lung-lesion_3" / "scale-5pc"
TARGET = CASE / "29-041-Izd2-w35-CD31-3-les3.jpg"
SOURCE = CASE / "29-041-Izd2-w35-He-les3.jpg"
TARGET_LM = TARGET.with_suffix(".csv")
SOURCE_LM = SOURCE.with_suffix(".csv")
CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def register_lung_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of CD31 <- HE (lung-lesion_3), registered once per session via the CLI.

    The caller must have the ``prefect_env`` fixture active (the first call runs the flow).
    """
    from wsireg_flow.cli import main

    out = tmp_path_factory.getbasetemp() / "shared-lung-cd31-he" / "run"
    argv = [
        "register",
        str(TARGET),
        str(SOURCE),
        "--out",
        str(out),
        "--target-landmarks",
        str(TARGET_LM),
        "--source-landmarks",
        str(SOURCE_LM),
        "--quiet",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    assert code == 0, f"wsireg-flow register failed ({code})"
    return out


# -- parsing pages ------------------------------------------------------------------------------
class _Page(HTMLParser):
    """Collects <img> sources, every URL-bearing attribute, sections and #load-status."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.alts: list[str] = []
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.sections: list[str] = []
        self.status = ""
        self.table_text: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for name in ("src", "href", "srcset", "data", "poster", "action"):
            if a.get(name) is not None:
                self.urls.append((tag, name, a[name] or ""))
        if tag == "img":
            self.images.append(a.get("src") or "")
            self.alts.append(a.get("alt") or "")
        if tag == "p" and a.get("id") == "load-status":
            self._in = "status"
        elif tag == "h2":
            self._in = "h2"
        elif tag in ("th", "td"):
            self._in = "cell"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("p", "h2", "th", "td"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "status":
            self.status += data
        elif self._in == "h2":
            self.sections.append(data.strip())
        elif self._in == "cell":
            self.table_text.append(data.strip())


def parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


def assert_self_contained(page: _Page) -> None:
    """Every URL in the page is a data: URI (or an in-page anchor): nothing to fetch."""
    external = [u for u in page.urls if not (u[2].startswith("data:") or u[2].startswith("#"))]
    assert external == [], external
    assert page.images and all(s.startswith("data:image/png;base64,") for s in page.images)


# -- Chromium -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get when missing (needs root)."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0:
            pytest.fail(f"{CHROMIUM} is missing and installing it needs root (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                pytest.fail(f"'{' '.join(cmd)}' failed ({proc.returncode}): {' | '.join(tail)}")
        if not CHROMIUM.exists():
            pytest.fail(f"apt-get install chromium succeeded but {CHROMIUM} does not exist")
    return CHROMIUM


def dump_dom(chromium: Path, page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after load, as headless Chromium serialises it."""
    proc = subprocess.run(
        [
            str(chromium),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def test_load_status_detects_a_broken_image(chromium: Path, tmp_path: Path) -> None:
    """Control: the check is able to fail (one of three images does not decode)."""
    from wsireg_flow.qc import html_report

    good = tmp_path / "good.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(good), np.full((20, 30, 3), 128, np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(PNG_MAGIC + b"garbage" * 10)
    page = html_report(
        tmp_path / "report.html", "control", [("s", [("k", 1.0)], [good, bad, good])]
    )
    dom = parse(dump_dom(chromium, page, tmp_path))
    assert len(dom.images) == 3
    assert dom.status.strip() == "images loaded: 2/3"


# -- the pair run's page ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_run(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return register_lung_pair(tmp_path_factory)


def test_pair_report_is_self_contained_with_metrics(pair_run: Path) -> None:
    report = pair_run / "qc" / "report.html"
    text = report.read_text(encoding="utf-8")
    page = parse(text)
    assert_self_contained(page)
    # the metrics table shows metrics.json's landmark scores
    lm = json.loads((pair_run / "metrics.json").read_text())["landmarks"]
    cells = page.table_text
    for key in ("initial_median_rtre", "median_rtre", "max_rtre", "robustness"):
        assert key in cells, key
        assert cells[cells.index(key) + 1] == f"{lm[key]:.5g}", key
    # each embedded figure is a PNG of the run's qc folder
    import base64

    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in page.images}
    names = ("overlay", "checkerboard", "tile-confidence", "tissue", "deformation-grid", "jacobian")
    for name in names:
        png = pair_run / "qc" / f"{name}.png"
        assert png.read_bytes() in embedded, name
    assert all(b[:8] == PNG_MAGIC for b in embedded)


def test_pair_report_has_at_least_six_figures(pair_run: Path) -> None:
    """The page should show six or more figures: overlay, landmarks, checkerboard, tile
    confidence, tissue masks, deformation grid, Jacobian."""
    page = parse((pair_run / "qc" / "report.html").read_text(encoding="utf-8"))
    assert len(page.images) >= 6, page.alts


def test_pair_report_loads_every_image_in_chromium(
    pair_run: Path, chromium: Path, tmp_path: Path
) -> None:
    report = pair_run / "qc" / "report.html"
    n = len(parse(report.read_text(encoding="utf-8")).images)
    dom = parse(dump_dom(chromium, report, tmp_path))
    print(f"\n[qc] pair report: {dom.status.strip()!r}, {report.stat().st_size / 1e3:.0f} kB")
    assert len(dom.images) == n
    assert n >= 5
    assert dom.status.strip() == f"images loaded: {n}/{n}"


# -- the stack page -----------------------------------------------------------------------------
# given out of name order on purpose (--sort orders them); landmarks follow the given order
STACK_GIVEN = [
    CASE / "29-041-Izd2-w35-He-les3.jpg",
    CASE / "29-041-Izd2-w35-proSPC-4-les3.jpg",
    CASE / "29-041-Izd2-w35-CD31-3-les3.jpg",
    CASE / "29-041-Izd2-w35-Cc10-5-les3.jpg",
]
STACK_SORTED = sorted(STACK_GIVEN, key=lambda p: p.name)


@pytest.fixture(scope="module")
def stack_run(prefect_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from wsireg_flow.cli import main

    out = tmp_path_factory.mktemp("qc-stack") / "stack"
    argv = [
        "stack",
        *map(str, STACK_GIVEN),
        "--sort",
        "--landmarks",
        *(str(p.with_suffix(".csv")) for p in STACK_GIVEN),
        "--out",
        str(out),
        "--quiet",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    assert code == 0
    return {"out": out, "summary": json.loads(stdout.getvalue()), "argv": argv}


def test_stack_report_has_a_section_per_stack_section(stack_run: dict[str, Any]) -> None:
    report = stack_run["out"] / "qc" / "report.html"
    page = parse(report.read_text(encoding="utf-8"))
    assert_self_contained(page)
    names = [f"{k:02d}-{p.name.split('.')[0]}" for k, p in enumerate(STACK_SORTED)]
    assert [s for s in page.sections if s != "Stack"] == names
    assert len(page.images) == 1 + len(names)  # stack overview + one overlay per section


def test_stack_report_loads_every_image_in_chromium(
    stack_run: dict[str, Any], chromium: Path, tmp_path: Path
) -> None:
    report = stack_run["out"] / "qc" / "report.html"
    n = len(parse(report.read_text(encoding="utf-8")).images)
    dom = parse(dump_dom(chromium, report, tmp_path))
    print(f"\n[qc] stack report: {dom.status.strip()!r}")
    assert n == 5
    assert dom.status.strip() == f"images loaded: {n}/{n}"
    # the page shows each section's landmark errors
    assert sum(1 for c in dom.table_text if c == "median_rtre") == 4


def test_stack_sort_keeps_landmarks_with_their_sections(stack_run: dict[str, Any]) -> None:
    """--sort reorders the sections; each section must keep its own landmark file."""
    stack = json.loads((stack_run["out"] / "stack.json").read_text())
    assert [Path(s).name for s in stack["sections"]] == [p.name for p in STACK_SORTED]
    pairs = [
        (Path(s).stem, Path(lm).stem)
        for s, lm in zip(stack["sections"], stack["landmarks"], strict=True)
    ]
    assert all(s == lm for s, lm in pairs), pairs
    metrics = json.loads((stack_run["out"] / "metrics.json").read_text())
    for sec in metrics["sections"]:
        if not sec["is_reference"]:
            assert sec["median_rtre"] < sec["initial_median_rtre"], sec


def test_jacobian_is_reduced_for_display_keeping_a_single_fold() -> None:
    """A 2500 x 2301 Jacobian is drawn at <= 1024 px: block means are exact (partial edge
    blocks included) and one folded grid pixel still marks its block."""
    from wsireg_flow.qc import block_reduce_for_display

    jac = np.ones((2500, 2301), np.float32)
    jac[:, :1000] = 1.5
    jac[1234, 2000] = -0.2
    mean, low, k = block_reduce_for_display(jac, 1024)
    assert k == 3 and mean.shape == low.shape == (834, 767)
    assert mean[0, 0] == pytest.approx(1.5) and mean[-1, -1] == pytest.approx(1.0)
    assert mean[0, 333] == pytest.approx((1.5 + 2 * 1.0) / 3)  # block over columns 999-1001
    assert np.argwhere(low <= 0).tolist() == [[1234 // 3, 2000 // 3]]
    same, _, one = block_reduce_for_display(jac[:100, :100], 1024)
    assert one == 1 and np.array_equal(same, jac[:100, :100])


def test_confidence_maps_share_a_fixed_scale_with_a_colour_bar(tmp_path: Path) -> None:
    """Each panel was scaled to its own range: a level whose one tile had confidence 0.43
    rendered black, like no tile at all."""
    import cv2

    from wsireg_flow.qc import save_figure

    flat = np.full((40, 40), 0.43)
    shared = save_figure(tmp_path / "shared.png", [("c", flat)], value_range=(0.0, 1.0))
    own = save_figure(tmp_path / "own.png", [("c", flat)])
    gray = {k: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for k, p in (("s", shared), ("o", own))}
    centre = {k: int(g[g.shape[0] // 2, g.shape[1] // 3]) for k, g in gray.items()}
    assert centre["o"] < 10  # magma's low end: black
    assert centre["s"] > 40  # 0.43 on a 0..1 scale: magma's purple


def test_run_warnings_reads_a_register_run_or_every_pair_of_a_stack(tmp_path: Path) -> None:
    from wsireg_flow.qc import run_warnings

    def metrics(ok: int, low: int = 1, score: float = 1.5) -> dict[str, Any]:
        statuses = {"ok": ok, "no gain": 3} if ok else {"no gain": 3, "no tissue": 2}
        if low:
            statuses["low confidence"] = low
        rigid = {"method": "x", "notes": [], "score_final": score}
        return {"rigid": rigid, "levels": [{"statuses": statuses}]}

    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "metrics.json").write_text(json.dumps(metrics(0)))
    assert run_warnings(pair) == [
        "no tile on tissue registered at any level (1 low confidence, 3 no gain, 2 no tissue): "
        "the result is the coarse alignment alone; look at qc/overlay.png"
    ]
    # every tile on tissue without gain after an exact coarse fit (identical images warned)
    (pair / "metrics.json").write_text(json.dumps(metrics(0, low=0, score=2.5)))
    assert run_warnings(pair) == []
    # ...but after a poorer fit, gaining nothing is no success
    (pair / "metrics.json").write_text(json.dumps(metrics(0, low=0, score=1.7)))
    (warning,) = run_warnings(pair)
    assert warning.startswith("no tile on tissue registered at any level (3 no gain, 2 no ")
    stack = tmp_path / "stack"
    for name, ok in (("00-onto-01", 2), ("02-onto-01", 0)):
        (stack / "pairs" / name).mkdir(parents=True)
        (stack / "pairs" / name / "metrics.json").write_text(json.dumps(metrics(ok)))
    (stack / "stack.json").write_text("{}")
    (warning,) = run_warnings(stack)
    assert warning.startswith("pair 02-onto-01: no tile on tissue registered")
