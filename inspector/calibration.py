"""The one calibration object: the null, the p-values, the flags, the thresholds and the dataset verdict.

Every flag, count, threshold and verdict the user sees (``scores.csv``, ``volumes.csv``, ``summary.json``, the
app's pages, the report, the CI gate) is asked of a :class:`Calibration`; no other code compares a p-value with
alpha. The elementary maths lives in :mod:`inspector.scores`; this module composes it and says what it means.

Slice level
    ``p_j = (1 + #{null >= s_j}) / (1 + n_null)`` (conformal), flagged when ``p_j <= alpha`` or, with ``fdr``,
    when Benjamini–Hochberg at level ``alpha`` rejects it. Valid when the null's slices are exchangeable with
    the synthetic set's novel slices: a **holdout** of real, unseen scans from the same source, scored through
    exactly the synthetic path. Without a holdout (the leave-one-subject-out or the paper's split-half null)
    the p-values are not calibrated (measured: a quarter of novel slices flagged at alpha 0.01), so the
    calibration **ranks without flagging** and says so (:attr:`Calibration.decidable`).
Volume level
    A synthetic volume (the slices sharing one source: a NIfTI file, a DICOM series; a 2D image is a volume of
    one slice) gets the Simes statistic of its slices' p-values, ``S_v = min_k n_v p_(k) / k``. With a holdout
    of volumes, each holdout volume is scored the same way (its slices against the null without its own), and
    the volume's p-value is the conformal rank of ``S_v`` among them: exact when novel synthetic volumes and
    holdout volumes are exchangeable, whatever the dependence within a volume (but p <= alpha needs at least
    ``1/alpha - 1`` holdout volumes). Without holdout volumes the p-value is Bonferroni within the volume,
    ``min(1, n_v min_j p_j)``, valid whatever the dependence (``S_v`` itself, Simes, was measured
    anti-conservative, about 2 alpha, when whole volumes differ from each other).
Dataset level
    A count test whose false-alarm rate is at most its stated level (default 5 %) under no copying:
    * **independent units** (every volume one slice): the number ``K`` of units with ``p <= alpha``. Given the
      null, each novel unit passes the threshold with the same probability ``U``; over nulls
      ``U ~ Beta(c + 1, n - c)`` with ``c = floor(alpha (n + 1)) - 1``, so ``K ~ BetaBinomial(m, c + 1, n - c)``
      exactly (the shared null accounted for, unlike a binomial interval). ``copying`` when
      ``P(K' >= K) <= level``.
    * **volumes of several slices**: the same count test over volumes, with each holdout volume scored like a
      synthetic one (its Simes p-value against the null without its own slices) as the volume-level null; when
      the holdout has no multi-slice volumes, Bonferroni over the synthetic volumes' Simes p-values.
    * **volumes verified in 3D**: Simes' combination of the volumes' 3D-verified p-values (valid under the
      positive dependence a shared null creates).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .scores import (
    PAPER_ONI_THRESHOLD,
    _check_alpha,
    benjamini_hochberg,
    calibrated_mi,
    empirical_p_values,
    mann_whitney_auc,
    min_null_size,
    min_p_value,
    null_too_small,
)

__all__ = [
    "Calibration",
    "Verdict",
    "GATES",
    "NULL_KINDS",
    "CALIBRATED_NULLS",
    "VERDICT_LEVEL",
    "count_test_p_value",
    "clustered_count_test_p_value",
    "exchangeability_diagnostics",
    "permutation_mean_test",
    "gate",
    "simes",
    "group_simes",
    "wilson_interval",
]

log = logging.getLogger(__name__)

#: The nulls a calibration can be built on.
NULL_KINDS: tuple[str, ...] = ("holdout", "leave-one-subject-out", "split-half bootstrap")
#: The nulls whose p-values are calibrated (exchangeable with novel synthetic slices): only a real holdout.
CALIBRATED_NULLS: tuple[str, ...] = ("holdout",)
#: The default false-alarm level of the dataset verdict.
VERDICT_LEVEL = 0.05

#: Fewest holdout subjects (else volumes) for which the dataset verdict on independent synthetic slices held its
#: level against a holdout whose slices come in subjects (benchmarks/RESULTS.md, calibration section); fewer are
#: stated in the verdict.
MIN_NULL_SUBJECTS = 20

#: The CI gate's rules (``--fail-on``).
GATES: tuple[str, ...] = ("never", "flagged", "verdict")
PAPER_RULE = f"ONI < {PAPER_ONI_THRESHOLD:g} means memorisation"


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
class Verdict:
    """The dataset verdict at one ``(alpha, fdr)`` setting (``summary.json``'s ``verdict``).

    Attributes
    ----------
    mode : str
        The audit's mode (``default`` or ``paper``).
    n_synthetic, n_flagged : int
        Synthetic slices, and how many are flagged.
    fraction_flagged : float
    fraction_ci95 : tuple of float
        95 % Wilson interval of the flagged fraction.
    alpha : float
    fdr : bool
        Benjamini–Hochberg control instead of a per-slice alpha.
    expected_false_positives : float
        ``alpha * n_synthetic``: slices flagged by chance when nothing is copied.
    n_subjects_flagged : int
        Distinct training subjects the flagged slices are attributed to.
    null_kind : str
        One of :data:`NULL_KINDS`.
    n_null : int
    min_p_value : float
        ``1 / (1 + n_null)``.
    alpha_reachable : bool
        Whether a copied slice can be flagged at ``(alpha, fdr)`` (:meth:`Calibration.unflaggable` is None:
        ``min_p_value <= alpha``, and with Benjamini–Hochberg a null large enough for what is flagged).
    mann_whitney_auc, mann_whitney_p : float
        AUC of the synthetic similarities against the null (0.5 = as novel as the null) and its p-value.
    mean_oni, mean_mi_z : float
        The paper's dataset-level ONI and MI (means over the synthetic set).
    paper_rule : str
    paper_rule_memorised : bool
        The paper's universal rule (mean ONI below 0.68).
    copying : bool
        The dataset decision.
    copying_reason : str
    warning : str or None
        Why the setting cannot flag anything, when it cannot.
    """

    mode: str
    n_synthetic: int
    n_flagged: int
    fraction_flagged: float
    fraction_ci95: tuple[float, float]
    alpha: float
    fdr: bool
    expected_false_positives: float
    n_subjects_flagged: int
    null_kind: str
    n_null: int
    min_p_value: float
    alpha_reachable: bool
    mann_whitney_auc: float
    mann_whitney_p: float
    mean_oni: float
    mean_mi_z: float
    paper_rule: str
    paper_rule_memorised: bool
    copying: bool
    copying_reason: str
    warning: str | None = None
    decidable: bool = True
    unit: str = "slice"
    n_units: int = 0
    n_units_flagged: int = 0
    n_volumes_flagged: int = 0
    test: str = ""
    test_level: float = VERDICT_LEVEL
    test_p_value: float = 1.0
    assumption: str = ""
    diagnostics: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the interval as a list; ``warning`` only when set)."""
        d = dataclasses.asdict(self)
        d["fraction_ci95"] = list(self.fraction_ci95)
        d["diagnostics"] = list(self.diagnostics)
        if d["warning"] is None:
            del d["warning"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["fraction_ci95"] = tuple(kw.get("fraction_ci95", (0.0, 1.0)))
        kw["diagnostics"] = tuple(kw.get("diagnostics", ()))
        return cls(**kw)

    @property
    def text(self) -> str:
        """The verdict in plain words."""
        k, m, s, a = self.n_flagged, self.n_synthetic, self.n_subjects_flagged, self.alpha
        exp = self.expected_false_positives
        rule = "the Benjamini–Hochberg FDR level" if self.fdr else "α ="
        who = f"from {s} training subject{'s' if s != 1 else ''}" if k else ""
        chance = f"about {exp:.1f} would be flagged by chance at {rule} {a:g}."
        if not self.decidable:
            head = (
                f"Not decided: the {self.null_kind} null is not calibrated, so no slice is flagged; the {m} synthetic "
                "slices are ranked by similarity only. Give a holdout of real, unseen scans from the same source "
                "(--holdout) to flag slices and decide."
            )
            return head + (f" Warning: {self.warning}" if self.warning else "")
        head = f"{k} of {m} synthetic slices look copied {who}; {chance}"
        if not k:
            head = f"None of {m} synthetic slices looks copied; {chance}"
        if not k and not self.alpha_reachable:
            rule_at = "Benjamini–Hochberg at α =" if self.fdr else "α ="
            head = (
                f"Nothing can be flagged at {rule_at} {a:g} with this null, so none of the {m} synthetic slices is "
                "flagged" + ("." if self.copying else ": that says nothing about copying.")
            )
        if self.copying:
            tail = f" More {self.unit}s have p ≤ α than chance explains ({self.test}: p = {self.test_p_value:.3g} <= "
            tail += f"{self.test_level:g}): the model likely memorised training data."
        elif k:
            tail = " The flagged count is within what chance explains; review the flagged pairs."
        else:
            tail = ""
        if self.warning:
            tail += f" Warning: {self.warning}"
        for d in self.diagnostics:
            tail += f" Check: {d}"
        return head + tail


class Calibration:
    """Synthetic similarities calibrated against a null: p-values, flags, thresholds and the verdict.

    Parameters
    ----------
    similarity : array-like, shape (m,)
        The calibrated score of each synthetic slice; higher = more memorised.
    null : array-like, shape (n_null,)
        The same score for slices known not to be copies (holdout, leave-one-subject-out or the paper's
        split-half bootstrap).
    null_kind : str
        One of :data:`NULL_KINDS`.
    alpha : float
        The audit's default per-slice false-positive rate.
    fdr : bool
        The audit's default: Benjamini–Hochberg control instead of a per-slice alpha.
    nearest_subject : array of str, shape (m,), optional
        The training subject each synthetic slice is attributed to (counts subjects in the verdict).
    mi_z, oni : array-like, shape (m,), optional
        The paper's per-slice MI and ONI (dataset means in the verdict; NaN when absent).
    mode : str
        The audit's mode, stated in the verdict.
    groups : array of str, shape (m,), optional
        The synthetic volume of each slice (default: every slice its own volume).
    null_groups : array of str, shape (n_null,), optional
        The holdout volume of each null score (enables the volume-level count test).
    null_subjects : array of str, shape (n_null,), optional
        The holdout subject of each null score: the clusters of the null for the count test of independent
        synthetic slices (default: ``null_groups``). Slices of one subject are alike whether they were stored as
        one volume or as separate 2D images.
    level : float
        False-alarm level of the dataset verdict (default :data:`VERDICT_LEVEL`).
    diagnostics : sequence of str
        Warnings about the null's exchangeability (e.g. a holdout that differs from the synthetic set),
        stated in the verdict.
    volume_scores : mapping of str to float, optional
        The 3D-verified volume similarity of synthetic volumes (:mod:`inspector.volumes`; keys are ``groups``
        values, NaN = not verifiable, e.g. a 2D image). With ``volume_null`` it replaces the Simes statistic
        as the volume's evidence.
    volume_null : array-like, shape (n_null_volumes,), optional
        The same similarity of volumes known not to be copies (holdout volumes, and training volumes against the
        other subjects), scored through the same path.
    volume_null_description : str, optional
        What ``volume_null`` holds, in words (stated as the volumes' calibration).

    Attributes
    ----------
    p_values : np.ndarray, shape (m,)
        Conformal p-values; lower = more memorised.
    mi : np.ndarray, shape (m,)
        The null's CDF at each similarity (fitted tails beyond the observed null), in [0, 1].
    """

    def __init__(
        self,
        similarity: Any,
        null: Any,
        *,
        null_kind: str,
        alpha: float = 0.01,
        fdr: bool = False,
        nearest_subject: Any = None,
        mi_z: Any = None,
        oni: Any = None,
        mode: str = "default",
        groups: Any = None,
        null_groups: Any = None,
        null_subjects: Any = None,
        level: float = VERDICT_LEVEL,
        diagnostics: Any = (),
        volume_scores: Mapping[str, float] | None = None,
        volume_null: Any = None,
        volume_null_description: str | None = None,
    ) -> None:
        if null_kind not in NULL_KINDS:
            raise ValueError(f"null_kind must be one of {NULL_KINDS}; got {null_kind!r}.")
        self.similarity = np.asarray(similarity, np.float64).reshape(-1)
        self.null = np.asarray(null, np.float64).reshape(-1)
        if self.null.size < 2:
            raise ValueError(
                f"The null has {self.null.size} score(s); at least 2 are needed to calibrate. Give a larger holdout."
            )
        self.null_kind = null_kind
        self.alpha = _check_alpha(alpha)
        self.fdr = bool(fdr)
        self.mode = mode
        m = self.similarity.size
        self.nearest_subject = (
            np.full(m, "", dtype=object) if nearest_subject is None else np.asarray(nearest_subject, dtype=object)
        )
        self.mi_z = np.full(m, np.nan) if mi_z is None else np.asarray(mi_z, np.float64)
        self.oni = np.full(m, np.nan) if oni is None else np.asarray(oni, np.float64)
        for name in ("nearest_subject", "mi_z", "oni"):
            if getattr(self, name).shape != (m,):
                raise ValueError(f"{name} must have shape ({m},); got {getattr(self, name).shape}.")
        self.p_values = empirical_p_values(self.similarity, self.null)
        self.mi = calibrated_mi(self.similarity, self.null)
        self._auc = mann_whitney_auc(self.similarity, self.null) if m else (float("nan"), 1.0)
        self.level = _check_alpha(level)
        self.diagnostics = tuple(str(d) for d in diagnostics)
        self.groups = np.arange(m).astype(str).astype(object) if groups is None else np.asarray(groups, dtype=object)
        if self.groups.shape != (m,):
            raise ValueError(f"groups must have shape ({m},); got {self.groups.shape}.")
        self.null_groups = None if null_groups is None else np.asarray(null_groups, dtype=object)
        if self.null_groups is not None and self.null_groups.shape != self.null.shape:
            raise ValueError(f"null_groups must have shape {self.null.shape}; got {self.null_groups.shape}.")
        self.null_subjects = None if null_subjects is None else np.asarray(null_subjects, dtype=object)
        if self.null_subjects is not None and self.null_subjects.shape != self.null.shape:
            raise ValueError(f"null_subjects must have shape {self.null.shape}; got {self.null_subjects.shape}.")
        self.volume_ids, self.volume_simes = group_simes(self.p_values, self.groups)
        self._volume_of = {g: i for i, g in enumerate(self.volume_ids)}
        clusters = self._null_clusters()
        if clusters is not None and clusters[1] < MIN_NULL_SUBJECTS and len(self.volume_ids) == m:
            _, n_clusters, what = clusters
            self._diagnose(
                f"the holdout holds {n_clusters} {what}: slices of one {what[:-1]} are alike, so the threshold of "
                "independent synthetic slices rests on few independent units and the dataset verdict may raise "
                f"false alarms above its level (simulated, benchmarks/RESULTS.md: up to about 7 % with 10, about 5 % "
                f"or less from {MIN_NULL_SUBJECTS}); give a holdout of at least {MIN_NULL_SUBJECTS} subjects."
            )
        self.volume_null = self._holdout_volume_simes()
        if self.volume_null is not None:
            # each synthetic volume's Simes statistic ranked among the holdout volumes' (scored the same way):
            # exact under volume exchangeability, whatever the dependence within a volume
            self.volume_calibration = "holdout volumes"
            self.volume_p_values = empirical_p_values(-self.volume_simes, -self.volume_null)
        else:
            # no holdout volumes to calibrate on: Bonferroni within the volume, valid whatever the dependence
            # (Simes alone was measured anti-conservative, about 2 alpha, when whole volumes differ)
            self.volume_calibration = "Bonferroni within the volume"
            vi = self.volume_index()
            min_p = np.ones(len(self.volume_ids))
            np.minimum.at(min_p, vi, self.p_values)
            self.volume_p_values = np.minimum(1.0, np.bincount(vi, minlength=len(min_p)) * min_p)
        self.volume_similarity = np.full(len(self.volume_ids), np.nan)
        self.volume_null_similarity = np.zeros(0)
        self.volume_null_description: str | None = None
        self.volume_verified = False
        if volume_scores is not None:
            self._verified_volumes(volume_scores, volume_null, volume_null_description)

    def _verified_volumes(self, scores: Mapping[str, float], null: Any, description: str | None = None) -> None:
        """Calibrate 3D-verified volume similarities against the holdout volumes' (at least 3 of them).

        A volume's p-value is :func:`volume_prediction_p_values` against the null volumes: able to reach small
        p-values with the few null volumes a study has (a rank among 10 holdout volumes cannot go below 1/11).
        Volumes without a verified similarity keep their Simes/Bonferroni p-value.
        """
        from scipy.stats import shapiro

        self.volume_similarity = np.asarray([float(scores.get(str(v), np.nan)) for v in self.volume_ids], np.float64)
        vn = np.asarray([] if null is None else null, np.float64).reshape(-1)
        vn = vn[np.isfinite(vn)]
        self.volume_null_similarity = vn
        self.volume_null_description = description
        ok = np.isfinite(self.volume_similarity)
        if vn.size < 3 or not ok.any():
            if ok.any():
                self._diagnose(
                    f"only {vn.size} null volume(s) could be verified in 3D (at least 3 are needed to calibrate "
                    "the volume similarity); volumes are judged by their slices' p-values instead. Give more "
                    "holdout volumes."
                )
            return
        n = vn.size
        p = self.volume_p_values.copy()
        p[ok] = volume_prediction_p_values(self.volume_similarity[ok], vn)
        self.volume_p_values = p
        self.volume_verified = True
        self.volume_calibration = (
            f"3D-verified volume similarity against {description or f'{n} null volumes'}; {VOLUME_RULE}"
        )
        if n >= 8 and shapiro(vn).pvalue < 0.01:
            self._diagnose(
                f"the {n} null volumes' similarities are not normal (Shapiro-Wilk p < 0.01): the volume p-values "
                "rest on a normal model of them; check the null volumes for outliers."
            )

    def _diagnose(self, text: str) -> None:
        if text not in self.diagnostics:
            self.diagnostics = (*self.diagnostics, text)

    @property
    def decidable(self) -> bool:
        """Whether the null is calibrated (a holdout): only then are slices flagged and a verdict given."""
        return self.null_kind in CALIBRATED_NULLS

    def __len__(self) -> int:
        return int(self.similarity.size)

    # ------------------------------------------------------------------ the setting
    def _setting(self, alpha: float | None, fdr: bool | None) -> tuple[float, bool]:
        return (self.alpha if alpha is None else _check_alpha(alpha)), (self.fdr if fdr is None else bool(fdr))

    @property
    def n_null(self) -> int:
        return int(self.null.size)

    @property
    def min_p_value(self) -> float:
        """The smallest p-value the null allows, ``1 / (1 + n_null)``."""
        return min_p_value(self.n_null)

    def reachable(self, alpha: float | None = None) -> bool:
        """Whether any slice can be flagged at ``alpha`` (``min_p_value <= alpha``)."""
        a, _ = self._setting(alpha, None)
        return not null_too_small(self.n_null, a)

    def min_flaggable(self, alpha: float | None = None, fdr: bool | None = None) -> int:
        """The fewest synthetic slices the null's resolution lets ``(alpha, fdr)`` flag at once.

        Every p-value is at least :attr:`min_p_value`. Per slice (``fdr`` off) one slice can be flagged when
        ``min_p_value <= alpha``. Benjamini–Hochberg rejects the ``k`` smallest p-values only when
        ``p_(k) <= k alpha / m``, so it flags nothing unless at least ``ceil(m min_p_value / alpha)`` slices are
        flagged together. Decidability (a calibrated null) is asked of :attr:`decidable`, not here.

        Returns
        -------
        int
            ``len(self) + 1`` when nothing can be flagged at all (``min_p_value > alpha``, or no synthetic slice).
        """
        a, f = self._setting(alpha, fdr)
        m = len(self)
        if m == 0 or not self.reachable(a):
            return m + 1
        if not f:
            return 1
        return max(1, math.ceil(m * self.min_p_value / a - 1e-9))

    def unflaggable(self, alpha: float | None = None, fdr: bool | None = None) -> str | None:
        """Why ``(alpha, fdr)`` cannot flag a copied slice, in plain words; ``None`` when it can.

        True when ``min_p_value > alpha`` (nothing can ever be flagged), or with Benjamini–Hochberg when nothing is
        flagged although fewer than :meth:`min_flaggable` slices could never be (the null is too small for BH
        at this alpha): "none flagged" then says nothing about copying. Never when the volumes were verified in 3D
        (the unit signed off is then the volume, whose p-values reach any alpha). Every screen, file and sign-off reads
        this one answer (through :meth:`verdict`'s ``warning`` and ``alpha_reachable``).
        """
        a, f = self._setting(alpha, fdr)
        n, p0, m = self.n_null, self.min_p_value, len(self)
        if self.volume_verified:
            # the unit is the volume, and its p-values (a prediction against the null volumes) reach any alpha
            return None
        if not self.reachable(a):
            return (
                f"The null has only {n} slices, so the smallest possible p-value is {p0:.3g} > alpha = {a:g}: no "
                f"slice can be flagged. Give a larger holdout (at least {min_null_size(a)} slices) or a larger alpha."
            )
        k = self.min_flaggable(a, f)
        if not f or k <= 1 or not self.decidable or self.flags(a, f).any():
            return None
        at_floor = int((self.p_values <= p0 * (1 + 1e-9)).sum())
        need = min_null_size(min(a / max(m, 1), 0.5))
        return (
            f"Nothing can be flagged at this setting: with Benjamini–Hochberg at alpha = {a:g} and a null of {n} "
            f"slices (smallest possible p-value {p0:.3g}), BH flags only when at least {k} of the {m} synthetic slices "
            f"are each more similar than the whole null ({at_floor} are), so fewer copies are never flagged. Turn "
            f"Benjamini–Hochberg off, raise alpha, or give a larger holdout (at least {need} slices lets BH flag a "
            "single copy)."
        )

    def at(self, alpha: float | None = None, fdr: bool | None = None) -> Calibration:
        """The same calibration with another default ``(alpha, fdr)`` (nothing is recomputed)."""
        a, f = self._setting(alpha, fdr)
        out = copy.copy(self)
        out.alpha, out.fdr = a, f
        return out

    # ------------------------------------------------------------------ slice decisions
    def flags(self, alpha: float | None = None, fdr: bool | None = None) -> np.ndarray:
        """Which synthetic slices are flagged at ``(alpha, fdr)`` (default: the audit's setting).

        Returns
        -------
        np.ndarray of bool, shape (m,)
        """
        a, f = self._setting(alpha, fdr)
        if not self.decidable:
            return np.zeros(len(self), dtype=bool)
        if f:
            return benjamini_hochberg(self.p_values, a)
        return self.p_values <= a

    def volume_flags(self, alpha: float | None = None, fdr: bool | None = None) -> np.ndarray:
        """Which synthetic volumes (:attr:`volume_ids`) are flagged: Simes p-value <= alpha (or BH across volumes).

        Returns
        -------
        np.ndarray of bool, shape (n_volumes,)
        """
        a, f = self._setting(alpha, fdr)
        if not self.decidable:
            return np.zeros(len(self.volume_ids), dtype=bool)
        if f:
            return benjamini_hochberg(self.volume_p_values, a)
        return self.volume_p_values <= a

    def volume_index(self) -> np.ndarray:
        """The row of :attr:`volume_ids` of each synthetic slice, shape (m,)."""
        return np.asarray([self._volume_of[g] for g in self.groups], dtype=np.int64)

    def threshold(self, alpha: float | None = None, fdr: bool | None = None) -> float:
        """The similarity above which a slice is flagged at ``(alpha, fdr)``, for drawing.

        Without ``fdr`` this is the null's upper quantile (``p <= alpha`` iff ``similarity > threshold``, up to
        ties with null scores);
        with ``fdr`` it is the smallest flagged similarity (``inf`` when nothing is flagged).
        """
        a, f = self._setting(alpha, fdr)
        if not self.decidable:
            return float("inf")
        if f:
            fl = self.flags(a, True)
            return float(self.similarity[fl].min()) if fl.any() else float("inf")
        null = np.sort(self.null)
        n = len(null)
        # p = (1 + #{null >= s}) / (1 + n) <= alpha  <=>  #{null >= s} <= alpha (1 + n) - 1
        allowed = _passing_rank(a, n)
        if allowed < 0:
            return float("inf")
        if allowed >= n:
            return float("-inf")
        return float(null[n - allowed - 1])

    # ------------------------------------------------------------------ the dataset decision
    def _dataset_test(self, a: float) -> tuple[str, str, int, int, float, str]:
        """``(unit, test, n_units, n_units_flagged, p_value, assumption)`` of the dataset count test at ``a``
        (computed once per alpha: the screens ask for the verdict on every redraw)."""
        cache = self.__dict__.setdefault("_tests", {})
        if a not in cache:
            cache[a] = self._compute_dataset_test(a)
        return cache[a]

    def _compute_dataset_test(self, a: float) -> tuple[str, str, int, int, float, str]:
        multi = len(self.volume_ids) < len(self)
        if not multi:
            k = int((self.p_values <= a).sum())
            p = count_test_p_value(k, len(self), self.n_null, a)
            test = f"conformal count test (Beta-binomial, shared null of {self.n_null})"
            assumption = "novel synthetic slices and holdout slices are exchangeable and independent of each other"
            clusters = self._null_clusters()
            if clusters is not None:
                # the null's slices come in volumes: its threshold varies from holdout to holdout more than the
                # Beta-binomial of independent null slices says; the test takes the larger of the two p-values
                labels, n_clusters, what = clusters
                p = max(p, clustered_count_test_p_value(k, len(self), self.null, labels, a))
                test = (
                    f"conformal count test (shared null of {self.n_null} slices of {n_clusters} holdout {what}: "
                    f"the larger of the Beta-binomial and the {what[:-1]}-bootstrap p-values)"
                )
                assumption = (
                    "novel synthetic slices are exchangeable with the holdout's slices and independent of each other; "
                    f"holdout {what} are exchangeable (any dependence within one)"
                )
            return "slice", test, len(self), k, p, assumption
        n_v = len(self.volume_ids)
        if self.volume_verified:
            # Simes: valid when the volumes' p-values are positively dependent, as p-values computed against one
            # shared null are (a high null median lowers all of them together); more powerful than Bonferroni
            # when several volumes are copies, the same when one is
            p = simes(self.volume_p_values) if n_v else 1.0
            test = f"Simes over {n_v} volumes of their 3D-verified p-values"
            assumption = (
                "novel synthetic volumes and null volumes are exchangeable; their similarities are about normal "
                "(robust Student-t prediction)"
            )
            return "volume", test, n_v, int((self.volume_p_values <= a).sum()), p, assumption
        h = self._holdout_volume_fractions(a)
        vi = self.volume_index()
        g_frac = np.bincount(vi, weights=(self.p_values <= a).astype(float), minlength=n_v) / np.bincount(vi)
        if h is not None and h.size >= 2:
            p = permutation_mean_test(g_frac, h, seed=0)
            test = f"volume permutation test of the flagged fraction ({n_v} synthetic vs {h.size} holdout volumes)"
            assumption = "novel synthetic volumes and holdout volumes are exchangeable (any dependence within a volume)"
            return "volume", test, n_v, int((g_frac > 0).sum()), p, assumption
        p = min(1.0, n_v * float(self.volume_p_values.min())) if n_v else 1.0
        test = f"Bonferroni over {n_v} volumes of their Bonferroni p-values"
        assumption = "each novel slice's p-value is valid; any dependence within and across volumes"
        return "volume", test, n_v, int((self.volume_p_values <= a).sum()), p, assumption

    def _null_clusters(self) -> tuple[np.ndarray, int, str] | None:
        """The null's clusters, its subjects when known, else its volumes: ``(label of each null score, number of
        clusters, "subjects" or "volumes")`` when at least two hold several slices, else None."""
        labels, what = (
            (self.null_subjects, "subjects") if self.null_subjects is not None else (self.null_groups, "volumes")
        )
        if labels is None:
            return None
        ids, counts = np.unique(labels.astype(str), return_counts=True)
        return (labels, int(ids.size), what) if (counts > 1).sum() >= 2 else None

    def _holdout_volumes(self) -> list[np.ndarray]:
        """Masks over the null of each multi-slice holdout volume (empty without two such volumes)."""
        if self.null_groups is None:
            return []
        g = self.null_groups.astype(str)
        ids, counts = np.unique(g, return_counts=True)
        if (counts > 1).sum() < 2:
            return []
        return [g == vid for vid in ids[counts > 1] if (g != vid).sum() >= 2]

    def _holdout_volume_simes(self) -> np.ndarray | None:
        """Each holdout volume's Simes statistic, its slices scored against the null without its own slices (as a
        synthetic volume's are against the whole null); None without two multi-slice holdout volumes."""
        masks = self._holdout_volumes()
        if len(masks) < 2:
            return None
        return np.asarray([simes(empirical_p_values(self.null[k], self.null[~k])) for k in masks], np.float64)

    def _holdout_volume_fractions(self, a: float) -> np.ndarray | None:
        """The fraction of each multi-slice holdout volume's slices with ``p <= a``, each scored like a synthetic
        volume: against the null without its own slices (``None`` without two such volumes)."""
        masks = self._holdout_volumes()
        if len(masks) < 2:
            return None
        return np.asarray([float((empirical_p_values(self.null[k], self.null[~k]) <= a).mean()) for k in masks])

    def verdict(self, alpha: float | None = None, fdr: bool | None = None) -> Verdict:
        """The dataset verdict at ``(alpha, fdr)`` (default: the audit's setting)."""
        a, f = self._setting(alpha, fdr)
        flagged = self.flags(a, f)
        k, m = int(flagged.sum()), len(self)
        lo, hi = wilson_interval(k, m)
        subj = self.nearest_subject[flagged]
        n_subj = len({s for s in subj if s}) if k else 0
        warning = None
        if not self.decidable:
            warning = (
                f"without a holdout the {self.null_kind} null is not exchangeable with the synthetic slices "
                "(measured: it flags about a quarter of novel slices), so nothing is flagged and no verdict is given."
            )
        else:
            warning = self.unflaggable(a, f)
        unit, test, n_units, k_units, p_test, assumption = self._dataset_test(a)
        copying = self.decidable and (self.volume_verified or self.reachable(a)) and p_test <= self.level
        if not self.decidable:
            reason = f"not decided: no calibrated null ({self.null_kind}); give a holdout"
        else:
            verb = "rejects" if copying else "does not reject"
            reason = (
                f"{k_units} of {n_units} {unit}s have p <= alpha = {a:g}; the {test} {verb} 'no copying' at level "
                f"{self.level:g} (p = {p_test:.3g})"
            )
        mean_oni = float(np.mean(self.oni)) if m else float("nan")
        return Verdict(
            mode=self.mode,
            n_synthetic=m,
            n_flagged=k,
            fraction_flagged=k / m if m else 0.0,
            fraction_ci95=(lo, hi),
            alpha=a,
            fdr=f,
            expected_false_positives=a * m,
            n_subjects_flagged=n_subj,
            null_kind=self.null_kind,
            n_null=self.n_null,
            min_p_value=self.min_p_value,
            alpha_reachable=self.unflaggable(a, f) is None,
            mann_whitney_auc=float(self._auc[0]),
            mann_whitney_p=float(self._auc[1]),
            mean_oni=mean_oni,
            mean_mi_z=float(np.mean(self.mi_z)) if m else float("nan"),
            paper_rule=PAPER_RULE,
            paper_rule_memorised=bool(mean_oni < PAPER_ONI_THRESHOLD),
            copying=bool(copying),
            copying_reason=reason,
            warning=warning,
            decidable=self.decidable,
            unit=unit,
            n_units=n_units,
            n_units_flagged=k_units,
            n_volumes_flagged=int(self.volume_flags(a, f).sum()),
            test=test,
            test_level=self.level,
            test_p_value=float(p_test),
            assumption=assumption,
            diagnostics=self.diagnostics,
        )

    def gate(
        self, fail_on: str, *, alpha: float | None = None, fdr: bool | None = None, max_flagged: int | None = None
    ) -> tuple[bool, str]:
        """The CI gate at ``(alpha, fdr)``: see :func:`gate`."""
        return gate(self.verdict(alpha, fdr), fail_on, max_flagged=max_flagged)


def exchangeability_diagnostics(holdout: Any, synthetic: Any, *, min_effect: float = 0.5) -> tuple[str, ...]:
    """Warnings when the holdout visibly differs from the synthetic set on statistics unrelated to T.

    The holdout null is valid only when the holdout is exchangeable with the synthetic set's novel part; a
    holdout from another scanner or protocol is not. Compared (two-sample Kolmogorov–Smirnov, warned when the
    statistic is at least ``min_effect`` and its p-value below 0.001): each slice's source matrix size
    (pixels), pixel spacing, foreground fraction, and foreground intensity median and spread (after the
    loader's normalisation). These do not depend on the training set, so copies of T do not trigger them
    unless the copies themselves differ from real scans that way.

    Parameters
    ----------
    holdout, synthetic : Cohort

    Returns
    -------
    tuple of str
        One plain-words warning per statistic that differs (empty when none does).
    """
    from scipy.stats import ks_2samp

    def stats(c: Any) -> dict[str, np.ndarray]:
        rows: dict[str, list[float]] = {k: [] for k in _DIAGNOSTICS}
        for sl in c.slices:
            a = np.asarray(sl.array, np.float32)
            fg = a[a > 0.05]
            rows["matrix size"].append(float(np.prod(sl.original_shape)) or float(a.size))
            rows["pixel spacing"].append(float(np.prod(sl.spacing)))
            rows["foreground fraction"].append(float(fg.size) / a.size)
            rows["foreground intensity (median)"].append(float(np.median(fg)) if fg.size else 0.0)
            rows["foreground intensity (spread)"].append(
                float(np.subtract(*np.percentile(fg, [90, 10]))) if fg.size else 0.0
            )
        return {k: np.asarray(v) for k, v in rows.items()}

    if holdout is None or synthetic is None or len(holdout) < 5 or len(synthetic) < 5:
        return ()
    h, g = stats(holdout), stats(synthetic)
    out = []
    for name in _DIAGNOSTICS:
        a, b = h[name], g[name]
        if np.ptp(np.concatenate([a, b])) == 0:
            continue
        res = ks_2samp(a, b)
        if res.statistic >= min_effect and res.pvalue < 1e-3:
            out.append(
                f"the holdout differs from the synthetic set in {name} (median {np.median(a):.4g} vs "
                f"{np.median(b):.4g}; KS {res.statistic:.2f}): a holdout from another scanner or protocol "
                "invalidates the p-values."
            )
    for msg in out:
        log.warning(msg)
    return tuple(out)


_DIAGNOSTICS: tuple[str, ...] = (
    "matrix size",
    "pixel spacing",
    "foreground fraction",
    "foreground intensity (median)",
    "foreground intensity (spread)",
)


#: The volume p-value's rule, in words (:func:`volume_prediction_p_values`).
VOLUME_RULE = "robust Student-t prediction (median, MAD)"


def volume_prediction_p_values(similarity: Any, null: Any) -> np.ndarray:
    """P-values of volume similarities against null volumes': a robust Student-t prediction interval.

    With the null's similarities ``s_1..s_n``: ``t = (s - median) / (d * sqrt(1 + 1/n))`` with
    ``d = 1.4826 * MAD`` (the null's median absolute deviation, consistent for a normal; the standard deviation
    when the MAD is 0), and ``p = P(T_nu >= t)`` with ``nu = max(1, MAD_EFFICIENCY * (n - 1))`` degrees of
    freedom: the MAD estimates the scale as well as the standard deviation would from about 37 % of the
    volumes, so its uncertainty is that of ``0.37 (n - 1)`` degrees of freedom (with ``n - 1`` the flags exceed
    alpha: 0.026 at alpha = 0.01 with 10 normal null volumes). The median and MAD are used instead of the mean
    and the standard deviation because the null's lower tail holds volumes whose registration went wrong (low
    similarities that say nothing about how high a novel volume can score), which inflate the standard
    deviation and make the flags needlessly conservative.

    The model is on the similarity's own scale, not on Fisher's z: a volume similarity is an NCC over some
    10^5 voxels, whose sampling error (what Fisher's z stabilises) is negligible; what varies between novel
    volumes is anatomy and registration. The z transform stretches the upper tail (0.90 lies 1.24x as far above
    0.87 on the z scale as 0.84 lies below it), so a symmetric scale estimate fitted there under-covers high
    similarities: on the 3D benchmark the flags at alpha = 0.01 reached 0.018-0.041 with it against 0.006-0.022
    on the raw scale (``benchmarks/RESULTS.md``, 3D sections).

    Parameters
    ----------
    similarity : array-like, shape (m,)
        Volume similarities (NCC x coverage) to test; higher = more like a copy.
    null : array-like, shape (n,), n >= 3
        The same similarity of volumes known not to be copies.

    Returns
    -------
    np.ndarray, shape (m,)
        In (0, 1]; small = unlikely for a volume that is not a copy.
    """
    from scipy.stats import t as student_t

    sn = np.asarray(null, np.float64).reshape(-1)
    n = sn.size
    if n < 3:
        raise ValueError(
            f"volume_prediction_p_values needs at least 3 null volumes; got {n}. Give more holdout volumes."
        )
    med = float(np.median(sn))
    scale = 1.4826 * float(np.median(np.abs(sn - med)))
    if scale <= 1e-9:
        scale = float(sn.std(ddof=1))
    scale = max(scale, 1e-4)
    t = (np.asarray(similarity, np.float64) - med) / (scale * math.sqrt(1.0 + 1.0 / n))
    return np.asarray(student_t.sf(t, df=max(1.0, MAD_EFFICIENCY * (n - 1))), np.float64)


#: Asymptotic efficiency of the median absolute deviation as an estimate of a normal's scale (relative to the
#: standard deviation): the MAD of ``n`` values is as informative as a standard deviation with this share of
#: the degrees of freedom (Huber & Ronchetti, Robust Statistics, 2009, sec. 5.3).
MAD_EFFICIENCY = 0.367


def simes(p: Any) -> float:
    """Simes' combination of p-values, ``min_k n p_(k) / k`` (valid under positive dependence), in [0, 1]."""
    pv = np.sort(np.asarray(p, np.float64).reshape(-1))
    if pv.size == 0:
        return 1.0
    return float(min(1.0, np.min(pv.size * pv / np.arange(1, pv.size + 1))))


def group_simes(p: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    """Simes' p-value of each group, in order of first appearance.

    Returns
    -------
    (ids, p_values) : np.ndarray of object, shape (G,), and np.ndarray of float, shape (G,)
    """
    pv = np.asarray(p, np.float64).reshape(-1)
    g = np.asarray(groups, dtype=object).reshape(-1)
    ids = list(dict.fromkeys(g.tolist()))
    index = {v: i for i, v in enumerate(ids)}
    codes = np.asarray([index[v] for v in g], dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(ids) + 1))
    out = np.array([simes(pv[order[bounds[i] : bounds[i + 1]]]) for i in range(len(ids))], np.float64)
    return np.asarray(ids, dtype=object), out


def permutation_mean_test(g: Any, h: Any, *, n_perm: int = 9999, seed: int = 0) -> float:
    """One-sided permutation p-value that the mean of ``g`` exceeds what a random split of ``g ∪ h`` gives.

    Exact (``(1 + #{perm >= obs}) / (1 + n_perm)``) when the units of ``g`` and ``h`` are exchangeable.
    """
    x, y = np.asarray(g, np.float64).reshape(-1), np.asarray(h, np.float64).reshape(-1)
    if x.size == 0 or y.size == 0:
        return 1.0
    pooled = np.concatenate([x, y])
    obs = x.mean()
    rng = np.random.default_rng(seed)
    hits, chunk = 0, max(1, 2_000_000 // pooled.size)  # bounded memory: about 16 MB of draws at a time
    for start in range(0, n_perm, chunk):
        b = min(chunk, n_perm - start)
        idx = np.argsort(rng.random((b, pooled.size)), axis=1)[:, : x.size]
        hits += int(np.sum(pooled[idx].mean(axis=1) >= obs - 1e-12))
    return float((1 + hits) / (1 + n_perm))


def _passing_rank(alpha: float, n_null: Any) -> Any:
    """``c = floor(alpha (n + 1)) - 1``: a score has conformal ``p <= alpha`` against ``n`` null scores when at
    most ``c`` of them are at least as high (``-1``: none can). Integer, or int64 array for an array ``n``."""
    c = np.floor(alpha * (np.asarray(n_null) + 1) + 1e-9).astype(np.int64) - 1
    return c if c.ndim else int(c)


def count_test_p_value(k: int, m: int, n_null: int, alpha: float) -> float:
    """``P(K' >= k)`` for ``K'`` the number of ``m`` novel units with conformal ``p <= alpha`` against one null of
    ``n_null``: ``K' ~ BetaBinomial(m, c + 1, n_null - c)``, ``c = floor(alpha (n_null + 1)) - 1``.

    Exact for exchangeable, independent units with continuous scores (ties make it conservative). 1 when no unit
    can pass (``c < 0``).
    """
    from scipy.stats import betabinom

    c = _passing_rank(alpha, n_null)
    if c < 0 or m <= 0:
        return 1.0
    if c >= n_null:
        return 1.0 if k <= m else 0.0
    return float(min(1.0, max(0.0, betabinom.sf(k - 1, m, c + 1, n_null - c))))


#: Bootstrap resamples of :func:`clustered_count_test_p_value`.
CLUSTER_BOOTSTRAP = 2000


def clustered_count_test_p_value(
    k: int,
    m: int,
    null: Any,
    null_groups: Any,
    alpha: float,
    *,
    n_boot: int = CLUSTER_BOOTSTRAP,
    seed: int = 0,
) -> float:
    """``P(K' >= k)`` for ``K'`` the number of ``m`` independent novel slices with conformal ``p <= alpha``
    against a null whose slices come in volumes (correlated within a volume).

    Given the null, each novel slice passes with probability ``U = 1 - F(t)``, ``t`` the null's conformal
    threshold (its ``(c + 1)``-th largest score, ``c = floor(alpha (n + 1)) - 1``). With independent null slices
    ``U ~ Beta(c + 1, n - c)`` (:func:`count_test_p_value`); slices of one volume are alike, so the threshold
    rests on fewer independent units and ``U`` varies more (measured on look-alike cohorts with 20 holdout
    subjects: one audit's novel-slice FPR at alpha = 0.01 ranged from 0 to 0.05). Here ``U``'s distribution is
    the volume bootstrap's: the holdout volumes are resampled with replacement, each resample's threshold
    ``t_b`` taken, and ``U_b`` is the share of the slices of the volumes it left out (out of bag, the slices
    the threshold was not fitted on) above it; ``P(K' >= k) = mean_b P(Binomial(m, U_b) >= k)``. A resample
    holds about 63 % of the distinct volumes, so its threshold varies somewhat more than the holdout's own:
    the test leans conservative (simulated, benchmarks/RESULTS.md, calibration section: false alarms 1.4-7.2 % at
    a 5 % level, each within 2 s.e. of it, with 10-20 correlated volumes, where the Beta-binomial alone gave
    5-54 %; the price is power: 5 % copied slices detected in 20-59 % of such audits). Using the share of the
    whole null instead (the plain bootstrap) left false alarms at 13-19 %.

    Parameters
    ----------
    k, m : int
        Slices with ``p <= alpha`` and synthetic slices.
    null : array-like, shape (n,)
    null_groups : array-like, shape (n,)
        The holdout volume of each null score.
    alpha : float
    n_boot : int
        Bootstrap resamples (seeded: the same inputs give the same p-value).
    seed : int

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    from scipy.stats import binom

    z = np.asarray(null, np.float64).reshape(-1)
    g = np.asarray(null_groups).astype(str).reshape(-1)
    if g.shape != z.shape:
        raise ValueError(f"null_groups must have shape {z.shape}; got {g.shape}.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}.")
    a = _check_alpha(alpha)
    if m <= 0 or k <= 0:
        return 1.0
    _, grp = np.unique(g, return_inverse=True)
    n_groups = int(grp.max()) + 1
    order = np.argsort(-z, kind="stable")  # every score once, descending, with its volume
    vals, grp = z[order], grp[order]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, (n_boot, n_groups))  # each resample: as many volumes, with replacement
    u = np.full(n_boot, np.nan)  # NaN: a resample that left no volume out (not counted)
    sizes = np.bincount(grp, minlength=n_groups)
    # the threshold lies among the largest scores: look there first (the whole list for resamples it misses)
    top = min(z.size, int(8 * a * z.size) + 64)
    step = max(1, (1 << 22) // top)  # resamples at a time: (step, top) temporaries of ~32 MB
    for s0 in range(0, n_boot, step):
        cnt = np.stack([np.bincount(p, minlength=n_groups) for p in picks[s0 : s0 + step]])  # (b, G)
        c = _passing_rank(a, cnt @ sizes)
        n_oob = (cnt == 0).astype(np.int64) @ sizes  # scores left out of each resample
        t = np.full(len(cnt), np.inf)
        hit = np.zeros(len(cnt))
        for cols in (top, z.size):
            todo = np.flatnonzero(~np.isfinite(t) & (c >= 0))
            if not todo.size:
                break
            w = cnt[todo][:, grp[:cols]]  # (b, cols): how often each of the largest scores is in the resample
            cw = np.cumsum(w, axis=1)
            found = cw[:, -1] >= c[todo] + 1
            j = np.argmax(cw >= (c[todo] + 1)[:, None], axis=1)
            rows = todo[found]
            # the (c + 1)-th largest resampled score; a score passes when it is above it
            t[rows] = vals[j[found]]
            above = np.searchsorted(-vals, -t[rows], side="left")  # scores strictly above it (all within cols)
            oob = np.cumsum(w[found] == 0, axis=1)
            hit[rows] = np.where(above > 0, oob[np.arange(rows.size), np.maximum(above - 1, 0)], 0)
        ub = np.where(c < 0, 0.0, hit / np.maximum(n_oob, 1))
        u[s0 : s0 + len(cnt)] = np.where(n_oob > 0, ub, np.nan)
    u = u[np.isfinite(u)]
    if u.size == 0:  # a single volume: nothing to resample
        return 1.0
    return float(min(1.0, max(0.0, binom.sf(k - 1, m, u).mean())))


def gate(verdict: Verdict, fail_on: str, *, max_flagged: int | None = None) -> tuple[bool, str]:
    """Decide the CI gate from a dataset verdict.

    Parameters
    ----------
    verdict : Verdict
        From :meth:`Calibration.verdict` (``AuditResult.verdict``).
    fail_on : str
        ``never``; ``flagged``: fail when more than ``max_flagged`` slices are flagged, or (without
        ``max_flagged``) when more units are flagged than chance explains (the verdict's count test);
        ``verdict``: fail when the dataset verdict says copying. Both fail when the verdict is not decidable
        (no calibrated null: missing evidence).
    max_flagged : int, optional
        With ``flagged``: the number of flagged slices allowed (>= 0).

    Returns
    -------
    (bool, str)
        Whether the gate fails, and why.
    """
    if not isinstance(verdict, Verdict):
        raise TypeError(f"gate needs a Verdict (AuditResult.verdict); got {type(verdict).__name__}.")
    if fail_on not in GATES:
        raise ValueError(f"fail_on must be one of {GATES}; got {fail_on!r}.")
    if max_flagged is not None and max_flagged < 0:
        raise ValueError(f"max_flagged must be >= 0; got {max_flagged}.")
    if fail_on == "never":
        return False, ""
    if not verdict.decidable:
        return True, f"missing evidence: {verdict.copying_reason}"
    n = verdict.n_flagged
    if fail_on == "flagged" and max_flagged is not None:
        return n > max_flagged, f"{n} slices flagged (allowed: {max_flagged})"
    return verdict.copying, verdict.copying_reason
