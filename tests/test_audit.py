"""audit() end to end on small real-MRI cohorts: ranking, calibration, contract, attribution, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from inspector.attribution import SCORE_COLUMNS
from inspector.config import AuditConfig
from inspector.folder import save_audit
from inspector.io import CohortNotFoundError
from inspector.pipeline import InsufficientDataError, audit

FAST = dict(extractor="pixels", alpha=0.05)


STAGES_SEEN: list[str] = []


@pytest.fixture(scope="module")
def default_result(audit_cohorts, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    p = audit_cohorts
    return audit(
        p["train"], p["synthetic"], p["holdout"], AuditConfig(**FAST), cache_dir=cache,
        progress=lambda stage, done, total: STAGES_SEEN.append(stage),
    )  # fmt: skip


def test_progress_speaks_one_stage_vocabulary(default_result):
    """Every stage the pipeline reports starts with a step of PROGRESS_STAGES (the app and CLI label from it)."""
    from inspector.types import PROGRESS_STAGES

    heads = {s.partition(":")[0] for s in STAGES_SEEN}
    assert heads and heads <= set(PROGRESS_STAGES), heads - set(PROGRESS_STAGES)
    assert {"loading", "extracting", "searching", "aligning", "scoring"} <= heads


@pytest.fixture(scope="module")
def paper_result(audit_cohorts, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    p = audit_cohorts
    return audit(p["train"], p["synthetic"], p["holdout"], AuditConfig(mode="paper", **FAST), cache_dir=cache)


def _labels(result):
    return (result.table["label"] == "copy").to_numpy()


def test_copies_rank_above_novel_and_are_flagged(default_result):
    r = default_result
    copy = _labels(r)
    assert copy.sum() == 6 and (~copy).sum() == 10
    s = r.table["similarity"].to_numpy()
    # every planted copy (exact, flipped, rotated, noisy, rescaled) scores above every novel slice
    assert s[copy].min() > s[~copy].max()
    assert r.table.loc[copy, "flagged"].all()
    roc = r.roc()
    assert roc is not None and roc["auc"] == pytest.approx(1.0)
    # copies are attributed to the right training slice
    src = r.table.loc[copy, "source"].to_numpy()
    got = (r.table.loc[copy, "nearest_train_path"]).to_numpy()
    assert (src == got).all(), list(zip(src, got, strict=True))


def test_flipped_copy_matched_under_its_view(default_result):
    t = default_result.table
    row = t[(t["augmentation"] == "hflip")].iloc[0]
    assert row["view"] == "hflip" and row["align_flip"] == "hflip"
    row = t[(t["augmentation"] == "vflip")].iloc[0]
    assert row["view"] == "vflip"


def test_score_table_contract_and_no_nan(default_result):
    t = default_result.table
    for col in SCORE_COLUMNS:
        assert col in t.columns, col
    for layer in default_result.layers:
        assert f"sim_{layer}" in t.columns
    assert "layer_consensus" in t.columns
    num = t.select_dtypes(include=[np.number])
    assert np.isfinite(num.to_numpy(float)).all()
    assert ((t["mi"] >= 0) & (t["mi"] <= 1)).all()
    assert ((t["p_value"] > 0) & (t["p_value"] <= 1)).all()
    np.testing.assert_allclose(t["oni"], -np.tanh(t["mi_z"]), rtol=1e-6, atol=1e-9)
    assert set(t["flagged"].unique()) <= {0, 1}
    assert (t["layer_consensus"] >= 0).all() and (t["layer_consensus"] <= len(default_result.layers)).all()


def test_p_values_follow_the_holdout_null(default_result):
    r = default_result
    null = np.asarray(r.null_similarity)
    assert r.verdict.null_kind == "holdout"
    assert len(null) == len(r.holdout)
    s = r.table["similarity"].to_numpy()
    expect = (1 + (null[None, :] >= s[:, None]).sum(1)) / (1 + len(null))
    np.testing.assert_allclose(r.table["p_value"], expect)
    np.testing.assert_array_equal(r.table["flagged"].to_numpy(bool), expect <= r.config.alpha)


def test_verdict_and_subjects(default_result):
    r = default_result
    v = r.verdict
    assert v.n_flagged == int(r.table["flagged"].sum())
    lo, hi = v.fraction_ci95
    assert lo <= v.fraction_flagged <= hi
    assert v.mann_whitney_auc > 0.5
    assert v.copying is True  # 6 of 16 flagged is far more than alpha explains
    assert "look copied" in r.verdict.text
    subj = r.subjects
    assert set(subj["subject_id"]) == set(r.train.subjects)
    assert subj["n_flagged"].sum() == v.n_flagged
    assert subj["n_synthetic_matched"].sum() == len(r.table)
    for key in ("auth_pct", "ct_score", "dcr_median", "pixel_corr_median"):
        assert key in r.baselines, r.baselines


def test_threshold_lookups_need_no_recomputation(default_result):
    r = default_result
    strict, loose = r.flags(0.03), r.flags(0.5)
    assert strict.sum() <= loose.sum()
    thr = r.calibration.threshold(0.05)
    s = r.table["similarity"].to_numpy()
    np.testing.assert_array_equal(s > thr, r.flags(0.05) & (s > thr))


def test_pair_evidence(default_result):
    r = default_result
    i = int(np.argmax(r.table["similarity"].to_numpy()))
    ev = r.pair(i)
    assert set(ev.layers) == set(r.layers)
    for rows in ev.layers.values():
        assert len(rows) == r.config.top_k
        assert rows[0]["image"].shape == ev.synthetic.shape
    assert ev.aligned is not None and ev.difference is not None
    # the aligned best candidate reproduces the synthetic slice (a planted copy)
    assert np.corrcoef(ev.aligned.ravel(), ev.synthetic.ravel())[0, 1] > 0.9


def test_paper_mode(paper_result, default_result):
    r = paper_result
    # p-values and flags come from the holdout scored with the paper's own similarity (issue 12); MI and ONI
    # from the paper's split-half bootstrap, as published
    assert r.verdict.null_kind == "holdout" and r.verdict.decidable
    assert len(r.null_similarity) == len(r.holdout)
    assert r.alignment is None
    t = r.table
    np.testing.assert_allclose(t["oni"], -np.tanh(t["mi_z"]), rtol=1e-6)
    copy = _labels(r)
    assert t.loc[copy & (t["augmentation"] == "none"), "similarity"].min() > t.loc[~copy, "similarity"].median()
    # the paper's z-score and ONI do not depend on the mode
    np.testing.assert_allclose(t["mi_z"], default_result.table["mi_z"], rtol=1e-5)


def test_leave_one_subject_out_null(audit_cohorts, tmp_path):
    p = audit_cohorts
    r = audit(p["train"], p["synthetic"], None, AuditConfig(**FAST), cache_dir=tmp_path)
    assert r.verdict.null_kind == "leave-one-subject-out"
    assert len(r.null_similarity) == len(r.train)
    assert np.isfinite(r.null_similarity).all()
    # that null is not calibrated: the audit ranks without flagging and says so, and the gate refuses to pass
    assert not r.verdict.decidable and r.table["flagged"].sum() == 0 and not r.verdict.copying
    assert "Give a holdout" in r.verdict.text
    assert r.calibration.gate("verdict")[0] and "missing evidence" in r.calibration.gate("flagged")[1]
    s = r.table["similarity"].to_numpy()
    copy = _labels(r)
    assert s[copy].mean() > s[~copy].mean()  # still ranked


def test_paper_mode_without_holdout_flags_nothing(audit_cohorts, tmp_path):
    p = audit_cohorts
    r = audit(p["train"], p["synthetic"], None, AuditConfig(mode="paper", **FAST), cache_dir=tmp_path)
    assert r.verdict.null_kind == "split-half bootstrap" and not r.verdict.decidable
    assert r.table["flagged"].sum() == 0 and "not calibrated" in r.verdict.text
    assert np.isfinite(r.table["mi_z"]).all()  # the paper's MI and ONI are still reported


def test_single_subject_without_holdout_is_a_clear_error(audit_cohorts, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(audit_cohorts["train"] / "sub-axial", one / "sub-axial")
    with pytest.raises(InsufficientDataError, match="single subject"):
        audit(one, audit_cohorts["synthetic"], None, AuditConfig(**FAST), cache_dir=tmp_path / "c")


def test_unreachable_alpha_is_reported(audit_cohorts, tmp_path):
    p = audit_cohorts
    r = audit(
        p["train"], p["synthetic"], p["holdout"], AuditConfig(extractor="pixels", alpha=0.001), cache_dir=tmp_path
    )
    assert r.verdict.alpha_reachable is False
    assert "smallest possible p-value" in r.verdict.warning
    assert r.table["flagged"].sum() == 0


def test_missing_path_and_checkpoint_misuse(audit_cohorts, tmp_path):
    with pytest.raises(CohortNotFoundError, match="does not exist"):
        audit(tmp_path / "nope", audit_cohorts["synthetic"], config=AuditConfig(**FAST))
    with pytest.raises(ValueError, match="checkpoints are for extractor='mri-core'"):
        audit(
            audit_cohorts["train"],
            audit_cohorts["synthetic"],
            config=AuditConfig(checkpoint=str(tmp_path / "x.pt"), **FAST),
        )


def test_save_writes_the_cli_contract(default_result, tmp_path):
    out = save_audit(default_result, tmp_path / "out")
    for name in ("scores.csv", "summary.json", "subjects.csv"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"]["n_flagged"] == default_result.verdict.n_flagged
    assert summary["config"]["mode"] == "default"
    # the null's subjects (the clusters of the count test) travel with the folder, pseudonymised: the reloaded
    # verdict is the audit's own
    from inspector.folder import load_audit_folder

    cal = default_result.calibration
    assert cal.null_subjects is not None and len(cal.null_subjects) == cal.n_null
    with np.load(out / "audit.npz", allow_pickle=False) as z:
        saved = z["null_subjects"].astype(str)
    assert len(set(saved)) == len(set(cal.null_subjects.astype(str)))
    back = load_audit_folder(out).calibration.verdict()
    assert back.test == default_result.verdict.test and back.test_p_value == default_result.verdict.test_p_value


@pytest.fixture(scope="module")
def volume_result(tmp_path_factory):
    """Volumes (.npy stacks of disjoint MNI slabs, interleaved along z): 4 training subjects, 4 holdout, and 2
    copied and 4 novel synthetic volumes."""
    from nilearn.datasets import load_mni152_template

    from inspector.preprocess import normalise_volume

    vol = normalise_volume(np.asarray(load_mni152_template(resolution=2).get_fdata(), np.float32))
    root = tmp_path_factory.mktemp("vols")
    rng = np.random.default_rng(0)
    slabs = [vol[:, :, z : z + 4] for z in range(14, 14 + 12 * 5, 5)]  # 12 disjoint slabs, 1 slice apart

    def put(folder: str, name: str, arr: np.ndarray) -> None:
        (root / folder).mkdir(exist_ok=True)
        np.save(root / folder / f"{name}.npy", np.clip(arr, 0, 1).astype(np.float32))

    for i in range(4):
        put("train", f"t{i}", slabs[3 * i])
        put("holdout", f"h{i}", slabs[3 * i + 1])
        put("synthetic", f"novel{i}", slabs[3 * i + 2])
    for j, i in enumerate((0, 2)):
        put("synthetic", f"copy{j}", slabs[3 * i] + rng.normal(0, 0.01, slabs[3 * i].shape))
    # real names (show_paths): the tests tell copied from novel volumes by their file names
    cfg = AuditConfig(extractor="pixels", size=64, alpha=0.05, show_paths=True)
    r = audit(root / "train", root / "synthetic", root / "holdout", cfg, cache_dir=root / "cache")
    return r, root


def test_volumes_are_units_with_calibrated_p_values(volume_result, tmp_path):
    r, _ = volume_result
    v = r.volumes()
    assert len(v) == 6 and set(v["n_slices"]) == {4}
    copies = v[v["volume"].str.startswith("copy")]
    novel = v[v["volume"].str.startswith("novel")]
    # every copied volume matches its source volume throughout, at offset 0, and ranks above every novel one
    assert (copies["match_fraction"] == 1.0).all() and (copies["train_slice_offset"] == 0).all()
    assert set(copies["nearest_train_volume"]) == {"t0.npy", "t2.npy"}
    assert copies["simes"].max() < novel["simes"].min() and copies["p_value"].max() <= novel["p_value"].min()
    # 4 holdout volumes calibrate the volume p-values (smallest possible 1/5)
    assert r.calibration.volume_calibration == "holdout volumes"
    assert copies["p_value"].max() == pytest.approx(1 / 5) and not v["flagged"].any()
    assert r.verdict.unit == "volume"
    # the saved folder gives the same volumes, verdict and subject flags
    from inspector.folder import load_audit_folder

    out = save_audit(r, tmp_path / "out")
    f = load_audit_folder(out)
    pd_v = __import__("pandas").read_csv(out / "volumes.csv").drop(columns="audit_id")
    np.testing.assert_allclose(pd_v["p_value"], v["p_value"])
    assert (f.volumes()["volume"] == v["volume"]).all()
    np.testing.assert_allclose(f.volumes()["p_value"], v["p_value"])
    assert f.verdict.to_dict() == r.verdict.to_dict()
    subj = r.subjects.set_index("subject_id")
    assert {"n_volumes_matched", "p_value", "flagged"} <= set(subj.columns)
    assert subj["n_volumes_matched"].sum() == 6
