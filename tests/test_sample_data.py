"""The committed real-MRI sample audit (sample_data/) and its builder.

Checks the layout the app and CLI default to, the ground truth, the distance rule between splits (from
provenance.csv), that the committed files are what the builder produces, and that the builder is
deterministic.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from inspector import load_cohort
from inspector.io import read_labels
from inspector.preprocess import CONDITIONS

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SPLITS = ("train", "holdout", "synthetic")
MIN_GAP = 3


def _builder() -> ModuleType:
    name = "build_sample_data"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SAMPLE / "build_sample_data.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode.startswith("I;16"), f"{path} is {im.mode}, expected 16-bit greyscale"
        return np.asarray(im).astype(np.int64)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def prov() -> list[dict[str, str]]:
    return _read_csv(SAMPLE / "provenance.csv")


@pytest.fixture(scope="module")
def cohorts():
    return {s: load_cohort(SAMPLE / s) for s in SPLITS}


def test_folders_load_without_skips_and_match_provenance(cohorts, prov):
    for split in SPLITS:
        c = cohorts[split]
        assert c.skipped == [], f"{split}: unexpected skips {c.skipped[:3]}"
        expected = {r["path"].removeprefix(f"{split}/") for r in prov if r["split"] == split}
        assert {s.path for s in c.slices} == expected
        assert all(s.array.shape == (128, 128) for s in c.slices)
    # subjects are the acquisition folders, shared by train and holdout (slice-level split)
    train_subjects = set(cohorts["train"].subjects)
    assert train_subjects == {r["subject"] for r in prov if r["split"] == "train"}
    assert len(train_subjects) >= 5
    assert len(train_subjects & set(cohorts["holdout"].subjects)) >= 5
    # every file on disk is in provenance, with its hash and its stored shape
    on_disk = {p.relative_to(SAMPLE).as_posix() for s in SPLITS for p in (SAMPLE / s).rglob("*.png")}
    assert on_disk == {r["path"] for r in prov}
    for r in prov:
        p = SAMPLE / r["path"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == r["sha256"], r["path"]
        arr = _png(p)
        assert arr.shape == (int(r["height"]), int(r["width"]))
        assert max(arr.shape) <= 160
        assert arr.max() > 255, f"{r['path']} does not use the 16-bit range"


def test_counts_fit_the_calibration(prov):
    n = defaultdict(int)
    for r in prov:
        n[r["split"]] += 1
        if r["label"]:
            n[r["label"]] += 1
    assert n["holdout"] >= 100  # p-value floor 1/(1+n) below the default alpha 0.01
    assert 150 <= n["train"] <= 250
    assert 60 <= n["synthetic"] <= 100
    assert n["copy"] + n["novel"] == n["synthetic"]
    assert 0.20 <= n["copy"] / n["synthetic"] <= 0.26
    total_bytes = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total_bytes < 10_000_000


def test_labels_are_ground_truth_and_cover_synthetic(prov):
    labels = read_labels(SAMPLE / "synthetic")
    assert list(labels.columns) == ["path", "label", "source", "augmentation"]
    files = {p.name for p in (SAMPLE / "synthetic").glob("*.png")}
    assert set(labels["path"]) == files and len(labels) == len(files)
    syn = {r["path"].removeprefix("synthetic/"): r for r in prov if r["split"] == "synthetic"}
    for row in labels.itertuples(index=False):
        assert row.label == syn[row.path]["label"]
        if row.label == "copy":
            assert (SAMPLE / "train" / row.source).is_file(), row.source
            assert row.augmentation in CONDITIONS
            assert row.source == syn[row.path]["copy_of"]
        else:
            assert row.source == "" and row.augmentation == ""
    copies = labels[labels["label"] == "copy"]
    assert copies["source"].is_unique
    assert set(copies["augmentation"]) >= {"none", "hflip", "vflip", "rotate_5", "rotate_10", "noise_0.01"}


def test_copies_come_from_their_source(prov):
    train = {p.relative_to(SAMPLE / "train").as_posix(): _png(p) for p in (SAMPLE / "train").rglob("*.png")}
    mirror = {("mni152-t1", "axial"), ("mni152-t1", "coronal")}  # the symmetric template

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        a = a.ravel() - a.mean()
        b = b.ravel() - b.mean()
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))

    for r in (r for r in prov if r["label"] == "copy"):
        img, src, aug = _png(SAMPLE / r["path"]), train[r["copy_of"]], r["augmentation"]
        if aug in ("none", "hflip", "vflip"):
            ref = {"none": src, "hflip": src[:, ::-1], "vflip": src[::-1]}[aug]
            np.testing.assert_array_equal(img, ref, err_msg=r["path"])
            if aug == "hflip":  # never the identity (mirror-symmetric template slices excluded)
                assert (r["subject"], r["axis"]) not in mirror
                assert not np.array_equal(img, src)
        elif aug in ("noise_0.01", "intensity", "rotate_5", "rotate_10"):
            # the copy's most similar training slice (raw pixels, same shape) is its source
            scores = {k: corr(img, t) for k, t in train.items() if t.shape == img.shape}
            assert max(scores, key=scores.get) == r["copy_of"], r["path"]
        else:
            assert img.shape == src.shape


def test_no_holdout_or_novel_slice_near_a_training_slice(prov):
    strata: dict[tuple[str, str, str], list[tuple[int, str]]] = defaultdict(list)
    for r in prov:
        if r["label"] != "copy":
            strata[(r["source_file"], r["volume_index"], r["axis"])].append((int(r["slice_index"]), r["split"]))
    n_shared = 0
    for key, members in strata.items():
        idx = sorted(i for i, _ in members)
        assert len(idx) == len(set(idx)), f"slice used twice in {key}"
        assert all(b - a >= MIN_GAP for a, b in zip(idx, idx[1:], strict=False)), key
        train = np.array([i for i, s in members if s == "train"])
        for i, s in members:
            if s != "train" and train.size:
                assert np.abs(train - i).min() >= MIN_GAP, (key, i, s)
                n_shared += 1
    # the split is at slice level: most unseen slices share a volume and axis with training slices
    n_unseen = sum(1 for r in prov if r["label"] != "copy" and r["split"] != "train")
    assert n_shared >= 0.9 * n_unseen
    # and no unseen slice is byte-identical to a training slice
    train_hashes = {r["sha256"] for r in prov if r["split"] == "train"}
    assert not any(r["sha256"] in train_hashes for r in prov if r["split"] == "holdout" or r["label"] == "novel")


def test_builder_is_deterministic_and_seeded(tmp_path):
    b = _builder()
    subset = ["dipy-aniso-b0", "nibabel-anatomical-t1", "dipy-t1-coronal"]
    first = b.build(tmp_path / "a", seed=0, sources=subset)
    b.build(tmp_path / "b", seed=0, sources=subset)
    ha, hb = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert ha == hb and len(ha) == len(first.rows) + 2  # + labels.csv + provenance.csv
    assert first.counts["copy"] >= 1 and first.counts["holdout"] >= 1
    b.check_rows(first.rows)
    other = b.build(tmp_path / "c", seed=1, sources=subset)
    split_of = {(r["source_file"], r["axis"], r["slice_index"]): r["split"] for r in first.rows if r["label"] != "copy"}
    split_1 = {(r["source_file"], r["axis"], r["slice_index"]): r["split"] for r in other.rows if r["label"] != "copy"}
    assert split_of.keys() == split_1.keys() and split_of != split_1
    # rebuilding into the same folder replaces the splits and leaves other files alone
    (tmp_path / "a" / "README.md").write_text("keep")
    (tmp_path / "a" / "train" / "stale.png").write_bytes(b"x")
    b.build(tmp_path / "a", seed=0, sources=subset)
    assert (tmp_path / "a" / "README.md").read_text() == "keep"
    assert not (tmp_path / "a" / "train" / "stale.png").exists()


def test_builder_rejects_bad_input(tmp_path):
    b = _builder()
    with pytest.raises(ValueError, match="no-such-source"):
        b.build(tmp_path, sources=["no-such-source"])
    with pytest.raises(b.SampleDataError, match="holdout"):
        b.build(tmp_path / "x", sources=["dipy-s0-b0"], min_holdout=100)
    rows = [
        {"split": "train", "path": "train/s/ax_003.png", "label": "", "source_file": "f", "volume_index": "",
         "axis": "axial", "slice_index": "3", "copy_of": ""},
        {"split": "holdout", "path": "holdout/s/ax_005.png", "label": "", "source_file": "f", "volume_index": "",
         "axis": "axial", "slice_index": "5", "copy_of": ""},
    ]  # fmt: skip
    with pytest.raises(b.SampleDataError, match="2 slices apart"):
        b.check_rows(rows)
    rows[1]["slice_index"] = "6"
    b.check_rows(rows)
    copy = {"split": "synthetic", "path": "synthetic/syn_000.png", "label": "copy", "copy_of": "s/x.png"}
    rows.append({**rows[0], **copy})
    with pytest.raises(b.SampleDataError, match="not a training file"):
        b.check_rows(rows)


@pytest.mark.slow
def test_committed_data_is_what_the_builder_makes(tmp_path, prov):
    """A full rebuild (seed 0) reproduces the committed split and pixels (PNG bytes may differ by zlib build)."""
    res = _builder().build(tmp_path, seed=0)
    ignore = {"sha256", "package_version"}
    assert [{k: v for k, v in r.items() if k not in ignore} for r in res.rows] == [
        {k: v for k, v in r.items() if k not in ignore} for r in prov
    ]
    for r in prov:
        np.testing.assert_allclose(_png(tmp_path / r["path"]), _png(SAMPLE / r["path"]), atol=3, err_msg=r["path"])
    assert (tmp_path / "synthetic" / "labels.csv").read_text() == (SAMPLE / "synthetic" / "labels.csv").read_text()
