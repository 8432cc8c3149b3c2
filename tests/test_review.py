"""Reviewer decisions persist, are validated, and keep their history."""

from __future__ import annotations

import pandas as pd
import pytest

from inspector.review import DECISIONS, ReviewError, ReviewStore


def test_record_and_reload_from_a_new_store(tmp_path):
    db = tmp_path / "audit" / "reviews.sqlite3"
    store = ReviewStore(db)
    r = store.record("audit1", "abc", "copy", "Dr Who", "same anatomy", slice_key="gen_0001.png#0")
    assert r.decision == "copy" and r.id >= 1
    again = ReviewStore(db)  # a restart: a new connection on the same file
    latest = again.latest("audit1")
    assert list(latest) == ["abc"]
    assert latest["abc"].comment == "same anatomy" and latest["abc"].slice_key == "gen_0001.png#0"
    assert again.latest("other") == {}


def test_latest_decision_wins_and_history_is_kept(tmp_path):
    store = ReviewStore(tmp_path / "r.db")
    store.record("a", "h1", "unsure", "alice")
    store.record("a", "h1", "not a copy", "bob", "checked neighbours")
    assert store.latest("a")["h1"].decision == "not a copy"
    assert [r.decision for r in store.history("a", "h1")] == ["unsure", "not a copy"]
    assert store.progress("a", ["h1", "h2", "h1"]) == (1, 2)
    df = store.to_frame("a")
    assert len(df) == 1 and df.loc[0, "reviewer"] == "bob"


@pytest.mark.parametrize(
    ("decision", "reviewer", "match"),
    [("maybe", "alice", "not one of"), ("copy", "  ", "reviewer"), ("copy", "", "reviewer")],
)
def test_invalid_inputs(tmp_path, decision, reviewer, match):
    store = ReviewStore(tmp_path / "r.db")
    with pytest.raises(ReviewError, match=match):
        store.record("a", "h", decision, reviewer)
    assert store.latest("a") == {}


def test_not_a_database(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReviewError, match="not a usable review database"):
        ReviewStore(bad)


def test_all_decisions_accepted(tmp_path):
    store = ReviewStore(tmp_path / "r.db")
    for i, d in enumerate(DECISIONS):
        store.record("a", f"h{i}", d, "rev")
    assert {r.decision for r in store.latest("a").values()} == set(DECISIONS)


def test_volumes_and_roc_are_memoised_per_setting_and_follow_a_new_table(audit_cohorts, tmp_path):
    """AuditResult.volumes / roc compute once per setting; a caller editing the returned copy changes nothing;
    a replaced table is recomputed (the memo never serves another table's numbers)."""
    from inspector.attribution import volumes_table
    from inspector.config import AuditConfig
    from inspector.pipeline import audit

    p = audit_cohorts
    r = audit(p["train"], p["synthetic"], p["holdout"], AuditConfig(extractor="pixels"), cache_dir=tmp_path)
    a = r.volumes(0.05, True)
    a["flagged"] = True  # the caller's copy
    b = r.volumes(0.05, True)
    pd.testing.assert_frame_equal(b, volumes_table(r.table, r.calibration, 0.05, True, evidence=r.volume_evidence))
    roc = r.roc()
    assert roc is not None and r.roc() is not roc and r.roc()["auc"] == roc["auc"]
    t2 = r.table.copy()
    t2["label"] = t2["label"].where(t2["label"] != "copy", "novel")
    t2.loc[t2.index[0], "label"] = "copy"
    r.table = t2
    fresh = r._roc("similarity")
    assert fresh["auc"] != roc["auc"]  # the new labels give another curve ...
    assert r.roc()["auc"] == fresh["auc"]  # ... and the memo serves it, not the old table's
