"""The app in a real browser: ``streamlit run app.py`` driven by Playwright through Debian's chromium.

Run → open a flagged pair → record a decision; the decision must land in the audit folder's SQLite database, and a
screenshot of the pair view is saved (to ``assets/pair_view.png``, shown in the README, when
``INSPECTOR_UPDATE_SCREENSHOT=1``). On a 1366×768 laptop: the review queue's keyboard shortcuts save a decision
and advance in ranking order, and a release at a setting that cannot flag anything is refused without a reason.

Skipped when ``/usr/bin/chromium`` is missing on a developer machine; on CI (``CI`` set) a missing
browser is a failure (``make test`` installs it).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, ROOT, press_slider, streamlit_app

pytestmark = pytest.mark.browser

#: The README's screenshot; refreshed only with INSPECTOR_UPDATE_SCREENSHOT=1 (a test run leaves the tree clean).
README_SCREENSHOT = ROOT / "assets" / "pair_view.png"
AUDIT_TIMEOUT_MS = 600_000  # a cold audit on a busy 2-core machine


@pytest.fixture
def server(tmp_path):
    db = tmp_path / "audits"  # each audit's reviews.sqlite3 lies in its audit folder below (see _db)
    with streamlit_app(
        tmp_path, {"INSPECTOR_AUDITS_DIR": str(db), "INSPECTOR_CACHE_DIR": str(tmp_path / "cache")}
    ) as url:
        yield url, db, tmp_path / "streamlit.log"


def _db(audits: Path) -> Path:
    """The one audit's reviews database (the app writes it into the audit's folder)."""
    found = sorted(audits.glob("audit_*/reviews.sqlite3"))
    assert len(found) == 1, found
    return found[0]


def _run_pixels_audit(page, url: str) -> None:
    page.goto(url)
    run = page.get_by_role("button", name="Run audit")
    run.wait_for(timeout=60_000)
    page.get_by_test_id("stSelectbox").filter(has_text="Feature extractor").click()
    page.get_by_role("option", name="pixels").click()
    run.click()
    page.get_by_text("Verdict.").wait_for(timeout=AUDIT_TIMEOUT_MS)


def _rotated_copy() -> str:
    """A planted copy that came back rotated (an informative pair for the screenshot), else any copy: the
    pseudonymous label the app shows for it (file names are shown only with 'Show real file and folder
    names'): the synthetic PNGs lie at the root, so their subject is the root's name, and each is a volume
    numbered in the order of the file names (inspector.naming)."""
    from inspector.privacy import load_or_create_key, pseudonym

    syn = ROOT / "sample_data" / "synthetic"
    with (syn / "labels.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "copy"]
    assert rows, "sample_data/synthetic/labels.csv lists no copy"
    rotated = [r for r in rows if r.get("augmentation", "").startswith("rotate_5")]
    name = (rotated or rows)[0]["path"]
    files = sorted(p.name for p in syn.glob("*.png"))
    key = load_or_create_key()  # the server runs with this process's INSPECTOR_PSEUDONYM_KEY_FILE (conftest)
    return f"{pseudonym('synthetic', key)}/vol-{files.index(name) + 1:03d}"


def test_run_open_a_pair_and_record_a_decision(server, tmp_path):
    shot = tmp_path / "pair_view.png"
    from playwright.sync_api import expect, sync_playwright

    url, db, log = server
    name = _rotated_copy()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            run = page.get_by_role("button", name="Run audit")
            run.wait_for(timeout=60_000)
            page.get_by_test_id("stSelectbox").filter(has_text="Feature extractor").click()
            page.get_by_role("option", name="pixels").click()
            run.click()
            verdict = page.get_by_text("Verdict.")
            verdict.wait_for(timeout=AUDIT_TIMEOUT_MS)
            assert "synthetic slices" in page.get_by_test_id("stAlert").first.inner_text()
            assert page.get_by_test_id("stException").count() == 0

            # the flagged list, narrowed to one planted copy, opens the pair
            page.get_by_test_id("stRadio").filter(has_text="Overview").get_by_text("Flagged", exact=True).click()
            page.get_by_text("All slices").click()
            search = page.get_by_label("Filter by synthetic file")
            search.fill(name)
            search.press("Enter")
            pick = page.get_by_role("combobox", name="Or choose a slice")
            expect(pick).to_have_value(re.compile(rf"^{re.escape(name)}#0 · similarity"), timeout=30_000)
            # a click on the table row's selection box opens the pair (the grid is a canvas: click by position;
            # Streamlit's rows and header are 35 px high, the selection column 32 px wide)
            grid = page.get_by_test_id("stDataFrame").bounding_box()
            page.mouse.click(grid["x"] + 16, grid["y"] + 35 + 17)
            page.get_by_text("Nearest training slices at every feature layer").wait_for(timeout=60_000)
            opened = page.get_by_role("combobox", name=re.compile("^Flagged pair")).input_value()
            assert opened.startswith(f"{name}#0 · similarity"), opened
            assert page.get_by_test_id("stExpander").filter(has_text="History").count() == 0
            # the client-side comparison viewer: three linked panes, drawn in the browser
            panes = page.frame_locator("iframe").first.locator("canvas")
            expect(panes).to_have_count(3, timeout=30_000)

            # record a decision; the UI confirms only after the database has it
            form = page.get_by_test_id("stForm")
            form.get_by_text("copy", exact=True).click()
            form.get_by_label("Comment").fill("rotated copy of the matched training slice")
            form.get_by_label("Reviewer name").fill("Browser Test")
            form.get_by_role("button", name="Save decision").click()
            page.get_by_text("Saved: copy by Browser Test").wait_for(timeout=60_000)
            assert page.get_by_test_id("stException").count() == 0

            page.set_viewport_size({"width": 1600, "height": 2650})  # the whole pair view in one picture
            page.evaluate("() => document.querySelectorAll('*').forEach(e => { e.scrollTop = 0; })")
            page.wait_for_timeout(2500)  # images and fonts settle
            page.screenshot(path=str(shot))
        finally:
            browser.close()

    assert shot.stat().st_size > 50_000
    if os.environ.get("INSPECTOR_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)
    con = sqlite3.connect(_db(db))
    try:
        rows = con.execute("SELECT decision, reviewer, comment, slice_key FROM reviews").fetchall()
    finally:
        con.close()
    assert rows == [("copy", "Browser Test", "rotated copy of the matched training slice", f"{name}#0")]
    assert "Traceback" not in log.read_text()


def _pair_facts(page) -> tuple[int, str, float]:
    """(position, slice key, similarity) of the pair the review queue shows."""
    head = page.get_by_text(re.compile(r"^Pair \d+ of \d+ \(most significant first\)$"))
    pos = int(re.match(r"Pair (\d+)", head.inner_text()).group(1))
    facts = page.get_by_text(re.compile(r"· similarity \d")).first.inner_text()
    m = re.match(r"^(\S+) · similarity ([0-9.]+)", facts)
    assert m, facts
    return pos, m.group(1), float(m.group(2))


def test_keyboard_save_and_next_in_ranking_order_and_an_unreachable_release_is_refused(server):
    from playwright.sync_api import expect, sync_playwright

    url, audits, log = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            _run_pixels_audit(page, url)
            page.get_by_test_id("stRadio").filter(has_text="Overview").get_by_text("Review", exact=True).click()
            page.get_by_text(re.compile(r"^Pair 1 of \d+")).wait_for(timeout=60_000)
            pos, first, sim1 = _pair_facts(page)
            assert pos == 1
            assert "ground truth:" not in page.get_by_test_id("stMain").inner_text()  # blind by default
            name = page.get_by_label("Reviewer name")
            name.fill("Key Reviewer")
            name.press("Enter")
            page.wait_for_timeout(800)
            page.evaluate("() => document.activeElement && document.activeElement.blur()")
            page.keyboard.press("1")  # copy: save and next
            page.get_by_text("Saved: copy by Key Reviewer for pair 1").wait_for(timeout=60_000)
            expect(page.get_by_text(re.compile(r"^Pair 2 of \d+"))).to_be_visible(timeout=30_000)
            pos2, second, sim2 = _pair_facts(page)
            assert pos2 == 2 and second != first and sim2 <= sim1  # the next in the ranking
            page.keyboard.press("K")  # previous
            expect(page.get_by_text(re.compile(r"^Pair 1 of \d+"))).to_be_visible(timeout=30_000)
            page.keyboard.press("J")  # next
            expect(page.get_by_text(re.compile(r"^Pair 2 of \d+"))).to_be_visible(timeout=30_000)
            con = sqlite3.connect(_db(audits))
            try:
                rows = con.execute("SELECT decision, reviewer, slice_key FROM reviews").fetchall()
            finally:
                con.close()
            assert rows == [("copy", "Key Reviewer", first)]

            # alpha one step down (0.5 %) lies below the smallest p-value 1/(1 + 109): nothing can be flagged
            thumb = page.get_by_test_id("stSlider").filter(has_text="Flag threshold").get_by_role("slider")
            thumb.focus()
            thumb.press("ArrowLeft")
            expect(thumb).to_have_attribute("aria-valuetext", "0.5 %", timeout=30_000)
            page.get_by_test_id("stRadio").filter(has_text="Overview").get_by_text("Export", exact=True).click()
            page.get_by_text("Release checklist").first.wait_for(timeout=60_000)
            main = page.get_by_test_id("stMain")
            assert "Nothing can be flagged at α = 0.005" in main.inner_text()
            form = page.get_by_test_id("stForm")
            assert form.get_by_role("combobox", name="Release decision").input_value() == ""  # nothing pre-selected
            form.get_by_text("Record a release sign-off in the report").click()
            form.get_by_label("Signed off by").fill("Ada Officer")
            form.get_by_test_id("stSelectbox").click()
            page.get_by_role("option", name="release", exact=True).click()
            form.get_by_role("button", name="Save the audit and build the report").click()
            page.get_by_text(re.compile("refused without a reason")).wait_for(timeout=120_000)
            assert "the setting can flag a copy" in main.inner_text()
            assert page.get_by_test_id("stException").count() == 0
        finally:
            browser.close()
    con = sqlite3.connect(_db(audits))
    try:
        assert con.execute("SELECT COUNT(*) FROM signoffs").fetchone() == (0,)
    finally:
        con.close()
    assert "Traceback" not in log.read_text()


def _page(page, name: str) -> None:
    page.get_by_test_id("stRadio").filter(has_text="Overview").get_by_text(name, exact=True).click()


def test_bh_and_alpha_change_every_page_and_the_exported_report_to_the_same_count(server):
    """One (alpha, BH) setting on screen: the Overview, the Flagged and the Review pages and the report built
    from the Export page give the same number of flagged slices, read from the audit's one Calibration."""
    from playwright.sync_api import expect, sync_playwright

    url, audits, log = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            _run_pixels_audit(page, url)
            main = page.get_by_test_id("stMain")
            counts = {}
            thumb = page.get_by_test_id("stSlider").filter(has_text="Flag threshold").get_by_role("slider")
            # (BH on, alpha as the slider shows it, slider steps from the previous setting)
            for fdr, alpha, steps in ((False, "1 %", 0), (True, "1 %", 0), (True, "10 %", 3)):
                if fdr and not counts.get("bh"):
                    page.locator(".st-key-view_fdr").get_by_text("Benjamini–Hochberg").click()  # the header's toggle
                    counts["bh"] = True
                if steps:
                    press_slider(thumb, alpha, max_presses=steps + 2)  # one press at a time (none may be lost)
                expect(thumb).to_have_attribute("aria-valuetext", alpha, timeout=30_000)
                rule = "BH at" if fdr else "α ="
                _page(page, "Overview")
                metric = page.get_by_test_id("stMetric").filter(has_text=f"Flagged at {rule} {alpha}")
                expect(metric).to_have_count(1, timeout=60_000)
                value = metric.get_by_test_id("stMetricValue").inner_text()
                k, m = (int(x) for x in value.split(" / "))
                counts[(fdr, alpha)] = k
                _page(page, "Flagged")
                long_rule = "Benjamini–Hochberg at" if fdr else "α ="
                head = page.get_by_text(re.compile(rf"^\d+ flagged synthetic slices at {long_rule} {alpha}"))
                head.wait_for(timeout=60_000)
                assert int(head.inner_text().split()[0]) == k, (head.inner_text(), k)
                if k:
                    _page(page, "Review")
                    page.get_by_text(re.compile(rf"^Pair 1 of {k}\b")).wait_for(timeout=60_000)
            shown = [v for key, v in counts.items() if key != "bh"]
            assert len(set(shown)) >= 2 and shown[-1] >= 1, counts  # the settings changed what is flagged

            # the report built from the Export page, at the same setting, says the same
            _page(page, "Export")
            page.get_by_text("Release checklist").first.wait_for(timeout=60_000)
            assert "Benjamini–Hochberg at 10 %" in main.inner_text()
            page.get_by_test_id("stForm").get_by_role("button", name="Save the audit and build the report").click()
            expect(page.get_by_role("button", name="Download report.html")).to_be_visible(timeout=180_000)
            reports = sorted(audits.glob("audit_*/report.html"))
            assert len(reports) == 1, reports
            html = reports[0].read_text(encoding="utf-8")
            assert f"{counts[(True, '10 %')]} of {m} " in html
            assert "with Benjamini–Hochberg false-discovery-rate control" in html and "α = 0.1 " in html
            assert page.get_by_test_id("stException").count() == 0
        finally:
            browser.close()
    assert "Traceback" not in log.read_text()
