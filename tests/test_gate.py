"""The CI gate of `inspector scan`: exit 1 when copies are planted, 0 for a novel set, 2 on bad input.

Cohorts are real MRI (nilearn's MNI152 template, 2 mm, offline) cut into PNG slices. Each cohort is
scored once: the CLI's call to :func:`inspector.pipeline.audit` goes through a memoising wrapper of the
real function, so the gate variants (``--fail-on flagged|verdict``, ``--max-flagged``) re-run the CLI's
argument parsing, saving and gate on the same real audit instead of recomputing identical scores.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inspector.pipeline as audit_mod
from inspector.calibration import Verdict, gate
from inspector.cli import main
from inspector.preprocess import is_background, normalise_volume

ALPHA = "0.05"  # with a 20-slice holdout the smallest p-value is 1/21 < 0.05


@functools.lru_cache(maxsize=1)
def _mni() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    return normalise_volume(np.asarray(load_mni152_template(resolution=2).get_fdata(), np.float32))


def _save_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(path)


def _slices() -> tuple[list[tuple[str, int, np.ndarray]], list[tuple[str, int, np.ndarray]]]:
    """Training and unseen slices, 4 mm apart, alternating; three 'subjects' (the template's planes).

    Sagittal slices come from one hemisphere only: the template is nearly symmetric, so a slice and its
    mirror across the midline would put a training slice's twin into the unseen pool.
    """
    vol = _mni()
    train, unseen = [], []
    planes = ((2, "sub-axial", 0.25, 0.75), (1, "sub-coronal", 0.25, 0.75), (0, "sub-sagittal", 0.2, 0.45))
    for axis, name, lo, hi in planes:
        n = vol.shape[axis]
        idx = [i for i in range(int(lo * n), int(hi * n), 2) if not is_background(np.take(vol, i, axis=axis))]
        for k, i in enumerate(idx):
            img = np.take(vol, i, axis=axis).T[::-1]
            (train if k % 2 == 0 else unseen).append((name, i, img))
    return train, unseen


@pytest.fixture(scope="module")
def gate_cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/ (3 subjects), holdout/ (20 unseen slices), copies/ (4 exact training slices), novel/ (6 unseen)."""
    root = tmp_path_factory.mktemp("gate")
    rng = np.random.default_rng(0)
    train, unseen = _slices()
    per_subject: dict[str, list] = {}
    for t in train:
        per_subject.setdefault(t[0], []).append(t)
    train = [t for subj in per_subject.values() for t in subj[:8]]
    order = rng.permutation(len(unseen))
    hold = [unseen[i] for i in order[:20]]
    novel = [unseen[i] for i in order[20:26]]
    assert len(novel) == 6
    for subj, i, img in train:
        _save_png(root / "train" / subj / f"s{i:03d}.png", img)
    for subj, i, img in hold:
        _save_png(root / "holdout" / subj / f"s{i:03d}.png", img)
    for j, t in enumerate(rng.choice(len(train), size=4, replace=False)):
        _save_png(root / "copies" / "gen" / f"c{j:02d}.png", train[t][2])
    for j, (_s, _i, img) in enumerate(novel):
        _save_png(root / "novel" / "gen" / f"n{j:02d}.png", img)
    return {k: root / k for k in ("train", "holdout", "copies", "novel")} | {"root": root}


@pytest.fixture(scope="module")
def memo_audit():
    """Replace ``inspector.pipeline.audit`` with a memoising wrapper of itself for this module."""
    real = audit_mod.audit
    memo: dict[str, object] = {}
    calls = {"real": 0}

    def wrapper(train, synthetic, holdout=None, config=None, **kw):
        key = json.dumps([str(train), str(synthetic), str(holdout), config.to_dict() if config else None])
        if key not in memo:
            calls["real"] += 1
            memo[key] = real(train, synthetic, holdout, config, **kw)
        return memo[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(audit_mod, "audit", wrapper)
    yield calls
    mp.undo()


def _scan(c: dict[str, Path], synthetic: str, out: str, *extra: str) -> int:
    return main(
        [
            "scan",
            "--train", str(c["train"]),
            "--synthetic", str(c[synthetic]),
            "--holdout", str(c["holdout"]),
            "--extractor", "pixels",
            "--size", "64",
            "--alpha", ALPHA,
            "--cache-dir", str(c["root"] / "cache"),
            "--quiet",
            "--out", str(c["root"] / out),
            *extra,
        ]
    )  # fmt: skip


def _verdict(c: dict[str, Path], out: str) -> dict:
    return json.loads((c["root"] / out / "summary.json").read_text())["verdict"]


def test_planted_copies_fail_the_flagged_gate(gate_cohorts, memo_audit, capsys):
    code = _scan(gate_cohorts, "copies", "out-copies", "--fail-on", "flagged")
    err = capsys.readouterr().err
    v = _verdict(gate_cohorts, "out-copies")
    assert v["n_flagged"] == 4 and v["n_synthetic"] == 4, v
    assert code == 1, err
    assert "GATE FAILED (--fail-on flagged)" in err
    # the outputs a release pipeline archives are written before the gate decides
    for name in ("scores.csv", "summary.json", "subjects.csv", "evidence.npz", "manifest.json"):
        assert (gate_cohorts["root"] / "out-copies" / name).is_file()


def test_novel_set_passes_the_flagged_gate(gate_cohorts, memo_audit, capsys):
    code = _scan(gate_cohorts, "novel", "out-novel", "--fail-on", "flagged")
    err = capsys.readouterr().err
    v = _verdict(gate_cohorts, "out-novel")
    assert v["n_flagged"] <= 1, v
    assert code == 0, err
    assert "GATE FAILED" not in err


def test_never_is_the_default_and_exits_0_with_copies(gate_cohorts, memo_audit):
    assert _scan(gate_cohorts, "copies", "out-copies-never") == 0
    assert _verdict(gate_cohorts, "out-copies-never")["n_flagged"] == 4


@pytest.mark.parametrize(("max_flagged", "expected"), [(0, 1), (3, 1), (4, 0), (10, 0)])
def test_max_flagged_threshold(gate_cohorts, memo_audit, capsys, max_flagged, expected):
    out = f"out-max-{max_flagged}"
    code = _scan(gate_cohorts, "copies", out, "--fail-on", "flagged", "--max-flagged", str(max_flagged))
    err = capsys.readouterr().err
    assert code == expected, err
    if expected:
        assert f"4 slices flagged (allowed: {max_flagged})" in err


def test_max_flagged_on_the_novel_set(gate_cohorts, memo_audit, capsys):
    code = _scan(gate_cohorts, "novel", "out-novel-max", "--fail-on", "flagged", "--max-flagged", "1")
    assert _verdict(gate_cohorts, "out-novel-max")["n_flagged"] <= 1
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(("synthetic", "expected"), [("copies", 1), ("novel", 0)])
def test_verdict_gate(gate_cohorts, memo_audit, capsys, synthetic, expected):
    code = _scan(gate_cohorts, synthetic, f"out-verdict-{synthetic}", "--fail-on", "verdict")
    err = capsys.readouterr().err
    v = _verdict(gate_cohorts, f"out-verdict-{synthetic}")
    assert v["copying"] is bool(expected)
    assert code == expected, err
    if expected:
        assert "GATE FAILED (--fail-on verdict)" in err and "rejects 'no copying'" in err


def test_each_cohort_is_scored_once(gate_cohorts, memo_audit):
    # copies and novel, whatever the order the tests above ran in (guards the memo, not the gate)
    _scan(gate_cohorts, "copies", "out-once-a")
    _scan(gate_cohorts, "novel", "out-once-b")
    assert memo_audit["real"] == 2


def test_missing_path_exits_2(gate_cohorts, capsys):
    missing = gate_cohorts["root"] / "no-such-folder"
    code = main(
        ["scan", "--train", str(missing), "--synthetic", str(gate_cohorts["novel"]), "--fail-on", "flagged",
         "--out", str(gate_cohorts["root"] / "out-missing")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "does not exist" in err and "Traceback" not in err
    assert not (gate_cohorts["root"] / "out-missing" / "scores.csv").exists()


def test_bad_gate_options_exit_2(gate_cohorts, capsys):
    with pytest.raises(SystemExit) as e:
        main(["scan", "--train", "a", "--synthetic", "b", "--out", "c", "--fail-on", "sometimes"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["scan", "--train", "a", "--synthetic", "b", "--out", "c", "--max-flagged", "many"])
    assert e.value.code == 2
    assert "invalid" in capsys.readouterr().err


def _verdict_obj(**kw) -> Verdict:
    base = dict(
        mode="default", n_synthetic=10, n_flagged=3, fraction_flagged=0.3, fraction_ci95=(0.02, 0.3), alpha=0.01,
        fdr=False, expected_false_positives=0.1, n_subjects_flagged=1, null_kind="holdout", n_null=200,
        min_p_value=1 / 201, alpha_reachable=True, mann_whitney_auc=0.9, mann_whitney_p=0.01, mean_oni=0.1,
        mean_mi_z=1.0, paper_rule="ONI < 0.68 means memorisation", paper_rule_memorised=True, copying=True,
        copying_reason="why",
    )  # fmt: skip
    return Verdict(**{**base, **kw})


def test_gate_function_rules():
    v = _verdict_obj()
    assert gate(v, "never") == (False, "")
    assert gate(v, "flagged")[0] is True  # the count test rejects
    assert gate(_verdict_obj(copying=False, copying_reason="chance"), "flagged") == (False, "chance")
    # no calibrated null: missing evidence never passes a gate
    undecided = _verdict_obj(copying=False, decidable=False, copying_reason="not decided")
    assert gate(undecided, "flagged")[0] and gate(undecided, "verdict")[0] and not gate(undecided, "never")[0]
    assert gate(v, "flagged", max_flagged=3)[0] is False
    assert gate(v, "flagged", max_flagged=2)[0] is True
    assert gate(v, "verdict") == (True, "why")
    with pytest.raises(ValueError, match="fail_on"):
        gate(v, "sometimes")
    with pytest.raises(ValueError, match="max_flagged"):
        gate(v, "flagged", max_flagged=-1)
    with pytest.raises(TypeError, match="Verdict"):
        gate(v.to_dict(), "flagged")  # a dict is not a verdict: the gate reads the calibration's typed object


def test_fdr_counts_agree_in_scores_summary_report_and_gate(gate_cohorts, memo_audit, capsys):
    """With --fdr, scores.csv, summary.json, the report's summary and the gate count the same flags."""
    import pandas as pd

    from inspector.folder import load_audit_folder
    from inspector.report import summary_path_for, write_report

    out = "out-fdr"
    code = _scan(gate_cohorts, "copies", out, "--fdr", "--fail-on", "flagged", "--max-flagged", "0")
    folder = gate_cohorts["root"] / out
    n_csv = int(pd.read_csv(folder / "scores.csv")["flagged"].sum())
    v = _verdict(gate_cohorts, out)
    assert v["fdr"] is True
    report = write_report(folder, gate_cohorts["root"] / "report-fdr.html")
    rs = json.loads(summary_path_for(report, folder).read_text())
    loaded = load_audit_folder(folder)
    assert n_csv == v["n_flagged"] == rs["verdict"]["n_flagged"] == rs["reviews"]["n_flagged"]
    assert n_csv == int(loaded.calibration.flags().sum()) == len(loaded.flagged_rows())
    assert (code == 1) == (n_csv > 0)
    # BH flags no more than the per-slice rule at the same alpha, and the report states the setting
    assert int(loaded.calibration.flags(fdr=False).sum()) >= n_csv
    assert "Benjamini" in report.read_text(encoding="utf-8")
