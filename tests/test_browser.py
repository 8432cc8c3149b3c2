"""The app in a real browser: ``streamlit run app.py`` driven by Playwright through Debian's chromium.

Run → open a flagged pair → record a decision; the decision must land in the SQLite database, and a
screenshot of the pair view is saved (to ``assets/pair_view.png``, shown in the README, when
``INSPECTOR_UPDATE_SCREENSHOT=1``).

Skipped when ``/usr/bin/chromium`` is missing on a developer machine; on CI (``CI`` set) a missing
browser is a failure (``make test`` installs it).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: The README's screenshot; refreshed only with INSPECTOR_UPDATE_SCREENSHOT=1 (a test run leaves the tree clean).
README_SCREENSHOT = ROOT / "assets" / "pair_view.png"
AUDIT_TIMEOUT_MS = 600_000  # a cold audit on a busy 2-core machine


def _need_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    msg = f"{CHROMIUM} is missing; install Debian's chromium (make browser-deps)."
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path):
    _need_chromium()
    port = _free_port()
    db = tmp_path / "audits" / "reviews.sqlite3"
    env = os.environ.copy()
    env.update(
        INSPECTOR_REVIEWS_DB=str(db),
        INSPECTOR_CACHE_DIR=str(tmp_path / "cache"),
        STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
    )
    log = (tmp_path / "streamlit.log").open("wb")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, db, tmp_path / "streamlit.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


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
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT decision, reviewer, comment, slice_key FROM reviews").fetchall()
    finally:
        con.close()
    assert rows == [("copy", "Browser Test", "rotated copy of the matched training slice", f"{name}#0")]
    assert "Traceback" not in log.read_text()
