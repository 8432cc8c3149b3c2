"""The one calibration object: the null, the p-values, the flags, the thresholds and the dataset verdict.

Every flag, count, threshold and verdict the user sees (``scores.csv``, ``summary.json``, the app's pages,
the report, the CI gate) is asked of a :class:`Calibration`; no other code compares a p-value with alpha.

The maths lives in :mod:`inspector.scores` (conformal p-values, the null's CDF with fitted tails,
Benjamini–Hochberg, the Mann–Whitney AUC, the Wilson interval); this module composes them at one
``(alpha, fdr)`` setting and says what they mean.

Slice level
    ``p_j = (1 + #{null >= s_j}) / (1 + n_null)``; a slice is flagged when ``p_j <= alpha``, or, with
    ``fdr``, when Benjamini–Hochberg at level ``alpha`` rejects it across the synthetic set.
Dataset level
    ``copying`` when the lower end of the 95 % Wilson interval of the flagged fraction lies above alpha.
    (This treats flags as independent; a test valid under the shared null and within-volume dependence is
    the subject of the calibration issue.)
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

__all__ = ["Calibration", "Verdict", "GATES", "NULL_KINDS", "gate", "wilson_interval"]

log = logging.getLogger(__name__)

#: The nulls a calibration can be built on.
NULL_KINDS: tuple[str, ...] = ("holdout", "leave-one-subject-out", "split-half bootstrap")
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
        Whether any slice can be flagged at ``alpha`` (``min_p_value <= alpha``).
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the interval as a list; ``warning`` only when set)."""
        d = dataclasses.asdict(self)
        d["fraction_ci95"] = list(self.fraction_ci95)
        if d["warning"] is None:
            del d["warning"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["fraction_ci95"] = tuple(kw.get("fraction_ci95", (0.0, 1.0)))
        return cls(**kw)

    @property
    def text(self) -> str:
        """The verdict in plain words."""
        k, m, s, a = self.n_flagged, self.n_synthetic, self.n_subjects_flagged, self.alpha
        exp = self.expected_false_positives
        rule = "the Benjamini–Hochberg FDR level" if self.fdr else "α ="
        who = f"from {s} training subject{'s' if s != 1 else ''}" if k else ""
        chance = f"about {exp:.1f} would be flagged by chance at {rule} {a:g}."
        head = f"{k} of {m} synthetic slices look copied {who}; {chance}"
        if not k:
            head = f"None of {m} synthetic slices looks copied; {chance}"
        if self.copying:
            tail = " More slices are flagged than chance explains: the model likely memorised training data."
        elif k:
            tail = " The flagged count is within what chance explains; review the flagged pairs."
        else:
            tail = ""
        if self.warning:
            tail += f" Warning: {self.warning}"
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
        if f:
            return benjamini_hochberg(self.p_values, a)
        return self.p_values <= a

    def threshold(self, alpha: float | None = None, fdr: bool | None = None) -> float:
        """The similarity above which a slice is flagged at ``(alpha, fdr)``, for drawing.

        Without ``fdr`` this is the null's upper quantile (``p <= alpha`` iff ``similarity > threshold``, up to
        ties with null scores);
        with ``fdr`` it is the smallest flagged similarity (``inf`` when nothing is flagged).
        """
        a, f = self._setting(alpha, fdr)
        if f:
            fl = self.flags(a, True)
            return float(self.similarity[fl].min()) if fl.any() else float("inf")
        null = np.sort(self.null)
        n = len(null)
        # p = (1 + #{null >= s}) / (1 + n) <= alpha  <=>  #{null >= s} <= alpha (1 + n) - 1
        allowed = int(math.floor(a * (1 + n) - 1 + 1e-9))
        if allowed < 0:
            return float("inf")
        if allowed >= n:
            return float("-inf")
        return float(null[n - allowed - 1])

    # ------------------------------------------------------------------ the dataset decision
    def verdict(self, alpha: float | None = None, fdr: bool | None = None) -> Verdict:
        """The dataset verdict at ``(alpha, fdr)`` (default: the audit's setting)."""
        a, f = self._setting(alpha, fdr)
        flagged = self.flags(a, f)
        k, m = int(flagged.sum()), len(self)
        lo, hi = wilson_interval(k, m)
        copying = lo > a
        subj = self.nearest_subject[flagged]
        n_subj = len({s for s in subj if s}) if k else 0
        warning = None
        if not self.reachable(a):
            warning = (
                f"The null has only {self.n_null} slices, so the smallest possible p-value is {self.min_p_value:.3g} "
                f"> alpha = {a:g}: no slice can be flagged. Give a larger holdout (at least {min_null_size(a)} "
                "slices) or a larger alpha."
            )
        mean_oni = float(np.mean(self.oni)) if m else float("nan")
        reason = (
            f"{k} of {m} slices flagged; the 95% interval of the flagged fraction [{lo:.3f}, {hi:.3f}] lies above "
            f"alpha = {a:g}"
            if copying
            else f"{k} of {m} slices flagged; the 95% interval [{lo:.3f}, {hi:.3f}] includes alpha = {a:g}"
        )
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
            alpha_reachable=self.reachable(a),
            mann_whitney_auc=float(self._auc[0]),
            mann_whitney_p=float(self._auc[1]),
            mean_oni=mean_oni,
            mean_mi_z=float(np.mean(self.mi_z)) if m else float("nan"),
            paper_rule=PAPER_RULE,
            paper_rule_memorised=bool(mean_oni < PAPER_ONI_THRESHOLD),
            copying=bool(copying),
            copying_reason=reason,
            warning=warning,
        )

    def gate(
        self, fail_on: str, *, alpha: float | None = None, fdr: bool | None = None, max_flagged: int | None = None
    ) -> tuple[bool, str]:
        """The CI gate at ``(alpha, fdr)``: see :func:`gate`."""
        return gate(self.verdict(alpha, fdr), fail_on, max_flagged=max_flagged)


def gate(verdict: Verdict, fail_on: str, *, max_flagged: int | None = None) -> tuple[bool, str]:
    """Decide the CI gate from a dataset verdict.

    Parameters
    ----------
    verdict : Verdict
        From :meth:`Calibration.verdict` (``AuditResult.verdict``).
    fail_on : str
        ``never``; ``flagged``: fail when more than ``max_flagged`` slices are flagged, or (without
        ``max_flagged``) when the lower end of the 95 % interval of the flagged fraction exceeds alpha;
        ``verdict``: fail when the dataset verdict says copying.
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
    n = verdict.n_flagged
    if fail_on == "flagged":
        if max_flagged is not None:
            return n > max_flagged, f"{n} slices flagged (allowed: {max_flagged})"
        lo, a = verdict.fraction_ci95[0], verdict.alpha
        return lo > a, f"{n} slices flagged; 95% interval of the flagged fraction starts at {lo:.4f} > alpha {a:g}"
    return verdict.copying, verdict.copying_reason
