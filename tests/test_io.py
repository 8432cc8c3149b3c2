"""Readers, cohort discovery, manifests, pseudonymisation and every bad-input path of inspector.io.

All files are written to ``tmp_path`` by the tests themselves; randomness is seeded.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from inspector.io import (
    CohortNotFoundError,
    LoadConfig,
    LoadWarning,
    ManifestError,
    NoImagesError,
    _dicom_error,
    load_cohort,
    pseudonymise,
    read_labels,
)
from inspector.preprocess import PreprocessConfig, normalise_volume
from inspector.types import Cohort, Slice, SourceFile, raw_pixel_hash

NATIVE = LoadConfig(preprocess=PreprocessConfig(size=None))


# ----------------------------------------------------------------------------------------------
# helpers (io_ prefix: shared tests/ folder)
# ----------------------------------------------------------------------------------------------


def io_rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def io_image(shape: tuple[int, ...], seed: int = 0, lo: int = 50, hi: int = 1000) -> np.ndarray:
    """Random foreground-rich integer image/volume (int16)."""
    return io_rng(seed).integers(lo, hi, size=shape).astype(np.int16)


def io_uid(name: str) -> str:
    return generate_uid(entropy_srcs=[name])


def io_write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_id: str | None = "PID-0001",
    patient_name: str | None = "TEST^PATIENT",
    series: str = "series-a",
    position: tuple[float, float, float] | None = None,
    orientation: tuple[float, ...] | None = (1, 0, 0, 0, 1, 0),
    instance: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    photometric: str = "MONOCHROME2",
    spacing: tuple[float, float] = (0.5, 0.75),
) -> Path:
    """Write an uncompressed 16-bit MR DICOM (2D -> single frame, 3D -> multi-frame)."""
    arr = np.asarray(pixels, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = io_uid(str(path))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    if patient_id is not None:
        ds.PatientID = patient_id
    if patient_name is not None:
        ds.PatientName = patient_name
    ds.StudyInstanceUID = io_uid("study")
    ds.SeriesInstanceUID = io_uid(series)
    ds.SeriesNumber = 1
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [spacing[0], spacing[1]]
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if instance is not None:
        ds.InstanceNumber = instance
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept if intercept is not None else 0
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def io_save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def io_display(m: np.ndarray) -> np.ndarray:
    """The radiological display of a canonical 2D plane (P, Q) -> (Q, P), both reversed."""
    return m.T[::-1, ::-1]


def io_keys(cohort: Cohort) -> list[str]:
    return [s.key for s in cohort]


def io_reasons(cohort_or_list) -> dict[str, str]:
    items = cohort_or_list.skipped if isinstance(cohort_or_list, Cohort) else cohort_or_list
    return {sk.path: sk.reason for sk in items}


# ----------------------------------------------------------------------------------------------
# NIfTI
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("axis", "vox_axis", "n", "shape", "spacing"),
    [
        ("axial", 2, 8, (7, 6), (3.0, 2.0)),
        ("coronal", 1, 7, (8, 6), (4.0, 2.0)),
        ("sagittal", 0, 6, (8, 7), (4.0, 3.0)),
    ],
)
def test_nifti_axis_choice_shapes_spacing_and_content(tmp_path, axis, vox_axis, n, shape, spacing):
    data = io_image((6, 7, 8), seed=1)
    io_save_nifti(tmp_path / "sub-01.nii", data, np.diag([2.0, 3.0, 4.0, 1.0]))
    c = load_cohort(tmp_path, LoadConfig(axis=axis, preprocess=PreprocessConfig(size=None)))
    assert len(c) == n
    assert [s.slice_index for s in c] == list(range(n))
    norm = normalise_volume(data, (0.5, 99.5))
    for s in c:
        assert s.axis == axis
        assert s.subject_id == "sub-01"
        assert s.path == "sub-01.nii"
        assert s.original_shape == shape
        assert s.spacing == spacing
        raw = io_display(np.take(data, s.slice_index, axis=vox_axis))
        assert s.sha256 == raw_pixel_hash(raw)
        assert_allclose(s.array, io_display(np.take(norm, s.slice_index, axis=vox_axis)), atol=1e-6)


def test_nifti_radiological_orientation_and_canonical_reorientation(tmp_path):
    data = np.full((10, 12, 5), 100, dtype=np.int16)
    data[9, 11, :] = 1000  # right (x max), anterior (y max)
    data[0, 0, :] = 500  # left, posterior
    io_save_nifti(tmp_path / "ras.nii", data)
    # the same anatomy stored left-right flipped with an LAS affine must come back identical
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[0, 3] = 9.0
    io_save_nifti(tmp_path / "las.nii", data[::-1].copy(), las)
    c = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None, min_foreground_fraction=0)))
    by = {(s.path, s.slice_index): s for s in c}
    top_left = by[("ras.nii", 2)].array
    assert top_left[0, 0] == pytest.approx(1.0)  # anterior up, patient right on image left
    assert top_left[-1, -1] < 1.0 and top_left[-1, -1] > top_left[5, 5]  # posterior-left bottom right
    assert_array_equal(by[("las.nii", 2)].array, top_left)
    assert by[("las.nii", 2)].sha256 == by[("ras.nii", 2)].sha256


def test_nifti_gz_and_4d_warns_and_takes_volume_index(tmp_path):
    vol0 = io_image((6, 7, 8), seed=2)
    vol1 = io_image((6, 7, 8), seed=3)
    io_save_nifti(tmp_path / "fmri.nii.gz", np.stack([vol0, vol1], axis=-1))
    with pytest.warns(LoadWarning, match=r"fmri\.nii\.gz.*4D.*2 volumes.*volume 1"):
        c = load_cohort(tmp_path, LoadConfig(volume_index=1, preprocess=PreprocessConfig(size=None)))
    assert len(c) == 8
    assert c[0].subject_id == "fmri"  # stem without both extensions
    assert c[3].sha256 == raw_pixel_hash(io_display(vol1[:, :, 3]))
    assert c[3].sha256 != raw_pixel_hash(io_display(vol0[:, :, 3]))


def test_nifti_4d_volume_index_out_of_range_is_skipped(tmp_path):
    io_save_nifti(tmp_path / "a.nii", io_image((6, 7, 8), seed=4))
    io_save_nifti(tmp_path / "b.nii.gz", np.stack([io_image((6, 7, 8), seed=5)] * 2, axis=-1))
    c = load_cohort(tmp_path, LoadConfig(volume_index=5))
    assert {s.path for s in c} == {"a.nii"}
    assert "volume_index 5 is out of range" in io_reasons(c)["b.nii.gz"]


def test_nifti_2d_is_one_slice_with_folder_subject(tmp_path):
    img = io_image((9, 11), seed=6)
    io_save_nifti(tmp_path / "site1" / "flat.nii.gz", img[:, :, None])
    io_save_nifti(tmp_path / "site1" / "flat2.nii", img)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["site1/flat.nii.gz#0", "site1/flat2.nii#0"]
    for s in c:
        assert s.axis == "2d"
        assert s.subject_id == "site1"
        assert s.original_shape == (11, 9)
        assert s.sha256 == raw_pixel_hash(io_display(img))


def test_mgz_volume(tmp_path):
    data = io_image((6, 7, 8), seed=7).astype(np.float32)
    nib.save(nib.MGHImage(data, np.eye(4)), str(tmp_path / "brain.mgz"))
    c = load_cohort(tmp_path, NATIVE)
    assert len(c) == 8 and c[0].subject_id == "brain"
    assert c[4].sha256 == raw_pixel_hash(io_display(data[:, :, 4]))


def test_default_size_resizes_to_square(tmp_path):
    io_save_nifti(tmp_path / "v.nii", io_image((20, 30, 4), seed=8))
    c = load_cohort(tmp_path)
    assert c.stack().shape == (4, 128, 128)
    assert c[0].original_shape == (30, 20)
    assert 0.0 <= float(c[0].array.min()) and float(c[0].array.max()) <= 1.0


def test_slice_step_keeps_original_indices(tmp_path):
    io_save_nifti(tmp_path / "v.nii", io_image((6, 7, 10), seed=9))
    c = load_cohort(tmp_path, LoadConfig(slice_step=3))
    assert [s.slice_index for s in c] == [0, 3, 6, 9]


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def test_dicom_single_file_and_extensionless(tmp_path):
    img = io_image((12, 10), seed=10).astype(np.uint16)
    io_write_dicom(tmp_path / "p1" / "IM0001", img, spacing=(0.5, 0.75))
    (tmp_path / "p1" / "README").write_bytes(b"not dicom at all " * 20)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["p1/IM0001#0"]
    s = c[0]
    assert s.spacing == (0.5, 0.75)
    assert s.original_shape == (12, 10)
    assert s.axis == "axial"
    assert s.sha256 == raw_pixel_hash(img)
    assert s.subject_id == pseudonymise("PID-0001", "inspector-v1")
    assert_allclose(s.array, normalise_volume(img), atol=1e-6)
    assert "no DICOM preamble" in io_reasons(c)["p1/README"]


def test_dicom_multiframe_one_slice_per_frame(tmp_path):
    frames = np.stack([io_image((8, 9), seed=11 + k).astype(np.uint16) + 200 * k for k in range(4)])
    io_write_dicom(tmp_path / "MF.IMA", frames)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == [f"MF.IMA#{k}" for k in range(4)]
    for k, s in enumerate(c):
        assert s.sha256 == raw_pixel_hash(frames[k])


def test_dicom_series_order_recovered_from_image_position(tmp_path):
    n = 6
    vols = [io_image((10, 10), seed=20 + k).astype(np.uint16) + 300 * k for k in range(n)]
    names = np.random.default_rng(0).permutation(n)  # file names unrelated to position
    # a sagittal series: row (0, 1, 0) x column (0, 0, -1) gives the normal (-1, 0, 0), so files
    # written with increasing x lie at decreasing positions along the normal: the reverse order
    iop = (0, 1, 0, 0, 0, -1)
    for k in range(n):
        io_write_dicom(
            tmp_path / "series" / f"f{names[k]:02d}.dcm",
            vols[k],
            position=(-10.0 + 2.5 * k, 5.0, 7.0),
            orientation=iop,
            instance=k + 1,  # deliberately contradicting the geometry
        )
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == [f"series#{k}" for k in range(n)]
    assert [s.sha256 for s in c] == [raw_pixel_hash(v) for v in vols[::-1]]
    assert all(s.axis == "sagittal" for s in c)
    means = [float(s.array.mean()) for s in c]
    assert means == sorted(means, reverse=True)
    assert len(c.subjects) == 1


def test_dicom_series_without_position_uses_instance_number(tmp_path):
    n = 5
    vols = [io_image((8, 8), seed=30 + k).astype(np.uint16) + 250 * k for k in range(n)]
    order = [3, 0, 4, 1, 2]
    for k in range(n):
        io_write_dicom(tmp_path / f"x{order[k]}", vols[k], orientation=None, instance=k + 1)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == [f".#{k}" for k in range(n)]
    assert [s.sha256 for s in c] == [raw_pixel_hash(v) for v in vols]
    assert c[0].axis == "2d"


def test_dicom_two_series_in_one_folder_get_distinct_paths(tmp_path):
    for k in range(2):
        for ser in ("a", "b"):
            io_write_dicom(
                tmp_path / "f" / f"{ser}{k}.dcm", io_image((8, 8), seed=40 + k), series=ser, position=(0, 0, k)
            )
    c = load_cohort(tmp_path, NATIVE)
    assert sorted({s.path for s in c}) == ["f/series-1", "f/series-2"]
    assert len(c) == 4


def test_dicom_rescale_slope_intercept_applied(tmp_path):
    stored = io_image((10, 10), seed=50).astype(np.uint16)
    io_write_dicom(tmp_path / "s" / "a.dcm", stored, position=(0, 0, 0), slope=1.0, intercept=0.0)
    io_write_dicom(tmp_path / "s" / "b.dcm", stored, position=(0, 0, 1), slope=3.0, intercept=-100.0)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["s#0", "s#1"]
    assert c[0].sha256 == raw_pixel_hash(stored)  # identity rescale keeps the stored values
    assert c[1].sha256 == raw_pixel_hash(stored.astype(np.float64) * 3.0 - 100.0)
    # normalised over the whole series: the rescaled slice is brighter
    assert float(c[1].array.mean()) > float(c[0].array.mean()) + 0.2


def test_dicom_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.linspace(100, 2000, 16), (12, 1)).astype(np.uint16)
    io_write_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1", patient_id="A")
    io_write_dicom(tmp_path / "m2.dcm", ramp, photometric="MONOCHROME2", patient_id="B")
    c = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None, min_foreground_fraction=0)))
    m1, m2 = c[0].array, c[1].array
    assert m2[:, 0].mean() < m2[:, -1].mean()
    assert m1[:, 0].mean() > m1[:, -1].mean()
    assert_allclose(m1, 1.0 - m2, atol=1e-5)


def test_dicom_compressed_without_handler_is_skipped_with_reason(tmp_path):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here; the no-handler path cannot be exercised")
    src = pydicom.data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    shutil.copy(src, tmp_path / "jls.dcm")
    io_write_dicom(tmp_path / "ok.dcm", io_image((8, 8), seed=60))
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["ok.dcm#0"]
    reason = io_reasons(c)["jls.dcm"]
    assert "JPEG-LS" in reason and "1.2.840.10008.1.2.4.80" in reason
    assert "pylibjpeg" in reason and "gdcm" in reason


def test_dicom_compressed_with_builtin_handler_is_decoded(tmp_path):
    rle = pydicom.data.get_testdata_file("MR_small_RLE.dcm")
    ref = pydicom.data.get_testdata_file("MR_small.dcm")
    shutil.copy(rle, tmp_path / "rle.dcm")
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["rle.dcm#0"]
    expected = pydicom.dcmread(ref).pixel_array
    assert c[0].original_shape == expected.shape
    assert_allclose(c[0].array, normalise_volume(expected), atol=1e-6)


def test_dicom_without_pixel_data_and_truncated_file_are_skipped(tmp_path):
    io_write_dicom(tmp_path / "ok.dcm", io_image((8, 8), seed=61))
    ds = pydicom.dcmread(tmp_path / "ok.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    io_write_dicom(tmp_path / "trunc.dcm", io_image((8, 8), seed=62), series="other", patient_id="P2")
    full = (tmp_path / "trunc.dcm").read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(full[: len(full) - 40])
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["ok.dcm#0"]
    r = io_reasons(c)
    assert "without pixel data" in r["nopix.dcm"]
    assert r["trunc.dcm"].startswith("could not decode DICOM pixel data")


# ----------------------------------------------------------------------------------------------
# pseudonymisation
# ----------------------------------------------------------------------------------------------


def test_pseudonymise_function():
    a = pseudonymise("MRN-1", "salt")
    assert a == pseudonymise("MRN-1", "salt")
    assert a.startswith("sub-") and len(a) == 14
    assert a != pseudonymise("MRN-1", "other") and a != pseudonymise("MRN-2", "salt")


def test_raw_patient_identifiers_never_leave_the_reader(tmp_path, caplog, recwarn):
    caplog.set_level(logging.DEBUG)
    secrets = ("DOE^JANE", "DOE", "JANE", "MRN-123456", "123456")
    for k in range(3):
        io_write_dicom(
            tmp_path / "pat" / f"{k}.dcm",
            io_image((10, 10), seed=70 + k),
            patient_id="MRN-123456",
            patient_name="DOE^JANE",
            position=(0, 0, k),
        )
    # a second patient known only by name, and a junk + a broken file to exercise the log paths
    io_write_dicom(tmp_path / "p2" / "a.dcm", io_image((10, 10), seed=80), patient_id=None, patient_name="DOE^JANE")
    (tmp_path / "p2" / "broken.dcm").write_bytes((tmp_path / "pat" / "0.dcm").read_bytes()[:300])
    cfg = NATIVE
    c1 = load_cohort(tmp_path, cfg)
    c2 = load_cohort(tmp_path, cfg)
    c3 = load_cohort(tmp_path, LoadConfig(salt="another-salt", preprocess=PreprocessConfig(size=None)))
    assert len(c1) == 4
    subj = {s.path: s.subject_id for s in c1}
    assert subj["pat"] == pseudonymise("MRN-123456", "inspector-v1")
    assert subj["p2/a.dcm"] == pseudonymise("DOE^JANE", "inspector-v1")
    assert [s.subject_id for s in c1] == [s.subject_id for s in c2]
    assert set(c3.subjects).isdisjoint(c1.subjects)
    texts = [c1.summary(), repr(c1), str(c1), caplog.text, *(str(w.message) for w in recwarn)]
    for s in c1:
        texts += [repr(s), s.subject_id, s.path, s.sha256, str(s.label), s.axis]
    texts += [f"{sk.path} {sk.reason}" for sk in c1.skipped]
    # a library error that quotes a header value is redacted before it reaches a reason
    ds = pydicom.dcmread(tmp_path / "pat" / "0.dcm")
    texts.append(_dicom_error(ValueError("cannot parse 'DOE^JANE' / MRN-123456"), ds))
    blob = "\n".join(texts)
    assert "broken.dcm" in blob and "<redacted>" in blob  # the broken file was reported...
    for secret in secrets:
        assert secret not in blob  # ...but no raw identifier anywhere


# ----------------------------------------------------------------------------------------------
# PNG / TIFF / JPEG
# ----------------------------------------------------------------------------------------------


def test_png_8bit_with_folder_subjects(tmp_path):
    img = io_image((20, 24), seed=90, lo=20, hi=250).astype(np.uint8)
    (tmp_path / "caseA").mkdir()
    Image.fromarray(img).save(tmp_path / "caseA" / "s0.png")
    Image.fromarray(img[::-1].copy()).save(tmp_path / "root.png")
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["caseA/s0.png#0", "root.png#0"]
    assert c[0].subject_id == "caseA"
    assert c[1].subject_id == tmp_path.name  # file at the root: the root's own name
    assert c[0].axis == "2d" and c[0].original_shape == (20, 24)
    assert c[0].sha256 == raw_pixel_hash(img)
    assert_allclose(c[0].array, normalise_volume(img), atol=1e-6)


def test_png_16bit_keeps_full_range(tmp_path):
    ramp = np.linspace(0, 4000, 64 * 64).reshape(64, 64).round().astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    c = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None, percentiles=(0, 100))))
    s = c[0]
    assert s.sha256 == raw_pixel_hash(ramp)  # read back as uint16, unchanged
    assert len(np.unique(s.array)) > 3000  # not collapsed to 256 levels
    assert_allclose(s.array, ramp / 4000.0, atol=1e-6)


def test_rgb_png_converted_with_warning(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(16)[None, :] * 15
    rgb[..., 1] = 100
    rgb[..., 2] = np.arange(16)[:, None] * 10
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(np.dstack([rgb, np.full((16, 16), 255, np.uint8)])).save(tmp_path / "colour_a.png")
    with pytest.warns(LoadWarning, match=r"converted to greyscale") as rec:
        c = load_cohort(tmp_path, NATIVE)
    assert sorted(str(w.message).split(":")[0] for w in rec) == ["colour.png", "colour_a.png"]
    assert {w.filename for w in rec} == {__file__}  # points at the caller of load_cohort
    lum = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert c[0].sha256 == raw_pixel_hash(lum)
    assert c[1].sha256 == raw_pixel_hash(lum)


def test_tiff_16bit_single_and_multipage_volume(tmp_path):
    img = io_image((15, 17), seed=100, hi=30000).astype(np.uint16)
    stack = np.stack([io_image((10, 12), seed=101 + k).astype(np.uint16) for k in range(3)])
    tifffile.imwrite(tmp_path / "one.tif", img)
    tifffile.imwrite(tmp_path / "stack.tiff", stack, photometric="minisblack")
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["one.tif#0", "stack.tiff#0", "stack.tiff#1", "stack.tiff#2"]
    assert c[0].sha256 == raw_pixel_hash(img) and c[0].axis == "2d"
    assert c[0].subject_id == tmp_path.name
    assert [s.sha256 for s in c][1:] == [raw_pixel_hash(p) for p in stack]
    assert c[1].subject_id == "stack" and c[1].axis == "axial"


def test_rgb_tiff_converted_with_warning(tmp_path):
    rgb = io_rng(5).integers(10, 250, size=(12, 14, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with pytest.warns(LoadWarning, match=r"rgb\.tif: colour TIFF \(3 samples\)"):
        c = load_cohort(tmp_path, NATIVE)
    assert len(c) == 1 and c[0].original_shape == (12, 14)
    lum = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert c[0].sha256 == raw_pixel_hash(lum)


def test_jpeg_greyscale(tmp_path):
    yy, xx = np.mgrid[:32, :32]
    img = (40 + 5 * xx + 2 * yy).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=100)
    Image.fromarray(img).save(tmp_path / "b.jpeg", quality=100)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["a.jpg#0", "b.jpeg#0"]
    assert c[0].original_shape == (32, 32)
    assert np.corrcoef(c[0].array.ravel(), img.ravel())[0, 1] > 0.99


# ----------------------------------------------------------------------------------------------
# NumPy
# ----------------------------------------------------------------------------------------------


def test_npy_2d_and_3d_along_last_axis(tmp_path):
    img = io_image((9, 10), seed=110).astype(np.float32)
    vol = io_image((9, 10, 4), seed=111)
    np.save(tmp_path / "slice.npy", img)
    np.save(tmp_path / "vol.npy", vol)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["slice.npy#0", "vol.npy#0", "vol.npy#1", "vol.npy#2", "vol.npy#3"]
    assert c[0].subject_id == tmp_path.name and c[0].axis == "2d"
    assert c[0].sha256 == raw_pixel_hash(img)
    for k in range(4):
        assert c[1 + k].subject_id == "vol"
        assert c[1 + k].sha256 == raw_pixel_hash(vol[:, :, k])
        assert c[1 + k].original_shape == (9, 10)
    c0 = load_cohort(tmp_path / "vol.npy", LoadConfig(array_axis=0, preprocess=PreprocessConfig(size=None)))
    assert len(c0) == 9 and c0[2].sha256 == raw_pixel_hash(vol[2])


def test_npz_each_array(tmp_path):
    a2 = io_image((8, 8), seed=120)
    a3 = io_image((8, 8, 3), seed=121)
    np.savez(tmp_path / "pack.npz", img=a2, vol=a3, bad=np.zeros((2, 2, 2, 2)))
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["pack.npz:img#0", "pack.npz:vol#0", "pack.npz:vol#1", "pack.npz:vol#2"]
    assert {s.subject_id for s in c} == {"pack"}
    assert c[0].sha256 == raw_pixel_hash(a2) and c[2].sha256 == raw_pixel_hash(a3[:, :, 1])
    assert "unsupported array shape" in io_reasons(c)["pack.npz:bad"]


def test_volume_stems_that_clash_across_folders_stay_distinct_subjects(tmp_path):
    for p in ("p1", "p2"):
        (tmp_path / p).mkdir()
        np.save(tmp_path / p / "scan.npy", io_image((8, 8, 2), seed=130))
    c = load_cohort(tmp_path, NATIVE)
    assert c.subjects == ["p1/scan", "p2/scan"]


# ----------------------------------------------------------------------------------------------
# manifest, labels, progress, API details
# ----------------------------------------------------------------------------------------------


def test_manifest_subject_override_labels_and_missing_rows(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "a.npy", io_image((8, 8), seed=140))
    np.save(data / "b.npy", io_image((8, 8, 2), seed=141))
    for k in range(2):
        io_write_dicom(data / "dcm" / f"{k}.dcm", io_image((8, 8), seed=142 + k), position=(0, 0, k))
    outside = tmp_path / "elsewhere" / "c.png"
    outside.parent.mkdir()
    Image.fromarray(io_image((8, 8), seed=144, hi=250).astype(np.uint8)).save(outside)
    (data / "manifest.csv").write_text(
        f"path,subject_id,label\na.npy,S1,healthy\nb.npy,,tumour\ndcm,S3,\n{outside},S4,x\nmissing.npy,S5,\n"
    )
    c = load_cohort(data / "manifest.csv", NATIVE)
    assert c.root == data and c.name == "data"
    by = {s.key: s for s in c}
    assert by["a.npy#0"].subject_id == "S1" and by["a.npy#0"].label == "healthy"
    assert by["b.npy#1"].subject_id == "b" and by["b.npy#1"].label == "tumour"  # blank -> default
    assert by["dcm#1"].subject_id == "S3" and by["dcm#1"].label is None
    assert by["../elsewhere/c.png#0"].subject_id == "S4"
    assert "not found" in io_reasons(c)["missing.npy"]


def test_manifest_missing_columns_raises(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.npy,x\n")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['path', 'subject_id'\]"):
        load_cohort(tmp_path / "m.csv")
    assert issubclass(ManifestError, ValueError)


def test_read_labels(tmp_path):
    assert read_labels(tmp_path) is None
    (tmp_path / "labels.csv").write_text(
        "path,label,source,augmentation\ng/0.png,copy,t/3.png,hflip\ng/1.png,novel,,\n"
    )
    df = read_labels(tmp_path)
    assert list(df.columns) == ["path", "label", "source", "augmentation"]
    assert df["label"].tolist() == ["copy", "novel"]
    assert df.loc[0, "augmentation"] == "hflip"
    assert read_labels(tmp_path / "labels.csv")["path"].tolist() == ["g/0.png", "g/1.png"]
    (tmp_path / "bad.csv").write_text("path,label\na,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        read_labels(tmp_path / "bad.csv")
    with pytest.raises(CohortNotFoundError):
        read_labels(tmp_path / "nope")


def test_progress_ordering_and_cohort_passthrough(tmp_path):
    for name in ("b.npy", "a.npy", "c/a.npy"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        np.save(tmp_path / name, io_image((8, 8, 2), seed=150))
    calls = []
    c = load_cohort(tmp_path, NATIVE, name="train", progress=lambda *a: calls.append(a))
    assert calls[0] == ("loading", 0, 3) and calls[-1] == ("loading", 3, 3)
    assert [d for _, d, _ in calls] == [0, 1, 2, 3]
    assert io_keys(c) == ["a.npy#0", "a.npy#1", "b.npy#0", "b.npy#1", "c/a.npy#0", "c/a.npy#1"]
    assert c.name == "train"
    assert load_cohort(c) is c
    assert load_cohort(tmp_path, NATIVE).name == tmp_path.name
    assert load_cohort(tmp_path, NATIVE).content_hash == c.content_hash


def test_load_config_validation():
    with pytest.raises(ValueError, match="axis"):
        LoadConfig(axis="oblique")
    with pytest.raises(ValueError, match="slice_step"):
        LoadConfig(slice_step=0)
    with pytest.raises(ValueError, match="volume_index"):
        LoadConfig(volume_index=-1)
    assert hash(LoadConfig()) == hash(LoadConfig())


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_missing_path_raises_cohort_not_found(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CohortNotFoundError, match="nowhere") as ei:
        load_cohort(missing)
    assert isinstance(ei.value, FileNotFoundError)
    assert "folder" in str(ei.value)


def test_empty_folder_raises_no_images(tmp_path):
    with pytest.raises(NoImagesError) as ei:
        load_cohort(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and ".nii.gz" in msg and ".png" in msg
    assert isinstance(ei.value, ValueError) and ei.value.skipped == []


def test_folder_with_only_junk_lists_every_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "blob").write_bytes(bytes(range(256)))
    (tmp_path / "labels.csv").write_text("path,label\n")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    with pytest.raises(NoImagesError) as ei:
        load_cohort(tmp_path)
    r = io_reasons(ei.value.skipped)
    assert set(r) == {"notes.txt", "blob"}  # labels.csv and hidden files are ignored, not "skipped"
    assert r["notes.txt"].startswith("unsupported format (.txt); supported: .nii.gz")
    assert "notes.txt" in str(ei.value) and "unsupported format (.txt)" in str(ei.value)


def test_corrupt_and_truncated_files_are_skipped_not_fatal(tmp_path):
    io_save_nifti(tmp_path / "good.nii.gz", io_image((6, 7, 3), seed=160))
    io_save_nifti(tmp_path / "trunc.nii.gz", io_image((30, 30, 30), seed=161))
    full = (tmp_path / "trunc.nii.gz").read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"definitely not nifti" * 3))
    png = tmp_path / "cut.png"
    Image.fromarray(io_image((64, 64), seed=162, hi=250).astype(np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:200])
    np.save(tmp_path / "empty.npy", np.zeros((0, 5)))
    Image.fromarray(np.full((16, 16), 77, np.uint8)).save(tmp_path / "flat.png")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "labels.csv").write_text("path,label\nflat.png,novel\n")
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["good.nii.gz#0", "good.nii.gz#1", "good.nii.gz#2"]
    r = io_reasons(c)
    assert set(r) == {"trunc.nii.gz", "garbage.nii.gz", "cut.png", "empty.npy", "flat.png", "readme.txt"}
    assert r["trunc.nii.gz"].startswith("corrupt or unreadable NIfTI")
    assert r["garbage.nii.gz"].startswith("corrupt or unreadable NIfTI")
    assert r["cut.png"].startswith("corrupt or unreadable image") and "truncated" in r["cut.png"]
    assert r["empty.npy"] == "zero-size array (shape (0, 5))"
    assert r["flat.png"].startswith("constant image") and "77" in r["flat.png"]
    assert r["readme.txt"].startswith("unsupported format (.txt)")


def test_background_and_constant_slices_of_a_volume_are_listed(tmp_path):
    vol = io_image((16, 16, 5), seed=170).astype(np.float32)
    vol[:, :, 1] = 0.0  # constant slice
    vol[:, :, 3] = 0.0
    vol[0, 0, 3] = 1000.0  # one bright pixel: foreground fraction 1/256
    np.save(tmp_path / "v.npy", vol)
    c = load_cohort(tmp_path, NATIVE)
    assert [s.slice_index for s in c] == [0, 2, 4]
    r = io_reasons(c)
    assert r["v.npy#1"] == "background-only slice (constant slice; foreground fraction 0.000 < 0.05)"
    assert r["v.npy#3"] == "background-only slice (foreground fraction 0.004 < 0.05)"
    # the rule can be switched off: the bright-pixel slice is then kept
    c2 = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None, min_foreground_fraction=0)))
    assert [s.slice_index for s in c2] == [0, 1, 2, 3, 4]


def test_all_background_folder_raises_with_reasons(tmp_path):
    np.save(tmp_path / "zeros.npy", np.zeros((8, 8, 3)))
    with pytest.raises(NoImagesError, match=r"zeros\.npy: constant volume"):
        load_cohort(tmp_path)


def test_no_silent_drop_every_candidate_is_loaded_or_skipped(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        np.save(tmp_path / "a.npy", io_image((8, 8), seed=180))
        (tmp_path / "b.xyz").write_text("?")
        np.save(tmp_path / "c.npy", np.array(["not", "numbers"]))
        c = load_cohort(tmp_path, NATIVE)
    assert {s.path for s in c} | set(io_reasons(c)) == {"a.npy", "b.xyz", "c.npy"}
    assert "dtype" in io_reasons(c)["c.npy"]


# ----------------------------------------------------------------------------------------------
# provenance: Slice.sources and Cohort.files, hashed at read time
# ----------------------------------------------------------------------------------------------


def io_source(root: Path, rel: str) -> SourceFile:
    data = (root / rel).read_bytes()
    return SourceFile(rel, len(data), hashlib.sha256(data).hexdigest())


def test_nifti_slices_record_their_file_and_its_hash(tmp_path):
    io_save_nifti(tmp_path / "sub" / "vol.nii.gz", io_image((6, 7, 4), seed=200))
    c = load_cohort(tmp_path, NATIVE)
    assert len(c) == 4 and all(s.sources == ("sub/vol.nii.gz",) for s in c)
    assert c.files == (io_source(tmp_path, "sub/vol.nii.gz"),)
    assert c.files[0].bytes == (tmp_path / "sub" / "vol.nii.gz").stat().st_size


def test_png_folder_sources_are_each_file_and_skipped_files_are_not_listed(tmp_path):
    for rel, seed in (("b/2.png", 201), ("a/1.png", 202), ("a/0.png", 203)):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(io_image((12, 12), seed=seed, hi=250).astype(np.uint8)).save(tmp_path / rel)
    Image.fromarray(np.full((12, 12), 9, np.uint8)).save(tmp_path / "a" / "flat.png")  # constant: skipped
    (tmp_path / "a" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # corrupt: skipped
    c = load_cohort(tmp_path, NATIVE)
    assert [s.path for s in c] == ["a/0.png", "a/1.png", "b/2.png"]
    assert [s.sources for s in c] == [(s.path,) for s in c]
    assert c.files == tuple(io_source(tmp_path, rel) for rel in ("a/0.png", "a/1.png", "b/2.png"))
    assert {"a/flat.png", "a/cut.png"} <= set(io_reasons(c))


def test_npz_members_share_the_archive_as_their_one_source(tmp_path):
    np.savez(tmp_path / "pack.npz", img=io_image((8, 8), seed=204), vol=io_image((8, 8, 2), seed=205))
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["pack.npz:img#0", "pack.npz:vol#0", "pack.npz:vol#1"]
    assert all(s.sources == ("pack.npz",) for s in c)
    assert c.files == (io_source(tmp_path, "pack.npz"),)


def test_dicom_series_sources_are_the_contributing_files(tmp_path):
    vols = [io_image((10, 10), seed=206 + k).astype(np.uint16) + 100 * k for k in range(3)]
    for k, name in enumerate(("c.dcm", "a.dcm", "b.dcm")):
        io_write_dicom(tmp_path / "ser" / name, vols[k], position=(0, 0, k))
    io_write_dicom(tmp_path / "ser" / "odd.dcm", io_image((6, 6), seed=209), position=(0, 0, 9))  # other shape
    frames = np.stack([io_image((8, 9), seed=210 + k).astype(np.uint16) for k in range(2)])
    io_write_dicom(tmp_path / "mf" / "MF.IMA", frames, series="mf")
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["mf/MF.IMA#0", "mf/MF.IMA#1", "ser#0", "ser#1", "ser#2"]
    assert "differs from the rest of its series" in io_reasons(c)["ser/odd.dcm"]
    assert all(s.sources == ("mf/MF.IMA",) for s in c[:2])
    assert all(s.sources == ("ser/a.dcm", "ser/b.dcm", "ser/c.dcm") for s in c[2:])
    rels = ("mf/MF.IMA", "ser/a.dcm", "ser/b.dcm", "ser/c.dcm")
    assert c.files == tuple(io_source(tmp_path, rel) for rel in rels)
    for f in c.files:
        assert f.sha256 == hashlib.sha256((tmp_path / f.path).read_bytes()).hexdigest()


def test_manifest_sources_outside_the_root_and_files_hashed_once(tmp_path, monkeypatch):
    import inspector.io as io_mod

    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "p.npz", a=io_image((8, 8), seed=211), b=io_image((8, 8), seed=212))
    np.save(tmp_path / "elsewhere.npy", io_image((8, 8), seed=213))
    (tmp_path / "data" / "manifest.csv").write_text("path,subject_id\np.npz,s1\n../elsewhere.npy,s2\n")
    hashed: list[str] = []
    real = io_mod._hash_file
    monkeypatch.setattr(io_mod, "_hash_file", lambda p, rel: hashed.append(rel) or real(p, rel))
    c = load_cohort(tmp_path / "data" / "manifest.csv", NATIVE)
    assert [s.sources for s in c] == [("../elsewhere.npy",), ("p.npz",), ("p.npz",)]
    assert sorted(hashed) == ["../elsewhere.npy", "p.npz"]  # the archive once, not once per member
    assert c.files == (io_source(tmp_path / "data", "../elsewhere.npy"), io_source(tmp_path / "data", "p.npz"))


def test_a_file_that_cannot_be_hashed_after_reading_is_skipped(tmp_path, monkeypatch):
    import inspector.io as io_mod

    np.save(tmp_path / "a.npy", io_image((8, 8), seed=214))
    np.save(tmp_path / "b.npy", io_image((8, 8), seed=215))
    real = io_mod._hash_file

    def flaky(path: Path, rel: str) -> SourceFile:
        if rel == "b.npy":
            raise FileNotFoundError(2, "No such file or directory")
        return real(path, rel)

    monkeypatch.setattr(io_mod, "_hash_file", flaky)
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["a.npy#0"] and [f.path for f in c.files] == ["a.npy"]
    assert io_reasons(c)["b.npy"].startswith("could not hash source file b.npy after reading it: FileNotFoundError")


def test_subset_keeps_only_the_files_of_the_kept_slices(tmp_path):
    np.save(tmp_path / "a.npy", io_image((8, 8, 2), seed=216))
    np.savez(tmp_path / "b.npz", x=io_image((8, 8), seed=217))
    Image.fromarray(io_image((8, 8), seed=218, hi=250).astype(np.uint8)).save(tmp_path / "c.png")
    c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["a.npy#0", "a.npy#1", "b.npz:x#0", "c.png#0"]
    assert [f.path for f in c.files] == ["a.npy", "b.npz", "c.png"]
    assert [f.path for f in c.subset([3, 1]).files] == ["a.npy", "c.png"]
    assert [f.path for f in c.subset([0, 1]).files] == ["a.npy"]
    assert c.subset([]).files == ()
    assert c.subset([2]).files == (io_source(tmp_path, "b.npz"),)


def test_hand_built_cohort_without_files_stays_valid(tmp_path):
    s = Slice(np.full((4, 4), 0.5, np.float32), "s1", "x.png")
    t = Slice(np.full((4, 4), 0.25, np.float32), "s1", "y.png", sources=["y.png"])
    c = Cohort([s, t], tmp_path)
    assert s.sources == () and t.sources == ("y.png",) and c.files == ()
    assert c.subset([1]).files == ()
    f1, f2 = SourceFile("y.png", 3, "ab"), SourceFile("x.png", 2, "cd")
    assert Cohort([s, t], tmp_path, files=(f1, f2, f1)).files == (f2, f1)  # unique, sorted by path
    with pytest.raises(ValueError, match="twice"):
        Cohort([s], tmp_path, files=(f1, SourceFile("y.png", 3, "ef")))
    with pytest.raises(TypeError, match="not a str"):
        Slice(np.zeros((2, 2), np.float32), "s1", "z.png", sources="z.png")
