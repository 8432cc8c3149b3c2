"""Fuzz the readers: corrupted bytes of every supported format never crash, hang or blow up memory.

For each format a small valid file is built once; hypothesis then applies a few mutations to it
(truncation, bit flips, overwritten/inserted/deleted bytes, and header field mutations such as huge
or negative dimensions, odd dtypes, wrong offsets) and loads the result with :func:`load_cohort`.

Properties, for every example:

* no crash: ``load_cohort`` returns, or raises only :class:`NoImagesError` with the file in
  ``skipped`` (every candidate is loaded or skipped, never dropped);
* no hang: each load returns well within its bound and no read hit the per-file timeout;
* no unbounded allocation: the per-file budgets are small here (4 Mi voxels, 64 MiB), so no header
  can make a reader allocate more, and the process's peak RSS grows by less than 1 GiB over the run.

Bounded for CI: ``max_examples`` per format (default 60, ``INSPECTOR_FUZZ_EXAMPLES`` to change it),
derandomized (the same examples every run; set ``INSPECTOR_FUZZ_RANDOM=1`` to explore), no example
database written into the repository.
"""

from __future__ import annotations

import gzip
import io
import os
import resource
import struct
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from inspector.io import LoadConfig, NoImagesError, load_cohort  # noqa: E402
from inspector.preprocess import PreprocessConfig  # noqa: E402
from inspector.privacy import KEY_ENV_VAR  # noqa: E402

EXAMPLES = int(os.environ.get("INSPECTOR_FUZZ_EXAMPLES", "60"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # bounded below, per example, by our own clock
    database=None,
    derandomize=not os.environ.get("INSPECTOR_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Small budgets: whatever a mutated header claims, no reader may allocate more than this.
CONFIG = LoadConfig(
    preprocess=PreprocessConfig(size=32),
    max_voxels=4 * 1024**2,
    max_file_bytes=64 * 1024**2,
    file_timeout_s=10.0,
)
EXAMPLE_LIMIT_S = 15.0
RSS_GROWTH_LIMIT_MIB = 1024.0


@pytest.fixture(scope="module", autouse=True)
def fz_pseudonym_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """DICOM pseudonyms use a temporary key, never the user's config dir (module scope: hypothesis)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV_VAR, str(tmp_path_factory.mktemp("fuzzkey") / "pseudonym.key"))
        yield


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# the process's peak RSS when this module's first test starts (not at collection: the tests that run before it
# in the same process, encoder training among them, raise the peak on their own)
_RSS_START: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def _rss_baseline() -> Iterator[None]:
    _RSS_START.append(_rss_mib())
    yield
    _RSS_START.clear()


# ----------------------------------------------------------------------------------------------
# seed files: small and valid
# ----------------------------------------------------------------------------------------------


def _img(shape: tuple[int, ...], seed: int = 0, hi: int = 250) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, hi, size=shape)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_img((12, 10)).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_img((16, 16), 1).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tiff() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, _img((3, 10, 12), 2, 60000).astype(np.uint16), photometric="minisblack")
    return buf.getvalue()


def _nifti() -> bytes:
    return nib.Nifti1Image(_img((8, 7, 5), 3, 1000).astype(np.int16), np.eye(4)).to_bytes()


def _dicom() -> bytes:
    arr = _img((10, 12), 4, 4000).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["fuzz"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("fuzz.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = "FUZZ-1"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fuzz-series"])
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1.5, -10
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, _img((9, 8, 3), 5, 1000).astype(np.float32))
    return buf.getvalue()


def _zip(members: dict[str, bytes], deflate: bool) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


SEEDS: dict[str, bytes] = {
    ".png": _png(),
    ".jpg": _jpeg(),
    ".tif": _tiff(),
    ".nii": _nifti(),
    ".dcm": _dicom(),
    ".npy": _npy(),
}
SEEDS[".nii.gz"] = SEEDS[".nii"]  # mutated inside, then gzipped (or the gzip stream mutated)
SEEDS[".npz"] = SEEDS[".npy"]  # mutated inside, then zipped (or the archive mutated)


# ----------------------------------------------------------------------------------------------
# header fields: (offset, struct format) of the fields worth mutating in each seed
# ----------------------------------------------------------------------------------------------


def _png_fields(data: bytes) -> list[tuple[int, str]]:
    return [(16, ">I"), (20, ">I"), (24, ">B"), (25, ">B"), (8, ">I")]  # width, height, depth, colour, IHDR len


def _jpeg_fields(data: bytes) -> list[tuple[int, str]]:
    sof = data.index(b"\xff\xc0")
    return [(sof + 2, ">H"), (sof + 4, ">B"), (sof + 5, ">H"), (sof + 7, ">H"), (sof + 9, ">B")]


def _tiff_fields(data: bytes) -> list[tuple[int, str]]:
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    out = [(4, "<I"), (ifd, "<H")]
    for i in range(n):
        at = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", data, at)
        if tag in (256, 257, 258, 259, 262, 273, 277, 278, 279, 284):
            out += [(at + 2, "<H"), (at + 4, "<I"), (at + 8, "<H" if typ == 3 else "<I")]
    return out


def _nifti_fields(data: bytes) -> list[tuple[int, str]]:
    dims = [(40 + 2 * i, "<h") for i in range(8)]
    return [(0, "<i"), *dims, (70, "<h"), (72, "<h"), (108, "<f"), (112, "<f"), (116, "<f"), (252, "<h")]


def _dicom_fields(data: bytes) -> list[tuple[int, str]]:
    out = []
    for tag in (
        b"\x28\x00\x10\x00",
        b"\x28\x00\x11\x00",
        b"\x28\x00\x00\x01",
        b"\x28\x00\x02\x00",
        b"\x28\x00\x01\x01",
        b"\x28\x00\x03\x01",
    ):  # Rows, Columns, BitsAllocated, Samples, Stored, PixRep
        at = data.find(tag + b"US")
        if at >= 0:
            out.append((at + 8, "<H"))
    pix = data.find(b"\xe0\x7f\x10\x00")  # PixelData: VR (2), reserved (2), length (4)
    if pix >= 0:
        out.append((pix + 8, "<I"))
    meta_len = data.find(b"\x02\x00\x00\x00UL")  # FileMetaInformationGroupLength
    if meta_len >= 0:
        out.append((meta_len + 8, "<I"))
    return out


def _npy_fields(data: bytes) -> list[tuple[int, str]]:
    return [(6, "<B"), (7, "<B"), (8, "<H")]  # version major/minor, header length


FIELDS: dict[str, Callable[[bytes], list[tuple[int, str]]]] = {
    ".png": _png_fields,
    ".jpg": _jpeg_fields,
    ".tif": _tiff_fields,
    ".nii": _nifti_fields,
    ".nii.gz": _nifti_fields,
    ".dcm": _dicom_fields,
    ".npy": _npy_fields,
    ".npz": _npy_fields,
}

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 255, 256, 1000, 32767, 32768, 65535, 65536, 2**24,
               2**31 - 1, 2**31, 2**32 - 1, -1, -2, -32768]  # fmt: skip


def _set_field(data: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        return
    if fmt[-1] == "f":
        struct.pack_into(fmt, data, offset, float(value))
    else:
        struct.pack_into(fmt[0] + fmt[-1].upper(), data, offset, value % (1 << (8 * size)))


def _fix_png_crcs(data: bytearray) -> None:
    """Recompute every chunk CRC, so a mutated IHDR reaches the decoder instead of the CRC check."""
    at = 8
    while at + 12 <= len(data):
        (n,) = struct.unpack_from(">I", data, at)
        end = at + 8 + n
        if end + 4 > len(data):
            return
        struct.pack_into(">I", data, end, zlib.crc32(bytes(data[at + 4 : end])))
        at = end + 4


def _npy_header_mutation(data: bytes, shape: tuple[int, ...], descr: str, fortran: bool) -> bytes:
    """The seed's data bytes behind a freshly written header with another shape/dtype."""
    from numpy.lib import format as npf

    src = io.BytesIO(data)
    npf.read_magic(src)
    npf.read_array_header_1_0(src)
    body = data[src.tell() :]
    out = io.BytesIO()
    npf.write_array_header_1_0(out, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return out.getvalue() + body


# ----------------------------------------------------------------------------------------------
# mutations
# ----------------------------------------------------------------------------------------------

_pos = st.integers(min_value=0, max_value=4096)
_generic = st.one_of(
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("overwrite"), _pos, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
)
_field = st.tuples(
    st.just("field"), st.integers(0, 63), st.one_of(st.sampled_from(INTERESTING), st.integers(-(2**31), 2**32))
)
_mutations = st.lists(st.one_of(_generic, _field, _field), min_size=1, max_size=4)
_npy_header = st.tuples(
    st.lists(
        st.one_of(st.sampled_from([0, 1, 2, 3, 8, 9, 4096, 10**6, 2**31, 2**40]), st.integers(0, 64)),
        min_size=0,
        max_size=6,
    ).map(tuple),  # fmt: skip
    st.sampled_from(["<f4", "<f8", ">f8", "|u1", "<i2", "|b1", "<c8", "|O", "<U4", "|V8", "<M8[s]", "<f2"]),
    st.booleans(),
)


def _apply(data: bytes, ext: str, mutations: list[tuple], fix_png_crc: bool) -> bytes:
    buf = bytearray(data)
    fields = FIELDS[ext](data) if ext in FIELDS else []
    for m in mutations:
        kind = m[0]
        n = len(buf)
        if kind == "truncate":
            del buf[min(m[1], n) :]
        elif kind == "flip" and n:
            buf[m[1] % n] ^= 1 << m[2]
        elif kind == "overwrite" and n:
            at = m[1] % n
            buf[at : at + len(m[2])] = m[2]
        elif kind == "insert":
            at = m[1] % (n + 1)
            buf[at:at] = m[2]
        elif kind == "delete" and n:
            at = m[1] % n
            del buf[at : at + m[2]]
        elif kind == "field" and fields:
            offset, fmt = fields[m[1] % len(fields)]
            _set_field(buf, offset, fmt, m[2])
    if ext == ".png" and fix_png_crc:
        _fix_png_crcs(buf)
    return bytes(buf)


def _load_and_check(name: str, payload: bytes) -> None:
    """Write one file, load it, and check the three properties."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        (root / name).write_bytes(payload)
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cohort = load_cohort(root, CONFIG)
                loaded = {s.path.split(":")[0] for s in cohort}
                skipped = cohort.skipped
            except NoImagesError as e:  # the only error allowed: nothing readable, and it says why
                loaded, skipped = set(), e.skipped
        elapsed = time.monotonic() - t0
    reasons = {sk.path.split("#")[0].split(":")[0]: sk.reason for sk in skipped}
    assert name in loaded or name in reasons, f"{name} neither loaded nor skipped"
    assert elapsed < EXAMPLE_LIMIT_S, f"{name}: load took {elapsed:.1f} s"
    assert not any("per-file timeout" in r for r in reasons.values()), f"{name}: a reader hung: {reasons}"
    growth = _rss_mib() - _RSS_START[0]
    assert growth < RSS_GROWTH_LIMIT_MIB, f"peak RSS grew by {growth:.0f} MiB: an unbounded allocation"


# ----------------------------------------------------------------------------------------------
# the fuzz tests: one per format
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".nii", ".dcm"])
@FUZZ_SETTINGS
@given(mutations=_mutations, fix_png_crc=st.booleans())
def test_fuzz_corrupted_file_is_loaded_or_skipped(ext, mutations, fix_png_crc):
    _load_and_check(f"fuzz{ext}", _apply(SEEDS[ext], ext, mutations, fix_png_crc))


@FUZZ_SETTINGS
@given(inner=st.lists(st.one_of(_generic, _field, _field), max_size=4), outer=st.lists(_generic, max_size=2))
def test_fuzz_corrupted_nifti_gz(inner, outer):
    """Header and data mutations inside the gzip stream, and corruption of the stream itself."""
    payload = gzip.compress(_apply(SEEDS[".nii"], ".nii", inner, False), mtime=0)
    _load_and_check("fuzz.nii.gz", _apply(payload, ".gz", outer, False))


@FUZZ_SETTINGS
@given(mutations=_mutations, header=st.one_of(st.none(), _npy_header))
def test_fuzz_corrupted_npy(mutations, header):
    seed = SEEDS[".npy"] if header is None else _npy_header_mutation(SEEDS[".npy"], *header)
    _load_and_check("fuzz.npy", _apply(seed, ".npy", mutations, False))


@FUZZ_SETTINGS
@given(
    mutations=st.lists(st.one_of(_generic, _field), max_size=3),
    header=st.one_of(st.none(), _npy_header),
    outer=st.lists(_generic, max_size=2),
    deflate=st.booleans(),
    extra=st.sampled_from([None, "notes.txt", "dir/", "second.npy"]),
)
def test_fuzz_corrupted_npz(mutations, header, outer, deflate, extra):
    seed = SEEDS[".npy"] if header is None else _npy_header_mutation(SEEDS[".npy"], *header)
    members = {"a.npy": _apply(seed, ".npy", mutations, False)}
    if extra == "second.npy":
        members[extra] = SEEDS[".npy"]
    elif extra is not None:
        members[extra] = b"" if extra.endswith("/") else b"hello"
    _load_and_check("fuzz.npz", _apply(_zip(members, deflate), ".zip", outer, False))


def test_fuzz_seeds_are_valid_files():
    """The mutations start from files every reader loads (else the fuzz would test nothing)."""
    for ext, data in SEEDS.items():
        payload = gzip.compress(data) if ext == ".nii.gz" else _zip({"a.npy": data}, True) if ext == ".npz" else data
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / f"seed{ext}").write_bytes(payload)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = load_cohort(tmp, CONFIG)
        assert len(c) >= 1 and not c.skipped or all("#" in sk.path for sk in c.skipped), (ext, c.skipped)
