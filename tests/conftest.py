"""Shared fixtures: small audit cohorts cut from real MRI (nilearn's MNI152 template, offline)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.preprocess import apply_condition, is_background, normalise_volume


def _mni_volume() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    vol = np.asarray(load_mni152_template(resolution=2).get_fdata(), np.float32)
    return normalise_volume(vol)


def _save_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(path)


def make_audit_cohorts(
    root: Path,
    *,
    seed: int = 0,
    conditions: tuple[str, ...] = ("none", "hflip", "vflip", "rotate_5", "noise_0.01", "intensity"),
    n_copies: int = 6,
    n_novel: int = 10,
) -> dict[str, Path]:
    """Write train/, holdout/ and synthetic/ (with labels.csv) PNG cohorts under ``root``.

    Three "subjects" are the three orientations of the MNI152 template (2 mm; sagittal from one
    hemisphere, as the template is symmetric). Within each, slices
    4 mm apart alternate between the training pool and the unseen pool, so a novel slice's nearest
    training slice is often the same anatomy 4 mm away (the hard negative). Copies are training
    slices passed through one condition each, always applied.

    Returns
    -------
    dict with ``train``, ``holdout``, ``synthetic`` folders.
    """
    vol = _mni_volume()
    rng = np.random.default_rng(seed)
    train, unseen = [], []
    for axis, name in ((2, "sub-axial"), (1, "sub-coronal"), (0, "sub-sagittal")):
        n = vol.shape[axis]
        # the template is left-right symmetric: sagittal slices from one hemisphere only (no mirror twins)
        stop = n // 2 + 1 if axis == 0 else int(0.8 * n)
        for k, idx in enumerate(range(int(0.2 * n), stop, 2)):
            img = np.take(vol, idx, axis=axis).T[::-1]
            if is_background(img):
                continue
            (train if k % 2 == 0 else unseen).append((name, idx, img))
    order = rng.permutation(len(unseen))
    novel = [unseen[i] for i in order[:n_novel]]
    hold = [unseen[i] for i in order[n_novel:]]
    paths = {k: root / k for k in ("train", "holdout", "synthetic")}
    for subj, idx, img in train:
        _save_png(paths["train"] / subj / f"s{idx:03d}.png", img)
    for subj, idx, img in hold:
        _save_png(paths["holdout"] / subj / f"s{idx:03d}.png", img)
    rows = []
    # axial and coronal template slices are their own mirror image: hflip copies come from sagittal ones
    sagittal = [i for i, t in enumerate(train) if t[0] == "sub-sagittal"]
    copies = list(rng.choice(len(train), size=n_copies, replace=False))
    for j in range(n_copies):
        cond = conditions[j % len(conditions)]
        if cond == "hflip" and train[copies[j]][0] != "sub-sagittal":
            copies[j] = next(i for i in rng.permutation(sagittal) if i not in copies)
        subj, idx, img = train[copies[j]]
        rel = f"gen/copy_{j:03d}.png"
        _save_png(paths["synthetic"] / rel, apply_condition(img, cond, rng))
        rows.append((rel, "copy", f"{subj}/s{idx:03d}.png", cond))
    for j, (_subj, _idx, img) in enumerate(novel):
        rel = f"gen/novel_{j:03d}.png"
        _save_png(paths["synthetic"] / rel, img)
        rows.append((rel, "novel", "", "none"))
    with open(paths["synthetic"] / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source", "augmentation"])
        w.writerows(rows)
    return paths


@pytest.fixture(scope="session")
def audit_cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-MRI train/holdout/synthetic folders with 6 planted copies and 10 novel slices."""
    return make_audit_cohorts(tmp_path_factory.mktemp("cohorts"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_pseudonym_key(tmp_path_factory: pytest.TempPathFactory):
    """No test reads or creates the user's real pseudonym key (~/.config/mri-memorization-inspector/)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INSPECTOR_PSEUDONYM_KEY_FILE", str(tmp_path_factory.mktemp("pseudonym-key") / "pseudonym.key"))
        yield


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on a shared 2-core machine two threads spin against other jobs
    (OpenMP barrier stalls under load). Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
