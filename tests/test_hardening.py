"""Issue 14 (hardening), the CLI / audit-folder / store / app parts: one test per case of the issue's list.

Test names carry the issue's item numbers: 1 skipped training files and the gate, 3 self-contamination, 5 option
bounds, 6 a held write lock, 7 late or wrong validation, 8 mixed audit folders, 9 the app's privacy options.
(Items 2, 4 and 5's readers are the readers' tests.) Cohorts are real MRI slices (nilearn's MNI152 template,
offline) from ``conftest.make_audit_cohorts``; the extractor is ``pixels`` at 64 px, so each scan takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import inspector.pipeline as pipeline
import inspector.review as review
from inspector.cli import main
from inspector.config import AuditConfig, ConfigError
from inspector.folder import (
    MixedAuditFolderError,
    OutputFolderError,
    check_output_folder,
    load_audit_folder,
    save_audit,
    validate_summary,
)
from inspector.result import MissingEvidenceError, is_missing_evidence
from inspector.review import ReviewStore, ReviewStoreBusyError
from inspector.types import SkippedFile

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _scan(cohorts: dict[str, Path], out: Path, *extra: str, train: Path | None = None, synthetic: Path | None = None,
          holdout: Path | None | bool = True) -> int:  # fmt: skip
    args = [
        "scan",
        "--train", str(train or cohorts["train"]),
        "--synthetic", str(synthetic or cohorts["synthetic"]),
        "--extractor", "pixels",
        "--size", "64",
        "--alpha", "0.05",
        "--quiet",
        "--cache-dir", str(out.parent / "cache"),
        "--out", str(out),
    ]  # fmt: skip
    if holdout is True:
        args += ["--holdout", str(cohorts["holdout"])]
    elif holdout:
        args += ["--holdout", str(holdout)]
    return main([*args, *extra])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def never_loads(monkeypatch):
    """Fail (exit 3 in the CLI) if anything is loaded or computed: the check must come first."""

    def boom(*a, **kw):
        raise AssertionError("the data was loaded before the check")

    monkeypatch.setattr(pipeline, "load_cohort", boom)


@pytest.fixture(scope="module")
def scanned(audit_cohorts, tmp_path_factory) -> dict:
    """One real audit through the CLI (with a holdout); its AuditResult is captured."""
    captured = {}
    real = pipeline.audit

    def capture(*a, **kw):
        captured["result"] = real(*a, **kw)
        return captured["result"]

    out = tmp_path_factory.mktemp("hard") / "audit"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "audit", capture)
        assert _scan(audit_cohorts, out) == 0
    return {"dir": out, "result": captured["result"]}


# ----------------------------------------------------------------------------------------------
# 1. skipped training files are missing evidence
# ----------------------------------------------------------------------------------------------


def test_item1_an_unreadable_training_file_makes_the_scan_refuse_naming_it(audit_cohorts, tmp_path, capsys):
    train = _copy(audit_cohorts["train"], tmp_path / "train")
    (train / "sub-axial" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but truncated")
    out = tmp_path / "out"
    code = _scan(audit_cohorts, out, "--fail-on", "flagged", train=train)
    err = capsys.readouterr().err
    assert code == 2, err  # was 0: the gate passed on a silently smaller training set
    assert "1 training file was skipped: missing evidence" in err
    assert "sub-axial/broken.png:" in err and "--allow-skipped" in err and "Traceback" not in err
    assert not out.exists()


def test_item1_an_unreadable_holdout_file_refuses_too(audit_cohorts, tmp_path, capsys):
    holdout = _copy(audit_cohorts["holdout"], tmp_path / "holdout")
    (holdout / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    code = _scan(audit_cohorts, tmp_path / "out", holdout=holdout)
    err = capsys.readouterr().err
    assert code == 2 and "1 holdout file was skipped: missing evidence" in err and "bad.nii.gz" in err


def test_item1_every_skipped_file_is_named_with_its_reason(audit_cohorts, tmp_path):
    train = _copy(audit_cohorts["train"], tmp_path / "train")
    holdout = _copy(audit_cohorts["holdout"], tmp_path / "holdout")
    for k in range(3):
        (train / "sub-coronal" / f"bad{k}.png").write_bytes(b"garbage")
    (holdout / "scan.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 10)
    with pytest.raises(MissingEvidenceError) as e:
        pipeline.load_inputs(train, audit_cohorts["synthetic"], holdout, AuditConfig(extractor="pixels", size=64))
    assert sorted(sk.path for sk in e.value.skipped["train"]) == [f"sub-coronal/bad{k}.png" for k in range(3)]
    assert [sk.path for sk in e.value.skipped["holdout"]] == ["scan.dcm"]
    assert all(sk.reason for _, sk in e.value.files)
    assert str(e.value).startswith("3 training files and 1 holdout file were skipped: missing evidence")
    assert isinstance(e.value, ValueError)


def test_item1_allow_skipped_records_the_files_in_summary_verdict_and_report(audit_cohorts, tmp_path, capsys):
    from inspector.report import summary_path_for, write_report

    train = _copy(audit_cohorts["train"], tmp_path / "train")
    (train / "sub-axial" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = _scan(audit_cohorts, out, "--allow-skipped", "--show-paths", train=train)  # real names: to find them
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "1 training file was skipped: missing evidence" in cap.out  # the verdict on stdout says so
    assert "sub-axial/broken.png" in cap.err
    s = json.loads((out / "summary.json").read_text())
    validate_summary(s)
    assert s["config"]["allow_skipped"] is True
    c = s["cohorts"]["train"]
    assert c["n_missing_evidence"] == 1
    assert [r["path"] for r in c["skipped"] if r["missing_evidence"]] == ["sub-axial/broken.png"]
    assert "1 training file was skipped: missing evidence" in s["verdict_text"]
    html = write_report(out, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Missing evidence." in html and "sub-axial/broken.png" in html and "--allow-skipped" in html
    rs = json.loads(summary_path_for(tmp_path / "report.html", out).read_text())
    validate_summary(rs)
    assert "missing evidence" in rs["verdict_text"]


def test_item1_the_gate_fails_on_missing_evidence_unless_allowed(audit_cohorts, tmp_path, monkeypatch, capsys):
    """Defence in depth: an audit that kept going with skipped training files (here forced past load_inputs)
    fails the gate when the user did not pass --allow-skipped."""
    train = _copy(audit_cohorts["train"], tmp_path / "train")
    (train / "sub-axial" / "broken.png").write_bytes(b"not a png")
    real = pipeline.audit
    monkeypatch.setattr(pipeline, "audit", lambda *a, config, **kw: real(*a, config=config.replace(allow_skipped=True),
                                                                           **kw))  # fmt: skip
    code = _scan(audit_cohorts, tmp_path / "out", "--fail-on", "verdict", train=train)
    err = capsys.readouterr().err
    assert code == 1 and "GATE FAILED (--fail-on verdict): missing evidence: 1 training/holdout file(s)" in err


def test_item1_an_unreadable_synthetic_file_is_reported_not_refused(audit_cohorts, tmp_path, capsys):
    syn = _copy(audit_cohorts["synthetic"], tmp_path / "synthetic")
    (syn / "gen" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = _scan(audit_cohorts, out, "--show-paths", synthetic=syn)  # real names: to find the file's
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "1 synthetic file(s) skipped, not audited" in cap.err and "gen/broken.png" in cap.err
    s = json.loads((out / "summary.json").read_text())
    assert s["cohorts"]["synthetic"]["n_missing_evidence"] == 1 and "not audited" in s["verdict_text"]


def test_item1_sidecars_notes_and_empty_images_are_not_missing_evidence(audit_cohorts, tmp_path, capsys):
    train = _copy(audit_cohorts["train"], tmp_path / "train")
    (train / "README").write_text("training set")
    (train / "dataset_description.json").write_text("{}")
    (train / "sub-axial" / "notes.txt").write_text("scanner A")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(train / "sub-axial" / "blank.png")  # constant
    dot = np.zeros((64, 64), np.uint8)
    dot[30, 30] = 255
    Image.fromarray(dot).save(train / "sub-axial" / "dot.png")  # background-only
    code = _scan(audit_cohorts, tmp_path / "out", train=train)
    assert code == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["cohorts"]["train"]["n_missing_evidence"] == 0 and s["cohorts"]["train"]["n_skipped"] >= 5


@pytest.mark.parametrize(
    ("path", "reason", "missing"),
    [
        ("a.dcm", "corrupt or unreadable DICOM file: JPEG-LS transfer syntax has no decoder", True),
        ("a.png", "corrupt or unreadable image file: truncated", True),
        ("fifo.png", "not a regular file (a FIFO)", True),
        ("big.npz", "over the byte budget of 2 GB: 3.2 GB; skipped before decoding", True),
        ("slow.dcm", "reading it as DICOM: no result within 60 s", True),
        ("x.png", "listed in manifest m.csv (row 3) but not found", True),
        ("m.csv:row4", "manifest row with an empty path", True),
        ("v#3", "duplicate slice key (another source maps to the same path#index)", True),
        ("scan", "unsupported format (no extension, no DICM preamble); supported: ...", True),
        ("scan.jp2", "unsupported format (.jp2); supported: ...", True),
        ("v.nii.gz#0", "background-only slice (foreground fraction 0.001 < 0.02)", False),
        ("blank.png", "constant image: all pixels equal", False),
        ("vol.nii", "constant volume: all voxels equal", False),
        ("a.png", "listed more than once in manifest m.csv (row 9 ignored)", False),
        ("sub-01_T1w.json", "unsupported format (.json); supported: ...", False),
        ("participants.tsv", "unsupported format (.tsv); supported: ...", False),
        ("README", "unsupported format (no extension, no DICM preamble); supported: ...", False),
        ("audit/audit.npz", "output of an earlier audit (the audit folder 'audit/' inside this input root)", False),
        ("x", "a reason no one has written yet", True),
    ],
)
def test_item1_which_skips_are_missing_evidence(path, reason, missing):
    assert is_missing_evidence(SkippedFile(path, reason)) is missing


# ----------------------------------------------------------------------------------------------
# 3. self-contamination
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["train", "synthetic", "holdout"])
def test_item3_out_inside_an_input_root_is_refused_before_loading(audit_cohorts, never_loads, capsys, which):
    out = audit_cohorts[which] / "audit"
    code = _scan(audit_cohorts, out)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--out {out} is inside the" in err and str(audit_cohorts[which]) in err and "outside" in err
    assert not out.exists()


def test_item3_out_holding_an_input_is_refused(audit_cohorts, never_loads, capsys):
    code = _scan(audit_cohorts, audit_cohorts["train"].parent)
    err = capsys.readouterr().err
    assert code == 2 and "holds the training input" in err


def test_item3_an_audit_folder_inside_an_input_root_is_never_read_as_images(scanned, audit_cohorts, tmp_path):
    cfg = AuditConfig(extractor="pixels", size=64)
    clean = pipeline.load_inputs(audit_cohorts["train"], audit_cohorts["synthetic"], audit_cohorts["holdout"], cfg)
    train = _copy(audit_cohorts["train"], tmp_path / "train")
    shutil.copytree(scanned["dir"], train / "old_audit")
    syn = _copy(audit_cohorts["synthetic"], tmp_path / "synthetic")
    shutil.copy(scanned["dir"] / "evidence.npz", syn / "evidence.npz")  # alone, without its folder
    got = pipeline.load_inputs(train, syn, audit_cohorts["holdout"], cfg)
    assert len(got.train) == len(clean.train) and len(got.synthetic) == len(clean.synthetic)
    assert not any(s.path.startswith("old_audit/") for s in got.train)
    own = {sk.path: sk.reason for sk in got.train.skipped if "earlier audit" in sk.reason}
    assert set(own) == {"old_audit/audit.npz", "old_audit/evidence.npz"}
    assert any(sk.path == "evidence.npz" and "earlier audit" in sk.reason for sk in got.synthetic.skipped)
    assert not any(f.path.startswith("old_audit/") for f in got.train.files)


# ----------------------------------------------------------------------------------------------
# 5 and 7. options checked before loading, with their names and bounds
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--size", "100000"], "bad option --size: size must be <= 1024"),
        (["--size", "8"], "bad option --size: size must be >= 16"),
        (["--align-size", "5000"], "bad option --align-size"),
        (["--seed", "-1"], "bad option --seed: seed must be >= 0"),
        (["--seed", str(2**40)], "bad option --seed"),
        (["--top-k", "0"], "bad option --top-k"),
        (["--shortlist", "1000000"], "bad option --shortlist"),
        (["--n-bootstrap", "0"], "bad option --n-bootstrap"),
        (["--max-flagged", "-1"], "bad option --max-flagged: must be >= 0"),
        (["--views", "hflip"], "bad option --views"),
        (["--alpha", "0"], "bad option --alpha"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_item5_item7_bad_options_exit_2_naming_the_option_before_loading(audit_cohorts, tmp_path, never_loads,
                                                                         capsys, extra, words):  # fmt: skip
    code = _scan(audit_cohorts, tmp_path / "out", *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and "Traceback" not in err


def test_item7_out_naming_an_existing_file_exits_2_at_once(audit_cohorts, tmp_path, never_loads, capsys):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    t0 = time.perf_counter()
    code = _scan(audit_cohorts, f)
    err = capsys.readouterr().err
    assert code == 2, err  # was 3, after the whole audit
    assert f"--out {f} is an existing file" in err and time.perf_counter() - t0 < 10
    assert f.read_text() == "keep me"


def test_item7_out_naming_a_folder_of_other_files_is_refused(audit_cohorts, tmp_path, never_loads, capsys):
    d = tmp_path / "documents"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.docx").write_text("keep me")
    code = _scan(audit_cohorts, d)
    err = capsys.readouterr().err
    assert code == 2 and "not part of an audit folder" in err and "thesis.docx" in err
    assert (d / "thesis.docx").read_text() == "keep me"


def test_item7_cuda_without_cuda_exits_2_before_loading(audit_cohorts, tmp_path, never_loads, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = _scan(audit_cohorts, tmp_path / "out", "--device", "cuda")
    err = capsys.readouterr().err
    assert code == 2, err  # was 3 (internal error)
    assert "bad option --device" in err and "CUDA is not available" in err


def test_item7_mri_core_without_a_checkpoint_exits_2_before_loading(audit_cohorts, tmp_path, never_loads,
                                                                    monkeypatch, capsys):  # fmt: skip
    monkeypatch.delenv("INSPECTOR_MRI_CORE_CHECKPOINT", raising=False)
    assert _scan(audit_cohorts, tmp_path / "out", "--extractor", "mri-core") == 2
    assert "bad option --checkpoint" in capsys.readouterr().err
    code = _scan(audit_cohorts, tmp_path / "out", "--extractor", "mri-core", "--checkpoint", str(tmp_path / "no.pth"))
    assert code == 2 and "is not a file" in capsys.readouterr().err
    assert _scan(audit_cohorts, tmp_path / "out", "--checkpoint", str(tmp_path / "x.pth")) == 2
    assert "checkpoints are for extractor='mri-core'" in capsys.readouterr().err


def test_item7_a_missing_holdout_is_reported_before_the_training_set_is_loaded(audit_cohorts, tmp_path, never_loads,
                                                                               capsys):  # fmt: skip
    code = _scan(audit_cohorts, tmp_path / "out", holdout=tmp_path / "no_holdout")
    err = capsys.readouterr().err
    assert code == 2 and "--holdout" in err and "does not exist" in err


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("path,label\ngen/copy_000.png,copy\ngen/novel_000.png,maybe\n", 3, "label 'maybe' is not one of"),
        ("path,label\ngen/copy_000.png,copy,extra,fields\n", 2, "4 fields, the header has 2"),
        ("path,label\n,copy\n", 2, "empty path"),
        ("path,label\ngen/copy_000.png,copy\n\ngen/copy_000.png,novel\n", 4, "listed again (first on line 2)"),
        ("file,truth\ngen/copy_000.png,copy\n", 1, "lacks column(s) ['path', 'label']"),
        ("path,label\ngen/c\xe9.png,copy\n", 2, "not UTF-8"),
        ("", 1, "the file is empty"),
        ('path,label\n"gen/copy_000.png,copy\n', 2, "not valid CSV"),
    ],
)
def test_item7_a_malformed_labels_csv_exits_2_naming_file_and_line_before_loading(audit_cohorts, tmp_path,
                                                                                  never_loads, capsys, text, line,
                                                                                  words):  # fmt: skip
    syn = _copy(audit_cohorts["synthetic"], tmp_path / "synthetic")
    (syn / "labels.csv").write_bytes(text.encode("latin-1"))
    code = _scan(audit_cohorts, tmp_path / "out", synthetic=syn)
    err = capsys.readouterr().err
    assert code == 2, err  # was: an error after the whole computation, without the line
    assert f"{syn / 'labels.csv'} line {line}:" in err and words in err


def test_item7_a_single_training_subject_without_holdout_fails_before_extraction(audit_cohorts, tmp_path,
                                                                                 monkeypatch, capsys):  # fmt: skip
    one = tmp_path / "one"
    shutil.copytree(audit_cohorts["train"] / "sub-axial", one / "sub-axial")

    def no_extraction(*a, **kw):
        raise AssertionError("features were extracted before the check")

    monkeypatch.setattr(pipeline, "extract_features", no_extraction)
    code = _scan(audit_cohorts, tmp_path / "out", train=one, holdout=None)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "single subject" in err and "--holdout" in err


def test_item7_the_python_api_checks_types_and_bounds():
    cases = [({"size": "64"}, "size"), ({"top_k": True}, "top_k"), ({"seed": -1}, "seed"), ({"size": 4096}, "size"),
             ({"alpha": float("nan")}, "alpha"), ({"fdr": "yes"}, "fdr")]  # fmt: skip
    for kw, field in cases:
        with pytest.raises(ConfigError) as e:
            AuditConfig(**kw)
        assert e.value.field == field and e.value.flag == "--" + field.replace("_", "-")
    assert AuditConfig(size=np.int64(64), layers=["a"]).layers == ("a",)  # numpy ints and lists still accepted


# ----------------------------------------------------------------------------------------------
# 6. a held write lock on the review database
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def held_lock(tmp_path, monkeypatch):
    """A review database whose write lock another connection holds (BEGIN IMMEDIATE); the store waits 0.3 s."""
    monkeypatch.setattr(review, "DEFAULT_TIMEOUT_S", 0.3)
    db = tmp_path / "reviews.sqlite3"
    ReviewStore(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO reviews (audit_id, slice_sha256, decision, reviewer, created_at) "
                   "VALUES ('other', 'h', 'copy', 'someone else', 'now')")  # fmt: skip
    yield db, holder
    holder.close()


def test_item6_a_held_write_lock_is_a_clear_busy_error_not_a_raw_sqlite_error(held_lock):
    db, holder = held_lock
    store = ReviewStore(db)  # opening needs no write lock
    assert store.latest("a") == {}  # reading neither
    t0 = time.perf_counter()
    with pytest.raises(ReviewStoreBusyError) as e:
        store.record("a", "h1", "copy", "Dr Lock", "same slice")
    assert time.perf_counter() - t0 < 5
    assert not isinstance(e.value, sqlite3.Error) and isinstance(e.value, review.ReviewError)
    msg = str(e.value)
    assert "busy" in msg and "more than 0.3 s" in msg and "nothing was written" in msg and "retry" in msg
    with pytest.raises(ReviewStoreBusyError):
        store.record_signoff("a", review.SignOff("A", "officer", "release"), n_flagged=0, n_reviewed=0)
    holder.execute("ROLLBACK")
    saved = store.record("a", "h1", "copy", "Dr Lock", "same slice")  # the retry
    assert [r.id for r in store.history("a", "h1")] == [saved.id]  # exactly once, nothing half-written


def test_item6_a_sign_off_on_a_locked_database_exits_2_with_the_message(scanned, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(review, "DEFAULT_TIMEOUT_S", 0.3)
    audit = _copy(scanned["dir"], tmp_path / "audit")
    db = audit / "reviews.sqlite3"
    ReviewStore(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        code = main(["report", "--audit", str(audit), "--out", str(tmp_path / "r.html"), "--signer", "A", "--role",
                     "officer", "--decision", "release", "--reason", "tested"])  # fmt: skip
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert code == 2, err
    assert "is busy" in err and "OperationalError" not in err
    assert ReviewStore(db).signoffs(scanned["result"].audit_id) == []


# ----------------------------------------------------------------------------------------------
# 8. the audit folder: one audit, written as a whole
# ----------------------------------------------------------------------------------------------


def test_item8_every_file_carries_the_audit_id(scanned):
    d, aid = scanned["dir"], scanned["result"].audit_id
    assert set(pd.read_csv(d / "scores.csv")["audit_id"]) == {aid}
    assert set(pd.read_csv(d / "subjects.csv")["audit_id"]) == {aid}
    for name in ("audit.npz", "evidence.npz"):
        with np.load(d / name) as z:
            assert str(z["audit_id"]) == aid
    for name in ("summary.json", "manifest.json"):
        assert json.loads((d / name).read_text())["audit_id"] == aid
    folder = load_audit_folder(d)
    assert "audit_id" not in folder.table.columns and len(folder.table) == len(scanned["result"].table)


def _other_audit(scanned, tmp_path: Path) -> Path:
    other = dataclasses.replace(scanned["result"], audit_id="b" * 64)
    return save_audit(other, tmp_path / "other")


@pytest.mark.parametrize("name", ["scores.csv", "subjects.csv", "audit.npz", "evidence.npz", "manifest.json"])
def test_item8_a_mixed_folder_is_refused_by_load_and_report(scanned, tmp_path, capsys, name):
    mixed = _copy(scanned["dir"], tmp_path / "mixed")
    shutil.copy(_other_audit(scanned, tmp_path) / name, mixed / name)
    with pytest.raises(MixedAuditFolderError, match=name.replace(".", r"\.")):
        load_audit_folder(mixed)
    code = main(["report", "--audit", str(mixed), "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "mixes files of different audits" in err and name in err  # was 0: a self-contradicting report
    assert not (tmp_path / "r.html").exists()


def test_item8_a_file_without_the_audit_id_beside_files_with_it_is_refused(scanned, tmp_path):
    mixed = _copy(scanned["dir"], tmp_path / "mixed")
    t = pd.read_csv(mixed / "scores.csv").drop(columns=["audit_id"])
    t.to_csv(mixed / "scores.csv", index=False)
    with pytest.raises(MixedAuditFolderError, match=r"scores\.csv: none"):
        load_audit_folder(mixed)


def test_item8_save_replaces_a_folder_as_a_whole_and_keeps_the_reviews(scanned, tmp_path):
    out = _copy(scanned["dir"], tmp_path / "out")
    store = ReviewStore(out / "reviews.sqlite3")
    store.record(scanned["result"].audit_id, "h", "copy", "Dr Keep")
    (out / "report.html").write_text("<html>an earlier report</html>")
    other = dataclasses.replace(scanned["result"], audit_id="c" * 64)
    save_audit(other, out)
    assert load_audit_folder(out).audit_id == "c" * 64  # every file of the new audit
    assert ReviewStore(out / "reviews.sqlite3").latest(scanned["result"].audit_id)["h"].reviewer == "Dr Keep"
    assert (out / "report.html").read_text() == "<html>an earlier report</html>"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    save_audit(scanned["result"], out)  # the same audit again
    assert load_audit_folder(out).audit_id == scanned["result"].audit_id


def test_item8_a_crash_while_saving_leaves_the_old_folder_complete(scanned, tmp_path, monkeypatch):
    import inspector.folder as folder_mod

    out = _copy(scanned["dir"], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(folder_mod, "write_evidence", crash)
    with pytest.raises(OSError, match="disk full"):
        save_audit(dataclasses.replace(scanned["result"], audit_id="d" * 64), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_audit_folder(out).audit_id == scanned["result"].audit_id
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_item8_save_refuses_a_folder_inside_an_input_root(scanned):
    r = scanned["result"]
    with pytest.raises(OutputFolderError, match="inside the training input root"):
        save_audit(r, r.train.root / "audit")
    with pytest.raises(OutputFolderError, match="existing file"):
        check_output_folder(scanned["dir"] / "summary.json")


# ----------------------------------------------------------------------------------------------
# 9. the app's privacy options, wherever it is started from
# ----------------------------------------------------------------------------------------------

_PROBE = """
import json
from streamlit import config
from streamlit.testing.v1 import AppTest

at = AppTest.from_file({app!r}, default_timeout=300)
at.run()
assert not at.exception, at.exception
print("OPTIONS " + json.dumps({{k: config.get_option(k) for k in
      ("browser.gatherUsageStats", "client.showErrorDetails", "server.address", "browser.serverAddress")}}))
"""


def test_item9_the_app_sets_its_privacy_options_when_started_from_another_folder(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "INSPECTOR_REVIEWS_DB": str(tmp_path / "r.sqlite3"), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", _PROBE.format(app=str(APP))], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("OPTIONS "))
    got = json.loads(line.removeprefix("OPTIONS "))
    assert got == {
        "browser.gatherUsageStats": False,
        "client.showErrorDetails": "none",
        "server.address": "127.0.0.1",
        "browser.serverAddress": "127.0.0.1",
    }


def test_item9_a_server_on_another_interface_is_not_private():
    from inspector.ui import served_privately

    for bound in (None, "", "0.0.0.0", "192.168.1.7", "::"):
        assert not served_privately(bound, real_server=True), bound
    for bound in ("127.0.0.1", "localhost", "::1", "unix:///tmp/s.sock"):
        assert served_privately(bound, real_server=True), bound
    assert served_privately(None, real_server=False)  # a headless test runner serves nobody


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_item9_python_app_py_launches_on_loopback_from_another_folder_without_config_toml(tmp_path):
    """A copy of app.py far from .streamlit/config.toml, started from yet another folder, binds 127.0.0.1."""
    import urllib.request

    away = tmp_path / "copy"
    away.mkdir()
    shutil.copy(APP, away / "app.py")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path), "INSPECTOR_REVIEWS_DB": str(tmp_path / "r.sqlite3")}
    proc = subprocess.Popen([sys.executable, str(away / "app.py"), "--server.port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        ok = False
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as resp:
                    ok = resp.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        assert ok, "the launched app never answered on 127.0.0.1"
        listening = (
            subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
            if shutil.which("ss")
            else None
        )
        if listening is not None and listening.returncode == 0 and listening.stdout.strip():
            addrs = {ln.split()[3].rsplit(":", 1)[0] for ln in listening.stdout.strip().splitlines()}
            assert addrs <= {"127.0.0.1"}, addrs
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}" in out and "Network URL" not in out and "gatherUsageStats" not in out


def test_item9_the_address_the_server_started_with_is_remembered_across_reruns(tmp_path):
    """The guard judges the address the server was started with, not the one the first run wrote into the config."""
    code = (
        "from inspector import ui\nfrom streamlit import config\n"
        "a = ui.apply_privacy_options(); b = ui.apply_privacy_options()\n"
        "print(repr(a), repr(b), repr(config.get_option('server.address')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None", "'127.0.0.1'"]
