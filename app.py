"""MRI Memorization Inspector: the Streamlit app.

Run with ``make app``, ``python app.py`` (the launcher: binds 127.0.0.1, usage statistics and error details
off, from any folder) or ``streamlit run app.py``. The app sets its privacy options itself first
(:func:`inspector.ui.apply_privacy_options`), wherever it was started from, and refuses to show anything when
the server listens on another interface than loopback (``$INSPECTOR_ALLOW_REMOTE=1`` allows it, e.g. behind
an authenticating proxy). The app calls the library only: every number comes from
:class:`inspector.result.AuditResult`, and images are rendered from its float arrays by
:mod:`inspector.ui`. Reviewer decisions go to SQLite through :class:`inspector.review.ReviewStore`.

Environment
-----------
INSPECTOR_AUDITS_DIR
    Where audit folders are saved (default ``audits`` under the working directory). Each audit's reviews go to
    ``<audit folder>/reviews.sqlite3``, the database ``inspector report --audit <audit folder>`` reads by
    default: the app and the report share one audit's decisions without naming a file.
INSPECTOR_REVIEWS_DB
    One reviews database for every audit instead (the sidebar's field overrides both).
INSPECTOR_CACHE_DIR
    Embedding and encoder cache of the library.
INSPECTOR_ALLOW_REMOTE
    ``1`` to serve on a non-loopback address.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from streamlit import runtime
from streamlit.components import v1 as components

from inspector import ui, viewer
from inspector.review import DECISIONS, ReviewError, ReviewStore, ReviewStoreBusyError
from inspector.views import View

# before anything else: the privacy options, wherever the app was started from (and `python app.py` launches)
if __name__ == "__main__" and not runtime.exists():
    sys.exit(ui.launch_app(__file__, sys.argv[1:]))
_BOUND_ADDRESS = ui.apply_privacy_options()

log = logging.getLogger("inspector.app")

PAGES: tuple[str, ...] = ("Overview", "Flagged", "Pair", "Volumes", "Review", "Research", "Export")
_DEFAULTS = {"train": "sample_data/train", "synthetic": "sample_data/synthetic", "holdout": "sample_data/holdout"}
_MAX_CACHED_AUDITS = 4
_MAX_THUMBNAIL_ROWS = 300

st.set_page_config(page_title="MRI Memorization Inspector", page_icon=":material/neurology:", layout="wide")
if not ui.served_privately(_BOUND_ADDRESS, real_server=not st.get_option("global.appTest")):
    st.error(
        f"This server listens on {_BOUND_ADDRESS or 'every network interface'}, not only on this machine: the app "
        "shows patients' images and stays closed. Restart it with `python app.py` or `make app` (they bind "
        "127.0.0.1), or set INSPECTOR_ALLOW_REMOTE=1 behind an authenticating proxy.",
        icon=":material/lock:",
    )
    st.stop()


# ==============================================================================================
# The result cache: one process-wide store keyed by the inputs, their modification state and the config
# ==============================================================================================


Entry = ui.AuditEntry
audit_store = ui.audit_store


def run_key(paths: dict[str, Path | None], config: Any) -> str:
    """Cache key: the resolved input paths, the state of the files under them and the full config."""
    parts = {name: None if p is None else {"path": str(p), "state": ui.input_signature(p)} for name, p in paths.items()}
    blob = json.dumps({"inputs": parts, "config": config.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def pair_of(entry: Entry, index: int) -> Any:
    """``result.pair(index)``, computed once per audit and row."""
    if index not in entry.pairs:
        entry.pairs[index] = entry.result.pair(index)
    return entry.pairs[index]


# ==============================================================================================
# Sidebar
# ==============================================================================================


def inputs_ui() -> dict[str, Any]:
    """Draw the sidebar inputs and return their values (plain values, no result)."""
    sb = st.sidebar
    sb.title(":material/neurology: Memorization Inspector")
    sb.caption("Did a generative MRI model copy its training patients?")
    sb.subheader("Cohorts")
    vals: dict[str, Any] = {}
    vals["train"] = sb.text_input("Training cohort (folder or CSV manifest)", _DEFAULTS["train"], key="in_train")
    vals["synthetic"] = sb.text_input(
        "Synthetic set (folder or CSV manifest)", _DEFAULTS["synthetic"], key="in_synthetic"
    )
    vals["holdout"] = sb.text_input(
        "Holdout of unseen real scans (optional)",
        _DEFAULTS["holdout"],
        key="in_holdout",
        help="Real scans the model never saw; they calibrate the scores. Leave empty to calibrate "
        "leave-one-subject-out within the training cohort.",
    )
    # one widget per AuditConfig field, generated from inspector.config.settings(): every setting is reachable
    for section, title in (
        ("method", "Method"),
        ("decision", "Decision"),
        ("matching", "Advanced"),
        ("input", "Input"),
        ("runtime", "Runtime"),
    ):
        box = sb if section in ("method", "decision") else sb.expander(title)
        if section in ("method", "decision"):
            sb.subheader(title)
        for setting in ui.config_settings():
            if setting.section != section:
                continue
            if setting.name == "checkpoint" and vals.get("extractor") != "mri-core":
                vals["checkpoint"] = None
                continue
            vals[setting.name] = ui.setting_widget(box, setting)
    with sb.expander("Reviews"):
        vals["reviews_db"] = st.text_input(
            "Reviews database (SQLite)",
            "",
            key="in_reviews_db",
            placeholder="the audit folder's reviews.sqlite3",
            help="Empty: each audit's decisions go to reviews.sqlite3 in its audit folder, where `inspector report "
            "--audit` finds them. Name a file to use another database.",
        )
    vals["run"] = sb.button("Run audit", type="primary", key="run", width="stretch")
    return vals


# ==============================================================================================
# Running the audit
# ==============================================================================================


def _skipped_frame(cohorts: dict[str, Any]) -> pd.DataFrame:
    rows = [
        {"cohort": name, "file": sk.path, "reason": sk.reason}
        for name, c in cohorts.items()
        if c is not None
        for sk in c.skipped
    ]
    return pd.DataFrame(rows, columns=["cohort", "file", "reason"])


def _show_error(message: str, skipped: list[Any] | None = None, cohorts: list[str] | None = None) -> None:
    st.error(message, icon=":material/error:")
    if skipped:
        rows = [{"file": s.path, "reason": s.reason} for s in skipped]
        if cohorts is not None:
            rows = [{"cohort": c, **r} for c, r in zip(cohorts, rows, strict=True)]
        with st.expander(f"{len(skipped)} file(s) skipped, with the reason", expanded=True):
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def run_audit(vals: dict[str, Any]) -> str | None:
    """Resolve the inputs, look the audit up in the cache or run it with progress; return its key.

    Every failure becomes a message on screen (never a traceback) and ``None``.
    """
    from inspector.config import AuditConfig
    from inspector.io import CohortNotFoundError, ManifestError, NoImagesError
    from inspector.pipeline import InsufficientDataError, audit
    from inspector.result import MissingEvidenceError

    try:
        paths: dict[str, Path | None] = {
            "train": ui.resolve_input(vals["train"], what="training cohort"),
            "synthetic": ui.resolve_input(vals["synthetic"], what="synthetic set"),
            "holdout": ui.resolve_input(vals["holdout"], what="holdout") if vals["holdout"].strip() else None,
        }
        settings = {st_.name: vals.get(st_.name) for st_ in ui.config_settings()}
        if vals["extractor"] == "mri-core":
            settings["checkpoint"] = str(ui.resolve_input(vals["checkpoint"] or "", what="MRI-CORE checkpoint"))
        config = AuditConfig.create(**settings)
        key = run_key(paths, config)
    except ui.InputPathError as e:
        _show_error(str(e))
        return None
    except (ValueError, OSError) as e:
        _show_error(f"These settings cannot be used: {e}")
        return None

    store = audit_store()
    if key in store:
        st.toast("Same inputs and settings as before: the cached result is shown.", icon=":material/bolt:")
        return key

    box = st.empty()
    panel = box.container(border=True)
    panel.markdown("**Running the audit**")
    bar = panel.progress(0.0, text="Starting")
    stages_ph = panel.empty()
    seen: dict[str, str] = {}

    def render(label: str, frac: float, text: str) -> None:
        bar.progress(frac, text=text)
        seen[label] = text
        stages_ph.markdown("\n".join(f"- {t}" for t in seen.values()))

    throttle = ui.ProgressThrottle(render)
    t0 = time.perf_counter()
    try:
        result = audit(paths["train"], paths["synthetic"], paths["holdout"], config, progress=throttle)
    except CohortNotFoundError as e:
        box.empty()
        _show_error(f"A cohort path does not exist: {e}")
        return None
    except NoImagesError as e:
        box.empty()
        _show_error(f"No readable images: {e}", getattr(e, "skipped", None))
        return None
    except ManifestError as e:
        box.empty()
        _show_error(f"The manifest cannot be used: {e}")
        return None
    except InsufficientDataError as e:
        box.empty()
        _show_error(f"Not enough data for this audit: {e}")
        return None
    except MissingEvidenceError as e:
        box.empty()
        head = str(e).split("\n", 1)[0]
        _show_error(
            f"{head} Fix or remove the files listed below, or tick **Allow skipped training/holdout files** under "
            "Input to audit without them (they are then named in the verdict, summary.json and the report).",
            [sk for _, sk in e.files],
            [c for c, _ in e.files],
        )
        return None
    except (ValueError, OSError, RuntimeError) as e:
        box.empty()
        log.exception("audit failed")
        _show_error(f"The audit could not run: {e}")
        return None
    except Exception as e:  # noqa: BLE001 - the user sees a message, the log keeps the traceback
        box.empty()
        log.exception("audit failed")
        _show_error(f"The audit failed unexpectedly ({type(e).__name__}: {e}). The server log has the details.")
        return None
    seconds = time.perf_counter() - t0
    box.empty()
    while len(store) >= _MAX_CACHED_AUDITS:
        store.pop(next(iter(store)))
    store[key] = Entry(result, seconds)
    return key


# ==============================================================================================
# Shared pieces
# ==============================================================================================


def review_store(path_text: str) -> ReviewStore | None:
    try:
        return ReviewStore(Path(path_text).expanduser())
    except ReviewStoreBusyError as e:
        st.error(f"{e}", icon=":material/lock_clock:")
        st.button("Retry", key="retry_store", help="Open the reviews database again.")
        return None
    except (ReviewError, OSError) as e:
        st.error(f"The reviews database {path_text!r} cannot be opened: {e}. Choose another file in the sidebar.")
        return None


def _latest(store: ReviewStore | None, audit_id: str) -> dict[str, Any]:
    if store is None:
        return {}
    try:
        return store.latest(audit_id)
    except ReviewError as e:
        st.warning(f"Earlier decisions cannot be shown right now: {e}")
        return {}


def _pair_label(result: Any, i: int) -> str:
    row = result.table.iloc[i]
    return (
        f"{row['synthetic_path']}#{int(row['slice_index'])} · similarity {float(row['similarity']):.4f} · "
        f"p {ui.format_p(float(row['p_value']))} · subject {row['nearest_train_subject']}"
    )


def _open_pair(index: int) -> None:
    st.session_state["pair_index"] = int(index)
    st.session_state["pair_select"] = int(index)
    st.session_state["page"] = "Pair"


def _on_table_select() -> None:
    state = st.session_state.get("flag_table")
    rows = list(getattr(getattr(state, "selection", None), "rows", []) or [])
    order = st.session_state.get("_flag_rows", [])
    if rows and rows[0] < len(order):
        _open_pair(order[rows[0]])


def header(entry: Entry) -> None:
    r = entry.result
    cfg = r.config
    st.title("MRI Memorization Inspector")
    parts = [
        f"audit `{r.audit_id[:12]}`",
        f"mode **{cfg.mode}**",
        f"extractor **{cfg.extractor}**",
        f"training {len(r.train)} slices / {len(r.train.subjects)} subjects",
        f"synthetic {len(r.synthetic)} slices",
        f"holdout {len(r.holdout)} slices" if r.holdout is not None else "no holdout (leave-one-subject-out null)",
        f"computed in {entry.seconds:.1f} s",
    ]
    st.caption(" · ".join(parts))
    if r.evidence_note:
        st.warning(
            f"**Missing evidence.** {r.evidence_note}"
            + (" The audit ran with *Allow skipped*." if r.config.allow_skipped else ""),
            icon=":material/report:",
        )
    skipped = _skipped_frame({"training": r.train, "synthetic": r.synthetic, "holdout": r.holdout})
    if len(skipped):
        with st.expander(f":material/warning: {len(skipped)} file(s) or slice(s) were skipped while loading"):
            st.dataframe(skipped, hide_index=True, width="stretch")


# ==============================================================================================
# Pages
# ==============================================================================================


def verdict_box(r: Any, v: Any) -> None:
    """The verdict in words, red (copying), amber (flags, or a setting that cannot flag) or green."""
    amber = v.n_flagged or not v.decidable or not v.alpha_reachable
    box = st.error if v.copying else (st.warning if amber else st.success)
    box(f"**Verdict.** {' '.join(t for t in (v.text, r.evidence_note) if t)}", icon=":material/policy:")


def overview_page(entry: Entry, alpha: float, fdr: bool) -> None:
    r = entry.result
    v = r.calibration.verdict(alpha, fdr)
    lo, hi = v.fraction_ci95
    verdict_box(r, v)
    if v.decidable:
        st.caption(
            f"Dataset test: {v.test}, p = {ui.format_p(v.test_p_value)} at level {v.test_level:g} "
            f"({v.n_units_flagged} of {v.n_units} {v.unit}s with p ≤ α). Assumes {v.assumption}."
        )

    cols = st.columns(5)
    rule = "BH at" if fdr else "α ="
    cols[0].metric(f"Flagged at {rule} {ui.format_alpha(alpha)}", f"{v.n_flagged} / {v.n_synthetic}")
    cols[0].caption(
        f"{v.fraction_flagged * 100:.1f} % (95 % interval {lo * 100:.1f}–{hi * 100:.1f} %); "
        f"≈ {v.expected_false_positives:.1f} expected by chance"
    )
    cols[1].metric("Mann–Whitney AUC", f"{v.mann_whitney_auc:.3f}")
    cols[1].caption(
        f"synthetic vs {v.null_kind} null, p = {ui.format_p(v.mann_whitney_p)}; "
        "0.5 = as novel as unseen real scans, → 1 = copying"
    )
    cols[2].metric("Mean ONI (paper)", f"{v.mean_oni:.3f}")
    cols[2].caption(
        f"paper's rule ONI < 0.68 → {'memorised' if v.paper_rule_memorised else 'not memorised'}; "
        f"mean MI z = {v.mean_mi_z:.2f}"
    )
    vols = r.volumes(alpha, fdr)
    if len(vols) < len(r.table):  # some synthetic volumes hold several slices
        with st.expander(
            f"Per synthetic volume: {int(vols['flagged'].sum())} of {len(vols)} flagged "
            f"(p-values by {r.calibration.volume_calibration})"
        ):
            st.dataframe(vols, hide_index=True, width="stretch", key="volumes_table")
    b = r.baselines
    if "ct_score" in b:
        cols[3].metric("CT-score (Meehan)", f"{b['ct_score']:.2f}")
        cols[3].caption("≪ 0 = data copying, ≈ 0 = fine, ≫ 0 = underfitting")
    else:
        cols[3].metric("CT-score (Meehan)", "n/a")
        cols[3].caption(str(b.get("ct_score_error", "not computed")))
    if "auth_pct" in b:
        cols[4].metric("AuthPct (Alaa)", f"{float(b['auth_pct']):.1f} %")
        cols[4].caption("share of synthetic slices judged authentic (not copies)")
    else:
        cols[4].metric("AuthPct (Alaa)", "n/a")
        cols[4].caption(str(b.get("auth_pct_error", "not computed")))

    flags = r.flags(alpha, fdr)
    thr = r.calibration.threshold(alpha, fdr)
    h1, h2 = st.columns([3, 1], vertical_alignment="bottom")
    h1.subheader("Synthetic similarities against the null")
    sims = r.table["similarity"].to_numpy()
    can_log = bool(np.nanmax(sims) <= 1.0 and np.nanmax(r.null_similarity) <= 1.0)
    log_gap = h2.toggle(
        "Spread the top (log10(1 − similarity))",
        key="hist_log",
        disabled=not can_log,
        help="Copies pile up at similarity ≈ 1; this axis spreads them out.",
    )
    scale = h2.radio(
        "Scale",
        ui.HISTOGRAM_SCALES,
        key="hist_scale",
        horizontal=True,
        help="density: each set's area is 1 (flagged and not flagged share the synthetic set's); log counts: "
        "slices per bin on a log axis.",
    )
    hist = ui.derived(
        entry,
        ("histogram", float(alpha), bool(fdr), bool(log_gap and can_log), scale),
        lambda: ui.histogram_figure(
            sims,
            r.null_similarity,
            thr,
            null_kind=v.null_kind,
            alpha=alpha,
            flagged=flags,
            log_gap=log_gap and can_log,
            scale=scale,
        ),
    )
    st.plotly_chart(hist, key="hist")
    if not np.isfinite(thr) and not v.n_flagged:
        st.caption(
            f"No slice is flagged at this setting: the null has {v.n_null} slices (the smallest p-value is "
            f"{v.min_p_value:.3g}); choose a larger α or give a larger holdout."
        )

    if r.has_ground_truth:
        roc = r.roc()
        conf = r.confusion_at(alpha, fdr)
        st.subheader("Against the ground truth (labels.csv)")
        c1, c2 = st.columns([3, 2])
        if roc is not None:
            point = ui.operating_point(conf) if conf is not None else None
            fig = ui.derived(entry, ("roc", float(alpha), bool(fdr)), lambda: ui.roc_figure(roc, point, alpha=alpha))
            c1.plotly_chart(fig, key="roc")
            c2.metric("ROC AUC", f"{roc['auc']:.3f}")
            c2.metric("Average precision", f"{roc['average_precision']:.3f}")
        if conf is not None:
            c2.markdown(
                f"**Confusion at α = {ui.format_alpha(alpha)}**\n\n"
                "| truth | flagged | not flagged |\n|---|---:|---:|\n"
                f"| copy | {conf['tp']} | {conf['fn']} |\n"
                f"| novel | {conf['fp']} | {conf['tn']} |"
            )
    with st.expander("Timings and settings"):
        st.json(
            {"timings_seconds": {k: round(float(t), 3) for k, t in r.timings.items()}, "config": r.config.to_dict()}
        )


def research_page(entry: Entry, alpha: float, fdr: bool) -> None:
    """Dataset-level views for researchers: per layer, the layer consensus, and the paper's method against ours."""
    r = entry.result
    flags = r.flags(alpha, fdr)
    rule = "Benjamini–Hochberg at" if fdr else "α ="
    st.subheader("Per feature layer, over the whole synthetic set")
    st.caption(
        f"Each layer's similarity to its nearest training slice, flagged against not flagged at {rule} "
        f"{ui.format_alpha(alpha)}. The audit keeps only the null's final score, not its per-layer similarities, "
        "so the layers are compared within the synthetic set"
        + ("; the AUC column is each layer alone against labels.csv." if r.has_ground_truth else ".")
    )
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(ui.layer_figure(r.table, r.layers, flags), key="layer_fig")
    summary = ui.layer_summary(r.table, r.layers, flags)
    if not r.has_ground_truth:
        summary = summary.drop(columns=["auc"])
    c2.dataframe(
        summary,
        hide_index=True,
        width="stretch",
        key="layer_table",
        column_config={
            "median_flagged": st.column_config.NumberColumn("median, flagged", format="%.4f"),
            "median_not_flagged": st.column_config.NumberColumn("median, not flagged", format="%.4f"),
            "auc": st.column_config.NumberColumn("AUC (copy vs novel)", format="%.3f"),
        },
    )
    st.subheader("Layer consensus")
    st.caption("How many layers' nearest training slice belongs to the matched subject (all = strong attribution).")
    st.plotly_chart(ui.consensus_figure(r.table, len(r.layers), flags), key="consensus_fig")
    st.subheader("The paper's method and ours on one ROC")
    curves = ui.roc_curves(r.table)
    if not curves:
        st.caption("Needs ground truth (a labels.csv beside the synthetic set with copy and novel slices).")
        return
    st.plotly_chart(ui.roc_compare_figure(curves), key="roc_compare")
    st.caption(
        " · ".join(f"{c['name']}: AUC {c['auc']:.3f} over {c['n']} labelled slices" for c in curves)
        + ". The paper's ONI = −tanh(MI z) ranks the slices as its MI z-score does, so it has the same curve."
    )


def flagged_page(entry: Entry, alpha: float, fdr: bool, latest: dict[str, Any]) -> None:
    r = entry.result
    flags = r.flags(alpha, fdr)
    rule = "Benjamini–Hochberg at" if fdr else "α ="
    st.subheader(f"{int(flags.sum())} flagged synthetic slices at {rule} {ui.format_alpha(alpha)}")
    f1, f2, f3, f4 = st.columns([2, 2, 2, 1])
    search = f1.text_input("Filter by synthetic file", key="flt_search", placeholder="part of a path")
    subjects = sorted(r.table.loc[flags, "nearest_train_subject"].astype(str).unique())
    chosen = f2.multiselect("Matched training subject", subjects, key="flt_subjects")
    status = f3.selectbox("Review status", ("all", "not reviewed", "reviewed", *DECISIONS), key="flt_status")
    include_all = f4.toggle("All slices", key="flt_all", help="Show every synthetic slice, not only flagged ones.")
    frame = ui.flagged_frame(
        r.table,
        flags,
        latest,
        len(r.layers),
        include_all=include_all,
        train_labels=lambda t: "{1}/{2}".format(*entry.train_position(t)),
        show_truth=bool(st.session_state.get("show_truth")),
    )
    if search:
        frame = frame[frame["synthetic"].str.contains(search, case=False, regex=False)]
    if chosen:
        frame = frame[frame["matched_subject"].isin(chosen)]
    if status == "not reviewed":
        frame = frame[frame["decision"] == ""]
    elif status == "reviewed":
        frame = frame[frame["decision"] != ""]
    elif status != "all":
        frame = frame[frame["decision"] == status]
    # frame is in the one ranking every page follows: most significant first (the review queue's order)
    if frame.empty:
        st.session_state["_flag_rows"] = []
        st.info("No slice matches these filters at this threshold.")
        return
    shown = frame.head(_MAX_THUMBNAIL_ROWS)
    syn_thumb, train_thumb = ui.thumbnails(entry, [int(i) for i in shown.index])
    frame = frame.copy()
    frame.insert(1, "synthetic_img", pd.Series(syn_thumb, index=shown.index).reindex(frame.index).fillna(""))
    frame.insert(2, "training_img", pd.Series(train_thumb, index=shown.index).reindex(frame.index).fillna(""))
    st.session_state["_flag_rows"] = [int(i) for i in frame.index]
    st.caption(
        "In the ranking (most significant first). The p-value stops at 1/(1 + n_null), so copies beyond the null "
        "are ordered by similarity and by MI's fitted tail (−log10(1 − MI)); click a column header to sort by it, "
        "click a row (its left edge) to open the pair."
        + (f" Thumbnails for the first {_MAX_THUMBNAIL_ROWS} rows." if len(frame) > _MAX_THUMBNAIL_ROWS else "")
    )
    st.dataframe(
        frame,
        key="flag_table",
        on_select=_on_table_select,
        selection_mode="single-row",
        hide_index=True,
        width="stretch",
        height=min(640, 38 + 60 * len(frame)),
        row_height=58,
        column_config={
            "rank": st.column_config.NumberColumn("rank", help="1 = most significant (p-value, then similarity)"),
            "synthetic_img": st.column_config.ImageColumn("synthetic", width="small"),
            "training_img": st.column_config.ImageColumn(
                "matched training", width="small", help="the matched training slice in the synthetic slice's view"
            ),
            "synthetic": st.column_config.TextColumn("synthetic slice", width="medium"),
            "similarity": st.column_config.NumberColumn(
                "similarity", format="%.4f", help="the calibrated score; ranks where the p-value is at its floor"
            ),
            "p_value": st.column_config.NumberColumn("p-value", format="%.4g"),
            "mi": st.column_config.NumberColumn("MI (null CDF)", format="%.3f"),
            "mi_tail": st.column_config.NumberColumn(
                "−log10(1 − MI)",
                format="%.2f",
                help="MI's fitted tail: the fitted chance that an unseen real scan is as similar, on a log scale "
                f"(capped at {ui.MI_TAIL_MAX:g}); higher = more like a copy",
            ),
            "consensus": st.column_config.TextColumn("layer consensus", help="layers whose top match is this subject"),
            "matched_subject": st.column_config.TextColumn("matched training subject"),
            "matched_slice": st.column_config.TextColumn("matched slice", help="position among the subject's slices"),
            "margin": st.column_config.NumberColumn("margin to next subject", format="%.3f"),
            "decision": st.column_config.TextColumn("review decision"),
        },
    )
    c1, c2 = st.columns([4, 1])
    options = list(frame.index)
    pick = c1.selectbox("Or choose a slice", options, format_func=lambda i: _pair_label(r, int(i)), key="flag_pick")
    c2.button("Open pair", key="open_pair", on_click=_open_pair, args=(int(pick),), width="stretch", type="primary")


def _img(container: Any, arr: np.ndarray, caption: str, view: dict[str, Any], *, diff: bool = False) -> None:
    png = ui.render_png(
        arr, low=view["low"], high=view["high"], size=view["size"], resample=view["resample"], colour_difference=diff
    )
    container.image(png, caption=caption, width="stretch", output_format="PNG")


def pair_page(entry: Entry, alpha: float, fdr: bool, store: ReviewStore | None, latest: dict[str, Any]) -> None:
    r = entry.result
    flags = r.flags(alpha, fdr)
    options = ui.review_order(r.table, flags)  # the ranking on screen, most significant first
    current = st.session_state.get("pair_index")
    if current is not None and current not in options:
        options = [*options, int(current)]
    if not options:
        st.info("No slice is flagged at this threshold. Raise α, or pick any slice in the Flagged page (All slices).")
        return
    if current is None:
        current = options[0]
    st.session_state["pair_select"] = int(current)

    def on_pick() -> None:
        st.session_state["pair_index"] = int(st.session_state["pair_select"])

    def step(delta: int) -> None:
        pos = options.index(int(st.session_state.get("pair_index", options[0]) or options[0]))
        st.session_state["pair_index"] = options[(pos + delta) % len(options)]

    c0, c1, c2 = st.columns([8, 1, 1], vertical_alignment="bottom")
    c0.selectbox(
        f"Flagged pair ({options.index(current) + 1} of {len(options)})",
        options,
        format_func=lambda i: _pair_label(r, int(i)),
        key="pair_select",
        on_change=on_pick,
    )
    c1.button("◀ Previous", key="pair_prev", on_click=step, args=(-1,), width="stretch")
    c2.button("Next ▶", key="pair_next", on_click=step, args=(1,), width="stretch")
    index = int(current)
    st.session_state["pair_index"] = index
    try:
        ev = pair_of(entry, index)
    except Exception as e:  # noqa: BLE001 - shown, not raised
        log.exception("pair evidence failed")
        st.error(f"The evidence for this slice cannot be shown ({type(e).__name__}: {e}).")
        return
    row = r.table.iloc[index]
    sha = str(row["sha256"])

    m = st.columns(5)
    m[0].metric("Similarity", f"{float(row['similarity']):.4f}")
    m[1].metric("p-value", ui.format_p(float(row["p_value"])))
    m[2].metric("Layer consensus", f"{int(row.get('layer_consensus', 0))}/{len(r.layers)}")
    m[3].metric("Aligned NCC", f"{ev.transform['ncc']:.4f}" if ev.transform else "n/a")
    decision_ph = m[4].empty()
    subj = str(row["nearest_train_subject"])
    line = f"Matched training subject **{subj}**"
    if int(row.get("nearest_train_index", -1)) >= 0:
        line = f"Matched training slice **{entry.train_label(int(row['nearest_train_index']))}**"
    if ev.transform:
        t = ev.transform
        shift = ", ".join(f"{s:+.1f}" for s in t.get("shift", []))
        line += (
            f" · registration: flip **{t.get('flip', 'none')}**, rotation {t.get('angle', 0):+.1f}°, "
            f"scale {t.get('scale', 1):.3f}, shift ({shift}) px"
        )
    if st.session_state.get("show_truth") and "label" in row and isinstance(row["label"], str) and row["label"]:
        line += f" · ground truth: **{row['label']}**"
        if isinstance(row.get("augmentation"), str) and row.get("augmentation"):
            line += f" ({row['augmentation']})"
    st.markdown(line)
    st.caption("Neighbours are shown in the synthetic slice's view (a flipped match is flipped back).")

    # the comparison viewer: zoom, pan, window/level, flicker and swipe run in the browser (no server round-trip)
    other = ev.aligned
    other_label = "aligned training"
    if other is None:
        other, other_label = next(iter(ev.layers.values()))[0]["image"], "nearest training (not aligned)"
    html_doc = viewer.pair_viewer_html(
        ev.synthetic,
        other,
        labels=(f"synthetic · {_slice_key(row)}", other_label, "|synthetic − training|"),
        pane_height=ui.VIEWER_PANE_HEIGHT,
    )
    components.html(html_doc, height=ui.VIEWER_PANE_HEIGHT + 48)

    still = st.expander("Still images: window, before/after blend, display size")
    with still:
        k1, k2, k3, k6, k4, k5 = st.columns([2, 2, 3, 1.4, 2, 2])
        low = k1.slider("Window low", 0.0, 1.0, 0.0, 0.01, key="win_low")
        high = k2.slider("Window high", 0.0, 1.0, 1.0, 0.01, key="win_high")
        mix = k3.slider(
            "Before / after: synthetic ↔ aligned training",
            0,
            100,
            50,
            5,
            key="blend",
            format="%d %%",
            help="0 % shows the synthetic slice, 100 % the aligned training slice.",
        )
        gain = k6.selectbox(
            "Difference gain",
            (1, 2, 4, 8),
            index=2,
            key="diff_gain",
            format_func=lambda g: f"×{g}",
            help="Magnifies the difference map: yellow = a difference of window width / gain.",
        )
        size = k4.select_slider("Display size", (128, 192, 256, 320, 384, 512), 256, key="disp_size")
        resample = k5.radio("Upscaling", ("nearest", "bilinear"), key="resample", horizontal=True)
    if high <= low:
        st.warning(f"The window needs high > low (now {low:.2f}–{high:.2f}); showing 0–1.")
        low, high = 0.0, 1.0
    view = {"low": low, "high": high, "size": size, "resample": resample}

    top = still.columns(4)
    _img(top[0], ev.synthetic, f"synthetic · {row['synthetic_path']}#{int(row['slice_index'])}", view)
    if ev.aligned is not None:
        _img(top[1], ev.aligned, f"aligned training · {entry.train_label(ev.transform['train_index'])}", view)
        _img(
            top[2],
            ev.difference,
            f"|synthetic − aligned| ×{gain}: black = identical, yellow ≥ {(high - low) / gain:.3g}",
            {**view, "high": low + (high - low) / gain},
            diff=True,
        )
        _img(
            top[3],
            ui.blend(ev.synthetic, ev.aligned, mix / 100),
            f"before/after: {100 - mix} % synthetic + {mix} % aligned",
            view,
        )
    else:
        first = next(iter(ev.layers.values()))[0]
        _img(top[1], first["image"], f"nearest training · {entry.train_label(first['train_index'])}", view)
        top[2].info("Paper mode keeps no registration: no aligned difference map. The blend uses the nearest slice.")
        _img(
            top[3],
            ui.blend(ev.synthetic, first["image"], mix / 100),
            f"before/after: {100 - mix} % synthetic + {mix} % nearest",
            view,
        )
    review_form(r, row, store, latest)
    dec = latest.get(sha)
    decision_ph.metric("Decision", dec.decision if dec is not None else "—")

    st.subheader("Nearest training slices at every feature layer")
    st.caption(
        "Rows: feature layers (shallow → deep). Columns: the top neighbours, most similar first; "
        "★ = the matched training subject."
    )
    k = max(len(v) for v in ev.layers.values())
    for layer, neigh in ev.layers.items():
        cols = st.columns([1.1, *([2] * k)], vertical_alignment="top")
        sim_col = f"sim_{layer}"
        cols[0].markdown(f"**{layer}**")
        if sim_col in row:
            cols[0].caption(f"layer similarity {float(row[sim_col]):.4f}")
        for j, nb in enumerate(neigh):
            nsubj, npos, nn = entry.train_position(nb["train_index"])
            who = "★" if nsubj == row["nearest_train_subject"] else nsubj
            _img(cols[j + 1], nb["image"], f"#{j + 1} · sim {nb['similarity']:.4f} · {who} {npos}/{nn}", view)
    subject_scroll(entry, row, ev, view)


def subject_scroll(entry: Entry, row: Any, ev: Any, view: dict[str, Any]) -> None:
    """Scroll through the matched training subject's slices next to the synthetic slice."""
    r = entry.result
    subj = str(row["nearest_train_subject"])
    idx = r.subject_slices(subj) if subj else []
    st.subheader(f"Scroll through training subject {subj or '—'}")
    if not idx:
        st.caption("No matched training subject.")
        return
    matched = int(row["nearest_train_index"]) if "nearest_train_index" in row else idx[0]
    start = idx.index(matched) if matched in idx else 0
    pos = start
    if len(idx) > 1:
        pos = (
            st.slider(
                f"Slice of {subj}: {len(idx)} slices, the matched one is {start + 1}",
                1,
                len(idx),
                start + 1,
                key=f"scroll_{r.audit_id[:8]}_{int(row.name)}",
            )
            - 1
        )
    flip = View.parse(ev.transform.get("flip", "id") if ev.transform else "id")
    if flip is not View.ID:
        st.caption(f"Shown in the matched view ({flip}), like the neighbours above.")
    window = [p for p in range(pos - 2, pos + 3) if 0 <= p < len(idx)]
    cols = st.columns(6)
    _img(cols[0], ev.synthetic, "synthetic", view)
    for c, p in zip(cols[1:], window, strict=False):
        arr = flip.apply(np.asarray(r.train[idx[p]].array))
        tags = []
        if p == pos:
            tags.append("▶ selected")
        if idx[p] == matched:
            tags.append("matched")
        _img(c, arr, f"slice {p + 1}/{len(idx)}" + (f" ({', '.join(tags)})" if tags else ""), view)


# ----------------------------------------------------------------------------------------------
# Volumes: a synthetic volume beside its 3D-verified training volume, in three planes
# ----------------------------------------------------------------------------------------------


def _open_volume(volume: str) -> None:
    st.session_state["vol_open"] = str(volume)
    st.session_state["vol_pick"] = str(volume)
    st.session_state["page"] = "Volumes"


def _on_volume_table_select() -> None:
    state = st.session_state.get("vol_table")
    rows = list(getattr(getattr(state, "selection", None), "rows", []) or [])
    order = st.session_state.get("_vol_rows", [])
    if rows and rows[0] < len(order):
        _open_volume(order[rows[0]])


def _on_volume_jump() -> None:
    volume = st.session_state.get("vol_jump")
    if volume:
        _open_volume(volume)
    st.session_state["vol_jump"] = None


def _volume_label(frame: pd.DataFrame, volume: str) -> str:
    row = frame[frame["volume"] == volume].iloc[0]
    flag = "flagged" if bool(row["flagged"]) else "not flagged"
    return (
        f"{volume} · {flag} · volume similarity {ui.format_number(row['volume_similarity'])} · "
        f"p {ui.format_p(float(row['p_value']))} · training {row['training_subject']}"
    )


def volumes_page(entry: Entry, alpha: float, fdr: bool) -> None:
    """Synthetic volumes (flagged first), and one of them beside its training volume aligned by the 3D transform."""
    r = entry.result
    note = ui.volume_unit_note(r)
    if note is not None:
        st.info(note, icon=":material/view_in_ar:")
        return
    vols = r.volumes(alpha, fdr)  # the one source of every count and flag on this page
    if vols.empty:
        st.info("This audit has no synthetic volume.")
        return
    rule = "Benjamini–Hochberg at" if fdr else "α ="
    truth = ui.volume_truth(r) if st.session_state.get("show_truth") else None
    frame = ui.volume_review_frame(vols, truth=truth)
    n_flagged = int(frame["flagged"].sum())
    st.subheader(f"{n_flagged} of {len(frame)} synthetic volumes flagged at {rule} {ui.format_alpha(alpha)}")
    st.caption(
        f"p-values: {r.calibration.volume_calibration}. Flagged first, most significant first; click a row (its "
        "left edge) to open the volume. Training volume and subject: the match verified by 3D registration."
    )
    st.session_state["_vol_rows"] = frame["volume"].tolist()
    st.dataframe(
        frame,
        key="vol_table",
        on_select=_on_volume_table_select,
        selection_mode="single-row",
        hide_index=True,
        width="stretch",
        height=min(420, 38 + 35 * len(frame)),
        column_config={
            "volume": st.column_config.TextColumn("synthetic volume", width="medium"),
            "n_slices": st.column_config.NumberColumn("slices"),
            "volume_similarity": st.column_config.NumberColumn(
                "volume similarity", format="%.4f", help="3D-verified: NCC × coverage after 3D registration"
            ),
            "p_value": st.column_config.NumberColumn("p-value", format="%.4g"),
            "flagged": st.column_config.CheckboxColumn("flagged"),
            "slices_flagged": st.column_config.TextColumn("slices flagged"),
            "training_volume": st.column_config.TextColumn("training volume"),
            "training_subject": st.column_config.TextColumn("training subject"),
            "coverage": st.column_config.NumberColumn("coverage", format="%.3f"),
            "slice_run": st.column_config.TextColumn(
                "slice run", help="synthetic slices whose matches run through the training volume in order"
            ),
            "slice_consistency": st.column_config.NumberColumn("slice consistency", format="%.3f"),
            "truth": st.column_config.TextColumn("ground truth"),
        },
    )

    index = ui.copied_subjects(vols)
    j1, j2 = st.columns(2)
    if index:
        subj = j1.selectbox(
            f"Jump from a training subject ({len(index)} copied by a flagged volume)",
            list(index),
            index=None,
            placeholder="Choose a training subject",
            format_func=lambda s: f"{s} · {len(index[s])} flagged synthetic volume(s)",
            key="vol_subject",
        )
        j2.selectbox(
            f"Synthetic volumes that copy {subj}" if subj else "Synthetic volumes that copy it",
            index.get(subj, []) if subj else [],
            index=None,
            placeholder="Choose one to open it" if subj else "Choose a training subject first",
            key="vol_jump",
            on_change=_on_volume_jump,
            disabled=subj is None,
        )
    else:
        j1.caption("No synthetic volume is flagged at this setting: no training subject to jump from.")

    names = frame["volume"].tolist()
    current = st.session_state.get("vol_open")
    if current not in names:
        current = names[0]
    st.session_state["vol_open"] = current
    st.session_state["vol_pick"] = current

    def step(delta: int) -> None:
        pos = names.index(st.session_state.get("vol_open", names[0]))
        _open_volume(names[(pos + delta) % len(names)])

    c0, c1, c2 = st.columns([8, 1, 1], vertical_alignment="bottom")
    c0.selectbox(
        f"Open volume ({names.index(current) + 1} of {len(names)})",
        names,
        format_func=lambda v: _volume_label(frame, v),
        key="vol_pick",
        on_change=lambda: _open_volume(st.session_state["vol_pick"]),
    )
    c1.button("◀ Previous", key="vol_prev", on_click=step, args=(-1,), width="stretch")
    c2.button("Next ▶", key="vol_next", on_click=step, args=(1,), width="stretch")

    facts = ui.volume_facts(vols, current)
    m = st.columns(6)
    m[0].metric("Volume similarity", ui.format_number(facts["volume_similarity"]))
    m[1].metric("NCC", ui.format_number(facts["volume_ncc"]))
    m[2].metric("Coverage", ui.format_number(facts["coverage"], 3))
    m[3].metric("Volume p-value", ui.format_p(facts["p_value"]))
    m[4].metric(f"Flagged at {rule} {ui.format_alpha(alpha)}", "yes" if facts["flagged"] else "no")
    m[5].metric("Slices flagged", f"{facts['n_slices_flagged']} / {facts['n_slices']}")
    line = (
        f"Training volume **{facts['training_volume'] or '—'}** of subject **{facts['training_subject'] or '—'}**"
        + (" (verified by 3D registration)" if facts["verified"] else " (not verified in 3D)")
    )
    if facts["slice_run"]:
        line += (
            f" · slice run {facts['slice_run']} (training slice ≈ {ui.format_number(facts['run_slope'], 2)} × "
            f"synthetic slice {round(facts['run_offset'], 1) + 0.0:+.1f}), slice consistency "
            f"{ui.format_number(facts['slice_consistency'], 3)}, {facts['n_candidate_volumes']} candidate volume(s)"
        )
    if truth is not None and truth.get(current):
        line += f" · ground truth: **{truth[current]}**"
    st.markdown(line)
    st.caption(f"p-value calibration: {facts['p_calibration']}")
    volume_viewer(entry, current, r.flags(alpha, fdr), rule, alpha)


@st.fragment
def volume_viewer(entry: Entry, volume: str, flags: np.ndarray, rule: str, alpha: float) -> None:
    """Three orthogonal planes of the synthetic volume and of its aligned training volume; one slider per plane
    moves both panes (and the difference). A fragment: moving a slider redraws this viewer only."""
    r = entry.result
    pair, reason = ui.open_volume(entry, volume)
    if pair is None:
        st.info(reason, icon=":material/view_in_ar:")
        return
    lengths = {plane: ui.plane_length(pair, plane) for plane in ui.VOLUME_PLANES}
    # a new volume starts at its middle; a slider whose state was dropped (another page) too
    fresh = st.session_state.get("_vol_sliders_for") != volume
    for plane, n in lengths.items():
        key = f"vol_{plane}"
        if fresh or key not in st.session_state or not 1 <= int(st.session_state[key]) <= n:
            st.session_state[key] = n // 2 + 1
    st.session_state["_vol_sliders_for"] = volume

    k1, k2, k3, k4, k5 = st.columns(5)
    low = k1.slider("Window low", 0.0, 1.0, 0.0, 0.01, key="vol_win_low")
    high = k2.slider("Window high", 0.0, 1.0, 1.0, 0.01, key="vol_win_high")
    gain = k3.selectbox("Difference gain", (1, 2, 4, 8), index=2, key="vol_gain", format_func=lambda g: f"×{g}",
                        help="Magnifies the difference map: yellow = a difference of window width / gain.")  # fmt: skip
    size = k4.select_slider("Display size", (128, 192, 256, 320, 384, 512), 256, key="vol_size")
    stretch = k5.select_slider(
        "Through-plane stretch",
        (1, 2, 3, 4),
        ui.through_plane_stretch(lengths["axial"], lengths["coronal"]),
        key="vol_stretch",
        format_func=lambda s: f"×{s}",
        help="Rows per slice in the coronal and sagittal planes (the slice spacing is not kept: display only).",
    )
    if high <= low:
        st.warning(f"The window needs high > low (now {low:.2f}–{high:.2f}); showing 0–1.")
        low, high = 0.0, 1.0
    view = {"low": low, "high": high, "size": size, "resample": "nearest"}
    diff_view = {**view, "high": low + (high - low) / gain}
    st.caption(
        f"Synthetic: {volume} · Training (aligned): {pair.train_volume}, resampled onto the synthetic volume's grid "
        "by the 3D transform · Difference: |synthetic − aligned| "
        f"(black = identical, yellow ≥ {(high - low) / gain:.3g}). Axial = the audit's slices "
        f"({r.config.axis} axis); coronal and sagittal cut across them, last slice at the top."
    )
    for plane in ui.VOLUME_PLANES:
        n = lengths[plane]
        with st.container(key=f"vol_{plane}_row", border=True):
            cols = st.columns([1.5, 2, 2, 2], vertical_alignment="top")
            pos = int(cols[0].slider(
                f"{plane.capitalize()} slice (moves both volumes)", 1, n, key=f"vol_{plane}", help=f"1 to {n}"
            )) - 1  # fmt: skip
            for col, (image, label) in zip(cols[1:], ui.VOLUME_PANES, strict=True):
                arr = ui.volume_plane(pair, plane, pos, image, stretch=stretch)
                caption = ui.plane_caption(f"{label} ×{gain}" if image == "difference" else label, plane, pos, n)
                diff = image == "difference"
                w = diff_view if diff else view
                png = ui.render_png(arr, low=w["low"], high=w["high"], size=size, colour_difference=diff)
                col.image(png, caption=caption, width=size, output_format="PNG")
            if plane == "axial":
                ev = ui.axial_slice_evidence(r, pair, pos, flags)
                with cols[0].container(key="vol_slice_evidence"):
                    st.markdown(
                        f"**Axial slice {pos + 1}/{n}** (slice index {ev['slice_index']})  \n"
                        f"similarity {ev['similarity']:.4f}  \np {ui.format_p(ev['p_value'])} · "
                        + (f"**flagged** at {rule} {ui.format_alpha(alpha)}" if ev["flagged"] else "not flagged")
                        + f"  \nnearest training slice: {ev['nearest_training'] or '—'}"
                        + ("" if ev["on_verified_volume"] else "  \n:orange[not in the verified training volume]")
                    )
    with st.expander("3D transform (training volume → synthetic grid)"):
        st.dataframe(
            pd.DataFrame(np.round(pair.matrix, 4), index=["slice", "row", "column"],
                         columns=["slice", "row", "column", "shift"]),
            width="content",
        )  # fmt: skip
        st.caption("A 3×4 affine matrix in the stacks' voxel coordinates (slice, row, column); see inspector.volumes.")


def review_form(r: Any, row: Any, store: ReviewStore | None, latest: dict[str, Any]) -> None:
    """Record a decision for the pair; confirm only after the database has committed it."""
    sha = str(row["sha256"])
    slice_key = f"{row['synthetic_path']}#{int(row['slice_index'])}"
    if store is None:
        st.caption("No usable reviews database; set one in the sidebar.")
        return
    current = latest.get(sha)
    with st.form(f"review_{sha[:16]}", border=True):
        st.markdown("**Review this pair**")
        c1, c2, c3, c4 = st.columns([3, 4, 2, 1.3], vertical_alignment="bottom")
        decision = c1.radio(
            "Decision",
            DECISIONS,
            index=DECISIONS.index(current.decision) if current is not None else None,
            key=f"dec_{sha[:16]}",
            horizontal=True,
        )
        comment = c2.text_input("Comment", current.comment if current is not None else "", key=f"com_{sha[:16]}")
        reviewer = c3.text_input("Reviewer name", key="reviewer_name")
        with c4:
            submitted = st.form_submit_button("Save decision", type="primary", key="save_decision", width="stretch")
    pending_key, retry_key = f"pending_{sha[:16]}", f"retry_{sha[:16]}"
    attempt = bool(st.session_state.get(retry_key)) and pending_key in st.session_state
    if submitted:
        if decision is None:
            st.warning("Choose a decision first.")
        elif not (reviewer or "").strip():
            st.warning("Enter the reviewer's name.")
        else:
            st.session_state[pending_key] = {"decision": decision, "reviewer": reviewer, "comment": comment}
            attempt = True
    pending = st.session_state.get(pending_key)
    busy = ""
    if attempt and pending is not None:
        try:
            saved = store.record(
                r.audit_id, sha, pending["decision"], pending["reviewer"], pending["comment"], slice_key=slice_key
            )
        except ReviewStoreBusyError as e:
            busy = str(e)
        except ReviewError as e:
            st.session_state.pop(pending_key, None)
            st.error(f"Not saved: {e}")
        else:
            st.session_state.pop(pending_key, None)
            st.success(f"Saved: **{saved.decision}** by {saved.reviewer} at {saved.created_at} (record {saved.id}).")
            latest[sha] = saved
    pending = st.session_state.get(pending_key)
    if pending is not None:
        # never dropped: the decision waits here, with a Retry, until the database has committed it
        st.error(
            f"Not saved yet: **{pending['decision']}** by {pending['reviewer']}. "
            f"{busy or 'The reviews database was busy at the last try.'} The decision is kept on this page "
            "until it is saved.",
            icon=":material/lock_clock:",
        )
        st.button("Retry saving the decision", key=retry_key, type="primary")
    hist = store.history(r.audit_id, sha)
    if hist:
        with st.expander(f"History of this slice ({len(hist)} decision(s))"):
            st.dataframe(
                pd.DataFrame(
                    [
                        {"when": h.created_at, "decision": h.decision, "reviewer": h.reviewer, "comment": h.comment}
                        for h in hist
                    ]
                ),
                hide_index=True,
                width="stretch",
            )


def _slice_key(row: Any) -> str:
    return f"{row['synthetic_path']}#{int(row['slice_index'])}"


def _record(r: Any, store: ReviewStore, row: Any, decision: str, reviewer: str, comment: str) -> Any:
    """Save one decision; a busy database keeps it pending (with a Retry), never drops it. The saved review or None."""
    sha = str(row["sha256"])
    pending_key = f"pending_{sha[:16]}"
    try:
        saved = store.record(r.audit_id, sha, decision, reviewer, comment, slice_key=_slice_key(row))
    except ReviewStoreBusyError as e:
        st.session_state[pending_key] = {"decision": decision, "reviewer": reviewer, "comment": comment}
        st.session_state["_queue_msg"] = ("error", f"Not saved yet: **{decision}**. {e}")
        return None
    except ReviewError as e:
        st.session_state["_queue_msg"] = ("error", f"Not saved: {e}")
        return None
    st.session_state.pop(pending_key, None)
    return saved


def _queue_decide(r: Any, store_path: str, order: list[int], row_index: int, decision: str) -> None:
    """Save and next (a button's callback, before the page redraws)."""
    reviewer = str(st.session_state.get("reviewer_name") or "").strip()
    if not reviewer:
        st.session_state["_queue_msg"] = ("warning", "Enter the reviewer's name first; nothing was saved.")
        return
    row = r.table.iloc[row_index]
    saved = _record(r, ReviewStore(store_path), row, decision, reviewer, str(st.session_state.get("rq_comment", "")))
    if saved is None:
        return
    st.session_state["rq_comment"] = ""
    pos = order.index(row_index)
    done = pos + 1 >= len(order)
    if not done:
        st.session_state["review_row"] = order[pos + 1]
    st.session_state["_queue_msg"] = (
        "success",
        f"Saved: **{saved.decision}** by {saved.reviewer} for pair {pos + 1} (record {saved.id})."
        + (" That was the last flagged pair." if done else f" Now pair {pos + 2} of {len(order)}."),
    )


def _queue_step(order: list[int], delta: int) -> None:
    cur = st.session_state.get("review_row")
    pos = order.index(cur) if cur in order else 0
    st.session_state["review_row"] = order[min(max(pos + delta, 0), len(order) - 1)]
    st.session_state.pop("_queue_msg", None)


def review_queue(entry: Entry, flags: np.ndarray, store: ReviewStore, latest: dict[str, Any]) -> None:
    """One flagged pair at a time in the ranking on screen: decide with a button or a key, and move on."""
    r = entry.result
    order = ui.review_order(r.table, flags)
    if not order:
        st.info("No slice is flagged at this setting: nothing to review.")
        return
    cur = st.session_state.get("review_row")
    if cur not in order:  # first visit, or the setting changed: the first undecided pair in the ranking
        undecided = [i for i in order if str(r.table.iloc[i]["sha256"]) not in latest]
        cur = (undecided or order)[0]
        st.session_state["review_row"] = cur
    pos = order.index(cur)
    row = r.table.iloc[cur]
    sha = str(row["sha256"])
    dec = latest.get(sha)
    keys = ui.REVIEW_SHORTCUTS
    st.subheader(f"Pair {pos + 1} of {len(order)} (most significant first)")
    facts = (
        f"`{_slice_key(row)}` · similarity {float(row['similarity']):.4f} · p {ui.format_p(float(row['p_value']))}"
        f" · matched subject {row['nearest_train_subject']} · decision: **{dec.decision if dec else '—'}**"
    )
    if st.session_state.get("show_truth") and isinstance(row.get("label"), str) and row.get("label"):
        facts += f" · ground truth: **{row['label']}**"
    st.markdown(facts, help="Ground truth is hidden during review; the toggle above reveals it.")
    try:
        ev = pair_of(entry, cur)
    except Exception as e:  # noqa: BLE001 - shown, not raised
        log.exception("pair evidence failed")
        st.error(f"The evidence for this slice cannot be shown ({type(e).__name__}: {e}).")
        ev = None
    if ev is not None:
        view = {"low": 0.0, "high": 1.0, "size": 512, "resample": "nearest"}
        cols = st.columns(3)
        _img(cols[0], ev.synthetic, "synthetic", view)
        if ev.aligned is not None:
            _img(cols[1], ev.aligned, "aligned training", view)
            _img(cols[2], ev.difference, "|synthetic − aligned| ×4", {**view, "high": 0.25}, diff=True)
        else:
            first = next(iter(ev.layers.values()))[0]
            _img(cols[1], first["image"], "nearest training", view)
    c1, c2 = st.columns([1, 3])
    c1.text_input("Reviewer name", key="reviewer_name")
    c2.text_input("Comment (saved with the next decision)", key="rq_comment")
    b = st.columns(6)
    for k, d in enumerate(DECISIONS):
        b[k].button(
            f"{d.capitalize()} · save and next",
            key=f"rq_{d.replace(' ', '_')}",
            shortcut=keys[d],
            type="primary" if dec is not None and dec.decision == d else "secondary",
            on_click=_queue_decide,
            args=(r, str(store.path), order, cur, d),
            width="stretch",
        )
    b[4].button("◀ Previous", key="rq_prev", shortcut=keys["previous"], on_click=_queue_step, args=(order, -1),
                disabled=pos == 0, width="stretch")  # fmt: skip
    b[5].button("Next ▶", key="rq_next", shortcut=keys["next"], on_click=_queue_step, args=(order, 1),
                disabled=pos + 1 >= len(order), width="stretch")  # fmt: skip
    st.caption(
        "Keys: "
        + " · ".join(f"**{keys[d]}** {d}" for d in DECISIONS)
        + f" (each saves and moves to the next pair) · **{keys['next']}** next · **{keys['previous']}** previous."
        " The reviewer's name is required; decisions are saved before the next pair is shown."
    )
    msg = st.session_state.get("_queue_msg")
    if msg:
        {"error": st.error, "warning": st.warning, "success": st.success}[msg[0]](msg[1])
    pending = st.session_state.get(f"pending_{sha[:16]}")
    if pending is not None:
        st.error(
            f"Not saved yet: **{pending['decision']}** by {pending['reviewer']}; kept here until the database has it.",
            icon=":material/lock_clock:",
        )
        if st.button("Retry saving the decision", key=f"rq_retry_{sha[:16]}", type="primary"):
            if _record(r, store, row, pending["decision"], pending["reviewer"], pending["comment"]) is not None:
                st.session_state["_queue_msg"] = ("success", f"Saved: **{pending['decision']}**.")
                st.rerun()
    if st.button("Open this pair in the full viewer", key="rq_open"):
        _open_pair(cur)
        st.rerun()


def review_page(entry: Entry, alpha: float, fdr: bool, store: ReviewStore | None, latest: dict[str, Any]) -> None:
    r = entry.result
    flags = r.flags(alpha, fdr)
    shas = r.table.loc[flags, "sha256"].astype(str).tolist()
    if store is not None:
        done, total = store.progress(r.audit_id, shas)
        st.subheader(f"Review progress: {done} of {total} flagged pairs decided")
        bh = " with Benjamini–Hochberg" if fdr else ""
        st.progress(done / total if total else 1.0, text=f"{done} / {total} at α = {ui.format_alpha(alpha)}{bh}")
        review_queue(entry, flags, store, latest)
    else:
        st.caption("No usable reviews database; set one in the sidebar.")
    st.subheader("Per training subject")
    st.caption("The unit a privacy officer signs off: how many synthetic slices copy each training subject.")
    st.dataframe(
        ui.subject_review_frame(ui.subjects_at(entry, alpha, fdr), r.table, flags, latest, DECISIONS),
        hide_index=True,
        width="stretch",
    )
    if store is not None:
        st.subheader("All decisions of this audit")
        df = store.to_frame(r.audit_id)
        if df.empty:
            st.caption("No decision recorded yet.")
        else:
            st.dataframe(
                df[["slice_key", "decision", "comment", "reviewer", "created_at"]], hide_index=True, width="stretch"
            )
        st.caption(f"Stored in {store.path}")


def export_page(entry: Entry, alpha: float, fdr: bool, store: ReviewStore | None, latest: dict[str, Any]) -> None:
    r = entry.result
    from inspector import report
    from inspector.folder import (
        DEFAULT_REVIEWS_FILE,
        AuditFolderError,
        release_blockers,
        release_checklist,
        save_audit,
    )
    from inspector.review import SIGNOFF_DECISIONS, SignOff, SignOffError

    v = r.calibration.verdict(alpha, fdr)
    flags = r.flags(alpha, fdr)
    counts = ui.review_counts(r.table, flags, latest)
    checklist = release_checklist(v, evidence_note=r.evidence_note, **counts)
    st.subheader("Release decision")
    verdict_box(r, v)
    rule = "Benjamini–Hochberg at" if fdr else "α ="
    st.markdown(
        f"**Setting:** {rule} {ui.format_alpha(alpha)} · null: {v.null_kind} of {v.n_null} slices (smallest "
        f"possible p-value {v.min_p_value:.3g}) · {counts['n_reviewed']} of {counts['n_flagged']} flagged pairs "
        "reviewed"
    )
    st.markdown("**Release checklist**")
    st.markdown(
        "\n".join(f"- {'✅' if c.ok else '❌'} **{c.name}**: {c.detail}" for c in checklist),
    )
    blocking = release_blockers(checklist, "release")
    if blocking:
        st.warning(
            f"A **release** is refused without a stated reason while {len(blocking)} item(s) above fail.",
            icon=":material/gpp_maybe:",
        )

    st.subheader("Scores and decisions")
    reviews = store.to_frame(r.audit_id) if store is not None else pd.DataFrame(columns=["slice_sha256"])
    scores = ui.scores_with_decisions(r.table, reviews)
    scores["flagged"] = flags.astype(int)  # at the setting on screen, like every count above
    subjects = ui.subjects_at(entry, alpha, fdr)
    st.caption(f"Both files at the setting on screen ({'Benjamini–Hochberg at' if fdr else 'α ='} "
               f"{ui.format_alpha(alpha)}).")  # fmt: skip
    st.download_button(
        "Download scores.csv (with decisions)",
        scores.to_csv(index=False).encode(),
        file_name=f"scores_{r.audit_id[:12]}.csv",
        mime="text/csv",
        key="dl_scores",
    )
    st.download_button(
        "Download subjects.csv",
        subjects.to_csv(index=False).encode(),
        file_name=f"subjects_{r.audit_id[:12]}.csv",
        mime="text/csv",
        key="dl_subjects",
    )
    st.subheader("Release report")
    out_dir = ui.audit_folder_path(r.audit_id)
    shared = store is not None and store.path.expanduser().absolute() == (out_dir / DEFAULT_REVIEWS_FILE).absolute()
    st.caption(
        f"The report is written at the setting on screen ({rule} {ui.format_alpha(alpha)}). Saves the audit folder "
        f"to {out_dir} and writes report.html into it"
        + (
            "; its reviews.sqlite3 holds this audit's decisions, so `inspector report --audit` there reads them too."
            if shared
            else f"; decisions are read from {store.path if store is not None else 'nowhere'}."
        )
    )
    with st.form("report_form", border=True):
        sign = st.checkbox("Record a release sign-off in the report", key="so_enable")
        c1, c2, c3 = st.columns(3)
        signer = c1.text_input("Signed off by", key="so_signer")
        role = c2.text_input("Role", "privacy officer", key="so_role")
        decision = c3.selectbox(
            "Release decision", SIGNOFF_DECISIONS, index=None, placeholder="Choose a decision", key="so_decision"
        )
        reason = st.text_input(
            "Reason (required while flagged pairs are unreviewed, and for a release while a checklist item fails)",
            key="so_reason",
        )
        build = st.form_submit_button("Save the audit and build the report", type="primary", key="build_report")
    if build:
        try:
            if sign and decision is None:
                raise SignOffError("Choose a release decision first; nothing was signed or written.")
            signoff = SignOff(signer=signer, role=role, decision=decision, reason=reason) if sign else None
            with st.spinner("Writing the audit folder and the report"):
                save_audit(r, out_dir)
                html = report.write_report(
                    out_dir,
                    out_dir / "report.html",
                    reviews=None if shared or store is None else store.path,
                    signoff=signoff,
                    alpha=alpha,
                    fdr=fdr,
                )
            st.session_state["report_path"] = str(html)
        except (SignOffError, AuditFolderError, ValueError, OSError) as e:
            st.error(f"The report was not written: {e}")
        except Exception as e:  # noqa: BLE001 - shown, not raised
            log.exception("report failed")
            st.error(f"The report could not be written ({type(e).__name__}: {e}). The server log has the details.")
    path = st.session_state.get("report_path")
    if path and Path(path).is_file() and Path(path).parent == out_dir:
        st.success(f"Audit saved to {out_dir}; report written to {path}.")
        st.download_button(
            "Download report.html",
            Path(path).read_bytes(),
            file_name=f"report_{r.audit_id[:12]}.html",
            mime="text/html",
            key="dl_report",
        )


# ==============================================================================================
# Main
# ==============================================================================================


def main() -> None:
    vals = inputs_ui()
    if vals["run"]:
        key = run_audit(vals)
        st.session_state["active"] = key
        st.session_state.pop("pair_index", None)
        if key is not None:
            st.session_state["view_alpha"] = audit_store()[key].result.config.alpha
            st.session_state["view_fdr"] = audit_store()[key].result.config.fdr
        else:
            return
    key = st.session_state.get("active")
    entry = audit_store().get(key) if key else None
    if entry is None:
        st.title("MRI Memorization Inspector")
        st.info(
            "Choose the training cohort, the synthetic set and (ideally) a holdout of unseen real scans in the "
            "sidebar, then press **Run audit**. The defaults point at the bundled sample data."
        )
        return

    header(entry)
    # the reviewer's name survives page changes (Streamlit drops the state of widgets a page does not draw)
    if st.session_state.get("reviewer_name"):
        st.session_state["_reviewer"] = st.session_state["reviewer_name"]
    elif st.session_state.get("_reviewer"):
        st.session_state["reviewer_name"] = st.session_state["_reviewer"]
    store = review_store(str(ui.reviews_db_for(entry.result.audit_id, vals["reviews_db"])))
    latest = _latest(store, entry.result.audit_id)
    c1, c2, c3, c4 = st.columns([3, 2, 1, 1], vertical_alignment="bottom")
    page = c1.radio("Page", PAGES, key="page", horizontal=True, label_visibility="collapsed")
    if "view_alpha" not in st.session_state:
        st.session_state["view_alpha"] = entry.result.config.alpha
    if "view_fdr" not in st.session_state:
        st.session_state["view_fdr"] = entry.result.config.fdr
    alpha = c2.select_slider(
        "Flag threshold α (per-slice false-positive rate; no recomputation)",
        ui.ALPHAS,
        format_func=ui.format_alpha,
        key="view_alpha",
    )
    # every page reads the flags at this one (alpha, fdr) from the audit's Calibration
    fdr = c3.toggle("Benjamini–Hochberg", key="view_fdr", help="Control the false discovery rate at α instead.")
    if entry.result.has_ground_truth:  # reviews are blind by default; a researcher can reveal the labels
        c4.toggle("Show ground truth", key="show_truth", help="labels.csv; hidden by default so reviews stay blind.")
    if page == "Overview":
        overview_page(entry, alpha, fdr)
    elif page == "Flagged":
        flagged_page(entry, alpha, fdr, latest)
    elif page == "Pair":
        pair_page(entry, alpha, fdr, store, latest)
    elif page == "Volumes":
        volumes_page(entry, alpha, fdr)
    elif page == "Review":
        review_page(entry, alpha, fdr, store, latest)
    elif page == "Research":
        research_page(entry, alpha, fdr)
    else:
        export_page(entry, alpha, fdr, store, latest)


main()
