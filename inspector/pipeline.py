"""The audit as public stages, and :func:`audit`, the facade that runs them in order.

Data flows one way (DESIGN §4)::

    load_inputs -> extract_features (cached) -> match -> calibrate -> attribute -> publish -> AuditResult

``publish`` (:mod:`inspector.naming`) replaces file and folder names by pseudonymous labels and subject IDs
taken from names by keyed pseudonyms, unless ``AuditConfig.show_paths``; every stage before it runs on the real
paths.

Each stage is a public function over plain data types, so the benchmarks run exactly what the product
runs by calling the same stages. The stages hold no maths of their own: they call the estimators of
:mod:`inspector.matching` (both modes behind one :class:`~inspector.matching.Matcher` protocol),
:mod:`inspector.calibration`, :mod:`inspector.attribution` and :mod:`inspector.baselines`.

Two modes:

``default``
    View-invariant features whitened with a shrunk covariance, a shortlist over all views, each candidate
    registered onto the synthetic slice and scored by aligned correlation
    (:class:`~inspector.matching.MemorizationScorer`); null ``s(H → T)`` with a holdout, else
    leave-one-subject-out within T.
``paper``
    Deo et al. 2026 exactly (:class:`~inspector.matching.PaperMatcher`): ZCA whitening, top-1 cosine,
    geometric mean over layers, split-half bootstrap null.

Both modes report the paper's ``mi_z`` and ``oni`` per slice and its mean ONI.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .cache import hash_key
from .calibration import Calibration
from .config import AuditConfig
from .features import Features
from .io import LoadConfig, load_cohort
from .matching import InsufficientDataError, Matcher, MatchResult
from .preprocess import PreprocessConfig
from .privacy import load_or_create_key
from .result import VOLUME_EVIDENCE_COLUMNS, AuditResult, versions
from .scores import PaperScorer, PaperScores
from .store import release_pages
from .types import Cohort, ProgressFn

__all__ = [
    "Inputs",
    "FeatureSet",
    "Matches",
    "InsufficientDataError",
    "load_inputs",
    "loading_size",
    "extractor_overrides",
    "extract_features",
    "make_matcher",
    "match",
    "calibrate",
    "volume_ids",
    "attribute",
    "audit",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- stage 1
@dataclass
class Inputs:
    """The three cohorts of an audit (loaded at the audit's slicing axis and :func:`loading_size`).

    Attributes
    ----------
    train, synthetic : Cohort
    holdout : Cohort or None
    seconds : float
    """

    train: Cohort
    synthetic: Cohort
    holdout: Cohort | None = None
    seconds: float = 0.0

    def images(self, which: str, size: int) -> np.ndarray:
        """The slices of one cohort (``train``, ``synthetic`` or ``holdout``) as (n, size, size) float32."""
        c = getattr(self, which)
        if c is None:
            raise ValueError(f"This audit has no {which} cohort.")
        return c.stack(size=size)


def loading_size(cfg: AuditConfig) -> int:
    """The square size slices are resampled to on loading: ``cfg.size``, or the extractor's input size if larger.

    The extractor resizes what it is given to its ``input_size``; loading at that size when it exceeds
    ``cfg.size`` (``mri-core``: 224 px against the default 128) resamples each slice once, from its native grid,
    instead of twice (native to ``cfg.size``, then up to 224). The stages that work at ``cfg.size`` or their own
    ``align_size`` (matching, registration, baselines, evidence) resize from the loaded slices as before.
    """
    from .models import extractor_class

    ext_size = extractor_class(cfg.extractor).config_cls(**extractor_overrides(cfg)).input_size
    return max(int(cfg.size), int(ext_size))


def _load(
    source: str | Path | Cohort,
    cfg: AuditConfig,
    what: str,
    progress: ProgressFn | None,
    store_dir: str | Path | None | bool = False,
) -> Cohort:
    """Load one cohort; with a ``store_dir`` (not ``False``) its slices are spilled to disk as they are made."""
    if isinstance(source, Cohort):
        return source
    lc = LoadConfig(
        axis=cfg.axis, preprocess=PreprocessConfig(size=loading_size(cfg)), allow_outside_root=cfg.allow_outside_root
    )

    def prog(stage: str, done: int, total: int) -> None:
        if progress:
            progress(f"loading:{what}", done, total)

    spill = None
    if store_dir is not False:
        from .store import SliceSpill

        spill = SliceSpill(store_dir)
    return load_cohort(source, lc, progress=prog, spill=spill)


def load_inputs(
    train: str | Path | Cohort,
    synthetic: str | Path | Cohort,
    holdout: str | Path | Cohort | None = None,
    config: AuditConfig | None = None,
    progress: ProgressFn | None = None,
    *,
    store_dir: str | Path | None | bool = False,
) -> Inputs:
    """Load the three cohorts with the audit's slicing axis, at :func:`loading_size`.

    ``store_dir``: a cache root (or ``None`` for the default one) moves each cohort's slices into its
    memory-mapped slice store there (:func:`inspector.store.to_store`, reused across runs); ``False`` (default)
    keeps them in memory.

    Slices are resampled once, from their native grid, to ``cfg.size`` or, when it is larger, to the chosen
    extractor's input size (224 px for ``mri-core``), so that the extractor receives them without a second
    resampling.

    What needs no data is checked before anything is read: the settings against this machine
    (:meth:`AuditConfig.preflight`), that every path exists, and the optional ``labels.csv`` beside the synthetic
    set (:func:`inspector.attribution.check_labels`). What needs only the file list is checked after loading,
    before any feature is extracted: the tool's own outputs inside an input root are dropped
    (:func:`inspector.folder.drop_audit_outputs`), then the training set's size and subjects, then the skipped
    files.

    Raises
    ------
    inspector.config.ConfigError
        A setting that cannot be used here (e.g. ``device='cuda'`` without CUDA, ``mri-core`` without a checkpoint).
    inspector.io.CohortNotFoundError, inspector.io.NoImagesError
        A path does not exist or holds no readable image.
    inspector.attribution.LabelsError
        A malformed ``labels.csv`` (naming the line).
    InsufficientDataError
        Fewer than 4 training slices; a single training subject without a holdout (default mode).
    inspector.result.MissingEvidenceError
        Training or holdout files were skipped (unreadable, over a budget...) and ``config.allow_skipped`` is off;
        it names every such file and its reason.
    """
    from .attribution import check_labels
    from .folder import drop_audit_outputs
    from .io import CohortNotFoundError
    from .result import MissingEvidenceError, missing_evidence

    cfg = config or AuditConfig()
    cfg.preflight()
    named = {"train": train, "synthetic": synthetic, "holdout": holdout}
    what = {"train": "training cohort", "synthetic": "synthetic set", "holdout": "holdout"}
    for name, src in named.items():
        if src is not None and not isinstance(src, Cohort) and not Path(src).expanduser().exists():
            raise CohortNotFoundError(
                f"The {what[name]} path {Path(src).expanduser()} does not exist. Expected a folder of images, a CSV "
                "manifest with columns path,subject_id[,label], or a single image file."
            )
    if isinstance(synthetic, Cohort):
        check_labels(synthetic.root)
    else:
        src = Path(synthetic).expanduser().absolute()
        check_labels(src if src.is_dir() else src.parent)
    t0 = time.perf_counter()

    def stored(c: Cohort) -> Cohort:
        # each cohort goes to its store as soon as it is loaded: the next one loads beside a mapped file
        if store_dir is not False:
            from .store import to_store

            to_store(c, store_dir)
        return c

    t = drop_audit_outputs(_load(train, cfg, "train", progress, store_dir))
    if len(t) < 4:
        raise InsufficientDataError(
            f"The training cohort {t.name!r} has {len(t)} slice(s); an audit needs at least 4 to whiten features "
            "and build a null. Point --train at the whole training set."
        )
    t = stored(t)
    g = stored(drop_audit_outputs(_load(synthetic, cfg, "synthetic", progress, store_dir)))
    h = stored(drop_audit_outputs(_load(holdout, cfg, "holdout", progress, store_dir))) if holdout is not None else None
    if cfg.mode == "default" and h is None and len(t.subjects) < 2:
        raise InsufficientDataError(
            f"The training cohort {t.name!r} holds a single subject, so the leave-one-subject-out null "
            "cannot be built. Give a holdout of real, unseen scans (--holdout) or more training subjects."
        )
    gaps = {"train": missing_evidence(t), "holdout": missing_evidence(h)}
    if any(gaps.values()):
        if not cfg.allow_skipped:
            names = {"train": t.name, "holdout": h.name if h is not None else ""}
            raise MissingEvidenceError(gaps, names)
        for name, files in gaps.items():
            if files and not cfg.show_paths:  # the published result names them (labels); no file name in the log
                log.warning("missing evidence (allow_skipped): %d %s file(s) skipped", len(files), name)
                continue
            for sk in files:
                log.warning("missing evidence (allow_skipped): %s file %s skipped: %s", name, sk.path, sk.reason)
    unread = missing_evidence(g)
    if unread and not cfg.show_paths:
        log.warning("%d synthetic file(s) were skipped and are not audited", len(unread))
    for sk in unread if cfg.show_paths else ():
        log.warning("synthetic file %s was skipped and is not audited: %s", sk.path, sk.reason)
    return Inputs(t, g, h, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- stage 2
@dataclass
class FeatureSet:
    """Per-layer, per-view features of the three cohorts from one extractor.

    Attributes
    ----------
    train, synthetic : Features
        ``train`` holds every view only when the null needs them (default mode without a holdout).
    holdout : Features or None
    fingerprint : str
        The extractor's fingerprint (config and weights).
    seconds : dict of str to float
        ``training`` (fitting the extractor) and ``extracting``.
    """

    train: Features
    synthetic: Features
    holdout: Features | None
    fingerprint: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return self.train.layer_names


def extractor_overrides(cfg: AuditConfig) -> dict[str, Any]:
    """The extractor settings an :class:`AuditConfig` implies (device, seed, layers, checkpoint).

    Raises
    ------
    ValueError
        A checkpoint given for another extractor than ``mri-core``.
    """
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


def query_views(cfg: AuditConfig) -> tuple[str, ...]:
    """The views each query is matched under: the config's in default mode, the identity in paper mode."""
    return tuple(cfg.views) if cfg.mode == "default" else ("id",)


def extract_features(
    inputs: Inputs,
    config: AuditConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    executor: Any = None,
) -> FeatureSet:
    """Fit the extractor on T when it needs fitting (cached), then extract every cohort's views (cached).

    ``executor`` (an :class:`inspector.cluster.Cluster`) extracts on its workers; the same features."""
    from .features import extract, prepare_extractor

    cfg = config or AuditConfig()
    t0 = time.perf_counter()
    ext = prepare_extractor(
        cfg.extractor, inputs.train, cache_dir=cache_dir, progress=progress, **extractor_overrides(cfg)
    )
    t1 = time.perf_counter()
    views = query_views(cfg)
    train_views = views if (cfg.mode == "default" and inputs.holdout is None) else ("id",)
    kw: dict[str, Any] = {"cache_dir": cache_dir, "use_cache": use_cache, "progress": progress, "executor": executor}
    ft = extract(inputs.train, ext, views=train_views, **kw)
    fg = extract(inputs.synthetic, ext, views=views, **kw)
    fh = extract(inputs.holdout, ext, views=views, **kw) if inputs.holdout is not None else None
    t2 = time.perf_counter()
    return FeatureSet(ft, fg, fh, ft.fingerprint, {"training": t1 - t0, "extracting": t2 - t1})


# ---------------------------------------------------------------------------------------------- stage 3
@dataclass
class Matches:
    """The match stage's output.

    Attributes
    ----------
    synthetic : MatchResult
        Every synthetic slice against T.
    holdout : MatchResult or None
        Every holdout slice against T, when the null is the holdout's (default mode).
    train_loso, train_loso_rows : MatchResult and np.ndarray of int, or None
        For the volume null (unit ``volume``, :attr:`AuditConfig.volume_null_train`): the slices of a sample of
        training volumes (their rows in T) against the training slices of the other subjects.
    null : np.ndarray, shape (n_null,)
        The same score for slices known not to be copies.
    null_kind : str
    paper : PaperScores
        The paper's scores of the synthetic set (``mi_z``, ``oni``), in both modes.
    seconds : float
    """

    synthetic: MatchResult
    null: np.ndarray
    null_kind: str
    paper: PaperScores
    seconds: float = 0.0
    holdout: MatchResult | None = None
    train_loso: MatchResult | None = None
    train_loso_rows: np.ndarray | None = None


def make_matcher(cfg: AuditConfig, *, paper: PaperScorer | None = None) -> Matcher:
    """The (unfitted) matcher of ``cfg.mode``, configured from ``cfg``.

    The one place the audit's settings become the scorer's, shared with the benchmarks so that they
    measure exactly what the product runs. ``paper`` reuses an already fitted paper scorer.
    """
    from .matching import MemorizationScorer, PaperMatcher

    if cfg.mode == "paper":
        return PaperMatcher(n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, top_k=cfg.top_k, scorer=paper)
    return MemorizationScorer(
        shortlist=cfg.shortlist,
        top_k=cfg.top_k,
        rerank=cfg.rerank,
        align_size=cfg.align_size,
        align_flips=cfg.align_flips,
        descriptor_shortlist=cfg.descriptor_shortlist,
        rotation_shortlist=cfg.rotation_shortlist,
        max_angle=cfg.max_angle,
        verify_top=cfg.verify_top,
        device=cfg.device,
    )


def match(
    inputs: Inputs,
    features: FeatureSet,
    config: AuditConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    executor: Any = None,
) -> Matches:
    """Score the synthetic set and the null through one matcher, and the paper's MI/ONI of the synthetic set.

    ``executor`` (an :class:`inspector.cluster.Cluster`) scores the default mode's queries on its workers (the
    same scores); the paper mode's scores are cheap and stay here.

    Raises
    ------
    InsufficientDataError
        Without a holdout, in default mode, when T holds a single subject (from the matcher's null).
    """
    cfg = config or AuditConfig()
    t0 = time.perf_counter()
    groups = inputs.train.subject_ids.astype(str)
    paper = PaperScorer(n_bootstrap=cfg.n_bootstrap, seed=cfg.seed).fit(features.train.layers)
    pg = paper.score_samples(features.synthetic.layers)
    if progress:
        progress("scoring:paper", 1, 1)
    img_t = inputs.images("train", cfg.size)
    matcher = make_matcher(cfg, paper=paper)
    if executor is not None and hasattr(matcher, "executor"):
        matcher.executor = executor
    matcher = matcher.fit(features.train.layers, images=img_t, groups=groups)
    res = matcher.score_samples(
        features.synthetic.views, images=inputs.images("synthetic", cfg.size), progress=progress, stage="synthetic"
    )
    fh = features.holdout
    null, kind = matcher.null_scores(
        holdout_views=fh.views if fh is not None else None,
        holdout_images=inputs.images("holdout", cfg.size) if fh is not None else None,
        train_views=features.train.views,
        train_images=img_t,
        progress=progress,
    )
    out = Matches(res, null, kind, pg, time.perf_counter() - t0, getattr(matcher, "holdout_result_", None))
    if out.holdout is not None and cfg.volume_null_train > 0 and resolve_unit(cfg, inputs) == "volume":
        rows = loso_volume_rows(inputs.train, cfg.volume_null_train, cfg.seed)
        if rows.size:
            out.train_loso = score_rows(matcher, features.train.layers, img_t, groups, rows, progress)
            out.train_loso_rows = rows
        out.seconds = time.perf_counter() - t0
    return out


#: Training rows scored per part by :func:`score_rows` (2,048 slices of 128 px = 128 MB of images at a time).
SCORE_PART_ROWS = 2048


def score_rows(
    matcher: Matcher,
    layers: dict[str, np.ndarray],
    img_t: np.ndarray,
    groups: np.ndarray,
    rows: np.ndarray,
    progress: ProgressFn | None = None,
    part: int = SCORE_PART_ROWS,
) -> MatchResult:
    """Training rows ``rows`` scored leave-one-subject-out (the volume null's training part), ``part`` rows at a
    time so that the sample's images are never all in memory (each part is read from the store and its pages
    released); the parts' results joined in order are those of one call over every row.

    Parameters
    ----------
    matcher : Matcher
        Fitted on the training set.
    layers : dict of str to np.ndarray, shape (n, d_l)
        The training features.
    img_t : np.ndarray, shape (n, H, W)
        The training images (typically a memory-mapped store).
    groups : np.ndarray of str, shape (n,)
    rows : np.ndarray of int, shape (k,)
    progress : callable, optional
    part : int
        Rows per part (>= 1).

    Returns
    -------
    MatchResult
        One row per entry of ``rows``.
    """
    from .matching import concat_match_results

    if part < 1:
        raise ValueError(f"part must be >= 1 row; got {part}.")
    rows = np.asarray(rows, np.int64)
    results = []
    for s in range(0, rows.size, part):
        r = rows[s : s + part]
        views = {"id": {layer: np.asarray(f)[r] for layer, f in layers.items()}}
        sample = np.asarray(img_t[r], np.float32)
        release_pages(img_t)  # the part is a copy: the store's pages read for it leave the process

        def prog(name: str, done: int, total: int, off: int = s, n: int = r.size) -> None:
            if progress is not None:  # this part's progress as a share of all rows
                progress(name, off + done * n // max(total, 1), rows.size)

        res = matcher.score_samples(views, images=sample, groups=groups[r], progress=prog, stage="volume null")
        results.append(res)
        del sample
    return concat_match_results(results)


def loso_volume_rows(train: Cohort, limit: int, seed: int) -> np.ndarray:
    """Rows of up to ``limit`` training volumes (seeded sample, volumes of at least :data:`MIN_VOLUME_SLICES`
    slices whose subject is not the only one) for the volume null's leave-one-subject-out part, shape (n,)."""
    vids = volume_ids(train).astype(str)
    subj = np.asarray([s.subject_id for s in train.slices], dtype=object)
    if len(set(subj)) < 2:
        return np.zeros(0, np.int64)
    names, inv, counts = np.unique(vids, return_inverse=True, return_counts=True)
    ok = np.flatnonzero(counts >= MIN_VOLUME_SLICES)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(ok, min(limit, ok.size), replace=False)) if ok.size else ok
    return np.flatnonzero(np.isin(inv, pick)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- stage 3b
def resolve_unit(cfg: AuditConfig, inputs: Inputs) -> str:
    """The unit the audit signs off: ``cfg.unit``, or for ``auto`` ``volume`` when most synthetic slices and most
    training slices come from volumes of at least :data:`MIN_VOLUME_SLICES` slices, else ``slice``."""
    if cfg.unit != "auto":
        return cfg.unit

    def multi(c: Cohort | None) -> bool:
        if c is None or not len(c.slices):
            return False
        _, inv, counts = np.unique(volume_ids(c).astype(str), return_inverse=True, return_counts=True)
        return float((counts[inv] >= MIN_VOLUME_SLICES).mean()) > 0.5

    return "volume" if multi(inputs.synthetic) and multi(inputs.train) else "slice"


#: Fewest slices of a volume that is matched and verified in 3D (fewer: judged by its slices only; a slab of a
#: few slices has too little through-plane structure for a 3D registration to verify).
MIN_VOLUME_SLICES = 8


@dataclass
class VolumeEvidence:
    """The volume stage's output: per synthetic volume and per holdout volume, its 3D-verified match.

    Attributes
    ----------
    synthetic : list of VolumeMatch
    holdout : list of VolumeMatch
        The holdout volumes through the same path (the volume null); empty without a holdout.
    seconds : float
    train_null : list of VolumeMatch
        Training volumes through the same path against the other subjects' volumes (the volume null's
        leave-one-subject-out part).
    """

    synthetic: list[Any]
    holdout: list[Any]
    seconds: float = 0.0
    train_null: list[Any] = field(default_factory=list)

    def scores(self) -> dict[str, float]:
        """Synthetic volume id -> volume similarity (NaN when not verifiable)."""
        return {v.volume: v.similarity for v in self.synthetic}

    def null(self) -> np.ndarray:
        """The volume null: the holdout volumes' and the leave-one-subject-out training volumes' similarities
        (finite ones), shape (n,)."""
        s = np.asarray([v.similarity for v in [*self.holdout, *self.train_null]], np.float64)
        return s[np.isfinite(s)]

    def null_description(self) -> str:
        """How many volumes of each kind the volume null holds, in words."""
        h = int(np.isfinite([v.similarity for v in self.holdout]).sum()) if self.holdout else 0
        t = int(np.isfinite([v.similarity for v in self.train_null]).sum()) if self.train_null else 0
        return f"{h} holdout volumes" + (f" and {t} training volumes scored against the other subjects" if t else "")

    def table(self) -> Any:
        """One row per synthetic volume: the verification columns of ``volumes.csv``."""
        import json

        import pandas as pd

        rows = []
        for v in self.synthetic:
            al, run = v.alignment, v.run
            rows.append(
                {
                    "volume": v.volume,
                    "volume_similarity": v.similarity,
                    "volume_ncc": al.ncc if al is not None else np.nan,
                    "coverage": al.coverage if al is not None else np.nan,
                    "verified_train_volume": v.train_volume,
                    "verified_train_subject": v.train_subject,
                    "slice_consistency": v.consistency,
                    "run_first": run.first if run is not None else -1,
                    "run_last": run.last if run is not None else -1,
                    "run_slope": run.slope if run is not None else np.nan,
                    "run_offset": run.offset if run is not None else np.nan,
                    "n_candidate_volumes": len(v.candidates),
                    "transform": json.dumps(al.to_dict()["matrix"]) if al is not None else "",
                }
            )
        return pd.DataFrame(rows, columns=list(VOLUME_EVIDENCE_COLUMNS))


def verify_volumes(
    inputs: Inputs,
    matches: Matches,
    config: AuditConfig | None = None,
    *,
    progress: ProgressFn | None = None,
) -> VolumeEvidence | None:
    """Match synthetic (and holdout) volumes as wholes: slice runs, a shortlist, 3D verification.

    Returns None when the unit is ``slice`` (:func:`resolve_unit`) or in paper mode (the paper scores slices).
    """
    from .store import RowSubset
    from .volumes import group_volumes, match_volumes, match_weights

    cfg = config or AuditConfig()
    if resolve_unit(cfg, inputs) != "volume":
        return None
    if cfg.mode == "paper":
        log.info("paper mode scores slices: no volume verification")
        return None
    t0 = time.perf_counter()

    def refs(slices: list[Any], ids: np.ndarray) -> list[Any]:
        return group_volumes(ids, [s.slice_index for s in slices], [s.subject_id for s in slices])

    train_refs = refs(inputs.train.slices, volume_ids(inputs.train))
    img_t = inputs.images("train", cfg.size)

    def run(query_refs: list[Any], query_images: np.ndarray, res: MatchResult, stage: str) -> list[Any]:
        mt, wt = match_weights(res.similarity, res.nearest, res.candidates)
        return match_volumes(
            query_refs,
            query_images,
            train_refs,
            img_t,
            mt,
            wt,
            shortlist=cfg.volume_shortlist,
            min_slices=MIN_VOLUME_SLICES,
            size=VOLUME_GRID,
            device=cfg.device,
            progress=progress,
            stage=stage,
        )

    def cohort_run(which: str, res: MatchResult) -> list[Any]:
        c = getattr(inputs, which)
        return run(refs(c.slices, volume_ids(c)), inputs.images(which, cfg.size), res, f"volumes:{which}")

    syn = cohort_run("synthetic", matches.synthetic)
    hold = cohort_run("holdout", matches.holdout) if matches.holdout is not None and inputs.holdout is not None else []
    loso: list[Any] = []
    if matches.train_loso is not None and matches.train_loso_rows is not None:
        # a sample of training volumes, each against the other subjects (rows index the sample's slices)
        rows = matches.train_loso_rows
        q_refs = refs([inputs.train.slices[int(i)] for i in rows], volume_ids(inputs.train)[rows])
        # read one volume at a time from the store, not copied whole (64 volumes are 400 MB at 128 px)
        loso = run(q_refs, RowSubset(img_t, rows), matches.train_loso, "volumes:null")
    return VolumeEvidence(syn, hold, time.perf_counter() - t0, loso)


#: Grid side (voxels) of the 3D verification.
VOLUME_GRID = 48


# ---------------------------------------------------------------------------------------------- stage 4
def calibrate(
    matches: Matches, inputs: Inputs, config: AuditConfig | None = None, volumes: VolumeEvidence | None = None
) -> Calibration:
    """The :class:`~inspector.calibration.Calibration` of the synthetic similarities against the null (and of the
    3D-verified volume similarities against the holdout volumes', when the volume stage ran)."""
    from .attribution import nearest_subjects
    from .calibration import exchangeability_diagnostics

    cfg = config or AuditConfig()
    holdout_null = matches.null_kind == "holdout" and inputs.holdout is not None
    return Calibration(
        np.asarray(matches.synthetic.similarity, np.float64),
        matches.null,
        null_kind=matches.null_kind,
        alpha=cfg.alpha,
        fdr=cfg.fdr,
        nearest_subject=nearest_subjects(matches.synthetic, inputs.train),
        mi_z=matches.paper.mi_z,
        oni=matches.paper.oni,
        mode=cfg.mode,
        groups=volume_ids(inputs.synthetic),
        null_groups=volume_ids(inputs.holdout) if holdout_null else None,
        null_subjects=inputs.holdout.subject_ids if holdout_null else None,
        diagnostics=exchangeability_diagnostics(inputs.holdout, inputs.synthetic) if holdout_null else (),
        volume_scores=volumes.scores() if volumes is not None and holdout_null else None,
        volume_null=volumes.null() if volumes is not None and holdout_null else None,
        volume_null_description=volumes.null_description() if volumes is not None and holdout_null else None,
    )


def volume_ids(cohort: Cohort) -> np.ndarray:
    """The volume of each slice: its source (a NIfTI file, a DICOM series, an ``.npz`` member; a 2D image file
    is a volume of one slice), shape (n,) of str."""
    return np.asarray([s.path for s in cohort.slices], dtype=object)


# ---------------------------------------------------------------------------------------------- stage 5
def attribute(
    inputs: Inputs,
    features: FeatureSet,
    matches: Matches,
    calibration: Calibration,
    config: AuditConfig | None = None,
    volume_evidence: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """The score table, the per-subject table and the baselines' summary.

    ``volume_evidence`` is :meth:`VolumeEvidence.table` (the volume stage's columns of ``volumes.csv``).

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame, dict)
        ``scores.csv``'s table (with the baselines' per-slice columns and any ground truth), ``subjects.csv``'s
        table and the baselines' dataset-level values.
    """
    from .attribution import attach_labels, score_table, subjects_table, volumes_table
    from .baselines import run_baselines

    cfg = config or AuditConfig()
    fh = features.holdout
    cols, baselines = run_baselines(
        features.train.layers,
        features.synthetic.layers,
        fh.layers if fh is not None else None,
        inputs.images("train", cfg.size),
        inputs.images("synthetic", cfg.size),
        pixel_size=cfg.align_size,
        seed=cfg.seed,
    )
    table = score_table(
        inputs.synthetic, inputs.train, matches.synthetic, calibration, matches.paper, features.layers, cols
    )
    table = attach_labels(table, inputs.synthetic)
    subjects = subjects_table(
        table, inputs.train, volumes_table(table, calibration, evidence=volume_evidence), cfg.alpha
    )
    return table, subjects, baselines


# ---------------------------------------------------------------------------------------------- the facade
def audit(
    train: str | Path | Cohort,
    synthetic: str | Path | Cohort,
    holdout: str | Path | Cohort | None = None,
    config: AuditConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    cluster: Any = None,
) -> AuditResult:
    """Audit a synthetic set for copies of training slices: the stages above, in order.

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
        Every setting (:class:`inspector.config.AuditConfig`).
    cache_dir : path, optional
        Cache of embeddings and trained encoders (default: the user's cache dir).
    use_cache : bool
        Read and write the embedding cache.
    progress : callable, optional
        ``progress(stage, done, total)`` for loading, training, extracting, searching, aligning, scoring.
    cluster : str or inspector.cluster.Cluster, optional
        Extract and match on a Dask cluster's workers (:mod:`inspector.cluster`): an open :class:`Cluster`, or an
        address (``"local:N"``, ``"tcp://HOST:PORT"``) connected for this audit and closed after it. The same
        result as without it.

    Returns
    -------
    AuditResult
        ``table`` has one row per synthetic slice; higher ``similarity``/``mi``/``mi_z`` and lower
        ``p_value``/``oni`` mean more memorised. Unless ``config.show_paths``, its cohorts, tables and
        calibration carry pseudonymous names only (:func:`inspector.naming.publish`: ``<subject>/vol-<n>`` for
        every file and folder name, keyed pseudonyms for subjects), and so does everything saved from it; the
        audit ID hashes the published cohorts.

    Raises
    ------
    inspector.io.CohortNotFoundError, inspector.io.NoImagesError
        A path does not exist or holds no readable image.
    InsufficientDataError
        Too few slices or subjects for the requested null.
    """
    from .naming import build_naming, publish

    cfg = config or AuditConfig()
    if isinstance(cluster, str):
        from .cluster import connect

        with connect(cluster) as c:
            return audit(
                train, synthetic, holdout, cfg, cache_dir=cache_dir, use_cache=use_cache, progress=progress, cluster=c
            )
    t0 = time.perf_counter()
    # the pseudonym key before any data is read (a bad key file is bad input, found at once)
    key = None if cfg.show_paths else load_or_create_key()
    inputs = load_inputs(train, synthetic, holdout, cfg, progress, store_dir=cache_dir if use_cache else False)
    features = extract_features(
        inputs, cfg, cache_dir=cache_dir, use_cache=use_cache, progress=progress, executor=cluster
    )
    matches = match(inputs, features, cfg, progress=progress, executor=cluster)
    vols = verify_volumes(inputs, matches, cfg, progress=progress)
    calibration = calibrate(matches, inputs, cfg, vols)
    t4 = time.perf_counter()
    evidence = vols.table() if vols is not None else None
    table, subjects, baselines = attribute(inputs, features, matches, calibration, cfg, evidence)
    # every stage above ran on the real paths (ground truth, joins); from here on only published names
    naming = build_naming(
        {"train": inputs.train, "synthetic": inputs.synthetic, "holdout": inputs.holdout},
        show_paths=cfg.show_paths,
        key=key,
    )
    inputs, table, subjects, calibration = publish(naming, inputs, table, subjects, calibration)
    if evidence is not None:
        evidence = naming.volume_evidence(evidence)
    timings = {
        "loading": inputs.seconds,
        **features.seconds,
        "scoring": matches.seconds,
        **({"volumes": vols.seconds} if vols is not None else {}),
        "baselines": time.perf_counter() - t4,
    }
    audit_id = hash_key(
        kind="audit",
        train=inputs.train.content_hash,
        synthetic=inputs.synthetic.content_hash,
        holdout=inputs.holdout.content_hash if inputs.holdout is not None else None,
        config=cfg.to_dict(),
        extractor=features.fingerprint,
        version=__version__,
    )
    timings["total"] = time.perf_counter() - t0
    result = AuditResult(
        audit_id=audit_id,
        config=cfg,
        train=inputs.train,
        synthetic=inputs.synthetic,
        holdout=inputs.holdout,
        table=table,
        calibration=calibration,
        subjects=subjects,
        layers=features.layers,
        neighbours=matches.synthetic.neighbours,
        neighbour_sims=matches.synthetic.neighbour_sims,
        alignment=matches.synthetic.alignment,
        baselines=baselines,
        timings=timings,
        versions=versions(),
        extractor_fingerprint=features.fingerprint,
        volume_evidence=evidence,
    )
    v = result.verdict
    if v.warning:
        log.warning(v.warning)
    log.info("audit %s: %s", audit_id[:12], v.copying_reason)
    return result
