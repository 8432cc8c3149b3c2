"""subjects.csv and the report's per-subject table at a (alpha, BH) setting, every flag from the Calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from inspector.attribution import subjects_at, volumes_table
from inspector.calibration import Calibration


def _audit(null_kind: str = "holdout") -> tuple[pd.DataFrame, pd.DataFrame, Calibration]:
    rng = np.random.default_rng(0)
    null = rng.normal(0.5, 0.05, 2000)
    # 6 copies of subject A (far above the null), 2 borderline slices of B, 12 novel slices of C
    sim = np.r_[np.full(6, 0.99), np.full(2, np.quantile(null, 0.985)), rng.normal(0.5, 0.05, 12)]
    subj = ["A"] * 6 + ["B"] * 2 + ["C"] * 12
    table = pd.DataFrame(
        {
            "synthetic_path": [f"sub-x/vol-{i:03d}" for i in range(len(sim))],
            "slice_index": 0,
            "similarity": sim,
            "nearest_train_subject": subj,
            "nearest_train_path": [f"{s}/vol-001" for s in subj],
            "nearest_train_slice": 0,
        }
    )
    cal = Calibration(sim, null, null_kind=null_kind, alpha=0.01, nearest_subject=subj)
    table["p_value"] = cal.p_values
    table["flagged"] = 0  # stale on purpose: nothing may read it
    subjects = pd.DataFrame({"subject_id": ["A", "B", "C", "D"], "n_train_slices": [10, 10, 10, 10]})
    return table, subjects, cal


@pytest.mark.parametrize(("alpha", "fdr"), [(0.01, False), (0.05, False), (0.01, True), (0.05, True), (0.2, True)])
def test_counts_are_the_calibrations_flags(alpha: float, fdr: bool) -> None:
    table, subjects, cal = _audit()
    out = subjects_at(subjects, table, cal, alpha, fdr).set_index("subject_id")
    flags = cal.flags(alpha, fdr)
    for s in ("A", "B", "C", "D"):
        assert out.at[s, "n_flagged"] == int(flags[table["nearest_train_subject"] == s].sum())
    assert out["n_flagged"].sum() == int(flags.sum())
    vols = volumes_table(table, cal, alpha, fdr)
    assert out["n_volumes_flagged"].sum() == int(vols["flagged"].sum())
    assert out.at["D", "flagged"] == 0 and out.at["D", "n_synthetic_matched"] == 0
    if not fdr or alpha >= 0.05:  # BH counts every training subject, matched or not
        assert out.at["A", "flagged"] == 1  # six copies far beyond the null


def test_setting_changes_the_table_and_defaults_to_the_calibrations() -> None:
    table, subjects, cal = _audit()
    strict = subjects_at(subjects, table, cal, 0.01, False).set_index("subject_id")
    loose = subjects_at(subjects, table, cal, 0.05, False).set_index("subject_id")
    assert strict.at["B", "n_flagged"] == 0 and loose.at["B", "n_flagged"] == 2
    default = subjects_at(subjects, table, cal)
    pd.testing.assert_frame_equal(default, subjects_at(subjects, table, cal, cal.alpha, cal.fdr))
    pd.testing.assert_frame_equal(subjects_at(subjects, table, cal.at(0.05, False)), loose.reset_index())


def test_bh_applies_across_subjects() -> None:
    table, subjects, cal = _audit()
    bh = subjects_at(subjects, table, cal, 0.05, True).set_index("subject_id")
    from inspector.scores import benjamini_hochberg

    p = bh["p_value"].to_numpy()
    expect = benjamini_hochberg(p, 0.05) & (bh["n_volumes_matched"].to_numpy() > 0)
    assert (bh["flagged"].to_numpy() == expect.astype(int)).all()


def test_nothing_flagged_without_a_calibrated_null() -> None:
    table, subjects, cal = _audit("leave-one-subject-out")
    out = subjects_at(subjects, table, cal, 0.2, False)
    assert out["n_flagged"].sum() == 0 and out["flagged"].sum() == 0 and out["n_volumes_flagged"].sum() == 0


def test_a_table_of_another_audit_is_refused() -> None:
    table, subjects, cal = _audit()
    with pytest.raises(ValueError, match="same audit"):
        subjects_at(subjects, table.iloc[:3], cal)
