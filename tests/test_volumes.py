"""Volumes as a unit: slice runs, 3D registration, volume calibration, the volume stage end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose, assert_array_equal

from inspector.calibration import Calibration
from inspector.volumes import (
    VolumeRef,
    fisher_z,
    group_volumes,
    match_weights,
    register_volumes,
    resample_to,
    run_z_map,
    slice_runs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- fixtures
def blob_volume(seed: int, shape: tuple[int, int, int] = (28, 48, 48)) -> np.ndarray:
    """A head-like volume: an ellipsoid of smooth random texture on a zero background, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand((1, 1, 6, 10, 10), generator=g)
    tex = F.interpolate(noise, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    d, h, w = shape
    z, y, x = np.meshgrid(
        (np.arange(d) + 0.5) / d * 2 - 1,
        (np.arange(h) + 0.5) / h * 2 - 1,
        (np.arange(w) + 0.5) / w * 2 - 1,
        indexing="ij",
    )
    inside = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.95) ** 2 <= 1.0
    vol = np.where(inside, 0.25 + 0.75 * tex, 0.0).astype(np.float32)
    return vol


def rotate(vol: np.ndarray, deg: float, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Rotate about the volume centre in normalised (x, y, z) coordinates, trilinear."""
    a = math.radians(deg)
    m = torch.eye(3)
    i, j = axes
    m[i, i], m[j, j], m[i, j], m[j, i] = math.cos(a), math.cos(a), -math.sin(a), math.sin(a)
    theta = torch.cat([m, torch.zeros(3, 1)], 1)[None]
    t = torch.from_numpy(vol)[None, None]
    grid = F.affine_grid(theta, list(t.shape), align_corners=False)
    return F.grid_sample(t, grid, align_corners=False)[0, 0].numpy()


# ---------------------------------------------------------------------------------------------- grouping and runs
def test_group_volumes_orders_slices_by_index():
    refs = group_volumes(["a", "b", "a", "a", "b"], [5, 1, 3, 4, 0], ["s1", "s2", "s1", "s1", "s2"])
    assert [r.volume for r in refs] == ["a", "b"]
    assert refs[0].rows.tolist() == [2, 3, 0] and refs[0].slice_index.tolist() == [3, 4, 5]
    assert refs[1].rows.tolist() == [4, 1] and refs[1].subject_id == "s2"
    with pytest.raises(ValueError, match="one length"):
        group_volumes(["a"], [1, 2], ["s"])


def _train_index(n_vols: int, n_slices: int) -> tuple[list[VolumeRef], np.ndarray, np.ndarray]:
    refs, vol_of, sidx = [], [], []
    for v in range(n_vols):
        rows = np.arange(v * n_slices, (v + 1) * n_slices)
        refs.append(VolumeRef(f"t{v}", rows, np.arange(n_slices), f"s{v}"))
        vol_of += [v] * n_slices
        sidx += list(range(n_slices))
    return refs, np.asarray(vol_of), np.asarray(sidx)


@pytest.mark.parametrize("slope,offset", [(1.0, 0.0), (1.0, 7.0), (-1.0, 29.0), (2.0, 1.0), (0.5, 3.0)])
def test_slice_runs_find_the_copied_volume_and_its_line(slope, offset):
    rng = np.random.default_rng(0)
    train, vol_of, sidx = _train_index(5, 40)
    n = 16
    query = VolumeRef("q", np.arange(n), np.arange(n), "sq")
    true_idx = np.clip(np.round(slope * np.arange(n) + offset), 0, 39).astype(int)
    matches = np.stack([2 * 40 + true_idx, rng.integers(0, 200, n), rng.integers(0, 200, n)], 1)
    # a fifth of the slices matched elsewhere (a wrong final match)
    wrong = rng.choice(n, n // 5, replace=False)
    matches[wrong, 0] = rng.integers(0, 80, wrong.size)
    weights = np.tile([0.95, 0.4, 0.4], (n, 1))
    runs = slice_runs(query, train, vol_of, sidx, matches, weights)
    best = runs[0]
    assert best.train_volume == 2
    assert best.slope == pytest.approx(slope, abs=0.15)
    assert best.n_inliers >= n - wrong.size - 1
    assert best.consistency > 0.6
    assert all(r.consistency <= best.consistency for r in runs)


def test_slice_runs_of_a_novel_volume_are_inconsistent():
    rng = np.random.default_rng(1)
    train, vol_of, sidx = _train_index(6, 30)
    n = 20
    query = VolumeRef("q", np.arange(n), np.arange(n), "sq")
    matches = rng.integers(0, 180, (n, 3))
    weights = np.full((n, 3), 0.8)
    runs = slice_runs(query, train, vol_of, sidx, matches, weights)
    assert runs[0].consistency < 0.45


def test_slice_runs_checks_shapes():
    train, vol_of, sidx = _train_index(2, 5)
    q = VolumeRef("q", np.arange(4), np.arange(4), "s")
    with pytest.raises(ValueError, match="shape"):
        slice_runs(q, train, vol_of, sidx, np.zeros((3, 2), int), np.zeros((3, 2)))


def test_run_z_map_maps_the_slab_onto_its_place():
    train = VolumeRef("t", np.arange(40), np.arange(40), "s")
    query = VolumeRef("q", np.arange(20), np.arange(20), "s")
    from inspector.volumes import SliceRun, _z_normalised

    run = SliceRun(0, 1.0, 10.0, 20, 1.0, 0, 19)
    a, t = run_z_map(run, query, train)
    zq = _z_normalised(np.array([0.0, 19.0]), query.slice_index)
    zt = _z_normalised(np.array([10.0, 29.0]), train.slice_index)
    assert_allclose(a * zq + t, zt, atol=1e-9)
    assert a == pytest.approx(0.5)


def test_match_weights_puts_the_final_match_first():
    m, w = match_weights(np.array([0.9, 1.2]), np.array([3, 4]), np.array([[3, 5], [6, 4]]))
    assert m.tolist() == [[3, -1, 5], [4, 6, -1]]
    assert_allclose(w, [[0.9, 0.45, 0.45], [1.0, 0.5, 0.5]])
    m, w = match_weights(np.array([0.5]), np.array([2]), None)
    assert m.tolist() == [[2]] and w.tolist() == [[0.5]]


# ---------------------------------------------------------------------------------------------- registration
def test_resample_to_with_the_identity_returns_the_volume():
    v = blob_volume(0)
    eye = np.c_[np.eye(3), np.zeros(3)]
    assert_allclose(resample_to(v, eye, v.shape), v, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        resample_to(v, np.eye(3), v.shape)


@pytest.mark.parametrize(
    "name,make",
    [
        ("exact", lambda v: v.copy()),
        ("lr flip", lambda v: v[:, :, ::-1].copy()),
        ("transpose", lambda v: np.ascontiguousarray(v.transpose(0, 2, 1))),
        ("reversed slices", lambda v: v[::-1].copy()),
        ("in-plane rotation 8 deg", lambda v: rotate(v, 8.0, (0, 1))),
        ("tilt 6 deg", lambda v: rotate(v, 6.0, (1, 2))),
        ("intensity", lambda v: np.clip(0.8 * v + 0.05 * (v > 0), 0, 1)),
    ],
)
def test_register_volumes_verifies_3d_copies_and_not_other_volumes(name, make):
    src = blob_volume(1)
    other = blob_volume(2)
    q = make(src).astype(np.float32)
    al = register_volumes(q, [src, other], device="cpu")
    assert al[0].score > 0.95, (name, al[0])
    assert al[0].score > al[1].score + 0.1, (name, al[0].score, al[1].score)
    assert al[0].matrix.shape == (3, 4)
    # the transform brings the training volume onto the query
    back = resample_to(src, al[0].matrix, q.shape)
    head = q > 0.06
    assert np.corrcoef(back[head], q[head])[0, 1] > 0.9


def test_register_volumes_finds_a_slab_from_its_slice_run():
    src = blob_volume(3, (36, 40, 40))
    slab = src[12:24].copy()
    train = VolumeRef("t", np.arange(36), np.arange(36), "s")
    query = VolumeRef("q", np.arange(12), np.arange(12), "s")
    from inspector.volumes import SliceRun

    zmap = run_z_map(SliceRun(0, 1.0, 12.0, 12, 1.0, 0, 11), query, train)
    al = register_volumes(slab, [src, blob_volume(4, (36, 40, 40))], z_maps=[zmap, None], device="cpu")
    assert al[0].score > 0.95 and al[0].coverage > 0.95
    assert al[0].score > al[1].score + 0.1


def test_the_coarse_starts_are_scored_in_chunks_with_the_same_result(monkeypatch):
    import inspector.volumes as vm

    q = rotate(blob_volume(5), 6.0, (0, 1)).astype(np.float32)
    train = [blob_volume(5), blob_volume(6)]
    monkeypatch.setattr(vm, "EVAL_VOXELS", 1 << 30)
    monkeypatch.setattr(vm, "GN_VOXELS", 1 << 30)
    whole = register_volumes(q, train, device="cpu")
    # the chunked scores equal the one-batch ones
    qc = vm._to_grid(q, (24, 24, 24), torch.device("cpu"))
    tc = torch.stack([vm._to_grid(t, (24, 24, 24), torch.device("cpu")) for t in train])
    g = torch.Generator().manual_seed(0)
    mats = torch.cat([torch.eye(3)[None].repeat(40, 1, 1) + 0.1 * torch.randn(40, 3, 3, generator=g),
                      0.1 * torch.randn(40, 3, 1, generator=g)], 2)  # fmt: skip
    owner = torch.arange(40) % 2
    base = vm._base((24, 24, 24), torch.device("cpu"))
    ncc, cov = vm._evaluate(qc.expand(40, 24, 24, 24), tc[owner], mats, base)
    monkeypatch.setattr(vm, "EVAL_VOXELS", 7 * 24**3)  # chunks of 7 starts, the last one short
    assert_allclose(vm._evaluate_chunked(qc, tc, owner, mats, base).numpy(), (ncc * cov).numpy(), rtol=0, atol=1e-6)
    monkeypatch.setattr(vm, "GN_VOXELS", 2 * 48**3)  # the refinement two starts at a time (9 kept: one short)
    chunked = register_volumes(q, train, device="cpu")
    for a, b in zip(whole, chunked, strict=True):
        assert_array_equal(a.matrix, b.matrix)
        assert a.score == b.score


def test_register_volumes_checks_its_inputs():
    with pytest.raises(ValueError, match="volume"):
        register_volumes(np.zeros((4, 4)), [np.zeros((4, 4, 4))])
    assert register_volumes(blob_volume(0), []) == []
    with pytest.raises(ValueError, match="z_maps"):
        register_volumes(blob_volume(0), [blob_volume(1)], z_maps=[None, None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_register_volumes_on_cuda_agrees_with_cpu():
    src = blob_volume(1)
    q = rotate(src, 5.0)
    cpu = register_volumes(q, [src], device="cpu")[0]
    gpu = register_volumes(q, [src], device="cuda")[0]
    assert gpu.score == pytest.approx(cpu.score, abs=5e-3)


# ---------------------------------------------------------------------------------------------- calibration
def _calibration(vol_scores: dict[str, float], vol_null: np.ndarray, groups: np.ndarray) -> Calibration:
    rng = np.random.default_rng(0)
    m = groups.size
    return Calibration(
        rng.uniform(0.3, 0.6, m),
        rng.uniform(0.3, 0.6, 200),
        null_kind="holdout",
        groups=groups,
        null_groups=np.repeat(np.arange(10).astype(str), 20),
        volume_scores=vol_scores,
        volume_null=vol_null,
    )


def test_volume_p_values_are_the_robust_student_t_prediction_of_the_similarity():
    from scipy.stats import t as student_t

    groups = np.repeat(["a", "b", "c"], 4)
    null = np.array([0.85, 0.87, 0.88, 0.9, 0.86, 0.84, 0.89, 0.87, 0.86, 0.88, 0.85, 0.87])
    cal = _calibration({"a": 0.99, "b": 0.86, "c": float("nan")}, null, groups)
    n = null.size
    med = np.median(null)
    mad = 1.4826 * np.median(np.abs(null - med))
    ref = student_t.sf((np.array([0.99, 0.86]) - med) / (mad * math.sqrt(1 + 1 / n)), 0.367 * (n - 1))
    order = {v: i for i, v in enumerate(cal.volume_ids)}
    assert cal.volume_verified
    assert_allclose([cal.volume_p_values[order["a"]], cal.volume_p_values[order["b"]]], ref, rtol=1e-10)
    assert "Student-t" in cal.volume_calibration
    # an unverifiable volume keeps its slices' (Bonferroni) p-value
    assert 0 < cal.volume_p_values[order["c"]] <= 1
    flags = cal.volume_flags(0.01)
    assert flags[order["a"]] and not flags[order["b"]]
    v = cal.verdict()
    assert v.unit == "volume" and "3D-verified" in v.test and v.copying


def test_too_few_holdout_volumes_fall_back_with_words():
    groups = np.repeat(["a", "b"], 3)
    cal = _calibration({"a": 0.99, "b": 0.8}, np.array([0.85, 0.86]), groups)
    assert not cal.volume_verified
    assert any("at least 3" in d for d in cal.diagnostics)


@pytest.mark.parametrize("n_null", [10, 28])
@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_volume_flags_hold_their_false_alarm_rate_under_the_null(n_null, alpha):
    """Novel and null volume similarities from one distribution: P(p <= alpha) within [0.5 alpha, 1.5 alpha]."""
    from inspector.calibration import volume_prediction_p_values

    rng = np.random.default_rng(42)
    hits = trials = 0
    for _ in range(4000):
        null = rng.normal(0.87, 0.02, n_null)
        novel = rng.normal(0.87, 0.02, 10)
        hits += int((volume_prediction_p_values(novel, null) <= alpha).sum())
        trials += novel.size
    rate = hits / trials
    assert 0.5 * alpha <= rate <= 1.5 * alpha, rate


def test_a_low_outlier_in_the_null_does_not_blunt_the_flags():
    """A null volume whose registration failed (a low similarity) barely moves the p-values (median, MAD)."""
    from inspector.calibration import volume_prediction_p_values

    rng = np.random.default_rng(3)
    null = rng.normal(0.87, 0.015, 20)
    with_outlier = np.r_[null, 0.2]
    p0 = volume_prediction_p_values([0.95], null)[0]
    p1 = volume_prediction_p_values([0.95], with_outlier)[0]
    assert p1 < 3 * p0
    with pytest.raises(ValueError, match="at least 3"):
        volume_prediction_p_values([0.9], [0.8, 0.85])


def test_fisher_z_clips():
    assert np.isfinite(fisher_z([1.0, -1.0, 0.5])).all()
    assert fisher_z([0.0])[0] == 0.0


def test_the_volume_verdict_is_simes_over_the_volumes_and_holds_its_level():
    from inspector.calibration import simes, volume_prediction_p_values

    groups = np.repeat(["a", "b", "c"], 4)
    null = np.array([0.85, 0.87, 0.88, 0.9, 0.86, 0.84, 0.89, 0.87, 0.86, 0.88, 0.85, 0.87])
    cal = _calibration({"a": 0.95, "b": 0.94, "c": 0.86}, null, groups)
    v = cal.verdict()
    assert v.test.startswith("Simes over 3 volumes")
    assert_allclose(v.test_p_value, simes(cal.volume_p_values), rtol=1e-12)
    # no copy among 10 synthetic volumes, 24 null volumes from the same distribution: false alarms <= 5 % + noise
    rng = np.random.default_rng(7)
    alarms = sum(
        simes(volume_prediction_p_values(rng.normal(0.87, 0.02, 10), rng.normal(0.87, 0.02, 24))) <= 0.05
        for _ in range(2000)
    )
    assert alarms / 2000 <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 2000), alarms
