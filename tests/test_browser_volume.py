"""The Volumes page in a real browser: ``streamlit run app.py`` driven by Playwright through Debian's chromium.

A small 3D NIfTI cohort (:func:`benchmarks.volumes3d_data.make_volume_cohort`: 4 training subjects, 4 holdout, 3
copies made in 3D and 2 novel volumes) is typed into the sidebar and audited with the pixels extractor and the
Unit setting at *volume*; the Volumes page lists the volumes, the jump from a training subject opens a flagged
volume, and one move of the axial slider changes the synthetic pane and the aligned training pane together (their
images and the slice number in their captions). A screenshot of the page is saved (to
``assets/volume_review.png``, shown in the README, when ``INSPECTOR_UPDATE_SCREENSHOT=1``).

Skipped when ``/usr/bin/chromium`` is missing on a developer machine; on CI (``CI`` set) a missing browser is a
failure (``make test`` installs it).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, ROOT, press_slider, streamlit_app

pytestmark = pytest.mark.browser

#: The README's screenshot of the Volumes page; refreshed only with INSPECTOR_UPDATE_SCREENSHOT=1.
README_SCREENSHOT = ROOT / "assets" / "volume_review.png"
AUDIT_TIMEOUT_MS = 600_000  # a cold audit on a busy 2-core machine


@pytest.fixture
def cohort(tmp_path):
    from benchmarks.volumes3d_data import make_volume_cohort

    return make_volume_cohort(
        tmp_path / "cohort", 4, n_holdout=4, n_novel=2, copies_per_condition=1,
        conditions=["exact", "rot5", "slab_half"],
    )  # fmt: skip


@pytest.fixture
def server(tmp_path):
    env = {
        "INSPECTOR_AUDITS_DIR": str(tmp_path / "audits"),
        "INSPECTOR_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",  # one thread per process on a shared 2-core machine (the audit runs in the server)
    }
    with streamlit_app(tmp_path, env) as url:
        yield url, tmp_path / "streamlit.log"


def _choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the select box ``label`` (again if a rerun closed the list before the click)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    box = page.get_by_role("combobox", name=label)
    for attempt in range(3):
        box.click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=10_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    expect(box).to_have_value(option, timeout=30_000)


def _panes(page, plane: str) -> tuple[list[str], list[str]]:
    """(image sources, captions) of one plane's row: synthetic, training (aligned), difference."""
    row = page.locator(f".st-key-vol_{plane}_row")
    imgs = row.get_by_test_id("stImage").locator("img")
    caps = row.get_by_test_id("stImageCaption")
    return [imgs.nth(i).get_attribute("src") for i in range(imgs.count())], caps.all_inner_texts()


def test_volume_review_moves_both_panes_together(cohort, server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot = tmp_path / "volume_review.png"
    url, log = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            run = page.get_by_role("button", name="Run audit")
            run.wait_for(timeout=60_000)
            for label, folder in (("Training cohort", cohort.train_dir), ("Synthetic set", cohort.synthetic_dir),
                                  ("Holdout of unseen", cohort.holdout_dir)):  # fmt: skip
                box = page.get_by_label(re.compile(f"^{label}"))
                box.fill(str(folder))
                box.press("Enter")
            _choose(page, "Feature extractor", "pixels")
            _choose(page, "Unit", "volume")
            # one training volume registered in 3D per synthetic volume keeps the audit short on 2 cores
            page.get_by_test_id("stExpander").filter(has_text="Advanced").click()
            shortlist = page.get_by_role("spinbutton", name="Volume shortlist")
            shortlist.fill("1")
            shortlist.press("Enter")
            page.wait_for_timeout(500)
            run.click()
            page.get_by_text("Verdict.").wait_for(timeout=AUDIT_TIMEOUT_MS)
            assert page.get_by_test_id("stException").count() == 0
            # alpha 5 %: this cohort's null of 8 volumes (a t with 2.6 degrees of freedom) puts its copies near
            # p = 0.02; a study's dozens of null volumes reach 1 % (benchmarks/RESULTS.md, 3D sections)
            thumb = page.get_by_test_id("stSlider").filter(has_text="Flag threshold").get_by_role("slider")
            press_slider(thumb, "5 %")  # from 1 %: two steps, one press at a time
            expect(thumb).to_have_attribute("aria-valuetext", "5 %", timeout=30_000)

            page.get_by_test_id("stRadio").filter(has_text="Overview").get_by_text("Volumes", exact=True).click()
            head = page.get_by_text(re.compile(r"^\d+ of 5 synthetic volumes flagged at"))
            head.wait_for(timeout=60_000)
            assert int(head.inner_text().split()[0]) >= 1

            # jump from a training subject to a synthetic volume that copies it: that volume opens
            page.get_by_role("combobox", name=re.compile("^Jump from a training subject")).click()
            page.get_by_role("option").first.click()
            jump = page.get_by_role("combobox", name=re.compile("^Synthetic volumes that copy sub-"))
            expect(jump).to_be_enabled(timeout=30_000)
            jump.click()
            option = page.get_by_role("option").first
            chosen = option.inner_text().strip()
            option.click()
            opened = page.get_by_role("combobox", name=re.compile(r"^Open volume \(\d+ of 5\)"))
            expect(opened).to_have_value(re.compile(rf"^{re.escape(chosen)} · flagged · "), timeout=30_000)
            axial = page.locator(".st-key-vol_axial_row")
            expect(axial.get_by_test_id("stImage")).to_have_count(3, timeout=60_000)
            for plane in ("axial", "coronal", "sagittal"):
                caps = page.locator(f".st-key-vol_{plane}_row").get_by_test_id("stImageCaption")
                expect(caps).to_have_count(3, timeout=30_000)
                texts = caps.all_inner_texts()
                assert [t.split(" · ")[0] for t in texts] == ["Synthetic", "Training (aligned)", "Difference ×4"], texts
            evidence = page.locator(".st-key-vol_slice_evidence")
            assert "similarity" in evidence.inner_text() and "nearest training slice" in evidence.inner_text()
            assert "Volume similarity" in page.get_by_test_id("stMain").inner_text()

            # one slider moves both panes: the synthetic and the aligned training image change, and both captions
            srcs0, caps0 = _panes(page, "axial")
            thumb = axial.get_by_role("slider")
            before = int(thumb.get_attribute("aria-valuetext"))
            ev0 = evidence.inner_text()
            press_slider(thumb, str(before + 3))
            expect(thumb).to_have_attribute("aria-valuetext", str(before + 3), timeout=30_000)
            expect(axial.get_by_test_id("stImageCaption").first).to_contain_text(f"axial {before + 3}/", timeout=30_000)
            page.wait_for_timeout(500)
            srcs1, caps1 = _panes(page, "axial")
            assert len(srcs0) == len(srcs1) == 3
            assert srcs1[0] != srcs0[0], "the synthetic pane did not change"
            assert srcs1[1] != srcs0[1], "the aligned training pane did not change"
            for k in (0, 1):
                assert f"axial {before}/" in caps0[k] and f"axial {before + 3}/" in caps1[k], (caps0, caps1)
            assert evidence.inner_text() != ev0  # the slice-level evidence follows the axial slice
            assert f"Axial slice {before + 3}/" in evidence.inner_text()
            assert page.get_by_test_id("stException").count() == 0

            # for the picture: the least similar flagged volume (a copy that needed the 3D transform most)
            opened.click()
            options = page.get_by_role("option")
            texts = options.all_inner_texts()
            last = max(i for i, t in enumerate(texts) if " · flagged · " in t)
            options.nth(last).click()
            expect(opened).to_have_value(texts[last].strip(), timeout=30_000)
            expect(axial.get_by_test_id("stImageCaption")).to_have_count(3, timeout=30_000)
            page.set_viewport_size({"width": 1600, "height": 2300})  # the whole page in one picture
            page.evaluate("() => document.querySelectorAll('*').forEach(e => { e.scrollTop = 0; })")
            page.wait_for_timeout(2500)  # images and fonts settle
            assert page.get_by_test_id("stException").count() == 0
            page.get_by_test_id("stMain").screenshot(path=str(shot))  # the page, not the sidebar's typed paths
        finally:
            browser.close()

    assert shot.stat().st_size > 50_000
    if os.environ.get("INSPECTOR_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)
    assert "Traceback" not in log.read_text()
