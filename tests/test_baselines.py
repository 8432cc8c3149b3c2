"""Baselines (CT-score, AuthPct, DCR, pixel correlation) against brute-force references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import inspector.baselines as B
from inspector.baselines import (
    auth_pct,
    baseline_space,
    ct_score,
    dcr,
    nearest_distances,
    pixel_correlation,
    run_baselines,
)
from inspector.preprocess import resize_square
from inspector.scores import DegenerateInputError
from inspector.views import FLIPS, apply_view


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


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_nearest_distances_blocked_rescoring_is_the_whole(monkeypatch, metric, exclude_self):
    """The exact re-scoring runs in blocks of query rows (memory O(block), issue 17); the result is the same."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(60, 5))
    q = base if exclude_self else rng.normal(size=(37, 5))
    whole = nearest_distances(q, base, metric=metric, exclude_self=exclude_self)
    monkeypatch.setattr(B, "_RESCORE_BUDGET", 3 * 8 * 5)  # 3 query rows per block, the last one short
    blocked = nearest_distances(q, base, metric=metric, exclude_self=exclude_self)
    rd, ri = ref_nearest(q, base, metric, exclude_self=exclude_self)
    assert_allclose(blocked[0], whole[0], rtol=0, atol=0)
    assert_array_equal(blocked[1], whole[1])
    assert_allclose(blocked[0], rd, rtol=1e-6, atol=1e-9)
    assert_array_equal(blocked[1], ri)


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
def test_dcr_matches_brute_force():
    rng = np.random.default_rng(4)
    train, gen, hold = rng.normal(size=(50, 4)), rng.normal(size=(20, 4)), rng.normal(size=(30, 4))
    gen[:3] = train[[4, 9, 1]]
    d, idx = dcr(train, gen, return_index=True)
    rd, ri = ref_nearest(gen, train)
    assert_allclose(d, rd, atol=1e-9)
    assert_array_equal(idx, ri)
    assert_array_equal(idx[:3], [4, 9, 1])
    assert_array_equal(d[:3], 0.0)  # exact copies: exactly zero (the float64 re-scoring)
    assert (d[3:] > 0).all() and d.dtype == np.float64
    assert_allclose(dcr(train, gen), d)
    assert_allclose(dcr(train, hold), ref_nearest(hold, train)[0], atol=1e-9)
    dc, ic = dcr(train, gen, metric="cosine", return_index=True)
    rdc, ric = ref_nearest(gen, train, "cosine")
    assert_allclose(dc, rdc, atol=1e-9)
    assert_array_equal(ic, ric)
    with pytest.raises(DegenerateInputError, match="NaN"):
        dcr(train, np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="widths"):
        dcr(train, gen[:, :3])


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
    assert views == tuple(v.value for v in FLIPS)
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
    gen = apply_view(train[[2]], "rot+10")
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
    with pytest.raises(DegenerateInputError, match="NaN"):
        pixel_correlation(np.full((2, 32, 32), np.nan, np.float32), gen)
    with pytest.raises(ValueError, match="chunk"):
        pixel_correlation(train, gen, chunk=0)


def test_pixel_correlation_streams_a_memory_mapped_stack_in_chunks(tmp_path):
    """Chunks of a memory map, resized as read, give the whole stack's correlations and indices."""
    from inspector.preprocess import resize_square

    rng = np.random.default_rng(10)
    train = rng.random((23, 40, 40)).astype(np.float32)
    gen = rng.random((5, 40, 40)).astype(np.float32)
    gen[1] = train[17]
    gen[3] = train[4][:, ::-1]
    path = tmp_path / "t.npy"
    np.save(path, train)
    mm = np.load(path, mmap_mode="r")
    views = ("id", "hflip")
    whole = pixel_correlation(resize_square(train, 16), resize_square(gen, 16), views=views, return_index=True)
    for chunk in (1, 5, 23, 100):
        got = pixel_correlation(mm, gen, views=views, return_index=True, size=16, chunk=chunk)
        assert_allclose(got[0], whole[0], atol=1e-6)
        np.testing.assert_array_equal(got[1], whole[1])
    assert got[1][1] == 17 and got[1][3] == 4


# ---------------------------------------------------------------------------------------------- the audit's runner
def ref_baseline_space(train: dict, *others: dict) -> list[np.ndarray]:
    """Per layer: standardise with the training mean and std, unit rows, times 1/sqrt(L); concatenated."""
    layers = list(train)
    out = []
    for f in (train, *others):
        rows = []
        for j in range(len(f[layers[0]])):
            parts = []
            for k in layers:
                x = np.asarray(train[k], np.float64)
                z = (np.asarray(f[k][j], np.float64) - x.mean(0)) / (x.std(0) + 1e-8)
                parts.append(z / (np.linalg.norm(z) + 1e-12) / math.sqrt(len(layers)))
            rows.append(np.concatenate(parts))
        out.append(np.asarray(rows))
    return out


def _audit_inputs(m: int, seed: int = 20, n: int = 60, h: int = 40, shape=(24, 32)):
    """Training/synthetic/holdout features (two layers) and images; the first 6 synthetic slices are copies.

    The images are not square; at pixel_size 16 their padding is symmetric, so a flip commutes with the
    resize and a mirrored copy correlates exactly.
    """
    rng = np.random.default_rng(seed)
    mix = {"a": rng.normal(size=(5, 5)) + 2 * np.eye(5), "b": rng.normal(size=(3, 3)) + 2 * np.eye(3)}
    shift = {"a": np.full(5, 3.0), "b": np.full(3, -2.0)}

    def feats(k: int) -> dict:
        return {name: rng.normal(size=(k, a.shape[0])) @ a + shift[name] for name, a in mix.items()}

    train, syn, hold = feats(n), feats(m), feats(h)
    src = np.array([3, 17, 29, 41, 8, 55])
    for name in syn:
        syn[name][:6] = train[name][src]
    train_img = rng.random((n, *shape)).astype(np.float32)
    syn_img = rng.random((m, *shape)).astype(np.float32)
    syn_img[:6] = train_img[src]
    syn_img[1] = train_img[src[1]][:, ::-1]  # a mirrored copy: found through the flip views
    syn_img[2] = train_img[src[2]][::-1, ::-1]
    return train, syn, hold, train_img, syn_img, src


def test_baseline_space_matches_reference():
    train, syn, hold, *_ = _audit_inputs(30)
    spaces = baseline_space(train, syn, hold)
    ref = ref_baseline_space(train, syn, hold)
    assert [x.shape for x in spaces] == [(60, 8), (30, 8), (40, 8)]
    for got, r in zip(spaces, ref, strict=True):
        assert got.dtype == np.float32
        assert_allclose(got, r, rtol=1e-5, atol=1e-6)
        assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)  # each layer contributes 1/L of the norm
        assert_allclose(np.linalg.norm(got[:, :5], axis=1), 1 / math.sqrt(2), rtol=1e-5)
    # the others use the training statistics, not their own
    alone = baseline_space(syn)[0]
    assert not np.allclose(alone, spaces[1], atol=1e-3)
    assert_array_equal(spaces[1][:6], spaces[0][[3, 17, 29, 41, 8, 55]])  # copies map to the same point
    assert len(baseline_space(train)) == 1


def test_baseline_space_in_blocks_of_rows_is_the_whole(monkeypatch):
    """Standardised a block of rows at a time into float32 (no float64 copy of a set: issue 17), bit for bit."""
    train, syn, hold, *_ = _audit_inputs(30)
    whole = baseline_space(train, syn, hold)
    monkeypatch.setattr(B, "_ROWS", 7)  # 60, 30 and 40 rows: short last blocks
    for a, b in zip(baseline_space(train, syn, hold), whole, strict=True):
        assert_array_equal(a, b)


def test_run_baselines_on_planted_copies():
    train, syn, hold, train_img, syn_img, src = _audit_inputs(30)
    cols, summ = run_baselines(train, syn, hold, train_img, syn_img, pixel_size=16, seed=3)
    assert set(cols) == {"dcr", "authentic", "pixel_corr"}
    assert all(v.shape == (30,) for v in cols.values())
    assert not any(k.endswith("_error") for k in summ), summ
    xt, xg, xh = baseline_space(train, syn, hold)
    # DCR: the brute-force nearest distance in the baseline space; copies at distance ~0
    rd, ri = ref_nearest(xg.astype(np.float64), xt.astype(np.float64))
    assert_allclose(cols["dcr"], rd, atol=1e-6)
    assert_array_equal(ri[:6], src)
    assert (cols["dcr"][:6] < 1e-6).all() and (cols["dcr"][6:] > 1e-2).all()
    assert summ["dcr_median"] == pytest.approx(np.median(cols["dcr"]))
    # AuthPct: the reference rule; copies are not authentic
    ref_a = ref_auth(xt.astype(np.float64), xg.astype(np.float64))
    assert_array_equal(cols["authentic"], ref_a.astype(int))
    assert cols["authentic"].dtype.kind == "i" and set(np.unique(cols["authentic"])) <= {0, 1}
    assert not cols["authentic"][:6].any()
    assert summ["auth_pct"] == pytest.approx(100 * ref_a.mean())
    # pixels: the best Pearson correlation over the four flips at pixel_size, copies (mirrored too) at ~1
    small_t = np.stack([resize_square(a, 16) for a in train_img])
    small_g = np.stack([resize_square(a, 16) for a in syn_img])
    ref_p = np.max([ref_pearson_max(small_t, apply_view(small_g, v)) for v in FLIPS], axis=0)
    assert_allclose(cols["pixel_corr"], ref_p, atol=1e-5)
    assert_allclose(cols["pixel_corr"][:6], 1.0, atol=1e-5)
    assert cols["pixel_corr"][6:].max() < 0.95  # fresh noise (the shared zero padding alone correlates ~0.9)
    assert summ["pixel_corr_median"] == pytest.approx(np.median(cols["pixel_corr"]))
    # CT-score: 30 synthetic slices -> one cell with a looser tau, said in a note
    ct = ct_score(xt, xh, xg, n_cells=1, tau=0.5, seed=3)
    assert summ["ct_score"] == pytest.approx(ct["ct_score"], rel=1e-9)
    assert summ["ct_cells"] == ct["n_cells_used"] == 1
    assert summ["ct_note"].startswith("only 30 synthetic slices")
    # deterministic for a seed
    cols2, summ2 = run_baselines(train, syn, hold, train_img, syn_img, pixel_size=16, seed=3)
    assert summ2 == summ and all(np.array_equal(cols[k], cols2[k]) for k in cols)


def test_run_baselines_ct_cells_follow_the_set_sizes():
    train, syn, hold, train_img, syn_img, _ = _audit_inputs(80, seed=21)
    _, summ = run_baselines(train, syn, hold, train_img, syn_img, pixel_size=16, seed=0)
    xt, xg, xh = baseline_space(train, syn, hold)
    # 80 synthetic and 40 holdout slices: min(20, 80 // 40, 40 // 10) = 2 cells at tau = 20 / 80: no note
    ct = ct_score(xt, xh, xg, n_cells=2, tau=0.25, seed=0)
    assert summ["ct_score"] == pytest.approx(ct["ct_score"], rel=1e-9)
    assert summ["ct_cells"] == ct["n_cells_used"]
    assert "ct_note" not in summ and "ct_score_error" not in summ


def test_run_baselines_reports_errors_without_raising(monkeypatch):
    train, syn, hold, train_img, syn_img, _ = _audit_inputs(30)
    # no holdout: no CT-score, the rest runs
    cols, summ = run_baselines(train, syn, None, train_img, syn_img, pixel_size=16)
    assert summ["ct_score_error"] == "CT-score needs a holdout (test) set of real scans"
    assert "ct_score" not in summ and "ct_cells" not in summ
    assert set(cols) == {"dcr", "authentic", "pixel_corr"}
    assert {"dcr_median", "auth_pct", "pixel_corr_median"} <= set(summ)
    # a failing baseline is reported as <name>_error; the others still run
    bad_img = syn_img.copy()
    bad_img[4, 2, 2] = np.nan
    cols, summ = run_baselines(train, syn, hold, train_img, bad_img, pixel_size=16)
    assert "pixel_corr" not in cols and "pixel_corr_median" not in summ
    assert summ["pixel_corr_error"].startswith("DegenerateInputError:") and "NaN" in summ["pixel_corr_error"]
    assert {"dcr", "authentic"} <= set(cols) and {"dcr_median", "auth_pct", "ct_score"} <= set(summ)

    def boom(*a, **k):
        raise RuntimeError("boom")

    cases = (("dcr", "dcr", "dcr_median"), ("auth_pct", "authentic", "auth_pct"), ("ct_score", None, "ct_score"))
    for name, col, key in cases:
        with monkeypatch.context() as mp:
            mp.setattr(B, name, boom)
            cols, summ = run_baselines(train, syn, hold, train_img, syn_img, pixel_size=16)
        assert summ[f"{name}_error"] == "RuntimeError: boom", name
        assert key not in summ and (col is None or col not in cols), name
        others = {"dcr_median", "auth_pct", "ct_score", "pixel_corr_median"} - {key}
        assert others <= set(summ), (name, summ)
    # one training slice: AuthPct needs two, so it reports instead of raising
    one = {k: v[:1] for k, v in train.items()}
    cols, summ = run_baselines(one, syn, hold, train_img[:1], syn_img, pixel_size=16)
    assert summ["auth_pct_error"].startswith("DegenerateInputError:") and "at least 2" in summ["auth_pct_error"]
    assert "authentic" not in cols and "dcr" in cols and "pixel_corr" in cols
