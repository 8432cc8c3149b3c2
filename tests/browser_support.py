"""What the browser tests share: Debian's chromium, and ``streamlit run app.py`` on a free 127.0.0.1 port.

Imported by ``tests/test_browser*.py`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

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


def need_chromium() -> None:
    """Skip without ``/usr/bin/chromium`` on a developer machine; fail on CI (``make test`` installs it)."""
    if Path(CHROMIUM).exists():
        return
    msg = f"{CHROMIUM} is missing; install Debian's chromium (make browser-deps)."
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def streamlit_app(tmp_path: Path, env_updates: Mapping[str, str]) -> Iterator[str]:
    """Run the app (``INSPECTOR_REVIEWS_DB`` unset, usage stats off, ``env_updates`` set) until the block ends;
    yields its URL once it answers its health check. Its output goes to ``tmp_path / "streamlit.log"``."""
    need_chromium()
    port = free_port()
    env = os.environ.copy()
    env.pop("INSPECTOR_REVIEWS_DB", None)
    env.update(STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", **env_updates)
    log_path = tmp_path / "streamlit.log"
    log = log_path.open("wb")
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
                pytest.fail(f"streamlit did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def press_slider(thumb, target: str, *, key: str = "ArrowRight", max_presses: int = 12, wait_ms: int = 15_000) -> None:
    """Move a Streamlit slider's ``thumb`` (a Playwright locator) by key presses until its ``aria-valuetext`` is
    ``target``, one press at a time.

    Two presses sent back to back can lose the second one: the first change reruns the script and the slider is
    rendered again while the second key is on its way. So each press waits for the value to change (pressing
    again, focused anew, when it did not) before the next one. Fails with the value reached when ``target`` is
    not reached within ``max_presses`` presses.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    value = thumb.get_attribute("aria-valuetext")
    for _ in range(max_presses):
        if value == target:
            return
        thumb.focus()
        thumb.press(key)
        deadline = time.monotonic() + wait_ms / 1000
        while time.monotonic() < deadline:
            try:
                new = thumb.get_attribute("aria-valuetext", timeout=wait_ms)
            except PlaywrightTimeout:
                new = value
            if new != value:
                break
            time.sleep(0.2)
        value = new
    assert value == target, f"slider at {value!r} after {max_presses} presses of {key}; expected {target!r}"
