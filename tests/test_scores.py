"""Whitening, the paper's MI/ONI and the calibration functions, against slow references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.exceptions import NotFittedError

from inspector import scores as scores_mod
from inspector.calibration import Calibration, wilson_interval
from inspector.scores import (
    PAPER_ONI_THRESHOLD,
    DegenerateInputError,
    PaperScorer,
    Whitener,
    aggregate_layers,
    benjamini_hochberg,
    calibrated_mi,
    empirical_p_values,
    mann_whitney_auc,
    min_null_size,
    min_p_value,
    null_too_small,
    split_halves,
    zscore_oni,
)

DIMS = {"block3": 6, "block7": 10, "block11": 8}


# ---------------------------------------------------------------------------------------------- data
def _layer_features(rng: np.random.Generator, n: int, dims: dict[str, int] = DIMS, mixing=None):
    """Correlated Gaussian features per layer (a fixed random mixing per layer, so whitening matters)."""
    if mixing is None:
        mixing = {k: (rng.normal(size=(d, d)) + 2 * np.eye(d), rng.normal(size=d) * 3) for k, d in dims.items()}
    feats = {k: rng.normal(size=(n, a.shape[0])) @ a + b for k, (a, b) in mixing.items()}
    return feats, mixing


# ---------------------------------------------------------------------------------------------- references
def ref_zca(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and W = (C + eps I)^(-1/2) with the unbiased covariance, via a matrix fractional power."""
    mu = x.mean(axis=0)
    xc = x - mu
    c = xc.T @ xc / (x.shape[0] - 1)
    w = scipy.linalg.fractional_matrix_power(c + eps * np.eye(c.shape[0]), -0.5)
    return mu, np.real(w)


def ref_whiten(x: np.ndarray, mu: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = (x - mu) @ w
    out = np.zeros_like(z)
    for i in range(z.shape[0]):
        nrm = math.sqrt(float(np.dot(z[i], z[i])))
        if nrm > 0:
            out[i] = z[i] / nrm
    return out


def ref_top1(q: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Explicit loops: the best cosine and its index (q and t already unit-norm)."""
    best = np.full(q.shape[0], -np.inf)
    arg = np.full(q.shape[0], -1)
    for j in range(q.shape[0]):
        for i in range(t.shape[0]):
            c = float(np.dot(q[j], t[i]))
            if c > best[j]:
                best[j], arg[j] = c, i
    return best, arg


def ref_geomean(per_layer: np.ndarray, eps: float, clip_eps: float) -> np.ndarray:
    out = np.empty(per_layer.shape[0])
    for j, row in enumerate(per_layer):
        logs = [math.log(min(max(v, clip_eps), 1.0) + eps) for v in row]
        out[j] = math.exp(sum(logs) / len(logs))
    return out


def ref_paper(train: dict, query: dict, *, eps=1e-5, clip_eps=1e-6, n_bootstrap=10, seed=0) -> dict:
    """The paper's method with explicit loops, sharing nothing with the library but the split procedure."""
    white_t, white_q = {}, {}
    for k in train:
        mu, w = ref_zca(train[k], eps)
        white_t[k] = ref_whiten(train[k], mu, w)
        white_q[k] = ref_whiten(query[k], mu, w)
    layers = list(train)
    n = train[layers[0]].shape[0]
    per_layer = np.empty((query[layers[0]].shape[0], len(layers)))
    nearest = {}
    for j, k in enumerate(layers):
        per_layer[:, j], nearest[k] = ref_top1(white_q[k], white_t[k])
    s = ref_geomean(per_layer, eps, clip_eps)
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(n_bootstrap):
        perm = rng.permutation(n)
        a, b = perm[: n // 2], perm[n // 2 :]
        pl = np.stack([ref_top1(white_t[k][a], white_t[k][b])[0] for k in layers], axis=1)
        null.extend(ref_geomean(pl, eps, clip_eps))
    null = np.asarray(null)
    mu0 = null.mean()
    sigma0 = math.sqrt(((null - mu0) ** 2).mean() + 1e-8)
    mi = (s - mu0) / sigma0
    return {
        "s": s,
        "per_layer": per_layer,
        "nearest": nearest,
        "null": null,
        "mu0": mu0,
        "sigma0": sigma0,
        "mi": mi,
        "oni": -np.tanh(mi),
    }


# ---------------------------------------------------------------------------------------------- Whitener
def test_whitener_zca_matches_reference():
    rng = np.random.default_rng(0)
    feats, _ = _layer_features(rng, 50)
    x = feats["block7"]
    q = rng.normal(size=(7, x.shape[1])) * 2
    w = Whitener(method="zca", eps=1e-5).fit(x)
    mu, wr = ref_zca(x, 1e-5)
    assert_allclose(w.mean_, mu, rtol=1e-10)
    assert_allclose(w.whitening_, wr, rtol=1e-6, atol=1e-8)
    out = w.transform(q)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert_allclose(out, ref_whiten(q, mu, wr), atol=2e-6)
    assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    # before normalisation the training features are white: covariance = C (C + eps I)^-1 ~ I
    z = (x - w.mean_) @ w.whitening_
    assert_allclose(z.T @ z / (x.shape[0] - 1), np.eye(x.shape[1]), atol=1e-3)


def test_whitener_shrinkage_matches_ledoit_wolf_and_fixed_shrinkage():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 30)) @ rng.normal(size=(30, 30))  # fewer samples than dimensions
    q = rng.normal(size=(5, 30))
    lw = LedoitWolf().fit(x)
    w = Whitener(method="shrinkage", eps=1e-5).fit(x)
    assert w.shrinkage_ == pytest.approx(lw.shrinkage_, rel=1e-9)
    wr = np.real(scipy.linalg.fractional_matrix_power(lw.covariance_ + 1e-5 * np.eye(30), -0.5))
    assert_allclose(w.whitening_, wr, rtol=1e-6, atol=1e-9)
    assert_allclose(w.transform(q), ref_whiten(q, x.mean(0), wr), atol=2e-6)
    # a fixed coefficient: (1 - a) S + a tr(S)/d I with the maximum-likelihood S
    a = 0.3
    xc = x - x.mean(0)
    s = xc.T @ xc / x.shape[0]
    c = (1 - a) * s + a * np.trace(s) / 30 * np.eye(30)
    wr = np.real(scipy.linalg.fractional_matrix_power(c + 1e-5 * np.eye(30), -0.5))
    wf = Whitener(method="shrinkage", shrinkage=a).fit(x)
    assert wf.shrinkage_ == a
    assert_allclose(wf.whitening_, wr, rtol=1e-6, atol=1e-9)


def test_shrinkage_stays_informative_when_fewer_samples_than_dimensions():
    """n < d: ZCA maps T to a regular simplex and collapses noisy copies; shrinkage keeps both informative."""
    from inspector.index import knn

    rng = np.random.default_rng(2)
    n, d = 40, 96
    x = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) / math.sqrt(d)) + rng.normal(size=d)
    noisy = x + 0.05 * x.std(axis=0) * rng.normal(size=x.shape)
    own = np.arange(n)
    res = {}
    for method in ("zca", "shrinkage"):
        w = Whitener(method=method).fit(x)
        t, q = w.transform(x), w.transform(noisy)
        assert np.isfinite(q).all()
        copy_sim, idx = knn(q, t, 1, metric="ip")
        null_sim, _ = knn(t, t, 1, metric="ip", query_groups=own, base_groups=own)
        assert_array_equal(idx[:, 0], own)  # ranking survives in both
        res[method] = (copy_sim[:, 0], null_sim[:, 0])
    copy_z, null_z = res["zca"]
    assert_allclose(null_z, -1.0 / (n - 1), atol=1e-4)  # every training pair at the same cosine: no null left
    assert np.median(copy_z) < 0.5  # a copy with 5 % noise no longer looks like a copy
    copy_s, null_s = res["shrinkage"]
    assert copy_s.min() > 0.9 and copy_s.min() > null_s.max()
    assert null_s.std() > 0.01


def test_whitener_zero_norm_rows_and_errors():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5))
    w = Whitener(method="zca").fit(x)
    out = w.transform(np.vstack([x.mean(0), x[0]]))
    assert np.isfinite(out).all()
    assert_array_equal(out[0], 0.0)  # the training mean whitens to zero: cosine 0 with everything
    with pytest.raises(NotFittedError):
        Whitener().transform(x)
    with pytest.raises(DegenerateInputError, match="at least 2"):
        Whitener().fit(x[:1])
    with pytest.raises(DegenerateInputError, match="constant"):
        Whitener().fit(np.ones((10, 5)))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DegenerateInputError, match="NaN"):
        Whitener().fit(bad)
    with pytest.raises(DegenerateInputError, match="NaN"):
        w.transform(bad)
    with pytest.raises(ValueError, match="columns"):
        w.transform(x[:, :4])
    with pytest.raises(ValueError, match="2-D"):
        Whitener().fit(x[0])
    with pytest.raises(ValueError, match="method"):
        Whitener(method="pca").fit(x)
    with pytest.raises(ValueError, match="eps"):
        Whitener(eps=0).fit(x)
    with pytest.raises(ValueError, match="shrinkage"):
        Whitener(shrinkage=1.5).fit(x)
    # a constant column among varying ones is fine (dead units happen)
    x2 = x.copy()
    x2[:, 1] = 4.0
    assert np.isfinite(Whitener(method="zca").fit(x2).transform(x2)).all()


# ---------------------------------------------------------------------------------------------- streamed whitening
def ref_whitener_gram(x: np.ndarray, method: str, shrinkage, eps: float):
    """The pre-streaming ``Whitener.fit``: Ledoit–Wolf through the n x n Gram matrix, SVD when n < d.

    Returns ``(mean, W, a, eigenvalues)``.
    """
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    if method == "zca":
        a, denom = 0.0, n - 1
    elif shrinkage == "ledoit-wolf":
        row_sq = np.einsum("ij,ij->i", xc, xc)
        trace = row_sq.sum() / n
        mu = trace / d
        gram = xc @ xc.T
        delta_ = float((gram**2).sum()) / n**2
        beta = (float((row_sq**2).sum()) / n - delta_) / (d * n)
        delta = (delta_ - 2.0 * mu * trace + d * mu**2) / d
        beta = min(beta, delta)
        a, denom = (0.0 if beta == 0 else beta / delta), n
    else:
        a, denom = float(shrinkage), n
    if n < d:
        _, sv, vt = np.linalg.svd(xc, full_matrices=False)
        iso = a * float((sv**2).sum() / n / d)
        comp = np.clip((1 - a) * sv**2 / denom + iso, 0, None)
        w = (vt.T * (1 / np.sqrt(comp + eps) - 1 / np.sqrt(iso + eps))) @ vt + np.eye(d) / np.sqrt(iso + eps)
        evals = np.sort(np.concatenate([comp, np.full(d - n, iso)]))
    else:
        s = xc.T @ xc
        cov = (1 - a) * s / denom + a * np.trace(s / n) / d * np.eye(d)
        evals, v = np.linalg.eigh(0.5 * (cov + cov.T))
        evals = np.clip(evals, 0, None)
        w = (v / np.sqrt(evals + eps)) @ v.T
    return mean, w, a, evals


def _assert_same_whitener(w: Whitener, other: Whitener, rtol: float = 1e-9, atol: float = 1e-10) -> None:
    assert w.n_samples_fit_ == other.n_samples_fit_ and w.n_features_in_ == other.n_features_in_
    assert w.shrinkage_ == pytest.approx(other.shrinkage_, rel=rtol, abs=1e-15)
    assert_allclose(w.mean_, other.mean_, rtol=rtol, atol=atol)
    assert_allclose(w.eigenvalues_, other.eigenvalues_, rtol=rtol, atol=atol)
    assert_allclose(w.whitening_, other.whitening_, rtol=rtol, atol=atol * 1e3)


SETTINGS = [("zca", "ledoit-wolf"), ("shrinkage", "ledoit-wolf"), ("shrinkage", 0.3)]


@pytest.mark.parametrize("shape", [(2, 10), (20, 30), (30, 30), (200, 30), (3, 2)])
@pytest.mark.parametrize(("method", "shrinkage"), SETTINGS)
def test_streamed_whitener_equals_gram_implementation(shape, method, shrinkage, monkeypatch):
    """n < d, n = d, n > d and n = 2: same mean, W, coefficient and eigenvalues as the n x n Gram version."""
    n, d = shape
    rng = np.random.default_rng(n * 100 + d)
    x = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) + np.eye(d)) + rng.normal(size=d) * 5
    q = rng.normal(size=(4, d)) * 2
    mu, wr, a, evals = ref_whitener_gram(x, method, shrinkage, 1e-5)
    for chunk in (4096, 3):  # one block, and blocks merged pairwise
        monkeypatch.setattr(scores_mod, "_FIT_CHUNK_ROWS", chunk)
        w = Whitener(method=method, shrinkage=shrinkage, eps=1e-5).fit(x)
        assert w.shrinkage_ == pytest.approx(a, rel=1e-9, abs=1e-14)
        assert_allclose(w.mean_, mu, rtol=1e-10, atol=1e-12)
        assert_allclose(w.whitening_, wr, rtol=1e-6, atol=1e-8)
        assert_allclose(w.eigenvalues_, evals, rtol=1e-6, atol=1e-8)
        assert_allclose(w.transform(q), ref_whiten(q, mu, wr), atol=2e-6)
        r = min(n, d) if n < d else d
        assert w.components_.shape == (d, r) and w.component_scale_.shape == (r,)


@pytest.mark.parametrize(("method", "shrinkage"), SETTINGS)
def test_partial_fit_over_uneven_chunks_equals_fit(method, shrinkage, monkeypatch):
    rng = np.random.default_rng(31)
    x = rng.normal(size=(100, 30)) @ rng.normal(size=(30, 30)) + 50.0
    monkeypatch.setattr(scores_mod, "_FIT_CHUNK_ROWS", 4)  # chunks larger than a block are split again
    w = Whitener(method=method, shrinkage=shrinkage)
    bounds = np.cumsum([0, 1, 2, 5, 0, 13, 37, 42])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        assert w.partial_fit(x[lo:hi].astype(np.float32) if lo == 3 else x[lo:hi]) is w
    x[3:8] = x[3:8].astype(np.float32)  # the float32 chunk, as fit sees it
    full = Whitener(method=method, shrinkage=shrinkage).fit(x)
    _assert_same_whitener(w, full)
    assert_allclose(w.transform(x[:5]), full.transform(x[:5]), atol=1e-6)


def test_partial_fit_is_lazy_resumable_and_finalize_explicit():
    rng = np.random.default_rng(32)
    x = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8))
    w = Whitener().partial_fit(x[:20]).partial_fit(x[20:40])
    assert "components_" not in vars(w)  # nothing solved yet
    assert not hasattr(Whitener(), "mean_") and not hasattr(w, "no_such_attribute_")
    import pickle

    _assert_same_whitener(pickle.loads(pickle.dumps(w)), Whitener().fit(x[:40]))  # a pending fit pickles
    assert_allclose(w.mean_, x[:40].mean(0), rtol=1e-12)  # reading an attribute finishes the fit
    _assert_same_whitener(w, Whitener().fit(x[:40]))
    w.partial_fit(x[40:])  # more rows after a finished fit keep adding to it
    assert "mean_" not in vars(w)
    assert_allclose(w.transform(x), Whitener().fit(x).transform(x), atol=1e-6)
    assert w.finalize() is w and w.n_samples_fit_ == 60
    # fit starts over
    w.fit(x[:10])
    _assert_same_whitener(w, Whitener().fit(x[:10]))
    # the sklearn shrinkage coefficient of the uncentred data, streamed
    from sklearn.covariance import ledoit_wolf_shrinkage as sk_lw

    assert w.shrinkage_ == pytest.approx(sk_lw(x[:10]), rel=1e-9)


def test_streamed_fit_keeps_precision_under_a_large_offset(monkeypatch):
    """Pairwise-centred moments: a 1e6 common offset costs nothing (raw S/n - mu mu^T would lose ~12 digits)."""
    rng = np.random.default_rng(33)
    x0 = rng.normal(size=(500, 8)) @ (rng.normal(size=(8, 8)) + np.eye(8))
    x = x0 + 1e6
    _, wr, a, _ = ref_whitener_gram(x - 1e6, "shrinkage", "ledoit-wolf", 1e-5)
    monkeypatch.setattr(scores_mod, "_FIT_CHUNK_ROWS", 7)
    w = Whitener().fit(x)
    assert w.shrinkage_ == pytest.approx(a, rel=1e-6)
    assert_allclose(w.whitening_, wr, rtol=1e-6, atol=1e-8)
    assert_allclose(w.mean_ - 1e6, x0.mean(0), atol=1e-8)


def test_partial_fit_errors_name_the_value_and_leave_the_state_unchanged(monkeypatch):
    rng = np.random.default_rng(34)
    x = rng.normal(size=(30, 5))
    with pytest.raises(NotFittedError, match="partial_fit"):
        Whitener().finalize()
    one = Whitener().partial_fit(x[:1])
    with pytest.raises(DegenerateInputError, match="1 sample.*at least 2"):
        one.transform(x)
    with pytest.raises(DegenerateInputError, match="1 sample.*at least 2"):
        one.finalize()
    assert_allclose(one.partial_fit(x[1:]).mean_, x.mean(0), rtol=1e-12)  # recovers once rows arrive

    w = Whitener().partial_fit(x[:10])
    bad = x[10:20].copy()
    bad[3, 2] = np.nan
    with pytest.raises(DegenerateInputError, match=r"row 13, column 2 is nan .*remove or fix"):
        w.partial_fit(bad)
    bad[3, 2] = np.inf
    with pytest.raises(DegenerateInputError, match=r"row 13, column 2 is inf"):
        w.partial_fit(bad)
    with pytest.raises(ValueError, match="has 4 columns but the earlier partial_fit chunks had 5.*fit"):
        w.partial_fit(x[10:20, :4])
    with pytest.raises(ValueError, match="2-D"):
        w.partial_fit(x[10])
    w.partial_fit(x[10:])  # the failed chunks left nothing behind
    _assert_same_whitener(w, Whitener().fit(x))

    # a NaN in a later block of one fit call: named by its row in X, and the earlier fit survives
    monkeypatch.setattr(scores_mod, "_FIT_CHUNK_ROWS", 4)
    bad_x = x.copy()
    bad_x[9, 1] = np.nan
    before = w.whitening_.copy()
    with pytest.raises(DegenerateInputError, match=r"row 9, column 1 is nan"):
        w.fit(bad_x)
    with pytest.raises(DegenerateInputError, match="constant"):
        w.fit(np.ones((10, 5)))
    assert_allclose(w.whitening_, before, rtol=0, atol=0)
    with pytest.raises(DegenerateInputError, match="at least 2"):
        Whitener().fit(np.empty((0, 5)))


def test_whitener_fit_memory_is_linear_in_rows_never_n_by_n():
    """n = 20000, d = 16: an (n, n) float64 matrix alone would be 3.2 GB; the streamed fit stays under 64 MiB."""
    import tracemalloc

    from sklearn.covariance import ledoit_wolf_shrinkage as sk_lw

    from inspector.scores import ledoit_wolf_shrinkage

    n, d = 20000, 16
    x = np.random.default_rng(35).normal(size=(n, d)) * np.linspace(0.5, 2, d)
    xc = x - x.mean(0)
    tracemalloc.start()
    try:
        w = Whitener().fit(x)
        a = ledoit_wolf_shrinkage(xc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20 < n * n * 8 / 40, peak
    assert a == pytest.approx(sk_lw(xc, assume_centered=True), rel=1e-9)
    assert w.shrinkage_ == pytest.approx(a, rel=1e-9)


# ---------------------------------------------------------------------------------------------- aggregation
def test_aggregate_layers_matches_reference_and_never_nans():
    rng = np.random.default_rng(4)
    s = rng.uniform(-1, 1, size=(40, 3))
    s[0] = [-1.0, -0.5, -1e-9]
    s[1] = [1.0, 1.0, 1.0]
    out = aggregate_layers(s, eps=1e-5, clip_eps=1e-6)
    assert_allclose(out, ref_geomean(s, 1e-5, 1e-6), rtol=1e-12)
    assert np.isfinite(out).all() and (out > 0).all()
    # identical to the paper's exp(mean log(s + eps)) wherever that is defined without clipping
    pos = rng.uniform(0.01, 1, size=(10, 3))
    assert_allclose(aggregate_layers(pos), np.exp(np.mean(np.log(pos + 1e-5), axis=1)), rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        aggregate_layers(np.ones(3))
    with pytest.raises(DegenerateInputError):
        aggregate_layers(np.array([[np.nan, 0.5]]))


# ---------------------------------------------------------------------------------------------- paper mode
def test_split_halves_procedure():
    splits = split_halves(11, 3, seed=5)
    rng = np.random.default_rng(5)
    for a, b in splits:
        perm = rng.permutation(11)
        assert_array_equal(a, perm[:5])
        assert_array_equal(b, perm[5:])
        assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == 11


@pytest.mark.parametrize(("n", "m", "seed"), [(60, 25, 0), (41, 12, 7)])
def test_paper_scorer_matches_slow_reference(n, m, seed):
    rng = np.random.default_rng(seed)
    train, mixing = _layer_features(rng, n)
    query, _ = _layer_features(rng, m, mixing=mixing)
    query["block3"][:3] = train["block3"][:3]  # some near matches in one layer
    ref = ref_paper(train, query, n_bootstrap=10, seed=seed)
    sc = PaperScorer(n_bootstrap=10, seed=seed).fit(train)
    res = sc.score_samples(query, top_k=3)
    assert sc.layers_ == list(DIMS)
    assert_allclose(np.sort(sc.null_), np.sort(ref["null"]), rtol=2e-5)
    assert_allclose(sc.null_rounds_.ravel(), ref["null"], rtol=2e-5)
    assert sc.mu0_ == pytest.approx(ref["mu0"], rel=1e-5)
    assert sc.sigma0_ == pytest.approx(ref["sigma0"], rel=1e-4)
    assert_allclose(res.layer_similarity, ref["per_layer"], rtol=1e-5, atol=1e-6)
    assert_allclose(res.similarity, ref["s"], rtol=1e-5)
    assert_allclose(res.mi_z, ref["mi"], rtol=1e-4, atol=1e-4)
    assert_allclose(res.oni, ref["oni"], rtol=1e-4, atol=1e-4)
    for k in DIMS:
        assert_array_equal(res.nearest[k], ref["nearest"][k])
        assert res.neighbours[k].shape == (m, 3)
        assert (np.diff(res.neighbour_sims[k], axis=1) <= 1e-6).all()
    nb, nbs = sc.neighbours(query, 3)
    for k in DIMS:
        assert_array_equal(nb[k], res.neighbours[k])
        assert_allclose(nbs[k], res.neighbour_sims[k])
    # score_samples' MI and ONI are zscore_oni against the fitted null
    mi_ref, oni_ref = zscore_oni(res.similarity, sc.null_)
    assert_allclose(res.mi_z, mi_ref, rtol=1e-12)
    assert_allclose(res.oni, oni_ref, rtol=1e-12)
    # the dataset level: the calibration's verdict over the paper's split-half null
    v = Calibration(res.similarity, sc.null_, null_kind="split-half bootstrap", mi_z=res.mi_z, oni=res.oni).verdict()
    assert v.mean_oni == pytest.approx(float(np.mean(ref["oni"])), abs=1e-4)
    assert v.mean_mi_z == pytest.approx(float(np.mean(ref["mi"])), abs=1e-4)
    assert v.paper_rule_memorised == (np.mean(ref["oni"]) < 0.68)
    assert v.n_null == len(ref["null"]) == 10 * (n // 2)  # each round scores half A against half B


def test_paper_bootstrap_fallback_search_matches_reference(monkeypatch):
    """With a 2-neighbour list most rows miss B and take the exact fallback search; the null is unchanged."""
    monkeypatch.setattr(scores_mod, "_BOOTSTRAP_NEIGHBOURS", 2)
    rng = np.random.default_rng(11)
    train, mixing = _layer_features(rng, 36)
    query, _ = _layer_features(rng, 4, mixing=mixing)
    ref = ref_paper(train, query, n_bootstrap=4, seed=3)
    sc = PaperScorer(n_bootstrap=4, seed=3).fit(train)
    assert_allclose(sc.null_, ref["null"], rtol=2e-5)


def test_paper_planted_exact_and_noisy_copies_rank_above_novel():
    rng = np.random.default_rng(12)
    train, mixing = _layer_features(rng, 200)
    novel, _ = _layer_features(rng, 40, mixing=mixing)
    src = rng.choice(200, 20, replace=False)
    exact = {k: v[src[:10]] for k, v in train.items()}
    noisy = {k: v[src[10:]] + 0.02 * v.std(axis=0) * rng.normal(size=(10, v.shape[1])) for k, v in train.items()}
    query = {k: np.vstack([exact[k], noisy[k], novel[k]]) for k in train}
    res = PaperScorer(seed=1).fit(train).score_samples(query)
    copies, fresh = res.similarity[:20], res.similarity[20:]
    assert copies.min() > fresh.max()
    assert res.oni[:20].max() < res.oni[20:].min()
    assert (res.mi_z[:10] > 3).all()
    for k in DIMS:
        assert_array_equal(res.nearest[k][:20], src)
    assert_allclose(res.similarity[:10], (1 + 1e-5), rtol=1e-5)  # exact copies: cosine 1 in every layer


def test_paper_negative_cosines_do_not_nan():
    rng = np.random.default_rng(13)
    train, _ = _layer_features(rng, 30, dims={"a": 2, "b": 2})
    # mirror images of training samples through the mean: whitened cosine -1 to their source
    query = {k: 2 * v.mean(0) - v[:5] for k, v in train.items()}
    res = PaperScorer().fit(train).score_samples(query)
    for arr in (res.similarity, res.mi_z, res.oni, res.layer_similarity):
        assert np.isfinite(arr).all()
    # a direction opposite to all of training gives a negative top-1 in a 1-D layer
    t1 = {"a": np.linspace(0, 1, 20)[:, None] ** 2 + np.linspace(0, 1, 20)[:, None]}
    sc = PaperScorer().fit(t1)
    r1 = sc.score_samples({"a": np.array([[1e9]])})
    assert np.isfinite(r1.similarity).all() and np.isfinite(r1.oni).all()


def test_paper_scorer_degenerate_inputs_give_clear_errors():
    rng = np.random.default_rng(14)
    train, mixing = _layer_features(rng, 20)
    with pytest.raises(DegenerateInputError, match="at least 2"):
        PaperScorer().fit({k: v[:1] for k, v in train.items()})
    const = dict(train)
    const["block7"] = np.full((20, 10), 0.5)
    with pytest.raises(DegenerateInputError, match="block7.*constant"):
        PaperScorer().fit(const)
    nan = {k: v.copy() for k, v in train.items()}
    nan["block3"][2, 0] = np.nan
    with pytest.raises(DegenerateInputError, match="NaN"):
        PaperScorer().fit(nan)
    with pytest.raises(ValueError, match="same number of rows"):
        PaperScorer().fit({"a": np.ones((4, 2)), "b": np.ones((5, 2))})
    with pytest.raises(TypeError, match="dict"):
        PaperScorer().fit(train["block3"])
    with pytest.raises(ValueError, match="n_bootstrap"):
        PaperScorer(n_bootstrap=0).fit(train)
    with pytest.raises(NotFittedError):
        PaperScorer().score_samples(train)
    sc = PaperScorer(n_bootstrap=2).fit(train)
    with pytest.raises(ValueError, match="missing"):
        sc.score_samples({"block3": train["block3"]})
    with pytest.raises(ValueError, match="block7.*columns"):
        sc.score_samples({**train, "block7": train["block7"][:, :3]})
    q_nan = {k: v.copy() for k, v in train.items()}
    q_nan["block11"][0, 0] = np.inf
    with pytest.raises(DegenerateInputError, match="block11"):
        sc.score_samples(q_nan)
    # the smallest valid cohort works and gives finite numbers
    two = {k: v[:2] for k, v in train.items()}
    r = PaperScorer(n_bootstrap=3).fit(two).score_samples(two)
    assert np.isfinite(r.similarity).all() and np.isfinite(r.oni).all()
    assert r.neighbours["block3"].shape == (2, 1)


def test_paper_dataset_rule_constant():
    assert PAPER_ONI_THRESHOLD == 0.68 and PaperScorer.ONI_THRESHOLD == 0.68
    rng = np.random.default_rng(15)
    train, mixing = _layer_features(rng, 80)
    sc = PaperScorer().fit(train)
    copies = sc.score_samples({k: v[:30] for k, v in train.items()})
    novel = sc.score_samples(_layer_features(rng, 30, mixing=mixing)[0])

    def verdict(res):
        return Calibration(
            res.similarity, sc.null_, null_kind="split-half bootstrap", mi_z=res.mi_z, oni=res.oni
        ).verdict()

    vc, vn = verdict(copies), verdict(novel)
    assert vc.paper_rule_memorised and vc.mean_oni < 0.68
    assert vc.mean_oni == pytest.approx(float(np.mean(copies.oni)), rel=1e-12)
    assert vc.mean_mi_z == pytest.approx(float(np.mean(copies.mi_z)), rel=1e-12)
    assert vc.mean_oni < vn.mean_oni
    assert vc.paper_rule == "ONI < 0.68 means memorisation"
    assert vc.paper_rule_memorised is True and isinstance(vc.paper_rule_memorised, bool)

    # the rule is strict: a mean ONI of exactly 0.68 is not memorised, just below it is
    def rule(oni: float) -> bool:
        cal = Calibration([0.5], sc.null_, null_kind="split-half bootstrap", mi_z=[0.0], oni=[oni])
        return cal.verdict().paper_rule_memorised

    assert rule(PAPER_ONI_THRESHOLD) is False
    assert rule(float(np.nextafter(PAPER_ONI_THRESHOLD, 0.0))) is True
    assert rule(0.9) is False and rule(-1.0) is True


# ---------------------------------------------------------------------------------------------- calibration
def test_empirical_p_values_match_brute_force():
    rng = np.random.default_rng(20)
    null = np.round(rng.normal(size=57), 1)  # ties on purpose
    s = np.concatenate([np.round(rng.normal(size=30), 1), [null.max(), null.min(), 10.0, -10.0]])
    ref = np.array([(1 + sum(1 for z in null if z >= v)) / (1 + len(null)) for v in s])
    assert_allclose(empirical_p_values(s, null), ref, rtol=0, atol=0)
    assert empirical_p_values([10.0], null)[0] == min_p_value(57)
    with pytest.raises(DegenerateInputError):
        empirical_p_values(s, [])
    with pytest.raises(DegenerateInputError, match="NaN"):
        empirical_p_values([np.nan], null)


def test_min_p_and_null_too_small():
    assert min_p_value(99) == pytest.approx(0.01)
    assert not null_too_small(99, 0.01)
    assert null_too_small(98, 0.01)
    assert min_null_size(0.01) == 99 and min_null_size(0.05) == 19
    for alpha in (0.01, 0.05, 0.003):
        n = min_null_size(alpha)
        assert not null_too_small(n, alpha) and null_too_small(n - 1, alpha)
    with pytest.raises(ValueError, match="alpha"):
        null_too_small(10, 0.0)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_flag_rate_is_calibrated_when_g_is_like_the_null(alpha):
    """G and the null from one distribution: the flagged fraction's interval covers alpha."""
    m, n_null, seeds = 2000, 20000, range(8)
    total = 0
    for seed in seeds:
        rng = np.random.default_rng(100 + seed)
        null, g = rng.gamma(2.0, size=n_null), rng.gamma(2.0, size=m)
        k = int((empirical_p_values(g, null) <= alpha).sum())
        lo, hi = wilson_interval(k, m, z=3.29)  # per seed, 99.9 %
        assert lo <= alpha <= hi, (seed, k)
        total += k
    lo, hi = wilson_interval(total, m * len(seeds))  # pooled, 95 %
    assert lo <= alpha <= hi, total


def test_flag_rate_end_to_end_with_whitening_and_top1():
    """Holdout null s(H -> T) and synthetic G exchangeable with H: flags at alpha stay at alpha."""
    from inspector.index import knn

    alpha, total, m = 0.05, 0, 600
    for seed in range(4):
        rng = np.random.default_rng(200 + seed)
        d = 12
        mix = rng.normal(size=(d, d))
        t, h, g = (rng.normal(size=(k, d)) @ mix for k in (150, 1500, m))
        w = Whitener().fit(t)
        tw = w.transform(t)
        null = knn(w.transform(h), tw, 1, metric="ip")[0][:, 0]
        sg = knn(w.transform(g), tw, 1, metric="ip")[0][:, 0]
        k = int((empirical_p_values(sg, null) <= alpha).sum())
        lo, hi = wilson_interval(k, m, z=3.29)
        assert lo <= alpha <= hi, (seed, k)
        total += k
    lo, hi = wilson_interval(total, 4 * m)
    assert lo <= alpha <= hi, total


def test_calibrated_mi_monotone_bounded_and_cdf_like():
    rng = np.random.default_rng(21)
    null = rng.normal(size=5000)
    grid = np.concatenate([np.linspace(-1e6, -10, 50), np.linspace(-10, 10, 4001), np.linspace(10, 1e6, 50)])
    mi = calibrated_mi(grid, null)
    assert np.isfinite(mi).all() and (mi >= 0).all() and (mi <= 1).all()
    assert (np.diff(mi) >= 0).all()
    near = (grid > null.min() - 2) & (grid < null.max() + 2)
    assert (np.diff(mi[near]) > 0).all()  # strictly increasing around and just beyond the null
    inside = (grid > -2.5) & (grid < 2.5)
    assert np.abs(mi[inside] - scipy.stats.norm.cdf(grid[inside])).max() < 0.02
    assert mi[-1] == pytest.approx(1.0) and mi[0] == pytest.approx(0.0)
    # beyond the null maximum: above every null score's mi, below 1, continuous at the maximum
    top = null.max()
    a, b, c = calibrated_mi([top, top + 1e-9, top + 0.5], null)
    assert a == pytest.approx(b, abs=1e-9) and a < c < 1.0


@pytest.mark.parametrize("n", [2, 10, 12, 40])
def test_calibrated_mi_small_and_tied_nulls(n):
    rng = np.random.default_rng(22 + n)
    null = np.round(rng.uniform(0.5, 0.9, size=n), 2)
    grid = np.linspace(-5, 5, 2001)
    mi = calibrated_mi(grid, null)
    assert np.isfinite(mi).all() and (mi >= 0).all() and (mi <= 1).all()
    assert (np.diff(mi) >= 0).all()
    assert (np.diff(calibrated_mi(np.linspace(0.3, 1.2, 500), null)) > 0).all()
    # the interior is the mid-rank empirical CDF: at a unique null value u, (#below + #equal/2) / n
    u = np.unique(null)
    ref = np.array([((null < v).sum() + (null == v).sum() / 2) / n for v in u])
    assert_allclose(calibrated_mi(u, null), ref, rtol=1e-12)


def test_calibrated_mi_constant_null_and_errors():
    mi = calibrated_mi([0.0, 0.7, 0.7000001, 0.8, 5.0], np.full(20, 0.7))
    assert np.isfinite(mi).all()
    assert (np.diff(mi) >= 0).all() and mi[1] == pytest.approx(0.5)
    assert mi[2] > mi[1] and mi[0] < mi[1]
    with pytest.raises(DegenerateInputError):
        calibrated_mi([0.5], [0.3])
    with pytest.raises(ValueError, match="tail_fraction"):
        calibrated_mi([0.5], np.arange(20.0), tail_fraction=0.9)
    with pytest.raises(ValueError, match="1-D"):
        calibrated_mi(np.ones((2, 2)), np.arange(20.0))


def ref_bh(p: np.ndarray, alpha: float) -> np.ndarray:
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    k = 0
    for r, i in enumerate(ranked, start=1):
        if p[i] <= r / m * alpha:
            k = r
    out = np.zeros(m, bool)
    for i in ranked[:k]:
        out[i] = True
    return out


def test_benjamini_hochberg_matches_reference_and_scipy():
    rng = np.random.default_rng(23)
    for trial in range(20):
        m = int(rng.integers(1, 300))
        p = np.concatenate([rng.uniform(size=m), rng.uniform(0, 0.002, size=trial)])
        rng.shuffle(p)
        for alpha in (0.01, 0.05, 0.2):
            got = benjamini_hochberg(p, alpha)
            assert_array_equal(got, ref_bh(p, alpha))
            assert_array_equal(got, scipy.stats.false_discovery_control(p, method="bh") <= alpha)
    assert benjamini_hochberg(np.array([]), 0.05).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([1.2], 0.05)
    with pytest.raises(ValueError, match="alpha"):
        benjamini_hochberg([0.2], 1.0)


def test_mann_whitney_auc_matches_pairwise_count():
    rng = np.random.default_rng(24)
    g = rng.integers(0, 8, size=40).astype(float) + 2
    null = rng.integers(0, 8, size=55).astype(float)
    greater = sum(1 for a in g for b in null if a > b)
    ties = sum(1 for a in g for b in null if a == b)
    auc, p = mann_whitney_auc(g, null)
    assert auc == pytest.approx((greater + 0.5 * ties) / (len(g) * len(null)), rel=1e-12)
    assert 0 <= p < 0.05  # g is shifted up
    auc2, p2 = mann_whitney_auc(null, g)
    assert auc2 == pytest.approx(1 - auc) and p2 > 0.9
    auc3, p3 = mann_whitney_auc(np.ones(5), np.ones(7))
    assert auc3 == 0.5 and p3 == pytest.approx(1.0)  # all tied: no evidence of copying
    with pytest.raises(DegenerateInputError):
        mann_whitney_auc([], null)


def test_zscore_oni_formula():
    rng = np.random.default_rng(25)
    null, s = rng.normal(0.4, 0.05, 300), rng.uniform(0, 1, 20)
    mi, oni = zscore_oni(s, null)
    sigma = math.sqrt(np.var(null) + 1e-8)
    assert_allclose(mi, (s - null.mean()) / sigma, rtol=1e-12)
    assert_allclose(oni, -np.tanh(mi), rtol=1e-12)
    mi_c, oni_c = zscore_oni([0.5, 0.7], np.full(5, 0.5))  # a constant null: sigma0 = 1e-4, no Inf
    assert np.isfinite(mi_c).all() and mi_c[0] == 0 and oni_c[1] == pytest.approx(-1.0)


@pytest.mark.parametrize("shape", [(30, 200), (200, 30), (50, 50), (2, 10), (9, 1)])
@pytest.mark.parametrize(("block_size", "sk_block_size"), [(4096, 1000), (3, 7), (1, 1000)])
def test_ledoit_wolf_shrinkage_matches_sklearn(shape, block_size, sk_block_size):
    from sklearn.covariance import ledoit_wolf_shrinkage as sk_lw

    from inspector.scores import ledoit_wolf_shrinkage

    x = np.random.default_rng(3).normal(size=shape) * np.linspace(0.1, 3, shape[1])
    xc = x - x.mean(0)
    ours = ledoit_wolf_shrinkage(xc, block_size=block_size)
    assert_allclose(ours, sk_lw(xc, assume_centered=True, block_size=sk_block_size), rtol=1e-9, atol=1e-15)
    assert 0.0 <= ours <= 1.0


def test_ledoit_wolf_shrinkage_errors():
    from inspector.scores import ledoit_wolf_shrinkage

    xc = np.random.default_rng(4).normal(size=(10, 3))
    xc[7, 1] = np.nan
    with pytest.raises(DegenerateInputError, match="row 7, column 1 is nan"):
        ledoit_wolf_shrinkage(xc, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        ledoit_wolf_shrinkage(xc, block_size=0)
    with pytest.raises(ValueError, match="2-D"):
        ledoit_wolf_shrinkage(xc[0])


def test_transform_in_blocks_equals_one_block_and_counts_bad_rows_over_blocks(monkeypatch):
    """The transform streams blocks of rows (float64 temporaries O(block d)); the answer is the one-block one."""
    rng = np.random.default_rng(41)
    x = rng.normal(size=(300, 12)).astype(np.float32) @ rng.normal(size=(12, 12)).astype(np.float32)
    w = Whitener().fit(x)
    whole = w.transform(x)
    monkeypatch.setattr(scores_mod, "_FIT_CHUNK_ROWS", 7)
    parts = w.transform(x)
    assert parts.dtype == np.float32 and parts.shape == x.shape
    assert_allclose(parts, whole, rtol=0, atol=1e-7)
    assert_allclose(parts, ref_whiten(x.astype(np.float64), w.mean_, w.whitening_), atol=2e-6)
    bad = x.copy()
    bad[[3, 150, 299], [0, 5, 11]] = [np.nan, np.inf, -np.inf]  # three rows in three different blocks
    with pytest.raises(scores_mod.DegenerateInputError, match=r"NaN or Inf in 3 row\(s\)"):
        w.transform(bad)
    assert w.transform(x[:0]).shape == (0, 12)
