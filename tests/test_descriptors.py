"""Foreground moments and the moment-normalised structure descriptor (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from inspector.descriptors import (
    foreground_moments,
    moment_normalise,
    polar_sample,
    relative_angle,
    rotation_descriptor,
    structure_descriptor,
)
from inspector.preprocess import affine_warp, normalise_volume, resize_square
from inspector.views import View


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    vol = normalise_volume(np.asarray(nilearn_datasets.load_mni152_template(resolution=2).get_fdata()))
    return np.stack([resize_square(vol[k], 96) for k in (20, 26, 32, 38)]).astype(np.float32)


def test_moments_of_a_disc_reference() -> None:
    # a uniform disc of radius R centred at (cx, cy): radius of gyration R / sqrt(2)
    n = 200
    t = (np.arange(n) * 2 + 1) / n - 1
    X, Y = np.meshgrid(t, t)
    cx, cy, R = 0.2, -0.1, 0.4
    disc = ((X - cx) ** 2 + (Y - cy) ** 2 <= R**2).astype(np.float32)
    cen, rad = foreground_moments(torch.from_numpy(disc[None]))
    assert_allclose(cen[0].numpy(), [cx, cy], atol=2e-3)
    assert_allclose(float(rad[0]), R / np.sqrt(2), rtol=0.01)
    # an empty slice: centred, nominal radius
    cen0, rad0 = foreground_moments(torch.zeros((1, 8, 8)))
    assert_allclose(cen0.numpy(), [[0, 0]])
    assert float(rad0[0]) == 0.5


@pytest.mark.parametrize("view", list(View))
def test_descriptor_is_equivariant_to_the_eight_orientations(slices: np.ndarray, view: View) -> None:
    a = structure_descriptor(view.apply(slices))
    b = structure_descriptor(slices)
    for name, x in b.items():
        k = int(np.sqrt(x.shape[1]))
        want = view.apply(x.reshape(-1, k, k)).reshape(len(x), -1)
        assert_allclose(a[name], want, atol=1e-4)


def test_descriptor_is_invariant_to_field_of_view_and_shift(slices: np.ndarray) -> None:
    zoom = torch.tensor([0.6, 0.8, 1.3, 1.6])
    shift = torch.tensor([[0.05, 0.0], [-0.04, 0.03], [0.0, -0.05], [0.03, 0.02]])
    moved = affine_warp(torch.from_numpy(slices), 0.0, shift, zoom).numpy()
    d0, d1 = structure_descriptor(slices), structure_descriptor(moved)
    for name in d0:
        cos = (d0[name] * d1[name]).sum(1)
        assert (cos > 0.95).all(), (name, cos)
        # and the same slice beats the other slices
        other = d0[name] @ d1[name].T
        assert (np.argmax(other, axis=0) == np.arange(len(slices))).all()


def test_moment_normalise_shapes_and_errors(slices: np.ndarray) -> None:
    out = moment_normalise(slices, 24)
    assert out.shape == (4, 24, 24) and out.dtype == torch.float32
    assert moment_normalise(np.zeros((0, 8, 8), np.float32), 12).shape == (0, 12, 12)
    with pytest.raises(ValueError, match="shape"):
        moment_normalise(slices[0], 12)
    d = structure_descriptor(slices, sizes=(8,))
    assert set(d) == {"mn8"} and d["mn8"].shape == (4, 64)
    assert_allclose(np.linalg.norm(d["mn8"], axis=1), 1.0, rtol=1e-5)


def test_zoomed_descriptor_is_the_descriptor_of_the_zoomed_slice(slices: np.ndarray) -> None:
    z = structure_descriptor(slices, zoom=1.45)
    ref = structure_descriptor(affine_warp(torch.from_numpy(slices), 0.0, (0.0, 0.0), 1.45).numpy())
    for k in ref:
        assert_allclose(z[k], ref[k], atol=1e-6)
    # moment normalisation undoes a zoom that keeps the anatomy inside the frame, not one that cuts it
    plain, inside, cut = (structure_descriptor(slices, zoom=f) for f in (1.0, 1.2, 3.0))
    assert ((inside["mn24"] * plain["mn24"]).sum(1) > (cut["mn24"] * plain["mn24"]).sum(1) + 0.05).all()
    for bad in (0.1, float("nan"), 5.0):
        with pytest.raises(ValueError, match="zoom"):
            structure_descriptor(slices, zoom=bad)


# ---- rings about the centroid: the relative angle and the rotation-invariant descriptor


def test_polar_sample_reference_on_a_ramp() -> None:
    # an image equal to x (normalised coordinates) sampled on rings about a known centre and radius:
    # sample (ring i, angle j) = c_x + r rho_i cos(phi_j), before the mean removal and the sqrt(rho) weight
    n = 256
    t = (np.arange(n) * 2 + 1) / n - 1
    X = np.tile(t, (n, 1)).astype(np.float32)
    cen = torch.tensor([[0.1, -0.05]])
    rad = torch.tensor([0.3])
    got = polar_sample(torch.from_numpy(X[None]), cen, rad, rings=4, angles=16, max_radius=2.0)[0].numpy()
    rho = (np.arange(4) + 0.5) / 4 * 2.0
    phi = np.arange(16) * 2 * np.pi / 16
    want = 0.1 + 0.3 * rho[:, None] * np.cos(phi)[None, :]
    want = (want - want.mean()) * np.sqrt(rho)[:, None]
    assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize("angle", [-170.0, -95.0, -33.0, 0.0, 12.5, 47.0, 90.0, 138.0])
def test_relative_angle_recovers_any_rotation(slices: np.ndarray, angle: float) -> None:
    src = torch.from_numpy(slices)
    shift = torch.tensor([[0.04, -0.03]]).expand(len(slices), 2)
    rot = affine_warp(src, angle, shift, 1.2).clamp(0, 1)
    est, peak = relative_angle(polar_sample(rot), polar_sample(src))
    err = (est.numpy() - angle + 180.0) % 360.0 - 180.0
    assert np.abs(err).max() < 2.0, (angle, est)
    assert (peak.numpy() > 0.9).all()


def test_rotation_descriptor_is_invariant_to_rotations_and_reflections(slices: np.ndarray) -> None:
    src = torch.from_numpy(slices)
    d0 = rotation_descriptor(slices)
    assert d0.shape == (len(slices), 12 * 12)
    assert_allclose(np.linalg.norm(d0, axis=1), 1.0, rtol=1e-5)
    others = d0 @ d0.T
    for angle, view in [(73.0, View.ID), (-141.0, View.HFLIP), (0.0, View.TRANSPOSE), (25.0, View.ROT90)]:
        oriented = torch.from_numpy(np.ascontiguousarray(view.apply(slices)))
        moved = affine_warp(oriented, angle, (0.0, 0.0), 0.8).clamp(0, 1).numpy()
        d1 = rotation_descriptor(moved)
        cos = (d0 * d1).sum(1)
        assert (cos > 0.98).all(), (angle, view, cos)
        # the same slice is more alike than any other slice was to it
        off = others - np.eye(len(slices)) * 9
        assert (cos > off.max(1)).all()
    with pytest.raises(ValueError, match="harmonics"):
        rotation_descriptor(slices, harmonics=0)
    with pytest.raises(ValueError, match="shape"):
        rotation_descriptor(src[0])
