"""Alignment-verified re-ranking: registration accuracy, verification scores, references and error paths.

Real MRI: nilearn's MNI152 T1 template (bundled, offline). The template is exactly left-right symmetric,
so the flip tests use sagittal slices (anterior-posterior x inferior-superior), where no flip is a symmetry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

import inspector.align as A
from inspector.align import (
    MEASURES,
    Alignment,
    apply_alignment,
    apply_alignment_single,
    pair_ncc,
    register_pairs,
    score_alignment,
)
from inspector.preprocess import affine_warp, normalise_volume, resize_square
from inspector.views import DIHEDRAL, FLIPS, View

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    img = nilearn_datasets.load_mni152_template(resolution=2)
    return normalise_volume(np.asarray(img.get_fdata()), name="MNI152")


def _slices(vol: np.ndarray, axis: int, idx: list[int] | np.ndarray, size: int = SIZE) -> np.ndarray:
    return np.stack([resize_square(np.take(vol, int(i), axis=axis), size) for i in idx])


def _flip_np(x: np.ndarray, flip: str) -> np.ndarray:
    """The flips written out with slicing (independent of inspector.views)."""
    if flip == "id":
        return x
    if flip == "hflip":
        return x[..., :, ::-1]
    if flip == "vflip":
        return x[..., ::-1, :]
    if flip == "hvflip":
        return x[..., ::-1, ::-1]
    raise AssertionError(f"not a flip: {flip!r}")


def _make_copies(src: np.ndarray, seed: int, noise: float = 0.01) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Copies of src: flipped (cycling through all flips), then rotated/shifted/zoomed, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    n = len(src)
    truth = {
        "flip": np.asarray([FLIPS[i % 4].value for i in range(n)], dtype=object),
        "angle": rng.uniform(-12, 12, n).astype(np.float32),
        "shift": rng.uniform(-0.08, 0.08, (n, 2)).astype(np.float32),
        "scale": rng.uniform(0.87, 1.15, n).astype(np.float32),
    }
    flipped = np.stack([np.ascontiguousarray(_flip_np(s, f)) for s, f in zip(src, truth["flip"], strict=True)])
    warped = affine_warp(
        torch.from_numpy(flipped),
        torch.from_numpy(truth["angle"]),
        torch.from_numpy(truth["shift"]),
        torch.from_numpy(truth["scale"]),
    ).numpy()
    fixed = np.clip(warped + rng.normal(0.0, noise, warped.shape), 0.0, 1.0).astype(np.float32)
    return fixed, truth


@pytest.fixture(scope="module")
def sagittal(volume: np.ndarray) -> np.ndarray:
    # one hemisphere of the symmetric template, so no two sources mirror each other
    return _slices(volume, 0, [20, 24, 28, 32, 36, 40, 22, 30])


@pytest.fixture(scope="module")
def copies(sagittal: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], Alignment]:
    fixed, truth = _make_copies(sagittal, seed=1)
    return fixed, truth, register_pairs(fixed, sagittal, flips=None, device="cpu")


# ----------------------------------------------------------------------------------------------
# Registration accuracy on real MRI
# ----------------------------------------------------------------------------------------------


def test_recovers_known_transforms_and_flips(copies, sagittal):
    fixed, truth, al = copies
    assert len(al) == len(sagittal)
    assert set(truth["flip"]) == {"id", "hflip", "vflip", "hvflip"}  # every flip is planted
    assert list(al.flip) == list(truth["flip"])
    assert all(type(f) is str for f in al.flip)  # canonical names, as written to scores.csv
    assert np.abs(al.angle - truth["angle"]).max() < 1.0
    assert np.abs(al.shift - truth["shift"]).max() * SIZE < 1.0
    assert np.abs(al.scale / truth["scale"] - 1).max() < 0.015
    assert al.ncc.min() > 0.95
    assert al.ncc.dtype == np.float32 and al.shift.shape == (len(sagittal), 2)
    assert ((al.overlap > 0) & (al.overlap <= 1)).all()


def test_given_flips_give_the_same_transform(copies, sagittal):
    fixed, truth, al = copies
    given = register_pairs(fixed, sagittal, flips=list(truth["flip"]), device="cpu")
    assert list(given.flip) == list(truth["flip"])
    assert_allclose(given.angle, al.angle, atol=0.05)
    assert_allclose(given.shift, al.shift, atol=0.002)
    assert_allclose(given.ncc, al.ncc, atol=1e-3)


@pytest.mark.parametrize("view", FLIPS, ids=str)
def test_register_pairs_recovers_each_flip(sagittal, view):
    src = sagittal[:3]
    fixed = view.apply(src)  # the flip alone, no warp: fixed = view(moving)
    assert_array_equal(fixed, np.ascontiguousarray(_flip_np(src, view.value)))
    al = register_pairs(fixed, src, flips=None, device="cpu")
    assert list(al.flip) == [view.value] * 3
    assert al.ncc.min() > 0.99
    assert np.abs(al.angle).max() < 0.5 and np.abs(al.shift).max() * SIZE < 0.5
    assert_allclose(al.scale, 1.0, atol=0.01)
    # the recovered flip undoes the planted one: aligning the source reproduces the copy
    assert np.abs(apply_alignment(src, al) - fixed)[:, 8:-8, 8:-8].mean() < 0.01


def test_feature_view_names_are_accepted(sagittal):
    fixed = np.ascontiguousarray(sagittal[:2, :, ::-1])
    al = register_pairs(fixed, sagittal[:2], flips=["h", View.HFLIP], device="cpu")
    assert list(al.flip) == ["hflip", "hflip"]
    assert View.parse("id") is View.ID and View.parse("none") is View.ID and View.parse("HVflip") is View.HVFLIP
    assert al.ncc.min() > 0.99
    # the alias "none" is read as the identity and written as "id"
    ident = register_pairs(sagittal[:2], sagittal[:2], flips="none", device="cpu")
    assert list(ident.flip) == ["id", "id"]
    both = register_pairs(sagittal[:2], sagittal[:2], flips=["none", "identity"], device="cpu")
    assert list(both.flip) == ["id", "id"]


def test_recovers_transforms_on_axial_slices_with_rotation_only(volume):
    src = _slices(volume, 2, [25, 35, 45, 55])
    angles = np.asarray([-12.0, -6.0, 7.5, 12.0], np.float32)
    fixed = affine_warp(torch.from_numpy(src), torch.from_numpy(angles)).numpy()
    al = register_pairs(fixed, src, flips="id", device="cpu")
    assert_allclose(al.angle, angles, atol=0.5)
    assert_allclose(al.scale, 1.0, atol=0.01)
    assert np.abs(al.shift).max() * SIZE < 0.5


def test_copies_score_high_and_neighbour_slices_clearly_lower(volume):
    rng = np.random.default_rng(3)
    cases = [(0, [22, 28, 34, 40]), (1, [35, 55, 75, 90]), (2, [30, 40, 50, 60])]
    src = np.concatenate([_slices(volume, a, idx) for a, idx in cases])
    neighbours = np.concatenate([_slices(volume, a, [i + (3 + k % 4) for k, i in enumerate(idx)]) for a, idx in cases])
    cp = np.clip(src + rng.normal(0.0, 0.01, src.shape), 0, 1).astype(np.float32)
    for measure in ("poly_fg", "ncc"):
        pos = register_pairs(cp, src, measure=measure, device="cpu").ncc
        neg = register_pairs(neighbours, src, measure=measure, device="cpu").ncc
        assert pos.min() > 0.95, measure
        assert neg.max() < pos.min() - 0.01, (measure, neg.max(), pos.min())
    # the default (foreground, quadratic intensity map) separates far better than plain NCC
    pos = register_pairs(cp, src, device="cpu").ncc
    neg = register_pairs(neighbours, src, device="cpu").ncc
    assert neg.max() < 0.95 and np.median(pos) - np.median(neg) > 0.08


def test_default_measure_is_robust_to_gamma(sagittal):
    src = sagittal[:4]
    fixed = src**0.7
    default = register_pairs(fixed, src, flips="id", device="cpu").ncc
    linear = register_pairs(fixed, src, flips="id", device="cpu", measure="ncc_fg").ncc
    assert default.min() > 0.995
    assert (default > linear).all()


def test_aligned_image_reproduces_fixed(copies, sagittal):
    fixed, _, al = copies
    aligned = apply_alignment(sagittal, al)
    assert aligned.shape == sagittal.shape and aligned.dtype == np.float32
    inner = (slice(None), slice(8, -8), slice(8, -8))
    err = np.abs(aligned - fixed)[inner].mean()
    raw = np.abs(sagittal - fixed)[inner].mean()
    assert err < 0.02 and err < raw / 4


def test_apply_alignment_single_agrees_with_batch(copies, sagittal):
    _, _, al = copies
    batch = apply_alignment(sagittal, al)
    for i in range(len(al)):
        one = apply_alignment_single(sagittal[i], al.transform(i))
        assert_allclose(one, batch[i], atol=1e-6)
    # the transform is resolution-free: at 128 px it matches the 64 px result resampled
    big = np.stack([resize_square(s, 128) for s in sagittal])
    big_al = apply_alignment(big, al)
    down = np.stack([resize_square(b, SIZE) for b in big_al])
    assert np.abs(down - batch)[:, 8:-8, 8:-8].mean() < 0.01


def test_apply_alignment_matches_flip_then_affine_warp(sagittal):
    rng = np.random.default_rng(5)
    n = 4
    al = Alignment(
        ncc=np.zeros(n),
        angle=rng.uniform(-10, 10, n),
        scale=rng.uniform(0.9, 1.1, n),
        shift=rng.uniform(-0.05, 0.05, (n, 2)),
        flip=[v.value for v in FLIPS],
    )
    out = apply_alignment(sagittal[:n], al)
    ref = np.stack(
        [
            affine_warp(
                torch.from_numpy(np.ascontiguousarray(_flip_np(sagittal[i], FLIPS[i].value)))[None],
                float(al.angle[i]),
                tuple(al.shift[i].tolist()),
                float(al.scale[i]),
            )[0].numpy()
            for i in range(n)
        ]
    )
    assert_allclose(out, ref, atol=1e-6)


def test_non_square_images(volume):
    src = np.stack([np.take(volume, i, axis=0) for i in (24, 30)])  # (2, 117, 95)
    fixed = affine_warp(torch.from_numpy(_slices(volume, 0, [24, 30])), 6.0).numpy()  # square 64 px copies
    al = register_pairs(fixed, src, flips="id", device="cpu")
    assert_allclose(al.angle, 6.0, atol=0.5)
    out = apply_alignment(src, al)
    assert out.shape == src.shape


def test_score_alignment_reproduces_scores(copies, sagittal):
    fixed, _, al = copies
    assert_allclose(score_alignment(fixed, sagittal, al), al.ncc, atol=1e-5)
    for m in MEASURES:
        s = score_alignment(fixed, sagittal, al, measure=m)
        assert s.shape == (len(al),) and (s > 0.9).all(), m


def test_deterministic_on_cpu(sagittal):
    fixed, _ = _make_copies(sagittal[:4], seed=9)
    a = register_pairs(fixed, sagittal[:4], device="cpu", batch_size=3)
    b = register_pairs(fixed, sagittal[:4], device="cpu", batch_size=3)
    for key in ("ncc", "angle", "scale", "shift"):
        assert_array_equal(getattr(a, key), getattr(b, key))
    assert list(a.flip) == list(b.flip)
    # batching does not change the result beyond float noise
    c = register_pairs(fixed, sagittal[:4], device="cpu", batch_size=256)
    assert_allclose(c.ncc, a.ncc, atol=1e-5)


def test_same_result_with_one_and_several_threads(sagittal):
    # a cluster worker runs one thread: the any-angle search (rings, FFT) must not round differently there
    fixed, _ = _make_copies(sagittal[:6], seed=4)
    fixed[:3] = affine_warp(torch.from_numpy(fixed[:3].copy()), 50.0, (0.03, 0.0), 1.1).numpy()
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(register_pairs(fixed, sagittal[:6], device="cpu", max_angle=180.0))
    finally:
        torch.set_num_threads(before)
    for key in ("ncc", "angle", "scale", "shift"):
        assert_array_equal(getattr(runs[0], key), getattr(runs[1], key))
    assert list(runs[0].flip) == list(runs[1].flip)


def test_starts_are_screened_in_chunks_with_the_same_result(sagittal, monkeypatch):
    # the screening of every (orientation, start) runs in chunks of SCREEN_PIXELS: small chunks, some of them
    # splitting one pair's starts, give the same registration as one chunk per batch
    fixed, _ = _make_copies(sagittal[:5], seed=6)
    fixed[:2] = affine_warp(torch.from_numpy(fixed[:2].copy()), 70.0, (0.02, 0.0), 1.0).numpy()
    kw = dict(device="cpu", max_angle=180.0, orientations=[v.value for v in DIHEDRAL])
    monkeypatch.setattr(A, "SCREEN_PIXELS", 1 << 30)
    whole = register_pairs(fixed, sagittal[:5], **kw)
    monkeypatch.setattr(A, "SCREEN_PIXELS", 7 * 32 * 32)
    chunked = register_pairs(fixed, sagittal[:5], **kw)
    for key in ("ncc", "angle", "scale", "shift"):
        assert_array_equal(getattr(whole, key), getattr(chunked, key))
    assert list(whole.flip) == list(chunked.flip)


def test_progress_and_empty_input(sagittal):
    calls = []
    register_pairs(
        sagittal[:3], sagittal[:3], flips="id", device="cpu", batch_size=2, progress=lambda *a: calls.append(a)
    )
    assert calls == [("aligning", 2, 3), ("aligning", 3, 3)]
    empty = register_pairs(np.zeros((0, 32, 32)), np.zeros((0, 32, 32)), device="cpu")
    assert len(empty) == 0 and empty.shift.shape == (0, 2)


def test_constant_images_score_zero():
    rng = np.random.default_rng(0)
    img = rng.random((2, 32, 32)).astype(np.float32)
    blank = np.zeros((2, 32, 32), np.float32)
    al = register_pairs(blank, img, flips="id", device="cpu")
    assert_array_equal(al.ncc, 0.0)
    assert np.isfinite(al.angle).all() and np.isfinite(al.shift).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(copies, sagittal):  # pragma: no cover - no GPU in CI
    fixed, _, al = copies
    gpu = register_pairs(fixed, sagittal, device="cuda")
    assert list(gpu.flip) == list(al.flip)
    assert_allclose(gpu.ncc, al.ncc, atol=1e-3)
    assert_allclose(gpu.angle, al.angle, atol=0.1)


# ----------------------------------------------------------------------------------------------
# References for the building blocks
# ----------------------------------------------------------------------------------------------


def _ecc_step_reference(f, g, gx, gy, w, X, Y):
    """ECC step written out pixel by pixel (Evangelidis & Psarakis 2008, eq. 21-23), float64."""
    out_rho, out_dp = [], []
    for i in range(f.shape[0]):
        m = w[i] > 0
        ir = f[i][m] - f[i][m].mean()
        iw = g[i][m] - g[i][m].mean()
        J = np.stack([gx[i] * X + gy[i] * Y, gy[i] * X - gx[i] * Y, gx[i], gy[i]], axis=1)[m]
        J = J - J.mean(0)
        H = J.T @ J
        Hinv = np.linalg.inv(H)
        proj_w = iw @ J @ Hinv @ J.T @ iw
        proj_r = ir @ J @ Hinv @ J.T @ iw
        lam = (iw @ iw - proj_w) / (ir @ iw - proj_r)
        out_dp.append(Hinv @ J.T @ (lam * ir - iw))
        out_rho.append(ir @ iw / np.sqrt((ir @ ir) * (iw @ iw)))
    return np.asarray(out_rho), np.asarray(out_dp)


def test_ecc_step_matches_reference():
    rng = np.random.default_rng(0)
    b, r = 3, 16
    f = rng.random((b, r * r))
    g = 0.8 * f + 0.2 * rng.random((b, r * r))
    gx, gy = rng.normal(size=(b, r * r)), rng.normal(size=(b, r * r))
    w = (rng.random((b, r * r)) > 0.2).astype(np.float64)
    X, Y = (t.reshape(-1).numpy() for t in A._base_coords(r, torch.device("cpu"), torch.float64))
    rho, dp, ok = A._ecc_step(*(torch.from_numpy(a) for a in (f, g, gx, gy, w, X, Y)))
    ref_rho, ref_dp = _ecc_step_reference(f, g, gx, gy, w, X, Y)
    assert ok.all()
    assert_allclose(rho.numpy(), ref_rho, rtol=1e-10)
    assert_allclose(dp.numpy(), ref_dp, rtol=1e-5, atol=1e-12)  # the solver's 1e-6 relative ridge


def test_start_scores_without_iterations_match_the_ecc_step(sagittal):
    # iterations=0 scores each start with the masked correlation alone; the same rho as one full ECC step
    rng = np.random.default_rng(4)
    f = torch.from_numpy(sagittal[:6, ::2, ::2].copy()).double()
    m = torch.from_numpy(sagittal[[1, 0, 3, 2, 5, 4], ::2, ::2].copy()).double()
    p = A._params_from_similarity(
        torch.from_numpy(rng.uniform(-10, 10, 6)), torch.from_numpy(rng.uniform(0.9, 1.1, 6)),
        torch.from_numpy(rng.uniform(-0.05, 0.05, (6, 2))),
    )  # fmt: skip
    bounds = (15.0, 0.5, 2.0, 0.3)
    p0, rho0 = A._ecc_refine(f, m, p, 0, bounds)
    assert_allclose(p0.numpy(), p.numpy())
    r = f.shape[-1]
    X, Y = A._base_coords(r, f.device, f.dtype)
    grid, w = A._grid(p, X, Y)
    mv = m - m.mean((1, 2), keepdim=True)
    gx, gy = A._gradients(mv)
    st = torch.nn.functional.grid_sample(
        torch.stack([mv, gx, gy], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    ).view(6, 3, -1)
    fc = (f - f.mean((1, 2), keepdim=True)).reshape(6, -1)
    rho, _, _ = A._ecc_step(fc, st[:, 0], st[:, 1], st[:, 2], w.view(6, -1), X.reshape(-1), Y.reshape(-1))
    assert_allclose(rho0.numpy(), rho.numpy(), rtol=1e-9, atol=1e-12)
    # a start outside the bounds scores -2
    _, rho_out = A._ecc_refine(f, m, p, 0, (1.0, 0.5, 2.0, 0.3))
    assert (rho_out.numpy()[np.abs(A._similarity_from_params(p)[0].numpy()) > 1.0] == -2.0).all()


def test_poly_corr_matches_least_squares():
    rng = np.random.default_rng(1)
    b, r = 4, 12
    g = rng.random((b, r, r))
    f = 0.3 + 0.5 * g**0.6 + 0.05 * rng.normal(size=(b, r, r))
    f[3] = -f[3]  # anti-correlated: negative sign
    w = (rng.random((b, r, r)) > 0.3).astype(np.float64)
    got = A._poly_corr(torch.from_numpy(f), torch.from_numpy(g), torch.from_numpy(w)).numpy()
    ref = []
    for i in range(b):
        m = w[i] > 0
        design = np.stack([np.ones(m.sum()), g[i][m], g[i][m] ** 2], axis=1)
        coef, *_ = np.linalg.lstsq(design, f[i][m], rcond=None)
        resid = f[i][m] - design @ coef
        r2 = 1 - resid @ resid / ((f[i][m] - f[i][m].mean()) ** 2).sum()
        ref.append(np.sqrt(r2) * np.sign(np.corrcoef(f[i][m], g[i][m])[0, 1]))
    assert_allclose(got, ref, rtol=1e-5)  # the 1e-7 relative ridge


def test_weighted_ncc_and_pair_ncc_match_corrcoef():
    rng = np.random.default_rng(2)
    f, g = rng.random((3, 20, 20)), rng.random((3, 20, 20))
    g[1] = 2.0 * f[1] + 0.1 * g[1]
    w = (rng.random((3, 20, 20)) > 0.5).astype(np.float64)
    got = A._weighted_ncc(torch.from_numpy(f), torch.from_numpy(g), torch.from_numpy(w)).numpy()
    ref = [np.corrcoef(f[i][w[i] > 0], g[i][w[i] > 0])[0, 1] for i in range(3)]
    assert_allclose(got, ref, rtol=1e-10)
    raw = pair_ncc(f.astype(np.float32), g.astype(np.float32))
    assert_allclose(raw, [np.corrcoef(f[i].ravel(), g[i].ravel())[0, 1] for i in range(3)], rtol=1e-4)


def test_parameterisation_roundtrip_and_affine_warp_convention():
    rng = np.random.default_rng(4)
    ang = torch.from_numpy(rng.uniform(-20, 20, 6))
    sc = torch.from_numpy(rng.uniform(0.8, 1.25, 6))
    sh = torch.from_numpy(rng.uniform(-0.1, 0.1, (6, 2)))
    p = A._params_from_similarity(ang, sc, sh)
    a2, s2, h2 = A._similarity_from_params(p)
    assert_allclose(a2.numpy(), ang.numpy(), atol=1e-9)
    assert_allclose(s2.numpy(), sc.numpy(), rtol=1e-9)
    assert_allclose(h2.numpy(), sh.numpy(), atol=1e-9)
    # warping with the ECC parameters equals affine_warp with the similarity parameters
    img = torch.from_numpy(rng.random((6, 24, 24)).astype(np.float32))
    ours, _ = A._warp(img[:, None], p.float())
    ref = affine_warp(img, ang.float(), sh.float(), sc.float())
    assert_allclose(ours[:, 0].numpy(), ref.numpy(), atol=1e-5)


def test_alignment_container():
    al = Alignment(ncc=[0.9, 0.5], angle=[1, 2], scale=[1, 1.1], shift=[[0, 0], [0.1, -0.1]], flip=["none", "h"])
    assert list(al.flip) == ["id", "hflip"]  # canonical View names; "none" is only an alias now
    assert al.train_index is None
    t = al.transform(1)
    assert t == {
        "flip": "hflip",
        "angle": 2.0,
        "scale": pytest.approx(1.1),
        "shift": [pytest.approx(0.1), pytest.approx(-0.1)],
        "ncc": 0.5,
    }
    sub = al.take(np.array([True, False]))
    assert len(sub) == 1 and sub.flip[0] == "id"
    assert set(al.as_dict()) == {"ncc", "angle", "scale", "shift", "flip"}
    both = Alignment.concat([al, sub])
    assert_allclose(both.ncc, [0.9, 0.5, 0.9])
    assert list(both.flip) == ["id", "hflip", "id"]
    assert_allclose(both.shift, [[0, 0], [0.1, -0.1], [0, 0]])
    assert both.overlap is None
    with_ov = Alignment(ncc=[0.2], angle=[0], scale=[1], shift=[[0, 0]], flip=["id"], overlap=[0.7])
    assert Alignment.concat([with_ov, with_ov]).overlap.tolist() == pytest.approx([0.7, 0.7])
    assert Alignment.concat([al, with_ov]).overlap is None  # kept only when every part has it
    with pytest.raises(ValueError, match="at least one part"):
        Alignment.concat([])
    with pytest.raises(ValueError, match="angle has 1 rows"):
        Alignment(ncc=[0.9, 0.5], angle=[1], scale=[1, 1], shift=[[0, 0], [0, 0]], flip=["id", "id"])
    with pytest.raises(ValueError, match=r"Unknown view .*'diagonal'"):  # (the name is repr'd as np.str_)
        Alignment(ncc=[0.9], angle=[1], scale=[1], shift=[[0, 0]], flip=["diagonal"])


def test_alignment_train_index_and_from_dict_round_trip(tmp_path):
    al = Alignment(
        ncc=[0.9, 0.5, 0.7],
        angle=[1, 2, -3],
        scale=[1, 1.1, 0.9],
        shift=[[0, 0], [0.1, -0.1], [0.02, 0.03]],
        flip=["id", "h", "rot180"],
        overlap=[1.0, 0.8, 0.9],
        train_index=[4, -1, 7],
    )
    assert list(al.flip) == ["id", "hflip", "hvflip"]
    assert al.train_index.dtype == np.int64 and list(al.train_index) == [4, -1, 7]
    assert al.transform(2)["train_index"] == 7 and al.transform(2)["flip"] == "hvflip"
    assert al.take([2, 0]).train_index.tolist() == [7, 4]
    d = al.as_dict()
    assert set(d) == {"ncc", "angle", "scale", "shift", "flip", "overlap", "train_index"}

    def same(a: Alignment, b: Alignment) -> None:
        assert type(b) is Alignment and len(b) == len(a)
        for key in ("ncc", "angle", "scale", "shift", "overlap", "train_index"):
            x, y = getattr(a, key), getattr(b, key)
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert_array_equal(x, y)
        assert list(b.flip) == list(a.flip) and b.flip.dtype == object

    same(al, Alignment.from_dict(d))
    # through audit.npz: the flip names come back as a fixed-width unicode array
    np.savez(tmp_path / "a.npz", **{k: (v.astype(str) if k == "flip" else v) for k, v in d.items()})
    with np.load(tmp_path / "a.npz") as z:
        same(al, Alignment.from_dict(z))
    # without the optional arrays they stay None
    plain = Alignment.from_dict({k: d[k] for k in ("ncc", "angle", "scale", "shift", "flip")})
    assert plain.overlap is None and plain.train_index is None
    assert set(plain.as_dict()) == {"ncc", "angle", "scale", "shift", "flip"}
    assert "train_index" not in plain.transform(0)
    with pytest.raises(ValueError, match="train_index has 2 rows"):
        Alignment(ncc=[0.9], angle=[1], scale=[1], shift=[[0, 0]], flip=["id"], train_index=[1, 2])


# ----------------------------------------------------------------------------------------------
# Error paths
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    good = np.zeros((2, 32, 32), np.float32)
    with pytest.raises(ValueError, match=r"fixed must have shape \(N, H, W\)"):
        register_pairs(good[0], good)
    with pytest.raises(ValueError, match="fixed has 2 images but moving has 3"):
        register_pairs(good, np.zeros((3, 32, 32)))
    with pytest.raises(ValueError, match="Unknown view 'diagonal'"):
        register_pairs(good, good, flips=["id", "diagonal"])
    with pytest.raises(ValueError, match="Unknown view 'diagonal'"):
        register_pairs(good, good, flips="diagonal")
    with pytest.raises(ValueError, match="flips has 1 entries but there are 2 pairs"):
        register_pairs(good, good, flips=["id"])
    bad = good.copy()
    bad[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="moving holds 1 NaN/Inf values"):
        register_pairs(good, bad)
    with pytest.raises(ValueError, match="Unknown measure 'mi'"):
        register_pairs(good, good, measure="mi")
    with pytest.raises(ValueError, match="device must be"):
        register_pairs(good, good, device="tpu")
    with pytest.raises(ValueError, match="at least 8 x 8"):
        register_pairs(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(TypeError, match="numeric array"):
        register_pairs(np.array([["a"] * 9] * 9, dtype=object)[None], good[:1])
    with pytest.raises(ValueError, match="scale_range"):
        register_pairs(good, good, scale_range=(1.1, 1.3))
    with pytest.raises(ValueError, match="angle_starts"):
        register_pairs(good, good, angle_starts=(30.0,), max_angle=15)
    with pytest.raises(ValueError, match=r"max_angle must be in \[0, 180\]"):
        register_pairs(good, good, max_angle=200)


def test_apply_alignment_errors():
    al = Alignment(ncc=[1.0], angle=[0.0], scale=[1.0], shift=[[0.0, 0.0]], flip=["id"])
    with pytest.raises(ValueError, match="alignment has 1 pairs but 2 moving images"):
        apply_alignment(np.zeros((2, 16, 16)), al)
    with pytest.raises(TypeError, match="must be an Alignment"):
        apply_alignment(np.zeros((1, 16, 16)), {"angle": 0})
    with pytest.raises(ValueError, match="one \\(H, W\\) image"):
        apply_alignment_single(np.zeros((1, 16, 16)), {})
    with pytest.raises(ValueError, match=r"transform\['shift'\] must be \[dx, dy\]"):
        apply_alignment_single(np.zeros((16, 16)), {"shift": [0.1]})
    with pytest.raises(ValueError, match="Unknown view 'diagonal'"):
        apply_alignment_single(np.zeros((16, 16)), {"flip": "diagonal"})
    with pytest.raises(ValueError, match="positive finite"):
        apply_alignment_single(np.zeros((16, 16)), {"scale": 0})
    # defaults: an empty transform is the identity
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    assert_allclose(apply_alignment_single(img, {}), img, atol=1e-6)
    # any orientation of the View vocabulary is applied before the (here identity) transform
    for view in View:
        ref = {
            "id": img,
            "hflip": np.fliplr(img),
            "vflip": np.flipud(img),
            "hvflip": np.rot90(img, 2),
            "rot90": np.rot90(img),
            "rot270": np.rot90(img, -1),
            "transpose": img.T,
            "antitranspose": np.rot90(img, 2).T,
        }[view.value]
        assert_allclose(apply_alignment_single(img, {"flip": view.value}), ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Issue 16: all eight orientations and other fields of view
# ----------------------------------------------------------------------------------------------


def _orient_np(x: np.ndarray, name: str) -> np.ndarray:
    """The eight dihedral views written out with NumPy (independent of inspector.views)."""
    table = {
        "id": lambda a: a,
        "hflip": lambda a: a[..., :, ::-1],
        "vflip": lambda a: a[..., ::-1, :],
        "hvflip": lambda a: a[..., ::-1, ::-1],
        "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
        "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
        "transpose": lambda a: np.swapaxes(a, -1, -2),
        "antitranspose": lambda a: np.rot90(np.swapaxes(a, -1, -2), 2, axes=(-2, -1)),
    }
    return np.ascontiguousarray(table[name](x))


@pytest.mark.parametrize("name", [v.value for v in View])
def test_every_orientation_is_found_and_verified(sagittal: np.ndarray, name: str) -> None:
    from inspector.views import DIHEDRAL

    src = sagittal[:3]
    rng = np.random.default_rng(7)
    fixed = np.clip(_orient_np(src, name) + rng.normal(0, 0.01, src.shape), 0, 1).astype(np.float32)
    al = register_pairs(fixed, src, orientations=DIHEDRAL, device="cpu")
    assert_array_equal(al.flip, [name] * 3)
    assert (al.ncc > 0.98).all(), al.ncc
    # the stored transform reproduces the copy's frame
    back = apply_alignment(src, al)
    assert (pair_ncc(fixed, back) > 0.97).all()
    # without the rotations and transposes, a rotated or transposed copy is not verified
    if name in ("rot90", "rot270", "transpose", "antitranspose"):
        flips_only = register_pairs(fixed, src, device="cpu")
        assert (flips_only.ncc < al.ncc - 0.1).all()


@pytest.mark.parametrize("zoom", [0.55, 0.7, 1.4, 1.8])
def test_other_field_of_view_is_registered(sagittal: np.ndarray, zoom: float) -> None:
    src = sagittal[:4]
    shift = np.array([[0.06, -0.04], [-0.05, 0.03], [0.0, 0.05], [0.04, 0.0]], np.float32)
    fixed = affine_warp(torch.from_numpy(src), 4.0, torch.from_numpy(shift), zoom).numpy()
    al = register_pairs(fixed, src, flips="id", device="cpu")
    assert (al.ncc > 0.97).all(), al.ncc
    assert_allclose(al.scale, zoom, rtol=0.05)
    # the identity-only start, searched within the old bounds, misses the large zooms
    if zoom in (0.55, 1.8):
        old = register_pairs(fixed, src, flips="id", device="cpu", init="identity", scale_range=(0.8, 1.25))
        assert (old.ncc < al.ncc - 0.05).all()


def test_start_candidates_and_init_are_validated(sagittal: np.ndarray) -> None:
    with pytest.raises(ValueError, match="init must be"):
        register_pairs(sagittal[:1], sagittal[:1], init="random")
    with pytest.raises(ValueError, match="start_candidates"):
        register_pairs(sagittal[:1], sagittal[:1], start_candidates=0)
    with pytest.raises(ValueError, match="rotated_candidates"):
        register_pairs(sagittal[:1], sagittal[:1], rotated_candidates=-1)
    with pytest.raises(ValueError, match="orientations is empty"):
        register_pairs(sagittal[:1], sagittal[:1], orientations=[])


def test_zoom_starts_register_a_zoomed_in_copy(sagittal):
    # the anatomy zoomed 1.5-1.8x is cut by the frame: its spread underestimates the zoom, so the moment
    # start alone may fall outside the optimiser's basin; the zoom starts put one inside it
    rng = np.random.default_rng(5)
    src = sagittal[::2]
    zoom = rng.uniform(1.5, 1.8, len(src)).astype(np.float32)
    q = affine_warp(torch.from_numpy(src), 0.0, (0.0, 0.0), torch.from_numpy(zoom)).numpy()
    al = register_pairs(q, src, device="cpu")
    assert (al.ncc > 0.98).all(), al.ncc
    assert_allclose(al.scale, zoom, rtol=0.03)
    with pytest.raises(ValueError, match="zoom_starts"):
        register_pairs(q[:1], src[:1], zoom_starts=(0.0,), device="cpu")


def test_zoomed_pairs_are_scored_from_the_training_slice_at_matching_resolution(volume):
    # a 1.6x zoomed-in copy scored from the training slice warped at 64 px is blurred against the fixed image;
    # resampled from its loaded grid (128 px) at 112 px it scores as a copy should. Unzoomed pairs keep theirs.
    src = _slices(volume, 0, [20, 26, 32, 38], size=128)
    q = affine_warp(torch.from_numpy(src), 0.0, (0.0, 0.0), 1.6).numpy()
    al = register_pairs(q, src, device="cpu")
    p = A._params_from_similarity(
        torch.from_numpy(al.angle).float(), torch.from_numpy(al.scale).float(), torch.from_numpy(al.shift).float()
    )
    f64 = resize_square(torch.from_numpy(q), 64)
    low, _ = A._score(f64, resize_square(torch.from_numpy(src), 64), p, "poly_fg")
    assert_allclose(al.ncc, A._score(f64, resize_square(torch.from_numpy(src), 112), p, "poly_fg")[0], atol=1e-5)
    assert (al.ncc > low.numpy() + 0.003).all(), (al.ncc, low)
    assert_allclose(score_alignment(q, src, al), al.ncc, atol=1e-5)  # the same score, re-computed
    plain = register_pairs(src + 0.0, src, device="cpu")  # zoom 1: the score at 64 px, as before
    p1 = A._params_from_similarity(
        torch.from_numpy(plain.angle).float(), torch.from_numpy(plain.scale).float(),
        torch.from_numpy(plain.shift).float(),
    )  # fmt: skip
    s64 = resize_square(torch.from_numpy(src), 64)
    ref64, _ = A._score(s64, s64, p1, "poly_fg")
    assert_allclose(plain.ncc, ref64, atol=1e-5)
    # a grid of another size than the moving image: identity warp of a 128 px slice onto 64 px agrees with
    # its 64 px resize away from the edges
    x = torch.from_numpy(src[:1])
    w, mask = A._warp(x[:, None], torch.zeros(1, 4), out=64)
    ref = resize_square(x, 64)
    assert w.shape == (1, 1, 64, 64) and mask.shape == (1, 64, 64)
    assert float(A._weighted_ncc(w[:, 0], ref, mask)[0]) > 0.99


@pytest.mark.parametrize("angle", [-160.0, -70.0, 38.0, 115.0])
def test_any_angle_is_registered_with_max_angle_180(sagittal: np.ndarray, angle: float) -> None:
    from inspector.views import DIHEDRAL

    src = sagittal[:4]
    rng = np.random.default_rng(3)
    shift = rng.uniform(-0.05, 0.05, (4, 2)).astype(np.float32)
    zoom = torch.tensor([0.8, 1.0, 1.2, 1.4])
    fixed = affine_warp(torch.from_numpy(src), angle, torch.from_numpy(shift), zoom).numpy()
    fixed = np.clip(fixed + rng.normal(0, 0.01, fixed.shape), 0, 1).astype(np.float32)
    al = register_pairs(fixed, src, orientations=DIHEDRAL, max_angle=180, device="cpu")
    assert (al.ncc > 0.97).all(), al.ncc
    assert_allclose(al.scale, zoom.numpy(), rtol=0.05)
    # the transform found reproduces the copy's frame (whichever orientation + angle pair expresses it)
    assert (pair_ncc(fixed, apply_alignment(src, al)) > 0.95).all()
    # with small angles only, a copy rotated this far off every 90-degree step is not verified
    if min(abs(angle - 90 * k) for k in range(-2, 3)) > 30:
        small = register_pairs(fixed, src, orientations=DIHEDRAL, max_angle=15, device="cpu")
        assert (small.ncc < al.ncc - 0.05).all(), (small.ncc, al.ncc)


def test_any_angle_transforms_are_written_with_the_smallest_residual_angle(sagittal: np.ndarray) -> None:
    from inspector.views import DIHEDRAL

    src = sagittal[:4]
    # upright copies with small rotations: with any angle allowed, still reported as "id" and a small angle
    fixed = affine_warp(torch.from_numpy(src), torch.tensor([3.0, -6.0, 8.0, 0.0])).numpy()
    al = register_pairs(fixed, src, orientations=DIHEDRAL, max_angle=180, device="cpu")
    assert_array_equal(al.flip, ["id"] * 4)
    assert np.abs(al.angle).max() < 12
    # the rewriting keeps the transform: the same aligned image either way
    flips = np.array(["rot90", "hflip", "transpose", "id"], dtype=object)
    angles = np.array([-80.0, 100.0, 175.0, 30.0], np.float32)
    f2, a2 = A._canonical_orientation(flips, angles, list(DIHEDRAL))
    assert_array_equal(f2, ["id", "transpose", "antitranspose", "id"])
    assert_allclose(a2, [10.0, 10.0, -5.0, 30.0], atol=1e-4)
    shift = np.array([[0.05, -0.02]] * 4, np.float32)
    scale = np.full(4, 1.1, np.float32)
    ones = np.ones(4, np.float32)
    before = apply_alignment(src, Alignment(ones, angles, scale, shift, flips, ones))
    after = apply_alignment(src, Alignment(ones, a2, scale, shift, f2, ones))
    assert_allclose(after[:, 8:-8, 8:-8], before[:, 8:-8, 8:-8], atol=1e-4)
    # an orientation outside the allowed set is never introduced
    f3, a3 = A._canonical_orientation(np.array(["id"], dtype=object), np.array([-80.0]), list(FLIPS))
    assert f3[0] == "id" and a3[0] == -80.0


def test_rotated_starts_never_displace_the_plain_ones(sagittal: np.ndarray) -> None:
    # copies cropped to 70-80 % of the frame, off centre: their rings can point a rotated start at a wrong angle
    # that scores well at its start; with any angle allowed they still register as well as with small angles
    from inspector.views import DIHEDRAL

    rng = np.random.default_rng(11)
    src = sagittal
    keep = torch.from_numpy(rng.uniform(0.7, 0.8, len(src)).astype(np.float32))
    off = torch.from_numpy(rng.uniform(-1, 1, (len(src), 2)).astype(np.float32)) * (1 - keep[:, None])
    fixed = affine_warp(torch.from_numpy(src), 0.0, -off / keep[:, None], 1 / keep).numpy()
    small = register_pairs(fixed, src, orientations=DIHEDRAL, max_angle=15, device="cpu")
    wide = register_pairs(fixed, src, orientations=DIHEDRAL, max_angle=180, device="cpu")
    assert (wide.ncc >= small.ncc - 0.01).all(), (small.ncc, wide.ncc)
    # and with no rotated start iterated, the wide search is the small one's plain starts exactly
    none = register_pairs(fixed, src, orientations=DIHEDRAL, max_angle=180, rotated_candidates=0, device="cpu")
    assert_allclose(none.ncc, small.ncc, atol=1e-6)
