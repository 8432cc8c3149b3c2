"""RESULTS.md plumbing: a benchmark's own section (put_section), and sections carried over from an earlier file."""

from __future__ import annotations

import numpy as np
import pandas as pd
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


def test_resplit_fpr_is_the_mean_over_subject_splits():
    from benchmarks.lookalike import resplit_fpr
    from inspector.scores import empirical_p_values

    rng = np.random.default_rng(0)
    null_g, novel_g = np.repeat(np.arange(20), 25), np.repeat(np.arange(20, 40), 25)
    null, novel = rng.normal(size=500), rng.normal(size=500)
    got = resplit_fpr(null, null_g, novel, novel_g, alphas=(0.05,), n_splits=3, seed=7)
    # reference: the same three splits drawn and scored one by one
    s, g = np.r_[null, novel], np.r_[null_g, novel_g]
    r = np.random.default_rng(7)
    hits = total = 0
    for _ in range(3):
        pick = np.zeros(40, bool)
        pick[r.choice(40, 20, replace=False)] = True
        p = empirical_p_values(s[~pick[g]], s[pick[g]])
        hits, total = hits + int((p <= 0.05).sum()), total + p.size
    np.testing.assert_allclose(got[0.05], hits / total)
    # exchangeable scores: the expectation is alpha up to the p-values' granularity
    many = resplit_fpr(null, null_g, novel, novel_g, n_splits=400)
    assert 0.04 <= many[0.05] <= 0.055 and 0.005 <= many[0.01] <= 0.0115, many
    # one subject group on both sides: no split to draw
    with pytest.raises(ValueError, match="both sides"):
        resplit_fpr(null, np.zeros(500), novel, np.zeros(500))


def test_lookalike_targets_pool_calibration_runs():
    from benchmarks.lookalike import CALIBRATION, targets

    pc = pd.DataFrame([{"method": "default", "seed": 0, "size": 8, "condition": "none", "auc": 1.0, "recall": 1.0}])
    ps = pd.DataFrame(
        [
            {"method": m, "seed": sd, "size": n, "n_novel": 500, "fpr_0.01": f, "fpr_0.05": 0.05,
             "fpr_resplit_0.01": 0.009, "fpr_resplit_0.05": 0.05}
            for m, sd, n, f in (("default", 0, 8, 0.0), (CALIBRATION, 1, 32, 0.004), (CALIBRATION, 2, 32, 0.008))
        ]
    )  # fmt: skip
    text = targets(pc, ps)
    assert "6/1500 = 0.0040" in text and "3 independent holdout draws" in text
    assert "0.0090 (runs 0.0090 to 0.0090) | yes" in text


def test_clustered_table_is_stamped_and_put_before_the_real_mri_table(tmp_path, monkeypatch):
    from benchmarks import calibration

    doc = tmp_path / "RESULTS.md"
    anchor = "### On real MRI: novel-slice false positives"
    doc.write_text(f"# R\n\n## Calibration\n\n{anchor}\n\nreal\n")
    monkeypatch.setattr(results, "RESULTS", doc)
    monkeypatch.setattr("benchmarks.detection.machine", lambda: "machine M")
    head = calibration.CLUSTERED_HEAD
    calibration.put_clustered(f"{head}\n\n| t1 |\n", "python -m benchmarks.calibration --clustered-only", 170.0)
    text = doc.read_text()
    assert text.index(head) < text.index(anchor) and "| t1 |" in text
    assert "by `python -m benchmarks.calibration --clustered-only` (170 s; machine M)._" in text
    calibration.put_clustered(f"{head}\n\n| t2 |\n", "c", 5.0)  # replaced, not added
    text = doc.read_text()
    assert text.count(head) == 1 and "| t2 |" in text and "| t1 |" not in text and "real" in text


def test_scale_targets_are_computed_from_the_rows_and_rates():
    from benchmarks.bench_scale import targets

    def row(t, run, total, mb, train_s):
        n = {"train": t, "synthetic": t // 10, "holdout": t // 10}
        timings = {"total": total, "training": train_s}
        return {
            "n": n,
            "run": run,
            "wall": total,
            "timings": timings,
            "peak_rss_mb": mb,
            "stage_peak_mb": {"volumes": mb},
        }

    reg = {"pairs": 100, "verify_s": 0.04, "pre_s": 0.1, "orientations": 8, "size": 64}
    rates = [
        {"m": 20, "n": 100_000, "search": {"gemm": 1.0, "knn": 1.25, "sklearn_brute": 6.0}},
        {"m": 2, "n": 1_000, "search": {"gemm": 1.0, "knn": 9.0, "sklearn_brute": 1.0}, "registration": reg},
    ]
    rows = [row(1_000, "cold", 80.0, 900.0, 20.0), row(100_000, "cold", 2400.0, 3500.0, 70.0)]
    text = "\n".join(targets(rows, rates))
    assert "| peak RSS <= 3 GB at T = 100k | 3,500 MB" in text and "in volumes) | **no** |" in text
    assert "| cold end to end <= 45 min at T = 100k | 40.0 min (T = 100,000, G + H = 20,000) | yes |" in text
    assert "| warm end to end <= 10 min at T = 100k | not run | - |" in text
    assert "| search >= 70 % of the GEMM rate | 80% (m = 20, n = 100,000) | yes |" in text  # the largest n
    assert "| search >= 4x scikit-learn brute force | 4.8x" in text
    assert "| registration >= 2,000 verified pairs/s (CPU, 64 px) | 2500 | yes |" in text
    assert "at most 70 s" in text
    small = "\n".join(targets([row(1_000, "cold", 80.0, 900.0, 20.0)], []))
    assert "| cold end to end <= 45 min at T = 100k | not run | - |" in small and "GEMM" not in small
