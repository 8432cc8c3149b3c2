"""Preprocessing and the augmentation family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from inspector.preprocess import (
    CONDITIONS,
    HARD_CONDITIONS,
    PAPER_CONDITIONS,
    Augmentation,
    ConstantImageError,
    PreprocessConfig,
    affine_warp,
    apply_condition,
    augment,
    is_background,
    normalise_slice,
    normalise_volume,
    random_views,
    resize_square,
)
from inspector.types import Cohort, Slice, raw_pixel_hash


def _blob(n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = np.exp(-(((yy - n * 0.45) / (n * 0.25)) ** 2 + ((xx - n * 0.55) / (n * 0.3)) ** 2))
    img += 0.3 * (xx > n * 0.6) * (yy < n * 0.4)
    return (img / img.max() * 0.9 + 0.02 * rng.random((n, n))).astype(np.float32)


def test_normalise_volume_percentiles_and_clip():
    v = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    out = normalise_volume(v, (0.5, 99.5))
    lo, hi = np.percentile(v, (0.5, 99.5))
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert_allclose(out[5, 5, 5], (555 - lo) / (hi - lo), rtol=1e-6)


def test_normalise_volume_nan_inf_handled_and_logged(caplog):
    v = np.linspace(0, 1, 400).reshape(20, 20)
    v[0, 0], v[1, 1], v[2, 2] = np.nan, np.inf, -np.inf
    with caplog.at_level("WARNING"):
        out = normalise_volume(v, name="vol.nii")
    assert np.isfinite(out).all()
    assert out[0, 0] == 0.0 and out[1, 1] == 1.0 and out[2, 2] == 0.0
    assert "3 NaN/Inf" in caplog.text and "vol.nii" in caplog.text


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.full((3, 3), np.nan), np.zeros((0, 5))])
def test_normalise_volume_constant_raises(bad):
    with pytest.raises(ConstantImageError):
        normalise_volume(bad)


def test_normalise_slice_is_the_slice_on_its_own():
    """Each slice's own percentiles, not its volume's: two slices at different ranges both span [0, 1]."""
    img = _blob(48, seed=3).astype(np.float64)
    out = normalise_slice(img)
    lo, hi = np.percentile(img, (0.5, 99.5))
    assert out.shape == img.shape and out.dtype == np.float32
    assert_allclose(out, np.clip((img - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert_allclose(out, normalise_volume(img), atol=0)  # a lone image: the same mapping
    vol = np.stack([img * 10.0, img * 1000.0 + 5.0])
    per_volume = normalise_volume(vol)
    assert float(per_volume[0].max()) < 0.05  # the volume rule squashes the dim slice
    for k in range(2):
        assert_allclose(normalise_slice(vol[k]), out, atol=1e-6)  # the slice rule does not
    # percentiles are a parameter
    assert_allclose(normalise_slice(img, (2.0, 98.0)), normalise_volume(img, (2.0, 98.0)), atol=0)


def test_normalise_slice_window_level_invariance():
    img = _blob(48, seed=4).astype(np.float64)
    ref = normalise_slice(img)
    assert_allclose(normalise_slice(img * 3700.0 - 250.0), ref, atol=1e-6)
    lo, hi = np.percentile(img, (0.5, 99.5))
    assert_allclose(normalise_slice(np.clip(img, lo - 0.01, hi + 0.01)), ref, atol=1e-6)  # clips beyond: none


def test_normalise_slice_errors_and_nonfinite(caplog):
    with pytest.raises(ValueError, match=r"2D slice .*shape \(2, 4, 4\)"):
        normalise_slice(np.ones((2, 4, 4)), name="v.nii")
    with pytest.raises(ConstantImageError, match="s.png is constant"):
        normalise_slice(np.full((5, 5), 3.0), name="s.png")
    v = np.linspace(0, 1, 400).reshape(20, 20)
    v[0, 0], v[1, 1] = np.nan, np.inf
    with caplog.at_level("WARNING"):
        out = normalise_slice(v, name="a#3")
    assert out[0, 0] == 0.0 and out[1, 1] == 1.0 and "2 NaN/Inf" in caplog.text and "a#3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        normalise_slice(v, name="a#3", log_nonfinite=False)  # the loader logs once per volume instead
    assert "NaN/Inf" not in caplog.text


def test_sparse_image_falls_back_to_full_range():
    v = np.zeros((100, 100))
    v[50, 50] = 7.0  # a single bright pixel: both percentiles are 0
    out = normalise_volume(v)
    assert out[50, 50] == 1.0 and out.sum() == 1.0


def test_background_rule():
    cfg = PreprocessConfig(min_foreground_fraction=0.05, foreground_threshold=0.1)
    img = np.zeros((100, 100), np.float32)
    img[:2, :] = 1.0  # 2 % foreground
    assert is_background(img, cfg)
    img[:10, :] = 1.0  # 10 % foreground
    assert not is_background(img, cfg)
    assert not is_background(np.zeros((4, 4)) + 0.5 * (np.arange(16).reshape(4, 4) % 2), PreprocessConfig())
    assert not is_background(img * 0, PreprocessConfig(min_foreground_fraction=0.0))


def test_resize_square_keeps_aspect_and_pads():
    img = np.ones((30, 60), np.float32)
    out = resize_square(img, 32)
    assert out.shape == (32, 32)
    rows = out.sum(1)
    assert rows[0] == 0 and rows[-1] == 0  # padded top and bottom
    assert_allclose(out[16], 1.0, atol=1e-6)  # full width used
    assert abs(int((out > 0.5).sum(0)[16]) - 16) <= 1
    with pytest.raises(ValueError, match=r"2D image or a \(n, H, W\) stack"):
        resize_square(np.ones((2, 2, 3, 4)), 8)
    with pytest.raises(ValueError, match=r"2D image or a \(n, H, W\) stack"):
        resize_square(np.ones(5), 8)
    with pytest.raises(ValueError, match=r"\(n, H, W\) tensor"):
        resize_square(torch.ones((3, 4)), 8)
    with pytest.raises(ValueError, match="size >= 1"):
        resize_square(img, 0)


@pytest.mark.parametrize(
    ("shape", "size"), [((30, 60), 32), ((60, 30), 32), ((50, 50), 32), ((20, 28), 64), ((32, 32), 32)]
)
def test_resize_square_stack_and_tensor_match_the_per_image_result(shape, size):
    rng = np.random.default_rng(sum(shape) + size)
    stack = rng.random((5, *shape)).astype(np.float32)  # in [0, 1]
    per_image = np.stack([resize_square(a, size) for a in stack])
    assert per_image.shape == (5, size, size) and per_image.dtype == np.float32
    got = resize_square(stack, size)
    assert isinstance(got, np.ndarray) and got.shape == (5, size, size) and got.dtype == np.float32
    assert_allclose(got, per_image, rtol=0, atol=1e-6)
    assert not np.shares_memory(got, stack)  # a copy, also when no resampling is needed
    t = torch.from_numpy(stack.copy())
    out_t = resize_square(t, size)
    assert isinstance(out_t, torch.Tensor) and tuple(out_t.shape) == (5, size, size)
    assert out_t.is_contiguous() and out_t.dtype == torch.float32 and out_t.device == t.device
    assert_allclose(out_t.numpy(), got, rtol=0, atol=1e-6)
    assert_array_equal(t.numpy(), stack)  # the input is left alone
    # a float64 tensor gives the same values
    assert_allclose(resize_square(t.double(), size).numpy(), got, rtol=0, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="percentiles"):
        PreprocessConfig(percentiles=(50, 10))
    with pytest.raises(ValueError, match="size"):
        PreprocessConfig(size=2)


def test_affine_warp_rotation_direction_and_shift():
    z = torch.zeros((1, 33, 33))
    z[0, 16, 30] = 1.0  # right of centre
    r = affine_warp(z, 90.0)
    assert np.unravel_index(int(r.argmax()), r.shape) == (0, 2, 16)  # counter-clockwise: to the top
    s = affine_warp(z, 0.0, shift=(0.0, 0.25))
    assert np.unravel_index(int(s.argmax()), s.shape) == (0, 24, 30)  # dy = +25 % moves down
    ident = affine_warp(torch.from_numpy(_blob())[None], 0.0)
    assert_allclose(ident.numpy()[0], _blob(), atol=1e-5)


def test_conditions_are_the_benchmark_protocol():
    assert set(PAPER_CONDITIONS) == {
        "none",
        "noise_0.01",
        "noise_0.02",
        "rotate_3",
        "rotate_5",
        "hflip",
        "vflip",
        "intensity",
    }
    assert len(HARD_CONDITIONS) == 7 and set(CONDITIONS) == set(PAPER_CONDITIONS) | set(HARD_CONDITIONS)


@pytest.mark.parametrize("name", sorted(CONDITIONS))
def test_every_condition_changes_image_seeded_and_in_range(name):
    x = np.stack([_blob(seed=i) for i in range(3)])
    a = apply_condition(x, name, 7)
    b = apply_condition(x, name, 7)
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert_allclose(a, b)  # seeded
    diff = np.abs(a - x).mean()
    if name == "none":
        assert diff == 0
    else:
        assert diff > 1e-4, f"{name} left the image unchanged"


def test_flips_are_always_applied_and_exact():
    x = _blob()
    assert_allclose(augment(x, "hflip", 0), x[:, ::-1])
    assert_allclose(augment(x, "vflip", 1), x[::-1])


def test_noise_and_intensity_magnitudes():
    x = np.full((4, 64, 64), 0.5, np.float32)
    n = augment(x, Augmentation("noise", 0.02), 0)
    assert 0.018 < float((n - x).std()) < 0.022
    s = augment(x, Augmentation("intensity", (0.9, 1.1)), 0)
    f = s[:, 0, 0] / 0.5
    assert ((f >= 0.9) & (f <= 1.1)).all() and np.ptp(f) > 0


def test_rotation_angle_within_bounds():
    x = np.stack([_blob()] * 8)
    r = augment(x, Augmentation("rotate", 5.0), 3)
    # each image is the exact warp of some angle in [-5, 5]: the best matching angle on a grid is within range
    angles = np.linspace(-8, 8, 33)
    warps = affine_warp(torch.from_numpy(x[:1]).repeat(33, 1, 1), torch.from_numpy(angles.astype(np.float32)))
    for img in r:
        err = ((warps.numpy() - img) ** 2).mean((1, 2))
        assert abs(angles[int(err.argmin())]) <= 5.5


def test_unknown_augmentation_and_condition():
    with pytest.raises(ValueError, match="valid kinds"):
        Augmentation("warp")
    with pytest.raises(ValueError, match="valid"):
        apply_condition(np.zeros((8, 8)), "nope", 0)


def test_random_views_deterministic_and_varied():
    x = torch.from_numpy(np.stack([_blob(seed=i) for i in range(4)]))
    a = random_views(x, torch.Generator().manual_seed(0))
    b = random_views(x, torch.Generator().manual_seed(0))
    c = random_views(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape


def test_slice_enforces_layout():
    ok = Slice(np.zeros((4, 5)), subject_id="s1", path="a/b.png")
    assert ok.array.dtype == np.float32 and not ok.array.flags.writeable
    assert ok.sha256 == raw_pixel_hash(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="2D"):
        Slice(np.zeros((2, 2, 2)), subject_id="s", path="x")
    with pytest.raises(ValueError, match="NaN"):
        Slice(np.full((2, 2), np.nan), subject_id="s", path="x")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Slice(np.full((2, 2), 2.0), subject_id="s", path="x")
    with pytest.raises(ValueError, match="subject_id"):
        Slice(np.zeros((2, 2)), subject_id="", path="x")
    with pytest.raises(ValueError, match="axis"):
        Slice(np.zeros((2, 2)), subject_id="s", path="x", axis="oblique")


def test_cohort_summary_stack_and_duplicates(tmp_path):
    s = [Slice(np.full((4, 4), i / 10), subject_id=f"s{i % 2}", path=f"f{i}.png") for i in range(3)]
    c = Cohort(s, tmp_path)
    assert len(c) == 3 and c.subjects == ["s0", "s1"]
    assert c.stack().shape == (3, 4, 4) and c.stack(8).shape == (3, 8, 8)
    assert c.stack().dtype == np.float32
    assert_allclose(c.stack(), np.stack([x.array for x in s]).astype(np.float32), rtol=0, atol=0)
    assert_allclose(c.stack(8), np.stack([resize_square(x.array, 8) for x in s]), rtol=0, atol=0)
    mixed = Cohort([*s, Slice(np.zeros((4, 6)), subject_id="s2", path="g.png")], tmp_path)
    with pytest.raises(ValueError, match="mixes slice shapes"):
        mixed.stack()
    assert mixed.stack(8).shape == (4, 8, 8)
    assert "3 slices from 3 files, 2 subjects" in c.summary()
    assert c.content_hash != c.subset([0, 1]).content_hash
    with pytest.raises(ValueError, match="duplicate"):
        Cohort([s[0], s[0]], tmp_path)
