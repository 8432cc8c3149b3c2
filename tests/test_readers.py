"""The reader registry of inspector.io: lookup by suffix, sniffing, adding/removing a format, clashes.

Every test that changes the registry restores it (same readers, same order) through ``registry``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

import inspector.io as io
from inspector.io import (
    READERS,
    SUPPORTED_EXTENSIONS,
    DicomReader,
    ImageReader,
    LoadConfig,
    NiftiReader,
    NoImagesError,
    NpyReader,
    NpzReader,
    Reader,
    TiffReader,
    _Candidate,
    _Skip,
    _Unit,
    load_cohort,
    reader_for,
    register_reader,
    unregister_reader,
)
from inspector.preprocess import PreprocessConfig, normalise_volume
from inspector.privacy import KEY_ENV_VAR
from inspector.types import SkippedFile, SourceFile, raw_pixel_hash

NATIVE = LoadConfig(preprocess=PreprocessConfig(size=None))
BUILTIN_EXTENSIONS = (
    ".nii.gz", ".nii", ".mgz", ".mgh", ".dcm", ".dicom", ".ima",
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".npz",
)  # fmt: skip


@pytest.fixture(autouse=True)
def rd_pseudonym_key(tmp_path_factory, monkeypatch) -> Path:
    """Pseudonym keys of these tests live in a temporary file, never in the user's config dir."""
    path = tmp_path_factory.mktemp("key") / "pseudonym.key"
    monkeypatch.setenv(KEY_ENV_VAR, str(path))
    return path


@pytest.fixture
def registry() -> Iterator[None]:
    """Whatever a test registers or removes, the built-in registry comes back in its order."""
    before = list(READERS.values())
    try:
        yield
    finally:
        io._READERS.clear()
        io._READERS.update({r.name: r for r in before})
        io._refresh_registry()
        assert io.SUPPORTED_EXTENSIONS == BUILTIN_EXTENSIONS


# ----------------------------------------------------------------------------------------------
# toy formats
# ----------------------------------------------------------------------------------------------


def rd_text_image(c: _Candidate, skip_lines: int = 0) -> np.ndarray:
    """A whitespace-separated grid of integers -> (1, H, W) int64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # numpy: "Empty input file"
        arr = np.loadtxt(c.abs, dtype=np.int64, ndmin=2, skiprows=skip_lines)
    if arr.size == 0:
        raise _Skip("empty text image")
    return arr[None]


class TextImageReader(Reader):
    """``.txtimg``: one 2D image per file, subject = folder."""

    name = "txtimg"
    label = "toy text image"
    suffixes = (".txtimg",)

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return [_Unit(c.rel, rd_text_image(c), [0], "2d", (1.0, 1.0), "folder", c.rel)]


class MagicReader(Reader):
    """No suffix: files starting with ``TXTIMG`` are recognised by content."""

    name = "magic"
    label = "magic text image"
    sniff_hint = "TXTIMG magic"

    def sniff(self, path: Path) -> bool:
        return path.read_bytes()[:7] == b"TXTIMG\n"

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return [_Unit(c.rel, rd_text_image(c, skip_lines=1), [0], "2d", (1.0, 1.0), "folder", c.rel)]


class StackReader(Reader):
    """``.layer``: every file of a folder is one slice of that folder's volume (a group reader)."""

    name = "layer"
    label = "layer stack"
    suffixes = (".layer",)

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return self.read_group([c], config, skipped)

    def read_group(
        self,
        candidates: Sequence[_Candidate],
        config: LoadConfig,
        skipped: list[SkippedFile],
        tick: io.TickCallback | None = None,
    ) -> list[_Unit]:
        by_folder: dict[str, list[_Candidate]] = {}
        for c in candidates:
            by_folder.setdefault(Path(c.rel).parent.as_posix(), []).append(c)
        units = []
        for folder, cs in by_folder.items():
            layers = np.concatenate([rd_text_image(c) for c in cs])
            units.append(
                _Unit(folder, layers, list(range(len(cs))), "axial", (1.0, 1.0), "fixed", folder, subject_id=folder)
            )
            units[-1].sources = tuple(c.rel for c in cs)
            if tick is not None:
                tick(len(cs))
        return units


def rd_grid(seed: int, shape: tuple[int, int] = (6, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 500, size=shape)


def rd_write(path: Path, grid: np.ndarray, header: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(" ".join(str(int(v)) for v in row) for row in grid)
    path.write_text(header + rows + "\n")
    return path


def rd_source(root: Path, rel: str) -> SourceFile:
    data = (root / rel).read_bytes()
    return SourceFile(rel, len(data), hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------------------------------
# the built-in registry
# ----------------------------------------------------------------------------------------------


def test_builtin_readers_and_supported_extensions_come_from_the_registry():
    assert list(READERS) == ["nifti", "dicom", "pil", "tiff", "npy", "npz"]
    classes = (NiftiReader, DicomReader, ImageReader, TiffReader, NpyReader, NpzReader)
    assert [type(r) for r in READERS.values()] == list(classes)
    assert SUPPORTED_EXTENSIONS == BUILTIN_EXTENSIONS
    assert SUPPORTED_EXTENSIONS == tuple(s for r in READERS.values() for s in r.suffixes)
    assert [r.label for r in READERS.values()] == ["NIfTI/MGH", "DICOM", "image", "TIFF", "NumPy .npy", "NumPy .npz"]
    with pytest.raises(TypeError):
        READERS["x"] = READERS["npy"]  # type: ignore[index]
    assert "nifti" in repr(READERS["nifti"]) and ".nii.gz" in repr(READERS["nifti"])


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("scan.nii.gz", "nifti"),
        ("SCAN.NII.GZ", "nifti"),
        ("scan.nii", "nifti"),
        ("brain.mgz", "nifti"),
        ("a/b/IM0001.dcm", "dicom"),
        ("x.IMA", "dicom"),
        ("slice.PNG", "pil"),
        ("p.jpeg", "pil"),
        ("stack.tif", "tiff"),
        ("v.npy", "npy"),
        ("pack.npz", "npz"),
        ("dir.nii/file.png", "pil"),  # only the last component counts
        ("archive.gz", None),
        (".nii", None),  # a bare suffix is no file name
        ("IM0001", None),  # DICOM without extension is sniffed, not matched
        ("notes.txt", None),
    ],
)
def test_reader_for_matches_the_longest_suffix_case_insensitively(filename, name):
    r = reader_for(filename)
    assert (r.name if r is not None else None) == name
    assert reader_for(Path(filename)) is r


def test_dicom_reader_sniffs_the_preamble(tmp_path):
    (tmp_path / "IM1").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "other").write_bytes(b"\0" * 200)
    (tmp_path / "short").write_bytes(b"DICM")
    dicom = READERS["dicom"]
    assert dicom.sniff(tmp_path / "IM1")
    assert not dicom.sniff(tmp_path / "other") and not dicom.sniff(tmp_path / "short")
    assert not READERS["nifti"].sniff(tmp_path / "IM1")  # the default: never


# ----------------------------------------------------------------------------------------------
# adding a format
# ----------------------------------------------------------------------------------------------


def test_a_registered_toy_reader_is_read_by_load_cohort_and_gone_after_unregistering(tmp_path, registry):
    a, b = rd_grid(1), rd_grid(2, (4, 7))
    rd_write(tmp_path / "a.txtimg", a)
    rd_write(tmp_path / "sub" / "B.TXTIMG", b)
    (tmp_path / "bad.txtimg").write_text("hello world\n")
    (tmp_path / "empty.txtimg").write_text("")
    np.save(tmp_path / "v.npy", rd_grid(3))

    assert register_reader(TextImageReader) is TextImageReader  # returns the class: usable as a decorator
    assert isinstance(READERS["txtimg"], TextImageReader)
    assert reader_for("x.txtimg") is READERS["txtimg"]
    assert io.SUPPORTED_EXTENSIONS == (*BUILTIN_EXTENSIONS, ".txtimg")

    c = load_cohort(tmp_path, NATIVE)
    assert [s.key for s in c] == ["a.txtimg#0", "sub/B.TXTIMG#0", "v.npy#0"]
    assert [s.subject_id for s in c] == [tmp_path.name, "sub", tmp_path.name]
    assert c[0].sha256 == raw_pixel_hash(a) and c[1].sha256 == raw_pixel_hash(b)
    assert c[0].original_shape == (6, 5) and c[1].original_shape == (4, 7)
    np.testing.assert_allclose(c[0].array, normalise_volume(a), atol=1e-6)
    assert [s.sources for s in c] == [("a.txtimg",), ("sub/B.TXTIMG",), ("v.npy",)]
    assert c.files == tuple(rd_source(tmp_path, rel) for rel in ("a.txtimg", "sub/B.TXTIMG", "v.npy"))
    reasons = {sk.path: sk.reason for sk in c.skipped}
    assert set(reasons) == {"bad.txtimg", "empty.txtimg"}
    assert reasons["bad.txtimg"].startswith("corrupt or unreadable toy text image file: ValueError")
    assert reasons["empty.txtimg"] == "empty text image"

    # a stem of a registered suffix is stripped for subject IDs as well
    assert io._strip_ext("sub/B.TXTIMG") == "sub/B"

    assert unregister_reader("txtimg") is TextImageReader
    assert "txtimg" not in READERS and reader_for("a.txtimg") is None
    assert io.SUPPORTED_EXTENSIONS == BUILTIN_EXTENSIONS
    c2 = load_cohort(tmp_path, NATIVE)
    assert [s.key for s in c2] == ["v.npy#0"]
    reasons2 = {sk.path: sk.reason for sk in c2.skipped}
    assert reasons2["a.txtimg"].startswith("unsupported format (.txtimg); supported: .nii.gz")
    assert ".txtimg" not in reasons2["a.txtimg"].partition("supported:")[2]


def test_a_sniffing_reader_claims_files_without_extension(tmp_path, registry):
    grid = rd_grid(4)
    rd_write(tmp_path / "scan0001", grid, header="TXTIMG\n")
    (tmp_path / "junk").write_bytes(b"nothing to see" * 20)
    register_reader(MagicReader)
    with pytest.raises(NoImagesError) as ei:
        load_cohort(tmp_path / "junk", NATIVE)
    assert "magic text image without extension" in str(ei.value)
    assert "DICOM without extension" in str(ei.value)
    c = load_cohort(tmp_path, NATIVE)
    assert [s.key for s in c] == ["scan0001#0"]
    assert c[0].sha256 == raw_pixel_hash(grid) and c[0].sources == ("scan0001",)
    assert c.files == (rd_source(tmp_path, "scan0001"),)
    assert c.skipped[0].path == "junk"
    assert c.skipped[0].reason.startswith(
        "unsupported format (no extension, no DICOM preamble, no TXTIMG magic); supported: .nii.gz"
    )


def test_a_failing_sniffer_does_not_abort_the_load(tmp_path, registry):
    class BrokenSniffer(MagicReader):
        name = "broken"

        def sniff(self, path: Path) -> bool:
            raise RuntimeError("boom")

    register_reader(BrokenSniffer)
    np.save(tmp_path / "v.npy", rd_grid(5))
    (tmp_path / "blob").write_bytes(b"x" * 10)
    c = load_cohort(tmp_path, NATIVE)
    assert [s.key for s in c] == ["v.npy#0"]
    assert c.skipped[0].path == "blob" and "unsupported format (no extension" in c.skipped[0].reason


def test_a_group_reader_reads_several_files_into_one_volume_with_all_sources(tmp_path, registry):
    layers = [rd_grid(10 + k) for k in range(3)]
    for k, g in enumerate(layers):
        rd_write(tmp_path / "vol" / f"{k}.layer", g)
    rd_write(tmp_path / "other" / "0.layer", rd_grid(20))
    register_reader(StackReader)
    calls = []
    c = load_cohort(tmp_path, NATIVE, progress=lambda *a: calls.append(a))
    assert calls[0] == ("loading", 0, 4) and calls[-1] == ("loading", 4, 4)
    assert [s.key for s in c] == ["other#0", "vol#0", "vol#1", "vol#2"]
    assert [s.sha256 for s in c[1:]] == [raw_pixel_hash(g) for g in layers]
    assert c[0].sources == ("other/0.layer",)
    assert all(s.sources == ("vol/0.layer", "vol/1.layer", "vol/2.layer") for s in c[1:])
    rels = ["other/0.layer", "vol/0.layer", "vol/1.layer", "vol/2.layer"]
    assert c.files == tuple(rd_source(tmp_path, rel) for rel in rels)
    sub = c.subset([1])
    assert [f.path for f in sub.files] == ["vol/0.layer", "vol/1.layer", "vol/2.layer"]


def test_a_reader_giving_sources_outside_its_candidates_is_a_programming_error(tmp_path, registry):
    class Liar(TextImageReader):
        name = "liar"
        suffixes = (".liar",)

        def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
            units = super().read(c, config, skipped)
            units[0].sources = ("somewhere/else.txt",)
            return units

    register_reader(Liar)
    rd_write(tmp_path / "a.liar", rd_grid(6))
    with pytest.raises(RuntimeError, match=r"Reader 'liar' gave unit 'a\.liar' sources \['somewhere/else\.txt'\]"):
        load_cohort(tmp_path, NATIVE)


def test_a_builtin_reader_can_be_replaced(tmp_path, registry):
    class HalfNpy(NpyReader):
        def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
            units = super().read(c, config, skipped)
            for u in units:
                u.raw = np.asarray(u.raw)[:, : u.raw.shape[1] // 2]
            return units

    np.save(tmp_path / "v.npy", rd_grid(7, (8, 6)))
    with pytest.raises(ValueError, match="unregister_reader"):
        register_reader(HalfNpy)
    unregister_reader("npy")
    register_reader(HalfNpy)
    assert load_cohort(tmp_path, NATIVE)[0].original_shape == (4, 6)


# ----------------------------------------------------------------------------------------------
# registration errors
# ----------------------------------------------------------------------------------------------


def test_a_suffix_clash_names_both_readers_and_the_fix(registry):
    class PngToo(TextImageReader):
        name = "png-too"
        suffixes = (".txtimg", ".png")

    before = dict(READERS)
    with pytest.raises(ValueError) as ei:
        register_reader(PngToo)
    msg = str(ei.value)
    assert "'png-too' (PngToo)" in msg and "'.png'" in msg and "'pil' (ImageReader)" in msg
    assert "Remove '.png' from one of them" in msg and "unregister_reader('pil')" in msg
    assert dict(READERS) == before and reader_for("x.txtimg") is None  # nothing half-registered
    assert io.SUPPORTED_EXTENSIONS == BUILTIN_EXTENSIONS


def test_a_longer_suffix_is_no_clash(tmp_path, registry):
    class GzText(TextImageReader):
        name = "gztext"
        suffixes = (".gz",)

    register_reader(GzText)
    assert reader_for("a.gz") is READERS["gztext"]
    assert reader_for("a.nii.gz") is READERS["nifti"]  # the longest suffix still wins


def test_registration_rejects_malformed_readers(registry):
    class Unnamed(TextImageReader):
        name = ""

    class Unlabelled(TextImageReader):
        label = ""

    class Upper(TextImageReader):
        suffixes = (".TXTIMG",)

    class NoDot(TextImageReader):
        suffixes = ("txtimg",)

    class NotATuple(TextImageReader):
        suffixes = ".txtimg"  # type: ignore[assignment]

    class Twice(TextImageReader):
        suffixes = (".txtimg", ".txtimg")

    class ClaimsNothing(TextImageReader):
        suffixes = ()

    class Abstract(Reader):
        name = "abstract"
        label = "abstract"
        suffixes = (".abs",)

    before = dict(READERS)
    for cls, match in [
        (Unnamed, "non-empty class attribute name"),
        (Unlabelled, "non-empty class attribute label"),
        (Upper, "lower case"),
        (NoDot, "start with '.'"),
        (NotATuple, "tuple of str"),
        (Twice, "twice"),
        (ClaimsNothing, "claims no file"),
    ]:
        with pytest.raises(ValueError, match=match):
            register_reader(cls)
    with pytest.raises(TypeError, match="abstract"):
        register_reader(Abstract)
    with pytest.raises(TypeError, match="Reader subclass"):
        register_reader(int)  # type: ignore[type-var]
    register_reader(TextImageReader)
    with pytest.raises(ValueError, match=r"reader named 'txtimg' is already registered \(TextImageReader\)"):
        register_reader(TextImageReader)
    unregister_reader("txtimg")
    assert dict(READERS) == before
    with pytest.raises(KeyError, match="No reader named 'nope'"):
        unregister_reader("nope")


# ----------------------------------------------------------------------------------------------
# per-file timeout and failures of a reader never abort a load
# ----------------------------------------------------------------------------------------------


class SleepyReader(TextImageReader):
    """``.sleepy``: a text image whose first line is how long reading it takes (seconds)."""

    name = "sleepy"
    label = "sleepy image"
    suffixes = (".sleepy",)

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        import time

        seconds = float(c.abs.read_text().splitlines()[0])
        skipped.append(SkippedFile(f"{c.rel}:part", "a part recorded before sleeping"))
        time.sleep(seconds)
        io._warn(f"{c.rel}: slept {seconds:g} s")
        return [_Unit(c.rel, rd_text_image(c, skip_lines=1), [0], "2d", (1.0, 1.0), "folder", c.rel)]


def test_a_reader_that_hangs_is_skipped_after_the_per_file_timeout(tmp_path, registry):
    import time

    register_reader(SleepyReader)
    rd_write(tmp_path / "slow.sleepy", rd_grid(30), header="3\n")
    rd_write(tmp_path / "quick.sleepy", rd_grid(31), header="0\n")
    np.save(tmp_path / "v.npy", rd_grid(32))
    calls = []
    t0 = time.monotonic()
    with pytest.warns(io.LoadWarning, match="quick.sleepy: slept 0 s") as rec:
        c = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None), file_timeout_s=0.3),
                        progress=lambda *a: calls.append(a))  # fmt: skip
    assert time.monotonic() - t0 < 2.5  # not the 3 s the file asked for
    assert [s.key for s in c] == ["quick.sleepy#0", "v.npy#0"]
    reasons = {sk.path: sk.reason for sk in c.skipped}
    assert reasons["slow.sleepy"].startswith(
        "reading it as sleepy image: reading the file took longer than the per-file timeout of 0.3 s "
        "(LoadConfig.file_timeout_s); skipped."
    )
    assert "LoadConfig(file_timeout_s=120)" in reasons["slow.sleepy"]
    # what the abandoned read recorded is dropped with it; the finished read's part is kept
    assert "slow.sleepy:part" not in reasons and "quick.sleepy:part" in reasons
    assert {w.filename for w in rec} == {__file__}  # worker warnings point at the caller
    assert calls[-1] == ("loading", 3, 3)


def test_no_timeout_reads_in_the_calling_thread(tmp_path, registry):
    import threading

    seen: list[str] = []

    class WhereReader(TextImageReader):
        name = "where"
        suffixes = (".where",)

        def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
            seen.append(threading.current_thread().name)
            return super().read(c, config, skipped)

    register_reader(WhereReader)
    rd_write(tmp_path / "a.where", rd_grid(33))
    load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None), file_timeout_s=None))
    load_cohort(tmp_path, NATIVE)
    assert seen == [threading.current_thread().name, "inspector-reader"]


def test_a_reader_raising_memory_or_recursion_errors_is_skipped_not_fatal(tmp_path, registry):
    class Greedy(TextImageReader):
        name = "greedy"
        suffixes = (".greedy", ".deep")

        def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
            if c.rel.endswith(".deep"):
                raise RecursionError("maximum recursion depth exceeded")
            raise MemoryError("Unable to allocate 3.2 GiB")

    register_reader(Greedy)
    rd_write(tmp_path / "a.greedy", rd_grid(34))
    rd_write(tmp_path / "b.deep", rd_grid(35))
    np.save(tmp_path / "v.npy", rd_grid(36))
    c = load_cohort(tmp_path, NATIVE)
    assert [s.key for s in c] == ["v.npy#0"]
    reasons = {sk.path: sk.reason for sk in c.skipped}
    assert reasons["a.greedy"] == "corrupt or unreadable toy text image file: MemoryError: Unable to allocate 3.2 GiB"
    assert reasons["b.deep"].startswith("corrupt or unreadable toy text image file: RecursionError")


def test_pixels_that_preprocessing_refuses_skip_the_unit_not_the_load(tmp_path, registry):
    class Weird(TextImageReader):
        name = "weird"
        suffixes = (".weird",)

        def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
            return [_Unit(c.rel, np.array([[["x", "y"]]], dtype=object), [0], "2d", (1.0, 1.0), "folder", c.rel)]

    register_reader(Weird)
    rd_write(tmp_path / "a.weird", rd_grid(37))
    np.save(tmp_path / "v.npy", rd_grid(38))
    c = load_cohort(tmp_path, NATIVE)
    assert [s.key for s in c] == ["v.npy#0"]
    assert {sk.path: sk.reason for sk in c.skipped}["a.weird"].startswith("could not preprocess its pixel values:")


def test_a_custom_reader_gets_the_byte_budget_and_can_check_the_pixel_budget(tmp_path, registry):
    class Budgeted(TextImageReader):
        name = "budgeted"
        suffixes = (".budget",)

        def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
            h, w = (int(v) for v in c.abs.read_text().split()[:2])  # a header: the declared size
            io.check_voxel_budget((h, w), config, bytes_per_voxel=8, what="budget image")
            raise AssertionError("never decoded in this test")

    register_reader(Budgeted)
    (tmp_path / "claims.budget").write_text("100000 100000\n")
    (tmp_path / "big.budget").write_text("1 1\n" + "0 " * 5000)
    np.save(tmp_path / "v.npy", rd_grid(39))
    c = load_cohort(tmp_path, LoadConfig(preprocess=PreprocessConfig(size=None), max_file_bytes=4096))
    reasons = {sk.path: sk.reason for sk in c.skipped}
    assert reasons["claims.budget"].startswith("over the per-file pixel budget LoadConfig.max_voxels = 536_870_912: "
                                               "the header declares budget image shape (100000, 100000)")  # fmt: skip
    assert reasons["big.budget"].startswith("over the per-file byte budget LoadConfig.max_file_bytes = 4.0 KiB")
    with pytest.raises(io._Skip, match="negative dimension"):
        io.check_voxel_budget((-1, 5), NATIVE)
