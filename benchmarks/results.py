"""Writing one benchmark's section into benchmarks/RESULTS.md from its own run (under "Speed and memory")."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def put_section(title: str, body: str, command: str, seconds: float, machine: str | None = None) -> Path:
    """Put ``### title`` (machine, date, command, status, then ``body``) into RESULTS.md, replacing an older one.

    A new section goes first under ``## Speed and memory``, after its introduction. ``machine`` defaults to
    :func:`benchmarks.detection.machine`.
    """
    if machine is None:
        from benchmarks.detection import machine as _machine

        machine = _machine()
    doc = RESULTS.read_text(encoding="utf-8")
    head = f"### {title}"
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (
        f"{head}\n\n- Machine: {machine}\n- Date: {date}\n- Command: `{command}`\n- Status: ok, {seconds:.0f} s "
        f"wall\n\n{body.strip()}\n"
    )
    pattern = re.compile(re.escape(head) + r".*?(?=\n### |\n## |\Z)", re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _m: section.rstrip("\n") + "\n", doc)  # a blank line before the next heading
    else:
        anchor = "## Speed and memory\n"
        if anchor not in doc:
            raise SystemExit("RESULTS.md has no 'Speed and memory' section; run python -m benchmarks.run_all first.")
        before, after = doc.split(anchor, 1)
        intro, rest = after.split("\n### ", 1) if "\n### " in after else (after, "")
        doc = before + anchor + intro.rstrip("\n") + "\n\n" + section + ("\n### " + rest if rest else "")
    RESULTS.write_text(doc, encoding="utf-8")
    return RESULTS
