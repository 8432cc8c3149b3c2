"""The client-side pair viewer (inspector.viewer): a self-contained document, and linked zoom, pan and
window/level in a real browser (Debian's chromium), with no network request."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from inspector.viewer import anatomy_box, pair_viewer_html

CHROMIUM = "/usr/bin/chromium"


def _pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    s = np.zeros((64, 80), np.float32)
    s[10:50, 20:70] = rng.uniform(0.2, 1.0, (40, 50))
    return s, np.clip(s + rng.normal(0, 0.02, s.shape), 0, 1).astype(np.float32)


def test_the_document_is_self_contained_and_escapes_labels():
    s, a = _pair()
    doc = pair_viewer_html(s, a, labels=("syn </script><b>x", "aligned", "diff"))
    assert doc.count("data:image/png;base64,") == 2
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", doc) and "http://" not in doc and "https://" not in doc
    assert "</script><b>x" not in doc  # a label cannot close the script
    assert "imageSmoothingEnabled = false" in doc
    one = pair_viewer_html(s, None)
    assert one.count("data:image/png;base64,") == 1 and '"panes": ["syn"]' in one


def test_anatomy_box_and_errors():
    s, _ = _pair()
    assert anatomy_box(s, margin=0) == (20, 10, 70, 50)
    assert anatomy_box(np.zeros((5, 7))) == (0, 0, 7, 5)
    with pytest.raises(ValueError, match="2D"):
        pair_viewer_html(np.zeros((2, 3, 4)), None)
    with pytest.raises(ValueError, match="must match"):
        pair_viewer_html(np.zeros((4, 4)), np.zeros((4, 5)))


@pytest.mark.browser
def test_zoom_pan_and_window_level_move_every_pane_together(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing")
    from playwright.sync_api import sync_playwright

    s, a = _pair()
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.on("request", lambda r: requests.append(r.url))
            page.set_content(pair_viewer_html(s, a, pane_height=400))
            page.wait_for_function("() => window.inspectorViewer && window.inspectorViewer.draws.length === 3")

            def draws() -> list[dict]:
                return page.evaluate("() => window.inspectorViewer.draws")

            start = draws()
            box = page.locator("canvas").nth(1).bounding_box()
            assert box["height"] >= 390 and box["y"] + box["height"] <= 768  # large, above the fold
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.wheel(0, -400)  # zoom in on the middle pane
            page.wait_for_timeout(200)
            zoomed = draws()
            assert zoomed[0]["zoom"] > start[0]["zoom"] * 1.5
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 60, box["y"] + box["height"] / 2 + 30, steps=4)
            page.mouse.up()  # pan
            panned = draws()
            assert panned[0]["cx"] < zoomed[0]["cx"] and panned[0]["cy"] < zoomed[0]["cy"]
            page.keyboard.down("Shift")
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 150, box["y"] + box["height"] / 2 + 90, steps=4)
            page.mouse.up()
            page.keyboard.up("Shift")  # window/level
            wl = draws()
            assert wl[0]["high"] - wl[0]["low"] > 1.2 and (wl[0]["high"] + wl[0]["low"]) / 2 > 0.6
            for state in (zoomed, panned, wl):  # every pane drawn with the same view
                assert len({(d["zoom"], d["cx"], d["cy"], d["low"], d["high"]) for d in state}) == 1
            page.dblclick("canvas >> nth=0")
            assert draws()[0]["zoom"] == pytest.approx(start[0]["zoom"])
        finally:
            browser.close()
    assert all(u.startswith(("data:", "about:")) for u in requests), requests  # nothing from the network
