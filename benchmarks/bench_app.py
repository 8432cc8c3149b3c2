"""How fast the app answers: Run → verdict (cold, warm), a threshold change, opening a pair.

Usage::

    python -m benchmarks.bench_app [--extractor pixels] [--mode default] [--repeats 5] [--out FILE.md]

Everything is measured through the app itself, headless (``streamlit.testing.v1.AppTest`` runs
``app.py`` in this process exactly as the server would, minus the browser), on ``sample_data/``:

- **cold**: empty embedding cache (a fresh ``INSPECTOR_CACHE_DIR``) and an empty app result cache: load,
  (train,) extract, search, align, score, then draw the overview.
- **warm, new session**: the app's result cache emptied (what a server restart gives) but the library's
  embedding cache kept: everything after extraction is recomputed.
- **warm, same inputs**: a second Run in a running app: the cached result is drawn again.
- **threshold change**: moving the α control on the overview (no recomputation), median of ``--repeats``.
- **open pair**: from the flagged list to the pair view (``result.pair`` + rendering every image), first
  pair and then ``--repeats`` further pairs via "Next" (each a pair not looked at before), median.
- **reference**: an empty rerun of the overview in the same session (the script's fixed cost), median.

Times are wall-clock seconds of whole script runs on this machine; the machine is shared, so the load
average at the start is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    import streamlit

    return (
        f"{platform.processor() or platform.machine()}, {cores} cores usable, load average at start {load}; "
        f"Python {platform.python_version()}, streamlit {streamlit.__version__}"
    )


def run(extractor: str, mode: str, repeats: int) -> list[tuple[str, float, str]]:
    """Measure; returns rows ``(what, seconds, note)``."""
    from streamlit.testing.v1 import AppTest

    from inspector import ui

    rows: list[tuple[str, float, str]] = []
    app = str(ROOT / "app.py")

    def new_session() -> AppTest:
        at = AppTest.from_file(app, default_timeout=3600)
        at.run()
        at.selectbox(key="in_extractor").select(extractor)
        at.radio(key="in_mode").set_value(mode)
        return at

    def check(at: AppTest) -> None:
        if at.exception:
            raise RuntimeError(f"the app raised: {at.exception[0].value}")
        errors = [e.value for e in at.error if "Verdict." not in e.value]
        if errors:
            raise RuntimeError(f"the app reported: {errors}")

    ui.audit_store().clear()
    at = new_session()
    t = _timed(lambda: at.button(key="run").click().run())
    check(at)
    entry = ui.audit_store()[at.session_state["active"]]
    r = entry.result
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r.timings.items() if k != "total")
    rows.append(
        ("Run → verdict, cold", t, f"{len(r.train)}/{len(r.synthetic)}/{len(r.holdout or [])} slices; {stages}")
    )

    t = _timed(lambda: at.button(key="run").click().run())
    check(at)
    rows.append(("Run → verdict, warm, same inputs (app cache)", t, "second Run in the same app"))

    ui.audit_store().clear()
    at = new_session()
    t = _timed(lambda: at.button(key="run").click().run())
    check(at)
    r = ui.audit_store()[at.session_state["active"]].result
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r.timings.items() if k != "total")
    rows.append(("Run → verdict, warm, new session (embedding cache)", t, stages))

    ref = [_timed(lambda: at.run()) for _ in range(repeats)]
    check(at)
    rows.append(("reference: rerun of the overview", statistics.median(ref), f"median of {repeats}"))

    alphas = [a for a in ui.ALPHAS if a != r.config.alpha]
    times = []
    for i in range(repeats):
        a = alphas[i % len(alphas)]
        times.append(_timed(lambda a=a: at.select_slider(key="view_alpha").set_value(a).run()))
    check(at)
    rows.append(("threshold change (overview redrawn)", statistics.median(times), f"median of {repeats}"))
    at.select_slider(key="view_alpha").set_value(r.config.alpha).run()

    at.radio(key="page").set_value("Flagged").run()
    check(at)
    if not at.button(key="open_pair").label:
        raise RuntimeError("no flagged pair to open")
    t = _timed(lambda: at.button(key="open_pair").click().run())
    check(at)
    n_img = len(at.get("image"))
    rows.append(("open a pair (flagged list → pair view)", t, f"{n_img} images rendered"))
    nxt = [_timed(lambda: at.button(key="pair_next").click().run()) for _ in range(repeats)]
    check(at)
    rows.append(("next pair (pair view → new pair)", statistics.median(nxt), f"median of {repeats}"))
    win = [_timed(lambda v=v: at.slider(key="win_low").set_value(v).run()) for v in (0.05, 0.1, 0.15, 0.2, 0.0)]
    check(at)
    rows.append(("intensity window change (pair re-rendered)", statistics.median(win), "median of 5"))
    return rows


def table(rows: list[tuple[str, float, str]], header: str) -> str:
    out = [header, "", "| what | seconds | note |", "|---|---:|---|"]
    out += [f"| {w} | {s:.2f} | {n} |" for w, s, n in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extractor", default="pixels", help="ssl, pixels or mri-core (default: pixels)")
    ap.add_argument("--mode", default="default", choices=("default", "paper"))
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the fast measurements (median)")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="bench_app_") as tmp:
        os.environ["INSPECTOR_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ["INSPECTOR_REVIEWS_DB"] = str(Path(tmp) / "reviews.sqlite3")
        header = (
            f"App response times on sample_data/, extractor {args.extractor}, mode {args.mode} "
            f"(AppTest, headless). Machine: {machine()}."
        )
        rows = run(args.extractor, args.mode, args.repeats)
    text = table(rows, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
