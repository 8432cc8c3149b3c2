"""Readers, cohort discovery, manifests, pseudonymisation and every bad-input path of inspector.io.

All files are written to ``tmp_path`` by the tests themselves; randomness is seeded.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import warnings
from collections import Counter
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
from inspector.preprocess import PreprocessConfig, normalise_slice, normalise_volume
from inspector.privacy import KEY_ENV_VAR, load_or_create_key
from inspector.types import Cohort, Slice, SourceFile, raw_pixel_hash

NATIVE = LoadConfig(preprocess=PreprocessConfig(size=None))
#: NATIVE with the opt-in to manifest rows outside the manifest's folder (tests of what such rows give).
NATIVE_OUTSIDE = LoadConfig(preprocess=PreprocessConfig(size=None), allow_outside_root=True)


@pytest.fixture(autouse=True)
def io_pseudonym_key(tmp_path_factory, monkeypatch) -> Path:
    """Every test reads and creates its pseudonym key in a temporary file, never in the user's config dir."""
    path = tmp_path_factory.mktemp("key") / "pseudonym.key"
    monkeypatch.setenv(KEY_ENV_VAR, str(path))
    return path


def io_key() -> bytes:
    return load_or_create_key()


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
    for s in c:
        assert s.axis == axis
        assert s.subject_id == "sub-01"
        assert s.path == "sub-01.nii"
        assert s.original_shape == shape
        assert s.spacing == spacing
        raw = io_display(np.take(data, s.slice_index, axis=vox_axis))
        assert s.sha256 == raw_pixel_hash(raw)
        # each slice is normalised on its own (its percentiles), not with the volume's
        assert_allclose(s.array, normalise_slice(raw, (0.5, 99.5)), atol=1e-6)


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
    assert s.subject_id == pseudonymise("PID-0001", io_key())
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
    for s, v in zip(c, vols[::-1], strict=True):  # each slice normalised on its own, in position order
        assert_allclose(s.array, normalise_slice(v), atol=1e-6)
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
    # each slice is normalised on its own: an increasing affine rescale leaves its array unchanged
    assert_allclose(c[1].array, c[0].array, atol=1e-6)
    assert_allclose(c[0].array, normalise_slice(stored), atol=1e-6)


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
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    a = pseudonymise("MRN-1", k1)
    assert a == pseudonymise("MRN-1", k1)
    assert a.startswith("sub-") and len(a) == 16
    assert a != pseudonymise("MRN-1", k2) and a != pseudonymise("MRN-2", k1)
    with pytest.raises(TypeError, match="not a salt string"):
        pseudonymise("MRN-1", "inspector-v1")  # type: ignore[arg-type]


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
    other_key = tmp_path.parent / f"{tmp_path.name}-other.key"
    c3 = load_cohort(tmp_path, LoadConfig(pseudonym_key_file=str(other_key), preprocess=PreprocessConfig(size=None)))
    assert len(c1) == 4
    subj = {s.path: s.subject_id for s in c1}
    assert subj["pat"] == pseudonymise("MRN-123456", io_key())
    assert subj["p2/a.dcm"] == pseudonymise("DOE^JANE", io_key())
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
    c = load_cohort(data / "manifest.csv", NATIVE_OUTSIDE)
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
    # the rule can be switched off: the bright-pixel slice is then kept (stretched on its own); the
    # constant slice has nothing to normalise and is skipped, as a constant lone image is
    c2 = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None, min_foreground_fraction=0)))
    assert [s.slice_index for s in c2] == [0, 2, 3, 4]
    assert io_reasons(c2)["v.npy#1"].startswith("constant slice: v.npy#1 is constant (all values 0)")
    assert c2[2].array.max() == 1.0 and (c2[2].array > 0).sum() == 1


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
    c = load_cohort(tmp_path / "data" / "manifest.csv", NATIVE_OUTSIDE)
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


# ----------------------------------------------------------------------------------------------
# hardening: every class of bad input is skipped with its reason, never hangs, never aborts
# (test names start with test_bad_<class>; see the list in the bad-input count)
# ----------------------------------------------------------------------------------------------


def io_load_bounded(source, config: LoadConfig = NATIVE, limit_s: float = 30.0):
    """load_cohort in a daemon thread: fails (instead of hanging the suite) when it takes > limit_s."""
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["cohort"] = load_cohort(source, config)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"load_cohort({source}) did not return within {limit_s} s"
    if "error" in box:
        raise box["error"]
    return box["cohort"]


def io_ok(root: Path, name: str = "ok.npy") -> Path:
    """A good file beside the bad one: the load must still return it."""
    return np.save(root / name, io_image((8, 8), seed=999)) or root / name


def io_max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def test_bad_fifo_named_like_an_image_is_skipped_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "bad.png"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "BADNOEXT")  # no extension: the DICOM sniffer must not open it either
    io_ok(tmp_path)
    try:
        c = io_load_bounded(tmp_path)
    finally:  # unblock a reader stuck in open() if the guard failed
        for f in (fifo, tmp_path / "BADNOEXT"):
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert io_keys(c) == ["ok.npy#0"]
    r = io_reasons(c)
    assert r["bad.png"].startswith("not a regular file (a FIFO")
    assert r["BADNOEXT"].startswith("not a regular file (a FIFO")
    with pytest.raises(NoImagesError, match="not a regular file"):  # named directly, not through a folder
        io_load_bounded(fifo)


def test_bad_symlink_to_dev_urandom_is_skipped_not_read_forever(tmp_path):
    (tmp_path / "bad.dcm").symlink_to("/dev/urandom")
    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    io_ok(tmp_path)
    c = io_load_bounded(tmp_path)
    assert io_keys(c) == ["ok.npy#0"]
    for name in ("bad.dcm", "zero.npy"):
        assert io_reasons(c)[name] == "symlink to a character device, not a regular file; only regular files are read"


def test_bad_device_listed_in_a_manifest_is_skipped(tmp_path):
    io_ok(tmp_path)
    (tmp_path / "m.csv").write_text("path,subject_id\nok.npy,s1\n/dev/null,s2\n/dev/zero,s3\n")
    c = io_load_bounded(tmp_path / "m.csv", NATIVE_OUTSIDE)
    assert io_keys(c) == ["ok.npy#0"]
    r = io_reasons(c)
    assert {k for k in r if "dev/" in k} == {"../" * (len(tmp_path.parts) - 1) + "dev/null",
                                             "../" * (len(tmp_path.parts) - 1) + "dev/zero"}  # fmt: skip
    assert all(v == "not a regular file (a character device); only regular files are read"
               for k, v in r.items() if "dev/" in k)  # fmt: skip


def test_bad_unix_socket_named_like_an_array_is_skipped(tmp_path):
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "sock.npy"))
        io_ok(tmp_path)
        c = io_load_bounded(tmp_path)
    finally:
        s.close()
    assert io_reasons(c)["sock.npy"] == "not a regular file (a socket); only regular files are read"


def test_bad_dangling_symlink_is_skipped(tmp_path):
    (tmp_path / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    io_ok(tmp_path)
    (tmp_path / "m.csv").write_text("path,subject_id\ngone.nii.gz,s1\nok.npy,s2\n")
    for src in (tmp_path, tmp_path / "m.csv"):
        c = io_load_bounded(src)
        assert io_reasons(c)["gone.nii.gz"] == "broken symlink (its target does not exist); not read"


def test_bad_symlink_loop_is_skipped(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "self.dcm").symlink_to(tmp_path / "self.dcm")
    io_ok(tmp_path)
    r = io_reasons(io_load_bounded(tmp_path))
    for name in ("a.png", "b.png", "self.dcm"):
        assert r[name] == "symlink loop (too many levels of symbolic links); not read"


def test_symlink_outside_the_root_to_a_regular_file_is_read(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    arr = io_image((8, 8), seed=300)
    np.save(store / "blob.npy", arr)
    root = tmp_path / "cohort"
    root.mkdir()
    (root / "scan.npy").symlink_to(store / "blob.npy")
    c = io_load_bounded(root)
    assert io_keys(c) == ["scan.npy#0"] and c[0].sha256 == raw_pixel_hash(arr)
    assert c.files == (SourceFile("scan.npy", (store / "blob.npy").stat().st_size,
                                  hashlib.sha256((store / "blob.npy").read_bytes()).hexdigest()),)  # fmt: skip


def test_bad_file_swapped_for_a_fifo_after_reading_cannot_block_hashing(tmp_path):
    import os

    import inspector.io as io_mod

    os.mkfifo(tmp_path / "late.png")
    with pytest.raises(OSError, match="not a regular file"):
        io_mod._hash_file(tmp_path / "late.png", "late.png")  # opened non-blocking, refused by fstat


def io_npy_bytes(arr: np.ndarray) -> bytes:
    buf = __import__("io").BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


_ZERO_BYTE_FORMATS = (".nii", ".nii.gz", ".mgz", ".dcm", ".png", ".jpg", ".tif", ".npy", ".npz")


@pytest.mark.parametrize("ext", _ZERO_BYTE_FORMATS)
def test_bad_zero_byte_file_of_each_format(tmp_path, ext):
    (tmp_path / f"empty{ext}").write_bytes(b"")
    io_ok(tmp_path)
    c = io_load_bounded(tmp_path)
    assert io_keys(c) == ["ok.npy#0"]
    assert io_reasons(c)[f"empty{ext}"].startswith("empty file (0 bytes); not a valid")


def io_valid_bytes(tmp_path: Path, ext: str) -> bytes:
    """A small valid file of each format, as bytes."""
    p = tmp_path / f"src{ext}"
    img = io_image((24, 20), seed=310, lo=10, hi=250)
    if ext in (".nii", ".nii.gz"):
        io_save_nifti(p, io_image((12, 10, 6), seed=311))
    elif ext == ".dcm":
        io_write_dicom(p, img)
    elif ext in (".png", ".jpg"):
        Image.fromarray(img.astype(np.uint8)).save(p)
    elif ext == ".tif":
        tifffile.imwrite(p, np.stack([img, img[::-1]]).astype(np.uint16), photometric="minisblack")
    elif ext == ".npy":
        np.save(p, img)
    elif ext == ".npz":
        np.savez_compressed(p, a=img, b=img.T)
    data = p.read_bytes()
    p.unlink()
    return data


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".dcm", ".png", ".jpg", ".tif", ".npy", ".npz"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_bad_truncated_file_of_each_format(tmp_path, ext, keep):
    data = io_valid_bytes(tmp_path, ext)
    (tmp_path / f"cut{ext}").write_bytes(data[: max(1, int(len(data) * keep))])
    io_ok(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = io_load_bounded(tmp_path)
    assert "ok.npy#0" in io_keys(c)
    loaded = {s.path.split(":")[0] for s in c}
    # a truncated file is skipped (or, for a tolerant decoder, loaded); never an error, never silent
    assert f"cut{ext}" in loaded or any(k.startswith(f"cut{ext}") for k in io_reasons(c))


def test_bad_truncated_npy_data_is_refused_before_allocating(tmp_path):
    np.save(tmp_path / "cut.npy", io_image((64, 64), seed=312))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])
    io_ok(tmp_path)
    r = io_reasons(io_load_bounded(tmp_path))
    assert r["cut.npy"].startswith("truncated array: the header declares shape (64, 64)")


@pytest.mark.parametrize(
    "name, writer, loaded",
    [
        ("npy_as.png", lambda p: p.write_bytes(io_npy_bytes(io_image((8, 8), seed=1))), False),
        ("png_as.dcm", lambda p: Image.fromarray(io_image((8, 8), 1, hi=250).astype(np.uint8)).save(p, "PNG"), False),
        ("nifti_as.tif", lambda p: p.write_bytes(nib.Nifti1Image(io_image((4, 4, 4), 2), np.eye(4)).to_bytes()), False),
        ("dicom_as.npy", lambda p: io_write_dicom(p, io_image((8, 8), seed=3)), False),
        ("zip_as.nii", lambda p: p.write_bytes(io_npz_of({"a.npy": io_npy_bytes(io_image((8, 8), 4))})), False),
        ("png_as.jpg", lambda p: Image.fromarray(io_image((8, 8), 5, hi=250).astype(np.uint8)).save(p, "PNG"), True),
    ],
)
def test_bad_wrong_extension(tmp_path, name, writer, loaded):
    writer(tmp_path / name)
    io_ok(tmp_path)
    c = io_load_bounded(tmp_path)
    if loaded:  # Pillow reads by content: a PNG named .jpg is still a valid image
        assert f"{name}#0" in io_keys(c)
    else:
        assert io_keys(c) == ["ok.npy#0"] and name in io_reasons(c)


# header claiming huge dimensions, per format ---------------------------------------------------


def io_png_with_size(w: int, h: int) -> bytes:
    import struct
    import zlib

    buf = __import__("io").BytesIO()
    Image.fromarray(io_image((8, 8), seed=320, hi=250).astype(np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def io_jpeg_with_size(w: int, h: int) -> bytes:
    import struct

    buf = __import__("io").BytesIO()
    Image.fromarray(io_image((8, 8), seed=321, hi=250).astype(np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def io_tiff_with_size(w: int, h: int) -> bytes:
    import struct

    buf = __import__("io").BytesIO()
    tifffile.imwrite(buf, io_image((8, 8), seed=322).astype(np.uint16))
    data = bytearray(buf.getvalue())
    assert data[:2] == b"II"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for i in range(n):
        at = ifd + 2 + 12 * i
        tag, _typ, _count = struct.unpack_from("<HHI", data, at)
        if tag in (256, 257):  # ImageWidth, ImageLength -> LONG
            struct.pack_into("<HHII", data, at, tag, 4, 1, w if tag == 256 else h)
    return bytes(data)


def io_nifti_with_shape(shape: tuple[int, ...], gz: bool = False) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + io_image((64,), seed=323).tobytes()
    return gzip.compress(raw) if gz else raw


def io_npy_with_shape(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    from numpy.lib import format as npf

    buf = __import__("io").BytesIO()
    npf.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def io_npz_of(members: dict[str, bytes]) -> bytes:
    import zipfile

    buf = __import__("io").BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def io_dicom_with_dims(path: Path, rows: int, cols: int, frames: int | None) -> Path:
    io_write_dicom(path, io_image((8, 8), seed=324))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, cols
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    "name, make",
    [
        ("huge.png", lambda p: p.write_bytes(io_png_with_size(100_000, 100_000))),
        ("huge_mid.png", lambda p: p.write_bytes(io_png_with_size(30_000, 30_000))),  # within Pillow's 2x margin
        ("huge.jpg", lambda p: p.write_bytes(io_jpeg_with_size(65_000, 65_000))),
        ("huge.tif", lambda p: p.write_bytes(io_tiff_with_size(200_000, 200_000))),
        ("huge.nii", lambda p: p.write_bytes(io_nifti_with_shape((30_000, 30_000, 30_000)))),
        ("huge.nii.gz", lambda p: p.write_bytes(io_nifti_with_shape((30_000, 30_000, 30_000), gz=True))),
        ("huge4d.nii", lambda p: p.write_bytes(io_nifti_with_shape((2_000, 2_000, 2_000, 3)))),
        ("huge.dcm", lambda p: io_dicom_with_dims(p, 65_535, 65_535, None)),
        ("huge_frames.dcm", lambda p: io_dicom_with_dims(p, 4_096, 4_096, 100_000)),
        ("huge.npy", lambda p: p.write_bytes(io_npy_with_shape((100_000, 100_000, 100)))),
        ("huge.npz", lambda p: p.write_bytes(io_npz_of({"a.npy": io_npy_with_shape((10**6, 10**6))}))),
    ],
)
def test_bad_header_claiming_huge_dimensions_is_refused_before_decoding(tmp_path, name, make):
    make(tmp_path / name)
    io_ok(tmp_path)
    before = io_max_rss_mib()
    c = io_load_bounded(tmp_path, limit_s=20)
    assert io_keys(c) == ["ok.npy#0"]
    r = io_reasons(c)
    reason = r.get(name) or r[f"{name}:a"]
    assert "LoadConfig.max_voxels" in reason and "raise the budget" in reason, reason
    assert io_max_rss_mib() - before < 300  # nothing near the declared size was allocated


def test_bad_npz_zip_bomb_is_skipped_without_inflating(tmp_path):
    """A genuine 3 MB .npz whose member inflates to 3.2 GB of float64 zeros (never inflated here)."""
    import io as bio
    import struct
    import zlib

    from numpy.lib import format as npf

    n = 400_000_000
    hdr = bio.BytesIO()
    npf.write_array_header_1_0(hdr, {"descr": "<f8", "fortran_order": False, "shape": (n,)})
    head = hdr.getvalue()
    chunk = 1 << 24
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [co.compress(head) + co.flush(zlib.Z_FULL_FLUSH)]
    nfull, rest = divmod(n * 8, chunk)
    body.append((co.compress(bytes(chunk)) + co.flush(zlib.Z_FULL_FLUSH)) * nfull)
    body.append(co.compress(bytes(rest)) + co.flush())
    comp = b"".join(body)
    crc = zlib.crc32(head)
    zero = bytes(chunk)
    for _ in range(nfull):
        crc = zlib.crc32(zero, crc)
    crc = zlib.crc32(bytes(rest), crc)
    usize, name = len(head) + n * 8, b"bomb.npy"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(comp), usize, len(name), 0)
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(comp), usize, len(name), 0, 0, 0, 0, 0, 0
    )
    eocd_at = len(local) + len(name) + len(comp)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name), eocd_at, 0)
    (tmp_path / "bomb.npz").write_bytes(local + name + comp + central + name + eocd)
    assert (tmp_path / "bomb.npz").stat().st_size < 4 * 1024**2
    import zipfile

    with zipfile.ZipFile(tmp_path / "bomb.npz") as zf:  # a well-formed archive: np.load would inflate it
        assert zf.getinfo("bomb.npy").file_size == usize and zf.testzip is not None
    io_ok(tmp_path)
    before = io_max_rss_mib()
    c = io_load_bounded(tmp_path, limit_s=20)
    assert io_keys(c) == ["ok.npy#0"]
    reason = io_reasons(c)["bomb.npz:bomb"]
    assert "LoadConfig.max_file_bytes" in reason and "decompresses to 3.0 GiB" in reason
    assert io_max_rss_mib() - before < 300


def test_bad_npz_members_within_budget_alone_but_not_together(tmp_path):
    a = io_image((64, 64), seed=330)
    np.savez(tmp_path / "pack.npz", a=a, b=a + 1, c=a + 2)
    cfg = LoadConfig(preprocess=PreprocessConfig(size=None), max_voxels=64 * 64 * 2)
    c = io_load_bounded(tmp_path, cfg)
    assert io_keys(c) == ["pack.npz:a#0", "pack.npz:b#0"]
    assert "the archive's arrays up to 'c' declare 12_288 voxels together" in io_reasons(c)["pack.npz:c"]


def test_bad_file_over_the_byte_budget_is_skipped_with_how_to_raise_it(tmp_path):
    np.save(tmp_path / "big.npy", io_image((128, 128), seed=331))
    np.save(tmp_path / "small.npy", io_image((8, 8), seed=332))
    cfg = LoadConfig(preprocess=PreprocessConfig(size=None), max_file_bytes=4096)
    c = io_load_bounded(tmp_path, cfg)
    assert io_keys(c) == ["small.npy#0"]
    reason = io_reasons(c)["big.npy"]
    assert reason.startswith("over the per-file byte budget LoadConfig.max_file_bytes = 4.0 KiB: the file is")
    assert "LoadConfig(max_file_bytes=65_536)" in reason
    assert io_keys(io_load_bounded(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None)))) == [
        "big.npy#0", "small.npy#0"]  # fmt: skip


def test_bad_decoded_size_over_the_byte_budget_for_a_compressed_volume(tmp_path):
    io_save_nifti(tmp_path / "v.nii.gz", np.zeros((64, 64, 64), np.float64) + io_image((64, 64, 64), seed=333))
    assert (tmp_path / "v.nii.gz").stat().st_size < 1024**2
    cfg = LoadConfig(preprocess=PreprocessConfig(size=None), max_file_bytes=1024**2)
    with pytest.raises(NoImagesError) as ei:
        io_load_bounded(tmp_path, cfg)
    assert "max_file_bytes" in io_reasons(ei.value.skipped)["v.nii.gz"] and "decoded" in str(ei.value)


def test_load_config_budget_and_timeout_validation():
    assert LoadConfig().max_file_bytes == 2 * 1024**3 and LoadConfig().max_voxels == 512 * 1024**2
    assert LoadConfig().file_timeout_s == 60.0 and LoadConfig(file_timeout_s=None).file_timeout_s is None
    for field in ("max_file_bytes", "max_voxels"):
        with pytest.raises(ValueError, match=f"LoadConfig.{field} must be a positive integer"):
            LoadConfig(**{field: 0})
        with pytest.raises(TypeError, match=f"LoadConfig.{field}"):
            LoadConfig(**{field: 1.5})
        with pytest.raises(TypeError, match=f"LoadConfig.{field}"):
            LoadConfig(**{field: True})
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="file_timeout_s"):
            LoadConfig(file_timeout_s=bad)
    with pytest.raises(TypeError, match="file_timeout_s"):
        LoadConfig(file_timeout_s="60")  # type: ignore[arg-type]
    assert hash(LoadConfig(max_voxels=10)) == hash(LoadConfig(max_voxels=10))


# bad values, odd dtypes and layouts ----------------------------------------------------------


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (not) executed."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_object_dtype_npy_and_npz_member_are_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    m = _Marker()
    m.path = str(marker)
    obj = np.empty(2, dtype=object)
    obj[:] = [m, m]
    np.save(tmp_path / "pickle.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "pickle.npz", o=obj, ok=io_image((8, 8), seed=340))
    c = io_load_bounded(tmp_path)
    assert not marker.exists()
    assert io_keys(c) == ["pickle.npz:ok#0"]
    r = io_reasons(c)
    assert r["pickle.npy"].startswith("object-dtype array (object): pickled Python objects are never loaded")
    assert r["pickle.npz:o"].startswith("object-dtype array (object)")


@pytest.mark.parametrize(
    "arr, fragment",
    [
        (np.array([["a", "b"], ["c", "d"]]), "unsupported array dtype <U1"),
        (np.zeros((4, 4), dtype=[("x", "<f4"), ("y", "<i2")]), "unsupported array dtype"),
        (np.ones((4, 4), np.complex64), "unsupported array dtype complex64"),
        (np.zeros((4, 4), "datetime64[s]"), "unsupported array dtype datetime64[s]"),
    ],
)
def test_bad_non_numeric_npy_dtypes(tmp_path, arr, fragment):
    np.save(tmp_path / "odd.npy", arr)
    io_ok(tmp_path)
    assert fragment in io_reasons(io_load_bounded(tmp_path))["odd.npy"]


def test_bad_nan_and_inf_values(tmp_path, caplog):
    img = io_image((16, 16), seed=341).astype(np.float32)
    img[0, :4] = np.nan
    img[1, :4] = np.inf
    img[2, :4] = -np.inf
    np.save(tmp_path / "some_nan.npy", img)
    np.save(tmp_path / "all_nan.npy", np.full((8, 8), np.nan, np.float32))
    np.save(tmp_path / "all_inf.npy", np.full((8, 8), np.inf))
    c = io_load_bounded(tmp_path)
    assert io_keys(c) == ["some_nan.npy#0"]
    assert np.isfinite(c[0].array).all() and 0 <= c[0].array.min() <= c[0].array.max() <= 1
    r = io_reasons(c)
    assert "no finite values" in r["all_nan.npy"] and "no finite values" in r["all_inf.npy"]
    assert "NaN/Inf values replaced" in caplog.text


def test_nan_in_a_volume_is_logged_once_and_each_slice_normalised_on_its_own(tmp_path, caplog):
    vol = io_image((16, 16, 3), seed=342).astype(np.float32)
    vol[0, :4, 1] = np.nan  # NaN -> the slice's lowest finite value
    vol[:, :, 2] = np.nan  # a slice without finite values: background under the volume's mapping
    np.save(tmp_path / "v.npy", vol)
    with caplog.at_level(logging.WARNING, logger="inspector"):
        c = load_cohort(tmp_path, NATIVE)
    assert io_keys(c) == ["v.npy#0", "v.npy#1"]
    assert caplog.text.count("NaN/Inf values replaced") == 1 and "v.npy: 260 NaN/Inf" in caplog.text
    s1 = vol[:, :, 1].astype(np.float64)
    s1[0, :4] = np.nanmin(s1)
    assert_allclose(c[1].array, normalise_slice(s1), atol=1e-6)
    assert io_reasons(c)["v.npy#2"].startswith("background-only slice (constant slice;")


def test_bad_extreme_float_values_do_not_abort_the_load(tmp_path):
    np.save(tmp_path / "extreme.npy", np.array([[-1.7e308, 1.7e308], [0.0, 1e-300]] * 8))
    np.save(tmp_path / "tiny_range.npy", (1.0 + np.arange(64).reshape(8, 8) * np.finfo(np.float64).eps))
    io_ok(tmp_path)
    c = io_load_bounded(tmp_path)
    assert "ok.npy#0" in io_keys(c)
    assert {s.path for s in c} | {k.split("#")[0] for k in io_reasons(c)} >= {"extreme.npy", "tiny_range.npy"}
    assert "wider than float64 can normalise" in io_reasons(c)["extreme.npy"]
    for s in c:
        assert np.isfinite(s.array).all()


@pytest.mark.parametrize("ext", [".png", ".tif", ".npy", ".dcm", ".nii"])
def test_bad_constant_image_of_each_format(tmp_path, ext):
    flat = np.full((12, 12), 321, np.uint16)
    p = tmp_path / f"flat{ext}"
    if ext == ".png":
        Image.fromarray(flat).save(p)
    elif ext == ".tif":
        tifffile.imwrite(p, flat)
    elif ext == ".npy":
        np.save(p, flat)
    elif ext == ".dcm":
        io_write_dicom(p, flat)
    else:
        io_save_nifti(p, np.repeat(flat[:, :, None], 3, axis=2).astype(np.int16))
    io_ok(tmp_path)
    r = io_reasons(io_load_bounded(tmp_path))
    assert r[f"flat{ext}"].startswith("constant"), r


def test_bad_one_pixel_and_one_row_images(tmp_path):
    Image.fromarray(np.array([[200]], np.uint8)).save(tmp_path / "px.png")
    np.save(tmp_path / "px.npy", np.array([[7.0]]))
    np.save(tmp_path / "row.npy", np.arange(1, 65, dtype=np.float32)[None, :])
    np.save(tmp_path / "col3d.npy", np.arange(1, 9, dtype=np.float32).reshape(8, 1, 1))
    io_ok(tmp_path)
    c = io_load_bounded(tmp_path, LoadConfig())  # default size: resized to a square
    r = io_reasons(c)
    assert r["px.png"].startswith("constant image") and r["px.npy"].startswith("constant image")
    assert {s.path for s in c} | set(r) >= {"row.npy", "col3d.npy"}
    assert all(s.array.shape == (128, 128) for s in c)


def test_bad_4d_and_5d_arrays_and_5d_nifti(tmp_path):
    np.save(tmp_path / "a4.npy", io_image((4, 4, 4, 2), seed=342))
    np.save(tmp_path / "a5.npy", io_image((2, 4, 4, 4, 2), seed=343))
    io_save_nifti(tmp_path / "v5.nii", io_image((6, 6, 4, 2, 3), seed=344))
    io_save_nifti(tmp_path / "v4.nii", io_image((6, 6, 4, 2), seed=345))
    with pytest.warns(LoadWarning, match="4D image with 2 volumes"):
        c = load_cohort(tmp_path, NATIVE)
    r = io_reasons(c)
    assert r["a4.npy"] == "unsupported array shape (4, 4, 4, 2); expected 2D (H, W) or 3D volume"
    assert r["a5.npy"].startswith("unsupported array shape (2, 4, 4, 4, 2)")
    assert r["v5.nii"].startswith("unsupported 5D image (shape (6, 6, 4, 2, 3))")
    assert {s.path for s in c} == {"v4.nii"}


def test_bad_colour_modes_rgba_palette_grey_alpha_bilevel_and_16bit_png(tmp_path):
    rgb = io_rng(346).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((16, 16), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb[..., 0] > 127).save(tmp_path / "bilevel.png")
    Image.fromarray(io_image((16, 16), 347, hi=60000).astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        c = io_load_bounded(tmp_path)
    assert {s.path for s in c} == {"rgba.png", "palette.png", "la.png", "bilevel.png", "i16.png", "cmyk.jpg"}
    assert all(s.original_shape == (16, 16) and s.axis == "2d" for s in c)
    msgs = " ".join(str(w.message) for w in rec if issubclass(w.category, LoadWarning))
    for name in ("rgba.png", "palette.png", "cmyk.jpg"):
        assert f"{name}: colour image" in msgs


def test_bad_16bit_tiff_stacks_with_odd_axes(tmp_path):
    tifffile.imwrite(tmp_path / "qq.tif", io_image((2, 4, 10, 12), seed=348).astype(np.uint16),
                     photometric="minisblack")  # fmt: skip
    tifffile.imwrite(tmp_path / "qs.tif", io_image((2, 4, 10, 12), seed=352).astype(np.uint16),
                     photometric="rgb", planarconfig="separate", extrasamples=[0])  # fmt: skip
    tifffile.imwrite(tmp_path / "planar.tif", io_image((3, 10, 12), seed=349).astype(np.uint16),
                     photometric="rgb", planarconfig="separate")  # fmt: skip
    tifffile.imwrite(tmp_path / "zyx.tif", io_image((5, 10, 12), seed=350).astype(np.uint16), imagej=True,
                     metadata={"axes": "ZYX"})  # fmt: skip
    tifffile.imwrite(tmp_path / "ttz.tif", io_image((2, 3, 10, 12), seed=351).astype(np.uint16), imagej=True,
                     metadata={"axes": "TZYX"})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)
        c = io_load_bounded(tmp_path)
    n = Counter(s.path for s in c)
    assert n == {"qq.tif": 8, "qs.tif": 2, "planar.tif": 1, "zyx.tif": 5, "ttz.tif": 6}
    assert all(s.original_shape == (10, 12) for s in c)


def test_bad_dicom_without_rows_garbage_after_preamble_and_short_pixel_data(tmp_path):
    io_write_dicom(tmp_path / "ok.dcm", io_image((8, 8), seed=352))
    ds = pydicom.dcmread(tmp_path / "ok.dcm")
    del ds.Rows
    ds.save_as(tmp_path / "norows.dcm")
    (tmp_path / "IM_GARBAGE").write_bytes(b"\0" * 128 + b"DICM" + io_rng(353).bytes(2000))
    ds = pydicom.dcmread(tmp_path / "ok.dcm")
    ds.PixelData = ds.PixelData[:50]
    ds.SeriesInstanceUID = io_uid("short")
    ds.save_as(tmp_path / "short.dcm")
    ds = pydicom.dcmread(tmp_path / "ok.dcm")
    ds.BitsAllocated = 0
    ds.SeriesInstanceUID = io_uid("bits")
    ds.save_as(tmp_path / "bits0.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = io_load_bounded(tmp_path)
    assert io_keys(c) == ["ok.dcm#0"]
    r = io_reasons(c)
    assert "without Rows/Columns" in r["norows.dcm"]
    assert set(r) == {"norows.dcm", "IM_GARBAGE", "short.dcm", "bits0.dcm"}


def test_bad_dicom_huge_multiframe_series_header_is_refused(tmp_path):
    frames = np.stack([io_image((8, 8), seed=354 + k) for k in range(2)])
    io_write_dicom(tmp_path / "mf.dcm", frames)
    ds = pydicom.dcmread(tmp_path / "mf.dcm")
    ds.NumberOfFrames = 10**7
    ds.save_as(tmp_path / "mf.dcm")
    cfg = LoadConfig(preprocess=PreprocessConfig(size=None))
    with pytest.raises(NoImagesError) as ei:
        io_load_bounded(tmp_path, cfg)
    assert "LoadConfig.max_voxels" in io_reasons(ei.value.skipped)["mf.dcm"]


def test_bad_dicom_hanging_header_read_is_skipped_after_the_timeout(tmp_path, monkeypatch):
    import time

    import inspector.io as io_mod

    io_write_dicom(tmp_path / "slow" / "a.dcm", io_image((8, 8), seed=355), patient_id="SLOW")
    io_write_dicom(tmp_path / "fast" / "b.dcm", io_image((8, 8), seed=356), series="fast", patient_id="FAST")
    real = io_mod._dcmread

    def dcmread(path, rel, force):
        if "slow" in rel:
            time.sleep(5)
        return real(path, rel, force)

    monkeypatch.setattr(io_mod, "_dcmread", dcmread)
    t0 = time.monotonic()
    c = io_load_bounded(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None), file_timeout_s=0.5))
    assert time.monotonic() - t0 < 4
    assert io_keys(c) == ["fast/b.dcm#0"]
    reason = io_reasons(c)["slow/a.dcm"]
    assert reason.startswith("reading the DICOM header took longer than the per-file timeout of 0.5 s")
    assert "LoadConfig(file_timeout_s=" in reason


def test_bad_dicom_malformed_values_do_not_abort_a_series(tmp_path):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    for k in range(3):
        io_write_dicom(tmp_path / "ser" / f"{k}.dcm", io_image((8, 8), seed=357 + k), position=(0, 0, k), instance=k)
    ds = pydicom.dcmread(tmp_path / "ser" / "1.dcm")
    # malformed SeriesNumber and ImagePositionPatient, stored as raw bytes (pydicom parses them lazily)
    ds[Tag(0x0020, 0x0011)] = RawDataElement(Tag(0x0020, 0x0011), "IS", 6, b"12abc ", 0, False, True)
    ds[Tag(0x0020, 0x0032)] = RawDataElement(Tag(0x0020, 0x0032), "DS", 6, b"a\\b\\c", 0, False, True)
    ds.save_as(tmp_path / "ser" / "1.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = io_load_bounded(tmp_path)
    # the series is read in InstanceNumber order (positions unusable), never an error
    assert io_keys(c) == ["ser#0", "ser#1", "ser#2"]


def test_volumes_become_slices_one_at_a_time(tmp_path, monkeypatch):
    # a cohort of volumes is never held as raw volumes all at once: each is sliced and dropped before the next
    # is read (memory: one volume beside the slices), with the same slices and subject IDs as before
    import gc
    import weakref

    from inspector import io as io_mod

    rng = np.random.default_rng(0)
    for i in range(4):
        sub = tmp_path / ("a" if i < 2 else "b")
        sub.mkdir(exist_ok=True)
        vol = rng.uniform(0.2, 1.0, (5, 24, 24)).astype(np.float32)
        np.save(sub / f"vol{i % 2}.npy", vol)  # the stems clash across folders: IDs fall back to the path
    alive: list[weakref.ref] = []
    most = [0]
    original = io_mod._read_npy

    def spy(c, config):
        gc.collect()
        most[0] = max(most[0], sum(r() is not None for r in alive))
        units = original(c, config)
        alive.extend(weakref.ref(u.raw) for u in units)
        return units

    monkeypatch.setattr(io_mod, "_read_npy", spy)
    cohort = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=24), array_axis=0))
    assert len(alive) == 4 and most[0] == 0, most[0]
    assert len(cohort.slices) == 20
    assert sorted(set(cohort.subject_ids)) == ["a/vol0", "a/vol1", "b/vol0", "b/vol1"]
    assert all(s.subject_id == s.path.removesuffix(".npy") for s in cohort.slices)
