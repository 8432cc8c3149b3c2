"""The audit: ``audit(train, synthetic, holdout=None, config) -> AuditResult``.

Data flows one way (DESIGN §4): paths → :mod:`io` → :mod:`features` (cached) → :mod:`index` →
:mod:`scores` / :mod:`matching` → :class:`~inspector.result.AuditResult`. The app, the report and the
CLI only read the result.

Two modes:

``default``
    View-invariant features whitened with a shrunk covariance, a shortlist over all views, each
    candidate registered onto the synthetic slice and scored by aligned NCC
    (:class:`~inspector.matching.MemorizationScorer`); calibrated against the holdout null
    ``s(H → T)`` when a holdout is given, else leave-one-subject-out within T; ``p``-values, flags at
    ``alpha`` (or Benjamini–Hochberg), the dataset verdict, attribution.
``paper``
    Deo et al. 2026 exactly (:class:`~inspector.scores.PaperScorer`): ZCA whitening, top-1 cosine,
    geometric mean over layers, split-half bootstrap null, ``MI = (s − μ0)/σ0``, ``ONI = −tanh(MI)``.

Both modes report the paper's ``mi_z`` and ``oni`` per slice and the paper's mean ONI, so the two can
be read side by side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .cache import hash_key
from .io import LoadConfig, load_cohort, read_labels
from .preprocess import PreprocessConfig
from .result import AuditConfig, AuditResult, gate, versions, wilson_interval
from .types import Cohort

__all__ = ["audit", "default_scorer", "AuditConfig", "AuditResult", "gate", "load_inputs", "InsufficientDataError"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


class InsufficientDataError(ValueError):
    """The inputs are too small or too uniform for the requested audit."""


def _load(source: str | Path | Cohort, cfg: AuditConfig, what: str, progress: ProgressFn | None) -> Cohort:
    if isinstance(source, Cohort):
        return source
    lc = LoadConfig(axis=cfg.axis, preprocess=PreprocessConfig(size=cfg.size))

    def prog(stage: str, done: int, total: int) -> None:
        if progress:
            progress(f"loading:{what}", done, total)

    return load_cohort(source, lc, progress=prog)


def load_inputs(
    train: str | Path | Cohort,
    synthetic: str | Path | Cohort,
    holdout: str | Path | Cohort | None = None,
    config: AuditConfig | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Cohort, Cohort, Cohort | None]:
    """Load the three cohorts with the audit's slicing axis and size.

    Returns
    -------
    (train, synthetic, holdout or None)
    """
    cfg = config or AuditConfig()
    t = _load(train, cfg, "train", progress)
    g = _load(synthetic, cfg, "synthetic", progress)
    h = _load(holdout, cfg, "holdout", progress) if holdout is not None else None
    return t, g, h


def _images(c: Cohort, size: int) -> np.ndarray:
    return c.stack(size=size)


def _extractor_overrides(cfg: AuditConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"device": cfg.device, "seed": cfg.seed}
    if cfg.layers:
        kw["layers"] = tuple(cfg.layers)
    if cfg.checkpoint:
        if cfg.extractor != "mri-core":
            raise ValueError(
                f"A checkpoint was given ({cfg.checkpoint!r}) but the extractor is {cfg.extractor!r}; "
                "checkpoints are for extractor='mri-core'. Choose --extractor mri-core or drop --checkpoint."
            )
        kw["checkpoint"] = str(cfg.checkpoint)
    return kw


def _attach_labels(table: pd.DataFrame, g: Cohort) -> pd.DataFrame:
    try:
        labels = read_labels(g.root)
    except FileNotFoundError:
        return table
    if labels is None or labels.empty:
        return table
    lab = labels.set_index("path")
    keys = [f"{p}#{i}" for p, i in zip(table["synthetic_path"], table["slice_index"], strict=True)]
    for col in [c for c in ("label", "source", "augmentation") if c in lab.columns]:
        vals = []
        for key, p in zip(keys, table["synthetic_path"], strict=True):
            if key in lab.index:
                vals.append(lab.at[key, col])
            elif p in lab.index:
                vals.append(lab.at[p, col])
            else:
                vals.append(None)
        table[col] = vals
    n_known = table["label"].notna().sum() if "label" in table else 0
    log.info("ground truth from %s/labels.csv for %d of %d synthetic slices", g.root, n_known, len(table))
    return table


def _consensus(neighbours: dict[str, np.ndarray], train_subj: np.ndarray, nearest_subj: np.ndarray) -> np.ndarray:
    """Number of layers whose top-1 neighbour belongs to the matched training subject, shape (m,)."""
    count = np.zeros(len(nearest_subj), np.int64)
    for nb in neighbours.values():
        top = nb[:, 0]
        subj = np.where(top >= 0, train_subj[np.clip(top, 0, None)], "")
        count += subj == nearest_subj
    return count


def _subjects_table(table: pd.DataFrame, t: Cohort) -> pd.DataFrame:
    rows = []
    counts = pd.Series([s.subject_id for s in t.slices]).value_counts()
    for subj in t.subjects:
        mine = table[table["nearest_train_subject"] == subj]
        flagged = mine[mine["flagged"] == 1]
        rows.append(
            {
                "subject_id": subj,
                "n_train_slices": int(counts.get(subj, 0)),
                "n_synthetic_matched": len(mine),
                "n_flagged": len(flagged),
                "max_similarity": float(mine["similarity"].max()) if len(mine) else np.nan,
                "min_p_value": float(mine["p_value"].min()) if len(mine) else np.nan,
                "flagged_synthetic": ";".join(
                    f"{p}#{i}" for p, i in zip(flagged["synthetic_path"], flagged["slice_index"], strict=True)
                ),
            }
        )
    df = pd.DataFrame(rows)
    return df.sort_values(["n_flagged", "max_similarity"], ascending=[False, False], na_position="last").reset_index(
        drop=True
    )


def default_scorer(cfg: AuditConfig) -> Any:
    """The default mode's :class:`~inspector.matching.MemorizationScorer`, configured from ``cfg`` (unfitted).

    The one place the audit's settings become the scorer's, shared with the benchmarks so that they
    measure exactly what the product runs.
    """
    from .matching import MemorizationScorer

    return MemorizationScorer(
        shortlist=cfg.shortlist,
        top_k=cfg.top_k,
        rerank=cfg.rerank,
        align_size=cfg.align_size,
        align_flips=cfg.align_flips,
        device=cfg.device,
    )


def audit(
    train: str | Path | Cohort,
    synthetic: str | Path | Cohort,
    holdout: str | Path | Cohort | None = None,
    config: AuditConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
) -> AuditResult:
    """Audit a synthetic set for copies of training slices.

    Parameters
    ----------
    train : path or Cohort
        The training cohort T (folder, CSV manifest, file or a loaded :class:`Cohort`).
    synthetic : path or Cohort
        The synthetic set G to be released. A ``labels.csv`` beside it (``path,label[,source,augmentation]``)
        is read as ground truth for ROC curves; it never influences the scores.
    holdout : path or Cohort, optional
        Real scans from the same source the model never saw; gives the honest null ``s(H → T)``.
    config : AuditConfig, optional
        Mode, extractor, alpha, views, re-ranking, sizes, seed.
    cache_dir : path, optional
        Cache of embeddings and trained encoders (default: the user's cache dir).
    use_cache : bool
        Read and write the embedding cache.
    progress : callable, optional
        ``progress(stage, done, total)`` for loading, training, extracting, searching, aligning, scoring.

    Returns
    -------
    AuditResult
        ``table`` has one row per synthetic slice; higher ``similarity``/``mi``/``mi_z`` and lower
        ``p_value``/``oni`` mean more memorised.

    Raises
    ------
    inspector.io.CohortNotFoundError, inspector.io.NoImagesError
        A path does not exist or holds no readable image.
    InsufficientDataError
        Too few slices or subjects for the requested null.
    """
    from .features import extract, prepare_extractor
    from .scores import (
        PaperScorer,
        benjamini_hochberg,
        calibrated_mi,
        empirical_p_values,
        mann_whitney_auc,
    )

    cfg = config or AuditConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    T, G, H = load_inputs(train, synthetic, holdout, cfg, progress)
    timings["loading"] = time.perf_counter() - t0
    if len(T) < 4:
        raise InsufficientDataError(
            f"The training cohort {T.name!r} has {len(T)} slice(s); an audit needs at least 4 to whiten features "
            "and build a null. Point --train at the whole training set."
        )

    # ---------------------------------------------------------------- features
    t1 = time.perf_counter()
    ext = prepare_extractor(cfg.extractor, T, cache_dir=cache_dir, progress=progress, **_extractor_overrides(cfg))
    timings["training"] = time.perf_counter() - t1
    views = tuple(cfg.views) if cfg.mode == "default" else ("id",)
    need_t_views = cfg.mode == "default" and H is None
    t2 = time.perf_counter()
    kw = {"cache_dir": cache_dir, "use_cache": use_cache, "progress": progress}
    FT = extract(T, ext, views=views if need_t_views else ("id",), **kw)
    FG = extract(G, ext, views=views, **kw)
    FH = extract(H, ext, views=views, **kw) if H is not None else None
    timings["extracting"] = time.perf_counter() - t2
    layers = FT.layer_names
    train_subj = T.subject_ids.astype(str)

    # ---------------------------------------------------------------- the paper's scores (always)
    t3 = time.perf_counter()
    paper = PaperScorer(n_bootstrap=cfg.n_bootstrap, seed=cfg.seed).fit(FT.layers)
    pg = paper.score_samples(FG.layers)
    if progress:
        progress("scoring:paper", 1, 1)

    img_t = _images(T, cfg.size)
    img_g = _images(G, cfg.size)
    if cfg.mode == "default":
        scorer = default_scorer(cfg).fit(FT.layers, images=img_t, groups=train_subj)
        res = scorer.score_samples(FG.views, images=img_g, progress=progress, stage="synthetic")
        if FH is not None:
            nres = scorer.score_samples(FH.views, images=_images(H, cfg.size), progress=progress, stage="holdout")
            null_kind = "holdout"
        else:
            if len(T.subjects) < 2:
                raise InsufficientDataError(
                    f"The training cohort {T.name!r} holds a single subject, so the leave-one-subject-out null "
                    "cannot be built. Give a holdout of real, unseen scans (--holdout) or more training subjects."
                )
            nres = scorer.score_samples(FT.views, images=img_t, groups=train_subj, progress=progress, stage="null")
            null_kind = "leave-one-subject-out"
        similarity = res.similarity.astype(np.float64)
        null = nres.similarity.astype(np.float64)
        nearest = res.nearest
        neighbours, neighbour_sims = res.neighbours, res.neighbour_sims
        layer_sim = res.layer_similarity
        margin = res.margin
        alignment = res.alignment
        feature_similarity = res.feature_similarity
        view = res.view
    else:
        similarity = np.asarray(pg.similarity, np.float64)
        null = np.asarray(paper.null_, np.float64)
        null_kind = "split-half bootstrap"
        neighbours, neighbour_sims = paper.neighbours(FG.layers, cfg.top_k)
        layer_sim = np.asarray(pg.layer_similarity, np.float32)
        nearest = _paper_nearest(neighbours, layers)
        margin = _paper_margin(neighbours, neighbour_sims, train_subj, nearest)
        alignment = {}
        feature_similarity = similarity.astype(np.float32)
        view = np.array(["id"] * len(G), dtype=object)
    timings["scoring"] = time.perf_counter() - t3

    # ---------------------------------------------------------------- calibration
    mi = calibrated_mi(similarity, null)
    p = empirical_p_values(similarity, null)
    flagged = benjamini_hochberg(p, cfg.alpha) if cfg.fdr else p <= cfg.alpha
    mi_z, oni = np.asarray(pg.mi_z, np.float64), np.asarray(pg.oni, np.float64)
    if cfg.mode == "default":
        # the paper's z-score and ONI stay the paper's (its own bootstrap null, its own similarity)
        pass
    nearest_ok = nearest >= 0
    nn = np.clip(nearest, 0, None)
    nearest_subj = np.where(nearest_ok, train_subj[nn], "")
    table = pd.DataFrame(
        {
            "synthetic_path": [s.path for s in G.slices],
            "slice_index": [s.slice_index for s in G.slices],
            "subject_id": [s.subject_id for s in G.slices],
            "similarity": similarity,
            "mi": mi,
            "p_value": p,
            "flagged": flagged.astype(int),
            "mi_z": mi_z,
            "oni": oni,
            "nearest_train_path": np.where(nearest_ok, [T[i].path for i in nn], ""),
            "nearest_train_slice": np.where(nearest_ok, [T[i].slice_index for i in nn], -1),
            "nearest_train_subject": nearest_subj,
        }
    )
    for j, layer in enumerate(layers):
        table[f"sim_{layer}"] = layer_sim[:, j]
    table["layer_consensus"] = _consensus(neighbours, train_subj, nearest_subj)
    table["margin"] = margin
    table["feature_similarity"] = feature_similarity
    table["view"] = view
    table["sha256"] = [s.sha256 for s in G.slices]
    table["nearest_train_index"] = nearest
    if alignment:
        table["align_ncc"] = alignment["ncc"]
        table["align_angle"] = alignment["angle"]
        table["align_scale"] = alignment["scale"]
        table["align_flip"] = alignment["flip"]

    # ---------------------------------------------------------------- baselines
    t4 = time.perf_counter()
    baselines = _baselines(FT, FG, FH, img_t, img_g, cfg, table)
    timings["baselines"] = time.perf_counter() - t4
    table = _attach_labels(table, G)

    # ---------------------------------------------------------------- verdict
    k, m = int(flagged.sum()), len(G)
    lo, hi = wilson_interval(k, m)
    auc, auc_p = mann_whitney_auc(similarity, null)
    n_null = len(null)
    min_p = 1.0 / (1.0 + n_null)
    mean_oni = float(np.mean(oni))
    copying = lo > cfg.alpha
    verdict: dict[str, Any] = {
        "mode": cfg.mode,
        "n_synthetic": m,
        "n_flagged": k,
        "fraction_flagged": k / m,
        "fraction_ci95": [lo, hi],
        "alpha": cfg.alpha,
        "fdr": cfg.fdr,
        "expected_false_positives": cfg.alpha * m,
        "n_subjects_flagged": int(table.loc[flagged, "nearest_train_subject"].nunique()) if k else 0,
        "null_kind": null_kind,
        "n_null": n_null,
        "min_p_value": min_p,
        "alpha_reachable": bool(min_p <= cfg.alpha),
        "mann_whitney_auc": float(auc),
        "mann_whitney_p": float(auc_p),
        "mean_oni": mean_oni,
        "mean_mi_z": float(np.mean(mi_z)),
        "paper_rule": "ONI < 0.68 means memorisation",
        "paper_rule_memorised": bool(mean_oni < PaperScorer.ONI_THRESHOLD),
        "copying": bool(copying),
        "copying_reason": (
            f"{k} of {m} slices flagged; the 95% interval of the flagged fraction [{lo:.3f}, {hi:.3f}] lies above "
            f"alpha = {cfg.alpha:g}"
            if copying
            else f"{k} of {m} slices flagged; the 95% interval [{lo:.3f}, {hi:.3f}] includes alpha = {cfg.alpha:g}"
        ),
    }
    if not verdict["alpha_reachable"]:
        verdict["warning"] = (
            f"The null has only {n_null} slices, so the smallest possible p-value is {min_p:.3g} > alpha = "
            f"{cfg.alpha:g}: no slice can be flagged. Give a larger holdout (at least "
            f"{int(np.ceil(1 / cfg.alpha)) - 1} slices) or a larger alpha."
        )
        log.warning(verdict["warning"])
    subjects = _subjects_table(table, T)
    audit_id = hash_key(
        kind="audit",
        train=T.content_hash,
        synthetic=G.content_hash,
        holdout=H.content_hash if H is not None else None,
        config=cfg.to_dict(),
        extractor=FT.fingerprint,
        version=__version__,
    )
    timings["total"] = time.perf_counter() - t0
    log.info("audit %s: %s", audit_id[:12], verdict["copying_reason"])
    return AuditResult(
        audit_id=audit_id,
        config=cfg,
        train=T,
        synthetic=G,
        holdout=H,
        table=table,
        null_similarity=null,
        verdict=verdict,
        subjects=subjects,
        layers=list(layers),
        neighbours=neighbours,
        neighbour_sims=neighbour_sims,
        alignment=alignment,
        baselines=baselines,
        timings=timings,
        versions=versions(),
        extractor_fingerprint=FT.fingerprint,
    )


def _paper_nearest(neighbours: dict[str, np.ndarray], layers: list[str]) -> np.ndarray:
    """The training slice that is top-1 in most layers (ties: the deepest layer's), shape (m,)."""
    top = np.stack([neighbours[layer][:, 0] for layer in layers], axis=1)  # (m, L)
    out = top[:, -1].copy()
    for j in range(top.shape[0]):
        vals, counts = np.unique(top[j], return_counts=True)
        if counts.max() > 1:
            out[j] = vals[np.argmax(counts)]
    return out


def _paper_margin(
    neighbours: dict[str, np.ndarray], sims: dict[str, np.ndarray], train_subj: np.ndarray, nearest: np.ndarray
) -> np.ndarray:
    """Mean over layers of (best similarity to the matched subject − best to another subject), shape (m,)."""
    m = len(nearest)
    out = np.zeros(m, np.float32)
    for layer, nb in neighbours.items():
        s = sims[layer]
        subj = np.where(nb >= 0, train_subj[np.clip(nb, 0, None)], "")
        mine = train_subj[np.clip(nearest, 0, None)]
        for j in range(m):
            same = subj[j] == mine[j]
            a = s[j][same].max() if same.any() else s[j, 0]
            b = s[j][~same].max() if (~same).any() else s[j, -1]
            out[j] += (a - b) / len(neighbours)
    return out


def _concat_space(FT: Any, others: list[Any]) -> list[np.ndarray]:
    """Per-layer standardised (train mean/std), L2-normalised, concatenated features for the baselines."""
    out = [[] for _ in range(1 + len(others))]
    for layer in FT.layer_names:
        x = np.asarray(FT.layers[layer], np.float64)
        mu, sd = x.mean(0), x.std(0) + 1e-8
        for i, f in enumerate([FT, *others]):
            z = (np.asarray(f.layers[layer], np.float64) - mu) / sd
            z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
            out[i].append(z / np.sqrt(len(FT.layer_names)))
    return [np.concatenate(parts, axis=1).astype(np.float32) for parts in out]


def _baselines(
    FT: Any, FG: Any, FH: Any, img_t: np.ndarray, img_g: np.ndarray, cfg: AuditConfig, table: pd.DataFrame
) -> dict:
    """CT-score, AuthPct, distance to closest record and raw-pixel correlation on the same inputs.

    Per-slice values are added to ``table`` (``dcr``, ``authentic``, ``pixel_corr``).
    """
    from .baselines import auth_pct, ct_score, dcr, pixel_correlation
    from .preprocess import resize_square

    out: dict[str, Any] = {}
    spaces = _concat_space(FT, [FG] + ([FH] if FH is not None else []))
    xt, xg = spaces[0], spaces[1]
    try:
        d = dcr(xt, xg)
        table["dcr"] = d["distances"] if isinstance(d, dict) else d
        out["dcr_median"] = float(np.median(table["dcr"]))
    except Exception as e:  # noqa: BLE001 - a baseline never breaks the audit
        out["dcr_error"] = f"{type(e).__name__}: {e}"
    try:
        a = auth_pct(xt, xg)
        table["authentic"] = np.asarray(a["authentic"], bool).astype(int)
        out["auth_pct"] = float(a["auth_pct"])
    except Exception as e:  # noqa: BLE001
        out["auth_pct_error"] = f"{type(e).__name__}: {e}"
    if FH is not None:
        try:
            m, t = len(xg), len(spaces[2])
            # Meehan's rule wants > 20 generated samples per cell; small sets get fewer cells and a looser
            # tau (reported), rather than no CT-score at all.
            n_cells = max(1, min(20, m // 40, t // 10))
            tau = min(20.0 / m, 0.5 / n_cells)
            ct = ct_score(xt, spaces[2], xg, n_cells=n_cells, tau=tau, seed=cfg.seed)
            out["ct_score"] = float(ct["ct_score"])
            out["ct_cells"] = int(ct.get("n_cells_used", n_cells))
            if tau < 20.0 / m:
                out["ct_note"] = f"only {m} synthetic slices: CT-score over {n_cells} cell(s) with tau = {tau:.3f}"
        except Exception as e:  # noqa: BLE001
            out["ct_score_error"] = f"{type(e).__name__}: {e}"
    else:
        out["ct_score_error"] = "CT-score needs a holdout (test) set of real scans"
    try:
        s = cfg.align_size
        small = lambda x: np.stack([resize_square(a, s) for a in x]) if x.shape[1:] != (s, s) else x  # noqa: E731
        table["pixel_corr"] = pixel_correlation(small(img_t), small(img_g), views=("id", "hflip", "vflip", "hvflip"))
        out["pixel_corr_median"] = float(np.median(table["pixel_corr"]))
    except Exception as e:  # noqa: BLE001
        out["pixel_corr_error"] = f"{type(e).__name__}: {e}"
    return out
