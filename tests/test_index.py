"""Nearest-neighbour search against an independent float64 brute force in numpy."""

from __future__ import annotations

import numpy as np
import pytest

import inspector.index as index_mod
from inspector.index import (
    DeviceUnavailableError,
    IndexInputError,
    NeighbourIndex,
    NotFittedError,
    gpu_available,
    knn,
)

TIE_TOL = 1e-6


def _brute(q, b, k, metric="cosine", qg=None, bg=None):
    """Reference: float64 similarities, own group removed, order (-sim, index); (sims, idx, full sim matrix)."""
    q = np.asarray(q, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
    full = q @ b.T
    s = full.copy()
    if qg is not None:
        s[np.asarray(qg, dtype=object)[:, None] == np.asarray(bg, dtype=object)[None, :]] = -np.inf
    kk = min(k, b.shape[0])
    sims = np.empty((q.shape[0], kk))
    idx = np.empty((q.shape[0], kk), dtype=np.int64)
    for i in range(q.shape[0]):
        order = np.lexsort((np.arange(b.shape[0]), -s[i]))[:kk]
        sims[i], idx[i] = s[i, order], order
    idx[np.isneginf(sims)] = -1
    return sims, idx, full


def _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full):
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    assert sims.shape == ref_sims.shape == idx.shape
    pad = np.isneginf(ref_sims)
    np.testing.assert_array_equal(np.isneginf(sims), pad)
    np.testing.assert_array_equal(idx[pad], -1)
    np.testing.assert_allclose(sims[~pad], ref_sims[~pad], rtol=0, atol=1e-5)
    # indices equal, except where the reference similarities tie (then either order is a valid answer)
    for r, j in np.argwhere(idx != ref_idx):
        assert idx[r, j] >= 0, (r, j)
        assert abs(full[r, idx[r, j]] - ref_sims[r, j]) <= TIE_TOL, (r, j, idx[r, j], ref_idx[r, j])
    for r in range(idx.shape[0]):
        valid = idx[r][idx[r] >= 0]
        assert len(set(valid.tolist())) == valid.size  # no neighbour twice
    assert np.all(np.diff(np.where(np.isneginf(sims), -1e30, sims), axis=1) <= 0)  # descending


# ---------------------------------------------------------------------------------------------------- exact


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("chunk_size", [13, 4096])
def test_exact_matches_brute_force(metric, k, chunk_size):
    rng = np.random.default_rng(k * 31 + chunk_size)
    q = rng.standard_normal((120, 24))
    b = rng.standard_normal((300, 24)) * rng.uniform(0.5, 3.0, size=(300, 1))  # norms matter for "ip"
    sims, idx = knn(q, b, k, metric=metric, exact=True, device="cpu", chunk_size=chunk_size)
    ref_sims, ref_idx, full = _brute(q, b, k, metric)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)


def test_float64_and_integer_input_accepted():
    rng = np.random.default_rng(1)
    b = rng.integers(1, 6, size=(50, 8))
    q = rng.standard_normal((10, 8))  # float64
    sims, idx = knn(q, b, 5)
    ref_sims, ref_idx, full = _brute(q, b, 5)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)


def test_non_contiguous_input():
    rng = np.random.default_rng(2)
    b = rng.standard_normal((16, 60))[:, ::2].T  # (30, 16), Fortran-ordered view
    q = rng.standard_normal((40, 8))[::2].repeat(2, axis=1)  # (20, 16), strided rows
    sims, idx = knn(q, b, 4)
    ref_sims, ref_idx, full = _brute(q, b, 4)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)


def test_chunk_size_does_not_change_the_answer():
    rng = np.random.default_rng(3)
    q, b = rng.standard_normal((64, 16)), rng.standard_normal((200, 16))
    a = knn(q, b, 9, chunk_size=1)
    c = knn(q, b, 9, chunk_size=1000)
    np.testing.assert_array_equal(a[1], c[1])
    np.testing.assert_array_equal(a[0], c[0])


# ---------------------------------------------------------------------------------------------------- ties


def test_duplicated_base_rows_come_lowest_index_first():
    rng = np.random.default_rng(4)
    b = rng.standard_normal((200, 16))
    dup = [3, 10, 11, 57, 150]
    b[dup] = b[3] * np.array([[1.0], [2.0], [1.0], [0.5], [1.0]])  # same direction: equal cosine
    q = np.vstack([b[3], rng.standard_normal((5, 16))])
    sims, idx = knn(q, b, 3, chunk_size=2)
    np.testing.assert_array_equal(idx[0], [3, 10, 11])
    assert sims[0, 0] == sims[0, 1] == sims[0, 2]
    np.testing.assert_allclose(sims[0], 1.0, atol=1e-6)
    sims, idx = knn(q, b, 8)
    np.testing.assert_array_equal(idx[0, :5], dup)
    ref_sims, ref_idx, full = _brute(q, b, 8)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)


def test_massive_ties_beyond_the_faiss_candidate_limit():
    """More identical base rows than faiss is ever asked for: the blocked brute force must order them."""
    rng = np.random.default_rng(5)
    n = index_mod._FAISS_MAX_K + 700
    b = rng.standard_normal((n, 8))
    tied = np.sort(rng.choice(n, size=index_mod._FAISS_MAX_K + 300, replace=False))
    b[tied] = b[tied[0]]
    q = np.vstack([b[tied[0]], -b[tied[0]], rng.standard_normal((3, 8))])
    sims, idx = knn(q, b, 6)
    np.testing.assert_array_equal(idx[0], tied[:6])
    ref_sims, ref_idx, full = _brute(q, b, 6)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)
    np.testing.assert_array_equal(idx[:2], ref_idx[:2])


def test_ties_in_inner_product_mode():
    b = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.25, 0.5], [1.0, 0.0]])
    q = np.array([[1.0, 0.0], [1.0, 1.0]])
    sims, idx = knn(q, b, 5, metric="ip")
    np.testing.assert_array_equal(idx[0, :3], [0, 2, 4])
    np.testing.assert_array_equal(idx[1], [0, 1, 2, 4, 3])  # all of 0, 1, 2, 4 give 1.0
    np.testing.assert_allclose(sims[1], [1, 1, 1, 1, 0.75])


# ---------------------------------------------------------------------------------------------------- k, empty


def test_k_larger_than_n():
    rng = np.random.default_rng(6)
    q, b = rng.standard_normal((7, 5)), rng.standard_normal((4, 5))
    sims, idx = knn(q, b, 50)
    assert sims.shape == idx.shape == (7, 4)
    for row in idx:
        assert sorted(row.tolist()) == [0, 1, 2, 3]
    ref_sims, ref_idx, full = _brute(q, b, 50)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)


def test_empty_query_returns_empty_arrays():
    b = np.random.default_rng(7).standard_normal((9, 3))
    sims, idx = knn(np.zeros((0, 3)), b, 4)
    assert sims.shape == idx.shape == (0, 4)
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    sims, idx = knn(np.zeros((0, 3)), b, 40, query_groups=[], base_groups=list(range(9)))
    assert sims.shape == (0, 9)


# ---------------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("k", [1, 10, 120])
def test_group_exclusion_matches_reference(k):
    rng = np.random.default_rng(100 + k)
    n, m = 400, 90
    b, q = rng.standard_normal((n, 12)), rng.standard_normal((m, 12))
    bg = rng.choice(["s01", "s02", "s03", "s04", "s05"], size=n, p=[0.5, 0.2, 0.1, 0.1, 0.1])  # groups >> k
    qg = rng.choice(["s01", "s02", "s05", "other"], size=m)
    q[:10] = b[np.flatnonzero(bg == "s01")[:10]]  # exact copies inside the own group must not come back
    sims, idx = knn(q, b, k, query_groups=qg, base_groups=bg, chunk_size=32)
    ref_sims, ref_idx, full = _brute(q, b, k, qg=qg, bg=bg)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)
    for r in range(m):
        got = idx[r][idx[r] >= 0]
        assert not np.any(bg[got] == qg[r])


def test_group_exclusion_pads_with_minus_one_and_minus_inf():
    rng = np.random.default_rng(8)
    b = rng.standard_normal((10, 4))
    bg = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 2])
    q = rng.standard_normal((3, 4))
    qg = np.array([0, 1, 9])  # group 0 leaves 3 rows, group 1 leaves 8, group 9 is not in the base
    sims, idx = knn(q, b, 5, query_groups=qg, base_groups=bg)
    assert idx.shape == (3, 5)
    np.testing.assert_array_equal(idx[0, 3:], [-1, -1])
    assert np.all(np.isneginf(sims[0, 3:])) and np.all(np.isfinite(sims[0, :3]))
    assert sorted(idx[0, :3].tolist()) == [7, 8, 9]
    assert np.all(idx[1:] >= 0) and np.all(np.isfinite(sims[1:]))
    ref_sims, ref_idx, full = _brute(q, b, 5, qg=qg, bg=bg)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)
    # every base row in the query's group: nothing valid at all
    sims, idx = knn(q[:1], b[:7], 2, query_groups=[0], base_groups=bg[:7])
    np.testing.assert_array_equal(idx, [[-1, -1]])
    assert np.all(np.isneginf(sims))


def test_group_larger_than_faiss_limit_uses_exact_fallback():
    rng = np.random.default_rng(9)
    n = index_mod._FAISS_MAX_K + 500
    b = rng.standard_normal((n, 6))
    bg = np.where(np.arange(n) < index_mod._FAISS_MAX_K + 100, "big", rng.choice(["a", "b", "c"], size=n))
    q = np.vstack([b[:5], rng.standard_normal((20, 6))])
    qg = np.array(["big"] * 10 + ["a"] * 10 + ["zzz"] * 5)
    sims, idx = knn(q, b, 15, query_groups=qg, base_groups=bg)
    ref_sims, ref_idx, full = _brute(q, b, 15, qg=qg, bg=bg)
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)


def test_mixed_hashable_group_labels():
    rng = np.random.default_rng(10)
    b, q = rng.standard_normal((30, 5)), rng.standard_normal((6, 5))
    bg = [("site", i % 3) for i in range(30)]
    qg = [("site", 0), ("site", 1), ("site", 2), ("site", 7), ("site", 0), ("site", 1)]
    sims, idx = knn(q, b, 12, query_groups=qg, base_groups=bg)
    ref_sims, ref_idx, full = _brute(q, b, 12, qg=[str(g) for g in qg], bg=[str(g) for g in bg])
    _assert_same_neighbours(sims, idx, ref_sims, ref_idx, full)


def test_neighbour_index_fitted_with_groups_searches_with_or_without_them():
    rng = np.random.default_rng(11)
    b, q = rng.standard_normal((80, 7)), rng.standard_normal((15, 7))
    bg = rng.integers(0, 4, size=80)
    index = NeighbourIndex(metric="cosine").fit(b, groups=bg)
    plain = index.search(q, 6)
    _assert_same_neighbours(*plain, *_brute(q, b, 6))
    qg = rng.integers(0, 4, size=15)
    _assert_same_neighbours(*index.search(q, 6, groups=qg), *_brute(q, b, 6, qg=qg, bg=bg))


# ---------------------------------------------------------------------------------------------------- approximate


def _clustered(rng, n, d, centers, noise=0.35):
    lab = rng.integers(0, len(centers), size=n)
    return centers[lab] + noise * rng.standard_normal((n, d))


def test_approximate_recall_and_exact_reranking():
    rng = np.random.default_rng(12)
    d = 32
    centers = rng.standard_normal((60, d))
    b = _clustered(rng, 6000, d, centers)
    q = _clustered(rng, 300, d, centers)
    index = NeighbourIndex(exact=False, device="cpu", nprobe=8).fit(b)
    sims, idx = index.search(q, 10)
    assert index._ivf is not None  # the IVF index was really used
    ref_sims, ref_idx, full = _brute(q, b, 10)
    recall = np.mean([len(set(a) & set(r)) / 10 for a, r in zip(idx.tolist(), ref_idx.tolist(), strict=True)])
    assert recall >= 0.95, recall
    # similarities are exact for the returned indices (re-ranked), sorted descending, no duplicates
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, axis=1), rtol=0, atol=1e-6)
    assert np.all(np.diff(sims, axis=1) <= 0)
    assert all(len(set(row)) == 10 for row in idx.tolist())


def test_approximate_with_groups_never_returns_own_group_and_never_short():
    rng = np.random.default_rng(13)
    d = 16
    centers = rng.standard_normal((20, d))
    b = _clustered(rng, 3000, d, centers)
    bg = np.repeat(np.arange(30), 100)  # 30 subjects of 100 rows, larger than k
    q = b[::50] + 0.01 * rng.standard_normal((60, d))
    qg = bg[::50]
    sims, idx = knn(q, b, 10, query_groups=qg, base_groups=bg, exact=False)
    assert np.all(idx >= 0) and np.all(np.isfinite(sims))
    for r in range(len(q)):
        assert not np.any(bg[idx[r]] == qg[r])
    ref_sims, ref_idx, full = _brute(q, b, 10, qg=qg, bg=bg)
    recall = np.mean([len(set(a) & set(r)) / 10 for a, r in zip(idx.tolist(), ref_idx.tolist(), strict=True)])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, axis=1), rtol=0, atol=1e-6)


def test_auto_switches_to_approximate_past_the_threshold(monkeypatch):
    rng = np.random.default_rng(14)
    b, q = rng.standard_normal((500, 8)), rng.standard_normal((40, 8))
    small = NeighbourIndex().fit(b)
    _assert_same_neighbours(*small.search(q, 5), *_brute(q, b, 5))
    assert small._ivf is None  # 40 x 500 pairs: exact
    monkeypatch.setattr(index_mod, "APPROX_MIN_PAIRS", 1000)
    monkeypatch.setattr(index_mod, "APPROX_MIN_BASE", 100)
    monkeypatch.setattr(index_mod, "APPROX_MIN_QUERIES", 10)
    few = NeighbourIndex().fit(b)
    few.search(q[:5], 5)
    assert few._ivf is None  # 5 queries: the index build would dominate, stays exact
    big = NeighbourIndex().fit(b)
    sims, idx = big.search(q, 5)
    assert big._ivf is not None
    assert idx.shape == (40, 5) and np.all(idx >= 0)
    forced = NeighbourIndex(exact=True).fit(b)
    forced.search(q, 5)
    assert forced._ivf is None


# ---------------------------------------------------------------------------------------------------- estimator


def test_neighbour_index_is_an_estimator():
    index = NeighbourIndex(metric="ip", exact=True, device="cpu", chunk_size=5)
    assert (index.metric, index.exact, index.device, index.chunk_size) == ("ip", True, "cpu", 5)
    assert not hasattr(index, "n_")
    with pytest.raises(NotFittedError, match="fit"):
        index.search(np.ones((2, 3)), 1)
    b = np.random.default_rng(15).standard_normal((12, 3))
    assert index.fit(b) is index
    assert (index.n_, index.d_) == (12, 3)
    q = np.random.default_rng(16).standard_normal((4, 3))
    _assert_same_neighbours(*index.search(q, 3), *_brute(q, b, 3, metric="ip"))
    _assert_same_neighbours(*index.search(q[:1], 30), *_brute(q[:1], b, 30, metric="ip"))


# ---------------------------------------------------------------------------------------------------- errors


@pytest.fixture()
def qb():
    rng = np.random.default_rng(17)
    return rng.standard_normal((5, 4)), rng.standard_normal((8, 4))


def test_error_empty_base(qb):
    with pytest.raises(IndexInputError, match="base is empty"):
        knn(qb[0], np.zeros((0, 4)), 3)


def test_error_dimension_mismatch(qb):
    with pytest.raises(IndexInputError, match="3 features.*base has 4"):
        knn(qb[0][:, :3], qb[1], 3)


@pytest.mark.parametrize("bad", [np.ones(4), np.ones((2, 2, 4)), np.float32(1.0)])
def test_error_not_2d(qb, bad):
    with pytest.raises(IndexInputError, match="2-D"):
        knn(bad, qb[1], 3)
    with pytest.raises(IndexInputError, match="2-D"):
        knn(qb[0], bad, 3)


def test_error_zero_features():
    with pytest.raises(IndexInputError, match="zero features"):
        knn(np.ones((2, 0)), np.ones((3, 0)), 1)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e300])
def test_error_non_finite(qb, value):
    q, b = qb[0].copy(), qb[1].copy()
    q[2, 1] = value
    with pytest.raises(IndexInputError, match=r"NaN or Inf.*row 2"):
        knn(q, qb[1], 3)
    b[5, 0] = value
    with pytest.raises(IndexInputError, match=r"base contains NaN or Inf.*row 5"):
        knn(qb[0], b, 3)


def test_error_non_numeric(qb):
    with pytest.raises(IndexInputError, match="dtype"):
        knn(np.array([["a", "b"]]), qb[1], 1)
    with pytest.raises(IndexInputError, match="complex"):
        knn(qb[0] + 1j, qb[1], 1)


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "3", None])
def test_error_bad_k(qb, k):
    with pytest.raises(IndexInputError, match="k must be"):
        knn(qb[0], qb[1], k)


def test_error_zero_rows_under_cosine(qb):
    q, b = qb[0].copy(), qb[1].copy()
    b[6] = 0.0
    with pytest.raises(IndexInputError, match=r"zero-norm.*row 6.*metric='ip'"):
        knn(q, b, 3)
    sims, idx = knn(q, b, 8, metric="ip")  # fine under inner product: similarity 0
    np.testing.assert_allclose(sims[idx == 6], 0.0)
    q[0] = 0.0
    with pytest.raises(IndexInputError, match="query has 1 zero-norm"):
        knn(q, qb[1], 3)


def test_error_group_lengths(qb):
    q, b = qb
    with pytest.raises(IndexInputError, match="query groups has 4 labels but there are 5 query rows"):
        knn(q, b, 2, query_groups=np.arange(4), base_groups=np.arange(8))
    with pytest.raises(IndexInputError, match="base groups has 9 labels but there are 8 base rows"):
        knn(q, b, 2, query_groups=np.arange(5), base_groups=np.arange(9))
    with pytest.raises(IndexInputError, match="1-D"):
        knn(q, b, 2, query_groups=np.zeros((5, 1)), base_groups=np.arange(8))
    with pytest.raises(IndexInputError, match="missing"):
        knn(q, b, 2, query_groups=[1, 2, None, 3, 4], base_groups=np.arange(8))
    with pytest.raises(IndexInputError, match="missing"):
        knn(q, b, 2, query_groups=np.arange(5), base_groups=np.r_[np.arange(7.0), np.nan])
    with pytest.raises(IndexInputError, match="not hashable"):
        knn(q, b, 2, query_groups=[[1]] * 5, base_groups=np.arange(8))


def test_error_groups_on_one_side_only(qb):
    q, b = qb
    with pytest.raises(IndexInputError, match="only query_groups"):
        knn(q, b, 2, query_groups=np.arange(5))
    with pytest.raises(IndexInputError, match="only base_groups"):
        knn(q, b, 2, base_groups=np.arange(8))
    with pytest.raises(IndexInputError, match="fitted without base groups"):
        NeighbourIndex().fit(b).search(q, 2, groups=np.arange(5))


def test_error_unknown_metric_and_device(qb):
    with pytest.raises(IndexInputError, match="unknown metric 'l2'"):
        knn(*qb, 2, metric="l2")
    with pytest.raises(IndexInputError, match="unknown device 'tpu'"):
        knn(*qb, 2, device="tpu")
    with pytest.raises(IndexInputError, match="exact must be"):
        knn(*qb, 2, exact="yes")
    with pytest.raises(IndexInputError, match="chunk_size"):
        knn(*qb, 2, chunk_size=0)


@pytest.mark.skipif(gpu_available(), reason="checks the error raised when no GPU is available")
def test_error_cuda_requested_without_gpu(qb):
    with pytest.raises(DeviceUnavailableError, match="device='cpu'"):
        knn(*qb, 2, device="cuda")
    sims, idx = knn(*qb, 2, device="auto")  # auto falls back to the CPU cleanly
    _assert_same_neighbours(sims, idx, *_brute(*qb, 2))


def test_error_inner_products_beyond_float32(qb):
    with pytest.raises(IndexInputError, match="float32 range"):
        knn(qb[0] * 1e20, qb[1] * 1e20, 2, metric="ip")


# ---------------------------------------------------------------------------------------------------- GPU


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available()) and gpu_available()
    except ImportError:
        return gpu_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs faiss-gpu and a CUDA GPU")
def test_gpu_matches_cpu():
    rng = np.random.default_rng(18)
    q, b = rng.standard_normal((300, 64)), rng.standard_normal((2000, 64))
    bg, qg = rng.integers(0, 10, 2000), rng.integers(0, 10, 300)
    for kwargs in ({}, {"query_groups": qg, "base_groups": bg}):
        gpu = knn(q, b, 10, device="cuda", **kwargs)
        cpu = knn(q, b, 10, device="cpu", **kwargs)
        np.testing.assert_array_equal(gpu[1], cpu[1])
        np.testing.assert_allclose(gpu[0], cpu[0], rtol=0, atol=1e-6)
    index = NeighbourIndex(device="cuda", exact=False).fit(b)
    sims, idx = index.search(q, 10)
    assert index.device_ == "cuda" and np.all(idx >= 0)


# ---------------------------------------------------------------------------------------------------- selection


def test_packed_key_top_k_equals_the_reference_selection():
    """_topk_by_key (one sort of packed keys) == _select_topk (partition + stable argsort), ties and signs included."""
    rng = np.random.default_rng(11)
    for c, kk in [(46, 32), (9, 9), (5, 8), (40, 1)]:
        vals = rng.choice(np.array([-1.5, -0.25, -0.0, 0.0, 0.25, 0.7, 3.0], dtype=np.float32), size=(64, c))
        vals += rng.standard_normal((64, c)).astype(np.float32) * (rng.random((64, c)) < 0.3)
        ids = np.stack([rng.permutation(10_000)[:c] for _ in range(64)]).astype(np.int64)
        valid = rng.random((64, c)) < 0.8
        got_s, got_i = index_mod._topk_by_key(vals, ids, valid, kk)
        # reference: invalid -> -inf, laid out by increasing id so that equal values keep the lower id first
        order = np.argsort(np.where(valid, ids, np.iinfo(np.int64).max), axis=1, kind="stable")
        s = np.take_along_axis(np.where(valid, vals.astype(np.float64), -np.inf), order, axis=1)
        i = np.take_along_axis(ids, order, axis=1)
        ref_s, ref_i = index_mod._select_topk(s, i, kk)
        np.testing.assert_array_equal(got_s, ref_s)
        np.testing.assert_array_equal(got_i, ref_i)
        assert got_s.dtype == np.float64 and got_i.dtype == np.int64 and got_s.shape == (64, kk)


def test_threaded_rerank_is_bit_identical_to_one_thread(monkeypatch):
    rng = np.random.default_rng(12)
    b = rng.standard_normal((3000, 48)).astype(np.float32)
    q = rng.standard_normal((700, 48)).astype(np.float32)
    monkeypatch.setattr(index_mod, "_RERANK_BUDGET", 48 * 64)  # many parts
    monkeypatch.setattr(index_mod, "_THREADED_PARTS", 2)
    monkeypatch.setattr(index_mod, "_threads", lambda: 3)
    s3, i3 = knn(q, b, 20)
    monkeypatch.setattr(index_mod, "_threads", lambda: 1)
    s1, i1 = knn(q, b, 20)
    np.testing.assert_array_equal(s3, s1)
    np.testing.assert_array_equal(i3, i1)
    ref_s, ref_i, full = _brute(q, b, 20)
    _assert_same_neighbours(s3, i3, ref_s, ref_i, full)
