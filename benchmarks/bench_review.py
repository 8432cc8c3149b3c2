"""Server time of the review workspace's interactions: an α change, a Benjamini–Hochberg toggle, opening a pair.

Usage::

    python -m benchmarks.bench_review [--extractor pixels] [--repeats 7] [--out FILE.md]

Issue 13's targets: an α or BH change at most 200 ms of server time, opening a pair at most 500 ms. Measured
through the app itself, headless: ``streamlit.testing.v1.AppTest`` executes ``app.py`` in this process as the
server does (minus the browser and the websocket), so the wall time of one ``run()`` is the server time of
one interaction. The audit of ``sample_data/`` is run once first (not measured here; see bench_app.py).

- **α change**: the header's α slider moved to another value, on each page that shows flags (Overview,
  Flagged, Review, Research), median of ``--repeats``;
- **BH toggle**: the Benjamini–Hochberg toggle flipped, on the same pages, median of ``--repeats``;
- **open a pair**: from the Flagged page, *Open pair* on a slice never opened before (the pair evidence is
  computed: ``result.pair`` registers and renders), median over ``--repeats`` distinct slices; and the same
  pair opened again (cached evidence).

Times are wall-clock milliseconds on this machine; the machine may be shared, so its load average at the
start is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPHA_TARGET_MS = 200.0
PAIR_TARGET_MS = 500.0
PAGES = ("Overview", "Flagged", "Review", "Research")


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def run(extractor: str, repeats: int) -> list[tuple[str, float, float | None, str]]:
    """Measure; returns rows ``(what, median ms, target ms or None, note)``."""
    from streamlit.testing.v1 import AppTest

    from inspector import ui

    def check(at: AppTest) -> None:
        if at.exception:
            raise RuntimeError(f"the app raised: {at.exception[0].value}")

    ui.audit_store().clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=3600)
    at.run()
    at.selectbox(key="in_extractor").select(extractor)
    at.button(key="run").click().run()
    check(at)
    entry = ui.audit_store()[at.session_state["active"]]
    r = entry.result
    rows: list[tuple[str, float, float | None, str]] = []
    alphas = list(ui.ALPHAS)
    for page in PAGES:
        at.radio(key="page").set_value(page).run()
        check(at)
        times = []
        for i in range(repeats):
            a = alphas[(alphas.index(at.session_state["view_alpha"]) + 1 + i) % len(alphas)]
            times.append(_ms(lambda a=a: at.select_slider(key="view_alpha").set_value(a).run()))
        check(at)
        rows.append((f"α change, {page}", statistics.median(times), ALPHA_TARGET_MS, f"median of {repeats}"))
        at.select_slider(key="view_alpha").set_value(r.config.alpha).run()
        times = []
        for _ in range(repeats):
            cur = bool(at.session_state["view_fdr"])
            times.append(_ms(lambda cur=cur: at.toggle(key="view_fdr").set_value(not cur).run()))
        check(at)
        rows.append((f"BH toggle, {page}", statistics.median(times), ALPHA_TARGET_MS, f"median of {repeats}"))
        at.toggle(key="view_fdr").set_value(r.config.fdr).run()

    at.select_slider(key="view_alpha").set_value(max(ui.ALPHAS)).run()  # the most flagged pairs to open
    order = ui.review_order(r.table, r.flags(max(ui.ALPHAS), False))
    if not order:
        raise RuntimeError("no flagged pair to open")
    cold, warm = [], []
    for row in order[:repeats]:
        at.radio(key="page").set_value("Flagged").run()
        at.selectbox(key="flag_pick").set_value(row).run()
        entry.pairs.pop(row, None)  # never opened before: the evidence is computed
        cold.append(_ms(lambda: at.button(key="open_pair").click().run()))
        check(at)
        at.radio(key="page").set_value("Flagged").run()
        at.selectbox(key="flag_pick").set_value(row).run()
        warm.append(_ms(lambda: at.button(key="open_pair").click().run()))
        check(at)
    n = len(cold)
    rows.append(("open a pair, first time (evidence computed)", statistics.median(cold), PAIR_TARGET_MS,
                 f"median of {n} distinct slices, max {max(cold):.0f} ms"))  # fmt: skip
    rows.append(("open a pair again (evidence cached)", statistics.median(warm), PAIR_TARGET_MS, f"median of {n}"))
    ref = [_ms(lambda: at.run()) for _ in range(repeats)]
    rows.append(("reference: rerun of the pair page, nothing changed", statistics.median(ref), None,
                 f"median of {repeats}"))  # fmt: skip
    return rows


def table(rows: list[tuple[str, float, float | None, str]], header: str) -> str:
    out = [header, "", "| interaction | server time (ms) | target (ms) | met | note |", "|---|---:|---:|:---:|---|"]
    for what, ms, target, note in rows:
        met = "" if target is None else ("yes" if ms <= target else "**no**")
        out.append(f"| {what} | {ms:.0f} | {'' if target is None else f'{target:.0f}'} | {met} | {note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extractor", default="pixels", help="ssl, pixels or mri-core (default: pixels)")
    ap.add_argument("--repeats", type=int, default=7, help="repeats per measurement (median)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1; got {args.repeats}")
    os.chdir(ROOT)
    from benchmarks.bench_app import machine

    with tempfile.TemporaryDirectory(prefix="bench_review_") as tmp:
        os.environ["INSPECTOR_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ["INSPECTOR_AUDITS_DIR"] = str(Path(tmp) / "audits")
        os.environ.pop("INSPECTOR_REVIEWS_DB", None)
        header = (
            f"Review workspace server time on sample_data/, extractor {args.extractor} (AppTest, headless; "
            f"targets from issue 13). Machine: {machine()}."
        )
        rows = run(args.extractor, args.repeats)
    text = table(rows, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
