"""The audit's configuration and its result: everything the app, the report and the CLI need.

:class:`AuditResult` is computed once by :func:`inspector.audit.audit`; the app and the report only
read it. Threshold changes (:meth:`AuditResult.flagged_at`) and pair views
(:meth:`AuditResult.pair`) are cheap look-ups over stored arrays, never a recomputation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .cache import atomic_write_bytes
from .types import Cohort

__all__ = ["AuditConfig", "AuditResult", "PairEvidence", "gate", "versions", "wilson_interval"]

log = logging.getLogger(__name__)

#: Columns of ``scores.csv`` that are part of the stable CLI contract, in order.
SCORE_COLUMNS: tuple[str, ...] = (
    "synthetic_path",
    "slice_index",
    "subject_id",
    "similarity",
    "mi",
    "p_value",
    "flagged",
    "mi_z",
    "oni",
    "nearest_train_path",
    "nearest_train_slice",
    "nearest_train_subject",
)


def versions() -> dict[str, str]:
    """Versions of the package, Python and the main dependencies."""
    out = {"inspector": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("numpy", "scipy", "torch", "faiss", "pandas", "sklearn", "nibabel", "pydicom"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001 - a missing optional module is just not listed
            continue
    return out


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion ``k / n``.

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(0, 1)`` when ``n == 0``.
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class AuditConfig:
    """Every setting of an audit. Frozen and hashed into the audit ID.

    Attributes
    ----------
    mode : str
        ``"default"`` (calibrated, view-invariant, alignment-verified) or ``"paper"`` (Deo et al. 2026).
    extractor : str
        Feature extractor name (``ssl``, ``mri-core``, ``pixels``).
    checkpoint : str or None
        Weights file for ``mri-core``.
    layers : tuple of str
        Layers to use; empty = the extractor's defaults.
    alpha : float
        Target false-positive rate per synthetic slice; flagged when ``p <= alpha``.
    fdr : bool
        Benjamini–Hochberg control across the synthetic set instead of per-slice ``alpha``.
    views : tuple of str
        Views of each query matched against the training set (default mode). Paper mode uses ``("id",)``.
    rerank : bool
        Alignment-verified re-ranking of the feature shortlist (default mode).
    shortlist : int
        How many training candidates per query are registered and re-ranked (10: measured in
        benchmarks/RESULTS.md, better than 5 on shifted and cropped copies).
    align_flips : str
        ``"all"``: register each candidate under all four flips (default, measured best);
        ``"matched"``: only under the flip of the feature view that found it.
    top_k : int
        Neighbours kept per layer for display and attribution.
    axis : str
        Slicing axis for volumes.
    size : int
        Square size slices are resampled to on loading.
    align_size : int
        Working resolution of the registration.
    n_bootstrap : int
        Split-half bootstrap rounds of the paper's null.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    seed : int
        Seed for encoder training, bootstrap and k-means.
    """

    mode: str = "default"
    extractor: str = "ssl"
    checkpoint: str | None = None
    layers: tuple[str, ...] = ()
    alpha: float = 0.01
    fdr: bool = False
    views: tuple[str, ...] = ("id", "hflip", "vflip", "hvflip")
    rerank: bool = True
    shortlist: int = 10
    align_flips: str = "all"
    top_k: int = 5
    axis: str = "axial"
    size: int = 128
    align_size: int = 64
    n_bootstrap: int = 10
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("default", "paper"):
            raise ValueError(f"mode must be 'default' or 'paper'; got {self.mode!r}.")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}.")
        if self.shortlist < 1 or self.top_k < 1:
            raise ValueError(f"shortlist and top_k must be >= 1; got {self.shortlist}, {self.top_k}.")
        if self.align_flips not in ("all", "matched"):
            raise ValueError(f"align_flips must be 'all' or 'matched'; got {self.align_flips!r}.")
        if "id" not in self.views:
            raise ValueError(f"views must include 'id'; got {self.views}.")

    @classmethod
    def create(cls, **kwargs: Any) -> AuditConfig:
        """Build a config, ignoring ``None`` values (so CLI defaults fall back to the dataclass's)."""
        kw = {k: v for k, v in kwargs.items() if v is not None}
        if "layers" in kw and isinstance(kw["layers"], list | str):
            kw["layers"] = tuple([kw["layers"]] if isinstance(kw["layers"], str) else kw["layers"])
        if "views" in kw:
            kw["views"] = tuple(kw["views"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PairEvidence:
    """What the app and the report show for one synthetic slice.

    Attributes
    ----------
    index : int
        Row of the synthetic slice in ``AuditResult.table``.
    synthetic : np.ndarray, shape (H, W)
        The synthetic slice (float intensities in [0, 1]).
    layers : dict of str to list of dict
        Per layer, the top-k training neighbours: ``{"train_index", "similarity", "path", "slice_index",
        "subject_id", "image"}`` with ``image`` (H, W) aligned to the synthetic slice's view.
    aligned : np.ndarray or None, shape (H, W)
        The best training candidate registered onto the synthetic slice (default mode).
    difference : np.ndarray or None, shape (H, W)
        ``|synthetic - aligned|``.
    transform : dict
        The registration that matched: flip, angle (deg), scale, shift.
    """

    index: int
    synthetic: np.ndarray
    layers: dict[str, list[dict[str, Any]]]
    aligned: np.ndarray | None
    difference: np.ndarray | None
    transform: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class AuditResult:
    """The outcome of :func:`inspector.audit.audit`.

    Attributes
    ----------
    audit_id : str
        Hash of the inputs' content and the config; keys reviewer decisions.
    config : AuditConfig
    train, synthetic : Cohort
    holdout : Cohort or None
    table : pandas.DataFrame
        One row per synthetic slice: the ``scores.csv`` columns (see :data:`SCORE_COLUMNS`), one
        ``sim_<layer>`` per layer, ``layer_consensus``, ``margin``, ``sha256``, ``nearest_train_index``,
        and ``label``/``source``/``augmentation`` where ground truth exists. Higher ``similarity``,
        ``mi`` and ``mi_z``, lower ``p_value`` and ``oni`` mean *more memorised*.
    null_similarity : np.ndarray, shape (n_null,)
        The null scores the synthetic similarities are calibrated against.
    verdict : dict
        The dataset verdict (see :meth:`verdict_text`).
    subjects : pandas.DataFrame
        Per training subject: slices, synthetic slices attributed, flagged slices.
    layers : list of str
    neighbours, neighbour_sims : dict of str to np.ndarray, shape (m, top_k)
        Per layer, training indices and similarities of each synthetic slice's nearest neighbours.
    alignment : dict of str to np.ndarray
        Best registered candidate per synthetic slice: ``train_index`` (m,), ``ncc`` (m,), ``angle`` (m,),
        ``scale`` (m,), ``shift`` (m, 2), ``flip`` (m,). Empty in paper mode.
    baselines : dict
        CT-score, AuthPct, DCR and pixel correlation on the same inputs.
    timings : dict of str to float
        Seconds per stage.
    versions : dict of str to str
    created : str
        UTC timestamp.
    """

    audit_id: str
    config: AuditConfig
    train: Cohort
    synthetic: Cohort
    holdout: Cohort | None
    table: pd.DataFrame
    null_similarity: np.ndarray
    verdict: dict[str, Any]
    subjects: pd.DataFrame
    layers: list[str]
    neighbours: dict[str, np.ndarray]
    neighbour_sims: dict[str, np.ndarray]
    alignment: dict[str, np.ndarray] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    extractor_fingerprint: str = ""

    # ------------------------------------------------------------------ thresholds (no recomputation)
    @property
    def has_ground_truth(self) -> bool:
        return "label" in self.table and self.table["label"].notna().any()

    def flagged_at(self, alpha: float) -> np.ndarray:
        """Flags at another per-slice false-positive rate: ``p_value <= alpha``.

        Returns
        -------
        np.ndarray of bool, shape (m,)
        """
        return self.table["p_value"].to_numpy() <= alpha

    def threshold_for(self, alpha: float) -> float:
        """The similarity above which ``p <= alpha`` (the null's upper quantile), for drawing."""
        null = np.sort(np.asarray(self.null_similarity))
        n = len(null)
        # p = (1 + #{null >= s}) / (1 + n) <= alpha  <=>  #{null >= s} <= alpha (1 + n) - 1
        allowed = int(math.floor(alpha * (1 + n) - 1 + 1e-9))
        if allowed < 0:
            return float("inf")
        if allowed >= n:
            return float("-inf")
        return float(null[n - allowed - 1])

    def summary_counts(self, alpha: float | None = None) -> dict[str, Any]:
        """Counts at a threshold: flagged slices, subjects, expected false positives and the interval."""
        a = self.config.alpha if alpha is None else alpha
        flagged = self.flagged_at(a) if alpha is not None else self.table["flagged"].to_numpy(bool)
        m = len(self.table)
        k = int(flagged.sum())
        lo, hi = wilson_interval(k, m)
        subj = self.table.loc[flagged, "nearest_train_subject"].nunique() if k else 0
        return {
            "n_synthetic": m,
            "n_flagged": k,
            "fraction_flagged": k / m if m else 0.0,
            "fraction_ci95": [lo, hi],
            "n_subjects": int(subj),
            "expected_false_positives": a * m,
            "alpha": a,
        }

    def verdict_text(self, alpha: float | None = None) -> str:
        """The dataset verdict in plain words."""
        c = self.summary_counts(alpha)
        k, m, s, a = c["n_flagged"], c["n_synthetic"], c["n_subjects"], c["alpha"]
        exp = c["expected_false_positives"]
        who = f"from {s} training subject{'s' if s != 1 else ''}" if k else ""
        head = (
            f"{k} of {m} synthetic slices look copied {who}; about {exp:.1f} would be flagged by chance "
            f"at α = {a:g}."
            if k
            else f"None of {m} synthetic slices looks copied; about {exp:.1f} would be flagged by chance at α = {a:g}."
        )
        lo, hi = c["fraction_ci95"]
        if lo > a:
            tail = " More slices are flagged than chance explains: the model likely memorised training data."
        elif k:
            tail = " The flagged count is within what chance explains; review the flagged pairs."
        else:
            tail = ""
        return head + tail

    # ------------------------------------------------------------------ ground truth
    def roc(self, score: str = "similarity") -> dict[str, Any] | None:
        """ROC curve of ``score`` against the ground truth (``label == "copy"``), when it exists.

        Returns
        -------
        dict with ``fpr``, ``tpr``, ``thresholds`` (arrays), ``auc`` and ``average_precision``, or None.
        """
        if not self.has_ground_truth:
            return None
        from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

        lab = self.table["label"].fillna("").to_numpy()
        known = np.isin(lab, ["copy", "novel"])
        y = (lab[known] == "copy").astype(int)
        s = self.table[score].to_numpy(float)[known]
        if y.min() == y.max():
            return None
        fpr, tpr, thr = roc_curve(y, s)
        return {
            "fpr": fpr,
            "tpr": tpr,
            "thresholds": thr,
            "auc": float(roc_auc_score(y, s)),
            "average_precision": float(average_precision_score(y, s)),
        }

    def confusion_at(self, alpha: float) -> dict[str, int] | None:
        """Confusion counts of the flags at ``alpha`` against the ground truth, when it exists."""
        if not self.has_ground_truth:
            return None
        lab = self.table["label"].fillna("").to_numpy()
        f = self.flagged_at(alpha)
        copy, novel = lab == "copy", lab == "novel"
        return {
            "tp": int((f & copy).sum()),
            "fp": int((f & novel).sum()),
            "fn": int((~f & copy).sum()),
            "tn": int((~f & novel).sum()),
        }

    # ------------------------------------------------------------------ evidence for one pair
    def pair(self, index: int, k: int | None = None) -> PairEvidence:
        """The synthetic slice ``index`` beside its nearest training slices at every layer.

        Neighbour images are shown in the synthetic slice's matched view (a flipped match is flipped
        back), and the best candidate is registered onto the synthetic slice for the difference map.

        Parameters
        ----------
        index : int
            Row in :attr:`table`.
        k : int, optional
            Neighbours per layer (default ``config.top_k``).

        Returns
        -------
        PairEvidence
        """
        from .align import apply_alignment_single

        m = len(self.table)
        if not 0 <= index < m:
            raise IndexError(f"pair index {index} out of range for {m} synthetic slices.")
        k = self.config.top_k if k is None else k
        size = self.config.size
        syn = _square(self.synthetic[index].array, size)
        flip = str(self.alignment["flip"][index]) if self.alignment else "none"
        layers: dict[str, list[dict[str, Any]]] = {}
        for layer in self.layers:
            rows = []
            for idx, sim in zip(self.neighbours[layer][index, :k], self.neighbour_sims[layer][index, :k], strict=False):
                sl = self.train[int(idx)]
                rows.append(
                    {
                        "train_index": int(idx),
                        "similarity": float(sim),
                        "path": sl.path,
                        "slice_index": sl.slice_index,
                        "subject_id": sl.subject_id,
                        "image": _apply_flip(_square(sl.array, size), flip),
                    }
                )
            layers[layer] = rows
        aligned = diff = None
        transform: dict[str, Any] = {}
        if self.alignment:
            t = int(self.alignment["train_index"][index])
            transform = {
                "train_index": t,
                "flip": flip,
                "angle": float(self.alignment["angle"][index]),
                "scale": float(self.alignment["scale"][index]),
                "shift": [float(v) for v in self.alignment["shift"][index]],
                "ncc": float(self.alignment["ncc"][index]),
            }
            aligned = apply_alignment_single(_square(self.train[t].array, size), transform)
            diff = np.abs(syn - aligned)
        return PairEvidence(index, syn, layers, aligned, diff, transform)

    def subject_slices(self, subject_id: str) -> list[int]:
        """Training indices of one subject's slices, ordered by path and slice index."""
        idx = [i for i, s in enumerate(self.train.slices) if s.subject_id == subject_id]
        return sorted(idx, key=lambda i: (self.train[i].path, self.train[i].slice_index))

    # ------------------------------------------------------------------ persistence
    def summary(self) -> dict[str, Any]:
        """The JSON summary: verdict, counts, config, versions, inputs and their hashes."""

        def cohort_info(c: Cohort | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {
                "root": str(c.root),
                "n_slices": len(c),
                "n_subjects": len(c.subjects),
                "n_files": len({s.path for s in c.slices}),
                "n_skipped": len(c.skipped),
                "content_hash": c.content_hash,
            }

        return {
            "audit_id": self.audit_id,
            "created": self.created,
            "verdict_text": self.verdict_text(),
            "verdict": _jsonable(self.verdict),
            "baselines": _jsonable(self.baselines),
            "config": self.config.to_dict(),
            "extractor_fingerprint": self.extractor_fingerprint,
            "layers": list(self.layers),
            "cohorts": {
                "train": cohort_info(self.train),
                "synthetic": cohort_info(self.synthetic),
                "holdout": cohort_info(self.holdout),
            },
            "timings_seconds": {k: round(v, 3) for k, v in self.timings.items()},
            "versions": self.versions,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``scores.csv``, ``summary.json``, ``subjects.csv``, ``audit.npz`` and the evidence into ``out_dir``.

        The evidence (``evidence.npz`` + ``manifest.json``: images of flagged pairs, input file hashes) lets
        ``inspector report`` build the release report from the folder alone.

        Returns
        -------
        Path
            ``out_dir``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "scores.csv", self.table.to_csv(index=False).encode())
        atomic_write_bytes(out / "subjects.csv", self.subjects.to_csv(index=False).encode())
        atomic_write_bytes(out / "summary.json", json.dumps(self.summary(), indent=2).encode())
        import io

        buf = io.BytesIO()
        arrays = {"null_similarity": np.asarray(self.null_similarity, np.float64)}
        for layer in self.layers:
            arrays[f"neighbours__{layer}"] = self.neighbours[layer]
            arrays[f"neighbour_sims__{layer}"] = self.neighbour_sims[layer]
        for key, val in self.alignment.items():
            arrays[f"alignment__{key}"] = np.asarray(val)
        np.savez(buf, **arrays)
        atomic_write_bytes(out / "audit.npz", buf.getvalue())
        from .report import write_evidence

        write_evidence(self, out)
        log.info("audit %s saved to %s", self.audit_id[:12], out)
        return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


def _square(arr: np.ndarray, size: int) -> np.ndarray:
    from .preprocess import resize_square

    return arr if arr.shape == (size, size) else resize_square(arr, size)


def _apply_flip(img: np.ndarray, flip: str) -> np.ndarray:
    if flip in ("h", "hflip"):
        return img[:, ::-1]
    if flip in ("v", "vflip"):
        return img[::-1]
    if flip in ("hv", "hvflip"):
        return img[::-1, ::-1]
    return img


def gate(verdict: dict[str, Any], fail_on: str, *, max_flagged: int | None = None) -> tuple[bool, str]:
    """Decide the CI gate from a dataset verdict.

    Parameters
    ----------
    verdict : dict
        ``AuditResult.verdict``.
    fail_on : str
        ``never``; ``flagged``: fail when more than ``max_flagged`` slices are flagged, or (without
        ``max_flagged``) when the lower end of the 95 % interval of the flagged fraction exceeds alpha;
        ``verdict``: fail when the dataset verdict says copying (``verdict["copying"]``).

    Returns
    -------
    (bool, str)
        Whether the gate fails, and why.
    """
    if fail_on == "never":
        return False, ""
    n = int(verdict.get("n_flagged", 0))
    if fail_on == "flagged":
        if max_flagged is not None:
            return n > max_flagged, f"{n} slices flagged (allowed: {max_flagged})"
        lo = float(verdict.get("fraction_ci95", [0, 0])[0])
        a = float(verdict.get("alpha", 0.01))
        return lo > a, f"{n} slices flagged; 95% interval of the flagged fraction starts at {lo:.4f} > alpha {a:g}"
    if fail_on == "verdict":
        return bool(verdict.get("copying", False)), str(verdict.get("copying_reason", ""))
    raise ValueError(f"fail_on must be 'never', 'flagged' or 'verdict'; got {fail_on!r}.")
