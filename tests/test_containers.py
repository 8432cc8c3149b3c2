"""One intensity rule whatever the container: the same real slice loads to the same array and features.

The rule (``inspector.io`` Conventions → Normalisation): each slice's array is normalised on its own
(:func:`inspector.preprocess.normalise_slice`: its 0.5/99.5 percentiles to [0, 1], clipped), so it depends
only on its own pixels; the background rule of a volume's slices is still decided on the volume-normalised
intensities. One real slice (axial slice 45 of nilearn's MNI152 template, 2 mm, shipped with nilearn) is
written as a 16-bit PNG, two 8-bit PNGs, a 2D ``.npy``, inside a NIfTI volume, a DICOM series and a
multi-page TIFF (each with other real slices around it at other intensity ranges), and loaded with
:func:`inspector.io.load_cohort`.

Tolerances (stated in the asserts): the loaded arrays (128 px) agree with the slice normalised on its own
within ``2/255`` max abs difference; measured: ``.npy`` and NIfTI 0, 16-bit PNG and multi-page TIFF
0.002/255, DICOM (15-bit stored values, rescaled) 0.006/255, 8-bit PNG of the generator's [0, 1] output
0.49/255, 8-bit min-max export 0.70/255. The ``pixels`` extractor's features agree with cosine >= 0.999
per layer (measured >= 0.9999998). On real slices a linear window/level change leaves the normalised slice
unchanged (< 1e-5), and an 8-bit quantisation changes it by at most one 8-bit step (see the last tests).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from numpy.testing import assert_allclose
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

import inspector
from inspector.io import LoadConfig, load_cohort
from inspector.preprocess import PreprocessConfig, is_background, normalise_slice, normalise_volume, resize_square
from inspector.privacy import KEY_ENV_VAR
from inspector.types import Cohort

#: The agreed tolerances of this file.
ARRAY_TOL = 2.0 / 255.0
COSINE_MIN = 0.999
#: The target slice (axial index of the 2 mm MNI152 template) and its neighbours in the volumes.
TARGET = 45
NEIGHBOURS = (35, 40, 50, 55)


@pytest.fixture(autouse=True)
def ct_pseudonym_key(tmp_path_factory, monkeypatch) -> None:
    """Reading DICOM creates a pseudonym key: keep it in a temporary file."""
    monkeypatch.setenv(KEY_ENV_VAR, str(tmp_path_factory.mktemp("key") / "pseudonym.key"))


@pytest.fixture(scope="module")
def ct_mni() -> np.ndarray:
    """The MNI152 template (2 mm) as float64, RAS+ voxel order, shape (99, 117, 95)."""
    from nilearn.datasets import load_mni152_template

    img = nib.as_closest_canonical(load_mni152_template(resolution=2))
    return np.asarray(img.get_fdata(), dtype=np.float64)


def ct_display(plane: np.ndarray) -> np.ndarray:
    """A canonical axial plane (X, Y) in the loader's radiological display: (Y, X), both reversed."""
    return plane.T[::-1, ::-1]


def ct_u16(x: np.ndarray) -> np.ndarray:
    """Min-max to the full 16-bit range."""
    return np.round((x - x.min()) / (x.max() - x.min()) * 65535.0).astype(np.uint16)


def ct_u8(x: np.ndarray) -> np.ndarray:
    """Min-max to the full 8-bit range (a generic 8-bit export)."""
    return np.round((x - x.min()) / (x.max() - x.min()) * 255.0).astype(np.uint8)


def ct_write_dicom(path: Path, pixels: np.ndarray, z: float, *, slope: float, intercept: float) -> None:
    """One uncompressed 16-bit axial MR slice of the series ``ct`` at height ``z`` (rows/columns as stored)."""
    arr = np.asarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = "CT-0001"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["ct-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["ct-series"])
    ds.SeriesNumber = 1
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [2.0, 2.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def ct_nifti_volume(mni: np.ndarray) -> np.ndarray:
    """The target as voxel slice 2 of five (RAS+), each slice at its own intensity range (float32)."""
    planes = [mni[:, :, k] for k in NEIGHBOURS]
    ranges = [(3000.0, 0.0), (1200.0, 40.0), (900.0, 25.0), (2500.0, 300.0), (600.0, 0.0)]
    stack = [planes[0], planes[1], mni[:, :, TARGET], planes[2], planes[3]]
    return np.stack([p * a + b for p, (a, b) in zip(stack, ranges, strict=True)], axis=-1).astype(np.float32)


def ct_write_containers(root: Path, mni: np.ndarray) -> dict[str, tuple[str, int]]:
    """Write the target slice in every container; return ``{container: (Slice.path, slice_index)}``."""
    x = ct_display(mni[:, :, TARGET])
    around = [ct_display(mni[:, :, k]) for k in NEIGHBOURS]
    where: dict[str, tuple[str, int]] = {}
    # alone: a 16-bit PNG, an 8-bit export, an 8-bit generator output ([0, 1] output times 255), a float .npy
    Image.fromarray(ct_u16(x)).save(root / "alone16.png")
    Image.fromarray(ct_u8(x)).save(root / "alone8_export.png")
    Image.fromarray(np.round(normalise_slice(x) * 255.0).astype(np.uint8)).save(root / "alone8_generator.png")
    np.save(root / "alone.npy", x.astype(np.float32))
    where |= {
        "png16": ("alone16.png", 0),
        "png8_export": ("alone8_export.png", 0),
        "png8_generator": ("alone8_generator.png", 0),
        "npy": ("alone.npy", 0),
    }
    # a NIfTI volume (RAS+, 2 mm): the target at index 2 in its own scanner units, the others at other ranges
    nib.save(nib.Nifti1Image(ct_nifti_volume(mni), np.diag([2.0, 2.0, 2.0, 1.0])), str(root / "vol.nii.gz"))
    where["nifti"] = ("vol.nii.gz", 2)
    # a DICOM series (rows/columns as displayed): the target at position 2, stored with a rescale
    stored = [
        np.round(around[0] * 5000.0),
        np.round(around[1] * 500.0),
        np.round(x * 30000.0),
        np.round(around[2] * 3000.0 + 2000.0),
        np.round(around[3] * 250.0),
    ]
    for k, (pix, (slope, icpt)) in enumerate(
        zip(stored, [(1.0, 0.0), (2.0, -50.0), (0.1, -20.0), (1.0, 0.0), (3.0, 10.0)], strict=True)
    ):
        ct_write_dicom(root / "series" / f"im{k}.dcm", pix, z=2.0 * k, slope=slope, intercept=icpt)
    where["dicom"] = ("series", 2)
    # a multi-page TIFF (pages as displayed): the target as page 1 between brighter and darker pages
    pages = np.stack([ct_u16(around[0]) // 3, ct_u16(x), ct_u16(around[3])])
    tifffile.imwrite(root / "pages.tif", pages, photometric="minisblack")
    where["tiff"] = ("pages.tif", 1)
    return where


@pytest.fixture(scope="module")
def ct_loaded(tmp_path_factory, ct_mni) -> tuple[dict[str, np.ndarray], Cohort]:
    root = tmp_path_factory.mktemp("containers")
    where = ct_write_containers(root, ct_mni)
    key_dir = tmp_path_factory.mktemp("key-containers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV_VAR, str(key_dir / "pseudonym.key"))
        cohort = load_cohort(root, LoadConfig())
    by = {(s.path, s.slice_index): s.array for s in cohort}
    missing = {c: w for c, w in where.items() if w not in by}
    assert not missing, (missing, sorted(by), [(sk.path, sk.reason) for sk in cohort.skipped])
    return {c: by[w] for c, w in where.items()}, cohort


def test_every_container_loads_the_same_array(ct_loaded, ct_mni):
    arrays, cohort = ct_loaded
    # the reference: the raw display slice normalised on its own, resized as the loader does
    ref = resize_square(normalise_slice(ct_display(ct_mni[:, :, TARGET])), PreprocessConfig().size)
    diffs = {c: float(np.abs(a - ref).max()) for c, a in arrays.items()}
    assert all(d <= ARRAY_TOL for d in diffs.values()), {c: round(d * 255, 3) for c, d in diffs.items()}
    # lossless containers agree far more tightly (16-bit, float, rescaled DICOM, NIfTI float32)
    for c in ("png16", "npy", "nifti", "dicom", "tiff"):
        assert diffs[c] <= 1e-4, (c, diffs[c])
    # the other slices of the volumes (at other intensity ranges) were loaded too and differ from the target
    assert {s.slice_index for s in cohort if s.path == "vol.nii.gz"} == set(range(5))
    assert {s.slice_index for s in cohort if s.path == "series"} == set(range(5))


def test_every_container_gives_the_same_pixels_features(ct_loaded, tmp_path):
    arrays, _ = ct_loaded
    names = list(arrays)
    feats = inspector.extract(np.stack([arrays[c] for c in names]), extractor="pixels", cache_dir=tmp_path)
    for layer in feats.layer_names:
        f = feats.views["id"][layer].astype(np.float64)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        cos = f @ f.T
        assert float(cos.min()) >= COSINE_MIN, (layer, dict(zip(names, cos.min(1).round(6).tolist(), strict=True)))


def test_per_volume_normalisation_would_disagree(ct_mni):
    """The check has teeth: the volume rule gives the target a different array inside the NIfTI volume."""
    vol = ct_nifti_volume(ct_mni)
    per_volume = ct_display(normalise_volume(vol)[:, :, 2])
    own = normalise_slice(ct_display(ct_mni[:, :, TARGET]))
    assert float(np.abs(per_volume - own).max()) > 0.3


def test_background_rule_still_uses_the_volume(tmp_path, ct_mni):
    """A near-empty end slice of a volume is skipped (judged on the volume-normalised intensities), while the
    same slice stored alone is judged on itself and kept: the stated asymmetry of the background rule."""
    faint = ct_mni[:, :, TARGET] * 0.03  # a slice with little signal at the end of a bright volume
    vol = np.stack([faint, ct_mni[:, :, 40], ct_mni[:, :, TARGET]], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "v.nii.gz"))
    np.save(tmp_path / "faint.npy", ct_display(faint).astype(np.float32))
    assert is_background(ct_display(normalise_volume(vol)[:, :, 0]))
    c = load_cohort(tmp_path, LoadConfig())
    assert sorted(s.slice_index for s in c if s.path == "v.nii.gz") == [1, 2]
    assert any(sk.path == "v.nii.gz#0" and sk.reason.startswith("background-only") for sk in c.skipped)
    alone = [s for s in c if s.path == "faint.npy"]
    assert len(alone) == 1
    # kept slices are still normalised on their own: the faint slice alone equals the bright one of the volume
    bright = next(s for s in c if s.path == "v.nii.gz" and s.slice_index == 2)
    assert_allclose(alone[0].array, bright.array, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Robustness of the rule to windowing and 8-bit quantisation, on real slices
# ----------------------------------------------------------------------------------------------

#: Axial slices with anatomy, from the inferior end (5: little foreground) to the vertex (75); "hot" is slice 45
#: with 0.1 % of its pixels set to five times its maximum (a few bright outliers: a large max/percentile ratio).
ROBUST_SLICES = (5, 10, 20, 35, 45, 60, 70, 75, "hot")


def ct_robust_slice(mni: np.ndarray, k: int | str) -> np.ndarray:
    if k != "hot":
        return ct_display(mni[:, :, int(k)])
    x = ct_display(mni[:, :, TARGET]).copy()
    idx = np.random.default_rng(0).choice(x.size, size=x.size // 1000, replace=False)
    x.flat[idx] = 5.0 * x.max()
    return x


@pytest.mark.parametrize("k", ROBUST_SLICES)
def test_linear_window_level_does_not_change_the_slice(ct_mni, k):
    x = ct_robust_slice(ct_mni, k)
    ref = normalise_slice(x)
    lo, hi = np.percentile(x, (0.5, 99.5))
    # a linear window/level (any slope > 0, any offset): exactly the same array, up to float rounding
    for slope, offset in ((4000.0, -1000.0), (0.01, 3.0), (255.0, 0.0)):
        assert float(np.abs(normalise_slice(x * slope + offset) - ref).max()) <= 1e-5
    # a window that clips only beyond the percentiles: no change either
    wide = np.clip(x, lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    assert float(np.abs(normalise_slice(wide) - ref).max()) <= 1e-5
    # a window that clips exactly at the percentiles: the clipping effect is below half an 8-bit step
    tight = np.clip(x, lo, hi)
    assert float(np.abs(normalise_slice(tight) - ref).max()) <= 0.5 / 255.0


@pytest.mark.parametrize("k", ROBUST_SLICES)
def test_8bit_quantisation_changes_the_slice_by_about_one_step(ct_mni, k):
    x = ct_robust_slice(ct_mni, k)
    ref = normalise_slice(x)
    # a generator's [0, 1] output saved as 8-bit: within one 8-bit step (measured <= 0.5/255: the rounding)
    gen = np.round(ref * 255.0).astype(np.uint8)
    assert float(np.abs(normalise_slice(gen) - ref).max()) <= 1.0 / 255.0
    # a min-max 8-bit export: its step on the normalised scale is ratio/255 with ratio = (max - min) over the
    # percentile range (1.01 to 1.14 on the template's slices, 5.1 with the hot pixels). Rounding moves each
    # value and each percentile by at most half a step (a bound of two steps); measured at most 0.8 of a step
    # (0.57/255 to 0.77/255 on the template's slices, 4.05/255 with the hot pixels, whose step is 5.06/255).
    lo, hi = np.percentile(x, (0.5, 99.5))
    step = (x.max() - x.min()) / (hi - lo) / 255.0
    err = float(np.abs(normalise_slice(ct_u8(x)) - ref).max())
    assert err <= step, (err * 255, step * 255)
    if k != "hot":  # the template's slices: within one 8-bit step of the normalised scale
        assert err <= 1.0 / 255.0, err * 255
    # 16-bit: far below one 8-bit step
    assert float(np.abs(normalise_slice(ct_u16(x)) - ref).max()) <= 0.05 / 255.0
