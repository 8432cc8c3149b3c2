"""The `inspector scan` command: outputs, exit codes, messages, help."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from inspector.attribution import SCORE_COLUMNS
from inspector.cli import build_parser, main
from inspector.privacy import load_or_create_key, pseudonym


def test_scan_writes_scores_summary_subjects(audit_cohorts, tmp_path, capsys):
    p = audit_cohorts
    out = tmp_path / "out"
    code = main(
        [
            "scan",
            "--train", str(p["train"]),
            "--synthetic", str(p["synthetic"]),
            "--holdout", str(p["holdout"]),
            "--extractor", "pixels",
            "--alpha", "0.05",
            "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    scores = pd.read_csv(out / "scores.csv")
    for col in SCORE_COLUMNS:
        assert col in scores.columns
    assert any(c.startswith("sim_") for c in scores.columns) and "layer_consensus" in scores.columns
    assert len(scores) == 16
    # synthetic_path is a pseudonymous label (no --show-paths): the keyed pseudonym of the PNGs' subject (their
    # folder gen/), then the volume's number in the order of the real paths (the table's order)
    gen = pseudonym("gen", load_or_create_key())
    assert list(scores["synthetic_path"]) == [f"{gen}/vol-{n:03d}" for n in range(1, 17)]
    assert set(scores["subject_id"]) == {gen}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["extractor"] == "pixels" and summary["config"]["alpha"] == 0.05
    assert "inspector" in summary["versions"] and "torch" in summary["versions"]
    subjects = pd.read_csv(out / "subjects.csv")
    assert {"subject_id", "n_flagged"} <= set(subjects.columns)
    cap = capsys.readouterr()
    # the verdict and the output paths on stdout, for a CI log; progress stays on stderr
    assert "synthetic slices" in cap.out and str(out / "scores.csv") in cap.out


def test_every_config_setting_is_a_scan_option():
    """The CLI's options are generated from AuditConfig's fields: a new field is a new option with its help."""
    import dataclasses

    from inspector.cli import build_parser
    from inspector.config import AuditConfig, settings

    parser = build_parser()
    scan = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices["scan"]
    by_dest = {a.dest: a for a in scan._actions}
    for f in dataclasses.fields(AuditConfig):
        assert f.name in by_dest, f"AuditConfig.{f.name} has no scan option"
        assert by_dest[f.name].help and len(by_dest[f.name].help) > 20
    names = {s.name for s in settings()}
    assert names == {f.name for f in dataclasses.fields(AuditConfig)}
    ext = next(s for s in settings() if s.name == "extractor")
    from inspector.models import available_extractors

    assert set(ext.choices) == set(available_extractors())
    args = parser.parse_args(
        ["scan", "--train", "t", "--synthetic", "g", "--out", "o", "--no-rerank", "--views", "id,hflip", "--top-k", "3"]
    )
    cfg = AuditConfig.create(**{s.name: getattr(args, s.name) for s in settings()})
    assert cfg.rerank is False and cfg.views == ("id", "hflip") and cfg.top_k == 3 and cfg.alpha == 0.01


def test_bad_setting_exits_2_naming_it(tmp_path, capsys):
    code = main(["scan", "--train", str(tmp_path), "--synthetic", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--shortlist", "0"])  # fmt: skip
    assert code == 2
    assert "shortlist" in capsys.readouterr().err


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    code = main(
        ["scan", "--train", str(tmp_path / "missing"), "--synthetic", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_empty_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "scan",
            "--train",
            str(tmp_path / "empty"),
            "--synthetic",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "No readable image" in capsys.readouterr().err


def test_bad_alpha_exits_2(audit_cohorts, tmp_path, capsys):
    p = audit_cohorts
    code = main(
        ["scan", "--train", str(p["train"]), "--synthetic", str(p["synthetic"]), "--alpha", "2", "--out", str(tmp_path)]
    )
    assert code == 2
    assert "alpha" in capsys.readouterr().err


def test_help_explains_every_option():
    parser = build_parser()
    scan = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("scan"))
    for action in scan._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    text = scan.format_help()
    for opt in ("--train", "--synthetic", "--holdout", "--extractor", "--checkpoint", "--mode", "--alpha", "--out"):
        assert opt in text


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "inspector.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "scan" in res.stdout


@pytest.mark.parametrize("mode", ["paper"])
def test_scan_paper_mode(audit_cohorts, tmp_path, mode):
    p = audit_cohorts
    out = tmp_path / "out"
    code = main(
        ["scan", "--train", str(p["train"]), "--synthetic", str(p["synthetic"]), "--mode", mode,
         "--extractor", "pixels", "--quiet", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    scores = pd.read_csv(out / "scores.csv")
    assert scores["oni"].between(-1, 1).all()


def test_bad_threads_exits_2(audit_cohorts, tmp_path, capsys):
    p = audit_cohorts
    args = ["scan", "--train", str(p["train"]), "--synthetic", str(p["synthetic"]), "--threads", "0"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_scan_says_when_the_setting_cannot_flag_anything(audit_cohorts, tmp_path, capsys):
    p = audit_cohorts
    out = tmp_path / "out"
    args = ["scan", "--train", str(p["train"]), "--synthetic", str(p["synthetic"]), "--holdout", str(p["holdout"]),
            "--extractor", "pixels", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    assert main([*args, "--alpha", "0.0001"]) == 0
    printed = capsys.readouterr().out
    assert "Nothing can be flagged at α = 0.0001" in printed and "no slice can be flagged" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"]["alpha_reachable"] is False and summary["verdict"]["n_flagged"] == 0
    # a release of this audit is refused without a reason; 'do not release' is not
    report = ["report", "--audit", str(out), "--out", str(tmp_path / "r.html")]
    sign = ["--signer", "A", "--role", "privacy officer", "--decision"]
    assert main([*report, *sign, "release"]) == 2
    assert "refused without a reason" in capsys.readouterr().err
    assert main([*report, *sign, "do not release"]) == 0
    assert "not met: the setting can flag a copy" in capsys.readouterr().out
