"""The release report: pair evidence and provenance in the audit folder, a self-contained HTML report,
a machine-readable ``summary.json``, and the privacy officer's sign-off.

Three steps, each reading only what the previous wrote:

It only renders: the audit folder's format (saving, loading, the evidence and the manifest) lives in
:mod:`inspector.folder`, the review and sign-off store in :mod:`inspector.review`, and every flag, threshold
and verdict is asked of the folder's :class:`~inspector.calibration.Calibration`.

1. :func:`inspector.folder.save_audit` (the end of ``inspector scan``) writes the folder.
2. :func:`write_report` reads the audit folder (never the cohorts), the reviewer decisions
   (:class:`~inspector.review.ReviewStore`) and the sign-offs, and writes one HTML file that opens
   offline (images as base64 PNG, inline CSS and SVG, no script, no external link), starting with a one-page
   summary (verdict, alpha, BH, null, test, counts, reviews, checklist, sign-off), plus
   ``<name>.summary.json`` beside it, validated against ``inspector/schemas/summary.schema.json``.
3. :func:`inspector.folder.sign_off` records a :class:`~inspector.review.SignOff` in an append-only
   ``signoffs`` table of the review
   database, only when every flagged pair has a reviewer decision or the signer states why not.

The report states its own sha256, computed over the HTML with the hash replaced by 64 zeros;
:func:`verify_report` checks it.

No protected health information: the audit folder and the report hold pseudonymous subject IDs,
pseudonymous labels in place of file and folder names (relative paths when the audit ran with
``show_paths``; :mod:`inspector.naming`) and hashes only (each cohort root as ``root_sha256``); raw DICOM
``PatientName``/``PatientID`` never reach this module (:mod:`inspector.io` pseudonymises them on reading).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .cache import atomic_write_bytes
from .folder import (
    MAX_EVIDENCE_PAIRS,
    AuditFolder,
    _now,
    folder_checklist,
    load_audit_folder,
    report_summary,
    review_state,
    reviews_path,
    sign_off,
    signoffs,
    validate_summary,
)
from .privacy import root_hash
from .result import jsonable

if TYPE_CHECKING:  # pragma: no cover
    from .review import RecordedSignOff, Review, SignOff

__all__ = ["summary_path_for", "svg_histogram", "svg_layers", "svg_roc", "verify_report", "write_report"]

log = logging.getLogger(__name__)

#: Lower bound of the white end of the difference-map window (intensities are in [0, 1]).
DIFF_WINDOW_FLOOR = 0.1

_HASH_ZEROS = "0" * 64
_HASH_MARK = '<code id="report-sha256">'
_HASH_RE = re.compile(rb'<code id="report-sha256">([0-9a-f]{64})</code>')
# ----------------------------------------------------------------------------------------------
# Images and histograms
# ----------------------------------------------------------------------------------------------


def _window(img: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.5) -> tuple[float, float]:
    v = img[np.isfinite(img)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    if hi - lo < 1e-6:
        lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return float(lo), float(hi)


def _hot(x: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white colour map, x in [0, 1] -> (H, W, 3) uint8."""
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _png_uri(img: np.ndarray, *, window: tuple[float, float] | None = None, hot: bool = False) -> str:
    """A float image (H, W) windowed (percentiles by default) into a base64 PNG data URI."""
    from PIL import Image

    a = np.asarray(img, np.float32)
    lo, hi = window if window is not None else _window(a)
    x = np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    pil = Image.fromarray(_hot(x), "RGB") if hot else Image.fromarray(np.round(x * 255).astype(np.uint8), "L")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt_tick(v: float) -> str:
    return f"{v:.3g}"


def _svg_frame(
    width: int, height: int, label: str, cls: str, title: str, plot: tuple[float, float, float, float]
) -> list[str]:
    """The opening of an inline SVG figure: the ``<svg>`` element (``aria-label`` and class), the title when there
    is one, and the plot area's frame at ``plot = (left, top, width, height)``; all text escaped."""
    e = html.escape
    ml, mt, pw, ph = plot
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{e(label)}" class="{cls}">'
    ]
    if title:
        parts.append(f'<text x="{ml}" y="18" class="t">{e(title)}</text>')
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    return parts


def svg_histogram(
    groups: Sequence[tuple[str, Sequence[float] | np.ndarray, str]],
    *,
    markers: Sequence[tuple[float, str, str]] = (),
    bins: int = 40,
    width: int = 900,
    height: int = 260,
    xlabel: str = "",
    title: str = "",
) -> str:
    """An inline SVG of overlaid density histograms with vertical marker lines (no script, no font file).

    Parameters
    ----------
    groups : sequence of (label, values, colour)
        Each group's values (any shape, non-finite values dropped) are drawn as a density (area 1).
    markers : sequence of (x, label, colour)
        Vertical dashed lines (non-finite x are left out).
    bins : int
        Shared bins over the range of all values and markers.

    Returns
    -------
    str
        An ``<svg>`` element; all text escaped.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}.")
    vals = [np.asarray(v, np.float64).ravel() for _, v, _ in groups]
    vals = [v[np.isfinite(v)] for v in vals]
    mk = [(float(x), lab, col) for x, lab, col in markers if x is not None and math.isfinite(float(x))]
    pool = np.concatenate([*vals, np.array([x for x, _, _ in mk], np.float64)]) if (vals or mk) else np.zeros(0)
    if pool.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(pool.min()), float(pool.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    dens = []
    for v in vals:
        c, _ = np.histogram(v, bins=edges)
        dens.append(c / (max(len(v), 1) * (edges[1] - edges[0])))
    ymax = max([float(d.max()) for d in dens if d.size] + [1e-12])
    ml, mr, mt, mb = 52, 250, 28 if title else 12, 44
    pw, ph = width - ml - mr, height - mt - mb

    def sx(x: float) -> float:
        return ml + (x - lo) / (hi - lo) * pw

    def sy(y: float) -> float:
        return mt + ph - y / (ymax * 1.08) * ph

    e = html.escape
    parts = _svg_frame(width, height, title or xlabel, "hist", title, (ml, mt, pw, ph))
    for t in np.linspace(lo + pad, hi - pad, 5):
        x = sx(float(t))
        parts.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" stroke="#666"/>')
        parts.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle">{e(_fmt_tick(float(t)))}</text>')
    parts.append(f'<text x="{ml - 4}" y="{mt + 10}" text-anchor="end">{e(_fmt_tick(ymax))}</text>')
    parts.append(f'<text x="{ml - 4}" y="{mt + ph}" text-anchor="end">0</text>')
    parts.append(
        f'<text x="12" y="{mt + ph / 2:.1f}" transform="rotate(-90 12 {mt + ph / 2:.1f})" '
        'text-anchor="middle">density</text>'
    )
    if xlabel:
        parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{e(xlabel)}</text>')
    for (label, _, colour), d, v in zip(groups, dens, vals, strict=True):
        if not v.size:
            continue
        pts = [f"{sx(edges[0]):.1f},{sy(0):.1f}"]
        for i, h in enumerate(d):
            pts.append(f"{sx(edges[i]):.1f},{sy(h):.1f}")
            pts.append(f"{sx(edges[i + 1]):.1f},{sy(h):.1f}")
        pts.append(f"{sx(edges[-1]):.1f},{sy(0):.1f}")
        parts.append(
            f'<polygon points="{" ".join(pts)}" fill="{e(colour)}" fill-opacity="0.35" stroke="{e(colour)}" '
            f'stroke-width="1.2"><title>{e(label)} (n = {v.size})</title></polygon>'
        )
    for x, label, colour in mk:
        parts.append(
            f'<line x1="{sx(x):.1f}" y1="{mt}" x2="{sx(x):.1f}" y2="{mt + ph}" stroke="{e(colour)}" '
            f'stroke-width="1.5" stroke-dasharray="5,3"><title>{e(label)} = {x:.4g}</title></line>'
        )
    ly, lx = mt + 10, ml + pw + 14
    for label, v, colour in [(g[0], v, g[2]) for g, v in zip(groups, vals, strict=True)]:
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{e(colour)}"/>')
        parts.append(f'<text x="{lx + 15}" y="{ly}">{e(label)} (n = {v.size})</text>')
        ly += 15
    for x, label, colour in mk:
        parts.append(
            f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 10}" y2="{ly - 4}" stroke="{e(colour)}" '
            'stroke-width="1.5" stroke-dasharray="3,2"/>'
        )
        parts.append(f'<text x="{lx + 15}" y="{ly}">{e(label)} = {x:.4g}</text>')
        ly += 15
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em;margin:.2em 0}
.meta{color:#555;font-size:.9em}
.verdict{padding:14px 18px;border-radius:6px;font-size:1.15em;margin:12px 0;border-left:8px solid}
.verdict.fail{background:#fdecea;border-color:#c62828}.verdict.review{background:#fff8e1;border-color:#f9a825}
.verdict.pass{background:#e8f5e9;border-color:#2e7d32}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:8px 12px;border-radius:4px;margin:8px 0}
.bad{color:#c62828;font-weight:600}.ok{color:#2e7d32;font-weight:600}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.hash{font-family:Menlo,Consolas,monospace;font-size:.85em;word-break:break-all}
.pair{border:1px solid #ccc;border-radius:6px;padding:10px 14px;margin:14px 0;page-break-inside:avoid}
.pair.flagged{border-left:6px solid #c62828}.pair.context{border-left:6px solid #90a4ae}
.imgs{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.78em;max-width:170px}
figure img{width:160px;height:160px;image-rendering:pixelated;border:1px solid #888;background:#000}
figure.small{max-width:124px}figure.small img{width:116px;height:116px}
.layer{display:flex;gap:10px;align-items:flex-start;margin-top:6px}.layer>b{min-width:110px;padding-top:40px}
.review{padding:6px 10px;border-radius:4px;margin:6px 0}
.review.done{background:#e3f2fd}.review.none{background:#fdecea;font-weight:600}
.hist text{font-size:11px;fill:#333}.hist text.t{font-size:13px;font-weight:600}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
.signoff{border:2px solid #333;border-radius:6px;padding:12px 18px;margin:12px 0}
.sigline{margin-top:28px;border-top:1px solid #333;width:320px;font-size:.85em;color:#555}
table{table-layout:fixed;max-width:100%;word-break:break-word;overflow-wrap:anywhere}
table.kv th{width:28%}table.checklist td.mark{width:2em;text-align:center}table.checklist th{width:32%}
.onepage{page-break-after:always;break-after:page}
@page{size:A4;margin:14mm 12mm}
@media print{body{max-width:none;padding:0;font-size:10pt}details{display:block}details>summary{display:block}
.pair{page-break-inside:avoid;break-inside:avoid}table{width:100%;font-size:8.5pt}th,td{padding:2px 4px}
code,.hash{word-break:break-all}figure img{width:140px;height:140px}figure.small img{width:100px;height:100px}
.imgs{gap:6px}a{color:inherit;text-decoration:none}}
"""


def svg_roc(curves: Sequence[dict[str, Any]], *, width: int = 560, height: int = 380, title: str = "") -> str:
    """An inline SVG of ROC curves (step lines) with the chance diagonal and an AUC legend.

    Parameters
    ----------
    curves : sequence of dict
        As :func:`inspector.ui.roc_curves` returns them: ``name``, ``fpr`` (shape (k,)), ``tpr`` (shape (k,)),
        ``auc``, ``n``.

    Returns
    -------
    str
        An ``<svg>`` element; all text escaped.
    """
    e = html.escape
    ml, mr, mt, mb = 52, 16, 28 if title else 12, 44 + 18 * len(curves)
    pw, ph = width - ml - mr, height - mt - mb

    def sx(x: float) -> float:
        return ml + x * pw

    def sy(y: float) -> float:
        return mt + (1.0 - y) * ph

    parts = _svg_frame(width, height, title or "ROC", "hist roc", title, (ml, mt, pw, ph))
    parts.append(
        f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(1):.1f}" y2="{sy(1):.1f}" stroke="#aaa" '
        'stroke-dasharray="3,3"/>'
    )
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{sx(t):.1f}" y="{mt + ph + 16}" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{ml - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(
        f'<text x="{ml + pw / 2:.1f}" y="{mt + ph + 34}" text-anchor="middle">false-positive rate (novel slices)</text>'
    )
    parts.append(
        f'<text x="12" y="{mt + ph / 2:.1f}" transform="rotate(-90 12 {mt + ph / 2:.1f})" '
        'text-anchor="middle">true-positive rate (copies)</text>'
    )
    colours = ("#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a")
    for k, c in enumerate(curves):
        fpr = np.asarray(c["fpr"], np.float64)
        tpr = np.asarray(c["tpr"], np.float64)
        pts = [f"{sx(fpr[0]):.1f},{sy(tpr[0]):.1f}"]
        for i in range(1, len(fpr)):  # a step: along the false positives first, then up
            pts.append(f"{sx(fpr[i]):.1f},{sy(tpr[i - 1]):.1f}")
            pts.append(f"{sx(fpr[i]):.1f},{sy(tpr[i]):.1f}")
        col = colours[k % len(colours)]
        parts.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{col}" stroke-width="2.5"/>')
        y = mt + ph + 52 + 18 * k
        parts.append(f'<rect x="{ml}" y="{y - 9}" width="14" height="4" fill="{col}"/>')
        parts.append(
            f'<text x="{ml + 20}" y="{y - 4}">{e(str(c["name"]))}: AUC {float(c["auc"]):.3f} '
            f"over {int(c['n'])} labelled slices</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_layers(
    table: pd.DataFrame, layers: Sequence[str], flags: np.ndarray, *, width: int = 900, height: int = 280
) -> str:
    """An inline SVG of each feature layer's similarity over the synthetic set, flagged against not flagged:
    per layer the median (dot) and the interquartile range (bar) of ``sim_<layer>`` for each group.

    Parameters
    ----------
    table : pandas.DataFrame
        The score table (``sim_<layer>`` columns).
    layers : sequence of str
    flags : np.ndarray of bool, shape (n,)
        The flags at the report's setting.

    Returns
    -------
    str
        An ``<svg>`` element; all text escaped.
    """
    from .ui import layer_columns

    e = html.escape
    flags = np.asarray(flags, bool)
    cols = layer_columns(table, layers)
    groups = [(~flags, "not flagged", "#1565c0", -7), (flags, "flagged", "#c62828", 7)]
    vals = [table[c].to_numpy(np.float64) for c in cols]
    pool = np.concatenate([v[np.isfinite(v)] for v in vals]) if vals else np.zeros(0)
    lo, hi = (float(pool.min()), float(pool.max())) if pool.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    ml, mr, mt, mb = 60, 170, 28, 56
    pw, ph = width - ml - mr, height - mt - mb

    def sx(i: int) -> float:
        return ml + (i + 0.5) * pw / max(len(cols), 1)

    def sy(y: float) -> float:
        return mt + (hi - y) / (hi - lo) * ph

    parts = _svg_frame(
        width,
        height,
        "similarity per feature layer",
        "hist layers",
        "Similarity to the nearest training slice, per feature layer",
        (ml, mt, pw, ph),
    )
    for t in np.linspace(lo + pad, hi - pad, 4):
        parts.append(f'<text x="{ml - 4}" y="{sy(float(t)) + 4:.1f}" text-anchor="end">{e(_fmt_tick(float(t)))}</text>')
    for i, (c, v) in enumerate(zip(cols, vals, strict=True)):
        parts.append(f'<text x="{sx(i):.1f}" y="{mt + ph + 16}" text-anchor="middle">{e(c[4:])}</text>')
        for mask, _, col, dx in groups:
            x = v[mask & np.isfinite(v)]
            if not x.size:
                continue
            q1, med, q3 = (float(q) for q in np.percentile(x, [25, 50, 75]))
            cx = sx(i) + dx
            parts.append(
                f'<line x1="{cx:.1f}" y1="{sy(q1):.1f}" x2="{cx:.1f}" y2="{sy(q3):.1f}" stroke="{col}" '
                'stroke-width="5" stroke-opacity="0.45"/>'
            )
            parts.append(f'<circle cx="{cx:.1f}" cy="{sy(med):.1f}" r="4" fill="{col}"/>')
    parts.append(
        f'<text x="{ml + pw / 2:.1f}" y="{height - 22}" text-anchor="middle">feature layer (shallow → deep)</text>'
    )
    for k, (mask, name, col, _) in enumerate(groups):
        y = mt + 14 + 18 * k
        parts.append(f'<circle cx="{ml + pw + 16}" cy="{y - 4}" r="4" fill="{col}"/>')
        parts.append(f'<text x="{ml + pw + 26}" y="{y}">{e(name)} (n={int(mask.sum())})</text>')
    parts.append(f'<text x="{ml + pw + 16}" y="{mt + 54}">dot: median; bar: quartiles</text>')
    parts.append("</svg>")
    return "".join(parts)


def _research_html(folder: AuditFolder) -> str:
    """The dataset-level per-layer panel and, where labels exist, the ROC of ours and the paper's method: the
    same numbers as the app's Research page (:func:`inspector.ui.layer_summary`, :func:`inspector.ui.roc_curves`),
    at the report's setting."""
    from .ui import layer_summary, roc_curves

    t = folder.table
    flags = folder.calibration.flags()
    layers = [str(x) for x in folder.summary.get("layers", [])] or [c[4:] for c in t.columns if c.startswith("sim_")]
    summary = layer_summary(t, layers, flags)
    curves = roc_curves(t)
    out = ['<h2 id="research">Per feature layer and ROC</h2>']
    out.append(
        f'<p class="meta">At {_e(_setting_words(folder.verdict.to_dict()))}. Each layer\'s similarity to its nearest '
        "training slice over the synthetic set, flagged against not flagged (the audit keeps only the null's final "
        "score, not its per-layer similarities)"
        + ("; the AUC column is each layer alone against labels.csv (copy against novel)." if curves else ".")
        + "</p>"
    )
    out.append(svg_layers(t, layers, flags))
    shown = summary if curves else summary.drop(columns=["auc"])
    shown = shown.rename(
        columns={
            "median_flagged": "median, flagged",
            "median_not_flagged": "median, not flagged",
            "auc": "AUC (copy vs novel)",
        }  # fmt: skip
    )
    out.append(_df_table(shown, max_rows=len(shown) + 1))
    if curves:
        out.append(svg_roc(curves, title="The paper's method and ours on one ROC (labels.csv)"))
        out.append(
            '<p class="meta">The paper\'s ONI = −tanh(MI z) ranks the slices as its MI z-score does, so it has the '
            "same curve.</p>"
        )
    else:
        out.append(
            '<p class="meta">No ROC: the synthetic set has no ground truth (a labels.csv with copy and novel '
            "slices).</p>"
        )
    return "\n".join(out)


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any, fmt: str = ".4g") -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(x)
    if not math.isfinite(v):
        return "n/a"
    return format(v, fmt)


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _df_table(df: pd.DataFrame, *, max_rows: int, numeric_fmt: str = ".4g") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = []
    for _, r in df.head(max_rows).iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            if isinstance(v, int | np.integer):
                cells.append(f'<td class="num">{int(v)}</td>')
            elif isinstance(v, float | np.floating):
                cells.append(f'<td class="num">{_num(v, numeric_fmt)}</td>')
            else:
                cells.append(f"<td>{_e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = ""
    if len(df) > max_rows:
        more = f'<p class="meta">… and {len(df) - max_rows} more rows (see the CSV file in the audit folder).</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _figure(
    img: np.ndarray, caption: str, *, hot: bool = False, window: tuple[float, float] | None = None, css: str = ""
) -> str:
    src = _png_uri(img, hot=hot, window=window)
    cap = _e(caption)
    return f'<figure class="{_e(css)}"><img alt="{cap}" src="{src}"><figcaption>{cap}</figcaption></figure>'


def _review_html(rev: Review | None) -> str:
    if rev is None:
        return '<div class="review none">UNREVIEWED: no reviewer decision recorded for this pair.</div>'
    comment = f" Comment: “{_e(rev.comment)}”" if rev.comment else " (no comment)"
    return (
        f'<div class="review done">Reviewer decision: <b>{_e(rev.decision)}</b> by {_e(rev.reviewer)} '
        f"on {_e(rev.created_at)}.{comment}</div>"
    )


def _pair_html(folder: AuditFolder, row: int, rank: int, rev: Review | None, *, flagged: bool, full: bool) -> str:
    t = folder.table.iloc[row]
    key = f"{t['synthetic_path']}#{int(t['slice_index'])}"
    near = f"{t.get('nearest_train_path', '')}#{t.get('nearest_train_slice', '')}"
    subj = t.get("nearest_train_subject", "")
    cls = "flagged" if flagged else "context"
    out = [f'<section class="pair {cls}" id="pair-{row}">']
    out.append(
        f"<h3>{'Flagged' if flagged else 'Unflagged'} pair {rank}: synthetic <code>{_e(key)}</code> "
        f"→ training <code>{_e(near)}</code> (subject {_e(subj)})</h3>"
    )
    if flagged:
        out.append(_review_html(rev))
    elif rev is not None:
        out.append(_review_html(rev))
    facts = [
        ("p-value", _num(t["p_value"])),
        ("similarity", _num(t["similarity"])),
        ("MI (calibrated)", _num(t["mi"])),
        ("MI z (paper)", _num(t["mi_z"])),
        ("ONI (paper)", _num(t["oni"])),
    ]
    for col, label in (
        ("layer_consensus", "layers agreeing on the subject"),
        ("margin", "margin to the next subject"),
        ("align_ncc", "aligned NCC"),
        ("pixel_corr", "pixel correlation"),
    ):
        if col in t.index and str(t[col]) != "":
            facts.append((label, _num(t[col])))
    out.append(
        "<table><tr>"
        + "".join(f"<th>{_e(k)}</th>" for k, _ in facts)
        + "</tr><tr>"
        + "".join(f'<td class="num">{_e(v)}</td>' for _, v in facts)
        + "</tr></table>"
    )
    ev = folder.evidence
    pos = ev.position(row) if ev is not None else None
    if ev is None or pos is None:
        out.append(
            '<p class="warn">No images stored for this pair (the audit keeps at most '
            f"{MAX_EVIDENCE_PAIRS} pairs); see scores.csv.</p></section>"
        )
        return "".join(out)
    meta = ev.pairs[pos]
    tr = meta.get("transform") or {}
    if tr:
        shift = tr.get("shift") or [0, 0]
        out.append(
            f'<p class="meta">Registration of the best candidate: flip {_e(tr.get("flip", "none"))}, '
            f"rotation {_num(_round0(tr.get('angle')), '.2f')}°, scale {_num(tr.get('scale'), '.3f')}, "
            f"shift ({_num(_round0(shift[0]), '.2f')}, {_num(_round0(shift[1]), '.2f')}) px, "
            f"NCC {_num(tr.get('ncc'), '.4f')}.</p>"
        )
    figs = [_figure(ev.synthetic[pos], "synthetic")]
    if np.isfinite(ev.aligned[pos]).any():
        figs.append(_figure(ev.aligned[pos], "best training candidate, aligned"))
        d = ev.difference[pos]
        # never stretch float noise of an exact copy into a "hot" map: the window is at least 0.1 of the
        # intensity range [0, 1]
        hi = max(float(np.nanpercentile(d, 99.5)), DIFF_WINDOW_FLOOR)
        figs.append(
            _figure(
                d,
                f"|difference|, black 0 → white {hi:.3g} (mean {float(np.nanmean(d)):.3g})",
                hot=True,
                window=(0.0, hi),
            )
        )
    out.append('<div class="imgs">' + "".join(figs) + "</div>")
    if full:
        out.append('<p class="meta">Nearest training slices at each feature layer, in the matched view:</p>')
        for li, layer in enumerate(ev.layers):
            nbs = meta["layers"].get(layer, [])
            cells = []
            for nb in nbs:
                r = int(nb.get("rank", 0))
                ref = int(ev.neighbour_ref[pos, li, r]) if r < ev.neighbour_ref.shape[2] else -1
                if ref < 0:
                    continue
                cap = (
                    f"#{r + 1} {nb['subject_id']} · {nb['path']}#{nb['slice_index']} · "
                    f"sim {_num(nb['similarity'], '.3f')}"
                )
                cells.append(_figure(ev.neighbour_images[ref], cap, css="small"))
            out.append(
                f'<div class="layer"><b>layer {_e(layer)}</b>'
                f'<div class="imgs">{"".join(cells) or "<em>none</em>"}</div></div>'
            )
    out.append("</section>")
    return "".join(out)


def _verdict_class(v: dict[str, Any]) -> str:
    if v.get("copying"):
        return "fail"
    if int(v.get("n_flagged", 0)) or not v.get("decidable", True) or not v.get("alpha_reachable", True):
        return "review"  # never green when the setting could not have flagged a copy
    return "pass"


def _setting_words(v: dict[str, Any]) -> str:
    """The (alpha, BH) setting and the null, in words (the report states both on its first page)."""
    rule = (
        "with Benjamini–Hochberg false-discovery-rate control"
        if v.get("fdr")
        else "per slice, without Benjamini–Hochberg"
    )
    return (
        f"α = {_num(v.get('alpha'))} {rule}; null: {v.get('null_kind')} of {v.get('n_null')} slices "
        f"(smallest possible p-value {_num(v.get('min_p_value'), '.3g')})"
    )


def _summary_html(
    folder: AuditFolder, state: dict[str, Any], records: Sequence[RecordedSignOff], checklist: Sequence[Any]
) -> str:
    """The one-page summary a privacy officer signs: verdict, setting, test, counts, reviews, checklist, sign-off."""
    v = folder.verdict.to_dict()
    s = folder.summary
    cal = folder.calibration
    out = ['<section class="onepage" id="summary"><h2>Summary</h2>']
    out.append(f'<div class="verdict {_verdict_class(v)}">{_e(folder.verdict_text)}</div>')
    if v.get("warning") and not v.get("alpha_reachable", True):
        out.append(
            f'<p class="warn"><b>This setting cannot flag a copy.</b> {_e(v["warning"])} A release needs a stated '
            "reason.</p>"
        )
    dec = ", ".join(f"{k}: {n}" for k, n in state["decisions"].items() if n) or "none"
    if records:
        last = records[-1]
        signed = f"{last.decision}, by {last.signer} ({last.role}) on {last.date}" + (
            f"; reason: {last.reason}" if last.reason else ""
        )
    else:
        signed = "not signed off"
    rows = [
        ("Setting", _setting_words(v)),
        ("Mode, extractor", f"{v.get('mode')}, {(s.get('config') or {}).get('extractor')}"),
        (
            "Dataset test",
            f"{v.get('test')}: p = {_num(v.get('test_p_value'))} at level {_num(v.get('test_level'))} → "
            + ("copying" if v.get("copying") else "not copying" if v.get("decidable") else "not decided"),
        ),
        (
            "Flagged slices",
            f"{v.get('n_flagged')} of {v.get('n_synthetic')} "
            f"(≈ {_num(v.get('expected_false_positives'), '.1f')} by chance)",
        ),
        ("Flagged volumes", f"{v.get('n_volumes_flagged')} of {len(cal.volume_ids)}"),
        ("Training subjects the flagged slices match", f"{v.get('n_subjects_flagged')}"),
        ("Mann–Whitney AUC", f"{_num(v.get('mann_whitney_auc'), '.3f')} (p = {_num(v.get('mann_whitney_p'))})"),
        (
            "Paper (mean ONI)",
            f"{_num(v.get('mean_oni'), '.3f')}: "
            f"{'memorised' if v.get('paper_rule_memorised') else 'not memorised'} by {v.get('paper_rule')}",
        ),
        ("Reviews", f"{state['n_reviewed']} of {state['n_flagged']} flagged pairs reviewed ({dec})"),
        ("Sign-off", signed),
    ]
    out.append(_kv_table(rows))
    out.append('<h3>Release checklist</h3><table class="checklist"><tbody>')
    for c in checklist:
        mark = '<span class="ok">✓</span>' if c.ok else '<span class="bad">✗</span>'
        out.append(f'<tr><td class="mark">{mark}</td><th>{_e(c.name)}</th><td>{_e(c.detail)}</td></tr>')
    out.append("</tbody></table>")
    out.append(
        '<p class="meta">A ✗ refuses a release sign-off unless the signer states a reason; the evidence follows on '
        "the next pages.</p></section>"
    )
    return "".join(out)


def _figures_rows(folder: AuditFolder) -> list[tuple[str, str, str]]:
    s, v, b = folder.summary, folder.verdict.to_dict(), folder.summary.get("baselines", {})
    t = folder.table
    lo, hi = (v.get("fraction_ci95") or [None, None])[:2]
    mi = t["mi"].to_numpy(float) if "mi" in t else np.zeros(0)
    min_p = _num(v.get("min_p_value"))
    rows = [
        (
            "Flagged slices",
            f"{v.get('n_flagged')} of {v.get('n_synthetic')} "
            f"({_num(100 * float(v.get('fraction_flagged', 0)), '.2f')} %; "
            f"95 % interval {_num(100 * float(lo or 0), '.2f')}–{_num(100 * float(hi or 1), '.2f')} %); "
            f"about {_num(v.get('expected_false_positives'), '.1f')} expected by chance",
            "A slice is flagged when its p-value ≤ α. Even a model that copied nothing gets about α × (number of "
            "slices) flags by chance. The interval describes the flagged fraction; the decision is the dataset test "
            "below.",
        ),
        (
            "Dataset test (the verdict)",
            (
                f"{v.get('test')}: p = {_num(v.get('test_p_value'))} at level {_num(v.get('test_level'))}; "
                f"{v.get('n_units_flagged')} of {v.get('n_units')} {v.get('unit')}s with p ≤ α; "
                + ("copying" if v.get("copying") else "not copying" if v.get("decidable") else "not decided")
            ),
            "A test whose false-alarm rate under no copying is at most its level, valid although every flag shares "
            f"one null and slices of one volume depend on each other. Assumption: {v.get('assumption')}. "
            + ("" if v.get("decidable") else "Without a holdout nothing is flagged and nothing is decided. ")
            + " ".join(f"Check: {d}" for d in v.get("diagnostics", ())),
        ),
        (
            "Volumes flagged",
            f"{v.get('n_volumes_flagged')} of {len(folder.calibration.volume_ids)} synthetic volumes "
            f"(p-values calibrated by {folder.calibration.volume_calibration})",
            (
                "A volume is the slices of one source file or series. Its evidence is 3D: the training volumes its "
                "slices match in a consistent order are registered onto it in 3D (affine), and its volume similarity "
                "(the masked NCC over the overlap times the share of its head that overlaps) is ranked against "
                "volumes known not to be copies, scored the same way. The per-volume table is volumes.csv."
                if folder.calibration.volume_verified
                else "A volume is the slices of one source file or series (a 2D image is a volume of one slice); its "
                "p-value combines its slices' (Simes), ranked among the holdout's volumes scored the same way when "
                "the holdout has volumes (Bonferroni within the volume otherwise). The per-volume table is "
                "volumes.csv."
            ),
        ),
        (
            "α (alpha)",
            f"{_num(v.get('alpha'))}" + (" with Benjamini–Hochberg FDR control" if v.get("fdr") else " per slice"),
            "The target false-positive rate per synthetic slice: the chance that a slice as novel as a real, unseen "
            "scan is flagged. Smaller α = fewer false alarms, fewer detections.",
        ),
        (
            "Null reference",
            f"{v.get('null_kind')}, {v.get('n_null')} slices; smallest possible p-value {min_p}",
            "What 'novel' looks like: similarities to the training set of real scans the model never saw (holdout), "
            "or of each training subject against the other subjects. α must be at least the smallest possible p-value.",
        ),
        (
            "p-value (per slice)",
            f"median {_num(np.nanmedian(t['p_value'].to_numpy(float)) if len(t) else float('nan'))}",
            "The fraction of the null at least as similar to the training set as this slice (with +1 smoothing). "
            "Small = more similar to a training slice than unseen real scans are.",
        ),
        (
            "MI (calibrated, per slice)",
            f"median {_num(np.nanmedian(mi) if mi.size else float('nan'))}; {int((mi >= 0.99).sum())} slices ≥ 0.99",
            "The null's cumulative distribution at the slice's similarity, in [0, 1]: 0.99 = more similar to the "
            "training set than 99 % of unseen real scans. 0.5 = typical of real unseen data.",
        ),
        (
            "MI z-score (paper)",
            f"mean {_num(v.get('mean_mi_z'))}",
            "Deo et al. 2026: (s − μ0)/σ0 against a split-half bootstrap null of the training set. Higher = more "
            "memorised. Not calibrated to a false-positive rate.",
        ),
        (
            "ONI (paper)",
            f"mean {_num(v.get('mean_oni'))}: the paper's rule ({v.get('paper_rule')}) says "
            + ("memorised" if v.get("paper_rule_memorised") else "not memorised"),
            "ONI = −tanh(MI z) in (−1, 1): −1 memorised, +1 novel. The paper proposes the universal dataset threshold "
            "mean ONI < 0.68. It is shown for comparison; the calibrated α test above is the one this verdict uses.",
        ),
        (
            "Mann–Whitney AUC",
            f"{_num(v.get('mann_whitney_auc'), '.3f')} (p = {_num(v.get('mann_whitney_p'))})",
            "Probability that a random synthetic slice is more similar to the training set than a random null slice. "
            "0.5 = as novel as unseen real scans; towards 1 = copying; below 0.5 = less similar than real data.",
        ),
    ]
    base = [
        (
            "CT-score (Meehan et al. 2020)",
            "ct_score",
            "Z-statistic comparing synthetic-to-training with held-out-to-training distances per k-means cell: "
            "clearly negative (below about −3) = data copying, about 0 = fine, positive = underfitting. "
            "Needs a holdout.",
        ),
        (
            "AuthPct (Alaa et al. 2022)",
            "auth_pct",
            "Percentage of synthetic slices farther from their nearest training slice than that slice is from its own "
            "nearest training neighbour. Lower = more copying.",
        ),
        (
            "Distance to closest record (median)",
            "dcr_median",
            "Median feature distance of a synthetic slice to its closest training slice. 0 = exact copies; compare "
            "with the distances of real unseen scans.",
        ),
        (
            "Pixel correlation (median)",
            "pixel_corr_median",
            "Median of each synthetic slice's best raw-pixel correlation with any training slice (over flips). "
            "Near 1 = pixel-level copies; blind to shifts and rotations.",
        ),
    ]
    for label, key, how in base:
        if key in b and b[key] is not None:
            val = _num(b[key])
            note = b.get(f"{key.split('_')[0]}_note") or b.get(f"{key}_note")
            if note:
                val += f" ({note})"
        else:
            prefix = key.rsplit("_median", 1)[0]
            val = "not computed: " + str(b.get(f"{prefix}_error") or b.get(f"{key}_error") or "n/a")
        rows.append((label, val, how))
    _ = s
    return rows


def _provenance_html(folder: AuditFolder, generated: str) -> str:
    s, m = folder.summary, folder.manifest or {}
    shown = bool((s.get("config") or {}).get("show_paths", True))
    out = ['<h2 id="provenance">Provenance</h2>']
    ext = m.get("extractor") or {
        "name": s.get("config", {}).get("extractor"),
        "fingerprint": s.get("extractor_fingerprint"),
    }
    out.append(
        _kv_table(
            [
                ("audit ID", s.get("audit_id")),
                ("audit run (UTC)", s.get("created")),
                ("report generated (UTC)", generated),
                ("extractor", ext.get("name")),
                ("extractor fingerprint", ext.get("fingerprint")),
                ("checkpoint", ext.get("checkpoint") or "none"),
                ("checkpoint sha256", ext.get("checkpoint_sha256") or ext.get("checkpoint_note") or "n/a"),
                ("layers", ", ".join(s.get("layers", []))),
            ]
        )
    )
    counts = []
    for name in ("train", "synthetic", "holdout"):
        c = (m.get("cohorts") or {}).get(name) or (s.get("cohorts") or {}).get(name)
        if c is None:
            counts.append(
                {"cohort": name, "slices": "none", "subjects": "", "files": "", "skipped": "", "content hash": ""}
            )
            continue
        counts.append(
            {
                "cohort": name,
                "slices": c.get("n_slices"),
                "subjects": c.get("n_subjects"),
                "files": c.get("n_files"),
                "skipped": c.get("n_skipped"),
                "content hash": c.get("content_hash"),
            }
        )
    out.append("<h3>Inputs</h3>" + _df_table(pd.DataFrame(counts), max_rows=10))
    if not m:
        out.append('<p class="warn">This audit folder has no manifest.json: input file hashes are not available.</p>')
    for name in ("train", "synthetic", "holdout"):
        c = (m.get("cohorts") or {}).get(name)
        if not c:
            continue
        files = pd.DataFrame(c.get("files", []), columns=["path", "bytes", "sha256"])
        root = c.get("root_sha256") or (root_hash(c["root"]) if c.get("root") else "")  # never the root itself
        named = (
            "paths relative to the cohort root"
            if shown
            else "pseudonymous labels &lt;subject&gt;/vol-&lt;n&gt; in place of file names"
        )
        out.append(
            f"<details><summary>{_e(name)}: sha256 of {len(files)} input files ({named}; the root's path "
            f"as sha256 <code>{_e(root)}</code>)</summary>{_df_table(files, max_rows=len(files) + 1)}</details>"
        )
        if c.get("skipped"):
            sk = pd.DataFrame(c["skipped"], columns=["path", "reason"])
            out.append(
                f"<details><summary>{_e(name)}: {len(sk)} skipped files or slices, with reasons</summary>"
                f"{_df_table(sk, max_rows=len(sk) + 1)}</details>"
            )
    cfg = s.get("config", {})
    out.append(
        "<details open><summary>Configuration</summary>"
        + _kv_table([(k, json.dumps(v) if isinstance(v, list | dict | None) else v) for k, v in cfg.items()])
        + "</details>"
    )
    out.append(
        "<details><summary>Software versions</summary>" + _kv_table(list(s.get("versions", {}).items())) + "</details>"
    )
    if folder.integrity:
        rows = pd.DataFrame(
            [
                {
                    "file": r["file"],
                    "sha256 at scan": r["expected"],
                    "sha256 now": r["actual"] or "missing",
                    "status": "intact" if r["ok"] else "MODIFIED",
                }
                for r in folder.integrity
            ]
        )
        head = (
            '<p class="ok">Every audit output file matches the hash recorded at scan time.</p>'
            if folder.intact
            else '<p class="bad">Audit output files changed after the scan; the report may not reflect the audit.</p>'
        )
        out.append("<h3>Audit folder integrity</h3>" + head + _df_table(rows, max_rows=20))
    out.append(
        "<h3>This report's hash</h3>"
        f"<p>sha256: {_HASH_MARK}{_HASH_ZEROS}</code></p>"
        "<p>How to verify: replace the 64 hexadecimal digits above with 64 zeros (<code>0</code>) in the HTML file "
        "and compute the SHA-256 of the file's bytes; it must equal the stated hash. For example "
        '<code>sed -E \'s/(id="report-sha256"&gt;)[0-9a-f]{64}/\\1' + _HASH_ZEROS + "/' report.html | sha256sum</code>"
        ' or, in Python, <code>inspector.report.verify_report("report.html")</code>. Any change to the file '
        "(including the sign-off) changes the hash.</p>"
    )
    return "".join(out)


def _missing_evidence_html(folder: AuditFolder) -> str:
    """A warning and the list of the training/holdout files that were skipped (the audit ran with
    ``--allow-skipped``) and of the synthetic files that were not audited; '' when none."""
    note = folder.evidence_note
    if not note:
        return ""
    cohorts = folder.summary.get("cohorts") or {}
    rows = [
        {"cohort": name, "file": r.get("path"), "reason": r.get("reason")}
        for name in ("train", "holdout", "synthetic")
        for r in ((cohorts.get(name) or {}).get("skipped") or [])
        if r.get("missing_evidence")
    ]
    allowed = bool((folder.summary.get("config") or {}).get("allow_skipped"))
    how = " The audit ran with --allow-skipped: these files were not compared." if allowed else ""
    table = _df_table(pd.DataFrame(rows, columns=["cohort", "file", "reason"]), max_rows=len(rows) + 1)
    return (
        f'<div class="missing-evidence"><p class="bad"><b>Missing evidence.</b> {_e(note)}{_e(how)}</p>'
        f"<details open><summary>{len(rows)} skipped file(s), with the reason</summary>{table}</details></div>"
    )


def _signoff_html(records: Sequence[RecordedSignOff], state: dict[str, Any], audit_dir: Path) -> str:
    out = ['<h2 id="signoff">Sign-off</h2>']
    if not records:
        out.append(
            '<div class="signoff"><p><b>Not signed off.</b> Record a decision with<br><code>inspector report '
            f"--audit {_e(audit_dir)} --out report.html --signer NAME --role ROLE --decision "
            "{release | &quot;do not release&quot; | &quot;release after removing the flagged slices&quot;} "
            "[--reason TEXT]</code><br>A sign-off is accepted when every flagged pair has a reviewer decision, or "
            "with a stated reason.</p>"
            '<div class="sigline">Signature, name, role</div><div class="sigline">Date</div></div>'
        )
        return "".join(out)
    last = records[-1]
    warn = ""
    copies = int(state["decisions"].get("copy", 0)) + int(state["decisions"].get("near copy", 0))
    if last.decision == "release" and copies:
        warn = f'<p class="warn">Released although reviewers marked {copies} flagged pair(s) as copies.</p>'
    reason = f"<p>Reason: {_e(last.reason)}</p>" if last.reason else ""
    out.append(
        f'<div class="signoff"><p>Decision: <b>{_e(last.decision)}</b></p>'
        f"<p>Signed by <b>{_e(last.signer)}</b> ({_e(last.role)}) on {_e(last.date)}; recorded {_e(last.recorded_at)} "
        f"(sign-off #{last.id}).</p>{reason}"
        f"<p>At signing, {last.n_reviewed} of {last.n_flagged} flagged pairs had a reviewer decision.</p>{warn}</div>"
    )
    if len(records) > 1:
        hist = pd.DataFrame([r.to_dict() for r in records[:-1]])[
            ["id", "date", "signer", "role", "decision", "reason", "recorded_at", "n_reviewed", "n_flagged"]
        ]
        out.append(
            f"<details><summary>{len(records) - 1} earlier sign-off(s)</summary>"
            f"{_df_table(hist, max_rows=1000)}</details>"
        )
    return "".join(out)


def _render(
    folder: AuditFolder,
    latest: dict[str, Review],
    state: dict[str, Any],
    records: Sequence[RecordedSignOff],
    generated: str,
    checklist: Sequence[Any] = (),
) -> str:
    s = folder.summary
    v = folder.verdict.to_dict()
    t = folder.table
    hashes = t["sha256"].astype(str).to_numpy() if "sha256" in t else np.array([""] * len(t))
    title = "Memorisation audit: release report"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} {_e(str(s.get('audit_id', ''))[:12])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Audit {_e(s.get("audit_id"))} · run {_e(s.get("created"))} · report {_e(generated)} · '
        f"mode {_e(v.get('mode', s.get('config', {}).get('mode')))} · "
        f"extractor {_e(s.get('config', {}).get('extractor'))}</p>",
        '<p class="meta">Sections: <a href="#verdict">verdict</a> · <a href="#figures">figures</a> · '
        '<a href="#distributions">distributions</a> · <a href="#research">per layer and ROC</a> · '
        '<a href="#flagged">flagged pairs</a> · '
        '<a href="#unreviewed">unreviewed</a> · <a href="#subjects">subjects</a> · '
        '<a href="#provenance">provenance</a> · <a href="#signoff">sign-off</a></p>',
        _summary_html(folder, state, records, checklist),
    ]
    # ---------------------------------------------------------------- verdict
    out.append('<h2 id="verdict">Verdict</h2>')
    out.append(f'<div class="verdict {_verdict_class(v)}">{_e(s.get("verdict_text", ""))}</div>')
    out.append(_missing_evidence_html(folder))
    auc = v.get("mann_whitney_auc")
    words = []
    if auc is not None and math.isfinite(float(auc)):
        a = float(auc)
        how = (
            "clearly more similar to the training set than"
            if a >= 0.6
            else "about as similar to the training set as"
            if a > 0.4
            else "less similar to the training set than"
        )
        words.append(
            f"Overall, the synthetic slices are {how} the reference real scans ({_e(v.get('null_kind'))}): "
            f"Mann–Whitney AUC {a:.3f}, where 0.5 means as novel as unseen real scans."
        )
    words.append(
        f"The paper's rule (mean ONI < 0.68) says {'memorised' if v.get('paper_rule_memorised') else 'not memorised'} "
        f"(mean ONI {_num(v.get('mean_oni'), '.3f')})."
    )
    words.append(
        f"Review: {state['n_reviewed']} of {state['n_flagged']} flagged pairs have a reviewer decision"
        + (f"; {state['n_unreviewed']} are unreviewed." if state["n_unreviewed"] else ".")
    )
    if records:
        words.append(f"Signed off: {records[-1].decision} ({records[-1].signer}, {records[-1].date}).")
    else:
        words.append("Not signed off yet.")
    out.append("<p>" + " ".join(_e(w) for w in words) + "</p>")
    if v.get("warning"):
        out.append(f'<p class="warn">{_e(v["warning"])}</p>')
    if folder.integrity and not folder.intact:
        mod = ", ".join(r["file"] for r in folder.integrity if not r["ok"])
        out.append(f'<p class="warn">The audit folder was modified after the scan ({_e(mod)}); see Provenance.</p>')
    out.append(
        '<p class="meta">How the audit works: every synthetic slice is compared with every training slice '
        "(features shortlist candidates; in the default mode each candidate is registered onto the synthetic slice "
        "and scored by normalised cross-correlation, so flipped, rotated or shifted copies are found). Its similarity "
        "is then compared with the similarities of real scans the model never saw (the null): a slice far more "
        "similar to a training slice than unseen real scans ever are is flagged.</p>"
    )
    # ---------------------------------------------------------------- figures
    out.append('<h2 id="figures">The figures and how to read them</h2>')
    out.append(
        "<table><thead><tr><th>Figure</th><th>Value</th><th>How to read it</th></tr></thead><tbody>"
        + "".join(f"<tr><th>{_e(a)}</th><td>{_e(b)}</td><td>{_e(c)}</td></tr>" for a, b, c in _figures_rows(folder))
        + "</tbody></table>"
    )
    # ---------------------------------------------------------------- histograms
    out.append('<h2 id="distributions">Distributions</h2>')
    sim = t["similarity"].to_numpy(float)
    alpha = folder.calibration.alpha
    thr = folder.calibration.threshold()
    out.append(
        svg_histogram(
            [
                ("synthetic", sim, "#c62828"),
                (f"null ({v.get('null_kind', 'reference')})", folder.null_similarity, "#1565c0"),
            ],
            markers=[(thr, f"threshold at {'Benjamini–Hochberg ' if v.get('fdr') else ''}α = {alpha:g}", "#000000")],
            xlabel="similarity to the nearest training slice (higher = more similar)",
            title="Synthetic similarities against the null",
        )
    )
    if not math.isfinite(thr):
        out.append(
            '<p class="warn">No threshold can be drawn: with this null no similarity reaches p ≤ α.</p>'
            if thr == float("inf")
            else '<p class="warn">Every similarity is flagged at this α.</p>'
        )
    out.append(
        '<p class="meta">Synthetic slices to the right of the dashed threshold are flagged. A model that copies '
        "nothing gives a red histogram on top of the blue one; copies form a separate bump at high similarity.</p>"
    )
    if "oni" in t:
        out.append(
            svg_histogram(
                [("synthetic ONI", t["oni"].to_numpy(float), "#6a1b9a")],
                markers=[
                    (0.68, "paper's threshold", "#000000"),
                    (float(v.get("mean_oni", float("nan"))), "mean ONI", "#ef6c00"),
                ],
                xlabel="ONI (−1 memorised … +1 novel)",
                title="The paper's per-slice ONI",
            )
        )
    out.append(_research_html(folder))
    # ---------------------------------------------------------------- flagged pairs
    rows = folder.flagged_rows()
    out.append(f'<h2 id="flagged">Flagged pairs ({len(rows)})</h2>')
    if not len(rows):
        out.append("<p>No synthetic slice is flagged at this α.</p>")
    else:
        out.append(
            '<p class="meta">Most significant first. Each pair shows the synthetic slice, the best training '
            "candidate registered onto it and their absolute difference (a copy leaves only noise), then the nearest "
            "training slices at every feature layer. Images are windowed per image (1st–99.5th percentile).</p>"
        )
    for rank, row in enumerate(rows, start=1):
        out.append(_pair_html(folder, int(row), rank, latest.get(hashes[row]), flagged=True, full=True))
    # ---------------------------------------------------------------- unreviewed
    out.append(f'<h2 id="unreviewed">Unreviewed flagged pairs ({state["n_unreviewed"]})</h2>')
    unrev = [int(r) for r in rows if hashes[r] not in latest]
    if unrev:
        df = pd.DataFrame(
            {
                "rank": [int(np.flatnonzero(rows == r)[0]) + 1 for r in unrev],
                "synthetic slice": [f"{t.at[r, 'synthetic_path']}#{int(t.at[r, 'slice_index'])}" for r in unrev],
                "p-value": [float(t.at[r, "p_value"]) for r in unrev],
                "similarity": [float(t.at[r, "similarity"]) for r in unrev],
                "nearest training slice": [
                    f"{t.at[r, 'nearest_train_path']}#{t.at[r, 'nearest_train_slice']}" for r in unrev
                ],
                "training subject": [str(t.at[r, "nearest_train_subject"]) for r in unrev],
            }
        )
        out.append(
            '<p class="bad">These flagged pairs have no reviewer decision. Review them in the app before signing off, '
            "or state why not in the sign-off.</p>" + _df_table(df, max_rows=len(df) + 1)
        )
    else:
        out.append("<p>Every flagged pair has a reviewer decision.</p>" if len(rows) else "<p>Nothing to review.</p>")
    # ---------------------------------------------------------------- context pairs
    ev = folder.evidence
    if ev is not None:
        flagged_now = folder.calibration.flags()
        ctx = [int(r) for r in ev.rows if not flagged_now[int(r)]]
        if ctx:
            out.append(
                f"<details><summary>The {len(ctx)} most similar unflagged synthetic slices (for context)</summary>"
                + "".join(
                    _pair_html(folder, r, i, latest.get(hashes[r]), flagged=False, full=False)
                    for i, r in enumerate(ctx, start=1)
                )
                + "</details>"
            )
    # ---------------------------------------------------------------- subjects
    out.append('<h2 id="subjects">Per training subject</h2>')
    out.append(
        '<p class="meta">Pseudonymous subject IDs. A subject with flagged synthetic slices is a patient whose '
        "scans the model may reproduce: the unit of the release decision.</p>"
    )
    out.append(
        f'<p class="meta">At {_e(_setting_words(v))}: counts and flags from the same calibration as every other '
        "number of this report.</p>"
    )
    out.append(_df_table(folder.subjects_at(), max_rows=1000))
    # ---------------------------------------------------------------- volumes
    vols = folder.volumes()
    if len(vols) < len(folder.table):  # some synthetic volumes hold several slices
        out.append('<h2 id="volumes">Per synthetic volume</h2>')
        out.append(
            '<p class="meta">One row per synthetic volume (volumes.csv): its p-value (from its slices\' p-values, '
            f"calibrated by {_e(folder.calibration.volume_calibration)}), flag, and the training volume most of its "
            "slices match, with the share of slices that match it and the median slice offset. A copied volume "
            "matches one training volume throughout, at a constant offset.</p>"
        )
        out.append(_df_table(vols, max_rows=200))
        out.append(_volume_figures_html(folder))
    out.append(_provenance_html(folder, generated))
    out.append(_signoff_html(records, state, folder.path))
    out.append(
        '<p class="meta">Generated offline by the MRI Memorization Inspector '
        f"{_e(s.get('versions', {}).get('inspector', ''))}. This file embeds every image and style; it loads nothing "
        "from the network.</p></body></html>\n"
    )
    return "\n".join(out)


def _volume_figures_html(folder: AuditFolder) -> str:
    """Per flagged, 3D-verified volume: three axial slices beside the training volume aligned by the 3D transform."""
    ev = folder.evidence
    if ev is None or ev.volume_images is None or not len(ev.volumes):
        return ""
    parts = [
        '<h3 id="volume-figures">Flagged volumes, aligned in 3D</h3>',
        '<p class="meta">For each flagged volume (most significant first), three axial slices of the synthetic volume '
        "(top) above the same planes of the training volume it copies, resampled by the 3D transform.</p>",
    ]
    for meta, imgs in zip(ev.volumes, ev.volume_images, strict=False):
        cells = []
        for j, z in enumerate(meta.get("slice_index", [])):
            syn = _png_uri(imgs[j, 0], window=(0.0, 1.0))
            tr = _png_uri(imgs[j, 1], window=(0.0, 1.0))
            cells.append(
                '<td style="text-align:center">'
                f'<img alt="synthetic slice {int(z)}" style="width:150px" src="{syn}"><br>'
                f'<img alt="aligned training" style="width:150px" src="{tr}"><br>'
                f'<span class="meta">slice {int(z)}</span></td>'
            )
        parts.append(
            f"<p><b>{_e(meta.get('volume', ''))}</b> &rarr; {_e(meta.get('train_volume', ''))} "
            f"(subject {_e(meta.get('train_subject', ''))}), volume similarity "
            f"{_num(meta.get('similarity'))}</p><table><tr>{''.join(cells)}</tr></table>"
        )
    return "\n".join(parts)


def summary_path_for(out_html: str | Path, audit_dir: str | Path | None = None) -> Path:
    """Where :func:`write_report` writes the report's summary: ``<report name>.summary.json`` beside the HTML.

    Tied to the report's name, so a second report in the same folder never overwrites the first one's, and the
    audit folder's own ``summary.json`` (whose hash is in the manifest) is never touched. ``audit_dir`` is
    accepted for compatibility and not needed.
    """
    out_html = Path(out_html).expanduser()
    return out_html.with_name(out_html.stem + ".summary.json")


def write_report(
    audit_dir: str | Path,
    out_html: str | Path,
    *,
    reviews: str | Path | None = None,
    signoff: SignOff | None = None,
    alpha: float | None = None,
    fdr: bool | None = None,
) -> Path:
    """Write the self-contained HTML release report of an audit folder, and ``<name>.summary.json`` beside it.

    Parameters
    ----------
    audit_dir : str or Path
        A folder written by ``inspector scan`` (:meth:`AuditResult.save`).
    out_html : str or Path
        The HTML file to write (its folder is created).
    reviews : str or Path, optional
        The review database; default ``audit_dir/reviews.sqlite3`` when it exists.
    signoff : SignOff, optional
        Recorded first (see :func:`sign_off`; refused while flagged pairs are unreviewed and no reason is
        given), then shown in the report with any earlier sign-offs.
    alpha, fdr : optional
        The setting every flag, count and verdict of the report is taken at (default: the audit's own); the
        app passes the one on screen, so the report says what the screen said. The report states it.

    Returns
    -------
    Path
        The HTML file. Its summary is written beside it as ``<name>.summary.json``
        (:func:`summary_path_for`): a second report never overwrites it, nor the audit folder's own.

    Raises
    ------
    AuditFolderError
        The audit folder is incomplete.
    FileNotFoundError
        ``reviews`` was given but does not exist.
    SignOffError
        The sign-off is refused.
    """
    folder = load_audit_folder(audit_dir)
    if alpha is not None or fdr is not None:
        folder = dataclasses.replace(folder, calibration=folder.calibration.at(alpha, fdr))
    out = Path(out_html).expanduser()
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the HTML file to write, e.g. {out / 'report.html'}.")
    db = reviews_path(folder.path, reviews, create=signoff is not None)
    if signoff is not None:
        sign_off(folder, signoff, reviews=reviews)
    latest, state = review_state(folder, db)
    records = signoffs(folder, db)
    checklist = folder_checklist(folder, state)
    generated = _now()
    text = _render(folder, latest, state, records, generated, checklist)
    if text.count(_HASH_MARK) != 1:
        raise RuntimeError("the report template must hold exactly one hash marker")
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    data = data.replace((_HASH_MARK + _HASH_ZEROS).encode(), (_HASH_MARK + digest).encode(), 1)
    summary = report_summary(
        folder, state, records[-1] if records else None, report_file=out.name, report_sha256=digest, generated=generated
    )
    summary["checklist"] = [c.to_dict() for c in checklist]
    validate_summary(summary)
    atomic_write_bytes(out, data)
    spath = summary_path_for(out, folder.path)
    atomic_write_bytes(spath, json.dumps(jsonable(summary), indent=2).encode())
    log.info("report %s (sha256 %s) and %s written", out, digest[:12], spath)
    return out


def verify_report(path: str | Path) -> bool:
    """Whether an HTML report still matches the sha256 it states.

    Raises
    ------
    ValueError
        When the file holds no (or more than one) report hash.
    """
    data = Path(path).read_bytes()
    hits = list(_HASH_RE.finditer(data))
    if len(hits) != 1:
        raise ValueError(f"{path} holds {len(hits)} report hash markers; expected exactly one (is it a report?).")
    m = hits[0]
    stated = m.group(1).decode()
    blank = data[: m.start(1)] + _HASH_ZEROS.encode() + data[m.end(1) :]
    return hashlib.sha256(blank).hexdigest() == stated


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _round0(x: Any, nd: int = 2) -> Any:
    """Round for display without a negative zero."""
    try:
        return round(float(x), nd) + 0.0
    except (TypeError, ValueError):
        return x
