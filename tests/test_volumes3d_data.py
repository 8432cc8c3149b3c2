"""The 3D look-alike cohort generator (benchmarks.volumes3d_data): conditions in mm, files, labels, cache."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks import cohort
from benchmarks.volumes3d_data import CONDITIONS_3D, GENERATOR_VERSION, crop_box, make_volume_cohort
from inspector.io import load_cohort, read_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (40, 48, 30)
ANISO = (1.5, 1.5, 3.0)
ISO = (1.5, 1.5, 1.5)
SMALL = dict(n_holdout=1, n_novel=1, copies_per_condition=1, conditions=("exact", "rot10", "slab_third", "thickness"))


def _blob(shape=SHAPE, zooms=ANISO, centre_mm=(6.0, -4.0, 3.0), sigma_mm=(14.0, 11.0, 16.0)) -> np.ndarray:
    """A smooth, off-centre (asymmetric) ellipsoidal blob in [0, 1] plus a small second lobe."""
    ax = [(np.arange(n) - (n - 1) / 2.0) * z for n, z in zip(shape, zooms, strict=True)]
    x, y, z = np.meshgrid(*ax, indexing="ij")
    g = np.exp(-0.5 * (((x - centre_mm[0]) / sigma_mm[0]) ** 2 + ((y - centre_mm[1]) / sigma_mm[1]) ** 2))
    g = g * np.exp(-0.5 * ((z - centre_mm[2]) / sigma_mm[2]) ** 2)
    g2 = 0.5 * np.exp(-0.5 * (((x + 12) / 5.0) ** 2 + ((y - 10) / 5.0) ** 2 + ((z + 8) / 6.0) ** 2))
    return (g + g2).astype(np.float32)


def _centroid_mm(vol: np.ndarray, zooms) -> np.ndarray:
    ax = [(np.arange(n) - (n - 1) / 2.0) * z for n, z in zip(vol.shape, zooms, strict=True)]
    grids = np.meshgrid(*ax, indexing="ij")
    w = vol.astype(np.float64)
    return np.array([(g * w).sum() / w.sum() for g in grids])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# The conditions, on a small synthetic volume
# ----------------------------------------------------------------------------------------------


def test_template_loads_offline():
    t = cohort.template()
    assert t.ndim == 3 and t.dtype == np.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    (x0, x1), (y0, y1), (z0, z1) = crop_box(t)
    n = [int(round(s / cohort.VOXEL_MM)) for s in t.shape]
    assert 0 <= x0 < x1 <= n[0] and 0 <= y0 < y1 <= n[1]
    assert (z0, z1) == (int(0.22 * n[2]), int(0.82 * n[2]))  # the head spans the whole axial range


def test_conditions_order():
    assert list(CONDITIONS_3D) == [
        "exact",
        "noise",
        "intensity",
        "flip",
        "rot5",
        "rot10",
        "shift",
        "resample",
        "slab_half",
        "slab_third",
        "thickness",
    ]


@pytest.mark.parametrize("zooms", [ANISO, ISO], ids=["aniso", "iso"])
@pytest.mark.parametrize("name", list(CONDITIONS_3D))
def test_condition_contract(name, zooms):
    vol = _blob(zooms=zooms)
    before = vol.copy()
    params: dict = {}
    out, oz = CONDITIONS_3D[name](vol, np.random.default_rng(3), zooms, params=params)
    np.testing.assert_array_equal(vol, before)  # the input is never modified
    assert isinstance(out, np.ndarray) and out.ndim == 3 and out.dtype == np.float32
    assert isinstance(oz, tuple) and len(oz) == 3 and all(isinstance(z, float) and z > 0 for z in oz)
    assert np.isfinite(out).all() and float(out.min()) >= 0.0
    assert float(out.max()) < 2.0 * float(vol.max())  # intensity range stays sensible
    json.dumps(params)  # recorded parameters are JSON-ready for the manifest
    if name in ("resample", "thickness"):
        for n, z, n2, z2 in zip(vol.shape, zooms, out.shape, oz, strict=True):
            assert abs(n2 * z2 - n * z) <= z2 / 2 + 1e-6  # same physical extent, within a voxel
        assert params["zooms"] == list(oz)
    elif name.startswith("slab"):
        assert out.shape[:2] == vol.shape[:2] and oz == zooms
    else:
        assert out.shape == vol.shape and oz == zooms
    # the default zooms: 1.5 mm isotropic, so fn(vol, rng) works
    out2, oz2 = CONDITIONS_3D[name](vol, np.random.default_rng(3))
    assert out2.ndim == 3 and len(oz2) == 3


def test_exact_and_flip():
    vol = _blob()
    out, _ = CONDITIONS_3D["exact"](vol, np.random.default_rng(0), ANISO)
    np.testing.assert_array_equal(out, vol)
    assert out is not vol
    out, _ = CONDITIONS_3D["flip"](vol, np.random.default_rng(0), ANISO)
    np.testing.assert_array_equal(out, vol[::-1])
    assert not np.allclose(out, vol)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name,deg", [("rot5", 5.0), ("rot10", 10.0)])
def test_rotation_is_a_true_rotation_in_mm(name, deg, seed):
    zooms = ANISO
    p0 = np.array([9.0, -6.0, 9.0])
    vol = _blob(shape=(48, 56, 34), zooms=zooms, centre_mm=tuple(p0), sigma_mm=(4.0, 4.0, 6.0))
    params: dict = {}
    out, oz = CONDITIONS_3D[name](vol, np.random.default_rng(seed), zooms, params=params)
    assert oz == zooms and abs(abs(params["angle_deg"]) - deg) < 1e-9 and params["axis"] in "xyz"
    assert np.abs(out - vol).sum() > 0.05 * vol.sum()  # it changed
    a = math.radians(params["angle_deg"])
    i = "xyz".index(params["axis"])
    p, q = (k for k in range(3) if k != i)
    c0 = _centroid_mm(vol, zooms)
    want = c0.copy()
    want[p] = math.cos(a) * c0[p] - math.sin(a) * c0[q]
    want[q] = math.sin(a) * c0[p] + math.cos(a) * c0[q]
    np.testing.assert_allclose(_centroid_mm(out, zooms), want, atol=0.35)


def test_rotation_axes_and_signs_vary():
    seen = set()
    for s in range(40):
        params: dict = {}
        CONDITIONS_3D["rot5"](_blob(shape=(8, 8, 6)), np.random.default_rng(s), ANISO, params=params)
        seen.add((params["axis"], params["angle_deg"] > 0))
    assert len(seen) == 6


@pytest.mark.parametrize("seed", range(4))
def test_shift_moves_content_by_its_mm(seed):
    zooms = ANISO
    vol = _blob(shape=(48, 56, 34), zooms=zooms, centre_mm=(0.0, 0.0, 0.0), sigma_mm=(5.0, 5.0, 7.0))
    params: dict = {}
    out, oz = CONDITIONS_3D["shift"](vol, np.random.default_rng(seed), zooms, params=params)
    assert oz == zooms and np.abs(out - vol).sum() > 0.05 * vol.sum()
    sh = np.array(params["shift_mm"])
    assert 3.0 - 1e-6 <= math.hypot(sh[0], sh[1]) <= 8.0 + 1e-6
    assert 0.3 - 1e-6 <= abs(params["shift_vox"][2]) <= 0.7 + 1e-6  # a fraction of a slice through-plane
    np.testing.assert_allclose(_centroid_mm(out, zooms) - _centroid_mm(vol, zooms), sh, atol=0.1)


def test_slabs_are_contiguous_source_slices():
    vol = _blob()
    for name, frac in (("slab_half", 1 / 2), ("slab_third", 1 / 3)):
        for s in range(5):
            params: dict = {}
            out, oz = CONDITIONS_3D[name](vol, np.random.default_rng(s), ANISO, params=params)
            a, b = params["slab"]
            assert b - a == out.shape[2] and abs(out.shape[2] - frac * vol.shape[2]) <= 1
            assert 0 <= a < b <= vol.shape[2] and oz == ANISO
            np.testing.assert_array_equal(out, vol[:, :, a:b])


def test_thickness_doubles_the_slice_thickness_only():
    for zooms, want in ((ISO, 3.0), (ANISO, 6.0)):
        vol = _blob(zooms=zooms)
        out, oz = CONDITIONS_3D["thickness"](vol, np.random.default_rng(0), zooms)
        assert oz == (zooms[0], zooms[1], want)
        assert out.shape == (vol.shape[0], vol.shape[1], round(vol.shape[2] / 2))


def test_resample_voxel_sizes():
    got_iso, got_aniso = set(), set()
    for s in range(16):
        vol = _blob()
        _, oz = CONDITIONS_3D["resample"](_blob(zooms=ISO), np.random.default_rng(s), ISO)
        assert oz[0] == oz[1] == oz[2]
        got_iso.add(oz)
        out, oz = CONDITIONS_3D["resample"](vol, np.random.default_rng(s), ANISO)
        assert oz[0] == oz[1] and oz != ANISO
        got_aniso.add(oz)
        # the content stays where it was (same field of view, centres aligned)
        np.testing.assert_allclose(_centroid_mm(out, oz), _centroid_mm(vol, ANISO), atol=0.4)
    assert got_iso == {(1.2, 1.2, 1.2), (2.0, 2.0, 2.0)}
    assert {z[0] for z in got_aniso} == {1.2, 2.0} and {z[2] for z in got_aniso} == {2.5, 4.0}


def test_noise_and_intensity():
    vol = _blob()
    params: dict = {}
    out, _ = CONDITIONS_3D["noise"](vol, np.random.default_rng(0), ANISO, params=params)
    assert params["sigma"] == pytest.approx(0.02 * (vol.max() - vol.min()), rel=1e-6)
    bright = vol > 0.5  # Rician noise is near-Gaussian where the signal is high
    assert np.std(out[bright] - vol[bright]) == pytest.approx(params["sigma"], rel=0.1)
    factors = []
    for s in range(20):
        params = {}
        out, _ = CONDITIONS_3D["intensity"](vol, np.random.default_rng(s), ANISO, params=params)
        f, g = params["factor"], params["gamma"]
        assert 0.8 <= f <= 0.9 or 1.1 <= f <= 1.2
        assert 0.9 <= g <= 1.1
        hi = float(vol.max())
        np.testing.assert_allclose(out, f * hi * (vol / hi) ** g, rtol=1e-5, atol=1e-6)
        factors.append(f)
    assert min(factors) < 1.0 < max(factors)


# ----------------------------------------------------------------------------------------------
# The cohort on disk
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vol3d") / "cohort"
    t0 = time.perf_counter()
    info = make_volume_cohort(root, 3, seed=7, **SMALL)
    elapsed = time.perf_counter() - t0
    torch.set_num_threads(before)
    return info, elapsed


def test_cohort_layout_and_labels(small_cohort):
    info, _ = small_cohort
    root = info.root
    assert sorted(p.name for p in info.train_dir.glob("*.nii.gz")) == [
        "sub-000.nii.gz",
        "sub-001.nii.gz",
        "sub-002.nii.gz",
    ]
    assert sorted(p.name for p in info.holdout_dir.glob("*.nii.gz")) == ["hold-000.nii.gz"]
    syn = sorted(p.name for p in info.synthetic_dir.glob("*.nii.gz"))
    assert syn == [f"syn-{k:03d}.nii.gz" for k in range(5)]
    assert (info.n_train, info.n_holdout, info.n_novel, info.seed) == (3, 1, 1, 7)
    assert info.conditions == SMALL["conditions"]

    lab = read_labels(info.synthetic_dir)
    assert list(lab.columns) == ["path", "label", "source", "augmentation"]
    assert sorted(lab["path"]) == syn
    assert (lab["label"] == "copy").sum() == 4 and (lab["label"] == "novel").sum() == 1
    copies = lab[lab["label"] == "copy"]
    assert sorted(copies["augmentation"]) == sorted(SMALL["conditions"])
    assert set(copies["source"]) <= {"sub-000.nii.gz", "sub-001.nii.gz", "sub-002.nii.gz"}
    novel = lab[lab["label"] == "novel"]
    assert novel["source"].tolist() == [""] and novel["augmentation"].tolist() == [""]
    assert info.labels.equals(lab)

    m = json.loads((root / "manifest.json").read_text())
    assert m["params"]["generator_version"] == GENERATOR_VERSION and m["params"]["seed"] == 7
    assert m["counts"] == {"train": 3, "holdout": 1, "novel": 1, "copies": 4, "synthetic": 5}
    assert len(m["seeds"]["train"]) == 3 and len(set(m["seeds"]["train"] + m["seeds"]["holdout"])) == 4
    by_path = {e["path"]: e for e in m["synthetic"]}
    for row in lab.itertuples():
        e = by_path[row.path]
        assert (e["label"], e["source"], e["condition"]) == (row.label, row.source, row.augmentation)
    sub_shape = tuple(m["subject_shape"])
    assert m["subject_zooms"] == [1.5, 1.5, 3.0]
    for e in m["synthetic"]:
        img = nib.load(str(info.synthetic_dir / e["path"]))
        assert img.get_data_dtype() == np.float32 and list(img.shape) == e["shape"]
        np.testing.assert_allclose(img.affine, np.diag([*e["zooms"], 1.0]))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        data = np.asanyarray(img.dataobj)
        assert float(data.min()) >= 0.0
        if e["condition"] == "thickness":
            assert e["zooms"] == [1.5, 1.5, 6.0] and e["shape"][2] == round(sub_shape[2] / 2)
        elif e["condition"] == "slab_third":
            a, b = e["params"]["slab"]
            src = np.asanyarray(nib.load(str(info.train_dir / e["source"])).dataobj)
            np.testing.assert_array_equal(data, src[:, :, a:b])
            assert abs((b - a) - sub_shape[2] / 3) <= 1
        elif e["condition"] == "exact":
            src = np.asanyarray(nib.load(str(info.train_dir / e["source"])).dataobj)
            np.testing.assert_array_equal(data, src)
        elif e["condition"] == "rot10":
            assert abs(e["params"]["angle_deg"]) == 10.0 and e["params"]["axis"] in "xyz"
        else:
            assert e["label"] == "novel" and e["shape"] == list(sub_shape)


def test_cohort_loads_through_the_product(small_cohort):
    info, _ = small_cohort
    for folder in (info.train_dir, info.holdout_dir, info.synthetic_dir):
        co = load_cohort(folder)
        files = sorted(p.name for p in folder.glob("*.nii.gz"))
        assert sorted({s.path for s in co.slices}) == files
        # only whole-file reads count; the vertex slice of a subject shifted down may be background (dropped)
        assert not [s for s in co.skipped if s.path.endswith(".nii.gz")]
        assert all("background" in s.reason for s in co.skipped)
        for f in files:
            nz = nib.load(str(folder / f)).shape[2]
            sl = [s for s in co.slices if s.path == f]
            assert {s.axis for s in sl} == {"axial"}
            assert len(sl) >= 0.8 * nz and max(s.slice_index for s in sl) < nz  # axial slices (axis 2)
            assert len(sl) + sum(s.path.startswith(f + "#") for s in co.skipped) == nz


def test_cohort_is_deterministic_and_cached(small_cohort, tmp_path):
    info, elapsed = small_cohort
    before = _tree_hashes(info.root)
    mtimes = {p: p.stat().st_mtime_ns for p in info.root.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    again = make_volume_cohort(info.root, 3, seed=7, **SMALL)
    assert time.perf_counter() - t0 < min(1.0, elapsed / 3)
    assert {p: p.stat().st_mtime_ns for p in info.root.rglob("*") if p.is_file()} == mtimes  # nothing rewritten
    assert again.labels.equals(info.labels)
    # the same seed elsewhere: the same bytes, file by file
    other = make_volume_cohort(tmp_path / "other", 3, seed=7, **SMALL)
    assert _tree_hashes(other.root) == before


def test_other_parameters_regenerate(tmp_path):
    root = tmp_path / "c"
    kw = dict(n_holdout=0, n_novel=0, copies_per_condition=2, conditions=("exact",))
    a = make_volume_cohort(root, 2, seed=1, **kw)
    assert sorted(a.labels["source"]) == ["sub-000.nii.gz", "sub-001.nii.gz"]  # different subjects when possible
    first = _tree_hashes(root)
    b = make_volume_cohort(root, 2, seed=1, **{**kw, "conditions": ("flip",)})
    assert b.labels["augmentation"].tolist() == ["flip", "flip"]
    assert _tree_hashes(root) != first
    assert json.loads((root / "manifest.json").read_text())["params"]["conditions"] == ["flip"]
    assert sorted(p.name for p in (root / "synthetic").iterdir()) == ["labels.csv", "syn-000.nii.gz", "syn-001.nii.gz"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown 3D condition"):
        make_volume_cohort(tmp_path, 1, conditions=("rot45",))
    with pytest.raises(ValueError, match="z_step"):
        make_volume_cohort(tmp_path, 1, z_step=0)
    with pytest.raises(ValueError, match="n_train"):
        make_volume_cohort(tmp_path, 0, n_novel=0, n_holdout=0)
