"""Writing one benchmark's section into benchmarks/RESULTS.md from its own run (under "Speed and memory")."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_block(doc: str, head: str, block: str, ends: tuple[str, ...]) -> str | None:
    """``doc`` with the text from the line ``head`` up to the first of ``ends`` (or the end) replaced by ``block``.

    Returns None when ``doc`` has no ``head``. The block is followed by one blank line before what comes next.
    The one place where a benchmark's section replaces its older self in RESULTS.md.
    """
    pattern = re.compile(re.escape(head) + r".*?(?=" + "|".join(re.escape(e) for e in ends) + r"|\Z)", re.S)
    if not pattern.search(doc):
        return None
    return pattern.sub(lambda _m: block.rstrip("\n") + "\n", doc, count=1)


def _machine(machine: str | None) -> str:
    if machine is not None:
        return machine
    from benchmarks.detection import machine as _detected

    return _detected()


def put_section(title: str, body: str, command: str, seconds: float, machine: str | None = None) -> Path:
    """Put ``### title`` (machine, date, command, status, then ``body``) into RESULTS.md, replacing an older one.

    A new section goes first under ``## Speed and memory``, after its introduction. ``machine`` defaults to
    :func:`benchmarks.detection.machine`.
    """
    machine = _machine(machine)
    doc = RESULTS.read_text(encoding="utf-8")
    head = f"### {title}"
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (
        f"{head}\n\n- Machine: {machine}\n- Date: {date}\n- Command: `{command}`\n- Status: ok, {seconds:.0f} s "
        f"wall\n\n{body.strip()}\n"
    )
    replaced = replace_block(doc, head, section, ("\n### ", "\n## "))
    if replaced is not None:
        doc = replaced
    else:
        anchor = "## Speed and memory\n"
        if anchor not in doc:
            raise SystemExit("RESULTS.md has no 'Speed and memory' section; run python -m benchmarks.run_all first.")
        before, after = doc.split(anchor, 1)
        intro, rest = after.split("\n### ", 1) if "\n### " in after else (after, "")
        doc = before + anchor + intro.rstrip("\n") + "\n\n" + section + ("\n### " + rest if rest else "")
    RESULTS.write_text(doc, encoding="utf-8")
    return RESULTS


def stamp(
    command: str, seconds: float, machine: str | None = None, *, lead: str = "Run on", minutes: bool = False
) -> str:
    """The italic line under a generated heading: ``_{lead} DATE by `command` (duration; machine)._``.

    The duration in seconds, or in whole minutes with ``minutes``; ``machine`` defaults as in :func:`put_section`.
    """
    took = f"{seconds / 60:.0f} min" if minutes else f"{seconds:.0f} s"
    return f"_{lead} {_dt.datetime.now():%Y-%m-%d %H:%M} by `{command}` ({took}; {_machine(machine)})._"


def put_top_section(head: str, body: str, command: str, seconds: float, ends: tuple[str, ...],
                    machine: str | None = None) -> Path:  # fmt: skip
    """Replace the ``## `` section ``head`` of RESULTS.md (up to the first of ``ends``) with ``body``, stamped.

    ``body`` starts with ``head``; a line stating the date, the command, its wall time and the machine goes
    under the heading. The section must exist (``python -m benchmarks.run_all`` writes every one).
    """
    if not head.endswith("\n"):
        head += "\n"
    line = stamp(command, seconds, machine, lead="This section regenerated on", minutes=True)
    block = body.replace(head, head + "\n" + line + "\n\n", 1)
    doc = replace_block(RESULTS.read_text(encoding="utf-8"), head, block, ends)
    if doc is None:
        raise SystemExit(f"RESULTS.md has no section {head.strip()!r}; run python -m benchmarks.run_all first.")
    RESULTS.write_text(doc, encoding="utf-8")
    return RESULTS
