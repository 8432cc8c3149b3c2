"""The Streamlit app, driven headless with ``streamlit.testing.v1.AppTest`` on the sample data.

One audit (extractor ``pixels``, default mode) is run through the app once per module; the other
app tests reuse it through the app's result cache, which is itself under test (a second Run must be
near-instant). The display helpers of :mod:`inspector.ui` are unit-tested at the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from inspector import ui
from inspector.review import DECISIONS, Review, ReviewStore

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
SAMPLE = ROOT / "sample_data"
TIMEOUT = 600  # seconds for one script run (a cold audit on a busy 2-core machine)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private reviews DB and embedding cache for every app run of this module."""
    d = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("INSPECTOR_REVIEWS_DB", raising=False)  # the default: each audit folder's reviews.sqlite3
        mp.setenv("INSPECTOR_AUDITS_DIR", str(d / "audits"))
        mp.setenv("INSPECTOR_CACHE_DIR", str(d / "cache"))
        ui.audit_store().clear()
        yield SimpleNamespace(dir=d, db=None)  # db: set once the audit (and so its folder) is known
        ui.audit_store().clear()


def fresh_app() -> AppTest:
    """A new app session (what a browser reload or a server restart gives), run once."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def click_run(at: AppTest, extractor: str = "pixels", **paths: str) -> float:
    for name, value in paths.items():
        at.text_input(key=f"in_{name}").set_value(value)
    at.selectbox(key="in_extractor").select(extractor)
    t0 = time.perf_counter()
    at.button(key="run").click().run()
    return time.perf_counter() - t0


def verdict_of(at: AppTest) -> str:
    boxes = [e.value for e in (*at.error, *at.warning, *at.success) if "Verdict." in str(e.value)]
    assert len(boxes) == 1, f"expected one verdict box, found {boxes}"
    return boxes[0]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; metrics: {[m.label for m in at.metric]}"
    return found[0]


def go(at: AppTest, page: str) -> AppTest:
    at.radio(key="page").set_value(page).run()
    assert not at.exception
    return at


def frame_with(at: AppTest, column: str) -> pd.DataFrame:
    found = [d.value for d in at.dataframe if column in d.value.columns]
    assert found, f"no table with a {column!r} column"
    return found[0]


def captions(at: AppTest) -> list[str]:
    return [img.caption for el in at.get("image") for img in el.proto.imgs]


@pytest.fixture(scope="module")
def ran(env):
    at = fresh_app()
    assert "Run audit" in [b.label for b in at.button]
    seconds = click_run(at)
    assert not at.exception, at.exception
    assert not at.error or all("Verdict." in e.value for e in at.error), [e.value for e in at.error]
    key = at.session_state["active"]
    entry = ui.audit_store()[key]
    env.db = env.dir / "audits" / f"audit_{entry.result.audit_id[:12]}" / "reviews.sqlite3"
    assert ui.reviews_db_for(entry.result.audit_id) == env.db
    return SimpleNamespace(at=at, key=key, entry=entry, result=entry.result, seconds=seconds, env=env)


# ------------------------------------------------------------------------------------------------ overview


def test_run_on_sample_data_shows_the_verdict_and_figures(ran):
    at, r = ran.at, ran.result
    assert r.config.extractor == "pixels" and r.config.mode == "default" and r.config.alpha == 0.01
    n_png = len(list((SAMPLE / "synthetic").glob("*.png")))
    assert len(r.table) == n_png > 0
    k = int((r.table["p_value"].to_numpy() <= 0.01).sum())
    assert verdict_of(at) == f"**Verdict.** {r.calibration.verdict(0.01).text}"
    assert f"{k} of {n_png} synthetic slices" in verdict_of(at) or (k == 0 and "None of" in verdict_of(at))
    assert metric(at, "Flagged at α = 1 %") == f"{k} / {n_png}"
    assert metric(at, "Mann–Whitney AUC") == f"{r.verdict.mann_whitney_auc:.3f}"
    assert metric(at, "Mean ONI (paper)") == f"{r.verdict.mean_oni:.3f}"
    assert metric(at, "CT-score (Meehan)") == f"{r.baselines['ct_score']:.2f}"
    assert metric(at, "AuthPct (Alaa)") == f"{r.baselines['auth_pct']:.1f} %"
    rule = "memorised" if r.verdict.mean_oni < 0.68 else "not memorised"
    assert any(f"ONI < 0.68 → {rule}" in c.value for c in at.caption)
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # histogram + ROC (sample_data/synthetic has labels.csv)
    hist = json.loads(charts[0].proto.spec)
    xs = [s["x0"] for s in hist["layout"]["shapes"]]
    assert xs == pytest.approx([r.calibration.threshold(0.01)])
    names = " ".join(t["name"] for t in hist["data"])
    assert f"n={len(r.null_similarity)}" in names and f"flagged (n={k})" in names
    roc = json.loads(charts[1].proto.spec)
    conf = r.confusion_at(0.01)
    point = [t for t in roc["data"] if t["mode"] == "markers"][0]
    assert point["x"][0] == pytest.approx(conf["fp"] / (conf["fp"] + conf["tn"]))
    assert point["y"][0] == pytest.approx(conf["tp"] / (conf["tp"] + conf["fn"]))
    assert any(f"| copy | {conf['tp']} | {conf['fn']} |" in m.value for m in at.markdown)


def test_a_second_run_on_the_same_inputs_is_served_from_the_cache(ran):
    at = ran.at
    seconds = click_run(at)
    assert not at.exception
    assert at.session_state["active"] == ran.key
    assert ui.audit_store()[ran.key] is ran.entry
    assert seconds < max(5.0, ran.seconds / 5), (seconds, ran.seconds)
    assert verdict_of(at) == f"**Verdict.** {ran.result.calibration.verdict(0.01).text}"


def test_moving_the_threshold_updates_counts_and_list_without_recomputing(ran):
    at, r = ran.at, ran.result
    timings = dict(r.timings)
    p = r.table["p_value"].to_numpy()
    counts = {}
    for alpha in (0.005, 0.1):
        go(at, "Overview")
        t0 = time.perf_counter()
        at.select_slider(key="view_alpha").set_value(alpha).run()
        took = time.perf_counter() - t0
        assert not at.exception
        assert took < 10, took
        k = int((p <= alpha).sum())
        counts[alpha] = k
        assert metric(at, f"Flagged at α = {ui.format_alpha(alpha)}") == f"{k} / {len(p)}"
        assert verdict_of(at) == f"**Verdict.** {r.calibration.verdict(alpha).text}"
        go(at, "Flagged")
        if k:
            assert len(frame_with(at, "similarity")) == k
        assert at.subheader[0].value.startswith(f"{k} flagged synthetic slices")
    assert counts[0.1] > counts[0.005], counts  # the control really changes the flags
    assert ui.audit_store()[ran.key] is ran.entry and r.timings == timings  # nothing recomputed
    at.select_slider(key="view_alpha").set_value(0.01).run()


def test_the_bh_toggle_changes_every_page_to_the_calibrations_count(ran):
    """BH is a post-processing of p-values: instant, and every page shows the Calibration's count."""
    at, r = ran.at, ran.result
    timings = dict(r.timings)
    for alpha in (0.01, 0.1):
        at.select_slider(key="view_alpha").set_value(alpha).run()
        at.toggle(key="view_fdr").set_value(True).run()
        assert not at.exception
        k = int(r.calibration.flags(alpha, True).sum())
        assert k == int(r.flags(alpha, fdr=True).sum()) <= int(r.flags(alpha, fdr=False).sum())
        go(at, "Overview")
        assert metric(at, f"Flagged at BH at {ui.format_alpha(alpha)}") == f"{k} / {len(r.table)}"
        assert verdict_of(at) == f"**Verdict.** {r.calibration.verdict(alpha, True).text}"
        go(at, "Flagged")
        assert at.subheader[0].value.startswith(f"{k} flagged synthetic slices at Benjamini–Hochberg")
        go(at, "Review")
        assert f"{k} at α" in " ".join(str(p.proto) for p in at.get("progress")) or k == 0
        at.toggle(key="view_fdr").set_value(False).run()
    assert ui.audit_store()[ran.key] is ran.entry and r.timings == timings  # nothing recomputed
    at.select_slider(key="view_alpha").set_value(0.01).run()
    go(at, "Overview")


# ------------------------------------------------------------------------------------------------ pair view


def test_opening_a_pair_shows_every_layer_and_neighbour(ran):
    at, r = ran.at, ran.result
    go(at, "Flagged")
    table = frame_with(at, "similarity")
    assert table["similarity"].is_monotonic_decreasing
    top = table.iloc[0]
    t0 = time.perf_counter()
    at.button(key="open_pair").click().run()
    took = time.perf_counter() - t0
    assert not at.exception
    assert took < 15, took
    assert at.session_state["page"] == "Pair"
    i = int(at.session_state["pair_index"])
    assert f"{r.table.loc[i, 'synthetic_path']}#{int(r.table.loc[i, 'slice_index'])}" == top["synthetic"]
    ev = r.pair(i)
    grid = [c for c in captions(at) if c.startswith("#")]
    assert len(r.layers) >= 1
    assert len(grid) == len(r.layers) * r.config.top_k == sum(len(v) for v in ev.layers.values())
    for layer in r.layers:
        for j in range(r.config.top_k):
            want = f"#{j + 1} · sim {r.neighbour_sims[layer][i, j]:.4f} · "
            assert sum(c.startswith(want) for c in grid) >= 1, (layer, j, want)
    caps = captions(at)
    assert any(c.startswith("synthetic · ") for c in caps)
    assert any(c.startswith("aligned training · ") for c in caps)
    assert any(c.startswith("|synthetic − aligned|") for c in caps)
    assert any(c.startswith("before/after: ") for c in caps)
    assert metric(at, "Similarity") == f"{r.table.loc[i, 'similarity']:.4f}"
    assert metric(at, "Layer consensus") == f"{int(r.table.loc[i, 'layer_consensus'])}/{len(r.layers)}"
    subj = r.table.loc[i, "nearest_train_subject"]
    scroll = [s for s in at.slider if s.key and s.key.startswith("scroll_")]
    assert len(scroll) == 1 and scroll[0].max == len(r.subject_slices(subj))
    n = len(r.subject_slices(subj))
    scroll[0].set_value(1).run()  # scroll to the subject's first slice: it and its two successors
    assert not at.exception
    strip = [c for c in captions(at) if c.startswith("slice ")]
    assert [c.split(" (")[0] for c in strip] == [f"slice {p}/{n}" for p in range(1, min(n, 3) + 1)]
    assert "selected" in strip[0] and "selected" not in "".join(strip[1:])
    at.slider(key="win_low").set_value(0.2).run()
    at.slider(key="win_high").set_value(0.1).run()  # an inverted window is explained, not raised
    assert not at.exception
    assert any("window needs high > low" in w.value for w in at.warning)
    at.slider(key="win_high").set_value(1.0).run()
    at.slider(key="win_low").set_value(0.0).run()


def test_a_decision_is_stored_and_found_again_in_a_fresh_session(ran):
    at, r = ran.at, ran.result
    go(at, "Pair")
    i = int(at.session_state["pair_index"])
    sha = str(r.table.loc[i, "sha256"])
    at.radio(key=f"dec_{sha[:16]}").set_value("near copy")
    at.text_input(key=f"com_{sha[:16]}").input("same sulci, slightly rotated")
    at.text_input(key="reviewer_name").input("Dr Test")
    at.button(key="save_decision").click().run()
    assert not at.exception
    assert any(s.value.startswith("Saved: **near copy** by Dr Test") for s in at.success)
    # on disk before the UI confirmed, keyed by the audit and the slice's content hash
    stored = ReviewStore(ran.env.db).latest(r.audit_id)
    assert stored[sha].decision == "near copy" and stored[sha].comment == "same sulci, slightly rotated"
    assert stored[sha].slice_key == f"{r.table.loc[i, 'synthetic_path']}#{int(r.table.loc[i, 'slice_index'])}"

    again = fresh_app()
    click_run(again)  # same inputs: the cached audit
    assert again.session_state["active"] == ran.key
    again.session_state["pair_index"] = i
    go(again, "Pair")
    assert metric(again, "Decision") == "near copy"
    go(again, "Review")
    n_flagged = int(r.flags(0.01).sum())
    assert again.subheader[0].value == f"Review progress: 1 of {n_flagged} flagged pairs decided"
    subjects = frame_with(again, "flagged_now")
    row = subjects[subjects["subject_id"] == r.table.loc[i, "nearest_train_subject"]].iloc[0]
    assert row["near copy"] == 1 and row["reviewed"] == 1
    assert set(DECISIONS) <= set(subjects.columns)
    decisions = frame_with(again, "slice_key")
    assert list(decisions["decision"]) == ["near copy"] and list(decisions["reviewer"]) == ["Dr Test"]


def test_export_offers_the_scores_and_writes_the_release_report(ran):
    from inspector.report import verify_report

    at, r = ran.at, ran.result
    go(at, "Export")
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Download scores.csv (with decisions)", "Download subjects.csv"]
    assert any("Verdict." in str(e.value) for e in (*at.error, *at.warning, *at.success))  # the verdict is shown
    at.button(key="build_report").click().run()
    errors = [e.value for e in at.error if "Verdict." not in str(e.value)]
    assert not at.exception and not errors, errors
    html = Path(at.session_state["report_path"])
    assert html.parent == ran.env.db.parent  # the audit folder holds the app's reviews: one database
    assert "do not release" not in str(at.selectbox(key="so_decision").value)  # nothing pre-selected
    assert at.selectbox(key="so_decision").value is None
    assert html.is_file() and verify_report(html)
    saved = pd.read_csv(html.parent / "scores.csv")
    assert len(saved) == len(r.table)
    assert "Download report.html" in [b.label for b in at.get("download_button")]


def test_an_unreachable_setting_says_so_and_refuses_a_release_without_a_reason(ran):
    """alpha below 1/(1 + n_null): the screen says nothing can be flagged and a release needs a reason."""
    at, r = ran.at, ran.result
    alpha = max(a for a in ui.ALPHAS if not r.calibration.reachable(a))
    at.select_slider(key="view_alpha").set_value(alpha).run()
    go(at, "Overview")
    assert "Nothing can be flagged at α =" in verdict_of(at)
    assert not any("Verdict." in str(s.value) for s in at.success)  # never green
    go(at, "Export")
    text = " ".join(str(m.value) for m in at.markdown)
    assert "❌ **the setting can flag a copy" in text and "no slice can be flagged" in text
    assert any("is refused without a stated reason" in w.value for w in at.warning)
    assert at.selectbox(key="so_decision").value is None
    at.checkbox(key="so_enable").check()
    at.text_input(key="so_signer").input("Ada Officer")
    at.button(key="build_report").click().run()
    assert any("Choose a release decision first" in e.value for e in at.error)
    at.selectbox(key="so_decision").select("release")
    at.button(key="build_report").click().run()
    errors = [e.value for e in at.error]
    assert any("refused without a reason" in e and "the setting can flag a copy" in e for e in errors), errors
    assert ReviewStore(ran.env.db).signoffs(r.audit_id) == []
    at.text_input(key="so_reason").input("pilot release, holdout too small")
    at.button(key="build_report").click().run()
    assert not [e.value for e in at.error if "Verdict." not in str(e.value)]
    html = Path(at.session_state["report_path"]).read_text(encoding="utf-8")
    assert "This setting cannot flag a copy." in html and "pilot release, holdout too small" in html
    assert [s.decision for s in ReviewStore(ran.env.db).signoffs(r.audit_id)] == ["release"]
    at.checkbox(key="so_enable").uncheck()
    at.select_slider(key="view_alpha").set_value(0.01).run()


def test_the_review_queue_saves_and_moves_on_in_ranking_order_blind(ran):
    at, r = ran.at, ran.result
    at.select_slider(key="view_alpha").set_value(0.05).run()
    order = ui.review_order(r.table, r.flags(0.05))
    assert len(order) >= 2
    sims = r.table["similarity"].to_numpy()[order]
    assert (np.diff(sims) <= 0).all()  # most significant (most similar) first
    go(at, "Review")
    first = at.session_state["review_row"]
    assert first in order
    pos = order.index(first)
    assert any(s.value.startswith(f"Pair {pos + 1} of {len(order)}") for s in at.subheader)
    assert "ground truth" not in " ".join(str(m.value) for m in at.markdown)  # blind by default
    at.text_input(key="reviewer_name").input("Dr Queue")
    at.text_input(key="rq_comment").input("identical anatomy")
    at.button(key="rq_copy").click().run()
    assert not at.exception
    saved = ReviewStore(ran.env.db).latest(r.audit_id)[str(r.table.loc[first, "sha256"])]
    assert saved.decision == "copy" and saved.reviewer == "Dr Queue" and saved.comment == "identical anatomy"
    if pos + 1 < len(order):
        assert at.session_state["review_row"] == order[pos + 1]
        assert any(s.value.startswith("Saved: **copy** by Dr Queue") for s in at.success)
        at.button(key="rq_prev").click().run()
        assert at.session_state["review_row"] == first
    # the researcher's toggle reveals the labels on the review and flagged pages
    at.toggle(key="show_truth").set_value(True).run()
    assert "ground truth" in " ".join(str(m.value) for m in at.markdown)
    go(at, "Flagged")
    assert "truth" in frame_with(at, "similarity").columns
    at.toggle(key="show_truth").set_value(False).run()
    assert "truth" not in frame_with(at, "similarity").columns
    at.select_slider(key="view_alpha").set_value(0.01).run()


def _visible_text(at: AppTest) -> str:
    """Everything a page shows as text: messages, captions, tables, image captions, choices, metrics."""
    parts = [str(e.value) for e in (*at.markdown, *at.caption, *at.error, *at.warning, *at.success, *at.info)]
    parts += [str(s.value) for s in (*at.subheader, *at.title)]
    for d in at.dataframe:
        parts += [" ".join(map(str, d.value.to_numpy().ravel())), " ".join(map(str, d.value.columns))]
    parts += captions(at)
    parts += [str(o) for sb in at.selectbox for o in sb.options]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(map(str, parts))


def test_every_page_shows_pseudonymous_labels_not_file_names_by_default(ran):
    """Issue 14 item 4: without 'Show real file and folder names' (off by default, also for the sample data) no
    page names a file or folder of the inputs; slices are <subject pseudonym>/vol-<n> and subjects pseudonyms."""
    import re

    at, r = ran.at, ran.result
    assert r.config.show_paths is False and at.checkbox(key="in_show_paths").value is False
    label = re.compile(r"sub-[0-9a-f]{12}/vol-\d{3,}")
    assert all(label.fullmatch(p) for p in r.table["synthetic_path"])
    names = {p.name for p in SAMPLE.rglob("*") if p.parent != SAMPLE and p.name != "labels.csv"}
    names |= {Path(n).stem for n in names if "." in n}
    assert "syn_000.png" in names and "mni152-t1" in names  # the sample data's own names, planted or not
    for page in ("Overview", "Flagged", "Pair", "Review", "Research"):
        go(at, page)
        text = _visible_text(at)
        found = sorted(n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text))
        assert not found, f"{page} shows {found[:5]}"
        if page in ("Flagged", "Pair"):  # where a file name would be shown, the label is
            assert label.search(text), page
        if page == "Flagged":
            assert all(label.fullmatch(k.split("#")[0]) for k in frame_with(at, "similarity")["synthetic"])
        if page == "Pair":
            assert any(c.startswith("synthetic · sub-") and label.search(c) for c in captions(at))


# ------------------------------------------------------------------------------------------------ errors


def test_a_missing_folder_gives_a_message_not_a_traceback(env, tmp_path):
    at = fresh_app()
    click_run(at, train=str(tmp_path / "no_such_folder"))
    assert not at.exception
    assert len(at.error) == 1
    msg = at.error[0].value
    assert "does not exist" in msg and "no_such_folder" in msg
    assert not at.metric  # no stale result is shown beside the error


def test_unreadable_files_are_listed_with_their_reason(env, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "broken.png").write_bytes(b"not a png at all")
    (junk / "broken.nii.gz").write_bytes(b"\x00" * 64)
    at = fresh_app()
    click_run(at, train=str(junk))
    assert not at.exception
    assert len(at.error) == 1 and "No readable images" in at.error[0].value
    skipped = frame_with(at, "reason")
    assert set(skipped["file"]) >= {"broken.png", "broken.nii.gz"}
    assert skipped["reason"].str.len().min() > 0


def test_an_unexpected_library_error_is_a_message(env, monkeypatch):
    import inspector.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("the index exploded")

    monkeypatch.setattr(inspector.pipeline, "audit", boom)
    at = fresh_app()
    click_run(at, train=str(SAMPLE / "train"), synthetic=str(SAMPLE / "synthetic"), holdout="")
    assert not at.exception
    assert len(at.error) == 1 and "the index exploded" in at.error[0].value


# ------------------------------------------------------------------------------------------------ ui helpers


def test_resolve_input_tries_each_base_and_names_them(tmp_path):
    (tmp_path / "b" / "cohort").mkdir(parents=True)
    got = ui.resolve_input("cohort", what="training cohort", bases=[tmp_path / "a", tmp_path / "b"])
    assert got == (tmp_path / "b" / "cohort").absolute()
    assert ui.resolve_input(str(tmp_path / "b"), what="x") == tmp_path / "b"
    with pytest.raises(ui.InputPathError, match=r"training cohort.*missing.*a/missing.*b/missing"):
        ui.resolve_input("missing", what="training cohort", bases=[tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ui.InputPathError, match="No synthetic set given"):
        ui.resolve_input("  ", what="synthetic set")


def test_input_signature_follows_file_changes(tmp_path):
    d = tmp_path / "cohort"
    (d / "s1").mkdir(parents=True)
    f = d / "s1" / "a.png"
    f.write_bytes(b"1234")
    s0 = ui.input_signature(d)
    assert ui.input_signature(d) == s0
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    s1 = ui.input_signature(d)
    assert s1 != s0
    (d / "s1" / "b.png").write_bytes(b"x")
    assert ui.input_signature(d) != s1
    # a manifest covers the files it lists, wherever they are
    other = tmp_path / "elsewhere.png"
    other.write_bytes(b"abc")
    man = tmp_path / "m.csv"
    man.write_text(f"path,subject_id\n{other},s1\n")
    m0 = ui.input_signature(man)
    other.write_bytes(b"abcd")
    assert ui.input_signature(man) != m0


def test_window_and_render_use_the_float_intensities():
    rng = np.random.default_rng(0)
    arr = rng.random((8, 6)).astype(np.float32)
    u8 = ui.window_to_uint8(arr, 0.25, 0.75)
    want = np.round(np.clip((arr.astype(np.float64) - 0.25) / 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(u8, want)
    with pytest.raises(ValueError, match="high > low"):
        ui.window_to_uint8(arr, 0.5, 0.5)
    png = ui.render_png(arr, low=0.25, high=0.75, size=48, resample="nearest")
    im = np.asarray(Image.open(io.BytesIO(png)))
    assert im.shape == (48, 36)  # aspect kept, long side = size
    np.testing.assert_array_equal(im, np.kron(want, np.ones((6, 6), np.uint8)))  # nearest = blocks
    smooth = np.asarray(Image.open(io.BytesIO(ui.render_png(arr, size=48, resample="bilinear"))))
    assert smooth.shape == (48, 36) and len(np.unique(smooth)) > len(np.unique(arr))
    diff = np.asarray(Image.open(io.BytesIO(ui.render_png(np.zeros((4, 4)), size=8, colour_difference=True))))
    assert diff.shape == (8, 8, 3) and (diff == ui._LUT[0]).all()
    with pytest.raises(ValueError, match="resample"):
        ui.render_png(arr, resample="cubic")


def test_blend_flip_and_operating_point():
    a, b = np.zeros((2, 3)), np.ones((2, 3))
    np.testing.assert_allclose(ui.blend(a, b, 0.25), np.full((2, 3), 0.25))
    np.testing.assert_allclose(ui.blend(a, b, 2.0), b)
    with pytest.raises(ValueError, match="one shape"):
        ui.blend(a, np.ones((3, 2)), 0.5)
    assert ui.operating_point({"tp": 3, "fp": 1, "fn": 1, "tn": 9}) == pytest.approx((0.1, 0.75))
    assert ui.operating_point({"tp": 0, "fp": 0, "fn": 0, "tn": 0}) == (0.0, 0.0)


def test_progress_throttle_renders_new_stages_and_last_steps():
    seen = []
    clock = iter([0.0, 0.01, 0.02, 0.5, 0.51, 0.52])
    thr = ui.ProgressThrottle(lambda label, frac, text: seen.append((label, frac, text)), min_interval=0.1)
    import inspector.ui as mod

    real = mod.time.perf_counter
    mod.time.perf_counter = lambda: next(clock)
    try:
        thr("loading:train", 0, 4)  # new stage: shown
        thr("loading:train", 1, 4)  # too soon: skipped
        thr("loading:train", 2, 4)  # too soon: skipped
        thr("loading:train", 3, 4)  # interval passed: shown
        thr("loading:train", 4, 4)  # last step: shown
        thr("extracting:hflip", 0, 0)  # new stage without a total
    finally:
        mod.time.perf_counter = real
    assert [s[2] for s in seen] == [
        "Loading (train): 0 / 4",
        "Loading (train): 3 / 4",
        "Loading (train): 4 / 4",
        "Extracting features (hflip)",
    ]
    assert [s[1] for s in seen] == [0.0, 0.75, 1.0, 1.0]
    assert thr.stages == ["loading:train", "extracting:hflip"]
    assert ui.stage_label("something_new") == "something new"
    assert ui.parse_layers("block3, block7 block3") == ("block3", "block7")
    assert ui.format_p(0.00001) == "< 0.0001" and ui.format_p(0.0123) == "0.0123"


def test_ranking_columns_rank_where_the_p_value_is_at_its_floor():
    # three copies beyond the null: the same floor p-value, MI shown as 1.000, but distinct similarities
    t = _tiny_table().assign(p_value=[0.009, 0.009, 0.009], similarity=[0.95, 0.999, 0.97])
    t["mi"] = 1 - np.array([1e-4, 1e-9, 1e-6])
    f = ui.flagged_frame(t, np.ones(3, bool), {}, 3)
    assert list(f.index) == [1, 2, 0] and list(f["rank"]) == [1, 2, 3]
    assert f["mi_tail"].is_monotonic_decreasing and f["mi_tail"].round(6).tolist() == [9.0, 6.0, 4.0]
    assert ui.mi_tail(np.array([1.0]))[0] == ui.MI_TAIL_MAX
    uri = ui.thumbnail_uri(np.random.default_rng(0).random((40, 30)), size=20)
    assert uri.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert im.size == (15, 20)


def _tiny_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "synthetic_path": ["g0.png", "g1.png", "g2.png"],
            "slice_index": [0, 0, 0],
            "similarity": [0.99, 0.5, 0.97],
            "p_value": [0.01, 0.6, 0.02],
            "mi": [0.99, 0.4, 0.98],
            "layer_consensus": [3, 1, 2],
            "nearest_train_subject": ["s1", "s2", "s1"],
            "nearest_train_slice": [4, 0, 5],
            "nearest_train_index": [4, 0, 5],
            "margin": [0.3, 0.0, 0.1],
            "sha256": ["h0", "h1", "h2"],
            "flagged": [1, 0, 1],
            "label": ["copy", "novel", None],
        }
    )


def _review(sha: str, decision: str) -> Review:
    return Review(1, "aid", sha, f"{sha}.png#0", decision, "c", "rev", "2026-01-01T00:00:00Z")


def test_tables_for_the_flagged_list_export_and_subjects():
    t = _tiny_table()
    flags = np.array([True, False, True])
    latest = {"h2": _review("h2", "copy")}
    f = ui.flagged_frame(t, flags, latest, 3, train_labels=lambda i: f"pos{i}")
    assert list(f.index) == [0, 2] and list(f["synthetic"]) == ["g0.png#0", "g2.png#0"]
    assert list(f["consensus"]) == ["3/3", "2/3"] and list(f["decision"]) == ["", "copy"]
    assert list(f["matched_slice"]) == ["pos4", "pos5"] and list(f["truth"]) == ["copy", ""]
    assert "flagged" not in f
    assert list(f["rank"]) == [1, 2] and f["mi_tail"].round(3).tolist() == [2.0, round(-np.log10(0.02), 3)]
    every = ui.flagged_frame(t, flags, latest, 3, include_all=True)
    assert list(every["flagged"]) == [True, True, False] and list(every["matched_slice"]) == [4, 5, 0]
    assert list(every.index) == [0, 2, 1] and list(every["rank"]) == [1, 2, 3]

    reviews = pd.DataFrame([vars(_review("h2", "copy")) | {"id": 1}])
    out = ui.scores_with_decisions(t, reviews)
    assert list(out["decision"]) == ["", "", "copy"] and list(out["reviewer"]) == ["", "", "rev"]
    assert list(out.columns[: len(t.columns)]) == list(t.columns)
    empty = ui.scores_with_decisions(t, pd.DataFrame(columns=["slice_sha256"]))
    assert (empty["decision"] == "").all()

    subjects = pd.DataFrame(
        {
            "subject_id": ["s2", "s1"],
            "n_train_slices": [3, 6],
            "n_synthetic_matched": [1, 2],
            "max_similarity": [0.5, 0.99],
        }
    )
    s = ui.subject_review_frame(subjects, t, flags, latest, DECISIONS)
    assert list(s["subject_id"]) == ["s1", "s2"]
    assert s.iloc[0][["flagged_now", "reviewed", "copy", "near copy"]].tolist() == [2, 1, 1, 0]
    assert s.iloc[1][["flagged_now", "reviewed"]].tolist() == [0, 0]


def test_histogram_draws_the_threshold_and_the_log_view():
    rng = np.random.default_rng(1)
    syn, null = rng.uniform(0.5, 1.0, 30), rng.uniform(0.4, 0.95, 50)
    fig = ui.histogram_figure(syn, null, 0.9, alpha=0.01, flagged=syn > 0.9)
    assert [s.x0 for s in fig.layout.shapes] == [0.9]
    assert len(fig.data) == 3
    log = ui.histogram_figure(syn, null, 0.9, alpha=0.01, log_gap=True)
    assert log.layout.shapes[0].x0 == pytest.approx(-1.0)
    assert log.layout.xaxis.autorange == "reversed"
    none = ui.histogram_figure(syn, null, float("inf"))
    assert len(none.layout.shapes) == 0


# ------------------------------------------------------------------------------------------------ issue 14


def test_item6_a_held_write_lock_shows_a_message_and_a_retry_and_loses_no_decision(ran, monkeypatch):
    """Another writer holds the reviews database's lock: the decision is not lost, not reported saved, and a
    Retry saves it once the lock is released (issue 14, item 6)."""
    import sqlite3

    import inspector.review as review

    monkeypatch.setattr(review, "DEFAULT_TIMEOUT_S", 0.3)
    at, r = ran.at, ran.result
    go(at, "Pair")
    i = int(at.session_state["pair_index"])
    sha = str(r.table.loc[i, "sha256"])
    before = len(ReviewStore(ran.env.db).history(r.audit_id, sha))
    holder = sqlite3.connect(ran.env.db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        at.radio(key=f"dec_{sha[:16]}").set_value("copy")
        at.text_input(key="reviewer_name").input("Dr Lock")
        at.button(key="save_decision").click().run()
        assert not at.exception
        errors = [e.value for e in at.error]
        assert any("Not saved yet: **copy** by Dr Lock" in e and "is busy" in e for e in errors), errors
        assert not any("OperationalError" in e for e in errors)
        assert not any(s.value.startswith("Saved:") for s in at.success)
        go(at, "Pair")  # any rerun: the decision waits, with its Retry
        assert any("Not saved yet: **copy**" in e.value for e in at.error)
        at.button(key=f"retry_{sha[:16]}").click().run()  # still locked: still waiting
        assert any("Not saved yet: **copy**" in e.value for e in at.error)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(ReviewStore(ran.env.db).history(r.audit_id, sha)) == before
    at.button(key=f"retry_{sha[:16]}").click().run()
    assert not at.exception
    assert any(s.value.startswith("Saved: **copy** by Dr Lock") for s in at.success)
    assert not any("Not saved yet" in e.value for e in at.error)
    hist = ReviewStore(ran.env.db).history(r.audit_id, sha)
    assert len(hist) == before + 1 and hist[-1].decision == "copy" and hist[-1].reviewer == "Dr Lock"


def test_item1_skipped_training_files_are_named_in_the_app_with_the_allow_setting(env, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(SAMPLE / "train", train)
    first = next(p for p in sorted(train.rglob("*")) if p.is_file())
    (first.parent / "broken.png").write_bytes(b"not a png")
    at = fresh_app()
    assert at.checkbox(key="in_allow_skipped").value is False
    click_run(at, train=str(train), synthetic=str(SAMPLE / "synthetic"), holdout=str(SAMPLE / "holdout"))
    assert not at.exception
    assert len(at.error) == 1 and "1 training file was skipped: missing evidence" in at.error[0].value
    skipped = frame_with(at, "reason")
    assert list(skipped["cohort"]) == ["train"] and skipped["file"].iloc[0].endswith("broken.png")
    assert not at.metric
    at.checkbox(key="in_allow_skipped").check()
    at.button(key="run").click().run()
    assert not at.exception and at.metric
    assert any("**Missing evidence.** 1 training file was skipped: missing evidence" in w.value for w in at.warning)
    assert "1 training file was skipped: missing evidence" in verdict_of(at)


# ------------------------------------------------------------------------------------------------ research


def test_histogram_normalises_each_set_once_or_counts_on_a_log_axis():
    rng = np.random.default_rng(1)
    syn = np.r_[rng.normal(0.5, 0.05, 58), np.full(19, 0.99)]
    null = rng.normal(0.5, 0.05, 110)
    flags = np.r_[np.zeros(58, bool), np.ones(19, bool)]
    fig = ui.histogram_figure(syn, null, 0.7, flagged=flags, alpha=0.01)
    bars = [t for t in fig.data if t.type == "bar"]
    width = float(bars[0].width)
    # flagged + not flagged share the synthetic set's area 1: 19 of 77 slices cover a quarter of it, not a whole
    areas = [float(np.nansum(b.y)) * width for b in bars]
    assert sum(areas) == pytest.approx(1.0) and areas[1] == pytest.approx(19 / 77)
    line = next(t for t in fig.data if t.type == "scatter")
    assert float(np.nansum(line.y)) * width == pytest.approx(1.0)
    assert fig.layout.barmode == "stack"
    counts = ui.histogram_figure(syn, null, 0.7, flagged=flags, scale="log counts")
    assert counts.layout.yaxis.type == "log"
    assert float(np.nansum([t for t in counts.data if t.type == "bar"][1].y)) == 19
    with pytest.raises(ValueError, match="scale must be one of"):
        ui.histogram_figure(syn, null, 0.7, scale="percent")


def test_layer_summary_and_the_paper_against_ours_on_one_roc():
    t = _tiny_table().assign(label=["copy", "novel", "copy"], sim_block3=[0.9, 0.2, 0.3], sim_block7=[0.8, 0.9, 0.7])
    t["mi_z"] = [3.0, -1.0, 0.5]
    summary = ui.layer_summary(t, ["block3", "block7"], np.array([True, False, True])).set_index("layer")
    assert summary.at["block3", "auc"] == 1.0 and summary.at["block7", "auc"] == 0.0
    assert summary.at["block3", "median_flagged"] == pytest.approx(0.6)
    assert summary.at["final (similarity)", "auc"] == 1.0
    curves = ui.roc_curves(t)
    assert [c["column"] for c in curves] == ["similarity", "mi_z"] and all(c["n"] == 3 for c in curves)
    fig = ui.roc_compare_figure(curves)
    assert [d.name.split(" (AUC")[0] for d in fig.data[1:]] == [c["name"] for c in curves]
    assert ui.roc_curves(t.drop(columns=["label"])) == []
    assert ui.consensus_figure(t, 3, np.array([True, False, True])).data[1].y.tolist() == [0, 0, 1, 1]


def test_research_page_shows_layers_consensus_and_one_roc(ran):
    at = go(ran.at, "Research")
    figs = [c for c in at.get("plotly_chart")]
    assert len(figs) >= 2
    layer_table = frame_with(at, "median_flagged")
    assert len(layer_table) == len(ran.result.layers) + 1
    if ran.result.has_ground_truth:
        assert "auc" in layer_table.columns and len(figs) == 3
    go(at, "Overview")
