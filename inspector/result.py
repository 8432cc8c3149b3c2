"""The result of an audit: everything the app, the report and the CLI need.

:class:`AuditResult` is computed once by :func:`inspector.audit` (:mod:`inspector.pipeline`); the app and
the report only read it. Flags, thresholds and the verdict at any ``(alpha, fdr)`` are asked of its
:class:`~inspector.calibration.Calibration` (a look-up over stored arrays, never a recomputation), and pair
views (:meth:`AuditResult.pair`) are built from stored arrays. Saving and loading the audit folder live in
:mod:`inspector.folder`.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .align import Alignment
from .calibration import Calibration, Verdict
from .config import AuditConfig
from .types import Cohort

__all__ = ["AuditResult", "PairEvidence", "versions", "jsonable"]


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
    """The outcome of :func:`inspector.audit`.

    Attributes
    ----------
    audit_id : str
        Hash of the inputs' content and the config; keys reviewer decisions.
    config : AuditConfig
    train, synthetic : Cohort
    holdout : Cohort or None
    table : pandas.DataFrame
        One row per synthetic slice: the ``scores.csv`` columns
        (:data:`inspector.attribution.SCORE_COLUMNS`), one ``sim_<layer>`` per layer, ``layer_consensus``,
        ``margin``, ``sha256``, ``nearest_train_index``, the registration and baseline columns, and
        ``label``/``source``/``augmentation`` where ground truth exists. Higher ``similarity``, ``mi`` and
        ``mi_z``, lower ``p_value`` and ``oni`` mean *more memorised*. ``flagged`` is at the audit's own
        ``(alpha, fdr)``.
    calibration : Calibration
        The null, the p-values, the flags, the thresholds and the verdict at any ``(alpha, fdr)``.
    subjects : pandas.DataFrame
        Per training subject: slices, synthetic slices attributed, flagged slices.
    layers : list of str
    neighbours, neighbour_sims : dict of str to np.ndarray, shape (m, top_k)
        Per layer, training indices and similarities of each synthetic slice's nearest neighbours.
    alignment : Alignment or None
        The best registered candidate per synthetic slice (with ``train_index``). None in paper mode.
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
    calibration: Calibration
    subjects: pd.DataFrame
    layers: list[str]
    neighbours: dict[str, np.ndarray]
    neighbour_sims: dict[str, np.ndarray]
    alignment: Alignment | None = None
    baselines: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    extractor_fingerprint: str = ""

    # ------------------------------------------------------------------ decisions (asked of the calibration)
    @property
    def verdict(self) -> Verdict:
        """The dataset verdict at the audit's own ``(alpha, fdr)``."""
        return self.calibration.verdict()

    @property
    def null_similarity(self) -> np.ndarray:
        """The null scores, shape (n_null,)."""
        return self.calibration.null

    @property
    def has_ground_truth(self) -> bool:
        return "label" in self.table and self.table["label"].notna().any()

    def flags(self, alpha: float | None = None, fdr: bool | None = None) -> np.ndarray:
        """Flags at ``(alpha, fdr)`` (default: the audit's), shape (m,) bool. See :meth:`Calibration.flags`."""
        return self.calibration.flags(alpha, fdr)

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

    def confusion_at(self, alpha: float | None = None, fdr: bool | None = None) -> dict[str, int] | None:
        """Confusion counts of the flags at ``(alpha, fdr)`` against the ground truth, when it exists."""
        if not self.has_ground_truth:
            return None
        lab = self.table["label"].fillna("").to_numpy()
        f = self.flags(alpha, fdr)
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

        Neighbour images are shown in the synthetic slice's matched view (the registration's view of the
        training slice), and the best candidate is registered onto the synthetic slice for the difference map.

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
        from .preprocess import resize_square
        from .views import View

        m = len(self.table)
        if not 0 <= index < m:
            raise IndexError(f"pair index {index} out of range for {m} synthetic slices.")
        k = self.config.top_k if k is None else k
        size = self.config.size
        syn = resize_square(self.synthetic[index].array, size)
        al = self.alignment
        view = View.parse(al.flip[index]) if al is not None else View.ID
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
                        "image": view.apply(resize_square(sl.array, size)),
                    }
                )
            layers[layer] = rows
        aligned = diff = None
        transform: dict[str, Any] = {}
        if al is not None:
            transform = al.transform(index)
            aligned = apply_alignment_single(resize_square(self.train[transform["train_index"]].array, size), transform)
            diff = np.abs(syn - aligned)
        return PairEvidence(index, syn, layers, aligned, diff, transform)

    def subject_slices(self, subject_id: str) -> list[int]:
        """Training indices of one subject's slices, ordered by path and slice index."""
        idx = [i for i, s in enumerate(self.train.slices) if s.subject_id == subject_id]
        return sorted(idx, key=lambda i: (self.train[i].path, self.train[i].slice_index))

    # ------------------------------------------------------------------ the JSON summary
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

        v = self.verdict
        return {
            "audit_id": self.audit_id,
            "created": self.created,
            "verdict_text": v.text,
            "verdict": jsonable(v.to_dict()),
            "baselines": jsonable(self.baselines),
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


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy values, tuples and paths as plain JSON types (non-finite floats as None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj
