"""The CLI's progress (real counts per stage, registration included, no bar left at 100 %) and --quiet."""

from __future__ import annotations

import io
import time

from inspector.cli import CliProgress, main


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_carry_counts_per_stage():
    out = io.StringIO()
    p = CliProgress(stream=out)
    p("searching:synthetic", 0, 8)
    p("searching:synthetic", 8, 8)
    p("aligning:synthetic", 40, 77)
    p("aligning:synthetic", 77, 77)
    p("aligning:holdout", 109, 109)  # one event only: still one line with its counts
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "Searching nearest neighbours (synthetic): 0/8 views"
    assert lines[1].startswith("Searching nearest neighbours (synthetic): 8/8 views in ")
    assert lines[2] == "Aligning candidates (synthetic): 40/77 slices"
    assert lines[3].startswith("Aligning candidates (synthetic): 77/77 slices in ")
    assert lines[4].startswith("Aligning candidates (holdout): 109/109 slices in ")
    assert len(lines) == 5


def test_terminal_bar_is_closed_when_its_stage_ends_and_a_heartbeat_shows_work():
    out = _Tty()
    p = CliProgress(stream=out, heartbeat=0.05)
    p("searching:synthetic", 8, 8)
    assert p.bar is None and p.stage is None  # no bar sitting at 100 % while the next stage works
    time.sleep(0.3)
    assert "working (" in out.getvalue() and "since Searching nearest neighbours (synthetic)" in out.getvalue()
    p("aligning:synthetic", 10, 77)
    assert p.bar is not None and p.bar.n == 10 and p.bar.total == 77
    assert "Aligning candidates (synthetic)" in out.getvalue() and "10/77" in out.getvalue()
    p.close()
    assert p.bar is None


def test_disabled_renders_nothing():
    out = _Tty()
    p = CliProgress(enabled=False, stream=out)
    p("aligning:synthetic", 1, 2)
    p.close()
    assert out.getvalue() == ""


def test_scan_shows_registration_progress_and_quiet_keeps_only_errors(audit_cohorts, tmp_path, capsys):
    p = audit_cohorts
    base = ["scan", "--train", str(p["train"]), "--synthetic", str(p["synthetic"]), "--extractor", "pixels",
            "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    # without a holdout: the verdict is 'not decided' and the library warns; --quiet keeps stderr empty
    assert main([*base, "--quiet", "--out", str(tmp_path / "q")]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "wrote " in cap.out
    assert main([*base, "--holdout", str(p["holdout"]), "--out", str(tmp_path / "v")]) == 0
    cap = capsys.readouterr()
    assert "Aligning candidates (synthetic): " in cap.err and " slices in " in cap.err
    assert "wrote " in cap.out and "Aligning" not in cap.out
    # an error still reaches stderr under --quiet
    assert main([*base, "--quiet", "--threads", "0", "--out", str(tmp_path / "e")]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
