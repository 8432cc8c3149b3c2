"""Detection benchmark: the paper's controlled-duplication protocol, done right (BENCHMARK.md).

``python -m benchmarks.detection [--quick] [--seeds 0 1 2] [--splits slice subject] [--ablations]``

For every seed and split (:mod:`benchmarks.data`) the per-slice scores of every method are computed
once on the unseen slices (which serve both as the holdout H and as the novel slices of G, cross-fitted
over folds) and once per condition on that condition's copies; the synthetic sets G of every rate are
then subsets of those scores (the scores of a slice do not depend on the rest of G: T and the nulls are
fixed). Every score comes from the library's own code paths:

``paper/<backbone>``
    :class:`inspector.scores.PaperScorer` (Deo et al. 2026) on the identity view, its split-half null,
    ``p`` against that null as the audit's paper mode does, the paper's ``oni`` and mean ONI.
``default/<backbone>``
    :class:`inspector.matching.MemorizationScorer` configured exactly as :class:`AuditConfig`'s
    defaults (views, shortlist, re-ranking, alignment size; the seed follows the benchmark seed), with
    the holdout null ``s(H → T)`` and :class:`inspector.calibration.Calibration`, as ``audit()`` does
    when a holdout is given.
``baselines``
    :mod:`inspector.baselines` on the audit's baseline feature space (:func:`inspector.baselines.baseline_space`)
    and on pixels at ``align_size``: distance to closest record (``dcr``), Alaa's authenticity
    (``authpct``, its own binary rule), raw-pixel correlation over the four flips (``pixcorr``), and
    Meehan's CT-score (dataset level only, with the audit's cell rule).
Cheap ablations (no extra registration): ``norerank`` (the default mode's own feature similarity over
the four flip views, i.e. ``rerank=False``), ``feat-id`` (identity view only, no re-ranking) and
``feat-rot`` (flips and ±5°/±10° rotation views, no re-ranking). ``--ablations`` adds registered
variants of the default mode (other view sets, shortlist, alignment size) on a subset of conditions.

Metrics per (split, seed, condition, rate) and G: sample-level ROC-AUC, average precision, TPR at 1 %
FPR (the largest TPR whose FPR <= 0.01 on G's novel slices), and the flags at the method's default
threshold (``p <= alpha``); dataset level: fraction flagged, Mann–Whitney AUC against the null, mean
ONI (paper), CT-score, AuthPct. The false-positive rate at ``alpha`` is also pooled over every novel
slice of every fold and seed (a slice's ``p`` never depends on the copies), with a Wilson interval.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from inspector.baselines import auth_pct, baseline_space, ct_score, dcr, pixel_correlation
from inspector.calibration import Calibration, wilson_interval
from inspector.config import AuditConfig
from inspector.features import Features, extract, prepare_extractor
from inspector.matching import MemorizationScorer
from inspector.pipeline import extractor_overrides, make_matcher
from inspector.preprocess import CONDITIONS, HARD_CONDITIONS, PAPER_CONDITIONS, resize_square
from inspector.scores import PaperScorer, mann_whitney_auc
from inspector.views import FLIPS, ROTATION_VIEWS

from .data import (
    DATA_DIR,
    N_FOLDS,
    RATES,
    CopySet,
    SliceBank,
    Split,
    builder,
    draw_g,
    load_bank,
    make_copies,
    make_split,
    n_copies,
)
from .data import _min_unseen as min_unseen
from .writers import WRITER_CONDITIONS

__all__ = [
    "PAPER_TABLE4",
    "QUICK_CONDITIONS",
    "ABLATIONS",
    "EXTRA_ABLATIONS",
    "MethodScores",
    "BenchConfig",
    "SeedRun",
    "score_seed",
    "evaluate",
    "run",
    "summarise",
    "tpr_at_fpr",
    "ranking_metrics",
    "main",
]

log = logging.getLogger("benchmarks.detection")

#: Published sample-level AUCs of Deo et al. 2026, Table 4 (mean over three datasets and 5-45 % rates).
PAPER_TABLE4: dict[str, float] = {
    "none": 1.000,
    "noise_0.01": 1.000,
    "noise_0.02": 1.000,
    "intensity": 1.000,
    "rotate_3": 0.871,
    "rotate_5": 0.758,
    "hflip": 0.733,
    "vflip": 0.727,
}
PAPER_TABLE4_OVERALL = 0.886
#: How generators write outputs (:mod:`benchmarks.writers`): orientations, field of view, crops, matrix size,
#: bit depth, any angle. All are scored; the targets (issue 16) cover every one but ``crop_70_80`` and ``rotate_any``.
WRITERS: tuple[str, ...] = WRITER_CONDITIONS
WRITER_TARGETED: tuple[str, ...] = tuple(c for c in WRITER_CONDITIONS if c not in ("crop_70_80", "rotate_any"))
#: Every condition of the benchmark, in table order.
ALL_CONDITIONS: tuple[str, ...] = (*CONDITIONS, *WRITER_CONDITIONS)
TARGET_AUC_WRITERS = 0.99
TARGET_TPR_WRITERS = 0.95
#: Conditions of ``--quick``.
QUICK_CONDITIONS: tuple[str, ...] = (
    "none",
    "noise_0.02",
    "rotate_5",
    "hflip",
    "vflip",
    "rotate_10",
    "crop_85_95",
    "combo",
)
#: Names of the four flip views ("id", "hflip", "vflip", "hvflip").
FLIP_VIEWS: tuple[str, ...] = tuple(v.value for v in FLIPS)
#: The flips and the +-5, +-10 degree rotation views (``feat-rot``, ``views=flips+rot``).
FLIP_ROT_VIEWS: tuple[str, ...] = (*FLIP_VIEWS, *ROTATION_VIEWS)
#: The default mode as it was before the benchmark's evidence changed AuditConfig (commit e3bda78): each
#: shortlisted candidate registered only under the flip of the view it was shortlisted under, shortlist 5.
PREVIOUS = "previous default"
#: Registered variants of the default mode run by ``--ablations``: AuditConfig overrides.
ABLATIONS: dict[str, dict[str, Any]] = {
    PREVIOUS: {"align_flips": "matched", "shortlist": 5, "max_angle": 15.0, "rotation_shortlist": 0},
    "shortlist=5": {"shortlist": 5},
    "views=id": {"views": ("id",)},
    "views=flips+rot": {"views": FLIP_ROT_VIEWS},
}
#: Further variants run only with ``--extra-ablations`` (slower).
EXTRA_ABLATIONS: dict[str, dict[str, Any]] = {
    "shortlist=20": {"shortlist": 20},
    "align_size=96": {"align_size": 96},
}
DEFAULT_N_G = 48
#: Seeds of the full run.
FULL_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)


def ranking_metrics(y: np.ndarray, s: np.ndarray, max_fpr: float = 0.01) -> tuple[float, float, float]:
    """ROC-AUC, average precision and TPR at ``max_fpr`` of scores ``s`` for labels ``y``, in one sort.

    Same definitions as :func:`sklearn.metrics.roc_auc_score`, :func:`sklearn.metrics.average_precision_score`
    and the ROC curve of :func:`sklearn.metrics.roc_curve` (tied scores form one threshold), at a fraction
    of their input-checking cost (the benchmark evaluates tens of thousands of synthetic sets).

    Parameters
    ----------
    y : np.ndarray of {0, 1}, shape (m,)
        1 = copy (positive). Both classes must be present.
    s : np.ndarray, shape (m,)
        Higher = more likely a copy.
    max_fpr : float

    Returns
    -------
    (auc, ap, tpr_at_max_fpr)
        ``tpr_at_max_fpr`` is the largest TPR at a threshold whose FPR is <= ``max_fpr``.
    """
    y = np.asarray(y).astype(np.int64)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # last position of each group of tied scores
    tps = np.cumsum(ys)[last].astype(np.float64)
    fps = (last + 1) - tps
    n_pos, n_neg = tps[-1], fps[-1]
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ranking_metrics needs both classes; got {int(n_pos)} positives, {int(n_neg)} negatives.")
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    ap = float(np.sum(np.diff(tpr) * (tps / (tps + fps))))
    tpr1 = float(tpr[fpr <= max_fpr + 1e-12].max())
    return auc, ap, tpr1


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, max_fpr: float = 0.01) -> float:
    """Largest true-positive rate at a threshold whose false-positive rate is <= ``max_fpr``.

    Parameters
    ----------
    y : np.ndarray of {0, 1}, shape (m,)
    s : np.ndarray, shape (m,)
        Higher = more likely positive.
    """
    return ranking_metrics(y, s, max_fpr)[2]


# ----------------------------------------------------------------------------------------------
# Per-slice scores
# ----------------------------------------------------------------------------------------------


@dataclass
class MethodScores:
    """Per-slice scores of one method for one (split, seed).

    Attributes
    ----------
    method : str
        ``family/backbone`` (e.g. ``default/ssl``).
    family : str
        ``paper``, ``default``, ``ablation`` or ``baseline``.
    backbone : str
        Feature extractor (``pixels``, ``ssl``, ``mri-core``) or ``-`` for pixel correlation.
    unseen : np.ndarray, shape (n_U,)
        Score of every unseen slice (higher = more memorised).
    copies : dict of str to np.ndarray, shape (k,)
        Score of every copy, per condition.
    calibration : str
        ``holdout`` (``p`` against the scores of the fold's holdout), ``fixed`` (against ``null``),
        ``rule`` (the method's own binary flag in ``flag_*``) or ``none``.
    null : np.ndarray or None
        Fixed null (the paper's split-half bootstrap).
    flag_unseen, flag_copies : optional
        Binary flags of a ``rule`` method.
    oni_unseen, oni_copies : optional
        The paper's ONI per slice (dataset score = mean).
    """

    method: str
    family: str
    backbone: str
    unseen: np.ndarray
    copies: dict[str, np.ndarray] = field(default_factory=dict)
    calibration: str = "none"
    null: np.ndarray | None = None
    flag_unseen: np.ndarray | None = None
    flag_copies: dict[str, np.ndarray] = field(default_factory=dict)
    oni_unseen: np.ndarray | None = None
    oni_copies: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class BenchConfig:
    """Settings of a benchmark run.

    Attributes
    ----------
    seeds : sequence of int
    splits : sequence of str
        ``slice`` and/or ``subject``.
    conditions : sequence of str
        Names in :data:`inspector.preprocess.CONDITIONS`.
    rates : sequence of float
    backbones : sequence of str
        Extractors for the paper and default modes.
    default_backbones : sequence of str or None
        Backbones of the (registered) default mode (None: all of ``backbones``).
    default_backbones_subject : sequence of str or None
        The same, in the subject split (None: as ``default_backbones``).
    n_g : int
        Fixed size of G.
    n_draws : int
        Random G per fold and rate.
    ablations : dict
        Registered default-mode variants (AuditConfig overrides) run on ``ablation_conditions``.
    ablation_conditions : sequence of str
    ablation_backbones : sequence of str
    subject_ablations : sequence of str
        Names of ``ablations`` that also run in the subject split (generalisation of a proposal).
    feature_ablations : bool
        Also score the cheap feature-only variants (``feat-id``, ``feat-rot``; needs the rotation views).
    baselines : bool
        Also compute DCR, AuthPct, pixel correlation and the CT-score.
    cache_dir : Path
        Cache of trained ssl encoders.
    mri_core_checkpoint : str or None
    """

    seeds: Sequence[int] = FULL_SEEDS
    splits: Sequence[str] = ("slice", "subject")
    conditions: Sequence[str] = ALL_CONDITIONS
    rates: Sequence[float] = RATES
    backbones: Sequence[str] = ("pixels", "ssl")
    default_backbones: Sequence[str] | None = None
    default_backbones_subject: Sequence[str] | None = None
    n_g: int = DEFAULT_N_G
    n_draws: int = 2
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    ablation_conditions: Sequence[str] = tuple(CONDITIONS)
    ablation_backbones: Sequence[str] = (AuditConfig().extractor,)
    subject_ablations: Sequence[str] = (PREVIOUS,)
    feature_ablations: bool = True
    baselines: bool = True
    cache_dir: Path = DATA_DIR / "cache"
    mri_core_checkpoint: str | None = None

    def __post_init__(self) -> None:
        bad = [c for c in [*self.conditions, *self.ablation_conditions] if c not in ALL_CONDITIONS]
        if bad:
            raise ValueError(f"Unknown condition(s) {bad}; valid: {list(ALL_CONDITIONS)}.")
        if "mri-core" in self.backbones and not self.mri_core_checkpoint:
            raise ValueError(
                "mri-core needs a real checkpoint (--mri-core-checkpoint); with random weights its detection "
                "numbers are meaningless."
            )


@dataclass
class SeedRun:
    """Everything computed for one (split, seed): per-slice scores, the CT spaces, timings."""

    split: Split
    methods: dict[str, MethodScores]
    ct_spaces: dict[str, dict[str, Any]]
    n_copies: int
    timings: dict[str, float]
    encoders: dict[str, dict[str, Any]]
    unseen_acquisition: np.ndarray


def _audit_config(seed: int, **overrides: Any) -> AuditConfig:
    """AuditConfig's defaults, the seed following the benchmark seed, plus explicit overrides."""
    return dataclasses.replace(AuditConfig(), seed=seed, **overrides)


def _extractor_kw(cfg: AuditConfig, backbone: str, checkpoint: str | None) -> dict[str, Any]:
    """The audit's extractor overrides for ``backbone`` (device, seed, layers, checkpoint)."""
    ck = checkpoint if backbone == "mri-core" else None
    return extractor_overrides(dataclasses.replace(cfg, extractor=backbone, checkpoint=ck))


def _small(x: np.ndarray, s: int) -> np.ndarray:
    return x if x.shape[1:] == (s, s) else np.stack([resize_square(a, s) for a in x])


def _default_scores(
    cfg: AuditConfig,
    FT: Features,
    FU: Features,
    FC: dict[str, Features],
    img_t: np.ndarray,
    img_u: np.ndarray,
    copies: dict[str, CopySet],
    groups: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """The default mode exactly as audit() runs it (holdout given): similarity and feature similarity.

    Returns
    -------
    ({"similarity", "feature"} -> unseen scores (n_U,), {"similarity", "feature"} -> {condition: (k,)})
    """
    scorer = make_matcher(cfg)  # the audit's own mapping of AuditConfig to the scorer (mode default)
    scorer.fit(FT.layers, images=img_t, groups=groups)
    views = tuple(cfg.views)
    ru = scorer.score_samples({v: FU.views[v] for v in views}, images=img_u)
    un = {"similarity": ru.similarity.astype(np.float64), "feature": ru.feature_similarity.astype(np.float64)}
    co: dict[str, dict[str, np.ndarray]] = {"similarity": {}, "feature": {}}
    for cond, cs in copies.items():
        rc = scorer.score_samples({v: FC[cond].views[v] for v in views}, images=cs.images)
        co["similarity"][cond] = rc.similarity.astype(np.float64)
        co["feature"][cond] = rc.feature_similarity.astype(np.float64)
    return un, co


def _feature_only(
    FT: Features, FU: Features, FC: dict[str, Features], views: Sequence[str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """MemorizationScorer without re-ranking over ``views``: its feature similarity."""
    sc = MemorizationScorer(rerank=False, device="cpu").fit(FT.layers)
    u = sc.score_samples({v: FU.views[v] for v in views}).similarity.astype(np.float64)
    c = {k: sc.score_samples({v: f.views[v] for v in views}).similarity.astype(np.float64) for k, f in FC.items()}
    return u, c


def score_seed(
    bank: SliceBank,
    split: Split,
    bc: BenchConfig,
    *,
    conditions: Sequence[str],
    progress: Callable[[str], None] | None = None,
) -> SeedRun:
    """Per-slice scores of every method for one (split, seed).

    Parameters
    ----------
    bank : SliceBank
    split : Split
    bc : BenchConfig
    conditions : sequence of str
        Conditions whose copies are made and scored.
    progress : callable, optional
        Called with a short message after each stage.
    """
    seed = split.seed
    cfg = _audit_config(seed)
    say = progress or (lambda msg: log.info(msg))
    timings: dict[str, float] = {}
    encoders: dict[str, dict[str, Any]] = {}
    n_c = n_copies(max(bc.rates), bc.n_g)
    t0 = time.perf_counter()
    copies = {c: make_copies(bank, split, c, n_c, seed) for c in conditions}
    timings["copies"] = time.perf_counter() - t0
    img_t = bank.images[split.train]
    img_u = bank.images[split.unseen]
    groups = bank.acquisition[split.train].astype(str)
    methods: dict[str, MethodScores] = {}
    ct_spaces: dict[str, dict[str, Any]] = {}
    registered = bc.default_backbones if bc.default_backbones is not None else bc.backbones
    if split.kind == "subject" and bc.default_backbones_subject is not None:
        registered = bc.default_backbones_subject
    registered_backbones = [b for b in bc.backbones if b in registered]
    ablations = (
        bc.ablations if split.kind == "slice" else {k: v for k, v in bc.ablations.items() if k in bc.subject_ablations}
    )
    for backbone in bc.backbones:
        t1 = time.perf_counter()
        ext = prepare_extractor(
            backbone, img_t, cache_dir=bc.cache_dir, **_extractor_kw(cfg, backbone, bc.mri_core_checkpoint)
        )
        encoders[backbone] = {
            "train_seconds": float(getattr(ext, "train_seconds", 0.0)),
            "from_cache": bool(getattr(ext, "from_cache", False)),
        }
        timings[f"{backbone}:prepare"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        kw = {"use_cache": False}
        wanted = set(map(str, cfg.views)) | (set(FLIP_ROT_VIEWS) if bc.feature_ablations else set())
        for over in ablations.values():
            wanted |= set(map(str, over.get("views", ())))
        all_views = tuple(v for v in FLIP_ROT_VIEWS if v in wanted) + tuple(sorted(wanted - set(FLIP_ROT_VIEWS)))
        FT = extract(img_t, ext, views=("id",), **kw)
        FU = extract(img_u, ext, views=all_views, **kw)
        FC = {c: extract(cs.images, ext, views=all_views, **kw) for c, cs in copies.items()}
        timings[f"{backbone}:extract"] = time.perf_counter() - t1
        say(f"[{split.kind} seed {seed}] {backbone}: extracted ({timings[f'{backbone}:extract']:.0f}s)")

        # ---- paper mode
        t1 = time.perf_counter()
        paper = PaperScorer(n_bootstrap=cfg.n_bootstrap, seed=cfg.seed).fit(FT.layers)
        pu = paper.score_samples(FU.layers)
        pcs = {c: paper.score_samples(f.layers) for c, f in FC.items()}
        methods[f"paper/{backbone}"] = MethodScores(
            f"paper/{backbone}",
            "paper",
            backbone,
            np.asarray(pu.similarity, np.float64),
            {c: np.asarray(p.similarity, np.float64) for c, p in pcs.items()},
            # as the product's paper mode: p-values against the holdout scored with the paper's similarity
            # (the split-half null is not calibrated for flags; it still gives the paper's MI and ONI)
            calibration="holdout",
            null=np.asarray(paper.null_, np.float64),
            oni_unseen=np.asarray(pu.oni, np.float64),
            oni_copies={c: np.asarray(p.oni, np.float64) for c, p in pcs.items()},
        )
        timings[f"{backbone}:paper"] = time.perf_counter() - t1

        # ---- default mode (registered) and its free ablation (no re-ranking)
        if backbone in registered_backbones:
            t1 = time.perf_counter()
            un, co = _default_scores(cfg, FT, FU, FC, img_t, img_u, copies, groups)
            methods[f"default/{backbone}"] = MethodScores(
                f"default/{backbone}", "default", backbone, un["similarity"], co["similarity"], calibration="holdout"
            )
            methods[f"norerank/{backbone}"] = MethodScores(
                f"norerank/{backbone}", "ablation", backbone, un["feature"], co["feature"], calibration="holdout"
            )
            timings[f"{backbone}:default"] = time.perf_counter() - t1
            say(f"[{split.kind} seed {seed}] {backbone}: default mode scored ({timings[f'{backbone}:default']:.0f}s)")
        for name, views in (("feat-id", ("id",)), ("feat-rot", FLIP_ROT_VIEWS)) if bc.feature_ablations else ():
            u, c = _feature_only(FT, FU, FC, views)
            methods[f"{name}/{backbone}"] = MethodScores(
                f"{name}/{backbone}", "ablation", backbone, u, c, calibration="holdout"
            )

        # ---- registered ablations (slice split, one backbone, a subset of conditions)
        if ablations and backbone in bc.ablation_backbones:
            sub = {c: copies[c] for c in bc.ablation_conditions if c in copies}
            for aname, over in ablations.items():
                t1 = time.perf_counter()
                acfg = _audit_config(seed, **over)
                un, co = _default_scores(acfg, FT, FU, {c: FC[c] for c in sub}, img_t, img_u, sub, groups)
                key = f"abl:{aname}/{backbone}"
                methods[key] = MethodScores(key, "ablation", backbone, un["similarity"], co["similarity"], "holdout")
                timings[f"{backbone}:{key}"] = time.perf_counter() - t1
                say(f"[{split.kind} seed {seed}] ablation {aname}: {timings[f'{backbone}:{key}']:.0f}s")

        # ---- baselines on the audit's baseline feature space
        if not bc.baselines:
            continue
        t1 = time.perf_counter()
        xt, xu = baseline_space(FT.layers, FU.layers)
        xc = {c: baseline_space(FT.layers, f.layers)[1] for c, f in FC.items()}
        ct_spaces[backbone] = {"train": xt, "unseen": xu, "copies": xc}
        methods[f"dcr/{backbone}"] = MethodScores(
            f"dcr/{backbone}",
            "baseline",
            backbone,
            -np.asarray(dcr(xt, xu), np.float64),
            {c: -np.asarray(dcr(xt, x), np.float64) for c, x in xc.items()},
        )
        au = auth_pct(xt, xu)
        ac = {c: auth_pct(xt, x) for c, x in xc.items()}
        methods[f"authpct/{backbone}"] = MethodScores(
            f"authpct/{backbone}",
            "baseline",
            backbone,
            (~au["authentic"]).astype(np.float64),
            {c: (~a["authentic"]).astype(np.float64) for c, a in ac.items()},
            calibration="rule",
            flag_unseen=~au["authentic"],
            flag_copies={c: ~a["authentic"] for c, a in ac.items()},
        )
        timings[f"{backbone}:baselines"] = time.perf_counter() - t1

    if not bc.baselines:
        return SeedRun(split, methods, ct_spaces, n_c, timings, encoders, bank.acquisition[split.unseen])
    t1 = time.perf_counter()
    s = cfg.align_size
    small_t = _small(img_t, s)
    pix_views = FLIP_VIEWS
    methods["pixcorr/-"] = MethodScores(
        "pixcorr/-",
        "baseline",
        "-",
        np.asarray(pixel_correlation(small_t, _small(img_u, s), views=pix_views), np.float64),
        {
            c: np.asarray(pixel_correlation(small_t, _small(cs.images, s), views=pix_views), np.float64)
            for c, cs in copies.items()
        },
    )
    timings["pixcorr"] = time.perf_counter() - t1
    return SeedRun(split, methods, ct_spaces, n_c, timings, encoders, bank.acquisition[split.unseen])


# ----------------------------------------------------------------------------------------------
# Evaluation on the synthetic sets
# ----------------------------------------------------------------------------------------------


def _ct(space: dict[str, Any], h: np.ndarray, novel: np.ndarray, cond: str, cp: np.ndarray, seed: int) -> float:
    """Meehan's CT-score with the audit's cell rule (as :func:`inspector.baselines.run_baselines`)."""
    xg = np.concatenate([space["unseen"][novel], space["copies"][cond][cp]])
    xh = space["unseen"][h]
    m, t = len(xg), len(xh)
    n_cells = max(1, min(20, m // 40, t // 10))
    tau = min(20.0 / m, 0.5 / n_cells)
    # one cell is the same partition whatever the k-means restarts: skip the three redundant ones
    n_init = 1 if n_cells == 1 else 4
    return float(ct_score(space["train"], xh, xg, n_cells=n_cells, tau=tau, seed=seed, n_init=n_init)["ct_score"])


#: The calibration's null kind of each null-calibrated method family.
_NULL_KIND: dict[str, str] = {"holdout": "holdout", "fixed": "split-half bootstrap"}


def evaluate(run: SeedRun, bc: BenchConfig, alpha: float = 0.01) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics of every method on every synthetic set G of one (split, seed).

    Returns
    -------
    per_g : DataFrame
        One row per (condition, fold, rate, draw, method): ``auc``, ``ap``, ``tpr1``, ``flagged``
        (fraction of G flagged), ``fpr_g``/``tpr_g`` (flags among G's novel/copies), ``mw_auc``,
        ``mean_oni``, and ``ct`` rows (method ``ct/<backbone>``).
    novel : DataFrame
        One row per (method, unseen slice) with ``flagged`` at ``alpha`` when the slice is novel (its
        fold's holdout as the null) and the slice's acquisition: the pooled false-positive rate.
    """
    sp = run.split
    rows: list[dict[str, Any]] = []
    seed = sp.seed
    for cond in next(iter(run.methods.values())).copies:
        for f in range(sp.n_folds):
            h = sp.holdout(f)
            for rate in bc.rates:
                for d in range(bc.n_draws):
                    g = draw_g(sp, f, rate, bc.n_g, run.n_copies, seed, d)
                    y = g.labels
                    base = {"split": sp.kind, "seed": seed, "condition": cond, "fold": f, "rate": rate, "draw": d}
                    for m in run.methods.values():
                        if cond not in m.copies:
                            continue
                        s = np.r_[m.unseen[g.novel], m.copies[cond][g.copies]]
                        r = {**base, "method": m.method, "family": m.family, "backbone": m.backbone}
                        r["auc"], r["ap"], r["tpr1"] = ranking_metrics(y, s, 0.01)
                        flags = None
                        null = None
                        if m.calibration == "holdout":
                            null = m.unseen[h]
                        elif m.calibration == "fixed":
                            null = m.null
                        if null is not None:
                            flags = Calibration(s, null, null_kind=_NULL_KIND[m.calibration], alpha=alpha).flags()
                            r["mw_auc"] = mann_whitney_auc(s, null)[0]
                        elif m.calibration == "rule":
                            flags = np.r_[m.flag_unseen[g.novel], m.flag_copies[cond][g.copies]]
                        if flags is not None:
                            r["flagged"] = flags.mean()
                            r["fpr_g"] = flags[y == 0].mean()
                            r["tpr_g"] = flags[y == 1].mean()
                        if m.oni_unseen is not None:
                            r["mean_oni"] = float(np.r_[m.oni_unseen[g.novel], m.oni_copies[cond][g.copies]].mean())
                        rows.append(r)
                    for backbone, space in run.ct_spaces.items():
                        if d > 0:  # the CT-score (k-means) on the first draw only: it is dataset level
                            continue
                        rows.append(
                            {
                                **base,
                                "method": f"ct/{backbone}",
                                "family": "baseline",
                                "backbone": backbone,
                                "ct": _ct(space, h, g.novel, cond, g.copies, seed),
                            }
                        )
    per_g = pd.DataFrame(rows)
    nov: list[dict[str, Any]] = []
    for m in run.methods.values():
        if m.calibration not in ("holdout", "fixed", "rule"):
            continue
        for f in range(sp.n_folds):
            pos = sp.novel(f)
            if m.calibration == "rule":
                flags = m.flag_unseen[pos]
            else:
                null = m.unseen[sp.holdout(f)] if m.calibration == "holdout" else m.null
                kind = _NULL_KIND[m.calibration]
                flags = Calibration(m.unseen[pos], null, null_kind=kind, alpha=alpha).flags()
            for p_, fl in zip(pos, flags, strict=True):
                nov.append(
                    {
                        "split": sp.kind,
                        "seed": seed,
                        "method": m.method,
                        "fold": f,
                        "acquisition": str(run.unseen_acquisition[p_]),
                        "flagged": bool(fl),
                    }
                )
    return per_g, pd.DataFrame(nov)


def per_acquisition(run: SeedRun, methods: Sequence[str], conditions: Sequence[str]) -> pd.DataFrame:
    """Per unseen acquisition: AUC of every condition's copies against that acquisition's unseen slices.

    Used for the subject split (held-out acquisitions reported separately).
    """
    acq = run.unseen_acquisition
    rows = []
    for a in sorted(set(acq.tolist())):
        sel = acq == a
        if sel.sum() < 3:
            continue
        for name in methods:
            m = run.methods.get(name)
            if m is None:
                continue
            for cond in conditions:
                if cond not in m.copies:
                    continue
                c = m.copies[cond]
                y = np.r_[np.zeros(sel.sum()), np.ones(len(c))]
                rows.append(
                    {
                        "split": run.split.kind,
                        "seed": run.split.seed,
                        "acquisition": a,
                        "n_unseen": int(sel.sum()),
                        "method": name,
                        "condition": cond,
                        "auc": ranking_metrics(y, np.r_[m.unseen[sel], c])[0],
                    }
                )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


@dataclass
class RunOutput:
    """All results of :func:`run`."""

    per_g: pd.DataFrame
    novel: pd.DataFrame
    acquisitions: pd.DataFrame
    splits: list[str]
    split_info: pd.DataFrame
    timings: pd.DataFrame
    encoders: pd.DataFrame
    seconds: float
    config: BenchConfig
    bank_counts: dict[str, int]


def run(bc: BenchConfig, progress: Callable[[str], None] | None = None) -> RunOutput:
    """Run the detection benchmark for every split and seed of ``bc``."""
    t0 = time.perf_counter()
    bank = load_bank()
    per_g, novel, acq, timings, encoders, described, info = [], [], [], [], [], [], []
    say = progress or (lambda msg: log.info(msg))
    for kind in bc.splits:
        for seed in bc.seeds:
            t1 = time.perf_counter()
            sp = make_split(bank, kind, seed)
            described.append(sp.describe())
            info.append(
                {
                    "split": kind,
                    "seed": seed,
                    "n_train": len(sp.train),
                    "n_unseen": len(sp.unseen),
                    "min_holdout": min(len(sp.holdout(f)) for f in range(sp.n_folds)),
                    "min_novel": min(len(sp.novel(f)) for f in range(sp.n_folds)),
                    "n_folds": sp.n_folds,
                    "train_acquisitions": ";".join(sp.train_acquisitions),
                }
            )
            say(sp.describe())
            r = score_seed(bank, sp, bc, conditions=bc.conditions, progress=say)
            g, n = evaluate(r, bc, AuditConfig().alpha)
            per_g.append(g)
            novel.append(n)
            if kind == "subject":
                acq.append(
                    per_acquisition(r, ["default/ssl", "paper/ssl", "paper/pixels", "default/pixels"], bc.conditions)
                )
            r.timings["evaluate"] = time.perf_counter() - t1 - sum(r.timings.values())
            r.timings["total"] = time.perf_counter() - t1
            timings.append({"split": kind, "seed": seed, **r.timings})
            for b, e in r.encoders.items():
                encoders.append({"split": kind, "seed": seed, "backbone": b, **e})
            say(f"[{kind} seed {seed}] done in {r.timings['total']:.0f}s")
    return RunOutput(
        per_g=pd.concat(per_g, ignore_index=True),
        novel=pd.concat(novel, ignore_index=True),
        acquisitions=pd.concat(acq, ignore_index=True) if acq else pd.DataFrame(),
        splits=described,
        split_info=pd.DataFrame(info),
        timings=pd.DataFrame(timings),
        encoders=pd.DataFrame(encoders),
        seconds=time.perf_counter() - t0,
        config=bc,
        bank_counts=bank.counts(),
    )


# ----------------------------------------------------------------------------------------------
# Summaries (Markdown)
# ----------------------------------------------------------------------------------------------


def _seed_means(df: pd.DataFrame, keys: Sequence[str], value: str) -> pd.DataFrame:
    """Mean over folds and draws within each seed, then mean and sd over seeds."""
    d = df.dropna(subset=[value])
    per_seed = d.groupby([*keys, "seed"], sort=False)[value].mean().reset_index()
    out = per_seed.groupby(list(keys), sort=False)[value].agg(["mean", "std", "count", "min"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def _fmt(mean: float, sd: float | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if sd is None or sd == 0 or (isinstance(sd, float) and math.isnan(sd)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _label(method: str) -> str:
    fam, bb = method.split("/", 1)
    names = {
        "paper": "paper",
        "default": "default",
        "norerank": "default, no re-rank",
        "feat-id": "features, id view",
        "feat-rot": "features, flips+rot views",
        "dcr": "DCR",
        "authpct": "AuthPct",
        "pixcorr": "pixel corr.",
        "ct": "CT-score",
    }
    if fam == f"abl:{PREVIOUS}":
        return f"previous default ({bb})"
    if fam.startswith("abl:"):
        return f"default, {fam[4:]}" + (f" ({bb})" if bb != "-" else "")
    return names.get(fam, fam) + (f" ({bb})" if bb != "-" else "")


def condition_table(
    per_g: pd.DataFrame, split: str, methods: Sequence[str], metric: str = "auc", with_paper: bool = True
) -> str:
    """Rows = conditions (+ averages), columns = methods; cells = metric mean ± sd over seeds (rates pooled)."""
    d = per_g[(per_g["split"] == split) & per_g["method"].isin(methods)]
    if d.empty:
        return "_no data_"
    s = _seed_means(d, ["method", "condition"], metric)
    conds = [c for c in ALL_CONDITIONS if c in set(d["condition"])]
    header = (
        ["condition"] + (["paper Table 4"] if with_paper and metric == "auc" else []) + [_label(m) for m in methods]
    )
    rows = []
    for c in conds:
        r = [c]
        if with_paper and metric == "auc":
            r.append(_fmt(PAPER_TABLE4[c]) if c in PAPER_TABLE4 else "—")
        for m in methods:
            x = s[(s["method"] == m) & (s["condition"] == c)]
            r.append(_fmt(float(x["mean"].iloc[0]), float(x["std"].iloc[0])) if len(x) else "—")
        rows.append(r)
    # averages over condition groups: per seed, mean over the group's conditions, then over seeds
    for name, group in (
        ("mean, paper's 8", PAPER_CONDITIONS),
        ("mean, harder", HARD_CONDITIONS),
        ("mean, how generators write", WRITERS),
        ("mean, all", ALL_CONDITIONS),
    ):
        gd = d[d["condition"].isin(list(group))]
        if gd.empty or gd["condition"].nunique() < 2:
            continue
        r = [f"**{name}**"]
        if with_paper and metric == "auc":
            r.append(_fmt(PAPER_TABLE4_OVERALL) if name == "mean, paper's 8" else "—")
        for m in methods:
            x = gd[gd["method"] == m].dropna(subset=[metric])
            if x.empty:
                r.append("—")
                continue
            ps = x.groupby("seed")[metric].mean()
            r.append(_fmt(float(ps.mean()), float(ps.std()) if len(ps) > 1 else None))
        rows.append(r)
    return _md_table(header, rows)


def rate_table(per_g: pd.DataFrame, split: str, method: str, metric: str) -> str:
    """Rows = conditions, columns = rates, for one method."""
    d = per_g[(per_g["split"] == split) & (per_g["method"] == method)]
    if d.empty or metric not in d:
        return "_no data_"
    s = _seed_means(d, ["condition", "rate"], metric)
    rates = sorted(set(d["rate"]))
    rows = []
    for c in [c for c in ALL_CONDITIONS if c in set(d["condition"])]:
        r = [c]
        for rt in rates:
            x = s[(s["condition"] == c) & (s["rate"] == rt)]
            r.append(_fmt(float(x["mean"].iloc[0]), float(x["std"].iloc[0])) if len(x) else "—")
        rows.append(r)
    return _md_table(["condition"] + [f"d = {int(round(rt * 100))} %" for rt in rates], rows)


def fpr_table(novel: pd.DataFrame, split: str, methods: Sequence[str]) -> str:
    """False-positive rate on novel slices at the default threshold, pooled over folds and seeds."""
    d = novel[novel["split"] == split]
    rows = []
    for m in methods:
        x = d[d["method"] == m]
        if x.empty:
            continue
        k, n = int(x["flagged"].sum()), len(x)
        lo, hi = wilson_interval(k, n)
        per_seed = x.groupby("seed")["flagged"].mean()
        rows.append(
            [
                _label(m),
                f"{k}/{n}",
                f"{k / n:.4f}",
                f"[{lo:.4f}, {hi:.4f}]",
                ", ".join(f"{v:.3f}" for v in per_seed),
            ]
        )
    return _md_table(["method", "flagged / novel", "FPR", "95 % Wilson", "per seed"], rows)


def dataset_table(per_g: pd.DataFrame, split: str, specs: Sequence[tuple[str, str]]) -> str:
    """Dataset-level scores per rate (mean over conditions and seeds) and their CV across conditions."""
    d = per_g[per_g["split"] == split]
    rates = sorted(set(d["rate"]))
    rows = []
    for method, metric in specs:
        x = d[(d["method"] == method)].dropna(subset=[metric]) if metric in d else pd.DataFrame()
        if x.empty:
            continue
        r = [f"{_label(method)}: {metric}"]
        for rt in rates:
            xr = x[x["rate"] == rt]
            per_cond = xr.groupby("condition")[metric].mean()  # over seeds, folds, draws
            mean = float(per_cond.mean())
            cv = float(per_cond.std() / abs(mean)) if abs(mean) > 1e-12 and len(per_cond) > 1 else float("nan")
            r.append(f"{mean:.3f} (CV {cv:.2f})")
        rows.append(r)
    return _md_table(["score"] + [f"d = {int(round(rt * 100))} %" for rt in rates], rows)


def seed_table(per_g: pd.DataFrame, split: str, methods: Sequence[str], conditions: Sequence[str]) -> str:
    """Per seed: mean and minimum AUC over ``conditions`` (to check a setting is better on every seed)."""
    d = per_g[(per_g["split"] == split) & per_g["condition"].isin(list(conditions))]
    seeds = sorted(set(d["seed"]))
    rows = []
    for m in methods:
        x = d[d["method"] == m]
        if x.empty:
            continue
        r = [_label(m)]
        for s in seeds:
            per_c = x[x["seed"] == s].groupby("condition")["auc"].mean()
            r.append(f"{per_c.mean():.4f} / {per_c.min():.4f}")
        rows.append(r)
    return _md_table(["method (mean / min AUC over conditions)"] + [f"seed {s}" for s in seeds], rows)


def acquisition_table(acq: pd.DataFrame, novel: pd.DataFrame, method: str) -> str:
    """Subject split: per held-out acquisition, AUC (paper conditions / harder) and FPR on its slices."""
    if acq.empty:
        return "_no data_"
    d = acq[acq["method"] == method]
    nv = novel[(novel["split"] == "subject") & (novel["method"] == method)]
    rows = []
    for a in sorted(set(d["acquisition"])):
        x = d[d["acquisition"] == a]
        p = x[x["condition"].isin(list(PAPER_CONDITIONS))]["auc"]
        hh = x[x["condition"].isin(list(HARD_CONDITIONS))]["auc"]
        fl = nv[nv["acquisition"] == a]["flagged"]
        rows.append(
            [
                a,
                str(x["seed"].nunique()),
                str(int(x.groupby("seed")["n_unseen"].first().sum())),
                _fmt(float(p.mean())) if len(p) else "—",
                _fmt(float(p.min())) if len(p) else "—",
                _fmt(float(hh.mean())) if len(hh) else "—",
                _fmt(float(hh.min())) if len(hh) else "—",
                f"{int(fl.sum())}/{len(fl)}" if len(fl) else "—",
            ]
        )
    return _md_table(
        ["held-out acquisition", "seeds", "novel slices", "AUC paper's 8", "min", "AUC harder", "min", "flagged (FPR)"],
        rows,
    )


def machine() -> str:
    """CPU model, cores, RAM, torch and faiss versions."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    try:
        import faiss

        fv = faiss.__version__
    except ImportError:  # pragma: no cover
        fv = "not installed"
    import os as _os

    load = ", ".join(f"{x:.1f}" for x in _os.getloadavg()) if hasattr(_os, "getloadavg") else "?"
    return (
        f"{cpu}, {_os.cpu_count()} logical cores, {ram:.0f} GB RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {fv}, numpy {np.__version__}, Python {platform.python_version()}; "
        f"load average at the end of the run {load} (the cores are shared with other jobs)"
    )


def _alpha() -> float:
    return float(AuditConfig().alpha)


def _n_folds(out: RunOutput) -> str:
    """The number of folds of the run's splits (from the run; older runs: the data module's default)."""
    d = out.split_info
    if len(d) and "n_folds" in d:
        vals = sorted({int(v) for v in d["n_folds"].dropna()})
        if vals:
            return "/".join(map(str, vals))
    return str(N_FOLDS)


def _rates(bc: BenchConfig) -> str:
    return ", ".join(f"{int(round(r * 100))}" for r in bc.rates)


def summarise(out: RunOutput) -> str:
    """The Markdown report of a run (the detection part of RESULTS.md)."""
    bc = out.config
    pg, nv = out.per_g, out.novel
    backbones = list(bc.backbones)
    cfg_extractor = AuditConfig().extractor
    headline = (
        [f"paper/{b}" for b in backbones]
        + [f"default/{b}" for b in backbones]
        + [f"abl:{PREVIOUS}/{cfg_extractor}"]
        + [f"dcr/{backbones[-1]}", f"authpct/{backbones[-1]}", "pixcorr/-"]
    )
    parts = []
    parts.append(
        f"Seeds {list(bc.seeds)}; |G| = {bc.n_g} at d ∈ {{{_rates(bc)}}} % "
        f"({', '.join(str(n_copies(r, bc.n_g)) for r in bc.rates)} copies), {bc.n_draws} random G per fold, "
        f"rate and seed, {_n_folds(out)} folds (each fold's novel pool against the other folds as H). "
        f"Slices per acquisition: {out.bank_counts}.\n"
    )
    parts.append("Splits:\n" + "\n".join(f"- {s}" for s in out.splits) + "\n")
    for split in [s for s in ("slice", "subject") if s in set(pg["split"])]:
        meths = [m for m in headline if m in set(pg[pg["split"] == split]["method"])]
        title = split.capitalize() + "-level split"
        parts.append(f"### {title}: sample-level ROC-AUC (mean ± sd over seeds, rates pooled)\n")
        parts.append(condition_table(pg, split, meths, "auc"))
        parts.append(f"\n### {split.capitalize()}-level split: TPR at 1 % FPR\n")
        parts.append(condition_table(pg, split, [m for m in meths if not m.startswith("authpct")], "tpr1", False))
        parts.append(f"\n### {split.capitalize()}-level split: average precision\n")
        parts.append(condition_table(pg, split, [m for m in meths if not m.startswith("authpct")], "ap", False))
        fmeth = [
            m
            for m in sorted(set(nv[nv["split"] == split]["method"]))
            if not m.startswith("abl:") or m.startswith(f"abl:{PREVIOUS}/")
        ]
        rank = ["default", "paper", "norerank", "feat-id", "feat-rot", "authpct"]
        order = sorted(fmeth, key=lambda m: (rank.index(m.split("/")[0]) if m.split("/")[0] in rank else 9, m))
        parts.append(
            f"\n### {split.capitalize()}-level split: false-positive rate on novel slices at the default threshold "
            f"(p <= {_alpha():g}; AuthPct: its own rule), pooled over folds and seeds\n"
        )
        parts.append(fpr_table(nv, split, order))
        dspecs = []
        for b in backbones:
            dspecs += [
                (f"default/{b}", "flagged"),
                (f"default/{b}", "mw_auc"),
                (f"paper/{b}", "mean_oni"),
                (f"paper/{b}", "flagged"),
                (f"paper/{b}", "mw_auc"),
                (f"ct/{b}", "ct"),
                (f"authpct/{b}", "flagged"),
            ]
        parts.append(
            f"\n### {split.capitalize()}-level split: dataset-level scores (mean over conditions and seeds; "
            "CV = sd / |mean| across conditions)\n"
        )
        parts.append(dataset_table(pg, split, dspecs))
        for b in backbones:
            if f"default/{b}" in set(pg[pg["split"] == split]["method"]):
                parts.append(f"\n### {split.capitalize()}-level split: default mode ({b}), ROC-AUC per rate\n")
                parts.append(rate_table(pg, split, f"default/{b}", "auc"))
                parts.append(f"\n### {split.capitalize()}-level split: default mode ({b}), TPR at 1 % FPR per rate\n")
                parts.append(rate_table(pg, split, f"default/{b}", "tpr1"))
        if split == "subject":
            for m in [f"default/{b}" for b in backbones] + ["paper/ssl"]:
                parts.append(f"\n### Subject split: held-out acquisitions, {_label(m)} (pooled over seeds)\n")
                parts.append(acquisition_table(out.acquisitions, nv, m))
    # settings comparison
    sl = pg[pg["split"] == "slice"]
    if not sl.empty:
        comp = [m for b in backbones for m in (f"default/{b}", f"norerank/{b}", f"feat-id/{b}", f"feat-rot/{b}")]
        comp = [m for m in comp if m in set(sl["method"])]
        parts.append("\n### Settings: backbone, re-ranking and views (slice split, ROC-AUC)\n")
        parts.append(condition_table(pg, "slice", comp, "auc", False))
        parts.append("\n### Settings per seed (slice split; mean / min ROC-AUC over all conditions)\n")
        parts.append(seed_table(pg, "slice", comp, list(bc.conditions)))
        for b in bc.ablation_backbones:
            abl = sorted(m for m in set(sl["method"]) if m.startswith("abl:") and m.endswith(f"/{b}"))
            if not abl:
                continue
            ref = f"default/{b}"
            parts.append(
                f"\n### Registered ablations ({b}, slice split, conditions "
                f"{', '.join(bc.ablation_conditions)}): ROC-AUC\n"
            )
            sub = pg[pg["condition"].isin(list(bc.ablation_conditions))]
            parts.append(condition_table(sub, "slice", [ref, *abl], "auc", False))
            parts.append("\n#### TPR at 1 % FPR\n")
            parts.append(condition_table(sub, "slice", [ref, *abl], "tpr1", False))
            parts.append("\n#### Per seed (mean / min ROC-AUC over these conditions)\n")
            parts.append(seed_table(pg, "slice", [ref, *abl], list(bc.ablation_conditions)))
            parts.append("\n#### False-positive rate on novel slices\n")
            parts.append(fpr_table(nv, "slice", [ref, *abl]))
    return "\n".join(parts) + "\n"


#: Targets of issue 7 for the default mode.
TARGET_AUC_PAPER = 0.99
TARGET_TPR_PAPER = 0.95
TARGET_AUC_HARD = 0.97
TARGET_FPR = (0.005, 0.02)


def _per_condition(per_g: pd.DataFrame, split: str, method: str, metric: str) -> pd.DataFrame:
    d = per_g[(per_g["split"] == split) & (per_g["method"] == method)]
    return _seed_means(d, ["condition"], metric).set_index("condition")


def targets(out: RunOutput, method: str, split: str = "slice") -> list[list[str]]:
    """Issue 7's targets for one method: rows (target, measured, met, shortfall)."""
    pg, nv = out.per_g, out.novel
    rows: list[list[str]] = []
    auc = _per_condition(pg, split, method, "auc")
    tpr = _per_condition(pg, split, method, "tpr1")
    if auc.empty:
        return rows

    def check(conds: Sequence[str], table: pd.DataFrame, thr: float, what: str) -> None:
        got = table.loc[[c for c in conds if c in table.index]]
        if got.empty:
            return
        worst = got["mean"].idxmin()
        miss = got[got["mean"] < thr]
        seeds_min = float(got["min"].min())
        measured = f"worst {worst} {got.loc[worst, 'mean']:.4f} (lowest single seed {seeds_min:.4f})"
        short = "; ".join(f"{c} {v:.4f} ({thr - v:.4f} below)" for c, v in miss["mean"].items()) if len(miss) else "—"
        rows.append([what, measured, "yes" if miss.empty else "**no**", short])

    check(list(PAPER_CONDITIONS), auc, TARGET_AUC_PAPER, f"ROC-AUC >= {TARGET_AUC_PAPER} in each of the paper's 8")
    check(list(PAPER_CONDITIONS), tpr, TARGET_TPR_PAPER, f"TPR at 1 % FPR >= {TARGET_TPR_PAPER} in each of the 8")
    check(list(HARD_CONDITIONS), auc, TARGET_AUC_HARD, f"ROC-AUC >= {TARGET_AUC_HARD} in each harder condition")
    check(
        list(WRITER_TARGETED),
        auc,
        TARGET_AUC_WRITERS,
        f"ROC-AUC >= {TARGET_AUC_WRITERS} for every orientation, FOV 0.6-1.6, crop 80-95 %, matrix size, 8-bit",
    )
    check(list(WRITER_TARGETED), tpr, TARGET_TPR_WRITERS, f"TPR at 1 % FPR >= {TARGET_TPR_WRITERS} in the same")
    x = nv[(nv["split"] == split) & (nv["method"] == method)]
    if len(x):
        k, n = int(x["flagged"].sum()), len(x)
        lo, hi = wilson_interval(k, n)
        f = k / n
        ok = TARGET_FPR[0] <= f <= TARGET_FPR[1]
        short = (
            "—" if ok else (f"{TARGET_FPR[0] - f:.4f} below" if f < TARGET_FPR[0] else f"{f - TARGET_FPR[1]:.4f} above")
        )
        rows.append(
            [
                f"FPR on novel slices at alpha = {_alpha():g} in [{TARGET_FPR[0]}, {TARGET_FPR[1]}]",
                f"{k}/{n} = {f:.4f} (95 % CI [{lo:.4f}, {hi:.4f}])",
                "yes" if ok else "**no**",
                short,
            ]
        )
    return rows


def _seed_summary(pg: pd.DataFrame, split: str, method: str, conds: Sequence[str]) -> pd.DataFrame:
    """Per seed: mean AUC, mean TPR at 1 % FPR and min AUC over ``conds``."""
    d = pg[(pg["split"] == split) & (pg["method"] == method) & pg["condition"].isin(list(conds))]
    if d.empty:
        return pd.DataFrame()
    pc = d.groupby(["seed", "condition"])[["auc", "tpr1"]].mean().reset_index()
    g = pc.groupby("seed")
    return pd.DataFrame({"auc": g["auc"].mean(), "tpr1": g["tpr1"].mean(), "min_auc": g["auc"].min()})


def compare(pg: pd.DataFrame, a: str, b: str, conds: Sequence[str], split: str = "slice") -> dict[str, Any] | None:
    """Is ``a`` better than ``b`` on every seed? Per seed: mean AUC, mean TPR at 1 % FPR, min AUC over ``conds``.

    ``better``: on every seed neither mean AUC nor mean TPR is lower and at least one is higher (by > 1e-4);
    ``worse``: the reverse. Otherwise the seeds disagree.
    """
    sa, sb = _seed_summary(pg, split, a, conds), _seed_summary(pg, split, b, conds)
    if sa.empty or sb.empty:
        return None
    seeds = sorted(set(sa.index) & set(sb.index))
    sa, sb = sa.loc[seeds], sb.loc[seeds]
    da = sa - sb
    up = (da["auc"] >= 0) & (da["tpr1"] >= 0) & ((da["auc"] > 1e-4) | (da["tpr1"] > 1e-4))
    down = (da["auc"] <= 0) & (da["tpr1"] <= 0) & ((da["auc"] < -1e-4) | (da["tpr1"] < -1e-4))
    return {
        "better": bool(up.all()),
        "worse": bool(down.all()),
        "n_better": int(up.sum()),
        "n_worse": int(down.sum()),
        "seeds": seeds,
        "a": sa,
        "b": sb,
    }


def _cmp_cells(v: dict[str, Any]) -> list[str]:
    a, b = v["a"], v["b"]
    n = len(v["seeds"])
    if float((a["auc"] - b["auc"]).abs().max()) <= 1e-4 and float((a["tpr1"] - b["tpr1"]).abs().max()) <= 1e-4:
        verdict = f"no difference on {n}/{n} seeds"
    elif v["better"]:
        verdict = f"better on {n}/{n} seeds"
    elif v["worse"]:
        verdict = f"worse on {n}/{n} seeds"
    else:
        verdict = f"mixed: better on {v['n_better']}, worse on {v['n_worse']} of {n} seeds"
    return [
        verdict,
        f"{a['auc'].mean():.4f} vs {b['auc'].mean():.4f}",
        f"{a['tpr1'].mean():.3f} vs {b['tpr1'].mean():.3f}",
        f"{a['min_auc'].mean():.3f} vs {b['min_auc'].mean():.3f}",
        f"{(a['auc'] - b['auc']).min():+.4f} … {(a['auc'] - b['auc']).max():+.4f}",
    ]


def recommendations(out: RunOutput) -> list[str]:
    """The default extractor and settings chosen from the evidence (slice split, every seed)."""
    pg = out.per_g
    bc = out.config
    cfg = AuditConfig()
    conds = list(bc.conditions)
    methods = set(pg["method"])
    backbones = [b for b in bc.backbones if f"default/{b}" in methods]
    rows: list[list[str]] = []
    lines: list[str] = []

    def add(what: str, a: str, b: str, cs: Sequence[str]) -> dict[str, Any] | None:
        v = compare(pg, a, b, cs)
        if v:
            rows.append([what, *_cmp_cells(v)])
        return v

    choice = cfg.extractor
    for i, x in enumerate(backbones):
        for y in backbones[i + 1 :]:
            v = add(f"extractor: default/{x} vs default/{y}", f"default/{x}", f"default/{y}", conds)
            if v and (v["better"] or v["worse"]):
                choice = x if v["better"] else y
            w = f"abl:{PREVIOUS}/{x}", f"abl:{PREVIOUS}/{y}"
            if all(m in methods for m in w):
                add(f"extractor, with the previous default: {x} vs {y}", *w, list(bc.ablation_conditions))
    for b in backbones:
        add(f"re-ranking on vs off ({b})", f"default/{b}", f"norerank/{b}", conds)
        add(f"features only: flip views vs identity ({b})", f"norerank/{b}", f"feat-id/{b}", conds)
        add(f"features only: flips+rotations vs flips ({b})", f"feat-rot/{b}", f"norerank/{b}", conds)
    recommended: list[str] = []
    for m in sorted((m for m in methods if m.startswith("abl:")), key=lambda m: (m.split("/")[1], m)):
        name, b = m[4:].split("/", 1)
        v = add(f"`{name}` vs AuditConfig ({b})", m, f"default/{b}", list(bc.ablation_conditions))
        if v and v["better"] and b == choice:
            recommended.append(name)
    lines.append(
        "Each row compares two methods on every seed of the slice split (all conditions): mean ROC-AUC, mean TPR at "
        "1 % FPR and the worst condition's AUC, averaged over seeds, and the range of the per-seed AUC difference. "
        "A setting is recommended only if it is better on every seed.\n"
    )
    lines.append(
        _md_table(
            [
                "comparison (first vs second)",
                "verdict",
                "mean AUC",
                "mean TPR@1%",
                "worst-condition AUC",
                "ΔAUC per seed",
            ],
            rows,
        )
    )
    lines.append("")
    if choice == cfg.extractor:
        lines.append(f"- **Extractor: keep `{cfg.extractor}`** (AuditConfig's current choice; see the first row).")
    else:
        lines.append(
            f"- **Extractor: `{choice}`** is better on every seed than AuditConfig's `{cfg.extractor}`: change "
            "`AuditConfig.extractor` (inspector/config.py, not edited here)."
        )
    settings = [r for r in recommended if r != PREVIOUS]
    if PREVIOUS in recommended:
        lines.append(
            f"- **The previous default is better on every seed than the current one ({choice})**: revert "
            "`align_flips`/`shortlist` in AuditConfig."
        )
    if not any(m.startswith("abl:") for m in methods):
        lines.append("- **AuditConfig settings:** the registered ablations were not run (`--ablations`); no verdict.")
    elif settings:
        lines.append(
            f"- **AuditConfig settings better on every seed ({choice}):** {', '.join(f'`{r}`' for r in settings)}."
        )
    else:
        lines.append(
            f"- **AuditConfig settings:** no tried setting is better on every seed with `{choice}`; keep them."
        )
    return lines


def _span(out: RunOutput, split: str, col: str) -> str:
    """'a' or 'a-b' over the seeds of one split ('—' when the split was not run)."""
    d = out.split_info
    x = d.loc[d["split"] == split, col] if len(d) else pd.Series(dtype=int)
    if x.empty:
        return "—"
    lo, hi = int(x.min()), int(x.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _train_acqs(out: RunOutput) -> str:
    d = out.split_info
    if d.empty or not (d["split"] == "subject").any():
        return "—"
    sub = d[d["split"] == "subject"]
    return "; ".join(f"seed {r.seed}: {r.train_acquisitions.replace(';', ', ')}" for r in sub.itertuples())


def headline_section(out: RunOutput, mri_core: str | None = None) -> str:
    """The summary at the top of RESULTS.md: data and sizes, the headline table, targets, recommendations."""
    bc = out.config
    pg = out.per_g
    cfg = AuditConfig()
    backbones = list(bc.backbones)
    default_method = f"default/{cfg.extractor}"
    parts = ["## Summary\n"]
    parts.append(
        "**Data.** Every real slice of the sample-data sources (nilearn's MNI152 2009a template, nibabel's T1/EPI "
        "test volumes, dipy's b0 volumes, pydicom/nibabel single MR images: "
        f"{sum(out.bank_counts.values())} slices from {len(out.bank_counts)} acquisitions, kept >= "
        f"{builder().MIN_GAP} slice indices apart within a volume and axis, resized to the audit's {cfg.size} px). "
        "The MNI template is exactly left-right symmetric: only one sagittal hemisphere is used, and its "
        "axial/coronal slices (their own mirror image) are never the source of an `hflip`/`combo` copy (such a "
        "copy would be an exact copy, i.e. `none`). "
        f"**Slice-level split** (as the paper): T = {_span(out, 'slice', 'n_train')} slices, the other "
        f"{_span(out, 'slice', 'n_unseen')} dealt to {_n_folds(out)} folds per (volume, axis) stratum; for fold f, "
        f"H = the other folds ({_span(out, 'slice', 'min_holdout')}+ slices, so p <= {cfg.alpha:g} is reachable) and "
        "the novel pool = "
        f"fold f ({_span(out, 'slice', 'min_novel')}+ slices): H and G never share a slice, and every unseen slice "
        "is scored as novel once per seed. "
        + (
            "**Subject-level split**: whole acquisitions go to T "
            f"({_span(out, 'subject', 'n_train')} slices; a seeded choice among the partitions that leave >= "
            f"{min_unseen(cfg.alpha, N_FOLDS)} unseen slices), the rest ({_span(out, 'subject', 'n_unseen')}) to "
            f"{_n_folds(out)} folds as above; T's acquisitions per seed: {_train_acqs(out)}. "
            if "subject" in set(out.split_info.get("split", ()))
            else "The subject-level split was not run. "
        )
        + f"**G**: fixed size {bc.n_g}, d in {{{_rates(bc)}}} % "
        f"({', '.join(str(n_copies(r, bc.n_g)) for r in bc.rates)} copies), {bc.n_draws} random G per fold, rate "
        "and seed; copies are training slices through the condition, always applied. Per-slice scores are computed "
        "once per condition and the G of every rate are subsets (a slice's score depends only on T and the null).\n"
    )
    parts.append(
        f"**Methods** (all through the library's own classes): `paper` = PaperScorer (Deo et al.: ZCA, top-1 cosine, "
        f"geometric mean over layers; MI and ONI against its split-half null; flags at p <= {cfg.alpha:g} against the "
        f"holdout scored with the paper's similarity, as the audit's paper mode does); `default` = "
        f"MemorizationScorer with AuditConfig's defaults (views {list(cfg.views)}, "
        f"shortlist {cfg.shortlist}, re-ranking {cfg.rerank}, align_flips {cfg.align_flips!r}, "
        f"align_size {cfg.align_size}, rotations up to {cfg.max_angle:g} degrees, rotation-invariant shortlist "
        f"{cfg.rotation_shortlist}; "
        "seed = benchmark seed; built by `inspector.pipeline.make_matcher`) calibrated on the holdout null by "
        "`inspector.calibration.Calibration`, as `audit()` does with a holdout; `previous default` = the same with "
        + ", ".join(f"{k}={v!r}" for k, v in ABLATIONS[PREVIOUS].items())
        + " (the default mode's earlier settings); baselines on the audit's baseline "
        "feature space (`inspector.baselines.baseline_space`). "
        "Backbones: `pixels` (downsampled intensities) and `ssl` (contrastive CNN trained on T, once per seed and "
        "split). "
        + (
            f"`mri-core` with the checkpoint `{mri_core}`."
            if mri_core
            else "`mri-core` is not benchmarked: no real MRI-CORE checkpoint is available offline, and with random "
            "weights its detection numbers would be meaningless (its speed is in the speed section)."
        )
        + "\n"
    )
    head = [f"paper/{b}" for b in backbones] + [f"default/{b}" for b in backbones] + [f"abl:{PREVIOUS}/{cfg.extractor}"]
    head += [f"dcr/{cfg.extractor if cfg.extractor in backbones else backbones[-1]}", "pixcorr/-"]
    parts.append("### Headline: sample-level ROC-AUC, slice-level split (mean ± sd over seeds; rates pooled)\n")
    parts.append(condition_table(pg, "slice", [m for m in head if m in set(pg["method"])], "auc"))
    parts.append("\n### Headline: TPR at 1 % FPR, slice-level split\n")
    parts.append(condition_table(pg, "slice", [m for m in head if m in set(pg["method"])], "tpr1", False))
    parts.append(
        "\nThe paper's Table 4 numbers are its own (three MRI datasets, MRI-CORE features, flips applied with "
        "probability 0.5, so half of its 'flipped' copies were exact copies); ours apply every condition always.\n"
    )
    # targets
    for split in [s for s in ("slice", "subject") if s in set(pg["split"])]:
        for b in backbones:
            m = f"default/{b}"
            rows = targets(out, m, split)
            if not rows:
                continue
            tag = " (AuditConfig's current default)" if m == default_method else ""
            parts.append(f"\n### Targets of issue 7, {_label(m)}{tag}, {split}-level split\n")
            parts.append(_md_table(["target", "measured (mean over seeds)", "met", "shortfall"], rows))
    for split in [s for s in ("slice", "subject") if s in set(pg["split"])]:
        for b in backbones:
            m = f"abl:{PREVIOUS}/{b}"
            rows = targets(out, m, split) if m in set(pg[pg["split"] == split]["method"]) else []
            if rows:
                parts.append(
                    "\n### Targets, for comparison: the previous default ("
                    + ", ".join(f"{k}={v!r}" for k, v in ABLATIONS[PREVIOUS].items())
                    + f"), {b}, {split}-level split\n"
                )
                parts.append(_md_table(["target", "measured (mean over seeds)", "met", "shortfall"], rows))
    parts.append("\n### Choice of the default extractor and settings (evidence on every seed, slice split)\n")
    parts.extend(recommendations(out))
    return "\n".join(parts) + "\n"


def timing_table(out: RunOutput) -> str:
    """Wall time per (split, seed), grouped by stage."""
    t = out.timings.copy()
    groups = {
        "encoder training/loading": lambda c: c.endswith(":prepare"),
        "copies + extraction": lambda c: c == "copies" or c.endswith(":extract"),
        "paper mode": lambda c: c.endswith(":paper"),
        "default mode": lambda c: c.endswith(":default"),
        "registered ablations": lambda c: ":abl:" in c,
        "baselines": lambda c: c.endswith(":baselines") or c == "pixcorr",
        "evaluation": lambda c: c == "evaluate",
        "total": lambda c: c == "total",
    }
    rows = []
    for _, r in t.iterrows():
        cells = [str(r["split"]), str(r["seed"])]
        for pick in groups.values():
            cols = [c for c in t.columns if c not in ("split", "seed") and pick(c)]
            vals = [r[c] for c in cols if pd.notna(r[c])]
            cells.append(f"{sum(vals):.0f}" if vals else "—")
        rows.append(cells)
    lines = [_md_table(["split", "seed", *[f"{g} (s)" for g in groups]], rows)]
    enc = out.encoders
    if not enc.empty:
        ssl = enc[enc["backbone"] == "ssl"]
        if not ssl.empty:
            trained = ssl.loc[~ssl["from_cache"], "train_seconds"]
            med = float(trained.median()) if len(trained) else float("nan")
            lines.append(
                f"\nssl encoders: {int((~ssl['from_cache']).sum())} trained in this run (median {med:.0f} s each), "
                f"{int(ssl['from_cache'].sum())} loaded from the weight cache."
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from parsed command-line arguments."""
    quick = bool(args.quick)
    seeds = args.seeds if args.seeds is not None else ([0] if quick else list(FULL_SEEDS))
    splits = args.splits if args.splits is not None else (["slice"] if quick else ["slice", "subject"])
    conds = (
        args.conditions if args.conditions is not None else (list(QUICK_CONDITIONS) if quick else list(ALL_CONDITIONS))
    )
    backbones = list(args.backbones)
    if args.mri_core_checkpoint:
        backbones.append("mri-core")
    return BenchConfig(
        seeds=seeds,
        splits=splits,
        conditions=conds,
        backbones=backbones,
        default_backbones_subject=args.subject_default_backbones,
        n_g=args.n_g,
        n_draws=args.draws,
        ablations=({**ABLATIONS, **(EXTRA_ABLATIONS if args.extra_ablations else {})} if args.ablations else {}),
        ablation_conditions=conds,
        cache_dir=Path(args.cache_dir),
        mri_core_checkpoint=args.mri_core_checkpoint,
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, slice split, 8 conditions (for iteration)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--splits", nargs="+", choices=("slice", "subject"), default=None)
    ap.add_argument("--conditions", nargs="+", default=None, help=f"subset of {list(ALL_CONDITIONS)}")
    ap.add_argument("--backbones", nargs="+", default=["pixels", "ssl"], choices=("pixels", "ssl"))
    ap.add_argument(
        "--subject-default-backbones",
        nargs="+",
        default=None,
        help="backbones of the registered default mode in the subject split (default: all)",
    )
    ap.add_argument("--n-g", type=int, default=DEFAULT_N_G, help=f"fixed size of G (default {DEFAULT_N_G})")
    ap.add_argument("--draws", type=int, default=2, help="random G per fold, rate and seed (default 2)")
    ap.add_argument("--ablations", action="store_true", help="registered default-mode variants (slice split)")
    ap.add_argument(
        "--extra-ablations", action="store_true", help="with --ablations: also shortlist=20 and align_size=96 (slower)"
    )
    ap.add_argument("--mri-core-checkpoint", default=None, help="MRI-CORE weights; adds the mri-core backbone")
    ap.add_argument("--cache-dir", default=str(DATA_DIR / "cache"), help="cache of trained ssl encoders")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "_out", help="CSV output folder")
    return ap


def save(out: RunOutput, folder: Path) -> None:
    """Write the raw tables as CSV and the whole run as ``detection_run.pkl`` (git-ignored)."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "detection_run.pkl", "wb") as f:
        pickle.dump(out, f)
    out.per_g.to_csv(folder / "detection_per_g.csv", index=False)
    out.novel.to_csv(folder / "detection_novel.csv", index=False)
    out.timings.to_csv(folder / "detection_timings.csv", index=False)
    acq = folder / "detection_acquisitions.csv"
    if not out.acquisitions.empty:
        out.acquisitions.to_csv(acq, index=False)
    else:
        acq.unlink(missing_ok=True)  # no subject split in this run: never leave an older run's table behind


def main(argv: Sequence[str] | None = None) -> int:
    """Run the detection benchmark and print its tables."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # the paper mode's rank-deficient ZCA warns once per fit (documented in RESULTS.md): keep the log readable
    logging.getLogger("inspector").setLevel(logging.ERROR)
    logging.getLogger("benchmarks.data").setLevel(logging.WARNING)
    bc = config_from_args(args)
    out = run(bc)
    save(out, args.out)
    print(summarise(out))
    print(timing_table(out))
    print(f"\ntotal {out.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    # run through the importable module, so that pickled results name benchmarks.detection, not __main__
    from benchmarks.detection import main as _main

    sys.exit(_main())
