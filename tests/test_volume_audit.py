"""The volume stage through the product: NIfTI cohorts copied in 3D, volumes.csv, save/load, the CLI, --unit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.volumes3d_data import make_volume_cohort
from inspector import audit
from inspector.config import AuditConfig
from inspector.folder import load_audit_folder, save_audit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
#: Small settings so the module runs in about a minute on 2 cores (64 px slices, short shortlists).
SMALL = {"size": 64, "align_size": 32, "shortlist": 4, "descriptor_shortlist": 2}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol3d")
    # 3 training, 6 holdout subjects; 3 copies and 2 novel volumes; every 4th axial slice (6 mm, 18 slices) so the
    # module stays short on 2 cores
    return make_volume_cohort(
        root,
        3,
        n_holdout=6,
        n_novel=2,
        copies_per_condition=1,
        conditions=["exact", "rot5", "slab_half"],
        seed=3,
        z_step=4,
    )


@pytest.fixture(scope="module")
def result(cohort, tmp_path_factory):
    # alpha 0.05: with the tiny null (6 holdout + 3 leave-one-subject-out volumes: a t with 2.9 degrees of freedom)
    # an exact copy gets p of about 0.02; a study's dozens of null volumes reach 0.01 (benchmarks/RESULTS.md)
    cfg = AuditConfig(extractor="pixels", unit="volume", show_paths=True, alpha=0.05, **SMALL)
    return audit(
        cohort.train_dir, cohort.synthetic_dir, cohort.holdout_dir, cfg, cache_dir=tmp_path_factory.mktemp("c")
    )


def _labels(cohort) -> dict[str, str]:
    return {r.path: (r.augmentation or "novel") for r in cohort.labels.itertuples()}


def test_copied_volumes_are_verified_and_flagged_and_novel_ones_are_not(cohort, result):
    vt = result.volumes()
    lab = _labels(cohort)
    vt["truth"] = [lab[Path(v).name] for v in vt["volume"]]
    assert {"volume_similarity", "volume_ncc", "coverage", "verified_train_volume", "transform"} <= set(vt.columns)
    copies, novel = vt[vt.truth != "novel"], vt[vt.truth == "novel"]
    assert len(copies) == 3 and len(novel) == 2
    assert copies.volume_similarity.min() > novel.volume_similarity.max() + 0.05
    assert copies.flagged.all()
    # the false-alarm rate is the 3D benchmark's to measure (benchmarks/RESULTS.md); here at most one chance flag
    assert novel.flagged.sum() <= 1
    # each copy is attributed to the training volume it was made from
    src = {r.path: r.source for r in cohort.labels.itertuples()}
    for r in copies.itertuples():
        assert Path(r.verified_train_volume).name == src[Path(r.volume).name]
    assert result.calibration.volume_verified
    v = result.verdict
    assert v.unit == "volume" and v.n_units == 5 and v.n_units_flagged == int(vt.flagged.sum()) and v.copying
    assert "training volumes scored against the other subjects" in result.calibration.volume_calibration
    assert "volumes" in result.timings
    # per training subject, the synthetic volumes that copy it
    from inspector.attribution import subjects_at

    subj = subjects_at(result.subjects, result.table, result.calibration, evidence=result.volume_evidence).set_index(
        "subject_id"
    )
    for r in copies.itertuples():
        assert r.volume in str(subj.loc[r.verified_train_subject, "flagged_volumes"]).split(";")


def test_volume_pair_aligns_the_training_volume(result):
    vt = result.volumes()
    top = vt.iloc[0]
    pair = result.volume_pair(top.volume)
    assert pair.synthetic.shape == pair.aligned.shape
    head = pair.synthetic > 0.06
    assert np.corrcoef(pair.synthetic[head], pair.aligned[head])[0, 1] > 0.9
    assert pair.plane("coronal", 10).shape == (pair.synthetic.shape[0], pair.synthetic.shape[2])
    assert len(pair.rows) == top.n_slices
    with pytest.raises(KeyError, match="not a synthetic volume"):
        result.volume_pair("nope.nii.gz")
    with pytest.raises(ValueError, match="plane"):
        pair.plane("oblique", 0)


def test_saved_audit_reads_back_the_same_volume_decisions(result, tmp_path):
    from inspector.report import write_report

    out = save_audit(result, tmp_path / "audit")
    folder = load_audit_folder(out)
    a = result.volumes().set_index("volume")
    b = folder.volumes().set_index("volume").loc[a.index]
    assert (a.flagged.to_numpy() == b.flagged.to_numpy()).all()
    np.testing.assert_allclose(a.p_value.to_numpy(), b.p_value.to_numpy(), rtol=1e-9)
    assert folder.calibration.volume_verified
    assert folder.calibration.verdict().copying_reason == result.verdict.copying_reason
    csv = pd.read_csv(out / "volumes.csv")
    assert "volume_similarity" in csv and csv.audit_id.nunique() == 1
    # the report shows each flagged volume's aligned slices
    assert folder.evidence is not None and len(folder.evidence.volumes) == int(a.flagged.sum())
    html = write_report(out, tmp_path / "report.html").read_text()
    assert 'id="volume-figures"' in html and html.count('alt="aligned training"') == 3 * int(a.flagged.sum())
    assert "3D-verified volume similarity" in html


def test_unit_slice_skips_the_volume_stage(cohort, result):
    from inspector.attribution import volumes_table
    from inspector.pipeline import load_inputs, verify_volumes

    cfg = AuditConfig(extractor="pixels", unit="slice", **SMALL)
    inputs = load_inputs(cohort.train_dir, cohort.synthetic_dir, cohort.holdout_dir, cfg)
    assert verify_volumes(inputs, None, cfg) is None  # the stage does not run (nothing is matched in 3D)
    # without the stage's evidence the volumes are judged by their slices, as in a slice-unit audit
    vt = volumes_table(result.table, result.calibration)
    assert "volume_similarity" not in vt
    result_slice = __import__("copy").copy(result)
    result_slice.volume_evidence = None
    with pytest.raises(KeyError, match="unit is 'slice'"):
        result_slice.volume_pair(vt.volume.iloc[0])


def test_unit_auto_is_volume_for_nifti_and_slice_for_png(cohort):
    from inspector.pipeline import load_inputs, resolve_unit

    cfg = AuditConfig(extractor="pixels")
    vol = load_inputs(cohort.train_dir, cohort.synthetic_dir, cohort.holdout_dir, cfg)
    assert resolve_unit(cfg, vol) == "volume"
    s = ROOT / "sample_data"
    png = load_inputs(s / "train", s / "synthetic", s / "holdout", cfg)
    assert resolve_unit(cfg, png) == "slice"
    assert resolve_unit(AuditConfig(unit="volume"), png) == "volume"


def test_cli_scan_writes_volumes_csv(cohort, tmp_path):
    import shutil

    lab = _labels(cohort)
    keep = [p for p, a in lab.items() if a in ("exact", "slab_half")] + [p for p, a in lab.items() if a == "novel"][:1]
    syn = tmp_path / "synthetic"
    syn.mkdir()
    for name in keep:
        shutil.copy(cohort.synthetic_dir / name, syn / name)
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "inspector.cli",
        "scan",
        "--train",
        str(cohort.train_dir),
        "--synthetic",
        str(syn),
        "--holdout",
        str(cohort.holdout_dir),
        "--extractor",
        "pixels",
        "--unit",
        "volume",
        "--size",
        "64",
        "--align-size",
        "32",
        "--shortlist",
        "2",
        "--descriptor-shortlist",
        "1",
        "--views",
        "id,hflip",
        "--volume-null-train",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode in (0, 1), p.stderr[-2000:]
    vt = pd.read_csv(out / "volumes.csv")
    assert "volume_similarity" in vt and len(vt) == 3 and 2 <= int(vt.flagged.sum()) <= 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["unit"] == "volume"
    assert summary["verdict"]["unit"] == "volume"
    assert "volume" in p.stdout


def _write_dicom_series(folder: Path, vol: np.ndarray, zooms: tuple[float, ...], patient: str) -> None:
    """One single-frame 16-bit MR DICOM file per axial slice, positions along z (a DICOM series)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    arr = np.clip(vol / max(float(vol.max()), 1e-6) * 4000, 0, 65535).astype(np.uint16)
    series = generate_uid(entropy_srcs=[str(folder)])
    for k in range(arr.shape[2]):
        path = folder / f"im{k:03d}.dcm"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
        ds.PatientID, ds.PatientName = patient, f"TEST^{patient}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = series, series, 1
        sl = np.ascontiguousarray(arr[:, :, k].T)  # rows along y, columns along x
        ds.Rows, ds.Columns = sl.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = [float(zooms[1]), float(zooms[0])]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * zooms[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.PixelData = sl.tobytes()
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def test_dicom_series_cohorts_are_audited_per_volume(cohort, tmp_path):
    """The same 3D copies written as DICOM series: unit auto picks volume; copies are verified and flagged."""
    import nibabel as nib

    lab = _labels(cohort)
    keep = [p for p, a in lab.items() if a in ("exact", "rot5")] + [p for p, a in lab.items() if a == "novel"][:1]
    roots = {}
    for role, folder, names in (
        ("train", cohort.train_dir, sorted(p.name for p in cohort.train_dir.glob("*.nii.gz"))),
        ("holdout", cohort.holdout_dir, sorted(p.name for p in cohort.holdout_dir.glob("*.nii.gz"))),
        ("synthetic", cohort.synthetic_dir, keep),
    ):
        roots[role] = tmp_path / role
        for name in names:
            img = nib.load(str(folder / name))
            stem = name.replace(".nii.gz", "")
            _write_dicom_series(
                roots[role] / stem, np.asarray(img.get_fdata(), np.float32), img.header.get_zooms(), stem
            )
    cfg = AuditConfig(extractor="pixels", alpha=0.05, **SMALL)  # the tiny null: see result()
    res = audit(roots["train"], roots["synthetic"], roots["holdout"], cfg)
    assert res.volume_evidence is not None and res.calibration.volume_verified
    vt = res.volumes()
    assert len(vt) == 3 and int(vt.flagged.sum()) >= 2
    top2 = vt.sort_values("volume_similarity", ascending=False).head(2)
    assert top2.volume_similarity.min() > 0.95 and top2.flagged.all()
    # the volume names are published labels, never the series folders' names
    assert not any("syn-" in str(v) for v in vt.volume)


def _volumes_reference(table, cal, alpha, fdr):
    """The per-volume columns computed volume by volume with pandas (the former implementation)."""
    vi, vflags, sflags = cal.volume_index(), cal.volume_flags(alpha, fdr), cal.flags(alpha, fdr)
    rows = []
    for v, vid in enumerate(cal.volume_ids):
        mine = table.iloc[np.flatnonzero(vi == v)]
        paths = mine["nearest_train_path"].astype(str)
        best = paths.mode().iloc[0]
        on_best = mine[paths == best]
        subj = on_best["nearest_train_subject"].astype(str).mode()
        rows.append(
            {
                "volume": str(vid), "n_slices": len(mine), "slice_first": int(mine["slice_index"].min()),
                "slice_last": int(mine["slice_index"].max()), "flagged": int(vflags[v]),
                "n_slices_flagged": int(sflags[vi == v].sum()), "max_similarity": float(mine["similarity"].max()),
                "nearest_train_volume": best, "nearest_train_subject": subj.iloc[0],
                "match_fraction": len(on_best) / len(mine),
                "train_slice_offset": float((on_best["nearest_train_slice"] - on_best["slice_index"]).median()),
            }
        )  # fmt: skip
    return pd.DataFrame(rows).set_index("volume")


@pytest.mark.parametrize("alpha, fdr", [(0.01, False), (0.05, True), (0.2, False)])
def test_volumes_table_matches_the_per_volume_reference(result, alpha, fdr):
    from inspector.attribution import volumes_table

    got = volumes_table(result.table, result.calibration, alpha, fdr).set_index("volume")  # no 3D evidence merged
    ref = _volumes_reference(result.table, result.calibration, alpha, fdr)
    got = got.loc[ref.index]
    for col in ref.columns:
        if ref[col].dtype.kind in "fi":
            np.testing.assert_allclose(got[col].to_numpy(float), ref[col].to_numpy(float), err_msg=col)
        else:
            assert list(got[col]) == list(ref[col]), col
