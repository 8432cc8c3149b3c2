"""Dar et al. (2024)'s 3D baseline: correlation, volume preparation, bounded seeded training, the copy threshold."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, rotate

from inspector.dar3d import (
    Dar3D,
    Dar3DConfig,
    NotFittedError,
    copy_threshold,
    correlation_matrix,
    nearest_correlation,
    prepare_volume,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"size": 16, "width": 8, "embed_dim": 16, "steps": 60, "batch_size": 6, "seed": 0, "device": "cpu"}


def _blob(rng: np.random.Generator, shape: tuple[int, int, int] = (20, 20, 20)) -> np.ndarray:
    """A smooth random volume (filtered noise) with an arbitrary intensity range."""
    vol = gaussian_filter(rng.standard_normal(shape), sigma=2.5)
    return (vol * 1000.0 + 300.0).astype(np.float32)


@pytest.fixture(scope="module")
def volumes() -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    return [_blob(rng) for _ in range(8)]


@pytest.fixture(scope="module")
def fitted(volumes: list[np.ndarray]) -> Dar3D:
    before = torch.get_num_threads()  # module scope runs before the one_torch_thread fixture: same setting here
    torch.set_num_threads(1)
    try:
        return Dar3D(config=Dar3DConfig(**SMALL)).fit(volumes[:6])
    finally:
        torch.set_num_threads(before)


# -- correlation -----------------------------------------------------------------------------------------------


def test_correlation_matrix_matches_corrcoef() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 12)), rng.standard_normal((11, 12)) * 3 + 1
    ref = np.corrcoef(a, b)[:7, 7:]
    np.testing.assert_allclose(correlation_matrix(a, b), ref, atol=1e-12)
    np.testing.assert_allclose(correlation_matrix(a, b, chunk=3), ref, atol=1e-12)
    best, idx = nearest_correlation(a, b, chunk=4)
    np.testing.assert_allclose(best, ref.max(axis=1), atol=1e-12)
    np.testing.assert_array_equal(idx, ref.argmax(axis=1))


def test_correlation_matrix_errors_and_constant_rows() -> None:
    with pytest.raises(ValueError, match="same number of columns"):
        correlation_matrix(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="2D array"):
        correlation_matrix(np.ones(3), np.ones((2, 3)))
    with pytest.raises(ValueError, match="chunk"):
        correlation_matrix(np.ones((2, 3)), np.ones((2, 3)), chunk=0)
    r = correlation_matrix(np.ones((1, 4)), np.arange(8.0).reshape(2, 4))
    np.testing.assert_array_equal(r, 0.0)  # undefined Pearson r of a constant row is 0, not NaN


# -- volumes ---------------------------------------------------------------------------------------------------


def test_prepare_volume_shape_and_range() -> None:
    rng = np.random.default_rng(1)
    vol = rng.uniform(1000, 5000, size=(13, 21, 9)).astype(np.int16)
    out = prepare_volume(vol, size=16)
    assert out.shape == (16, 16, 16) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() - out.min() > 0.5
    assert np.all(prepare_volume(np.full((4, 5, 6), 7.0), size=8) == 0.0)
    same = prepare_volume(vol[:8, :8, :8], size=8)  # no resize: only the percentile mapping
    lo, hi = np.percentile(vol[:8, :8, :8].astype(np.float32), [0.5, 99.5])
    np.testing.assert_allclose(same, np.clip((vol[:8, :8, :8] - lo) / (hi - lo), 0, 1), atol=1e-6)


@pytest.mark.parametrize(
    ("vol", "match"),
    [
        (np.zeros((8, 8)), r"3D volume .*got shape \(8, 8\)"),
        (np.zeros((1, 8, 8, 8)), r"np\.squeeze"),
        (np.zeros((0, 8, 8)), "empty volume"),
        (np.array([[[1.0, np.nan]]]), "non-finite"),
    ],
)
def test_prepare_volume_errors(vol: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prepare_volume(vol)


# -- config and estimator errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"size": 4}, "size must be an integer >= 8"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"max_seconds": -1.0}, "max_seconds"),
        ({"device": "tpu"}, "device must be one of"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Dar3DConfig(**kwargs)


def test_not_fitted_and_too_few_volumes(volumes: list[np.ndarray]) -> None:
    det = Dar3D(config=Dar3DConfig(**SMALL))
    assert det.config == Dar3DConfig(**SMALL) and not hasattr(det, "encoder_")  # __init__ only stores
    for call in (det.embed, det.score_samples, det.nearest, det.threshold):
        with pytest.raises(NotFittedError, match="not fitted"):
            call(volumes[:1])
    with pytest.raises(ValueError, match="NT-Xent needs at least 2"):
        det.fit(volumes[:1])
    with pytest.raises(ValueError, match="NT-Xent needs at least 2"):
        det.fit([])


# -- training --------------------------------------------------------------------------------------------------


def test_fit_runs_bounded_and_logs(fitted: Dar3D, caplog: pytest.LogCaptureFixture) -> None:
    assert fitted.steps_run_ == SMALL["steps"] and fitted.losses_.shape == (SMALL["steps"],)
    assert np.isfinite(fitted.losses_).all() and fitted.seconds_ > 0
    assert fitted.train_embeddings_.shape == (6, SMALL["embed_dim"]) and fitted.train_embeddings_.dtype == np.float32
    assert fitted.device_.type == "cpu" and not fitted.encoder_.training
    rng = np.random.default_rng(3)
    vols = [_blob(rng, (12, 12, 12)) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="inspector.dar3d"):
        quick = Dar3D(config=Dar3DConfig(**{**SMALL, "steps": 50, "max_seconds": 1e-9})).fit(vols)
    assert quick.steps_run_ == 1  # the clock stops training after the first step
    assert "1/50 steps" in caplog.text and "max_seconds" in caplog.text


def test_fit_is_deterministic(fitted: Dar3D, volumes: list[np.ndarray]) -> None:
    again = Dar3D(config=Dar3DConfig(**SMALL)).fit(volumes[:6])
    np.testing.assert_allclose(again.train_embeddings_, fitted.train_embeddings_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.losses_, fitted.losses_, rtol=1e-5)
    other = Dar3D(config=Dar3DConfig(**{**SMALL, "seed": 1})).fit(volumes[:6])
    assert not np.allclose(other.train_embeddings_, fitted.train_embeddings_)


def test_copy_scores_above_novel_and_finds_source(fitted: Dar3D, volumes: list[np.ndarray]) -> None:
    copies = [volumes[4].copy(), volumes[1] * 2.0 + 5.0]  # exact copy; intensity-rescaled copy
    novel = volumes[6:]
    emb = fitted.embed(copies + novel)
    assert emb.shape == (4, SMALL["embed_dim"]) and emb.dtype == np.float32
    scores = fitted.score_samples(copies + novel)
    assert scores.shape == (4,)
    np.testing.assert_allclose(scores[:2], 1.0, atol=1e-5)
    assert scores[:2].min() > scores[2:].max()
    np.testing.assert_array_equal(fitted.nearest(copies), [4, 1])
    np.testing.assert_allclose(fitted.embed(volumes[:6], batch_size=4), fitted.train_embeddings_, rtol=1e-4, atol=1e-5)
    assert fitted.embed([]).shape == (0, SMALL["embed_dim"])


def test_training_learns_flip_and_rotation_invariance(fitted: Dar3D, volumes: list[np.ndarray]) -> None:
    """Copies flipped left-right and rotated 4 degrees find their source; an untrained encoder does not."""
    moved = [rotate(v, 4, axes=(0, 2), reshape=False, mode="nearest")[:, :, ::-1] for v in volumes[:6]]
    np.testing.assert_array_equal(fitted.nearest(moved), np.arange(6))
    assert fitted.score_samples(moved).min() > fitted.score_samples(volumes[6:]).max()
    untrained = Dar3D(config=Dar3DConfig(**{**SMALL, "steps": 1})).fit(volumes[:6])
    assert (untrained.nearest(moved) == np.arange(6)).mean() < 0.5


# -- threshold -------------------------------------------------------------------------------------------------


def test_copy_threshold_by_hand() -> None:
    rng = np.random.default_rng(5)
    train, val = rng.standard_normal((9, 6)), rng.standard_normal((21, 6))
    r = np.corrcoef(val, train)[:21, 21:]
    dist = 1.0 - r.max(axis=1)
    for q in (5.0, 50.0):
        assert copy_threshold(train, val, q) == pytest.approx(np.percentile(dist, q), abs=1e-12)
    assert copy_threshold(train, val) == pytest.approx(np.sort(dist)[1], abs=1e-12)  # 5 % of 20 gaps: the 2nd
    with pytest.raises(ValueError, match="percentile"):
        copy_threshold(train, val, 150.0)
    with pytest.raises(ValueError, match="at least one validation volume"):
        copy_threshold(train, val[:0])


def test_threshold_and_is_copy(fitted: Dar3D, volumes: list[np.ndarray]) -> None:
    val = volumes[6:]
    thr = fitted.threshold(val)
    d = 1.0 - np.array([np.corrcoef(v, fitted.train_embeddings_)[0, 1:].max() for v in fitted.embed(val)])
    assert thr == pytest.approx(np.percentile(d, 5.0), abs=1e-6)
    flags = fitted.is_copy([volumes[2], *val], thr)
    assert flags.dtype == np.bool_ and flags[0]  # a training volume itself: distance 0
    # the validation volume nearest to T lies below the interpolated 5th percentile, the other does not
    assert flags[1:].tolist() == (d < thr).tolist() and flags[1:].sum() == 1
    with pytest.raises(ValueError, match="finite number"):
        fitted.is_copy(val, float("nan"))
    with pytest.raises(ValueError, match="at least one validation volume"):
        fitted.threshold([])


# -- GPU -------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_and_score(volumes: list[np.ndarray]) -> None:
    det = Dar3D(config=Dar3DConfig(**{**SMALL, "device": "auto"})).fit(volumes[:6])
    assert det.device_.type == "cuda" and next(det.encoder_.parameters()).is_cuda
    scores = det.score_samples([volumes[3], *volumes[6:]])
    assert np.isfinite(scores).all() and scores[0] == pytest.approx(1.0, abs=1e-4)
    assert det.nearest([volumes[3]]).tolist() == [3]


def test_explicit_cuda_without_cuda_raises(volumes: list[np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        Dar3D(config=Dar3DConfig(**{**SMALL, "device": "cuda"})).fit(volumes[:2])
    auto = Dar3D(config=Dar3DConfig(**{**SMALL, "device": "auto", "steps": 1})).fit(volumes[:2])
    assert auto.device_.type == "cpu"
