"""The release report: evidence and manifest in the audit folder, the self-contained HTML, summary.json
and its schema, reviewer decisions, the sign-off, the report's own hash, and no PHI anywhere.

One real audit (`inspector scan`, pixels extractor, 64 px) of real MRI slices (nilearn's MNI152
template, offline) is shared by the module. Its training set holds a DICOM series and its synthetic set
a DICOM series of copies, both carrying a planted PatientName and PatientID.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import hashlib
import io
import json
import re
import shutil
import sqlite3
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

import inspector.pipeline as audit_mod
from inspector.cli import build_parser, main
from inspector.config import AuditConfig
from inspector.folder import (
    AuditFolderError,
    SummaryValidationError,
    load_audit_folder,
    load_summary_schema,
    select_evidence_rows,
    sha256_file,
    sign_off,
    validate_summary,
    write_evidence,
)
from inspector.preprocess import is_background, normalise_volume
from inspector.report import summary_path_for, svg_histogram, svg_layers, svg_roc, verify_report, write_report
from inspector.review import SIGNOFF_DECISIONS, ReviewStore, SignOff, SignOffError

PHI_NAME = "Doe^Jane"
PHI_ID = "PHI-12345"
SIZE = 64


# ----------------------------------------------------------------------------------------------
# cohorts
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mni() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    return normalise_volume(np.asarray(load_mni152_template(resolution=2).get_fdata(), np.float32))


def _save_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(path)


def _write_dicom_series(folder: Path, images: list[np.ndarray], series: str) -> list[Path]:
    """One single-frame 16-bit MR DICOM file per image, one series, with the planted PHI."""
    paths = []
    series_uid = generate_uid(entropy_srcs=[series])
    for k, img in enumerate(images):
        path = folder / f"IM{k + 1:04d}.dcm"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientName = PHI_NAME
        ds.PatientID = PHI_ID
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"])
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        arr = np.round(np.clip(img, 0, 1) * 4000).astype(np.uint16)
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelSpacing = [2.0, 2.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * k]
        ds.PixelData = arr.tobytes()
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _plane(axis: int, lo: float, hi: float) -> tuple[list[tuple[int, np.ndarray]], list[tuple[int, np.ndarray]]]:
    """Training and unseen slices of one plane, 4 mm apart, alternating."""
    vol = _mni()
    n = vol.shape[axis]
    idx = [i for i in range(int(lo * n), int(hi * n), 2) if not is_background(np.take(vol, i, axis=axis))]
    pairs = [(i, np.take(vol, i, axis=axis).T[::-1].copy()) for i in idx]
    return pairs[0::2], pairs[1::2]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/: axial PNGs (subject folder) + a coronal DICOM series with PHI; holdout/: 20 unseen PNGs;
    synthetic/: a DICOM series of 3 copies of the training series (PHI), 2 PNG copies (one flipped),
    4 unseen slices."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    ax_train, ax_unseen = _plane(2, 0.25, 0.75)
    co_train, co_unseen = _plane(1, 0.25, 0.75)
    ax_train, co_train = ax_train[:9], co_train[:9]
    for i, img in ax_train:
        _save_png(root / "train" / "sub-axial" / f"s{i:03d}.png", img)
    _write_dicom_series(root / "train" / "mr_series", [img for _, img in co_train], "train-series")
    unseen = [("ax", i, img) for i, img in ax_unseen] + [("co", i, img) for i, img in co_unseen]
    order = rng.permutation(len(unseen))
    for j in order[:20]:
        p, i, img = unseen[j]
        _save_png(root / "holdout" / p / f"s{i:03d}.png", img)
    _write_dicom_series(root / "synthetic" / "dicom_copies", [co_train[k][1] for k in (1, 4, 7)], "syn-series")
    _save_png(root / "synthetic" / "gen" / "copy_a.png", ax_train[3][1])
    _save_png(root / "synthetic" / "gen" / "copy_b_hflip.png", ax_train[6][1][:, ::-1])
    for n, j in enumerate(order[20:24]):
        _save_png(root / "synthetic" / "gen" / f"novel_{n}.png", unseen[j][2])
    return {k: root / k for k in ("train", "holdout", "synthetic")} | {"root": root}


@pytest.fixture(scope="module")
def scanned(cohorts: dict[str, Path]) -> dict:
    """`inspector scan` once; the AuditResult it saved is captured for comparisons."""
    captured = {}
    real = audit_mod.audit

    def capture(*a, **kw):
        captured["result"] = real(*a, **kw)
        return captured["result"]

    out = cohorts["root"] / "audit"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit_mod, "audit", capture)
        code = main(
            [
                "scan",
                "--train", str(cohorts["train"]),
                "--synthetic", str(cohorts["synthetic"]),
                "--holdout", str(cohorts["holdout"]),
                "--extractor", "pixels",
                "--size", str(SIZE),
                "--alpha", "0.05",
                "--cache-dir", str(cohorts["root"] / "cache"),
                "--quiet",
                "--show-paths",  # real names: the tests find the planted copies by their files
                "--out", str(out),
            ]
        )  # fmt: skip
    assert code == 0
    return {"dir": out, "result": captured["result"]}


@pytest.fixture
def audit_copy(scanned, tmp_path) -> Path:
    """A private copy of the audit folder (tests write review databases and reports into it)."""
    dst = tmp_path / "audit"
    shutil.copytree(scanned["dir"], dst)
    return dst


def _flagged(audit_dir: Path) -> pd.DataFrame:
    t = load_audit_folder(audit_dir).table
    return t[t["flagged"] == 1]


def _audit_id(audit_dir: Path) -> str:
    return json.loads((audit_dir / "summary.json").read_text())["audit_id"]


# ----------------------------------------------------------------------------------------------
# the audit itself (preconditions the report tests rely on)
# ----------------------------------------------------------------------------------------------


def test_the_planted_copies_are_flagged(scanned):
    t = pd.read_csv(scanned["dir"] / "scores.csv")
    flagged = set(t.loc[t["flagged"] == 1, "synthetic_path"])
    assert {"dicom_copies", "gen/copy_a.png", "gen/copy_b_hflip.png"} <= flagged
    assert (t.loc[t["synthetic_path"] == "dicom_copies", "flagged"] == 1).sum() == 3


# ----------------------------------------------------------------------------------------------
# no PHI
# ----------------------------------------------------------------------------------------------


def _texts_of(path: Path) -> list[bytes]:
    """The raw bytes of a file plus, for zip containers (npz), every member decompressed."""
    data = path.read_bytes()
    out = [data]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            out += [z.read(n) for n in z.namelist()]
        with np.load(path, allow_pickle=False) as z:
            out += [str(z[k]).encode() for k in z.files if z[k].dtype.kind == "U"]
    return out


def test_no_phi_in_any_file_the_tool_writes(scanned, cohorts, tmp_path, capsys):
    # the planted identifiers are really in the inputs ...
    raw = b"".join(p.read_bytes() for p in (cohorts["train"] / "mr_series").iterdir())
    assert PHI_NAME.encode() in raw and PHI_ID.encode() in raw
    audit_dir = tmp_path / "audit"
    shutil.copytree(scanned["dir"], audit_dir)
    db = audit_dir / "reviews.sqlite3"
    t = _flagged(audit_dir)
    for sha, p in zip(t["sha256"], t["synthetic_path"], strict=True):
        ReviewStore(db).record(_audit_id(audit_dir), sha, "copy", "Reviewer One", f"copy of {p}")
    out = tmp_path / "rep" / "report.html"
    code = main(
        ["report", "--audit", str(audit_dir), "--out", str(out), "--signer", "Officer", "--role", "privacy officer",
         "--decision", "do not release"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    # ... the DICOM series were read and attributed to a pseudonymous subject ...
    subjects = pd.read_csv(audit_dir / "subjects.csv")
    dicom_subject = [s for s in subjects["subject_id"] if s.startswith("sub-") and s not in ("sub-axial",)]
    assert len(dicom_subject) == 1
    written = sorted(p for p in [*audit_dir.rglob("*"), *out.parent.rglob("*")] if p.is_file())
    names = {p.name for p in written}
    assert {"scores.csv", "summary.json", "subjects.csv", "evidence.npz", "manifest.json", "report.html"} <= names
    # ... and neither identifier (in any usual rendering) is in anything written
    for p in written:
        for blob in _texts_of(p):
            for needle in (PHI_NAME, PHI_ID, PHI_NAME.upper(), "Jane Doe", "Doe, Jane"):
                assert needle.encode() not in blob, f"{needle!r} found in {p}"
    assert dicom_subject[0] in out.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# evidence and manifest
# ----------------------------------------------------------------------------------------------


def test_manifest_hashes_match_the_files_on_disk(scanned, cohorts):
    m = json.loads((scanned["dir"] / "manifest.json").read_text())
    for name in ("train", "synthetic", "holdout"):
        c = m["cohorts"][name]
        root = cohorts[name]  # the manifest holds the root only as the sha256 of its absolute path
        assert "root" not in c and c["root_sha256"] == hashlib.sha256(str(root).encode()).hexdigest()
        on_disk = sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "labels.csv"
        )
        assert [f["path"] for f in c["files"]] == on_disk
        for f in c["files"]:
            data = (root / f["path"]).read_bytes()
            assert f["sha256"] == hashlib.sha256(data).hexdigest()
            assert f["bytes"] == len(data)
        assert c["n_files"] == len(on_disk)
    # every file of a DICOM series folder is listed on its own
    train_files = [f["path"] for f in m["cohorts"]["train"]["files"]]
    assert [p for p in train_files if p.startswith("mr_series/")] == [f"mr_series/IM{k:04d}.dcm" for k in range(1, 10)]
    summary = json.loads((scanned["dir"] / "summary.json").read_text())
    for name in ("train", "synthetic", "holdout"):
        for key in ("n_slices", "n_subjects", "content_hash"):
            assert m["cohorts"][name][key] == summary["cohorts"][name][key]
    for name, digest in m["outputs"].items():
        assert sha256_file(scanned["dir"] / name) == digest
    outputs = {"scores.csv", "subjects.csv", "volumes.csv", "summary.json", "audit.npz", "evidence.npz"}
    assert set(m["outputs"]) == outputs
    assert m["extractor"]["name"] == "pixels" and m["extractor"]["fingerprint"] == summary["extractor_fingerprint"]
    assert m["config"] == summary["config"] and m["versions"]["inspector"]


def test_evidence_holds_the_pairs_the_result_shows(scanned):
    r = scanned["result"]
    with np.load(scanned["dir"] / "evidence.npz", allow_pickle=False) as z:
        ev = {k: z[k] for k in z.files}
    rows = ev["rows"]
    flagged = np.flatnonzero(r.table["flagged"].to_numpy() == 1)
    n_context = min(20, len(r.table) - len(flagged))
    assert sorted(rows[: len(flagged)]) == sorted(flagged) and len(rows) == len(flagged) + n_context
    assert ev["synthetic"].dtype == np.float16 and ev["synthetic"].shape == (len(rows), SIZE, SIZE)
    pairs = json.loads(str(ev["pairs_json"]))
    layers = json.loads(str(ev["layers_json"]))
    assert layers == r.layers
    k = min(r.config.top_k, 3)
    assert ev["neighbour_ref"].shape == (len(rows), len(layers), k)
    for j, row in enumerate(rows):
        p = r.pair(int(row), k=k)
        np.testing.assert_allclose(ev["synthetic"][j], p.synthetic, atol=1e-3)
        np.testing.assert_allclose(ev["aligned"][j], p.aligned, atol=1e-3)
        np.testing.assert_allclose(ev["difference"][j], p.difference, atol=1e-3)
        assert pairs[j]["row"] == int(row) and pairs[j]["sha256"] == r.table.at[int(row), "sha256"]
        for li, layer in enumerate(layers):
            for nb in pairs[j]["layers"][layer]:
                ref = ev["neighbour_ref"][j, li, nb["rank"]]
                want = p.layers[layer][nb["rank"]]
                assert nb["train_index"] == want["train_index"]
                np.testing.assert_allclose(ev["neighbour_images"][ref], want["image"], atol=1e-3)
    # float16, not 8 bit: a smooth ramp keeps more than 256 levels
    assert len(np.unique(ev["synthetic"])) > 256


def test_flipped_copy_neighbour_is_shown_in_the_matched_view(scanned):
    r = scanned["result"]
    row = int(np.flatnonzero(r.table["synthetic_path"].to_numpy() == "gen/copy_b_hflip.png")[0])
    with np.load(scanned["dir"] / "evidence.npz", allow_pickle=False) as z:
        j = int(np.flatnonzero(z["rows"] == row)[0])
        syn, aligned = z["synthetic"][j].astype(np.float32), z["aligned"][j].astype(np.float32)
        top = z["neighbour_images"][z["neighbour_ref"][j, 0, 0]].astype(np.float32)
    assert np.abs(syn - top).mean() < 0.01  # flipped back to the synthetic slice's view
    assert np.abs(syn - aligned).mean() < 0.01


def test_select_evidence_rows_order_and_bounds():
    t = pd.DataFrame(
        {
            "flagged": [0, 1, 0, 1, 1, 0, 0],
            "p_value": [0.5, 0.01, 0.3, 0.001, 0.01, 0.9, 0.2],
            "similarity": [0.7, 0.95, 0.8, 0.99, 0.97, 0.1, np.nan],
        }
    )
    # flagged by p then similarity, then unflagged by similarity (NaN last)
    np.testing.assert_array_equal(select_evidence_rows(t), [3, 4, 1, 2, 0, 5, 6])
    np.testing.assert_array_equal(select_evidence_rows(t, n_context=1), [3, 4, 1, 2])
    np.testing.assert_array_equal(select_evidence_rows(t, max_pairs=2), [3, 4])
    with pytest.raises(ValueError, match="max_pairs"):
        select_evidence_rows(t, max_pairs=-1)


def test_bounded_evidence_and_the_report_says_so(scanned, tmp_path):
    r = scanned["result"]
    d = tmp_path / "bounded"
    shutil.copytree(scanned["dir"], d)
    write_evidence(r, d, max_pairs=2, n_context=0)
    m = json.loads((d / "manifest.json").read_text())
    n_flagged = int(r.table["flagged"].sum())
    assert m["evidence"]["n_pairs"] == 2 and m["evidence"]["n_flagged_with_images"] == 2
    assert m["evidence"]["n_flagged"] == n_flagged > 2
    html = write_report(d, tmp_path / "b.html").read_text(encoding="utf-8")
    assert html.count("No images stored for this pair") == n_flagged - 2


# ----------------------------------------------------------------------------------------------
# the HTML
# ----------------------------------------------------------------------------------------------


def test_report_is_self_contained_and_shows_verdict_and_a_flagged_pair(audit_copy, tmp_path):
    out = write_report(audit_copy, tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    summary = json.loads((audit_copy / "summary.json").read_text())
    import html as _html

    assert _html.escape(summary["verdict_text"]) in text
    # nothing loaded from anywhere: no external src/href, no script, no stylesheet link, no @import
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"<script|<link|@import|url\(", text, re.I)
    assert "<iframe" not in text.lower()
    # every flagged pair is a section with embedded PNGs that decode to the audit's size
    flagged = _flagged(audit_copy)
    for row in flagged.index:
        m = re.search(rf'<section class="pair flagged" id="pair-{row}">(.*?)</section>', text, re.S)
        assert m, f"flagged pair {row} missing"
        uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', m.group(1))
        assert len(uris) >= 3
        img = Image.open(io.BytesIO(base64.b64decode(uris[0])))
        assert img.size == (SIZE, SIZE)
    assert "UNREVIEWED" in text and "Not signed off" in text
    # the histogram, the figures and the subjects table are there
    assert "<svg" in text and "Mann–Whitney AUC" in text and "ONI" in text and "CT-score" in text
    for s in pd.read_csv(audit_copy / "subjects.csv")["subject_id"]:
        assert f"<td>{s}</td>" in text


def test_report_opens_in_a_real_browser_offline(audit_copy, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium on this machine (make browser-deps)")
    out = write_report(audit_copy, tmp_path / "report.html")
    summary = json.loads((audit_copy / "summary.json").read_text())
    requests: list[str] = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            assert summary["verdict_text"] in page.inner_text(".verdict")
            first = page.locator("section.pair.flagged img").first
            assert first.evaluate("img => img.complete && img.naturalWidth") == SIZE
        finally:
            browser.close()
    assert [u for u in requests if not u.startswith(("data:", "file:"))] == []


def test_reviewer_decision_and_comment_appear_in_the_report(audit_copy, tmp_path):
    flagged = _flagged(audit_copy)
    row = flagged.index[0]
    comment = 'same slice as training <b>s031</b> & "identical"'
    ReviewStore(audit_copy / "reviews.sqlite3").record(
        _audit_id(audit_copy), flagged.at[row, "sha256"], "not a copy", "Dr Reviewer", "first look"
    )
    ReviewStore(audit_copy / "reviews.sqlite3").record(
        _audit_id(audit_copy), flagged.at[row, "sha256"], "near copy", "Dr Reviewer", comment
    )
    text = write_report(audit_copy, tmp_path / "r.html").read_text(encoding="utf-8")
    sec = re.search(rf'id="pair-{row}">(.*?)</section>', text, re.S).group(1)
    assert "Reviewer decision: <b>near copy</b> by Dr Reviewer" in sec
    assert "same slice as training &lt;b&gt;s031&lt;/b&gt; &amp; &quot;identical&quot;" in sec
    assert "first look" not in sec and "<b>s031</b>" not in text  # latest decision only, escaped
    unrev = re.search(r'id="unreviewed">(.*?)</h2>', text, re.S).group(1)
    assert f"({len(flagged) - 1})" in unrev
    s = json.loads((tmp_path / "r.summary.json").read_text())
    assert s["reviews"]["n_reviewed"] == 1 and s["reviews"]["decisions"]["near copy"] == 1
    # an explicit --reviews database is used instead of the default one
    other = tmp_path / "other.sqlite3"
    ReviewStore(other).record(_audit_id(audit_copy), flagged.at[row, "sha256"], "copy", "Someone Else", "other db")
    text2 = write_report(audit_copy, tmp_path / "r2.html", reviews=other).read_text(encoding="utf-8")
    assert "other db" in text2 and "Dr Reviewer" not in text2


# ----------------------------------------------------------------------------------------------
# sign-off
# ----------------------------------------------------------------------------------------------


def test_signoff_refused_while_flagged_pairs_are_unreviewed(audit_copy, tmp_path):
    n = len(_flagged(audit_copy))
    so = SignOff("Ada Officer", "privacy officer", "release")
    with pytest.raises(SignOffError, match=rf"{n} of {n} flagged pairs have no reviewer decision"):
        write_report(audit_copy, tmp_path / "r.html", signoff=so)
    assert not (tmp_path / "r.html").exists()
    assert ReviewStore(audit_copy / "reviews.sqlite3").signoffs(_audit_id(audit_copy)) == []
    # one decision recorded: still refused, the message counts the rest
    t = _flagged(audit_copy)
    ReviewStore(audit_copy / "reviews.sqlite3").record(_audit_id(audit_copy), t["sha256"].iloc[0], "copy", "R", "")
    with pytest.raises(SignOffError, match=rf"{n - 1} of {n} flagged pairs"):
        sign_off(audit_copy, so)


def test_signoff_accepted_with_a_reason(audit_copy, tmp_path):
    so = SignOff("Ada Officer", "privacy officer", "do not release", date="2026-01-31", reason="copies are obvious")
    out = write_report(audit_copy, tmp_path / "r.html", signoff=so)
    text = out.read_text(encoding="utf-8")
    block = text[text.index('id="signoff"') :]
    assert "Decision: <b>do not release</b>" in block and "Ada Officer" in block and "2026-01-31" in block
    assert "Reason: copies are obvious" in block
    n = len(_flagged(audit_copy))
    assert f"At signing, 0 of {n} flagged pairs had a reviewer decision." in block
    s = json.loads((tmp_path / "r.summary.json").read_text())
    assert s["signoff"]["decision"] == "do not release" and s["signoff"]["reason"] == "copies are obvious"
    # stored durably and append-only
    rows = ReviewStore(audit_copy / "reviews.sqlite3").signoffs(_audit_id(audit_copy))
    assert len(rows) == 1 and rows[0].signer == "Ada Officer"
    con = sqlite3.connect(audit_copy / "reviews.sqlite3")
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("UPDATE signoffs SET decision = 'release'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("DELETE FROM signoffs")
    finally:
        con.close()


def test_signoff_accepted_when_every_flagged_pair_is_reviewed(audit_copy, tmp_path):
    store = ReviewStore(audit_copy / "reviews.sqlite3")
    for sha in _flagged(audit_copy)["sha256"]:
        store.record(_audit_id(audit_copy), sha, "copy", "R", "")
    first = sign_off(audit_copy, SignOff("A", "privacy officer", "release after removing the flagged slices"))
    # every pair reviewed, but a plain release despite the copies (and a verdict of copying) needs a reason
    with pytest.raises(SignOffError, match="refused without a reason: .*judged copy or near copy"):
        sign_off(audit_copy, SignOff("B", "data steward", "release"))
    second = SignOff("B", "data steward", "release", date="2026-02-01", reason="copies removed upstream")
    text = write_report(audit_copy, tmp_path / "r.html", signoff=second).read_text(encoding="utf-8")
    n = len(_flagged(audit_copy))
    assert first.n_reviewed == first.n_flagged == n
    assert "Decision: <b>release</b>" in text and "1 earlier sign-off(s)" in text
    assert f"reviewers marked {n} flagged pair(s) as copies" in text  # release despite copies is called out
    assert "Every flagged pair has a reviewer decision." in text


def test_signoff_validation():
    with pytest.raises(SignOffError, match="decision"):
        SignOff("A", "officer", "ship it")
    with pytest.raises(SignOffError, match="signer"):
        SignOff("  ", "officer", "release")
    with pytest.raises(SignOffError, match="ISO date"):
        SignOff("A", "officer", "release", date="31/01/2026")
    assert SignOff("A", "officer", "release").date  # defaults to today
    # the CLI offers exactly the library's decisions
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    decision = next(a for a in sub.choices["report"]._actions if a.dest == "decision")
    assert tuple(decision.choices) == SIGNOFF_DECISIONS


def test_cli_signoff(audit_copy, tmp_path, capsys):
    out = tmp_path / "r.html"
    base = ["report", "--audit", str(audit_copy), "--out", str(out)]
    assert main([*base, "--signer", "A"]) == 2
    assert "missing --role, --decision" in capsys.readouterr().err
    assert main([*base, "--signer", "A", "--role", "officer", "--decision", "release"]) == 2
    err = capsys.readouterr().err
    assert "flagged pairs have no reviewer decision" in err and "Traceback" not in err
    assert not out.exists()
    code = main([*base, "--signer", "A", "--role", "officer", "--decision", "release", "--reason", "tested offline"])
    printed = capsys.readouterr().out
    assert code == 0 and "signed off: release by A (officer)" in printed
    assert "flagged pairs reviewed" in printed and "setting: alpha = 0.05; null: holdout" in printed
    assert "tested offline" in out.read_text(encoding="utf-8")


def _review_all(audit_dir: Path, decision: str = "not a copy", **setting) -> None:
    store = ReviewStore(audit_dir / "reviews.sqlite3")
    folder = load_audit_folder(audit_dir)
    if setting:
        folder = dataclasses.replace(folder, calibration=folder.calibration.at(**setting))
    for r in folder.flagged_rows():
        store.record(folder.audit_id, str(folder.table.at[int(r), "sha256"]), decision, "R", "")


def test_an_unreachable_setting_refuses_a_release_without_a_reason(audit_copy, tmp_path, capsys):
    # alpha below the smallest possible p-value 1/(1 + n_null): nothing can be flagged, so nothing is unreviewed
    folder = load_audit_folder(audit_copy)
    tiny = folder.calibration.min_p_value / 2
    out = tmp_path / "r.html"
    base = ["report", "--audit", str(audit_copy), "--out", str(out), "--alpha", f"{tiny:.6g}"]
    so = ["--signer", "A", "--role", "privacy officer", "--decision", "release"]
    assert main([*base, *so]) == 2
    err = capsys.readouterr().err
    assert "refused without a reason" in err and "the setting can flag a copy" in err and "no slice can be" in err
    assert not out.exists()
    # 'do not release' needs no reason; the report says why nothing is flagged
    assert main([*base, "--signer", "A", "--role", "privacy officer", "--decision", "do not release"]) == 0
    printed = capsys.readouterr().out
    assert "Nothing can be flagged at α =" in printed and "not met: the setting can flag a copy" in printed
    text = out.read_text(encoding="utf-8")
    assert "This setting cannot flag a copy." in text and 'class="verdict review"' in text
    # with a reason, a release is recorded and the reason shown
    assert main([*base, *so, "--reason", "the holdout is too small; released for a pilot only"]) == 0
    assert "released for a pilot only" in out.read_text(encoding="utf-8")
    s = json.loads((tmp_path / "r.summary.json").read_text())
    assert s["verdict"]["alpha_reachable"] is False and s["signoff"]["decision"] == "release"
    assert any(not c["ok"] and c["name"].startswith("the setting can flag") for c in s["checklist"])


def test_bh_with_a_null_too_small_refuses_a_release(audit_copy, tmp_path):
    folder = load_audit_folder(audit_copy)
    cal = folder.calibration
    # the largest alpha at which BH needs more than one slice and more than every flagged one
    alpha = next(a for a in (0.05, 0.02, 0.01, 0.005, 0.002) if cal.reachable(a) and cal.unflaggable(a, True))
    v = cal.verdict(alpha, True)
    assert v.n_flagged == 0 and not v.alpha_reachable and "Benjamini–Hochberg" in v.warning
    with pytest.raises(SignOffError, match="the setting can flag a copy"):
        write_report(audit_copy, tmp_path / "r.html", signoff=SignOff("A", "po", "release"), alpha=alpha, fdr=True)
    text = write_report(audit_copy, tmp_path / "r.html", alpha=alpha, fdr=True).read_text(encoding="utf-8")
    first = text[: text.index('id="verdict"')]  # the one-page summary
    assert "with Benjamini–Hochberg false-discovery-rate control" in first and "This setting cannot flag" in first


def test_per_subject_table_is_taken_at_the_reports_setting(audit_copy, tmp_path):
    folder = load_audit_folder(audit_copy)
    cal = folder.calibration
    # subjects.csv as written equals the table recomputed from the calibration at the audit's own setting
    on_disk = folder.subjects.sort_values("subject_id").reset_index(drop=True)
    again = folder.subjects_at().sort_values("subject_id").reset_index(drop=True)
    assert on_disk["n_flagged"].tolist() == again["n_flagged"].tolist()
    assert on_disk["flagged"].tolist() == again["flagged"].tolist()
    tiny = cal.min_p_value / 2  # nothing can be flagged: every subject count is 0 in the report
    assert cal.flags().sum() > 0
    text = write_report(audit_copy, tmp_path / "r.html", alpha=tiny).read_text(encoding="utf-8")
    part = text[text.index('id="subjects"') : text.index("</table>", text.index('id="subjects"'))]
    heads = re.findall(r"<th>([^<]*)</th>", part)
    col = heads.index("n_flagged")
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", part)[1:]]
    assert cells and all(c[col] == "0" for c in cells)
    assert f"α = {tiny:.4g}" in part


def test_the_release_checklist_names_what_refuses_a_release():
    from inspector.calibration import Calibration
    from inspector.folder import release_blockers, release_checklist

    rng = np.random.default_rng(1)
    sim, null = np.r_[rng.normal(size=80), np.full(20, 9.0)], rng.normal(size=400)
    v = Calibration(sim, null, null_kind="holdout", alpha=0.01).verdict()
    assert v.copying and v.alpha_reachable
    items = release_checklist(v, n_flagged=v.n_flagged, n_reviewed=v.n_flagged, n_copies=0)
    assert [c.ok for c in items] == [True, True, False, True, True]
    # every pair reviewed as "not a copy", yet the verdict says memorised: a plain release needs a reason
    assert release_blockers(items, "release") == [f"the dataset verdict does not say memorised: {v.copying_reason}"]
    assert release_blockers(items, "release after removing the flagged slices") == []
    assert release_blockers(items, "do not release") == []
    # unreviewed pairs refuse every decision; copies judged refuse a plain release
    items = release_checklist(v, n_flagged=20, n_reviewed=5, n_copies=3)
    assert len(release_blockers(items, "release")) == 3 and len(release_blockers(items, "do not release")) == 1
    # no holdout: nothing can be decided, so no release without a reason
    loso = Calibration(sim, null, null_kind="leave-one-subject-out").verdict()
    items = release_checklist(loso, n_flagged=0, n_reviewed=0)
    assert release_blockers(items, "release")[0].startswith("a calibrated null")


def test_the_report_starts_with_a_one_page_summary_and_prints_on_a4(audit_copy, tmp_path):
    text = write_report(audit_copy, tmp_path / "r.html").read_text(encoding="utf-8")
    summary = text[text.index('id="summary"') : text.index('id="verdict"')]
    for needle in ("Setting", "α = 0.05 per slice, without Benjamini–Hochberg", "null: holdout of", "Dataset test",
                   "Flagged slices", "Reviews", "Sign-off", "not signed off", "Release checklist"):  # fmt: skip
        assert needle in summary, needle
    assert text.index('id="summary"') < text.index('id="figures"') < text.index('id="flagged"')
    assert "page-break-after:always" in text and "table-layout:fixed" in text and "@page{size:A4" in text
    assert "&amp;lt;" not in text and "&amp;gt;" not in text and "ONI &lt; 0.68" in text  # escaped once


def test_two_reports_in_one_folder_keep_their_own_summaries(audit_copy, tmp_path):
    a = write_report(audit_copy, tmp_path / "a.html")
    b = write_report(audit_copy, tmp_path / "b.html", alpha=0.2)
    sa, sb = (json.loads(summary_path_for(p).read_text()) for p in (a, b))
    assert sa["report"]["file"] == "a.html" and sb["report"]["file"] == "b.html"
    assert sa["verdict"]["alpha"] == 0.05 and sb["verdict"]["alpha"] == 0.2
    assert not (tmp_path / "summary.json").exists()


def test_cli_report_bad_inputs_exit_2(audit_copy, tmp_path, capsys):
    assert main(["report", "--audit", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    base = ["report", "--audit", str(audit_copy), "--out", str(tmp_path / "r.html")]
    assert main([*base, "--reviews", str(tmp_path / "x.db")]) == 2
    assert "Review database" in capsys.readouterr().err
    (tmp_path / "junk.db").write_text("not sqlite")
    assert main([*base, "--reviews", str(tmp_path / "junk.db")]) == 2
    assert "not a usable review database" in capsys.readouterr().err
    assert main([*base[:-1], str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()
    (audit_copy / "scores.csv").unlink()
    with pytest.raises(AuditFolderError, match="scores.csv"):
        write_report(audit_copy, tmp_path / "r.html")


# ----------------------------------------------------------------------------------------------
# summary.json and its schema
# ----------------------------------------------------------------------------------------------


def test_summary_json_validates_and_invalid_ones_fail(audit_copy, tmp_path):
    write_report(audit_copy, tmp_path / "r.html")
    s = json.loads((tmp_path / "r.summary.json").read_text())
    validate_summary(s)
    validate_summary(json.loads((audit_copy / "summary.json").read_text()))  # the audit's own too
    assert s["reviews"]["n_flagged"] == len(_flagged(audit_copy)) and s["signoff"] is None
    assert s["report"]["file"] == "r.html" and s["integrity"]["ok"] is True
    for mutate, where in [
        (lambda d: d["verdict"].__setitem__("n_flagged", "three"), "verdict/n_flagged"),
        (lambda d: d.pop("verdict"), "(top level)"),
        (lambda d: d["config"].__setitem__("alpha", 1.5), "config/alpha"),
        (lambda d: d["config"].__setitem__("surprise", 1), "config"),
        (lambda d: d.__setitem__("signoff", {"decision": "ship it"}), "signoff"),
        (lambda d: d["report"].__setitem__("sha256", "abc"), "report/sha256"),
        (lambda d: d["cohorts"].__setitem__("holdout", {"n_slices": -1}), "cohorts/holdout"),
    ]:
        bad = json.loads(json.dumps(s))
        mutate(bad)
        with pytest.raises(SummaryValidationError, match=re.escape(where)):
            validate_summary(bad)


def test_schema_describes_the_real_keys(scanned):
    schema = load_summary_schema()
    defs = schema["$defs"]
    assert set(defs["config"]["properties"]) == {f.name for f in dataclasses.fields(AuditConfig)}
    assert set(defs["config"]["required"]) == {f.name for f in dataclasses.fields(AuditConfig)}
    verdict = scanned["result"].verdict.to_dict()
    assert set(defs["verdict"]["required"]) <= set(verdict) <= set(defs["verdict"]["properties"])
    summary = scanned["result"].summary()
    assert set(schema["required"]) == set(summary)
    assert set(defs["cohort"]["required"]) == set(summary["cohorts"]["train"])
    extra = set(scanned["result"].baselines) - set(defs["baselines"]["properties"])
    assert all(k.endswith(("_error", "_note")) for k in extra), extra


def test_summary_beside_html_never_overwrites_the_audits_own(audit_copy):
    before = (audit_copy / "summary.json").read_bytes()
    out = write_report(audit_copy, audit_copy / "report.html")
    assert (audit_copy / "summary.json").read_bytes() == before
    assert summary_path_for(out, audit_copy) == audit_copy / "report.summary.json"
    validate_summary(json.loads((audit_copy / "report.summary.json").read_text()))
    assert load_audit_folder(audit_copy).intact


def test_modified_audit_folder_is_reported(audit_copy, tmp_path):
    with open(audit_copy / "scores.csv", "a") as f:
        f.write("\n")
    text = write_report(audit_copy, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "The audit folder was modified after the scan (scores.csv)" in text
    s = json.loads((tmp_path / "r.summary.json").read_text())
    assert s["integrity"] == {"ok": False, "checked": s["integrity"]["checked"], "modified": ["scores.csv"]}


# ----------------------------------------------------------------------------------------------
# the report's own hash
# ----------------------------------------------------------------------------------------------


def test_report_hash_verifies_and_detects_changes(audit_copy, tmp_path):
    out = write_report(audit_copy, tmp_path / "r.html")
    assert verify_report(out)
    stated = re.search(r'id="report-sha256">([0-9a-f]{64})<', out.read_text(encoding="utf-8")).group(1)
    assert json.loads((tmp_path / "r.summary.json").read_text())["report"]["sha256"] == stated
    # the rule stated in the report, done by hand
    data = out.read_bytes().replace(stated.encode(), b"0" * 64)
    assert hashlib.sha256(data).hexdigest() == stated
    tampered = tmp_path / "t.html"
    tampered.write_bytes(out.read_bytes().replace(b"Flagged pairs", b"Flagged pears", 1))
    assert not verify_report(tampered)
    (tmp_path / "x.html").write_text("<html></html>")
    with pytest.raises(ValueError, match="hash marker"):
        verify_report(tmp_path / "x.html")


def test_the_stated_shell_command_verifies(audit_copy, tmp_path):
    if not (shutil.which("sed") and shutil.which("sha256sum")):
        pytest.skip("needs sed and sha256sum")
    out = write_report(audit_copy, tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    import html as _html

    cmd = _html.unescape(re.search(r"<code>(sed -E .*? report\.html \| sha256sum)</code>", text).group(1))
    res = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True)  # noqa: S602
    stated = re.search(r'id="report-sha256">([0-9a-f]{64})<', text).group(1)
    assert res.stdout.split()[0] == stated


# ----------------------------------------------------------------------------------------------
# the SVG histogram
# ----------------------------------------------------------------------------------------------


def _polygon_areas(svg: str) -> list[float]:
    areas = []
    for pts in re.findall(r'<polygon points="([^"]+)"', svg):
        xy = np.array([[float(v) for v in p.split(",")] for p in pts.split()])
        x, y = xy[:, 0], xy[:, 1]
        areas.append(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return areas


def test_svg_histogram_draws_densities_and_escapes_text():
    rng = np.random.default_rng(0)
    svg = svg_histogram(
        [("small <n>", rng.normal(0, 1, 50), "#f00"), ("large", rng.normal(1, 0.5, 5000), "#00f")],
        markers=[(1.5, "thr & more", "#000"), (float("inf"), "never drawn", "#000")],
        bins=30,
    )
    a, b = _polygon_areas(svg)
    np.testing.assert_allclose(a, b, rtol=1e-3)  # both normalised to area 1, whatever their size
    assert "small &lt;n&gt; (n = 50)" in svg and "thr &amp; more" in svg and "never drawn" not in svg
    assert "<n>" not in svg
    # degenerate inputs still draw
    assert svg_histogram([("one value", [2.0, 2.0], "#000")]).startswith("<svg")
    assert svg_histogram([("empty", [], "#000")], markers=[(0.5, "m", "#000")]).endswith("</svg>")
    with pytest.raises(ValueError, match="bins"):
        svg_histogram([("x", [1.0], "#000")], bins=0)


def test_report_has_the_per_layer_panel_and_the_roc_where_labels_exist(audit_cohorts, tmp_path):
    # the conftest cohort has labels.csv (planted copies and novel slices): the ROC of ours and the paper's
    from inspector import ui
    from inspector.folder import save_audit
    from inspector.pipeline import audit

    p = audit_cohorts
    res = audit(p["train"], p["synthetic"], p["holdout"], AuditConfig(extractor="pixels", alpha=0.05),
                cache_dir=tmp_path / "cache")  # fmt: skip
    folder = save_audit(res, tmp_path / "audit")
    text = write_report(folder, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="research"' in text and 'class="hist roc"' in text and 'class="hist layers"' in text
    loaded = load_audit_folder(folder)
    curves = ui.roc_curves(loaded.table)
    assert [c["column"] for c in curves] == ["similarity", "mi_z"]
    for c in curves:  # the legend states the same AUC as the app's Research page
        assert f"AUC {c['auc']:.3f} over {c['n']} labelled slices" in text
    summary = ui.layer_summary(loaded.table, res.layers, loaded.calibration.flags())
    for _, row in summary.iterrows():
        assert f"<td>{row['layer']}</td>" in text
    # without labels: the panel, no ROC, said in words
    t = loaded.table.drop(columns=["label"])
    assert ui.roc_curves(t) == []


def test_svg_roc_and_layers_reference_points_and_escaping():
    c = {"name": "<ours>", "fpr": np.array([0.0, 0.0, 0.5, 1.0]), "tpr": np.array([0.0, 0.5, 1.0, 1.0]),
         "auc": 0.875, "n": 8}  # fmt: skip
    svg = svg_roc([c], width=152, height=160)
    assert "&lt;ours&gt;: AUC 0.875 over 8 labelled slices" in svg and "<ours>" not in svg
    pts = re.search(r'<polyline points="([^"]+)"', svg).group(1).split()
    xy = np.array([[float(v) for v in q.split(",")] for q in pts])
    # plot area: x from 52 over 84 px, y from 12 over (160 - 12 - 62) = 86 px; a step goes right, then up
    ref = [(0, 0), (0, 0), (0, 0.5), (0.5, 0.5), (0.5, 1), (1, 1), (1, 1)]
    assert_allclose(xy, [(52 + 84 * x, 12 + (1 - y) * 86) for x, y in ref], atol=0.06)
    table = pd.DataFrame({"sim_a": [0.1, 0.2, 0.9, 0.8], "sim_b<": [0.3, 0.3, 0.7, 0.6]})
    svg = svg_layers(table, ["a", "b<"], np.array([False, False, True, True]))
    assert svg.count("<circle") == 4 + 2 and "b&lt;" in svg and "(n=2)" in svg
