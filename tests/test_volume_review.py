"""The Volumes page's helpers (:mod:`inspector.ui`) and the page itself (``AppTest``) on a small real 3D audit.

One audit per module: a small NIfTI cohort from :func:`benchmarks.volumes3d_data.make_volume_cohort` (4 training
subjects, 4 holdout, copies made in 3D under three conditions, 2 novel volumes), audited with the pixels
extractor and ``unit="volume"``. The app tests put that result into the app's result cache instead of running
the audit again through the sidebar.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from inspector import ui

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from benchmarks.volumes3d_data import make_volume_cohort

    return make_volume_cohort(
        tmp_path_factory.mktemp("vol-cohort"), 4, n_holdout=4, n_novel=2, copies_per_condition=1,
        conditions=["exact", "rot5", "slab_half"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def result(cohort):
    import torch

    from inspector.config import AuditConfig
    from inspector.pipeline import audit

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # alpha 0.05: the null of 8 volumes (a t with 2.6 degrees of freedom) puts the copies near p = 0.02
        cfg = AuditConfig(extractor="pixels", unit="volume", volume_shortlist=1, alpha=0.05)
        return audit(cohort.train_dir, cohort.synthetic_dir, cohort.holdout_dir, cfg)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def entry(result):
    return ui.AuditEntry(result, 1.0)


@pytest.fixture
def flagged_volume(result):
    vols = result.volumes()
    assert vols["flagged"].astype(bool).any(), vols
    return str(vols.loc[vols["flagged"].astype(bool), "volume"].iloc[0])


def _slice_unit(result):
    """The same audit as if it had scored slices only (no volume evidence)."""
    return dataclasses.replace(result, volume_evidence=None, config=dataclasses.replace(result.config, unit="slice"))


# ---------------------------------------------------------------------------------------------- the table


def test_the_audit_verified_its_volumes(result):
    assert result.volume_evidence is not None
    assert result.verdict.unit == "volume"
    assert ui.volume_unit_note(result) is None


@pytest.mark.parametrize("alpha, fdr", [(None, None), (0.0001, False), (0.05, True), (0.2, False)])
def test_subject_index_agrees_with_the_volumes_table(result, alpha, fdr):
    vols = result.volumes(alpha, fdr)
    index = ui.copied_subjects(vols)
    flagged = vols[vols["flagged"].astype(bool)]
    listed = [v for vs in index.values() for v in vs]
    assert sorted(listed) == sorted(flagged["volume"].astype(str))  # every flagged volume, once
    subject_of = dict(zip(vols["volume"].astype(str), vols["nearest_train_subject"].astype(str), strict=True))
    for subj, vs in index.items():
        assert vs and all(subject_of[v] == subj for v in vs)
        order = [v for v in vols["volume"].astype(str) if v in vs]
        assert vs == order  # most significant first, as in the table
    counts = [len(vs) for vs in index.values()]
    assert counts == sorted(counts, reverse=True)
    if alpha is None:
        assert len(listed) == result.verdict.n_volumes_flagged


def test_review_frame_is_the_volumes_table_flagged_first(result):
    vols = result.volumes(0.05, False)
    frame = ui.volume_review_frame(vols)
    assert list(frame.columns[:5]) == ["volume", "n_slices", "volume_similarity", "p_value", "flagged"]
    assert list(frame["volume"]) == list(vols["volume"].astype(str))  # the table's order, unchanged
    assert list(frame["flagged"]) == list(vols["flagged"].astype(bool))
    f = frame["flagged"].to_numpy()
    assert not np.any(~f[:-1] & f[1:]), "a flagged volume after an unflagged one"
    np.testing.assert_allclose(frame["p_value"], vols["p_value"])
    np.testing.assert_allclose(frame["volume_similarity"], vols["volume_similarity"])
    assert list(frame["training_volume"]) == list(vols["verified_train_volume"].astype(str))
    assert all(re.fullmatch(r"\d+–\d+", s) for s in frame["slice_run"])
    assert "truth" not in frame
    truth = ui.volume_truth(result)
    assert set(truth) == set(frame["volume"])
    labelled = ui.volume_review_frame(vols, truth=truth)
    assert {t.split(" ")[0] for t in labelled["truth"]} <= {"copy", "novel"}
    # the flagged ones at this setting are the planted copies
    copies = labelled[labelled["truth"].str.startswith("copy")]
    assert copies["flagged"].all()


def test_no_cohort_path_in_the_table(result, cohort):
    frame = ui.volume_review_frame(result.volumes(), truth=ui.volume_truth(result))
    text = " ".join(map(str, frame.to_numpy().ravel()))
    for folder in (cohort.train_dir, cohort.synthetic_dir, cohort.holdout_dir):
        assert str(folder) not in text
        assert ".nii" not in text


def test_review_frame_without_volume_evidence_still_works(result):
    slice_unit = _slice_unit(result)
    vols = slice_unit.volumes()
    frame = ui.volume_review_frame(vols)
    assert len(frame) == len(vols)
    assert frame["volume_similarity"].isna().all() and (frame["slice_run"] == "").all()


# ---------------------------------------------------------------------------------------------- the viewer


def test_planes_have_the_right_shapes(entry, flagged_volume):
    pair, reason = ui.open_volume(entry, flagged_volume)
    assert reason == "" and pair is not None
    d, s, s2 = pair.synthetic.shape
    assert s == s2 == entry.result.config.size
    assert pair.aligned.shape == pair.difference.shape == (d, s, s)
    assert (ui.plane_length(pair, "axial"), ui.plane_length(pair, "coronal"), ui.plane_length(pair, "sagittal")) == (
        d,
        s,
        s,
    )
    for image, _label in ui.VOLUME_PANES:
        assert ui.volume_plane(pair, "axial", d // 2, image).shape == (s, s)
        for plane in ("coronal", "sagittal"):
            for stretch in (1, 3):
                assert ui.volume_plane(pair, plane, s // 2, image, stretch=stretch).shape == (d * stretch, s)
    # the slice axis points up in the coronal and sagittal planes; the axial plane is the stack's slice
    np.testing.assert_array_equal(ui.volume_plane(pair, "coronal", 7, "aligned"), pair.aligned[:, 7, :][::-1])
    np.testing.assert_array_equal(ui.volume_plane(pair, "sagittal", 9, "synthetic"), pair.synthetic[:, :, 9][::-1])
    np.testing.assert_array_equal(ui.volume_plane(pair, "axial", 3, "difference"), pair.difference[3])
    # out-of-range positions are clipped, bad names refused
    assert ui.volume_plane(pair, "axial", 10_000).shape == (s, s)
    with pytest.raises(ValueError, match="plane"):
        ui.volume_plane(pair, "oblique", 0)
    with pytest.raises(ValueError, match="stretch"):
        ui.volume_plane(pair, "coronal", 0, stretch=0)
    assert ui.plane_caption("Synthetic", "axial", 0, d) == f"Synthetic · axial 1/{d}"
    assert ui.through_plane_stretch(d, s) == min(4, max(1, s // d))
    png = ui.render_png(ui.volume_plane(pair, "coronal", s // 2, stretch=2), size=256)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_position_drives_both_panes(entry, flagged_volume):
    """The synthetic pane and the aligned training pane at one position are the same plane of the two stacks."""
    pair, _ = ui.open_volume(entry, flagged_volume)
    for plane in ui.VOLUME_PLANES:
        for pos in (0, ui.plane_length(pair, plane) // 2):
            syn = ui.volume_plane(pair, plane, pos, "synthetic")
            al = ui.volume_plane(pair, plane, pos, "aligned")
            np.testing.assert_allclose(ui.volume_plane(pair, plane, pos, "difference"), np.abs(syn - al), atol=1e-6)


def test_volume_pairs_are_cached_per_audit(result, flagged_volume):
    e = ui.AuditEntry(result, 1.0)
    first = ui.volume_pair_of(e, flagged_volume)
    assert ui.volume_pair_of(e, flagged_volume) is first
    names = list(result.volumes()["volume"].astype(str))
    for name in names:
        ui.volume_pair_of(e, name)
    assert len(e.derived["volume_pairs"]) == min(len(names), ui.VOLUME_PAIRS_KEPT)
    assert list(e.derived["volume_pairs"])[-1] == names[-1]  # the last one looked at is kept


def test_axial_slice_evidence_is_the_score_table_row(result, entry, flagged_volume):
    pair, _ = ui.open_volume(entry, flagged_volume)
    for alpha in (0.0001, 0.01, 0.2):
        flags = result.flags(alpha, False)
        for pos in (0, len(pair.rows) // 2, len(pair.rows) - 1):
            ev = ui.axial_slice_evidence(result, pair, pos, flags)
            row = int(pair.rows[pos])
            t = result.table.iloc[row]
            assert ev["row"] == row
            assert ev["slice"] == f"{flagged_volume}#{int(pair.slice_index[pos])}"
            assert ev["similarity"] == pytest.approx(float(t["similarity"]))
            assert ev["p_value"] == pytest.approx(float(t["p_value"]))
            assert ev["flagged"] is bool(flags[row])
            assert ev["nearest_training"].startswith(str(t["nearest_train_path"]))
            assert ev["nearest_subject"] == str(t["nearest_train_subject"])
    mid = ui.axial_slice_evidence(result, pair, len(pair.rows) // 2, result.flags())
    assert mid["on_verified_volume"]  # a copy's middle slice matches the copied training volume


def test_volume_facts_are_the_table_row(result, flagged_volume):
    vols = result.volumes(0.05, False)
    facts = ui.volume_facts(vols, flagged_volume)
    row = vols[vols["volume"] == flagged_volume].iloc[0]
    assert facts["flagged"] is True and facts["verified"] is True
    for key in ("p_value", "volume_similarity", "volume_ncc", "coverage"):
        assert facts[key] == pytest.approx(float(row[key]))
    assert facts["p_calibration"] == result.calibration.volume_calibration
    assert facts["training_volume"] == row["verified_train_volume"]
    assert facts["training_subject"] == row["verified_train_subject"]
    with pytest.raises(KeyError):
        ui.volume_facts(vols, "no-such-volume")


def test_unverified_volume_and_slice_unit_audit_give_words_not_exceptions(result, flagged_volume):
    ev = result.volume_evidence.copy()
    ev.loc[ev["volume"] == flagged_volume, ["verified_train_volume", "transform"]] = ""
    unverified = ui.AuditEntry(dataclasses.replace(result, volume_evidence=ev), 1.0)
    pair, reason = ui.open_volume(unverified, flagged_volume)
    assert pair is None and "not verified in 3D" in reason and "Flagged and Pair" in reason
    pair, reason = ui.open_volume(unverified, "sub-000000000000/vol-999")
    assert pair is None and "is not a synthetic volume of this audit" in reason

    slice_unit = _slice_unit(result)
    note = ui.volume_unit_note(slice_unit)
    assert note is not None and "scored slices only" in note
    assert "--unit volume" in note and "**Unit**" in note
    pair, reason = ui.open_volume(ui.AuditEntry(slice_unit, 1.0), flagged_volume)
    assert pair is None and reason == note
    auto = dataclasses.replace(slice_unit, config=dataclasses.replace(result.config, unit="auto"))
    assert "no volumes of several slices" in ui.volume_unit_note(auto)
    paper = dataclasses.replace(slice_unit, config=dataclasses.replace(result.config, mode="paper"))
    assert "paper mode" in ui.volume_unit_note(paper)


# ---------------------------------------------------------------------------------------------- the page


@pytest.fixture
def app(result, tmp_path, monkeypatch):
    """An app session showing ``result`` (put into the app's result cache), on the Volumes page."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("INSPECTOR_REVIEWS_DB", raising=False)
    monkeypatch.setenv("INSPECTOR_AUDITS_DIR", str(tmp_path / "audits"))
    store = ui.audit_store()
    store.clear()
    store["volume-test"] = ui.AuditEntry(result, 1.0)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["active"] = "volume-test"
    at.run()
    assert not at.exception
    at.radio(key="page").set_value("Volumes").run()
    assert not at.exception, at.exception
    yield at
    store.clear()


def _captions(at, plane: str | None = None) -> list[str]:
    caps = [img.caption for el in at.get("image") for img in el.proto.imgs]
    return [c for c in caps if plane is None or f" · {plane} " in c]


def test_volumes_page_shows_the_table_and_the_open_volume(app, result):
    at = app
    vols = result.volumes(result.config.alpha, result.config.fdr)
    n_flagged = int(vols["flagged"].sum())
    assert f"{n_flagged} of {len(vols)} synthetic volumes flagged at α = 5 %" in [s.value for s in at.subheader]
    table = next(d.value for d in at.dataframe if "volume_similarity" in d.value.columns)
    assert list(table["volume"]) == list(vols["volume"])
    # the most significant volume is open, in three planes of three panes each
    assert at.session_state["vol_open"] == vols["volume"].iloc[0]
    caps = _captions(at)
    assert len(caps) == 9
    assert [c.split(" · ")[0] for c in _captions(at, "axial")] == ["Synthetic", "Training (aligned)", "Difference ×4"]
    d = int(vols["n_slices"].iloc[0])
    assert all(c.endswith(f"axial {d // 2 + 1}/{d}") for c in _captions(at, "axial"))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Volume similarity"] == f"{float(vols['volume_similarity'].iloc[0]):.4f}"
    assert metrics["Flagged at α = 5 %"] == "yes"
    assert any("Axial slice" in m.value and "nearest training slice" in m.value for m in at.markdown)


def test_one_slider_moves_both_panes_and_the_slice_evidence(app, result):
    at = app
    at.slider(key="vol_axial").set_value(3).run()
    assert not at.exception
    caps = _captions(at, "axial")
    assert caps[0].startswith("Synthetic · axial 3/") and caps[1].startswith("Training (aligned) · axial 3/")
    vol = at.session_state["vol_open"]
    evidence = next(m.value for m in at.markdown if "Axial slice" in m.value)
    pair = ui.volume_pair_of(ui.audit_store()["volume-test"], vol)
    assert "Axial slice 3/" in evidence and f"(slice index {int(pair.slice_index[2])})" in evidence
    at.slider(key="vol_coronal").set_value(10).run()
    assert all(" · coronal 10/" in c for c in _captions(at, "coronal"))
    assert all(" · axial 3/" in c for c in _captions(at, "axial"))  # the other planes stay


def test_jump_from_a_training_subject_opens_its_copy(app, result):
    at = app
    vols = result.volumes()
    index = ui.copied_subjects(vols)
    subj = list(index)[-1]
    at.selectbox(key="vol_subject").select(subj).run()
    assert at.selectbox(key="vol_jump").options == index[subj]
    target = index[subj][-1]
    at.selectbox(key="vol_jump").select(target).run()
    assert not at.exception
    assert at.session_state["vol_open"] == target
    assert at.selectbox(key="vol_pick").value == target
    d = int(vols.loc[vols["volume"] == target, "n_slices"].iloc[0])
    assert all(c.endswith(f"axial {d // 2 + 1}/{d}") for c in _captions(at, "axial"))  # a new volume: its middle


def test_a_slice_unit_audit_says_how_to_get_volumes(result, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_AUDITS_DIR", str(tmp_path / "audits"))
    store = ui.audit_store()
    store.clear()
    store["slice-test"] = ui.AuditEntry(_slice_unit(result), 1.0)
    try:
        at = AppTest.from_file(APP, default_timeout=120)
        at.session_state["active"] = "slice-test"
        at.run()
        at.radio(key="page").set_value("Volumes").run()
        assert not at.exception
        text = " ".join(i.value for i in at.info)
        assert "scored slices only" in text and "--unit volume" in text
        assert not _captions(at)
    finally:
        store.clear()


def test_frame_helpers_on_an_empty_table():
    empty = pd.DataFrame(columns=["volume", "flagged", "nearest_train_subject"])
    assert ui.copied_subjects(empty) == {}
