"""The default mode's matcher: every orientation, the structure-descriptor shortlist, pruned verification.

Real MRI: sagittal slices of nilearn's MNI152 template (one hemisphere: no flip or rotation of one slice is
another slice, and none is a symmetry of itself).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal

from inspector.matching import MemorizationScorer, _union_candidates
from inspector.models import get_extractor
from inspector.preprocess import affine_warp, normalise_volume, resize_square
from inspector.views import DIHEDRAL, View

SIZE = 64
ALL_VIEWS = tuple(v.value for v in DIHEDRAL)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    vol = normalise_volume(np.asarray(nilearn_datasets.load_mni152_template(resolution=2).get_fdata()))
    return np.stack([resize_square(vol[k], SIZE) for k in range(18, 50, 3)]).astype(np.float32)


def _features(images: np.ndarray, views: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    ext = get_extractor("pixels", input_size=SIZE, device="cpu")
    out: dict[str, dict[str, np.ndarray]] = {}
    for v in views:
        x = np.ascontiguousarray(View.parse(v).apply(images))
        with torch.no_grad():
            f = ext.forward_batch(torch.from_numpy(x))
        out[v] = {k: t.numpy().astype(np.float32) for k, t in f.items()}
    return out


@pytest.mark.parametrize("view", list(View))
def test_a_copy_in_any_orientation_is_matched_to_its_source(train: np.ndarray, view: View) -> None:
    src = np.array([1, 5, 9])
    rng = np.random.default_rng(3)
    q = np.clip(view.apply(train[src]) + rng.normal(0, 0.01, (3, SIZE, SIZE)), 0, 1).astype(np.float32)
    sc = MemorizationScorer(device="cpu", shortlist=3).fit(_features(train, ("id",))["id"], images=train)
    res = sc.score_samples(_features(q, ALL_VIEWS), images=q)
    assert_array_equal(res.nearest, src)
    assert res.alignment is not None
    assert_array_equal(res.alignment.flip, [view.value] * 3)
    assert (res.similarity > 0.97).all(), res.similarity
    # the candidates hold the source
    assert res.candidates is not None and (res.candidates == src[:, None]).any(1).all()


def test_flips_only_views_miss_a_transposed_copy(train: np.ndarray) -> None:
    src = np.array([2, 6])
    q = np.ascontiguousarray(View.TRANSPOSE.apply(train[src]))
    flips = ("id", "hflip", "vflip", "hvflip")
    # small angles only: with any angle, a flip and a 90-degree rotation express a transpose
    sc = MemorizationScorer(device="cpu", shortlist=3, descriptor_shortlist=0, rotation_shortlist=0, max_angle=15).fit(
        _features(train, ("id",))["id"], images=train
    )
    four = sc.score_samples(_features(q, flips), images=q).similarity
    eight = sc.score_samples(_features(q, ALL_VIEWS), images=q).similarity
    assert (eight > 0.98).all() and (four < eight - 0.1).all(), (four, eight)


def test_descriptor_shortlist_finds_the_source_when_the_features_cannot(train: np.ndarray) -> None:
    # features that say nothing (random, fixed per slice): only the structure descriptor can shortlist
    rng = np.random.default_rng(0)
    n = len(train)
    feats = {"noise": rng.normal(size=(n, 16)).astype(np.float32)}
    src = np.array([0, 4, 7, 10])
    zoom = torch.tensor([0.7, 0.8, 1.3, 1.5])
    q = affine_warp(torch.from_numpy(train[src]), 0.0, (0.03, -0.02), zoom).numpy()
    qf = {"id": {"noise": rng.normal(size=(len(src), 16)).astype(np.float32)}}
    off = MemorizationScorer(device="cpu", shortlist=1, descriptor_shortlist=0, rotation_shortlist=0).fit(
        feats, images=train
    )
    on = MemorizationScorer(device="cpu", shortlist=1, descriptor_shortlist=2, rotation_shortlist=0).fit(
        feats, images=train
    )
    r_off, r_on = off.score_samples(qf, images=q), on.score_samples(qf, images=q)
    assert (r_on.candidates == src[:, None]).any(1).all()
    assert_array_equal(r_on.nearest, src)
    assert (r_on.similarity > 0.97).all(), r_on.similarity
    assert r_on.similarity.mean() > r_off.similarity.mean() + 0.1


def test_pruned_verification_agrees_with_full_verification(train: np.ndarray) -> None:
    src = np.array([3, 8, 10])
    q = affine_warp(torch.from_numpy(np.ascontiguousarray(View.HFLIP.apply(train[src]))), 6.0, (0.04, 0.0), 1.1)
    q = q.numpy()
    f_t = _features(train, ("id",))["id"]
    f_q = _features(q, ALL_VIEWS)
    full = MemorizationScorer(device="cpu", verify_top=0).fit(f_t, images=train).score_samples(f_q, images=q)
    pruned = MemorizationScorer(device="cpu", verify_top=2).fit(f_t, images=train).score_samples(f_q, images=q)
    assert_array_equal(pruned.nearest, full.nearest)
    assert np.abs(pruned.similarity - full.similarity).max() < 0.02
    with pytest.raises(ValueError, match="verify_top"):
        MemorizationScorer(verify_top=-1).fit(f_t, images=train)
    with pytest.raises(ValueError, match="descriptor_shortlist"):
        MemorizationScorer(descriptor_shortlist=-1).fit(f_t, images=train)
    with pytest.raises(ValueError, match="rotation_shortlist"):
        MemorizationScorer(rotation_shortlist=-1).fit(f_t, images=train)
    with pytest.raises(ValueError, match=r"max_angle must be in \[0, 180\]"):
        MemorizationScorer(max_angle=-5).fit(f_t, images=train)


def test_pairs_are_registered_in_blocks_with_the_same_result(train: np.ndarray, monkeypatch) -> None:
    import inspector.align as A
    import inspector.matching as M

    rng = np.random.default_rng(3)
    fr, mr = rng.integers(0, len(train), 10), rng.integers(0, len(train), 10)
    one = A.register_pairs(train[fr], train[mr], device="cpu", batch_size=3, max_angle=180.0)
    monkeypatch.setattr(M, "PAIR_BLOCK", 3)  # blocks of one batch each, the last one short
    blocks = M.register_blocks(train, fr, train, mr, device="cpu", batch_size=3, max_angle=180.0)
    for key in ("ncc", "angle", "scale", "shift", "overlap"):
        assert_array_equal(getattr(blocks, key), getattr(one, key))
    assert list(blocks.flip) == list(one.flip)
    given = M.register_blocks(train, fr, train, mr, flips=one.flip, device="cpu", batch_size=3)
    assert_array_equal(given.flip, one.flip)
    with pytest.raises(ValueError, match="same shape"):
        M.register_blocks(train, fr, train, mr[:4])


def test_union_of_candidate_lists_reference() -> None:
    a = np.array([[3, 1, -1], [0, 2, 5]])
    av = np.array([[0, 1, 0], [2, 2, 2]])
    b = np.array([[1, 7], [9, 0]])
    bv = np.array([[4, 5], [6, 7]])
    cand, view = _union_candidates(a, av, b, bv)
    assert_array_equal(cand, [[3, 1, -1, 7, -1], [0, 2, 5, 9, -1]])
    assert_array_equal(view, [[0, 1, 0, 5, 0], [2, 2, 2, 6, 0]])


def test_zoomed_descriptor_entries_find_a_zoomed_in_copy(train: np.ndarray) -> None:
    # a copy zoomed in 1.5-1.7x (the anatomy cut by the frame) has other moments than its whole source; the
    # descriptor's zoomed training entries shortlist it, and the registration finds the zoom
    rng = np.random.default_rng(1)
    n = len(train)
    feats = {"noise": rng.normal(size=(n, 16)).astype(np.float32)}
    src = np.arange(n)
    zoom = torch.from_numpy(rng.uniform(1.5, 1.7, n).astype(np.float32))
    q = affine_warp(torch.from_numpy(train[src]), 0.0, (0.0, 0.0), zoom).numpy()
    qf = {"id": {"noise": rng.normal(size=(n, 16)).astype(np.float32)}}
    kw = {"device": "cpu", "shortlist": 1, "descriptor_shortlist": 1, "rotation_shortlist": 0}
    off = MemorizationScorer(descriptor_zooms=(), **kw).fit(feats, images=train)
    on = MemorizationScorer(**kw).fit(feats, images=train)
    from inspector.descriptors import DESCRIPTOR_ZOOM_SIZES, DESCRIPTOR_ZOOMS

    assert off.desc_zoom_train_ is None
    # every slice under every zoom, keeping the zoomed entries' thumbnail sizes only
    assert on.desc_zoom_train_.shape == (len(DESCRIPTOR_ZOOMS) * n, sum(k * k for k in DESCRIPTOR_ZOOM_SIZES))
    r_off, r_on = off.score_samples(qf, images=q), on.score_samples(qf, images=q)
    found_on = (r_on.candidates == src[:, None]).any(1)
    found_off = (r_off.candidates == src[:, None]).any(1)
    assert found_on.mean() >= 0.9 and found_on.mean() > found_off.mean(), (found_on, found_off)
    ok = r_on.nearest == src
    assert ok.mean() >= 0.9
    assert r_on.alignment is not None
    np.testing.assert_allclose(r_on.alignment.scale[ok], zoom.numpy()[ok], rtol=0.05)
    with pytest.raises(ValueError, match="descriptor_zooms"):
        MemorizationScorer(descriptor_zooms=(0.8,), **kw).fit(feats, images=train)
    with pytest.raises(ValueError, match="descriptor_zoom_sizes"):
        MemorizationScorer(descriptor_zoom_sizes=(16,), **kw).fit(feats, images=train)
    with pytest.raises(ValueError, match="non-empty"):
        MemorizationScorer(descriptor_zoom_sizes=(), **kw).fit(feats, images=train)
    # one zoom only (its base is searched as the zoomed entries, not as the whole slices), at every size
    one = MemorizationScorer(descriptor_zooms=(1.6,), descriptor_zoom_sizes=None, **kw).fit(feats, images=train)
    assert one.desc_zoom_train_.shape == (n, one.desc_train_.shape[1])
    found_one = (one.score_samples(qf, images=q).candidates == src[:, None]).any(1)
    assert found_one.mean() > found_off.mean(), (found_one, found_off)


def test_search_indexes_are_built_once_and_answer_as_knn(train: np.ndarray, monkeypatch) -> None:
    """Every search base gets one index per fit, reused by every view and query set; answers equal knn's."""
    import inspector.matching as matching
    from inspector.index import knn

    built: list[int] = []
    original = matching.NeighbourIndex.fit

    def counting_fit(self, base, groups=None):
        built.append(len(base))
        return original(self, base, groups=groups)

    monkeypatch.setattr(matching.NeighbourIndex, "fit", counting_fit)
    groups = np.repeat(["a", "b", "c", "d"], [3, 3, 3, len(train) - 9])
    feats = _features(train, ("id",))["id"]
    sc = MemorizationScorer(device="cpu", shortlist=3).fit(feats, images=train, groups=groups)
    q = train[[0, 4, 8]]
    qv = _features(q, ("id", "hflip", "rot90"))
    first = sc.score_samples(qv, images=q)
    n_first = len(built)
    second = sc.score_samples(qv, images=q, groups=groups[[0, 4, 8]])
    assert len(built) == n_first  # nothing rebuilt for the second query set, with or without groups
    # concat, each layer, descriptor, zoomed entries, rotation-invariant descriptor
    assert n_first == len(sc._indexes) == 1 + len(sc.layers_) + 3
    assert_array_equal(first.nearest, [0, 4, 8])
    assert not np.isin(second.nearest, [0, 4, 8]).any()  # own subject excluded
    white = sc._white(sc.layers_[0], qv["id"][sc.layers_[0]])
    s_ref, i_ref = knn(white, sc.train_white_[sc.layers_[0]], 3, metric="ip")
    s_got, i_got = sc._search(f"layer:{sc.layers_[0]}", white, 3, None)
    assert_array_equal(i_got, i_ref)
    np.testing.assert_allclose(s_got, s_ref, rtol=0, atol=1e-6)
    sc.fit(feats, images=train, groups=groups)
    assert sc._indexes == {}  # a new fit forgets the old indexes


def test_training_rows_scored_in_parts_equal_one_call(train: np.ndarray) -> None:
    """pipeline.score_rows (the volume null's training part) reads and scores a few rows at a time: same result."""
    from inspector.pipeline import score_rows

    groups = np.repeat(["a", "b", "c", "d"], [3, 3, 3, len(train) - 9])
    feats = _features(train, ("id",))["id"]
    sc = MemorizationScorer(device="cpu", shortlist=3).fit(feats, images=train, groups=groups)
    rows = np.array([0, 2, 4, 5, 7, 9, 10])
    whole = sc.score_samples({"id": {k: v[rows] for k, v in feats.items()}}, images=train[rows], groups=groups[rows])
    seen: list[tuple[str, int, int]] = []
    parts = score_rows(sc, feats, train, groups, rows, progress=lambda *a: seen.append(a), part=3)
    for name in ("similarity", "nearest", "feature_similarity", "margin"):
        assert_array_equal(getattr(parts, name), getattr(whole, name))
    assert_array_equal(parts.candidates, whole.candidates)
    assert (groups[parts.nearest] != groups[rows]).all()  # leave-one-subject-out in every part
    assert all(total == rows.size and 0 <= done <= total for _, done, total in seen)
    with pytest.raises(ValueError, match="part must be >= 1"):
        score_rows(sc, feats, train, groups, rows, part=0)


def test_rotation_shortlist_and_any_angle_find_a_copy_rotated_by_any_angle(train: np.ndarray) -> None:
    # features that say nothing, the structure descriptor off: only the rotation-invariant descriptor can
    # shortlist a copy rotated far from every 90-degree step, and only the any-angle registration verifies it
    rng = np.random.default_rng(5)
    n = len(train)
    feats = {"noise": rng.normal(size=(n, 16)).astype(np.float32)}
    src = np.array([1, 4, 6, 9])
    angle = torch.tensor([-135.0, -52.0, 37.0, 160.0])
    q = affine_warp(torch.from_numpy(train[src]), angle, (0.02, -0.03), 1.1).numpy()
    qf = {"id": {"noise": rng.normal(size=(len(src), 16)).astype(np.float32)}}
    kw = {"device": "cpu", "shortlist": 1, "descriptor_shortlist": 0}
    on = MemorizationScorer(rotation_shortlist=2, **kw).fit(feats, images=train)
    off = MemorizationScorer(rotation_shortlist=0, max_angle=15, **kw).fit(feats, images=train)
    r_on, r_off = on.score_samples(qf, images=q), off.score_samples(qf, images=q)
    assert (r_on.candidates == src[:, None]).any(1).all()
    assert_array_equal(r_on.nearest, src)
    assert (r_on.similarity > 0.97).all(), r_on.similarity
    assert r_on.alignment is not None
    assert r_on.similarity.mean() > r_off.similarity.mean() + 0.1


def test_small_rotation_views_are_scored_beside_the_descriptor_shortlist(train: np.ndarray) -> None:
    # feature views may include small rotations ("rot+5"); the descriptor search runs under the orientations
    from inspector.views import apply_view

    src = np.array([2, 7])
    q = np.ascontiguousarray(View.HFLIP.apply(train[src]))
    ext = get_extractor("pixels", input_size=SIZE, device="cpu")

    def feats(x: np.ndarray, views: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
        with torch.no_grad():
            return {
                v: {k: t.numpy() for k, t in ext.forward_batch(torch.from_numpy(apply_view(x, v))).items()}
                for v in views
            }

    sc = MemorizationScorer(device="cpu", shortlist=2, descriptor_shortlist=2, rotation_shortlist=0).fit(
        feats(train, ("id",))["id"], images=train
    )
    with_rot = sc.score_samples(feats(q, ("id", "rot+5", "hflip", "rot-5")), images=q)
    assert_array_equal(with_rot.nearest, src)
    assert (with_rot.similarity > 0.97).all(), with_rot.similarity
    # the descriptor's candidates are those of the orientations alone, under the same view indices
    only = sc._descriptor_candidates(q, ["id", "hflip"], None)
    mixed = sc._descriptor_candidates(q, ["id", "rot+5", "hflip", "rot-5"], None)
    for (s_a, i_a, v_a), (s_b, i_b, v_b) in zip(only, mixed, strict=True):
        assert_array_equal(i_a, i_b)
        assert_array_equal(s_a, s_b)
        assert_array_equal(np.array(["id", "hflip"])[v_a], np.array(["id", "rot+5", "hflip", "rot-5"])[v_b])
