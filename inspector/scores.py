"""Whitening, nearest-neighbour similarities, the paper's MI/ONI, and calibration against a null.

Two layers of API live here:

* **Estimators** (scikit-learn style: keyword-only ``__init__`` that only stores parameters,
  ``fit(...) -> self``, learned state ends in ``_``, scoring checks it is fitted):

  - :class:`Whitener`: per-layer whitening fitted on the training features, ZCA (the paper) or
    shrinkage ZCA (our default mode);
  - :class:`PaperScorer`: Deo et al. 2026 (arXiv 2602.13066) exactly as DESIGN §2 describes it.

* **Calibration functions**, pure functions over numpy arrays that check their inputs:
  :func:`empirical_p_values`, :func:`calibrated_mi`, :func:`benjamini_hochberg`,
  :func:`mann_whitney_auc`, :func:`min_p_value`, :func:`null_too_small`, :func:`zscore_oni`,
  and the layer aggregation :func:`aggregate_layers`.

Direction convention everywhere: a **higher** similarity, ``mi`` or ``mi_z`` and a **lower**
``p_value`` or ``oni`` mean *more memorised* (closer to a training sample than the null explains).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from sklearn.exceptions import NotFittedError

from .index import knn

__all__ = [
    "PAPER_ONI_THRESHOLD",
    "DegenerateInputError",
    "Whitener",
    "PaperScorer",
    "PaperScores",
    "aggregate_layers",
    "empirical_p_values",
    "calibrated_mi",
    "benjamini_hochberg",
    "mann_whitney_auc",
    "min_p_value",
    "min_null_size",
    "null_too_small",
    "zscore_oni",
    "split_halves",
]

log = logging.getLogger(__name__)

#: The paper's universal dataset rule: a synthetic set whose mean ONI is below this is memorised.
PAPER_ONI_THRESHOLD: float = 0.68
#: Variance floor of the paper's null standard deviation, ``sigma0 = sqrt(var + 1e-8)``.
PAPER_VAR_FLOOR: float = 1e-8
#: Training neighbours kept per sample to evaluate the split-half bootstrap without an n x n matrix.
_BOOTSTRAP_NEIGHBOURS = 32


class DegenerateInputError(ValueError):
    """Input that no score can be computed from: too few samples, constant features, NaN or Inf."""


# ---------------------------------------------------------------------------------------------- helpers
def _check_2d(x: ArrayLike, name: str, *, min_rows: int = 1) -> np.ndarray:
    """Check that ``x`` is a 2-D real array with at least ``min_rows`` rows; return it unconverted."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n_samples, n_features); got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}.")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no feature columns (shape {arr.shape}).")
    if arr.shape[0] < min_rows:
        raise DegenerateInputError(
            f"{name} has {arr.shape[0]} sample(s); at least {min_rows} are needed. Provide more slices."
        )
    return arr


def _as_2d(x: ArrayLike, name: str, *, min_rows: int = 1) -> np.ndarray:
    """Check that ``x`` is a finite 2-D float array with at least ``min_rows`` rows; return float64."""
    arr = _check_2d(x, name, min_rows=min_rows).astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise _non_finite_rows(name, int((~np.isfinite(arr)).any(axis=1).sum()))
    return arr


def _non_finite_rows(name: str, bad: int) -> DegenerateInputError:
    """The error for ``bad`` rows of ``name`` holding NaN or Inf."""
    return DegenerateInputError(
        f"{name} contains NaN or Inf in {bad} row(s); remove or fix those samples (e.g. empty slices)."
    )


def _as_1d(x: ArrayLike, name: str, *, min_len: int = 0) -> np.ndarray:
    """Check that ``x`` is a finite 1-D real array of length >= ``min_len``; return float64."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array; got shape {arr.shape}.")
    if arr.size and (not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating)):
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}.")
    if arr.size < min_len:
        raise DegenerateInputError(f"{name} has {arr.size} value(s); at least {min_len} are needed.")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise DegenerateInputError(
            f"{name} contains {int((~np.isfinite(arr)).sum())} NaN or Inf value(s); scores must be finite."
        )
    return arr


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}.")
    return a


def _check_fitted(est: object, attr: str) -> None:
    if not hasattr(est, attr):
        raise NotFittedError(f"This {type(est).__name__} instance is not fitted yet; call fit(...) first.")


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; rows of (near) zero norm become exactly zero instead of NaN."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    tiny = np.finfo(np.float64).tiny ** 0.5
    out = np.divide(x, norm, out=np.zeros_like(x), where=norm > tiny)
    return out


# ---------------------------------------------------------------------------------------------- whitening
#: Rows per block of the streamed whitening statistics: fitting holds ``O(chunk d + d^2)`` floats.
_FIT_CHUNK_ROWS = 4096


@dataclass
class _Moments:
    """Streamed statistics of a set of rows ``x_i`` (float64), about the set's own mean.

    With ``y_i = x_i - mean`` and ``q_i = ||y_i||^2``: ``scatter = sum_i y_i y_i^T``, shape (d, d);
    ``third = sum_i q_i y_i``, shape (d,); ``fourth = sum_i q_i^2``; ``lo``/``hi`` the per-feature
    minimum and maximum, shape (d,). Sufficient for the covariance, the Ledoit–Wolf coefficient about
    the final mean and the constant-feature check, and mergeable (:func:`_merge_moments`).
    """

    n: int
    mean: np.ndarray
    scatter: np.ndarray
    third: np.ndarray
    fourth: float
    lo: np.ndarray
    hi: np.ndarray


def _block_moments(x: np.ndarray) -> _Moments:
    """:class:`_Moments` of one block of rows, shape (m, d) float64, m >= 1, centred on its own mean."""
    mean = x.mean(axis=0)
    y = x - mean
    q = np.einsum("ij,ij->i", y, y)
    return _Moments(
        n=x.shape[0],
        mean=mean,
        scatter=y.T @ y,
        third=y.T @ q,
        fourth=float(q @ q),
        lo=x.min(axis=0),
        hi=x.max(axis=0),
    )


def _recentre(m: _Moments, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(scatter, third, fourth)`` of ``m``'s rows about ``m.mean + shift`` instead of ``m.mean``.

    With ``y' = y - shift``, ``s = ||shift||^2`` and ``sum_i y_i = 0``:
    ``scatter' = scatter + n shift shift^T``,
    ``third' = third - 2 scatter shift - tr(scatter) shift - n s shift``,
    ``fourth' = fourth + 4 shift^T scatter shift + n s^2 - 4 third^T shift + 2 s tr(scatter)``.
    """
    s = float(shift @ shift)
    q_sum = float(np.trace(m.scatter))
    sm = m.scatter @ shift
    scatter = m.scatter + m.n * np.outer(shift, shift)
    third = m.third - 2.0 * sm - (q_sum + m.n * s) * shift
    fourth = m.fourth + 4.0 * float(shift @ sm) + m.n * s * s - 4.0 * float(m.third @ shift) + 2.0 * s * q_sum
    return scatter, third, fourth


def _merge_moments(a: _Moments | None, b: _Moments) -> _Moments:
    """:class:`_Moments` of the union of two row sets (Chan et al.'s pairwise update, to 4th order).

    Both sets are re-centred on the pooled mean before their sums are added, so no raw (uncentred)
    moment is ever formed and a large common offset costs no precision.
    """
    if a is None:
        return b
    n = a.n + b.n
    mean = a.mean + (b.mean - a.mean) * (b.n / n)
    sa, ta, fa = _recentre(a, mean - a.mean)
    sb, tb, fb = _recentre(b, mean - b.mean)
    return _Moments(
        n=n,
        mean=mean,
        scatter=sa + sb,
        third=ta + tb,
        fourth=fa + fb,
        lo=np.minimum(a.lo, b.lo),
        hi=np.maximum(a.hi, b.hi),
    )


def _check_finite_block(x: np.ndarray, name: str, first_row: int) -> None:
    """Raise :class:`DegenerateInputError` naming the first non-finite value of a block of rows."""
    finite = np.isfinite(x)
    if finite.all():
        return
    rows = np.flatnonzero(~finite.all(axis=1))
    r = int(rows[0])
    c = int(np.flatnonzero(~finite[r])[0])
    raise DegenerateInputError(
        f"{name} contain NaN or Inf: row {first_row + r}, column {c} is {float(x[r, c])!r} ({rows.size} bad row(s) "
        f"among rows {first_row}..{first_row + x.shape[0] - 1}); remove or fix those samples (e.g. empty "
        "slices) before fitting. Nothing from this call was accumulated."
    )


def _ledoit_wolf_from_moments(n: int, scatter: np.ndarray, fourth: float) -> float:
    """Ledoit–Wolf shrinkage intensity from centred statistics (sklearn's formula, ``assume_centered``).

    Parameters
    ----------
    n : int
        Number of rows.
    scatter : np.ndarray, shape (d, d)
        ``X^T X`` of the centred rows ``X`` (so ``S = scatter / n``).
    fourth : float
        ``sum_i ||x_i||^4`` over the centred rows, which is sklearn's ``sum(X2.T @ X2)`` with ``X2 = X**2``.

    Returns
    -------
    float
        ``a`` in [0, 1]; 0 for a single feature (as sklearn), or when ``S`` is already ``tr(S)/d I``.
    """
    d = scatter.shape[0]
    if d == 1:
        return 0.0
    trace = float(np.trace(scatter)) / n  # tr(S)
    mu = trace / d
    delta_ = float(np.einsum("ij,ij->", scatter, scatter)) / n**2  # ||S||_F^2
    beta = (fourth / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace + d * mu**2) / d  # ||S - mu I||_F^2 / d
    beta = min(beta, delta)
    if beta <= 0 or delta <= 0:
        return 0.0
    return float(beta / delta)


def ledoit_wolf_shrinkage(xc: ArrayLike, *, block_size: int = _FIT_CHUNK_ROWS) -> float:
    """Ledoit–Wolf shrinkage intensity of centred data, streamed over blocks of rows.

    Same value as :func:`sklearn.covariance.ledoit_wolf_shrinkage` with ``assume_centered=True`` (the
    shrunk covariance is ``(1 - a) S + a tr(S)/d I``), from the ``d x d`` matrix ``X^T X`` and the scalar
    ``sum_i ||x_i||^4`` accumulated in float64 over blocks of ``block_size`` rows: ``O(n d^2)`` time and
    ``O(block_size d + d^2)`` memory; no ``n x n`` matrix is formed.

    Parameters
    ----------
    xc : array-like, shape (n, d)
        Centred training features (``n >= 1``, finite).
    block_size : int
        Rows per block.

    Returns
    -------
    float
        ``a`` in [0, 1].
    """
    x = _check_2d(xc, "centred features", min_rows=1)
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive number of rows; got {block_size!r}.")
    n, d = x.shape
    bs = int(block_size)
    scatter = np.zeros((d, d), dtype=np.float64)
    fourth = 0.0
    for start in range(0, n, bs):
        blk = np.asarray(x[start : start + bs], dtype=np.float64)
        _check_finite_block(blk, "centred features", start)
        scatter += blk.T @ blk
        q = np.einsum("ij,ij->i", blk, blk)
        fourth += float(q @ q)
    return _ledoit_wolf_from_moments(n, scatter, fourth)


#: Attributes set by :meth:`Whitener.finalize`; reading one computes a pending streamed fit.
_WHITENER_FITTED = frozenset(
    (
        "mean_",
        "components_",
        "component_scale_",
        "isotropic_scale_",
        "eigenvalues_",
        "shrinkage_",
        "n_samples_fit_",
        "n_features_in_",
    )
)


class Whitener:
    """Whitening of one layer's features, fitted on the training features only.

    ``transform(f) = normalise((f - mean_) @ W_)`` with ``W_ = (C + eps I)^(-1/2)`` (symmetric, i.e.
    ZCA), computed in float64 by a symmetric eigendecomposition, followed by row L2 normalisation so
    that inner products are cosines.

    The fit is streamed: :meth:`partial_fit` accumulates, over blocks of rows, the count, the mean, the
    centred scatter ``sum (x - mean)(x - mean)^T`` and the fourth-order sums that the Ledoit–Wolf
    coefficient needs (Chan et al.'s pairwise update, float64), and :meth:`finalize` turns them into the
    whitening; :meth:`fit` does both over blocks of 4096 rows. Memory is ``O(block d + d^2)`` whatever the
    number of training slices: no ``n x n`` matrix is formed.

    Parameters
    ----------
    method : {"shrinkage", "zca"}
        ``"zca"``: ``C`` is the unbiased sample covariance of the training features (``n - 1``
        denominator), the paper's exact formula. ``"shrinkage"`` (default, our default mode): ``C`` is a
        shrunk covariance ``(1 - a) S + a (tr(S)/d) I`` with ``S`` the maximum-likelihood covariance.
        When the training cohort has fewer slices ``n`` than feature dimensions ``d`` (MRI-CORE has
        ``d = 768``; a small cohort easily has fewer slices), ``S`` has rank ``n - 1`` and exact ZCA
        (a) maps the centred training set onto a regular simplex, every pair of training slices at cosine
        ``-1/(n-1)``, so a null built within T collapses to a constant, and (b) multiplies every
        direction the training data never varies in by ``eps^(-1/2)`` (316 for ``eps = 1e-5``), so a
        query's whitened vector is dominated by its component there: a copy with 5 % noise drops from
        cosine ~1 to ~0.05 (measured in ``tests/test_scores.py``). Shrinking towards the scaled identity
        keeps every eigenvalue at least ``a tr(S)/d``, so unseen directions are weighted like average
        ones, and whitening only partly equalises the seen ones.
    eps : float
        Ridge added to the covariance before the inverse square root.
    shrinkage : "ledoit-wolf" or float
        For ``method="shrinkage"``: ``"ledoit-wolf"`` estimates ``a`` with the Ledoit–Wolf formula
        (:func:`sklearn.covariance.ledoit_wolf`, optimal in squared Frobenius loss, needs no tuning and
        no cross-validation; here :func:`ledoit_wolf_shrinkage`'s streamed form); a float in ``[0, 1]``
        fixes it.

    Attributes
    ----------
    mean_ : np.ndarray, shape (d,)
    whitening_ : np.ndarray, shape (d, d), float64
        ``W = (C + eps I)^(-1/2)`` (a property built from the factors below).
    components_ : np.ndarray, shape (d, r)
        Eigenvectors of ``C`` (all ``d`` when ``n >= d``, ascending eigenvalues; otherwise the ``r = n``
        leading ones, descending, which span the data directions).
    component_scale_ : np.ndarray, shape (r,)
    isotropic_scale_ : float
        ``W = isotropic_scale_ I + components_ diag(component_scale_) components_^T``; when ``n < d`` the
        directions outside ``components_`` all have eigenvalue ``a tr(S)/d`` and share the isotropic scale.
    eigenvalues_ : np.ndarray, shape (d,)
        Eigenvalues of ``C`` (ascending, clipped at 0).
    shrinkage_ : float
        Shrinkage intensity used (0 for ``"zca"``).
    n_samples_fit_ : int
    n_features_in_ : int

    After :meth:`partial_fit` these are computed on first use (:meth:`transform`, :attr:`whitening_` or
    reading any of them), or explicitly by :meth:`finalize`.
    """

    def __init__(self, *, method: str = "shrinkage", eps: float = 1e-5, shrinkage: str | float = "ledoit-wolf") -> None:
        self.method = method
        self.eps = eps
        self.shrinkage = shrinkage

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: a fitted attribute missing because a streamed fit is
        # pending is computed now; anything else is a plain AttributeError.
        if name in _WHITENER_FITTED and self.__dict__.get("_pending", False):
            self.finalize()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _validate_params(self) -> None:
        if self.method not in ("zca", "shrinkage"):
            raise ValueError(f"Whitener method must be 'zca' or 'shrinkage'; got {self.method!r}.")
        if not (isinstance(self.eps, int | float) and self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"Whitener eps must be a positive finite number; got {self.eps!r}.")
        if self.method == "shrinkage" and self.shrinkage != "ledoit-wolf":
            if not isinstance(self.shrinkage, int | float) or not 0.0 <= float(self.shrinkage) <= 1.0:
                raise ValueError(f"shrinkage must be 'ledoit-wolf' or a float in [0, 1]; got {self.shrinkage!r}.")

    def _accumulate(self, X: ArrayLike, prior: _Moments | None, *, min_rows: int) -> _Moments | None:
        """``prior`` merged with the statistics of ``X``'s rows, in blocks; ``self`` is not modified."""
        name = "training features"
        x = _check_2d(X, name, min_rows=min_rows)
        n, d = x.shape
        if prior is not None and d != prior.mean.size:
            raise ValueError(
                f"this chunk of {name} has {d} columns but the earlier partial_fit chunks had "
                f"{prior.mean.size}; pass the same layer's features in every chunk, or call fit(X) to start over."
            )
        seen = 0 if prior is None else prior.n
        acc: _Moments | None = None
        step = int(_FIT_CHUNK_ROWS)
        for start in range(0, n, step):
            blk = np.asarray(x[start : start + step], dtype=np.float64)
            _check_finite_block(blk, name, seen + start)
            acc = _merge_moments(acc, _block_moments(blk))
        if acc is None:
            return prior
        return _merge_moments(prior, acc)

    def fit(self, X: ArrayLike, y: None = None) -> Whitener:
        """Fit the whitening on the training features (streamed over blocks of 4096 rows).

        Parameters
        ----------
        X : array-like, shape (n, d)
            Training features of one layer, ``n >= 2``, finite, not all rows identical.
        y : ignored

        Returns
        -------
        Whitener
            ``self``.

        Raises
        ------
        DegenerateInputError
            ``n < 2``, NaN/Inf, or every feature constant (all rows identical).
        """
        self._validate_params()
        stats = self._accumulate(X, None, min_rows=2)
        fitted = self._solve(stats)
        self._stats = stats
        self.__dict__.update(fitted)
        self._pending = False
        return self

    def partial_fit(self, X: ArrayLike, y: None = None) -> Whitener:
        """Add a chunk of training rows to the streamed fit.

        The statistics are updated in float64 by Chan et al.'s pairwise formulas; the whitening itself
        is computed by :meth:`finalize`, explicitly or on first use. Calls after a finished fit keep
        adding rows to it; :meth:`fit` starts over. A chunk that fails a check leaves the state unchanged.

        Parameters
        ----------
        X : array-like, shape (m, d)
            Training features of one layer, finite; any ``m >= 0`` (the total must reach 2), the same
            ``d`` in every chunk.
        y : ignored

        Returns
        -------
        Whitener
            ``self``.

        Raises
        ------
        DegenerateInputError
            NaN/Inf in the chunk (the message names its row, counted over all chunks, and column).
        ValueError
            Not 2-D, no columns, or a ``d`` different from the earlier chunks'.
        """
        self._validate_params()
        prior = self.__dict__.get("_stats")
        stats = self._accumulate(X, prior, min_rows=0)
        if stats is prior:
            return self
        for attr in _WHITENER_FITTED:
            self.__dict__.pop(attr, None)
        self._stats = stats
        self._pending = True
        return self

    def finalize(self) -> Whitener:
        """Compute the whitening from the statistics accumulated by :meth:`partial_fit`.

        Called automatically on first use after :meth:`partial_fit`; calling it again recomputes the
        same result (or a new one if the parameters were changed).

        Returns
        -------
        Whitener
            ``self``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            No rows were passed yet.
        DegenerateInputError
            Fewer than 2 rows in total, or every feature constant.
        """
        stats = self.__dict__.get("_stats")
        if stats is None:
            raise NotFittedError(
                f"This {type(self).__name__} instance has no training rows yet; "
                "call fit(X) or partial_fit(chunk) first."
            )
        self._validate_params()
        self.__dict__.update(self._solve(stats))
        self._pending = False
        return self

    def _solve(self, stats: _Moments | None) -> dict[str, object]:
        """The fitted attributes from the streamed statistics (``O(d^3)``; nothing is assigned here)."""
        n = 0 if stats is None else stats.n
        if stats is None or n < 2:
            raise DegenerateInputError(
                f"training features have {n} sample(s) in total; at least 2 are needed. Provide more slices "
                "(more rows to partial_fit, or fit(X) with n >= 2)."
            )
        d = stats.mean.size
        scale = max(1.0, float(np.abs(stats.lo).max()), float(np.abs(stats.hi).max()))
        constant = (stats.hi - stats.lo) <= 1e-12 * scale
        if constant.all():
            raise DegenerateInputError(
                f"All {d} training feature(s) are constant across the {n} samples (every row is identical); "
                "whitening is undefined. Check that the training slices are not all empty or duplicates."
            )
        if constant.any():
            log.debug("%d of %d feature(s) are constant on the training set", int(constant.sum()), d)
        if self.method == "zca" and n <= d:
            log.warning(
                "ZCA whitening with %d training samples for %d features: the covariance has rank <= %d, "
                "unseen directions are amplified by eps^-1/2; method='shrinkage' is stable here.",
                n,
                d,
                n - 1,
            )
        if self.method == "zca":
            a, denom = 0.0, n - 1  # unbiased covariance, no shrinkage
        elif self.shrinkage == "ledoit-wolf":
            a, denom = _ledoit_wolf_from_moments(n, stats.scatter, stats.fourth), n
        else:
            a, denom = float(self.shrinkage), n
        eps = float(self.eps)
        # C = (1 - a) S + iso I with S = scatter / denom and iso = a tr(S_ml)/d (sklearn's shrunk covariance)
        iso = a * float(np.trace(stats.scatter)) / n / d if a > 0 else 0.0
        s = stats.scatter / denom
        s = 0.5 * (s + s.T)
        lam, vecs = np.linalg.eigh(s)
        lam = np.clip(lam, 0.0, None)
        if n < d:
            # Rank <= n - 1: keep the n leading directions (descending); every other direction has
            # eigenvalue iso exactly and is served by the isotropic scale.
            lam, vecs = lam[::-1][:n], np.ascontiguousarray(vecs[:, ::-1][:, :n])
            comp = np.clip((1.0 - a) * lam + iso, 0.0, None)
            inner = 1.0 / np.sqrt(comp + eps)
            outer = 1.0 / np.sqrt(iso + eps)
            component_scale, isotropic_scale = inner - outer, outer
            evals = np.sort(np.concatenate([comp, np.full(d - n, iso)]))
        else:
            evals = np.clip((1.0 - a) * lam + iso, 0.0, None)
            component_scale, isotropic_scale = 1.0 / np.sqrt(evals + eps), 0.0
        return {
            "shrinkage_": a,
            "components_": vecs,
            "component_scale_": component_scale,
            "isotropic_scale_": isotropic_scale,
            "eigenvalues_": evals,
            "mean_": stats.mean.copy(),
            "n_samples_fit_": n,
            "n_features_in_": d,
        }

    @property
    def whitening_(self) -> np.ndarray:
        """``W = (C + eps I)^(-1/2)``, shape (d, d), float64 (built on demand from the factors)."""
        _check_fitted(self, "components_")
        v = self.components_
        w = (v * self.component_scale_) @ v.T
        if self.isotropic_scale_:
            w[np.diag_indices_from(w)] += self.isotropic_scale_
        return w

    def _whiten(self, x: np.ndarray) -> np.ndarray:
        xc = x - self.mean_
        v = self.components_
        z = ((xc @ v) * self.component_scale_) @ v.T
        if self.isotropic_scale_:
            z += self.isotropic_scale_ * xc
        return z

    def transform(self, X: ArrayLike) -> np.ndarray:
        """Whiten and L2-normalise features.

        Parameters
        ----------
        X : array-like, shape (m, d)

        Returns
        -------
        np.ndarray, shape (m, d), float32
            Unit-norm rows; a row that whitens to (numerically) zero stays all-zero (cosine 0 with
            everything) instead of becoming NaN.
        """
        _check_fitted(self, "components_")
        x = _check_2d(X, "features", min_rows=0)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"features have {x.shape[1]} columns but the Whitener was fitted on {self.n_features_in_}; "
                "use features of the same layer and extractor."
            )
        # in blocks of rows: the float64 temporaries are O(block d), not O(m d) (4 copies of a 100,000-slice
        # descriptor base would be GBs)
        out = np.empty(x.shape, np.float32)
        bad = 0
        step = int(_FIT_CHUNK_ROWS)
        for start in range(0, x.shape[0], step):
            blk = np.asarray(x[start : start + step], dtype=np.float64)
            finite = np.isfinite(blk).all(axis=1)
            if not finite.all():
                bad += int((~finite).sum())
                continue
            out[start : start + step] = _l2_normalise(self._whiten(blk))
        if bad:
            raise _non_finite_rows("features", bad)
        return out

    def fit_transform(self, X: ArrayLike, y: None = None) -> np.ndarray:
        """``fit(X).transform(X)``; shape (n, d) float32."""
        return self.fit(X).transform(X)


# ---------------------------------------------------------------------------------------------- aggregation
def aggregate_layers(S: ArrayLike, *, eps: float = 1e-5, clip_eps: float = 1e-6) -> np.ndarray:
    """Geometric mean of per-layer similarities: the paper's aggregation, clipped before the log.

    ``s = exp(mean_k log(clip(s_k, clip_eps, 1) + eps))``. The paper computes ``exp(mean_k log(s_k +
    eps))``, which is NaN for the negative cosines whitened features routinely give; clipping each
    ``s_k`` to ``[clip_eps, 1]`` first is the one deliberate deviation, and the result equals the
    paper's exactly whenever every ``s_k`` lies in ``[clip_eps, 1]``.

    Parameters
    ----------
    S : array-like, shape (m, L)
        Per-layer top-1 cosine similarities.
    eps : float
        The paper's epsilon inside the log.
    clip_eps : float
        Lower clip of each ``s_k``.

    Returns
    -------
    np.ndarray, shape (m,), float64
        In ``[clip_eps + eps, 1 + eps]``; higher = more memorised.
    """
    s = np.asarray(S, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"S must have shape (m, n_layers) with n_layers >= 1; got {s.shape}.")
    if np.isnan(s).any():
        raise DegenerateInputError("per-layer similarities contain NaN; check the features for NaN.")
    if not (eps > 0 and clip_eps > 0):
        raise ValueError(f"eps and clip_eps must be > 0; got {eps!r}, {clip_eps!r}.")
    return np.exp(np.mean(np.log(np.clip(s, clip_eps, 1.0) + eps), axis=1))


# ---------------------------------------------------------------------------------------------- calibration
def zscore_oni(scores: ArrayLike, null: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The paper's mapping of similarities to ``MI`` (a z-score) and ``ONI`` against a null.

    ``mi_z = (s - mu0) / sigma0`` with ``mu0 = mean(null)``, ``sigma0 = sqrt(var(null) + 1e-8)``
    (population variance), and ``oni = -tanh(mi_z)``.

    Parameters
    ----------
    scores : array-like, shape (m,)
    null : array-like, shape (n,), n >= 1

    Returns
    -------
    mi_z : np.ndarray, shape (m,)
        Higher = more memorised.
    oni : np.ndarray, shape (m,)
        In [-1, 1]; -1 memorised, +1 novel.
    """
    s = _as_1d(scores, "scores")
    z0 = _as_1d(null, "null", min_len=1)
    mu0 = float(z0.mean())
    sigma0 = math.sqrt(float(z0.var()) + PAPER_VAR_FLOOR)
    mi_z = (s - mu0) / sigma0
    return mi_z, -np.tanh(mi_z)


def empirical_p_values(scores: ArrayLike, null: ArrayLike) -> np.ndarray:
    """Conformal p-values of similarities against a null: ``p_j = (1 + #{null >= s_j}) / (1 + n)``.

    Valid (``P(p <= alpha) <= alpha``) when the query and the null scores are exchangeable, i.e. the
    query is as novel as the null's samples.

    Parameters
    ----------
    scores : array-like, shape (m,)
    null : array-like, shape (n,), n >= 1

    Returns
    -------
    np.ndarray, shape (m,)
        In ``[1/(1+n), 1]``; lower = more memorised.
    """
    s = _as_1d(scores, "scores")
    z0 = np.sort(_as_1d(null, "null", min_len=1))
    n = z0.size
    at_least = n - np.searchsorted(z0, s, side="left")
    return (1.0 + at_least) / (1.0 + n)


def min_p_value(n_null: int) -> float:
    """The smallest p-value :func:`empirical_p_values` can give with ``n_null`` null scores: ``1/(1+n)``."""
    if int(n_null) < 0:
        raise ValueError(f"n_null must be >= 0; got {n_null}.")
    return 1.0 / (1.0 + int(n_null))


def min_null_size(alpha: float) -> int:
    """The smallest null for which ``p <= alpha`` is reachable: ``ceil(1/alpha) - 1``."""
    a = _check_alpha(alpha)
    return max(0, math.ceil(1.0 / a - 1e-12) - 1)


def null_too_small(n_null: int, alpha: float) -> bool:
    """Whether no slice can ever be flagged at ``alpha``: ``1/(1+n_null) > alpha``.

    The audit warns (and suggests a larger holdout or a lower-resolution alpha) when this is true.
    """
    return min_p_value(n_null) > _check_alpha(alpha)


def _tail_scale(excess: np.ndarray, fallback: float) -> float:
    """Maximum-likelihood scale of an exponential fitted to non-negative exceedances."""
    sc = float(excess.mean()) if excess.size else 0.0
    return sc if sc > 0 and math.isfinite(sc) else fallback


def calibrated_mi(scores: ArrayLike, null: ArrayLike, *, tail_fraction: float = 0.15) -> np.ndarray:
    """Memorisation index in [0, 1]: the null's CDF at each score, with fitted tails.

    Inside the observed null range the CDF is the piecewise-linear interpolation of the empirical CDF
    at mid-rank plotting positions (a unique null value ``u`` with ``c`` copies and ``b`` smaller values
    sits at ``(b + c/2)/n``), which is continuous and strictly increasing. Beyond the null maximum the
    remaining mass ``1 - F(max)`` decays as an exponential tail, ``F(x) = 1 - (1 - F(max)) exp(-(x -
    max)/sigma_up)``, and below the minimum ``F(x) = F(min) exp(-(min - x)/sigma_low)``.

    Tail choice: an exponential (a generalized Pareto with shape 0) whose scale is the maximum-likelihood
    estimate, the mean excess of the top ``tail_fraction`` of the null over its threshold (the bottom
    fraction for the lower tail; at least 2 points, at most ``n - 1``). A fitted GPD shape is unstable with
    the 2-30 exceedances a small null gives, and a negative shape (bounded tail, natural for cosines)
    would put a hard end-point, ``mi = 1`` for every score past it, inside the range of real copies; shape
    0 is the conservative choice that keeps ``mi`` strictly increasing and still separates scores far
    beyond the null. When the null is constant the tail scale falls back to ``1e-6 * max(1, |x|)``.

    Parameters
    ----------
    scores : array-like, shape (m,)
    null : array-like, shape (n,), n >= 2 (n >= 10 recommended)
    tail_fraction : float in (0, 0.5]

    Returns
    -------
    np.ndarray, shape (m,), float64
        In [0, 1], monotone non-decreasing in the score (strictly increasing until float64 saturates at
        0 or 1 far into a tail), never NaN; higher = more memorised.
    """
    s = _as_1d(scores, "scores")
    z0 = np.sort(_as_1d(null, "null", min_len=2))
    if not 0.0 < tail_fraction <= 0.5:
        raise ValueError(f"tail_fraction must be in (0, 0.5]; got {tail_fraction!r}.")
    n = z0.size
    if n < 10:
        log.warning("calibrated_mi with a null of only %d scores: the tail fit is rough; use >= 10.", n)
    uniq, counts = np.unique(z0, return_counts=True)
    before = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = (before + counts / 2.0) / n
    lo, hi = float(uniq[0]), float(uniq[-1])
    spread = float(z0.std())
    fallback = spread if spread > 0 else 1e-6 * max(1.0, abs(hi), abs(lo))
    k = min(max(2, math.ceil(tail_fraction * n)), n - 1)
    sigma_up = _tail_scale(z0[n - k :] - z0[n - k - 1], fallback)
    sigma_low = _tail_scale(z0[k] - z0[:k], fallback)
    out = np.empty_like(s)
    mid = (s >= lo) & (s <= hi)
    if uniq.size > 1:
        out[mid] = np.interp(s[mid], uniq, pos)
    else:
        out[mid] = pos[0]
    up = s > hi
    out[up] = 1.0 - (1.0 - pos[-1]) * np.exp(-(s[up] - hi) / sigma_up)
    low = s < lo
    out[low] = pos[0] * np.exp(-(lo - s[low]) / sigma_low)
    return np.clip(out, 0.0, 1.0)


def benjamini_hochberg(p: ArrayLike, alpha: float) -> np.ndarray:
    """Benjamini–Hochberg step-up procedure controlling the false discovery rate at ``alpha``.

    Rejects the ``k`` smallest p-values, ``k = max{i : p_(i) <= i alpha / m}``.

    Parameters
    ----------
    p : array-like, shape (m,)
        p-values in [0, 1].
    alpha : float in (0, 1)

    Returns
    -------
    np.ndarray of bool, shape (m,)
        True = rejected (flagged as memorised), in the input order.
    """
    a = _check_alpha(alpha)
    pv = _as_1d(p, "p")
    if ((pv < 0) | (pv > 1)).any():
        raise ValueError("p-values must lie in [0, 1].")
    m = pv.size
    out = np.zeros(m, dtype=bool)
    if m == 0:
        return out
    order = np.argsort(pv, kind="stable")
    below = pv[order] <= a * np.arange(1, m + 1) / m
    if below.any():
        k = int(np.flatnonzero(below)[-1]) + 1
        out[order[:k]] = True
    return out


def mann_whitney_auc(g: ArrayLike, null: ArrayLike) -> tuple[float, float]:
    """Mann–Whitney AUC of synthetic scores against the null, with the one-sided p-value.

    ``auc = P(g > null) + 0.5 P(g = null)`` over all pairs: 0.5 means the synthetic set is as novel as
    the null (unseen real scans), towards 1 copying, below 0.5 less similar to the training set than
    real data. The p-value tests ``g`` stochastically greater than the null
    (:func:`scipy.stats.mannwhitneyu`, ``alternative="greater"``, exact for small samples without ties,
    normal approximation with tie correction otherwise).

    Parameters
    ----------
    g : array-like, shape (m,), m >= 1
    null : array-like, shape (n,), n >= 1

    Returns
    -------
    (float, float)
        ``(auc, p_value)``.
    """
    from scipy.stats import mannwhitneyu

    x = _as_1d(g, "g", min_len=1)
    y = _as_1d(null, "null", min_len=1)
    res = mannwhitneyu(x, y, alternative="greater")
    auc = float(res.statistic) / (x.size * y.size)
    p = float(res.pvalue)
    if not math.isfinite(p):  # all values tied: no evidence either way
        p = 1.0
    return auc, min(max(p, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------- paper mode
def split_halves(n: int, n_rounds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The split-half bootstrap's random splits of ``n`` training samples.

    Procedure (replicable): ``rng = np.random.default_rng(seed)``; for each round
    ``perm = rng.permutation(n)``; ``A, B = perm[: n // 2], perm[n // 2 :]``.

    Returns
    -------
    list of (np.ndarray, np.ndarray)
        ``n_rounds`` pairs of disjoint int64 index arrays, ``|A| = n // 2``.
    """
    if n < 2:
        raise DegenerateInputError(f"the split-half bootstrap needs at least 2 training samples; got {n}.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(n_rounds)):
        perm = rng.permutation(n)
        out.append((perm[: n // 2], perm[n // 2 :]))
    return out


def _top1_within_split(
    white: np.ndarray,
    neigh_sims: np.ndarray,
    neigh_idx: np.ndarray,
    a: np.ndarray,
    in_b: np.ndarray,
    *,
    exact: bool | None = None,
) -> np.ndarray:
    """Top-1 inner product of rows ``a`` against the rows where ``in_b``, from precomputed neighbours.

    ``neigh_*`` list each sample's nearest other samples in descending order; the first one in B is the
    maximum over B. Rows with none of their listed neighbours in B are searched exactly.
    """
    idx = neigh_idx[a]
    valid = idx >= 0
    hit = valid & in_b[np.where(valid, idx, 0)]
    found = hit.any(axis=1)
    first = hit.argmax(axis=1)
    out = neigh_sims[a, first].astype(np.float64)
    if not found.all():
        miss = a[~found]
        b = np.flatnonzero(in_b)
        sims, _ = knn(white[miss], white[b], 1, metric="ip", exact=exact)
        out[~found] = sims[:, 0]
    return out


@dataclass
class PaperScores:
    """Scores of a query set under :class:`PaperScorer` (Deo et al. 2026).

    Attributes
    ----------
    layers : list of str
        Layer names, in the column order of ``layer_similarity``.
    similarity : np.ndarray, shape (m,)
        Aggregated similarity ``s_j`` (geometric mean over layers); higher = more memorised.
    layer_similarity : np.ndarray, shape (m, L)
        Top-1 whitened cosine per layer.
    nearest : dict of str to np.ndarray, shape (m,)
        Per layer, the training index of the top-1 neighbour.
    neighbours, neighbour_sims : dict of str to np.ndarray, shape (m, top_k)
        Per layer, the top-k training indices and cosines (``top_k`` as requested; -1 / -inf padding
        when the training set is smaller).
    mi_z : np.ndarray, shape (m,)
        ``(s - mu0) / sigma0``; higher = more memorised.
    oni : np.ndarray, shape (m,)
        ``-tanh(mi_z)`` in [-1, 1]; lower = more memorised (-1 memorised, +1 novel).

    The dataset level (mean MI and ONI, the paper's rule) is :meth:`inspector.calibration.Calibration.verdict`.
    """

    layers: list[str]
    similarity: np.ndarray
    layer_similarity: np.ndarray
    nearest: dict[str, np.ndarray]
    neighbours: dict[str, np.ndarray]
    neighbour_sims: dict[str, np.ndarray]
    mi_z: np.ndarray
    oni: np.ndarray


class PaperScorer:
    """The memorisation index of Deo et al. 2026 (arXiv 2602.13066), as in DESIGN §2.

    1. Per layer, ZCA whitening fitted on the training features (:class:`Whitener` with
       ``method="zca"``), then L2 normalisation.
    2. Per layer, the top-1 cosine of each query against the whitened training set.
    3. Geometric mean over layers, ``exp(mean_k log(clip(s_k, clip_eps, 1) + eps))``
       (:func:`aggregate_layers`); clipping before the log is the one documented deviation: the paper's
       ``log(s + eps)`` is NaN for negative cosines.
    4. Null: ``n_bootstrap`` rounds, each splitting the training set into disjoint random halves
       (:func:`split_halves`: ``rng = default_rng(seed)``; per round ``perm = rng.permutation(n)``,
       ``A = perm[:n//2]``, ``B = perm[n//2:]``) and scoring A against B with the same whiteners and
       aggregation. ``mu0_`` is the mean of the pooled null, ``sigma0_ = sqrt(var + 1e-8)``.
    5. ``mi_z = (s - mu0)/sigma0``, ``oni = -tanh(mi_z)``; dataset level: the means, memorised when the
       mean ONI is below 0.68.

    The bootstrap never forms an ``n x n`` matrix: each training sample's 32 nearest other training
    samples are searched once per layer, and every round reads the first neighbour in B from that list
    (rows with none of them in B are searched exactly), so ``n = 10^4`` costs one top-32 search per layer.

    Parameters
    ----------
    eps : float
        Whitening ridge and aggregation epsilon (the paper's ``eps``).
    clip_eps : float
        Lower clip of per-layer cosines before the log.
    n_bootstrap : int
        Split-half rounds (the paper uses 10).
    seed : int
        Seed of the split-half bootstrap.
    exact : bool or None
        Passed to :func:`inspector.index.knn`: ``None`` searches exactly unless the search is very large
        (then an approximate index re-ranked exactly); ``True`` forces the exact search.

    Attributes
    ----------
    layers_ : list of str
    whiteners_ : dict of str to Whitener
    train_white_ : dict of str to np.ndarray, shape (n, C_k), float32
    null_ : np.ndarray, shape (n_bootstrap * (n // 2),)
        The pooled split-half null of aggregated similarities.
    null_rounds_ : np.ndarray, shape (n_bootstrap, n // 2)
    mu0_, sigma0_ : float
    n_train_ : int
    """

    #: The paper's universal dataset rule: memorised when the mean ONI is below this.
    ONI_THRESHOLD: float = PAPER_ONI_THRESHOLD

    def __init__(
        self,
        *,
        eps: float = 1e-5,
        clip_eps: float = 1e-6,
        n_bootstrap: int = 10,
        seed: int = 0,
        exact: bool | None = None,
    ) -> None:
        self.eps = eps
        self.clip_eps = clip_eps
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.exact = exact

    def _validate_params(self) -> None:
        if not (isinstance(self.n_bootstrap, int | np.integer) and self.n_bootstrap >= 1):
            raise ValueError(f"n_bootstrap must be an integer >= 1; got {self.n_bootstrap!r}.")
        if not self.eps > 0 or not self.clip_eps > 0:
            raise ValueError(f"eps and clip_eps must be > 0; got {self.eps!r}, {self.clip_eps!r}.")

    @staticmethod
    def _layers(layers: Mapping[str, ArrayLike], what: str) -> dict[str, np.ndarray]:
        if isinstance(layers, np.ndarray) or not isinstance(layers, Mapping):
            raise TypeError(f"{what} must be a dict {{layer name: (n, C) array}}; got {type(layers).__name__}.")
        if not layers:
            raise ValueError(f"{what} has no layers.")
        out = {str(k): np.asarray(v) for k, v in layers.items()}
        sizes = {k: v.shape[0] if v.ndim else -1 for k, v in out.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{what}: every layer must have the same number of rows; got {sizes}.")
        return out

    def fit(self, train_layers: Mapping[str, ArrayLike]) -> PaperScorer:
        """Fit the whiteners on the training features and compute the split-half null.

        Parameters
        ----------
        train_layers : dict of str to array-like, shape (n, C_k)
            Training features per layer (e.g. ``Features.layers``), same ``n`` for every layer, n >= 2.

        Returns
        -------
        PaperScorer
            ``self``.
        """
        self._validate_params()
        layers = self._layers(train_layers, "train_layers")
        self.layers_ = list(layers)
        self.whiteners_ = {}
        self.train_white_ = {}
        for name, x in layers.items():
            try:
                w = Whitener(method="zca", eps=self.eps).fit(x)
            except DegenerateInputError as e:
                raise DegenerateInputError(f"layer {name!r}: {e}") from e
            self.whiteners_[name] = w
            self.train_white_[name] = np.ascontiguousarray(w.transform(x))
        n = next(iter(self.train_white_.values())).shape[0]
        self.n_train_ = n
        self.null_rounds_ = self._bootstrap(n)
        self.null_ = self.null_rounds_.ravel()
        self.mu0_ = float(self.null_.mean())
        self.sigma0_ = math.sqrt(float(self.null_.var()) + PAPER_VAR_FLOOR)
        log.info("paper null: %d scores, mu0=%.4f sigma0=%.4f", self.null_.size, self.mu0_, self.sigma0_)
        return self

    def _bootstrap(self, n: int) -> np.ndarray:
        splits = split_halves(n, self.n_bootstrap, self.seed)
        k = min(_BOOTSTRAP_NEIGHBOURS, n - 1)
        own = np.arange(n)
        neigh = {}
        for name, white in self.train_white_.items():
            neigh[name] = knn(white, white, k, metric="ip", query_groups=own, base_groups=own, exact=self.exact)
        rounds = np.empty((len(splits), n // 2), dtype=np.float64)
        for r, (a, b) in enumerate(splits):
            in_b = np.zeros(n, dtype=bool)
            in_b[b] = True
            per_layer = np.stack(
                [
                    _top1_within_split(self.train_white_[name], *neigh[name], a, in_b, exact=self.exact)
                    for name in self.layers_
                ],
                axis=1,
            )
            rounds[r] = self._aggregate(per_layer)
        return rounds

    def _aggregate(self, per_layer: np.ndarray) -> np.ndarray:
        return aggregate_layers(per_layer, eps=self.eps, clip_eps=self.clip_eps)

    def _check_query(self, query_layers: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
        _check_fitted(self, "null_")
        layers = self._layers(query_layers, "query_layers")
        missing = [k for k in self.layers_ if k not in layers]
        extra = [k for k in layers if k not in self.layers_]
        if missing or extra:
            raise ValueError(
                f"query layers must match the fitted layers {self.layers_}; missing {missing}, unexpected {extra}."
            )
        return layers

    def _search(self, layers: dict[str, np.ndarray], k: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if k < 1:
            raise ValueError(f"top_k must be >= 1; got {k}.")
        neighbours, neighbour_sims = {}, {}
        for name in self.layers_:
            try:
                q = self.whiteners_[name].transform(layers[name])
            except (ValueError, TypeError) as e:
                raise type(e)(f"layer {name!r}: {e}") from e
            if q.shape[0] == 0:
                sims = np.empty((0, k), np.float32)
                idx = np.empty((0, k), np.int64)
            else:
                sims, idx = knn(q, self.train_white_[name], k, metric="ip", exact=self.exact)
                kk = sims.shape[1]
                if kk < k:
                    sims = np.pad(sims, ((0, 0), (0, k - kk)), constant_values=-np.inf)
                    idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
            neighbours[name] = np.asarray(idx, np.int64)
            neighbour_sims[name] = np.asarray(sims, np.float32)
        return neighbours, neighbour_sims

    def neighbours(
        self, query_layers: Mapping[str, ArrayLike], k: int = 5
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per layer, the ``k`` nearest training samples of each query in the whitened space.

        Parameters
        ----------
        query_layers : dict of str to array-like, shape (m, C_k)
        k : int

        Returns
        -------
        neighbours : dict of str to np.ndarray, shape (m, k), int64
            Training indices, most similar first (-1 padding when the training set has fewer than k).
        neighbour_sims : dict of str to np.ndarray, shape (m, k), float32
            Whitened cosines (-inf padding).
        """
        return self._search(self._check_query(query_layers), int(k))

    def score_samples(self, query_layers: Mapping[str, ArrayLike], *, top_k: int = 1) -> PaperScores:
        """Score query (synthetic) samples against the training set.

        Parameters
        ----------
        query_layers : dict of str to array-like, shape (m, C_k)
            The same layers (names and widths) as in ``fit``.
        top_k : int
            Neighbours per layer kept in the result for display and attribution.

        Returns
        -------
        PaperScores
            Higher ``similarity``/``mi_z``, lower ``oni`` = more memorised.
        """
        layers = self._check_query(query_layers)
        neighbours, neighbour_sims = self._search(layers, int(top_k))
        m = next(iter(layers.values())).shape[0]
        per_layer = np.empty((m, len(self.layers_)), dtype=np.float64)
        for j, name in enumerate(self.layers_):
            per_layer[:, j] = neighbour_sims[name][:, 0]
        s = self._aggregate(per_layer) if m else np.empty(0, np.float64)
        mi_z, oni = zscore_oni(s, self.null_)
        return PaperScores(
            layers=list(self.layers_),
            similarity=s,
            layer_similarity=per_layer,
            nearest={name: neighbours[name][:, 0].copy() for name in self.layers_},
            neighbours=neighbours,
            neighbour_sims=neighbour_sims,
            mi_z=mi_z,
            oni=oni,
        )
