"""RESULTS.md plumbing: a benchmark's own section (put_section), and sections carried over from an earlier file."""

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
    assert "| 2 |\n\n### Old (`bench_x`)" in text  # a replaced section keeps the blank line before the next
    assert "x body" in text and text.rstrip().endswith("end")  # the other sections are kept


def test_put_section_needs_the_speed_section(tmp_path, monkeypatch):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\nnothing\n")
    monkeypatch.setattr(results, "RESULTS", doc)
    with pytest.raises(SystemExit, match="Speed and memory"):
        results.put_section("T", "b", "c", 1.0, "m")


def test_carry_over_copies_the_sections_not_rerun_verbatim(tmp_path):
    from benchmarks import run_all

    old = tmp_path / "OLD.md"
    old.write_text(
        "# R\n\n## Detection\n\nd\n\n"
        "<!-- volumes3d:start -->\n## 3D: volumes\n\nvol body\n\n<!-- volumes3d:end -->\n"
        "<!-- volumes3d:epi:start -->\n## 3D: second family\n\nepi body\n\n<!-- volumes3d:epi:end -->\n\n"
        "## Calibration: false alarms (`calibration`)\n\n- Date: then\n\n| c | 1 |\n\n"
        "## Speed and memory\n\nIntro.\n\n"
        "### Alignment (`bench_align`)\n\n- Date: then\n\n## Its own heading\n\n"
        "### 64 px: a sub-heading\n\nalign body\n\n"
        "### End to end (`bench_app`)\n\n- Date: then\n\napp body\n"
    )
    carried = run_all.carried_sections(old)
    assert set(carried) == {"calibration", "volumes3d", "bench_align", "bench_app"}
    assert "vol body" in carried["volumes3d"] and "epi body" in carried["volumes3d"]
    assert (
        carried["volumes3d"].rstrip().endswith("<!-- volumes3d:epi:end -->") and "## Calib" not in carried["volumes3d"]
    )
    assert "align body" in carried["bench_align"] and "## Its own heading" in carried["bench_align"]
    assert "app body" not in carried["bench_align"] and "| c | 1 |" in carried["calibration"]
    fresh = [{"name": "bench_app", "status": "ok", "stdout": "new app body", "stderr": "", "seconds": 1.0,
              "command": "python -m benchmarks.bench_app"}]  # fmt: skip
    text = run_all.render(None, fresh, command="c", machine="M", date="now", seconds={}, mri_core=None, carried=carried)
    assert "new app body" in text and "app body\n" not in text.replace("new app body", "")
    assert "align body" in text and "| c | 1 |" in text
    assert text.count(run_all.CARRIED) == 3  # 3D, calibration and bench_align, each marked once
    assert "vol body" in text and "epi body" in text and text.index("epi body") < text.index("| c | 1 |")
    # SPEED's order is kept (bench_align before bench_app), and carrying twice does not stack the marker
    assert text.index("`bench_align`") < text.index("`bench_app`")
    again = tmp_path / "AGAIN.md"
    again.write_text(text)
    text2 = run_all.render(None, [], command="c", machine="M", date="now", seconds={}, mri_core=None,
                           carried=run_all.carried_sections(again))  # fmt: skip
    assert text2.count(run_all.CARRIED) == 4 and text2.count("new app body") == 1 and text2.count("vol body") == 1


def test_put_lookalike_section_replaces_only_that_section(tmp_path, monkeypatch):
    from benchmarks import lookalike

    doc = tmp_path / "RESULTS.md"
    head = "## Look-alike cohorts: detection as the cohort grows\n"
    doc.write_text(f"# R\n\n## Detection\n\nd\n\n{head}\nold tables\n\n<!-- volumes3d:start -->\n## 3D\n\nv\n")
    monkeypatch.setattr(results, "RESULTS", doc)
    monkeypatch.setattr(lookalike, "section", lambda pc, ps: head + "\nnew tables\n")
    monkeypatch.setattr("benchmarks.detection.machine", lambda: "machine M")
    lookalike.put_lookalike_section(None, None, "python -m benchmarks.lookalike --seeds 0", 120.0)
    text = doc.read_text()
    assert "old tables" not in text and "new tables" in text and text.count(head) == 1
    assert "`python -m benchmarks.lookalike --seeds 0` (2 min; machine M)" in text
    assert "new tables\n\n<!-- volumes3d:start -->\n## 3D\n\nv\n" in text and "## Detection\n\nd\n" in text
    doc.write_text("# R\n\nnothing\n")
    with pytest.raises(SystemExit, match="no section .*Look-alike cohorts"):
        lookalike.put_lookalike_section(None, None, "c", 1.0)
