"""Issue 14 item 4: no file or folder name, no derived subject ID and no cohort root in any output unless the
user opts in (``show_paths``); item 7: a CSV manifest row outside its folder is skipped unless allowed.

One small audit (`inspector scan`, pixels extractor, 64 px, real MRI slices of nilearn's MNI152 template) of
cohorts whose names carry a planted patient name and record number: a folder ``Patient_Doe_Jane_MRN12345/``
(holding a NIfTI volume, and a DICOM series in ``..._series/``), a volume file ``mrn12345.nii.gz`` (whose stem
is its subject ID), a PNG subject folder ``Smith_John/`` (its name is the subject ID), a corrupt synthetic file
``Patient_Doe_Jane_MRN12345/mrn12345_broken.nii.gz`` (skipped, with a reason) and a ``labels.csv`` whose
``source`` names a training file. The audit runs twice: by default and with ``--show-paths``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import re
import sqlite3
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from inspector.cli import main
from inspector.config import AuditConfig
from inspector.folder import load_audit_folder, validate_summary
from inspector.io import OUTSIDE_ROOT_REASON, LoadConfig, load_cohort
from inspector.naming import PSEUDONYM_RE, build_naming
from inspector.pipeline import load_inputs
from inspector.preprocess import PreprocessConfig, is_background, normalise_volume
from inspector.privacy import load_or_create_key, pseudonym, root_hash
from inspector.result import MissingEvidenceError, is_missing_evidence
from inspector.review import ReviewStore
from inspector.types import Cohort, SkippedFile, Slice

SIZE = 64
#: What must never appear without --show-paths: (pattern, flags). Capitalised names are matched as words
#: (so "Does" is not "Doe"), the record number in any case.
FORBIDDEN = (
    (r"Doe(?![a-z])", 0),
    (r"Jane(?![a-z])", 0),
    (r"MRN12345", re.IGNORECASE),
    (r"Smith(?![a-z])", 0),
    (r"John(?![a-z])", 0),
)
LABEL_RE = re.compile(r"sub-[0-9a-f]{12}/vol-\d{3,}")


# ----------------------------------------------------------------------------------------------
# cohorts with identifying names
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mni() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    return normalise_volume(np.asarray(load_mni152_template(resolution=2).get_fdata(), np.float32))


def _axial(lo: float, hi: float) -> list[np.ndarray]:
    vol = _mni()
    n = vol.shape[2]
    out = [vol[:, :, i].T[::-1].copy() for i in range(int(lo * n), int(hi * n))]
    return [s for s in out if not is_background(s)]


def _png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(path)


def _nifti(path: Path, slices: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    vol = np.stack([s.T for s in slices], axis=-1).astype(np.float32)  # (x, y, z), one axial slice per z
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))


def _dicom_series(folder: Path, images: list[np.ndarray]) -> None:
    """Single-frame MR files of one series whose PatientName/PatientID are the planted identity."""
    series_uid = generate_uid(entropy_srcs=["privacy-series"])
    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        path = folder / f"IM{k + 1:04d}.dcm"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["privacy", str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
        ds.PatientName, ds.PatientID = "Doe^Jane", "MRN12345"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(entropy_srcs=["study"]), series_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        arr = np.round(np.clip(img, 0, 1) * 4000).astype(np.uint16)
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelSpacing, ds.ImageOrientationPatient = [2.0, 2.0], [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * k]
        ds.PixelData = arr.tobytes()
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("privacy")
    data = base / "data"
    sl = _axial(0.15, 0.85)
    train, unseen = sl[0::2], sl[1::2]
    t = data / "train"
    _nifti(t / "Patient_Doe_Jane_MRN12345" / "scan.nii.gz", train[0:5])
    _nifti(t / "mrn12345.nii.gz", train[5:9])
    _dicom_series(t / "Patient_Doe_Jane_MRN12345_series", train[9:12])
    for k, img in enumerate(train[12:18]):
        _png(t / "Smith_John" / f"ax_{k:03d}.png", img)
    h = data / "holdout"
    for k, img in enumerate(unseen[:10]):
        _png(h / ("Smith_John" if k % 2 else "Doe_Jane") / f"h_{k:03d}.png", img)
    g = data / "synthetic"
    _png(g / "Patient_Doe_Jane_MRN12345" / "copy_0.png", train[13])  # a copy of Smith_John/ax_001.png
    _png(g / "Smith_John" / "copy_1.png", train[15][:, ::-1])  # a flipped copy of Smith_John/ax_003.png
    for k, img in enumerate(unseen[10:14]):
        _png(g / "Smith_John" / f"gen_{k}.png", img)
    (g / "Patient_Doe_Jane_MRN12345" / "mrn12345_broken.nii.gz").write_bytes(b"not a NIfTI volume at all")
    (g / "labels.csv").write_text(
        "path,label,source,augmentation\n"
        "Patient_Doe_Jane_MRN12345/copy_0.png,copy,Smith_John/ax_001.png,none\n"
        "Smith_John/copy_1.png,copy,Smith_John/ax_003.png,hflip\n"
        + "".join(f"Smith_John/gen_{k}.png,novel,,none\n" for k in range(4))
    )
    return {"base": base, "data": data, "train": t, "holdout": h, "synthetic": g}


def _run(named: dict[str, Path], out: Path, *extra: str) -> tuple[str, str]:
    """`inspector scan`, a review (recorded as the app records it), `inspector report` with a sign-off; returns
    what the two commands printed on stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        _commands(named, out, *extra)
    return stdout.getvalue(), stderr.getvalue()


def _commands(named: dict[str, Path], out: Path, *extra: str) -> None:
    code = main(
        [
            "scan",
            "--train", str(named["train"]),
            "--synthetic", str(named["synthetic"]),
            "--holdout", str(named["holdout"]),
            "--extractor", "pixels",
            "--size", str(SIZE),
            "--alpha", "0.1",
            "--cache-dir", str(named["base"] / "cache"),
            "--quiet",
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip
    assert code == 0
    folder = load_audit_folder(out)
    t = folder.table
    row = t.iloc[int(np.argmax(t["similarity"].to_numpy()))]
    ReviewStore(out / "reviews.sqlite3").record(
        folder.audit_id,
        str(row["sha256"]),
        "copy",
        "Reviewer A",
        "the same slice",
        slice_key=f"{row['synthetic_path']}#{int(row['slice_index'])}",
    )
    code = main(
        [
            "report", "--audit", str(out), "--out", str(out / "report.html"),
            "--signer", "Officer B", "--role", "privacy officer", "--decision", "do not release",
            "--reason", "a test of the names",
        ]
    )  # fmt: skip
    assert code == 0


def _texts(folder: Path) -> dict[str, str]:
    """Every written file's text: raw bytes (latin-1), NPZ members decoded, SQLite rows, member names."""
    out: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        parts = [p.name, p.read_bytes().decode("latin-1")]
        if p.suffix == ".npz":
            with zipfile.ZipFile(p) as z:
                parts.extend(z.namelist())
            with np.load(p, allow_pickle=False) as z:
                for k in z.files:
                    a = z[k]
                    if a.dtype.kind in "US":
                        parts.append(" ".join(map(str, a.ravel().tolist())))
        if p.name.endswith(".sqlite3"):
            con = sqlite3.connect(p)
            try:
                for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                    parts.extend(str(r) for r in con.execute(f'SELECT * FROM "{table}"'))
            finally:
                con.close()
        out[str(p.relative_to(folder))] = "\n".join(parts)
    return out


def _leaks(text: str) -> list[str]:
    return [pat for pat, flags in FORBIDDEN if re.search(pat, text, flags)]


@pytest.fixture(scope="module")
def private(named, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out") / "private"
    stdout, stderr = _run(named, out)
    return {"dir": out, "stdout": stdout, "stderr": stderr}


@pytest.fixture(scope="module")
def shown(named, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out") / "shown"
    stdout, stderr = _run(named, out, "--show-paths")
    return {"dir": out, "stdout": stdout, "stderr": stderr}


# ----------------------------------------------------------------------------------------------
# the outputs
# ----------------------------------------------------------------------------------------------


def _roots(named) -> list[str]:
    return [str(named[k]) for k in ("data", "train", "holdout", "synthetic")]


def test_no_name_and_no_root_in_any_output_by_default(named, private):
    texts = _texts(private["dir"])
    assert {"scores.csv", "subjects.csv", "volumes.csv", "summary.json", "manifest.json", "audit.npz",
            "evidence.npz", "report.html", "report.summary.json", "reviews.sqlite3"} <= set(texts)  # fmt: skip
    for name, text in texts.items():
        assert not _leaks(text), f"{name} holds {_leaks(text)}"
        for root in _roots(named):
            assert root not in text, f"{name} holds the root {root}"
    for stream in ("stdout", "stderr"):
        assert not _leaks(private[stream]), f"{stream}: {private[stream]}"
        assert not any(r in private[stream] for r in _roots(named)), private[stream]


def test_with_show_paths_the_names_appear(named, shown):
    """The opt-in writes real names (so the test above can fail), but still never the roots."""
    texts = _texts(shown["dir"])
    for name in ("scores.csv", "manifest.json", "evidence.npz", "report.html"):
        assert _leaks(texts[name]), name
    assert "Smith_John" in texts["subjects.csv"] and "mrn12345" in texts["subjects.csv"]
    assert "Patient_Doe_Jane_MRN12345/scan.nii.gz" in texts["manifest.json"]
    assert "Patient_Doe_Jane_MRN12345/mrn12345_broken.nii.gz" in texts["summary.json"]
    assert "Smith_John/ax_001.png" in texts["scores.csv"]  # the ground truth's source
    for name, text in texts.items():
        for root in _roots(named):
            assert root not in text, f"{name} holds the root {root}"


def test_the_published_names_follow_the_rule(named, private, shown):
    p, s = load_audit_folder(private["dir"]), load_audit_folder(shown["dir"])
    # the same audit underneath: the same slices in the same order, the same scores
    assert list(p.table["sha256"]) == list(s.table["sha256"])
    np.testing.assert_allclose(p.table["similarity"], s.table["similarity"])
    assert list(p.table["flagged"]) == list(s.table["flagged"])
    assert p.audit_id != s.audit_id  # show_paths is part of the config
    pv, sv = p.volumes(), s.volumes()
    np.testing.assert_allclose(np.sort(pv["p_value"]), np.sort(sv["p_value"]))
    assert p.verdict.n_flagged == s.verdict.n_flagged and p.verdict.n_subjects_flagged == s.verdict.n_subjects_flagged
    assert set(pv["volume"]) == set(p.table["synthetic_path"])
    # synthetic paths: <pseudonym>/vol-<n>, one label per real path
    assert all(LABEL_RE.fullmatch(v) for v in p.table["synthetic_path"])
    assert p.table.groupby("synthetic_path").size().to_dict() == {
        k: v for k, v in zip(
            p.table["synthetic_path"].drop_duplicates(),
            s.table.groupby("synthetic_path", sort=False).size(), strict=True)
    }  # fmt: skip
    key = load_or_create_key()
    # non-DICOM subjects from names: keyed pseudonyms of the raw IDs; the DICOM subject was one already
    raw_subjects = set(s.subjects["subject_id"])
    assert {"Smith_John", "mrn12345", "scan"} <= raw_subjects
    want = {r if PSEUDONYM_RE.fullmatch(r) else pseudonym(r, key) for r in raw_subjects}
    assert set(p.subjects["subject_id"]) == want
    assert pseudonym("Smith_John", key) in set(p.table["nearest_train_subject"])
    # volumes of one subject are numbered in the order of their real paths
    raw = s.table[["synthetic_path", "subject_id"]].drop_duplicates()
    smith = sorted(raw.loc[raw["subject_id"] == "Smith_John", "synthetic_path"])
    labels = dict(zip(s.table["synthetic_path"], p.table["synthetic_path"], strict=True))
    assert [labels[x] for x in smith] == [f"{pseudonym('Smith_John', key)}/vol-{n:03d}" for n in range(1, 6)]
    # the ground truth matched the real paths, then its source was published as a training label
    assert list(p.table["label"]) == list(s.table["label"])
    copies = p.table[p.table["label"] == "copy"]
    assert all(LABEL_RE.fullmatch(v) for v in copies["source"])
    # the DICOM series files: <pseudonym>/file-<n>; the skipped synthetic file: skipped/file-<n><ext>
    files = [f["path"] for f in p.manifest["cohorts"]["train"]["files"]]
    assert sum(bool(re.fullmatch(r"sub-[0-9a-f]{12}/file-00[1-3]", f)) for f in files) == 3
    skipped = p.summary["cohorts"]["synthetic"]["skipped"]
    assert [r["path"] for r in skipped] == ["skipped/file-001.nii.gz"] and skipped[0]["missing_evidence"]


def test_roots_are_written_as_hashes_only(named, private, shown):
    for folder in (private["dir"], shown["dir"]):
        summary = json.loads((folder / "summary.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
        validate_summary(summary)
        for name in ("train", "synthetic", "holdout"):
            want = hashlib.sha256(str(named[name]).encode()).hexdigest()
            assert summary["cohorts"][name]["root_sha256"] == want == root_hash(named[name])
            assert manifest["cohorts"][name]["root_sha256"] == want
            assert "root" not in summary["cohorts"][name] and "root" not in manifest["cohorts"][name]


def test_a_folder_written_before_roots_were_hashed_is_read_without_its_root(named, private, tmp_path):
    import shutil

    from inspector.report import write_report

    old = tmp_path / "old"
    shutil.copytree(private["dir"], old)
    s = json.loads((old / "summary.json").read_text())
    for name in ("train", "synthetic", "holdout"):
        c = s["cohorts"][name]
        c.pop("root_sha256")
        s["cohorts"][name] = {"root": str(named[name]), **c}
    for k in ("show_paths", "allow_outside_root", "rotation_shortlist", "max_angle"):
        s["config"].pop(k)
    (old / "summary.json").write_text(json.dumps(s))
    f = load_audit_folder(old)
    assert f.summary["cohorts"]["train"]["root_sha256"] == root_hash(named["train"])
    assert "root" not in f.summary["cohorts"]["train"] and f.summary["config"]["show_paths"] is True
    # the matching settings of that time: rotations within 15 degrees, no rotation-invariant shortlist
    assert f.summary["config"]["max_angle"] == 15.0 and f.summary["config"]["rotation_shortlist"] == 0
    html = write_report(old, old / "report-old.html").read_text(encoding="utf-8")
    assert str(named["train"]) not in html and str(named["train"]) not in (old / "report-old.summary.json").read_text()


def test_the_report_states_how_paths_are_named(private, shown):
    p = (private["dir"] / "report.html").read_text()
    s = (shown["dir"] / "report.html").read_text()
    assert "pseudonymous labels" in p and "paths relative to the cohort root" in s
    assert LABEL_RE.search(p) and not LABEL_RE.search(s.split('id="provenance"')[0])


# ----------------------------------------------------------------------------------------------
# the mapping on its own
# ----------------------------------------------------------------------------------------------


def _slice(path: str, subject: str, index: int = 0, sources: tuple[str, ...] = ()) -> Slice:
    return Slice(np.full((4, 4), 0.5, np.float32), subject_id=subject, path=path, slice_index=index, sources=sources)


def test_naming_is_deterministic_and_the_identity_with_show_paths(tmp_path):
    key = b"k" * 32
    c = Cohort(
        [
            _slice("Doe/b.png", "Doe", sources=("Doe/b.png",)),
            _slice("Doe/a.png", "Doe", sources=("Doe/a.png",)),
            _slice("ser", "sub-0123456789ab", 0, ("ser/1.dcm", "ser/2.dcm")),
            _slice("ser", "sub-0123456789ab", 1, ("ser/1.dcm", "ser/2.dcm")),
            _slice("x.npz:arr", "x", sources=("x.npz",)),
        ],
        tmp_path,
        [
            SkippedFile("Doe/broken.nii.gz", f"corrupt: cannot read {tmp_path}/Doe/broken.nii.gz (broken.nii.gz)"),
            SkippedFile("ser#5", "background-only slice (foreground fraction 0.000 < 0.01)"),
            SkippedFile("x.npz:bad", "unsupported shape"),
            SkippedFile("Doe/notes.json", "unsupported format (.json); supported: ..."),
        ],
    )
    n1 = build_naming({"train": c}, key=key)
    n2 = build_naming({"train": c}, key=key)
    assert n1.cohorts["train"].volumes == n2.cohorts["train"].volumes and n1.subjects == n2.subjects
    doe = pseudonym("Doe", key)
    pub = n1.cohort("train", c)
    assert [s.path for s in pub] == [f"{doe}/vol-002", f"{doe}/vol-001", "sub-0123456789ab/vol-001",
                                     "sub-0123456789ab/vol-001", f"{pseudonym('x', key)}/vol-001"]  # fmt: skip
    assert [s.subject_id for s in pub][:3] == [doe, doe, "sub-0123456789ab"]
    assert pub.slices[2].sources == ("sub-0123456789ab/file-001", "sub-0123456789ab/file-002")
    assert pub.name == "train" and pub.root == c.root
    sk = {s.path: s.reason for s in pub.skipped}
    x = pseudonym("x", key)
    assert set(sk) == {"skipped/file-001.nii.gz", "sub-0123456789ab/vol-001#5", f"{x}/file-001:member-001",
                       "skipped/file-002.json"}  # fmt: skip
    reason = sk["skipped/file-001.nii.gz"]
    assert str(tmp_path) not in reason and "broken" not in reason and "Doe" not in reason, reason
    # the extension survives, so a skipped sidecar is still not missing evidence
    assert not is_missing_evidence(SkippedFile("skipped/file-002.json", sk["skipped/file-002.json"]))
    ident = build_naming({"train": c}, show_paths=True)
    shown = ident.cohort("train", c)
    assert shown.slices[0] is c.slices[0] and shown.files == c.files and ident.path("train", "Doe/a.png") == "Doe/a.png"
    # but never the root, even with real names: a reason quoting it quotes the relative path
    want = SkippedFile("Doe/broken.nii.gz", "corrupt: cannot read Doe/broken.nii.gz (broken.nii.gz)")
    assert shown.skipped[0] == want
    assert shown.skipped[1:] == c.skipped[1:]
    # another key, other pseudonyms
    assert build_naming({"train": c}, key=b"j" * 32).subject("Doe") != doe


# ----------------------------------------------------------------------------------------------
# item 7: a manifest row outside the manifest's folder
# ----------------------------------------------------------------------------------------------


def _npy(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).random((8, 8)).astype(np.float32))


def test_manifest_rows_outside_the_folder_are_skipped_unless_allowed(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _npy(data / "a.npy", 1)
    _npy(data / "sub" / "b.npy", 2)
    _npy(elsewhere / "c.npy", 3)
    (data / "link.npy").symlink_to(elsewhere / "c.npy")  # a symlink inside the folder: as in a folder scan
    (data / "m.csv").write_text(
        "path,subject_id\n"
        "a.npy,s1\n"
        f"{data / 'sub' / 'b.npy'},s2\n"  # absolute but inside
        "sub/../a.npy,s1\n"  # climbs and comes back: inside (a second listing of a.npy)
        "link.npy,s3\n"
        "../elsewhere/c.npy,s4\n"
        f"{elsewhere / 'c.npy'},s5\n"
        "sub/../../elsewhere/c.npy,s6\n"
    )
    native = PreprocessConfig(size=None)
    c = load_cohort(data / "m.csv", LoadConfig(preprocess=native))
    assert sorted(s.path for s in c) == ["a.npy", "link.npy", "sub/b.npy"]
    outside = [sk for sk in c.skipped if sk.reason.startswith(OUTSIDE_ROOT_REASON)]
    assert [sk.path for sk in outside] == ["../elsewhere/c.npy"] * 3
    assert [re.search(r"row (\d+)", sk.reason).group(1) for sk in outside] == ["6", "7", "8"]
    assert all(is_missing_evidence(sk) for sk in outside)
    allowed = load_cohort(data / "m.csv", LoadConfig(preprocess=native, allow_outside_root=True))
    assert "../elsewhere/c.npy" in {s.path for s in allowed}
    assert not any(sk.reason.startswith(OUTSIDE_ROOT_REASON) for sk in allowed.skipped)


def test_a_training_manifest_outside_its_folder_refuses_the_audit_unless_allowed(tmp_path):
    data = tmp_path / "train"
    for k in range(6):
        _npy(data / f"t{k}.npy", 10 + k)
    _npy(tmp_path / "other" / "x.npy", 20)
    rows = "".join(f"t{k}.npy,s{k % 3}\n" for k in range(6))
    (data / "m.csv").write_text("path,subject_id\n" + rows + "../other/x.npy,s9\n")
    _npy(tmp_path / "syn" / "g.npy", 30)
    cfg = AuditConfig(extractor="pixels", size=16)
    with pytest.raises(MissingEvidenceError, match="outside the manifest's folder") as e:
        load_inputs(data / "m.csv", tmp_path / "syn", config=cfg)
    assert [sk.path for sk in e.value.skipped["train"]] == ["../other/x.npy"]
    inputs = load_inputs(data / "m.csv", tmp_path / "syn", config=cfg.replace(allow_outside_root=True))
    assert "../other/x.npy" in {s.path for s in inputs.train}
    assert pd.Series([s.path for s in inputs.train]).is_unique
