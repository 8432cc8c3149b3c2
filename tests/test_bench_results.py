"""benchmarks.results.put_section: a benchmark's own section in RESULTS.md, inserted once and then replaced."""

from __future__ import annotations

import pytest

from benchmarks import results


def test_put_section_inserts_then_replaces(tmp_path, monkeypatch):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\n## Speed and memory\n\nIntro.\n\n### Old (`bench_x`)\n\nx body\n\n## Later\n\nend\n")
    monkeypatch.setattr(results, "RESULTS", doc)
    results.put_section("New (`bench_y`)", "| a |\n|---|\n| 1 |", "python -m benchmarks.bench_y", 3.2, "machine M")
    text = doc.read_text()
    assert text.index("Intro.") < text.index("### New (`bench_y`)") < text.index("### Old (`bench_x`)")
    assert "- Machine: machine M" in text and "- Command: `python -m benchmarks.bench_y`" in text and "| 1 |" in text
    results.put_section("New (`bench_y`)", "| a |\n|---|\n| 2 |", "python -m benchmarks.bench_y", 4.0, "machine M")
    text = doc.read_text()
    assert text.count("### New (`bench_y`)") == 1 and "| 2 |" in text and "| 1 |" not in text
    assert "x body" in text and text.rstrip().endswith("end")  # the other sections are kept


def test_put_section_needs_the_speed_section(tmp_path, monkeypatch):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\nnothing\n")
    monkeypatch.setattr(results, "RESULTS", doc)
    with pytest.raises(SystemExit, match="Speed and memory"):
        results.put_section("T", "b", "c", 1.0, "m")
