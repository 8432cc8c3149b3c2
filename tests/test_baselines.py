"""Baselines (CT-score, AuthPct, DCR, pixel correlation) against brute-force references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from inspector.baselines import auth_pct, ct_score, dcr, dcr_summary, nearest_distances, pixel_correlation
from inspector.scores import DegenerateInputError


# ---------------------------------------------------------------------------------------------- references
def ref_nearest(q: np.ndarray, b: np.ndarray, metric: str = "l2", exclude_self: bool = False):
    dist = np.empty(len(q))
    arg = np.empty(len(q), int)
    for j in range(len(q)):
        best, bi = math.inf, -1
        for i in range(len(b)):
            if exclude_self and i == j:
                continue
            if metric == "l2":
                d = math.sqrt(sum((float(a) - float(c)) ** 2 for a, c in zip(q[j], b[i], strict=True)))
            else:
                nq, nb = np.linalg.norm(q[j]), np.linalg.norm(b[i])
                d = 1.0 - (float(np.dot(q[j], b[i]) / (nq * nb)) if nq > 0 and nb > 0 else 0.0)
            if d < best:
                best, bi = d, i
        dist[j], arg[j] = best, bi
    return dist, arg


def ref_auth(train: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """Authentic iff the generated sample is farther from its nearest training sample than that sample is
    from its own nearest other training sample."""
    out = np.empty(len(gen), bool)
    for j, g in enumerate(gen):
        dists = [np.linalg.norm(g - t) for t in train]
        i = int(np.argmin(dists))
        r = min(np.linalg.norm(train[i] - train[k]) for k in range(len(train)) if k != i)
        out[j] = dists[i] > r
    return out


def ref_z_u(gen_d: np.ndarray, test_d: np.ndarray) -> float:
    """Mann-Whitney U by pair counting, Z-scored with the released code's continuity correction."""
    m, n = len(gen_d), len(test_d)
    u = sum((1.0 if a > b else 0.5 if a == b else 0.0) for a in gen_d for b in test_d)
    return (u - (m * n / 2 - 0.5)) / math.sqrt(m * n * (m + n + 1) / 12)


def ref_pearson_max(train: np.ndarray, gen: np.ndarray) -> np.ndarray:
    out = np.empty(len(gen))
    for j, g in enumerate(gen):
        best = -np.inf
        for t in train:
            if np.ptp(g) == 0 or np.ptp(t) == 0:
                c = 0.0
            else:
                c = float(np.corrcoef(g.ravel(), t.ravel())[0, 1])
            best = max(best, c)
        out[j] = best
    return out


def _blobs(rng: np.random.Generator, n: int, d: int = 5, centres: int = 4, spread: float = 1.0) -> np.ndarray:
    c = np.random.default_rng(999).normal(size=(centres, d)) * 4
    return c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, d))


# ---------------------------------------------------------------------------------------------- nearest
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_distances_match_brute_force(metric):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 6)) * 3 + 100  # far from the origin: tests the float32 cancellation guard
    q = np.vstack([base[:5] + 1e-4 * rng.normal(size=(5, 6)), rng.normal(size=(10, 6)) * 3 + 100])
    d, idx = nearest_distances(q, base, metric=metric)
    rd, ri = ref_nearest(q, base, metric)
    assert_allclose(d, rd, rtol=1e-6, atol=1e-9)
    assert_array_equal(idx, ri)
    assert (d[:5] < 1e-3).all()


def test_nearest_distances_exclude_self_keeps_duplicates():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20, 4))
    base[7] = base[3]  # a duplicate: its nearest *other* sample is at distance 0
    d, idx = nearest_distances(base, base, exclude_self=True)
    rd, _ = ref_nearest(base, base, exclude_self=True)
    assert_allclose(d, rd, atol=1e-9)
    assert (idx != np.arange(20)).all()
    assert d[3] == 0 and d[7] == 0 and idx[3] == 7 and idx[7] == 3
    with pytest.raises(ValueError, match="widths"):
        nearest_distances(base, base[:, :3])
    with pytest.raises(ValueError, match="metric"):
        nearest_distances(base, base, metric="l1")


# ---------------------------------------------------------------------------------------------- AuthPct
def test_auth_pct_matches_reference_and_indexes_the_nearest_training_sample():
    rng = np.random.default_rng(2)
    # training samples with very different neighbour radii: a dense cluster and isolated points
    dense = 0.01 * rng.normal(size=(10, 3))
    isolated = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, 0, 0]])
    train = np.vstack([isolated, dense])
    gen = np.vstack(
        [
            isolated[[2, 0]] + 0.5,  # near an isolated point, well inside its (large) radius: unauthentic
            dense[:3] + 0.2,  # near the dense cluster, outside its tiny radius: authentic
            dense[5:7],  # exact copies: unauthentic
            [[50.0, 50, 50]],  # far from everything: authentic
        ]
    )
    out = auth_pct(train, gen)
    ref = ref_auth(train, gen)
    assert_array_equal(out["authentic"], ref)
    assert_array_equal(out["authentic"], [False, False, True, True, True, False, False, True])
    assert out["auth_pct"] == pytest.approx(100 * ref.mean())
    assert_array_equal(out["nearest_train"][[0, 1, 5, 6]], [2, 0, 9, 10])
    assert ((out["nearest_train"][2:5] >= 4) & (out["nearest_train"][2:5] < 14)).all()
    # the radius is that of the nearest training sample, not of the training sample at the generated index
    r_all, _ = ref_nearest(train, train, exclude_self=True)
    wrong = out["gen_distance"] > r_all[: len(gen)]
    assert (wrong != ref).any()
    assert_allclose(out["train_nn_distance"], r_all[out["nearest_train"]], atol=1e-9)


def test_auth_pct_planted_copies_are_unauthentic():
    rng = np.random.default_rng(3)
    train = _blobs(rng, 200)
    copies = train[rng.choice(200, 30, replace=False)] + 1e-6 * rng.normal(size=(30, 5))
    fresh = _blobs(rng, 60)
    out = auth_pct(train, np.vstack([copies, fresh]))
    assert not out["authentic"][:30].any()
    assert out["authentic"][30:].mean() > 0.3
    assert_array_equal(out["authentic"], ref_auth(train, np.vstack([copies, fresh])))
    with pytest.raises(DegenerateInputError, match="at least 2"):
        auth_pct(train[:1], fresh)


# ---------------------------------------------------------------------------------------------- DCR
def test_dcr_matches_brute_force_and_summary():
    rng = np.random.default_rng(4)
    train, gen, hold = rng.normal(size=(50, 4)), rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    gen[:3] = train[[4, 9, 1]]
    d, idx = dcr(train, gen, return_index=True)
    rd, ri = ref_nearest(gen, train)
    assert_allclose(d, rd, atol=1e-9)
    assert_array_equal(idx, ri)
    assert_array_equal(idx[:3], [4, 9, 1])
    assert_allclose(dcr(train, gen), d)
    h = dcr(train, hold)
    summ = dcr_summary(d, h)
    assert summ["n_zero"] == 3 and summ["min"] == 0.0
    assert summ["median"] == pytest.approx(np.median(rd))
    thr = np.quantile(h, 0.05)
    assert summ["threshold"] == pytest.approx(thr)
    assert summ["fraction_below_threshold"] == pytest.approx(np.mean(rd < thr))
    assert "threshold" not in dcr_summary(d)
    with pytest.raises(ValueError, match="non-negative"):
        dcr_summary(-d - 1)
    with pytest.raises(DegenerateInputError, match="NaN"):
        dcr(train, np.full((2, 4), np.nan))


# ---------------------------------------------------------------------------------------------- CT-score
def test_ct_score_matches_per_cell_reference():
    rng = np.random.default_rng(5)
    train, test, gen = _blobs(rng, 300), _blobs(rng, 200), _blobs(rng, 240, spread=0.8)
    out = ct_score(train, test, gen, n_cells=4, seed=0)
    k = out["n_cells"]
    assert k == 4 and out["tau"] == pytest.approx(20 / 240)
    zs, weights = [], []
    for c in range(k):
        g_in, t_in, tr_in = gen[out["gen_cells"] == c], test[out["test_cells"] == c], train[out["train_cells"] == c]
        if len(g_in) / len(gen) <= 20 / 240 or len(t_in) == 0:
            assert not out["cell_used"][c]
            continue
        z = ref_z_u(ref_nearest(g_in, tr_in)[0], ref_nearest(t_in, tr_in)[0])
        assert out["cell_z"][c] == pytest.approx(z, rel=1e-9, abs=1e-12)
        zs.append(z)
        weights.append(len(t_in) / len(test))
    assert out["n_cells_used"] == len(zs) > 0
    assert out["ct_score"] == pytest.approx(np.dot(weights, zs) / np.sum(weights), rel=1e-9)
    # the cells are the nearest k-means centroid of the training features
    cent = np.stack([train[out["train_cells"] == c].mean(0) for c in range(k)])
    nearest_c = np.argmin(((gen[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
    assert (nearest_c == out["gen_cells"]).mean() > 0.95


def test_ct_score_negative_for_copies_near_zero_for_fresh_samples():
    rng = np.random.default_rng(6)
    train, test = _blobs(rng, 400), _blobs(rng, 300)
    copies = train[rng.choice(400, 300, replace=False)] + 0.05 * rng.normal(size=(300, 5))
    fresh = _blobs(rng, 300)
    blurry = _blobs(rng, 300, spread=2.0)
    ct_copy = ct_score(train, test, copies, n_cells=5)["ct_score"]
    ct_fresh = ct_score(train, test, fresh, n_cells=5)["ct_score"]
    ct_blurry = ct_score(train, test, blurry, n_cells=5)["ct_score"]
    assert ct_copy < -5
    assert abs(ct_fresh) < 3
    assert ct_blurry > 3
    assert np.isfinite([ct_copy, ct_fresh, ct_blurry]).all()


def test_ct_score_errors():
    rng = np.random.default_rng(7)
    train, test, gen = _blobs(rng, 50), _blobs(rng, 40), _blobs(rng, 10)
    with pytest.raises(DegenerateInputError, match="no k-means cell"):
        ct_score(train, test, gen, n_cells=3)  # 10 generated samples can never exceed tau = 20/10
    with pytest.raises(ValueError, match="n_cells"):
        ct_score(train, test, gen, n_cells=0)
    with pytest.raises(ValueError, match="widths"):
        ct_score(train, test[:, :4], gen)
    out = ct_score(train, test, gen, n_cells=2, tau=0.0)
    assert np.isfinite(out["ct_score"])


# ---------------------------------------------------------------------------------------------- pixels
def test_pixel_correlation_matches_brute_force_and_views():
    rng = np.random.default_rng(8)
    train = rng.random((12, 9, 11)).astype(np.float32)
    gen = rng.random((6, 9, 11)).astype(np.float32)
    gen[0] = 0.5 * train[3] + 0.2  # brightness/contrast change: correlation 1
    gen[1] = train[5][:, ::-1]  # horizontal flip
    gen[2] = train[7][::-1, ::-1]  # both flips
    gen[3] = 0.3  # constant image: correlation 0, no NaN
    corr, idx = pixel_correlation(train, gen, return_index=True)
    assert_allclose(corr, ref_pearson_max(train, gen), atol=1e-5)
    assert corr[0] == pytest.approx(1.0, abs=1e-5) and idx[0] == 3
    assert corr[1] < 0.9 and corr[2] < 0.9
    assert corr[3] == 0.0
    views = ("id", "hflip", "vflip", "hvflip")
    corr_v, idx_v = pixel_correlation(train, gen, views=views, return_index=True)
    flipped = {
        v: ref_pearson_max(train, g)
        for v, g in {
            "id": gen,
            "hflip": gen[:, :, ::-1],
            "vflip": gen[:, ::-1, :],
            "hvflip": gen[:, ::-1, ::-1],
        }.items()
    }
    assert_allclose(corr_v, np.max(np.stack(list(flipped.values())), axis=0), atol=1e-5)
    assert corr_v[1] == pytest.approx(1.0, abs=1e-5) and idx_v[1] == 5
    assert corr_v[2] == pytest.approx(1.0, abs=1e-5) and idx_v[2] == 7
    assert (corr_v >= corr - 1e-7).all()


def test_pixel_correlation_rotation_view_and_errors():
    rng = np.random.default_rng(9)
    yy, xx = np.mgrid[:32, :32]
    train = np.stack([np.exp(-((yy - 10 - 3 * i) ** 2 + (xx - 16) ** 2) / 30.0) for i in range(4)]).astype(np.float32)
    from inspector.features import view_images

    gen = view_images(train[[2]], "rot+10")
    plain = pixel_correlation(train, gen)
    rotated = pixel_correlation(train, gen, views=("id", "rot-10"))
    assert rotated[0] > plain[0] and rotated[0] > 0.98
    with pytest.raises(ValueError, match="sizes differ"):
        pixel_correlation(train, rng.random((2, 16, 16)))
    with pytest.raises(ValueError, match=r"\(n, H, W\)"):
        pixel_correlation(train[0], gen)
    with pytest.raises(DegenerateInputError, match="NaN"):
        pixel_correlation(train, np.full((1, 32, 32), np.nan))
    with pytest.raises(ValueError, match="Unknown view"):
        pixel_correlation(train, gen, views=("mirror",))
