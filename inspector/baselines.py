"""Baseline memorisation metrics from the literature, computed on the same features (or pixels).

* :func:`ct_score`: Meehan, Chaudhuri & Dasgupta 2020, "A non-parametric test to detect data-copying
  in generative models" (AISTATS): the ``C_T`` statistic. **Negative** = data copying (generated
  samples closer to the training set than held-out real samples are), about 0 = fine, positive =
  underfitting.
* :func:`auth_pct`: Alaa et al. 2022, "How faithful is your synthetic data?" (ICML): the authenticity
  of each generated sample and the percentage authentic. **Lower** AuthPct = more copying.
* :func:`dcr`: distance to the closest training record. **Smaller** = more
  memorised.
* :func:`pixel_correlation`: maximum Pearson correlation of raw pixels over the training images (and,
  optionally, over flipped or rotated views of the generated image). **Higher** = more memorised.

All functions take numpy arrays, check shapes and finiteness, and run the nearest-neighbour searches
through :func:`inspector.index.knn` (never an ``n x n`` matrix).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .index import knn
from .scores import DegenerateInputError, _as_2d, _l2_normalise
from .views import FLIPS, apply_view

__all__ = ["ct_score", "auth_pct", "dcr", "pixel_correlation", "nearest_distances", "baseline_space", "run_baselines"]

log = logging.getLogger(__name__)

_METRICS = ("l2", "cosine")
_CANDIDATES = 8  # neighbours re-scored exactly in float64 after the float32 search
_ROWS = 8192  # rows per block of baseline_space's standardisation
_RESCORE_BUDGET = 2**21  # float64 values (16 MB) per block of the exact re-scoring of nearest_distances


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}; got {metric!r}.")


def _same_width(**arrays: np.ndarray) -> None:
    widths = {k: v.shape[1] for k, v in arrays.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"feature widths differ: {widths}; use features of the same layer and extractor.")


def nearest_distances(
    query: ArrayLike, base: ArrayLike, *, metric: str = "l2", exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query row to its nearest base row, and that row's index.

    The search runs in float32 through :func:`inspector.index.knn` (L2 as an inner product on augmented
    vectors ``[x, 1]`` · ``[t, -|t|^2/2]`` after centring on the base mean); the best
    ``min(8, n)`` candidates are then re-scored exactly in float64, so near-zero distances (copies) are
    exact.

    Parameters
    ----------
    query : array-like, shape (m, d)
    base : array-like, shape (n, d)
    metric : {"l2", "cosine"}
        Euclidean distance, or cosine distance ``1 - cos`` (a zero row has cosine 0 with everything).
    exclude_self : bool
        ``query`` is ``base`` and row ``i`` must not match itself (its duplicates still may).

    Returns
    -------
    dist : np.ndarray, shape (m,), float64
    idx : np.ndarray, shape (m,), int64
    """
    _check_metric(metric)
    q = _as_2d(query, "query", min_rows=0)
    b = _as_2d(base, "base", min_rows=2 if exclude_self else 1)
    _same_width(query=q, base=b)
    if exclude_self and q.shape != b.shape:
        raise ValueError(f"exclude_self needs query and base to be the same array; got {q.shape} and {b.shape}.")
    m, n = q.shape[0], b.shape[0]
    if m == 0:
        return np.empty(0, np.float64), np.empty(0, np.int64)
    groups = {"query_groups": np.arange(n), "base_groups": np.arange(n)} if exclude_self else {}
    k = min(_CANDIDATES, n - 1 if exclude_self else n)
    dist = np.empty(m, np.float64)
    nearest = np.empty(m, np.int64)
    if metric == "cosine":
        bn = _l2_normalise(b)
        qn = bn if q is b else _l2_normalise(q)
        _, idx = knn(qn.astype(np.float32), bn.astype(np.float32), k, metric="ip", **groups)
        qs, bs = qn, bn
    else:
        mu = b.mean(axis=0)
        bs = b - mu
        qs = bs if q is b else q - mu  # AuthPct's training-vs-training pass: one centred copy, not two
        qa = np.hstack([qs, np.ones((m, 1))]).astype(np.float32)
        ba = np.hstack([bs, -0.5 * (bs * bs).sum(axis=1, keepdims=True)]).astype(np.float32)
        _, idx = knn(qa, ba, k, metric="ip", **groups)
        del qa, ba
    # The exact float64 re-scoring, a block of query rows at a time: (rows, k, d) never grows with m.
    step = max(1, _RESCORE_BUDGET // max(1, k * q.shape[1]))
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        valid = idx[lo:hi] >= 0
        safe = np.where(valid, idx[lo:hi], 0)
        if metric == "cosine":
            d = 1.0 - np.einsum("md,mkd->mk", qs[lo:hi], bs[safe])
        else:
            d = np.sqrt(((qs[lo:hi, None, :] - bs[safe]) ** 2).sum(axis=2))
        d = np.where(valid, d, np.inf)
        best = d.argmin(axis=1)
        rows = np.arange(hi - lo)
        dist[lo:hi] = d[rows, best]
        nearest[lo:hi] = safe[rows, best]
    return dist, nearest


# ---------------------------------------------------------------------------------------------- Meehan 2020
def _z_u(gen_d: np.ndarray, test_d: np.ndarray) -> float:
    """Z-scored Mann–Whitney U of generated vs test distances (Meehan et al.; continuity-corrected).

    ``U = #{(q, p): d_q > d_p} + 0.5 #{ties}`` over generated ``q`` and test ``p``;
    ``Z = (U - (m n / 2 - 0.5)) / sqrt(m n (m + n + 1) / 12)``, as in the authors' released code.
    """
    from scipy.stats import rankdata

    m, n = gen_d.size, test_d.size
    ranks = rankdata(np.concatenate([gen_d, test_d]))
    u = ranks[:m].sum() - m * (m + 1) / 2.0
    mean = m * n / 2.0 - 0.5
    std = math.sqrt(m * n * (m + n + 1) / 12.0)
    return float((u - mean) / std)


def ct_score(
    train: ArrayLike,
    test: ArrayLike,
    gen: ArrayLike,
    *,
    n_cells: int | None = None,
    tau: float | None = None,
    seed: int = 0,
    metric: str = "l2",
    n_init: int = 4,
) -> dict[str, Any]:
    """Meehan et al. 2020 data-copying test statistic ``C_T``.

    The training features are partitioned into ``n_cells`` k-means cells; each test (held-out real)
    and generated sample is assigned to its nearest centroid. In each cell ``pi``, the distances of
    generated and of test samples to their nearest *training sample in the same cell* are compared by
    the Mann–Whitney U statistic, Z-scored under the null (see :func:`_z_u`). Cells whose share of the
    generated samples is not above ``tau`` are skipped; the kept cells are averaged with weights equal
    to their share of the **test** samples (the paper's ``C_T = sum P_n(pi) Z_U(pi) / sum P_n(pi)``
    over ``Pi_tau``, as in the released code; cells without test samples have weight 0).

    Parameters
    ----------
    train : array-like, shape (n, d)
        Training features.
    test : array-like, shape (t, d)
        Held-out real features (the holdout H), never seen by the generative model.
    gen : array-like, shape (m, d)
        Generated features.
    n_cells : int, optional
        Number of k-means cells; default ``max(1, min(50, m // 40, t // 20, n // 2))``, so a cell holds
        on average 40 generated samples (the released code's ``tau`` asks for more than 20).
    tau : float, optional
        Minimum share of generated samples for a cell to count; default ``20 / m`` (released code).
    seed : int
        k-means seed.
    metric : {"l2", "cosine"}
        Distance (the paper uses Euclidean).
    n_init : int
        k-means restarts.

    Returns
    -------
    dict
        ``ct_score`` (float; negative = copying), ``n_cells``, ``tau``, ``n_cells_used``, and per cell
        (arrays of shape (n_cells,)): ``cell_z`` (0 where skipped), ``cell_used`` (bool),
        ``cell_test_fraction``, ``cell_gen_fraction``; and the cell labels ``train_cells`` (n,),
        ``test_cells`` (t,), ``gen_cells`` (m,).

    Raises
    ------
    DegenerateInputError
        When no cell holds enough generated samples (reduce ``n_cells`` or ``tau``, or generate more).
    """
    from sklearn.cluster import KMeans

    _check_metric(metric)
    tr = _as_2d(train, "train", min_rows=2)
    te = _as_2d(test, "test", min_rows=1)
    ge = _as_2d(gen, "gen", min_rows=1)
    _same_width(train=tr, test=te, gen=ge)
    n, t, m = tr.shape[0], te.shape[0], ge.shape[0]
    k = max(1, min(50, m // 40, t // 20, n // 2)) if n_cells is None else int(n_cells)
    if not 1 <= k <= n:
        raise ValueError(f"n_cells must be in [1, n_train={n}]; got {n_cells!r}.")
    tau_ = 20.0 / m if tau is None else float(tau)
    if not (0.0 <= tau_ and math.isfinite(tau_)):
        raise ValueError(f"tau must be a finite share >= 0; got {tau!r}.")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(tr)
    tr_c = km.labels_.astype(np.int64)
    te_c = km.predict(te).astype(np.int64)
    ge_c = km.predict(ge).astype(np.int64)
    test_frac = np.bincount(te_c, minlength=k) / t
    gen_frac = np.bincount(ge_c, minlength=k) / m
    cell_z = np.zeros(k, np.float64)
    used = np.zeros(k, bool)
    for c in range(k):
        if not gen_frac[c] > tau_ or test_frac[c] == 0:
            continue
        in_train = tr[tr_c == c]
        if in_train.shape[0] == 0:
            continue
        d_gen, _ = nearest_distances(ge[ge_c == c], in_train, metric=metric)
        d_test, _ = nearest_distances(te[te_c == c], in_train, metric=metric)
        cell_z[c] = _z_u(d_gen, d_test)
        used[c] = True
    if not used.any():
        raise DegenerateInputError(
            f"CT-score: no k-means cell has more than tau={tau_:.3g} of the {m} generated samples and a test "
            f"sample (n_cells={k}); use fewer cells, a smaller tau, or more generated/test samples."
        )
    w = test_frac[used]
    ct = float(np.dot(w, cell_z[used]) / w.sum())
    return {
        "ct_score": ct,
        "n_cells": k,
        "tau": tau_,
        "n_cells_used": int(used.sum()),
        "cell_z": cell_z,
        "cell_used": used,
        "cell_test_fraction": test_frac,
        "cell_gen_fraction": gen_frac,
        "train_cells": tr_c,
        "test_cells": te_c,
        "gen_cells": ge_c,
    }


# ---------------------------------------------------------------------------------------------- Alaa 2022
def auth_pct(train: ArrayLike, gen: ArrayLike, *, metric: str = "l2") -> dict[str, Any]:
    """Alaa et al. 2022 authenticity of each generated sample, and the percentage authentic.

    For a generated sample ``g`` with nearest training sample ``i* = argmin_i d(g, t_i)``, let
    ``r_{i*}`` be the distance from ``t_{i*}`` to *its own* nearest other training sample. ``g`` is
    authentic when ``d(g, t_{i*}) > r_{i*}`` and unauthentic otherwise (ties count as unauthentic, as in
    the reference implementation, so an exact copy of a training image that is duplicated in the
    training set is still caught).

    Parameters
    ----------
    train : array-like, shape (n, d), n >= 2
    gen : array-like, shape (m, d)
    metric : {"l2", "cosine"}

    Returns
    -------
    dict
        ``authentic`` bool (m,), ``auth_pct`` float in [0, 100] (lower = more copying),
        ``nearest_train`` int64 (m,), ``gen_distance`` (m,) = ``d(g, t_{i*})``,
        ``train_nn_distance`` (m,) = ``r_{i*}``.
    """
    tr = _as_2d(train, "train", min_rows=2)
    ge = _as_2d(gen, "gen", min_rows=1)
    _same_width(train=tr, gen=ge)
    r, _ = nearest_distances(tr, tr, metric=metric, exclude_self=True)
    d, idx = nearest_distances(ge, tr, metric=metric)
    r_star = r[idx]
    authentic = d > r_star
    return {
        "authentic": authentic,
        "auth_pct": float(100.0 * authentic.mean()),
        "nearest_train": idx,
        "gen_distance": d,
        "train_nn_distance": r_star,
    }


# ---------------------------------------------------------------------------------------------- DCR
def dcr(
    train: ArrayLike, gen: ArrayLike, *, metric: str = "l2", return_index: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Distance to closest record: each generated sample's distance to its nearest training sample.

    Parameters
    ----------
    train : array-like, shape (n, d)
    gen : array-like, shape (m, d)
    metric : {"l2", "cosine"}
    return_index : bool
        Also return the index of the closest training record.

    Returns
    -------
    np.ndarray, shape (m,), float64
        Smaller = more memorised (0 = exact copy). With ``return_index``, ``(distances, indices)``.
    """
    tr = _as_2d(train, "train", min_rows=1)
    ge = _as_2d(gen, "gen", min_rows=0)
    d, idx = nearest_distances(ge, tr, metric=metric)
    return (d, idx) if return_index else d


# ---------------------------------------------------------------------------------------------- pixels
def _centred_unit_rows(images: np.ndarray) -> np.ndarray:
    """Flattened images centred and scaled to unit norm; constant images become all-zero rows."""
    flat = images.reshape(images.shape[0], -1).astype(np.float64)
    constant = np.ptp(flat, axis=1) == 0
    flat = flat - flat.mean(axis=1, keepdims=True)
    flat[constant] = 0.0
    return _l2_normalise(flat).astype(np.float32)


def pixel_correlation(
    train_images: ArrayLike,
    gen_images: ArrayLike,
    views: Sequence[str] = ("id",),
    *,
    return_index: bool = False,
    size: int | None = None,
    chunk: int = 4096,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Maximum Pearson correlation of raw pixels between each generated image and the training images.

    Each generated image is compared, in each of ``views`` (``id``, ``hflip``, ``vflip``, ``hvflip`` or
    ``rot<deg>``), with every training image as given; the maximum over training images and views is
    returned. A constant image (zero variance) has correlation 0 with everything.

    The training images are read ``chunk`` rows at a time (a memory-mapped slice store is never copied whole,
    and its pages are released after each chunk), each chunk resized to ``size`` when given; the result is the
    same as on the whole stack at once.

    Parameters
    ----------
    train_images : array-like, shape (n, H, W)
        An array or a row-indexable memory map.
    gen_images : array-like, shape (m, H, W)
    views : sequence of str
    return_index : bool
        Also return the index of the best-correlated training image.
    size : int, optional
        Resize both sets to ``size x size`` (:func:`inspector.preprocess.resize_square`) first.
    chunk : int
        Training rows per chunk (>= 1).

    Returns
    -------
    np.ndarray, shape (m,), float64 in [-1, 1]
        Higher = more memorised (1 = identical up to brightness and contrast). With ``return_index``,
        ``(correlations, indices)``.
    """
    from .preprocess import resize_square
    from .store import release_pages

    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1 training rows; got {chunk}.")
    tr = (
        train_images
        if hasattr(train_images, "shape") and hasattr(train_images, "__getitem__")
        else np.asarray(train_images)
    )
    ge = np.asarray(gen_images)
    if size is not None and ge.ndim == 3:
        ge = resize_square(ge, int(size))
    for name, a in (("train_images", tr), ("gen_images", ge)):
        if len(a.shape) != 3:
            raise ValueError(f"{name} must have shape (n, H, W); got {tuple(a.shape)}.")
    if not np.isfinite(ge).all():
        raise DegenerateInputError("gen_images contains NaN or Inf pixels.")
    n = int(tr.shape[0])
    if n == 0:
        raise DegenerateInputError("train_images is empty.")
    t_shape = (int(size), int(size)) if size is not None else tuple(tr.shape[1:])
    if t_shape != ge.shape[1:]:
        raise ValueError(f"image sizes differ: train {t_shape} vs generated {ge.shape[1:]}; resize both to one size.")
    views = tuple(views)
    if not views:
        raise ValueError("views must name at least one view, e.g. ('id',).")
    m = ge.shape[0]
    best = np.full(m, -np.inf)
    best_idx = np.full(m, -1, np.int64)
    if m == 0:
        return (best, best_idx) if return_index else best
    for view in views:
        if view.startswith("rot") and ge.shape[1] != ge.shape[2]:
            raise ValueError(f"rotated views need square images; got {ge.shape[1:]}.")
    queries = [_centred_unit_rows(apply_view(ge, view)) for view in views]
    for lo in range(0, n, int(chunk)):
        part = np.asarray(tr[lo : lo + int(chunk)], np.float32)
        release_pages(tr)
        if not np.isfinite(part).all():
            raise DegenerateInputError("train_images contains NaN or Inf pixels.")
        if size is not None:
            part = resize_square(part, int(size))
        base = _centred_unit_rows(part)
        del part
        for q in queries:
            sims, idx = knn(q, base, 1, metric="ip")
            better = sims[:, 0] > best
            best[better] = sims[better, 0]
            best_idx[better] = idx[better, 0] + lo
    best = np.clip(best, -1.0, 1.0)
    return (best, best_idx) if return_index else best


# ---------------------------------------------------------------------------------------------- the audit's runner
def baseline_space(train_layers: Mapping[str, ArrayLike], *others: Mapping[str, ArrayLike]) -> list[np.ndarray]:
    """The baselines' feature space: per layer standardised (training mean and std), L2-normalised, scaled by
    ``1/sqrt(L)`` and concatenated.

    Parameters
    ----------
    train_layers : mapping of str to array-like, shape (n, C_layer)
        The training set's identity-view features.
    *others : mapping of str to array-like, shape (m_i, C_layer)
        Other sets' features (same layers).

    Returns
    -------
    list of np.ndarray, float32
        ``[train (n, D), *others (m_i, D)]`` with ``D = sum of C_layer``.
    """
    sets = [train_layers, *others]
    layers = list(train_layers)
    widths = [int(np.shape(train_layers[layer])[1]) for layer in layers]
    # written into each set's float32 matrix a layer and a block of rows at a time: no float64 copy of a set
    out = [np.empty((int(np.shape(f[layers[0]])[0]), sum(widths)), np.float32) for f in sets]
    col = 0
    for layer, width in zip(layers, widths, strict=True):
        x = np.asarray(train_layers[layer], np.float64)
        mu, sd = x.mean(0), x.std(0) + 1e-8
        del x
        for i, f in enumerate(sets):
            a = f[layer]
            for lo in range(0, out[i].shape[0], _ROWS):
                z = (np.asarray(a[lo : lo + _ROWS], np.float64) - mu) / sd
                z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
                out[i][lo : lo + _ROWS, col : col + width] = z / np.sqrt(len(layers))
        col += width
    return out


def run_baselines(
    train_layers: Mapping[str, ArrayLike],
    synthetic_layers: Mapping[str, ArrayLike],
    holdout_layers: Mapping[str, ArrayLike] | None,
    train_images: np.ndarray,
    synthetic_images: np.ndarray,
    *,
    pixel_size: int = 64,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """CT-score, AuthPct, distance to closest record and raw-pixel correlation on the audit's inputs.

    A failing baseline never breaks the audit: its error is reported in the summary instead.

    Parameters
    ----------
    train_layers, synthetic_layers, holdout_layers : mapping of str to array, shapes (n, C), (m, C), (h, C)
        Identity-view features (``holdout_layers`` may be None: no CT-score then).
    train_images, synthetic_images : np.ndarray, shapes (n, H, W), (m, H, W)
    pixel_size : int
        Resolution of the raw-pixel correlation (the registration's working size).
    seed : int
        Seed of the CT-score's k-means.

    Returns
    -------
    columns : dict of str to np.ndarray, shape (m,)
        Per synthetic slice: ``dcr``, ``authentic`` (0/1), ``pixel_corr`` (those that ran).
    summary : dict
        ``dcr_median``, ``auth_pct``, ``ct_score``, ``ct_cells``, ``pixel_corr_median`` (or ``<name>_error``).
    """
    cols: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {}
    spaces = baseline_space(train_layers, synthetic_layers, *([holdout_layers] if holdout_layers is not None else []))
    xt, xg = spaces[0], spaces[1]
    try:
        d = dcr(xt, xg)
        cols["dcr"] = np.asarray(d["distances"] if isinstance(d, dict) else d)
        out["dcr_median"] = float(np.median(cols["dcr"]))
    except Exception as e:  # noqa: BLE001 - a baseline never breaks the audit
        out["dcr_error"] = f"{type(e).__name__}: {e}"
    try:
        a = auth_pct(xt, xg)
        cols["authentic"] = np.asarray(a["authentic"], bool).astype(int)
        out["auth_pct"] = float(a["auth_pct"])
    except Exception as e:  # noqa: BLE001
        out["auth_pct_error"] = f"{type(e).__name__}: {e}"
    if holdout_layers is not None:
        try:
            m, t = len(xg), len(spaces[2])
            # Meehan's rule wants > 20 generated samples per cell; small sets get fewer cells and a looser
            # tau (reported), rather than no CT-score at all.
            n_cells = max(1, min(20, m // 40, t // 10))
            tau = min(20.0 / m, 0.5 / n_cells)
            ct = ct_score(xt, spaces[2], xg, n_cells=n_cells, tau=tau, seed=seed)
            out["ct_score"] = float(ct["ct_score"])
            out["ct_cells"] = int(ct.get("n_cells_used", n_cells))
            if tau < 20.0 / m:
                out["ct_note"] = f"only {m} synthetic slices: CT-score over {n_cells} cell(s) with tau = {tau:.3f}"
        except Exception as e:  # noqa: BLE001
            out["ct_score_error"] = f"{type(e).__name__}: {e}"
    else:
        out["ct_score_error"] = "CT-score needs a holdout (test) set of real scans"
    try:
        cols["pixel_corr"] = pixel_correlation(
            train_images, synthetic_images, views=tuple(v.value for v in FLIPS), size=pixel_size
        )
        out["pixel_corr_median"] = float(np.median(cols["pixel_corr"]))
    except Exception as e:  # noqa: BLE001
        out["pixel_corr_error"] = f"{type(e).__name__}: {e}"
    return cols, out
