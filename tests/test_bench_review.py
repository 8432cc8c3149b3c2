"""benchmarks/bench_review.py: its markdown table (the measurement itself is run by hand or by run_all)."""

from __future__ import annotations

from benchmarks.bench_review import ALPHA_TARGET_MS, PAIR_TARGET_MS, table


def test_table_marks_each_target():
    rows = [("α change, Overview", 120.0, ALPHA_TARGET_MS, "median of 5"),
            ("open a pair, first time", 640.0, PAIR_TARGET_MS, "median of 5"),
            ("reference", 90.0, None, "")]  # fmt: skip
    text = table(rows, "header").splitlines()
    assert text[0] == "header" and text[2].startswith("| interaction | server time (ms) | target (ms) | met |")
    assert text[4] == "| α change, Overview | 120 | 200 | yes | median of 5 |"
    assert text[5] == "| open a pair, first time | 640 | 500 | **no** | median of 5 |"
    assert text[6] == "| reference | 90 |  |  |  |"
