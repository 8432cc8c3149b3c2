"""The audit folder: one format, saved and loaded here and nowhere else.

:func:`save_audit` writes an :class:`~inspector.result.AuditResult` into a folder; :func:`load_audit_folder`
reads it back as an :class:`AuditFolder` whose :class:`~inspector.calibration.Calibration` is rebuilt from
the stored scores and null, so the report, the app and the gate ask the same object for every flag,
threshold and verdict. Files:

- ``scores.csv``: one row per synthetic slice (:data:`inspector.attribution.SCORE_COLUMNS` first);
- ``subjects.csv``: per training subject (slices and volumes attributed, a calibrated flag);
- ``volumes.csv``: per synthetic volume (its calibrated p-value and flag, the training volume it matches);
- ``summary.json``: the verdict, config, versions, inputs (validated against
  ``inspector/schemas/summary.schema.json``);
- ``audit.npz``: the null, the per-layer neighbours and the registration (``alignment__<field>``);
- ``evidence.npz``: images of every flagged pair and of the closest unflagged pairs;
- ``manifest.json``: every input file's sha256 (recorded by the readers when they loaded it), counts,
  skipped files, the extractor, config, versions and the sha256 of the files above.

Every file carries the audit ID (an ``audit_id`` column in the CSV files, an ``audit_id`` member in the
``.npz`` files, the ``audit_id`` key in the JSON files), and :func:`save_audit` writes the folder as a whole:
into a hidden temporary sibling folder, fsynced, then swapped in by one rename. :func:`load_audit_folder`
refuses a folder whose files name different audits (:class:`MixedAuditFolderError`).

Reviewer decisions and sign-offs live in one append-only store (:class:`inspector.review.ReviewStore`),
``reviews.sqlite3`` in the folder unless another database is named; a save keeps it (and any report in the
folder). No protected health information: the folder holds pseudonymous subject IDs, relative paths and
hashes only. File and folder names are pseudonymous labels unless the audit ran with ``show_paths``
(:mod:`inspector.naming`), and the cohort roots appear only as ``root_sha256``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .align import Alignment
from .cache import atomic_write_bytes
from .calibration import Calibration, Verdict
from .result import (
    OWN_OUTPUT_REASON,
    VOLUME_EVIDENCE_COLUMNS,
    AuditResult,
    evidence_note,
    is_missing_evidence,
    jsonable,
)
from .review import DECISIONS, RecordedSignOff, Review, ReviewStore, SignOff, SignOffError
from .types import Cohort, SkippedFile

__all__ = [
    "MAX_EVIDENCE_PAIRS",
    "N_CONTEXT_PAIRS",
    "AuditFolder",
    "AuditFolderError",
    "ChecklistItem",
    "RELEASE_DECISIONS",
    "folder_checklist",
    "release_blockers",
    "release_checklist",
    "Evidence",
    "MixedAuditFolderError",
    "OutputFolderError",
    "check_output_folder",
    "drop_audit_outputs",
    "SummaryValidationError",
    "load_alignment",
    "load_audit_folder",
    "load_summary_schema",
    "review_state",
    "report_summary",
    "reviews_path",
    "save_audit",
    "select_evidence_rows",
    "sha256_file",
    "sign_off",
    "signoffs",
    "validate_summary",
    "write_evidence",
]

log = logging.getLogger(__name__)

#: At most this many pairs get images in ``evidence.npz`` (flagged first, most significant first).
MAX_EVIDENCE_PAIRS = 200
#: Unflagged pairs with the highest similarity kept as context (within :data:`MAX_EVIDENCE_PAIRS`).
N_CONTEXT_PAIRS = 20
#: Neighbours per layer kept as images (``min(config.top_k, MAX_NEIGHBOURS)``).
MAX_NEIGHBOURS = 3

EVIDENCE_FILE = "evidence.npz"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "inspector-manifest/1"
DEFAULT_REVIEWS_FILE = "reviews.sqlite3"
#: Files of the audit folder whose sha256 the manifest records (checked by the report).
AUDIT_OUTPUTS: tuple[str, ...] = (
    "scores.csv",
    "subjects.csv",
    "volumes.csv",
    "summary.json",
    "audit.npz",
    EVIDENCE_FILE,
)
#: Every file one save writes; together they are one audit (each carries its ID).
FOLDER_FILES: tuple[str, ...] = (*AUDIT_OUTPUTS, MANIFEST_FILE)
#: Output files that a reader would take for images (``.npz``): never read back as input.
IMAGE_LIKE_OUTPUTS: tuple[str, ...] = ("audit.npz", EVIDENCE_FILE)

_TEXT_COLUMNS = frozenset(
    {
        "synthetic_path",
        "subject_id",
        "nearest_train_path",
        "nearest_train_subject",
        "sha256",
        "view",
        "align_flip",
        "label",
        "source",
        "augmentation",
        "flagged_synthetic",
        "audit_id",
    }
)


class AuditFolderError(FileNotFoundError):
    """The audit folder lacks a file the report needs (run ``inspector scan --out DIR`` first)."""


class MixedAuditFolderError(AuditFolderError):
    """The files of an audit folder name different audits (e.g. a ``scores.csv`` of another run beside this
    run's ``summary.json``); nothing in it can be trusted. Re-run ``inspector scan --out DIR``.

    Attributes
    ----------
    ids : dict of str to str
        The audit ID each file carries (``"none"`` for a file that carries none).
    """

    def __init__(self, message: str, ids: dict[str, str]) -> None:
        super().__init__(message)
        self.ids = dict(ids)


class OutputFolderError(ValueError):
    """The output folder cannot be used: a file, inside an input root, or a folder holding other things than
    an audit."""


class SummaryValidationError(ValueError):
    """A ``summary.json`` does not follow ``inspector/schemas/summary.schema.json``."""


# ----------------------------------------------------------------------------------------------
# Hashing and the input manifest
# ----------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Streaming sha256 of a file's bytes (never read whole into memory).

    Returns
    -------
    str
        64 hex characters.
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cohort_manifest(c: Cohort | None) -> dict[str, Any] | None:
    """Counts, content hash, every input file's sha256 (as the readers recorded it) and the skipped files.

    Paths are the cohort's (relative to its root, or pseudonymous labels without ``show_paths``); the root only
    as ``root_sha256``.
    """
    from .privacy import root_hash

    if c is None:
        return None
    rows: list[dict[str, Any]] = [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in c.files]
    recorded = {f.path for f in c.files}
    missing = sorted({s.path for s in c.slices if not s.sources or not set(s.sources) <= recorded})
    for rel in missing:
        log.warning("input %s of cohort %s has no recorded file hash (built without a reader)", rel, c.name)
        rows.append({"path": rel, "bytes": None, "sha256": None, "error": "no file hash recorded when loaded"})
    return {
        "root_sha256": root_hash(c.root),
        "n_slices": len(c),
        "n_subjects": len(c.subjects),
        "n_files": len(rows),
        "n_skipped": len(c.skipped),
        "content_hash": c.content_hash,
        "files": rows,
        "skipped": [{"path": s.path, "reason": s.reason} for s in c.skipped],
    }


def _extractor_info(result: AuditResult) -> dict[str, Any]:
    ck = result.config.checkpoint
    info: dict[str, Any] = {
        "name": result.config.extractor,
        "fingerprint": result.extractor_fingerprint,
        "checkpoint": Path(ck).name if ck else None,
        "checkpoint_sha256": None,
    }
    if ck and Path(ck).is_file():
        info["checkpoint_sha256"] = sha256_file(ck)
    elif ck:
        info["checkpoint_note"] = "checkpoint file not found when hashing; the fingerprint identifies the weights"
    return info


# ----------------------------------------------------------------------------------------------
# Evidence
# ----------------------------------------------------------------------------------------------


def select_evidence_rows(
    table: pd.DataFrame,
    *,
    max_pairs: int = MAX_EVIDENCE_PAIRS,
    n_context: int = N_CONTEXT_PAIRS,
    flagged: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of the score table whose pair images go into ``evidence.npz``.

    Every flagged slice (lowest p-value, then highest similarity first), then the ``n_context``
    unflagged slices with the highest similarity, cut at ``max_pairs``.

    Parameters
    ----------
    table : pandas.DataFrame
        ``AuditResult.table`` (columns ``flagged``, ``p_value``, ``similarity``), m rows.

    Returns
    -------
    np.ndarray of int64, shape (n,), n <= max_pairs
    """
    if max_pairs < 0 or n_context < 0:
        raise ValueError(f"max_pairs and n_context must be >= 0; got {max_pairs}, {n_context}.")
    flagged = table["flagged"].to_numpy().astype(bool) if flagged is None else np.asarray(flagged, bool)
    p = table["p_value"].to_numpy(float)
    s = table["similarity"].to_numpy(float)
    rows = np.arange(len(table))
    f_rows = most_significant_first(rows[flagged], p, s)
    u_rows = most_significant_first(rows[~flagged], None, s)[:n_context]
    return np.concatenate([f_rows, u_rows]).astype(np.int64)[:max_pairs]


def most_significant_first(rows: np.ndarray, p: np.ndarray | None, s: np.ndarray) -> np.ndarray:
    """``rows`` ordered by p-value (when given), then by similarity (highest first, non-finite last), then row.

    Parameters
    ----------
    rows : np.ndarray of int, shape (k,)
    p, s : np.ndarray, shape (m,)
        p-values and similarities of all m rows (``p`` None: by similarity only).

    Returns
    -------
    np.ndarray of int, shape (k,)
    """
    rows = np.asarray(rows)
    s_key = np.where(np.isfinite(s[rows]), -s[rows], np.inf)
    keys = (rows, s_key) if p is None else (rows, s_key, p[rows])
    return rows[np.lexsort(keys)]


#: Flagged volumes whose aligned slices go into ``evidence.npz`` (most significant first), and slices per volume.
MAX_EVIDENCE_VOLUMES, VOLUME_EVIDENCE_SLICES = 20, 3


def _volume_evidence_images(result: AuditResult, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Representative aligned slices of the flagged, 3D-verified volumes: (n, VOLUME_EVIDENCE_SLICES, 2, S, S)
    float16 (synthetic, aligned training) and per volume its name, training volume and the slice indices."""
    empty = np.zeros((0, VOLUME_EVIDENCE_SLICES, 2, size, size), np.float16)
    if result.volume_evidence is None:
        return empty, []
    vt = result.volumes()
    vt = vt[(vt["flagged"] == 1) & (vt["verified_train_volume"].fillna("").astype(str) != "")]
    images, meta = [], []
    for vol in vt["volume"].astype(str).head(MAX_EVIDENCE_VOLUMES):
        try:
            pair = result.volume_pair(vol, size=size)
        except KeyError as e:
            log.warning("no aligned slices for volume %s: %s", vol, e)
            continue
        d = pair.synthetic.shape[0]
        picks = sorted({int(round(q * (d - 1))) for q in np.linspace(0.25, 0.75, VOLUME_EVIDENCE_SLICES)})
        picks = (picks * VOLUME_EVIDENCE_SLICES)[:VOLUME_EVIDENCE_SLICES]
        images.append(np.stack([np.stack([pair.synthetic[p], pair.aligned[p]]) for p in picks]).astype(np.float16))
        meta.append(
            {
                "volume": vol,
                "train_volume": pair.train_volume,
                "train_subject": pair.train_subject,
                "slice_index": [int(pair.slice_index[p]) for p in picks],
                "similarity": float(pair.similarity),
            }
        )
    return (np.stack(images) if images else empty), meta


def write_evidence(
    result: AuditResult,
    out_dir: str | Path,
    *,
    max_pairs: int = MAX_EVIDENCE_PAIRS,
    n_context: int = N_CONTEXT_PAIRS,
) -> None:
    """Write ``evidence.npz`` and ``manifest.json`` into an audit folder.

    Together with ``scores.csv``, ``subjects.csv``, ``summary.json`` and ``audit.npz`` they let
    :func:`write_report` build the report from the folder alone.

    ``evidence.npz`` (float16 images, ``S = config.size``, ``k = min(config.top_k, 3)``, ``L`` layers):

    - ``rows`` (n,) int64: rows of ``scores.csv`` (see :func:`select_evidence_rows`);
    - ``synthetic`` (n, S, S): the synthetic slices;
    - ``aligned``, ``difference`` (n, S, S): the best training candidate registered onto the synthetic
      slice and ``|synthetic - aligned|`` (NaN when the audit has no alignment, paper mode);
    - ``neighbour_images`` (u, S, S): the distinct neighbour images, in each pair's matched view;
    - ``neighbour_ref`` (n, L, k) int32: index into ``neighbour_images`` per pair, layer and rank
      (-1 = none);
    - ``pairs_json``: JSON list, per pair: row, key, sha256, transform and per layer the neighbours'
      ``train_index``, ``similarity``, ``path``, ``slice_index``, ``subject_id``;
    - ``layers_json``: JSON list of the L layer names;
    - ``volume_images`` (v, 3, 2, S, S): for up to :data:`MAX_EVIDENCE_VOLUMES` flagged, 3D-verified volumes,
      three axial slices (a quarter, half and three quarters through) of the synthetic volume and of its
      training volume aligned by the 3D transform; ``volume_json``: per volume its name, training volume and
      subject, slice indices and volume similarity.

    ``manifest.json``: every input file's sha256 (paths relative to the cohort root; each file of a
    DICOM series folder), counts per cohort, skipped files with reasons, the extractor (name,
    fingerprint, checkpoint sha256), config, versions, dates and the sha256 of the audit's output files.

    Parameters
    ----------
    result : AuditResult
    out_dir : str or Path
        The audit folder (``AuditResult.save`` has written the other files into it).
    max_pairs, n_context : int
        Bounds of the stored pairs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = select_evidence_rows(result.table, max_pairs=max_pairs, n_context=n_context, flagged=result.flags())
    k = max(1, min(int(result.config.top_k), MAX_NEIGHBOURS))
    layers = list(result.layers)
    size = int(result.config.size)
    n = len(rows)
    synthetic = np.zeros((n, size, size), np.float16)
    aligned = np.full((n, size, size), np.nan, np.float16)
    difference = np.full((n, size, size), np.nan, np.float16)
    refs = np.full((n, len(layers), k), -1, np.int32)
    nb_images: list[np.ndarray] = []
    nb_index: dict[tuple[int, str], int] = {}
    pairs: list[dict[str, Any]] = []
    table = result.table
    for j, row in enumerate(rows):
        ev = result.pair(int(row), k=k)
        synthetic[j] = ev.synthetic
        if ev.aligned is not None:
            aligned[j] = ev.aligned
        if ev.difference is not None:
            difference[j] = ev.difference
        flip = str(ev.transform.get("flip", "id"))
        meta_layers: dict[str, list[dict[str, Any]]] = {}
        for li, layer in enumerate(layers):
            kept = []
            for r, nb in enumerate(ev.layers.get(layer, [])[:k]):
                t = int(nb["train_index"])
                if t < 0:
                    continue
                key = (t, flip)
                if key not in nb_index:
                    nb_index[key] = len(nb_images)
                    nb_images.append(np.asarray(nb["image"], np.float16))
                refs[j, li, r] = nb_index[key]
                kept.append(
                    {
                        "rank": r,
                        "train_index": t,
                        "similarity": _finite_or_none(nb["similarity"]),
                        "path": str(nb["path"]),
                        "slice_index": int(nb["slice_index"]),
                        "subject_id": str(nb["subject_id"]),
                    }
                )
            meta_layers[layer] = kept
        rec = table.iloc[int(row)]
        pairs.append(
            {
                "row": int(row),
                "key": f"{rec['synthetic_path']}#{int(rec['slice_index'])}",
                "sha256": str(rec.get("sha256", "")),
                "flagged": bool(rec["flagged"]),
                "transform": jsonable(ev.transform),
                "layers": meta_layers,
            }
        )
    nb_arr = np.stack(nb_images) if nb_images else np.zeros((0, size, size), np.float16)
    vol_images, vol_meta = _volume_evidence_images(result, size)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        volume_images=vol_images,
        volume_json=np.array(json.dumps(vol_meta)),
        rows=rows,
        synthetic=synthetic,
        aligned=aligned,
        difference=difference,
        neighbour_images=nb_arr,
        neighbour_ref=refs,
        pairs_json=np.array(json.dumps(pairs)),
        layers_json=np.array(json.dumps(layers)),
        audit_id=np.array(result.audit_id),
    )
    atomic_write_bytes(out / EVIDENCE_FILE, buf.getvalue())

    flags = result.flags()
    n_flagged = int(flags.sum())
    n_flagged_img = int(flags[rows].sum()) if n else 0
    if n_flagged_img < n_flagged:
        log.warning(
            "%d flagged slices; images kept for the %d most significant (max_pairs=%d)",
            n_flagged,
            n_flagged_img,
            max_pairs,
        )
    outputs = {name: sha256_file(out / name) for name in AUDIT_OUTPUTS if (out / name).is_file()}
    manifest = {
        "format": MANIFEST_FORMAT,
        "audit_id": result.audit_id,
        "audit_created": result.created,
        "written": _now(),
        "config": jsonable(result.config.to_dict()),
        "extractor": _extractor_info(result),
        "layers": layers,
        "versions": dict(result.versions),
        "cohorts": {
            "train": _cohort_manifest(result.train),
            "synthetic": _cohort_manifest(result.synthetic),
            "holdout": _cohort_manifest(result.holdout),
        },
        "evidence": {
            "file": EVIDENCE_FILE,
            "n_pairs": n,
            "n_flagged": n_flagged,
            "n_flagged_with_images": n_flagged_img,
            "neighbours_per_layer": k,
            "max_pairs": max_pairs,
            "n_context": n_context,
            "image_dtype": "float16",
            "image_size": size,
        },
        "outputs": outputs,
    }
    atomic_write_bytes(out / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    log.info("evidence of %d pairs and the manifest written to %s", n, out)


# ----------------------------------------------------------------------------------------------
# Reading an audit folder
# ----------------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """``evidence.npz`` as read back. Arrays as documented in :func:`write_evidence`."""

    rows: np.ndarray
    synthetic: np.ndarray
    aligned: np.ndarray
    difference: np.ndarray
    neighbour_images: np.ndarray
    neighbour_ref: np.ndarray
    pairs: list[dict[str, Any]]
    layers: list[str]
    volume_images: np.ndarray | None = None
    volumes: list[dict[str, Any]] = field(default_factory=list)

    def position(self, row: int) -> int | None:
        """Index into the arrays of the pair of score-table row ``row``, or None when not stored."""
        hit = np.flatnonzero(self.rows == row)
        return int(hit[0]) if hit.size else None


@dataclass
class AuditFolder:
    """An audit folder as read back: everything the report and the gate read.

    Attributes
    ----------
    path : Path
    summary : dict
        ``summary.json``.
    table : pandas.DataFrame
        ``scores.csv`` (one row per synthetic slice).
    subjects : pandas.DataFrame
        ``subjects.csv``.
    calibration : Calibration
        Rebuilt from the stored similarities, the null and the config: flags, thresholds and the verdict at
        any ``(alpha, fdr)``, exactly as the audit computed them.
    manifest : dict or None
        ``manifest.json`` (None for folders written without it).
    evidence : Evidence or None
    integrity : list of dict
        Per audit output file: ``file``, ``expected``, ``actual``, ``ok``.
    """

    path: Path
    summary: dict[str, Any]
    table: pd.DataFrame
    subjects: pd.DataFrame
    calibration: Calibration
    manifest: dict[str, Any] | None
    evidence: Evidence | None
    integrity: list[dict[str, Any]] = field(default_factory=list)
    volume_evidence: pd.DataFrame | None = None

    @property
    def audit_id(self) -> str:
        return str(self.summary["audit_id"])

    def volumes(self, alpha: float | None = None, fdr: bool | None = None) -> pd.DataFrame:
        """Per synthetic volume at ``(alpha, fdr)`` (``volumes.csv``), from the rebuilt calibration."""
        from .attribution import volumes_table

        return volumes_table(self.table, self.calibration, alpha, fdr, evidence=self.volume_evidence)

    def subjects_at(self, alpha: float | None = None, fdr: bool | None = None) -> pd.DataFrame:
        """Per training subject at ``(alpha, fdr)`` (default: the calibration's setting), every flag from the
        rebuilt calibration (:func:`inspector.attribution.subjects_at`): the report's per-subject table."""
        from .attribution import subjects_at

        return subjects_at(self.subjects, self.table, self.calibration, alpha, fdr, evidence=self.volume_evidence)

    @property
    def null_similarity(self) -> np.ndarray:
        return self.calibration.null

    @property
    def verdict(self) -> Verdict:
        """The verdict at the audit's own ``(alpha, fdr)``."""
        return self.calibration.verdict()

    def flagged_rows(self, alpha: float | None = None, fdr: bool | None = None) -> np.ndarray:
        """Rows of the flagged slices at ``(alpha, fdr)``, most significant first, shape (k,)."""
        rows = np.flatnonzero(self.calibration.flags(alpha, fdr))
        return most_significant_first(rows, self.calibration.p_values, self.calibration.similarity)

    @property
    def intact(self) -> bool:
        return all(r["ok"] for r in self.integrity)

    @property
    def missing_evidence(self) -> dict[str, int]:
        """Files skipped as missing evidence per cohort (``train``, ``synthetic``, ``holdout``)."""
        cohorts = self.summary.get("cohorts") or {}
        return {
            k: int((cohorts.get(k) or {}).get("n_missing_evidence", 0) or 0) for k in ("train", "synthetic", "holdout")
        }

    @property
    def evidence_note(self) -> str:
        """The sentence the verdict carries about skipped files ('' when nothing is missing)."""
        return evidence_note(self.missing_evidence)

    @property
    def verdict_text(self) -> str:
        """The verdict in plain words at the folder's calibration, with :attr:`evidence_note`."""
        return " ".join(t for t in (self.verdict.text, self.evidence_note) if t)


def _read_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    for col in df.columns:
        if col in _TEXT_COLUMNS:
            continue
        num = pd.to_numeric(df[col].replace("", np.nan), errors="coerce")
        if num.notna().sum() == (df[col] != "").sum():
            df[col] = num
    return df


def _require(folder: Path, name: str) -> Path:
    p = folder / name
    if not p.is_file():
        raise AuditFolderError(
            f"{p} is missing; {folder} is not a complete audit folder. Run 'inspector scan ... --out {folder}' first."
        )
    return p


def load_audit_folder(audit_dir: str | Path) -> AuditFolder:
    """Read an audit folder written by ``inspector scan`` (:func:`save_audit`).

    Raises
    ------
    AuditFolderError
        When the folder or ``summary.json``/``scores.csv``/``subjects.csv``/``audit.npz`` is missing.
    MixedAuditFolderError
        When its files name different audits (each file carries the audit ID it was written with).
    """
    folder = Path(audit_dir).expanduser()
    if not folder.is_dir():
        raise AuditFolderError(f"Audit folder {folder} does not exist; run 'inspector scan ... --out {folder}' first.")
    try:
        summary = json.loads(_require(folder, "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'summary.json'} is not valid JSON ({e}); re-run 'inspector scan'.") from e
    if not isinstance(summary, dict) or not isinstance(summary.get("audit_id"), str):
        raise AuditFolderError(f"{folder / 'summary.json'} holds no audit_id; re-run 'inspector scan --out {folder}'.")
    ids: dict[str, str | None] = {"summary.json": summary["audit_id"]}
    table = _read_csv(_require(folder, "scores.csv"))
    ids["scores.csv"] = _csv_audit_id(table, folder / "scores.csv")
    table = table.drop(columns=["audit_id"], errors="ignore")
    subjects = _read_csv(_require(folder, "subjects.csv"))
    ids["subjects.csv"] = _csv_audit_id(subjects, folder / "subjects.csv")
    subjects = subjects.drop(columns=["audit_id"], errors="ignore")
    with np.load(_require(folder, "audit.npz"), allow_pickle=False) as z:
        if "null_similarity" not in z:
            raise AuditFolderError(f"{folder / 'audit.npz'} holds no null; re-run 'inspector scan ... --out {folder}'.")
        null = np.asarray(z["null_similarity"], np.float64)
        null_groups = np.asarray(z["null_groups"]).astype(object) if "null_groups" in z.files else None
        null_subjects = np.asarray(z["null_subjects"]).astype(object) if "null_subjects" in z.files else None
        level = float(z["level"]) if "level" in z.files else None
        volume_null = (
            np.asarray(z["volume_null_similarity"], np.float64) if "volume_null_similarity" in z.files else None
        )
        volume_null_text = str(z["volume_null_description"]) if "volume_null_description" in z.files else None
        ids["audit.npz"] = str(z["audit_id"]) if "audit_id" in z.files else None
    manifest = None
    if (folder / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise AuditFolderError(f"{folder / MANIFEST_FILE} is not valid JSON ({e}); re-run 'inspector scan'.") from e
        ids[MANIFEST_FILE] = str(manifest.get("audit_id")) if isinstance(manifest, dict) else None
    else:
        log.warning("%s has no %s: the report will lack input hashes", folder, MANIFEST_FILE)
    evidence = None
    if (folder / EVIDENCE_FILE).is_file():
        with np.load(folder / EVIDENCE_FILE, allow_pickle=False) as z:
            ids[EVIDENCE_FILE] = str(z["audit_id"]) if "audit_id" in z.files else None
            evidence = Evidence(
                rows=np.asarray(z["rows"], np.int64),
                synthetic=np.asarray(z["synthetic"], np.float32),
                aligned=np.asarray(z["aligned"], np.float32),
                difference=np.asarray(z["difference"], np.float32),
                neighbour_images=np.asarray(z["neighbour_images"], np.float32),
                neighbour_ref=np.asarray(z["neighbour_ref"], np.int64),
                pairs=json.loads(str(z["pairs_json"])),
                layers=json.loads(str(z["layers_json"])),
                volume_images=np.asarray(z["volume_images"], np.float32) if "volume_images" in z.files else None,
                volumes=json.loads(str(z["volume_json"])) if "volume_json" in z.files else [],
            )
    else:
        log.warning("%s has no %s: the report will show no pair images", folder, EVIDENCE_FILE)
    _check_one_audit(folder, ids)
    summary = _upgrade_summary(summary, manifest)
    volume_evidence = None
    if volume_null is not None and (folder / "volumes.csv").is_file():
        vt = _read_csv(folder / "volumes.csv")
        cols = [c for c in VOLUME_EVIDENCE_COLUMNS if c in vt.columns]
        if "volume_similarity" in cols:
            volume_evidence = vt[cols].copy()
            volume_evidence["volume"] = volume_evidence["volume"].astype(str)
            for c in ("verified_train_volume", "verified_train_subject", "transform"):
                if c in volume_evidence:
                    volume_evidence[c] = volume_evidence[c].fillna("").astype(str)
    calibration = _calibration(
        summary,
        table,
        null,
        folder,
        null_groups,
        level,
        volume_evidence,
        volume_null,
        volume_null_text or None,
        null_subjects=null_subjects,
    )
    integrity = []
    for name, expected in (manifest or {}).get("outputs", {}).items():
        actual = sha256_file(folder / name) if (folder / name).is_file() else None
        integrity.append({"file": name, "expected": expected, "actual": actual, "ok": actual == expected})
    if not all(r["ok"] for r in integrity):
        bad = [r["file"] for r in integrity if not r["ok"]]
        log.warning("audit folder %s was modified after the scan: %s", folder, ", ".join(bad))
    return AuditFolder(folder, summary, table, subjects, calibration, manifest, evidence, integrity, volume_evidence)


def _csv_audit_id(df: pd.DataFrame, path: Path) -> str | None:
    """The audit ID of a CSV's ``audit_id`` column (None when it has none; ``mixed`` within the file raises)."""
    if "audit_id" not in df.columns:
        return None
    vals = sorted(set(df["audit_id"].astype(str)))
    if len(vals) > 1:
        raise MixedAuditFolderError(
            f"{path} mixes rows of {len(vals)} audits ({', '.join(v[:12] for v in vals[:4])}); it is not one "
            "audit's output. Re-run 'inspector scan --out' into a new folder.",
            {path.name: ",".join(vals)},
        )
    return vals[0] if vals else None


def _check_one_audit(folder: Path, ids: dict[str, str | None]) -> None:
    """Refuse a folder whose files carry different audit IDs, or where some carry one and others none.

    A folder written before files carried the ID (no ``audit_id`` in its CSV and ``.npz`` files) is accepted;
    its manifest's hashes still show any file changed after the scan.
    """
    expected = ids["summary.json"]
    carried = {k: v for k, v in ids.items() if k not in ("summary.json", MANIFEST_FILE)}
    legacy = all(v is None for v in carried.values())
    bad = {k: v for k, v in ids.items() if v != expected and not (legacy and v is None)}
    if not bad:
        return
    rows = "; ".join(f"{k}: {(v or 'none')[:12]}" for k, v in ids.items())
    raise MixedAuditFolderError(
        f"{folder} mixes files of different audits: {', '.join(sorted(bad))} "
        f"{'do' if len(bad) > 1 else 'does'} not belong to audit {expected[:12]} of summary.json ({rows}). "
        "A crash while saving or a copy from another run can leave such a folder; nothing in it can be trusted. "
        f"Re-run 'inspector scan ... --out {folder}'.",
        {k: v or "none" for k, v in ids.items()},
    )


def _upgrade_summary(summary: dict[str, Any], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A ``summary.json`` written before the skipped-file keys, the path settings or the root hashes existed,
    completed (from the manifest) and with each root replaced by its hash."""
    from .privacy import root_hash

    out = dict(summary)
    if isinstance(out.get("config"), dict):
        # written before these settings existed: no skipped training files, real paths, every manifest row read,
        # rotations up to 15 degrees off the orientations and no rotation-invariant shortlist
        old = {
            "allow_skipped": False,
            "show_paths": True,
            "allow_outside_root": True,
            "rotation_shortlist": 0,
            "max_angle": 15.0,
        }
        out["config"] = {**{k: v for k, v in old.items() if k not in out["config"]}, **out["config"]}
    cohorts = dict(out.get("cohorts") or {})
    for name, c in list(cohorts.items()):
        if isinstance(c, dict) and "root" in c:  # written before roots were hashed: the root is never shown
            c = {("root_sha256" if k == "root" else k): (root_hash(v) if k == "root" else v) for k, v in c.items()}
            cohorts[name] = c
        if not isinstance(c, dict) or ("skipped" in c and "n_missing_evidence" in c):
            continue
        listed = ((manifest or {}).get("cohorts") or {}).get(name) or {}
        sk = [SkippedFile(str(r.get("path", "")), str(r.get("reason", ""))) for r in listed.get("skipped", [])]
        records = [
            {"path": k.path, "reason": k.reason, "missing_evidence": is_missing_evidence(k)}
            for k in sk
            if not k.reason.lower().startswith("background-only slice")
        ]
        cohorts[name] = {
            **c,
            "n_missing_evidence": sum(r["missing_evidence"] for r in records),
            "skipped": records,
        }
    out["cohorts"] = cohorts
    return out


def _calibration(
    summary: dict[str, Any],
    table: pd.DataFrame,
    null: np.ndarray,
    folder: Path,
    null_groups: np.ndarray | None = None,
    level: float | None = None,
    volume_evidence: pd.DataFrame | None = None,
    volume_null: np.ndarray | None = None,
    volume_null_description: str | None = None,
    null_subjects: np.ndarray | None = None,
) -> Calibration:
    from .calibration import VERDICT_LEVEL

    scores = None
    if volume_evidence is not None and volume_null is not None:
        scores = dict(
            zip(volume_evidence["volume"].astype(str), volume_evidence["volume_similarity"].astype(float), strict=True)
        )

    cfg, v = summary.get("config", {}), summary.get("verdict", {})
    try:
        return Calibration(
            table["similarity"].to_numpy(np.float64),
            null,
            null_kind=str(v.get("null_kind", "holdout")),
            alpha=float(cfg.get("alpha", v.get("alpha", 0.01))),
            fdr=bool(cfg.get("fdr", v.get("fdr", False))),
            nearest_subject=table["nearest_train_subject"].astype(str).to_numpy(object),
            mi_z=table["mi_z"].to_numpy(np.float64),
            oni=table["oni"].to_numpy(np.float64),
            mode=str(cfg.get("mode", v.get("mode", "default"))),
            groups=table["synthetic_path"].astype(str).to_numpy(object),
            null_groups=null_groups,
            null_subjects=null_subjects,
            level=VERDICT_LEVEL if level is None else level,
            diagnostics=tuple(v.get("diagnostics", ())),
            volume_scores=scores,
            volume_null=volume_null if scores is not None else None,
            volume_null_description=volume_null_description,
        )
    except (KeyError, ValueError) as e:
        raise AuditFolderError(
            f"{folder} does not hold a consistent audit ({type(e).__name__}: {e}); re-run 'inspector scan'."
        ) from e


# ----------------------------------------------------------------------------------------------
# Sign-off
# ----------------------------------------------------------------------------------------------


def reviews_path(folder: Path, reviews: str | Path | None, *, create: bool) -> Path | None:
    """The review database: ``reviews`` (must exist), else ``folder/reviews.sqlite3`` when present (or
    ``create``), else None."""
    if reviews is not None:
        p = Path(reviews).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"Review database {p} does not exist; pass the file the app records decisions in, "
                f"or omit --reviews to use {folder / DEFAULT_REVIEWS_FILE}."
            )
        return p
    p = folder / DEFAULT_REVIEWS_FILE
    return p if (p.is_file() or create) else None


def review_state(
    folder: AuditFolder, db: Path | None, alpha: float | None = None, fdr: bool | None = None
) -> tuple[dict[str, Review], dict[str, Any]]:
    """Latest decision per slice hash and the counts over the pairs flagged at ``(alpha, fdr)``."""
    latest: dict[str, Review] = {}
    if db is not None and db.is_file():
        latest = ReviewStore(db).latest(folder.audit_id)
    rows = folder.flagged_rows(alpha, fdr)
    hashes = (
        folder.table["sha256"].astype(str).to_numpy()
        if "sha256" in folder.table
        else np.array([""] * len(folder.table))
    )
    decided = [latest[hashes[r]] for r in rows if hashes[r] in latest]
    counts = Counter(r.decision for r in decided)
    state = {
        "database": db.name if db is not None else None,
        "n_flagged": len(rows),
        "n_reviewed": len(decided),
        "n_unreviewed": len(rows) - len(decided),
        "decisions": {d: int(counts.get(d, 0)) for d in DECISIONS},
    }
    return latest, state


#: Sign-off decisions that release synthetic data (the checklist's blockers apply to them).
RELEASE_DECISIONS: tuple[str, ...] = ("release", "release after removing the flagged slices")


@dataclass(frozen=True)
class ChecklistItem:
    """One line of the release checklist (the app's Export page, the report's summary, ``inspector report``).

    Attributes
    ----------
    name : str
        What is checked, e.g. "every flagged pair reviewed".
    ok : bool
    detail : str
        The state in words (why it fails, when it does).
    blocks : tuple of str
        The sign-off decisions this item, failing, refuses without an explicit reason.
    """

    name: str
    ok: bool
    detail: str
    blocks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "blocks": list(self.blocks)}


def release_checklist(
    verdict: Verdict, *, n_flagged: int, n_reviewed: int, n_copies: int = 0, evidence_note: str = ""
) -> list[ChecklistItem]:
    """What must hold before synthetic data is released, at the verdict's ``(alpha, fdr)``.

    Every screen and file asks this one function, so the app's Export page, the report and
    :func:`sign_off` cannot disagree.

    Parameters
    ----------
    verdict : Verdict
        From :meth:`Calibration.verdict` at the setting on screen.
    n_flagged, n_reviewed : int
        Flagged pairs at that setting, and how many have a reviewer decision.
    n_copies : int
        Flagged pairs whose latest decision is ``copy`` or ``near copy``.
    evidence_note : str
        The audit's missing-evidence sentence ('' when nothing was skipped).

    Returns
    -------
    list of ChecklistItem
    """
    rel, release = RELEASE_DECISIONS, ("release",)
    everything = (*RELEASE_DECISIONS, "do not release")
    rule = "Benjamini–Hochberg at α =" if verdict.fdr else "α ="
    items = [
        ChecklistItem(
            "a calibrated null (a holdout of unseen real scans)",
            verdict.decidable,
            f"{verdict.null_kind} null of {verdict.n_null} slices"
            + ("" if verdict.decidable else ": not calibrated, so nothing is flagged and nothing is decided"),
            rel,
        ),
        ChecklistItem(
            f"the setting can flag a copy ({rule} {verdict.alpha:g})",
            verdict.alpha_reachable,
            verdict.warning
            if (verdict.warning and not verdict.alpha_reachable)
            else f"smallest possible p-value {verdict.min_p_value:.3g}",
            rel,
        ),
        ChecklistItem(
            "the dataset verdict does not say memorised",
            not verdict.copying,
            verdict.copying_reason,
            release,
        ),
        ChecklistItem(
            "every flagged pair has a reviewer decision",
            n_reviewed >= n_flagged,
            f"{n_reviewed} of {n_flagged} flagged pairs reviewed",
            everything,
        ),
        ChecklistItem(
            "no reviewed pair judged a copy",
            n_copies == 0,
            f"{n_copies} flagged pair(s) judged copy or near copy",
            release,
        ),
    ]
    if evidence_note:
        items.append(ChecklistItem("every input file was read", False, evidence_note, rel))
    return items


def release_blockers(checklist: list[ChecklistItem], decision: str) -> list[str]:
    """The failing checklist items that refuse ``decision`` without an explicit reason, in words."""
    return [f"{c.name}: {c.detail}" for c in checklist if not c.ok and decision in c.blocks]


def folder_checklist(folder: AuditFolder, state: dict[str, Any]) -> list[ChecklistItem]:
    """:func:`release_checklist` of an audit folder at its calibration's setting, with :func:`review_state`'s
    counts."""
    copies = int(state["decisions"].get("copy", 0)) + int(state["decisions"].get("near copy", 0))
    return release_checklist(
        folder.verdict,
        n_flagged=state["n_flagged"],
        n_reviewed=state["n_reviewed"],
        n_copies=copies,
        evidence_note=folder.evidence_note,
    )


def sign_off(
    audit_dir: str | Path | AuditFolder, signoff: SignOff, *, reviews: str | Path | None = None
) -> RecordedSignOff:
    """Record a sign-off for an audit in the review database's append-only ``signoffs`` table.

    Parameters
    ----------
    audit_dir : str or Path
        The audit folder.
    signoff : SignOff
    reviews : str or Path, optional
        The review database (default ``audit_dir/reviews.sqlite3``, created when missing).

    Returns
    -------
    RecordedSignOff

    Raises
    ------
    SignOffError
        When flagged pairs have no reviewer decision and ``signoff.reason`` is empty.
    """
    if not isinstance(signoff, SignOff):
        raise TypeError(f"signoff must be a SignOff; got {type(signoff).__name__}.")
    folder = audit_dir if isinstance(audit_dir, AuditFolder) else load_audit_folder(audit_dir)
    db = reviews_path(folder.path, reviews, create=True)
    assert db is not None
    _, state = review_state(folder, db)
    if state["n_unreviewed"] and not signoff.reason:
        raise SignOffError(
            f"{state['n_unreviewed']} of {state['n_flagged']} flagged pairs have no reviewer decision in {db}; "
            "review them first, or state why you sign off without (SignOff.reason / --reason)."
        )
    blockers = release_blockers(folder_checklist(folder, state), signoff.decision)
    if blockers and not signoff.reason:
        raise SignOffError(
            f"'{signoff.decision}' is refused without a reason: "
            + "; ".join(blockers)
            + ". State why you release anyway (SignOff.reason / --reason), or decide otherwise."
        )
    rec = ReviewStore(db).record_signoff(
        folder.audit_id, signoff, n_flagged=state["n_flagged"], n_reviewed=state["n_reviewed"]
    )
    log.info("sign-off %d recorded for audit %s: %s", rec.id, folder.audit_id[:12], rec.decision)
    return rec


def signoffs(folder: AuditFolder, db: Path | None) -> list[RecordedSignOff]:
    """Every sign-off of the folder's audit in the review database (none when there is no database)."""
    if db is None or not db.is_file():
        return []
    return ReviewStore(db).signoffs(folder.audit_id)


# ----------------------------------------------------------------------------------------------
# summary.json and its schema
# ----------------------------------------------------------------------------------------------


def load_summary_schema() -> dict[str, Any]:
    """The JSON Schema of ``summary.json`` (``inspector/schemas/summary.schema.json``)."""
    from importlib import resources

    text = resources.files("inspector").joinpath("schemas", "summary.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate_summary(summary: dict[str, Any]) -> None:
    """Check a summary (the audit's or the report's) against the JSON Schema.

    Raises
    ------
    SummaryValidationError
        Naming the first offending key path and the rule it breaks.
    """
    import jsonschema

    schema = load_summary_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(summary), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise SummaryValidationError(
            f"summary.json does not follow the schema at {where}: {e.message} "
            f"({len(errors)} error(s); schema inspector/schemas/summary.schema.json)."
        )


def report_summary(
    folder: AuditFolder,
    review_state: dict[str, Any],
    signoff: RecordedSignOff | None,
    *,
    report_file: str,
    report_sha256: str,
    generated: str,
) -> dict[str, Any]:
    """The report's ``summary.json``: the audit's summary plus review counts, sign-off, report hash."""
    out = dict(folder.summary)
    v = folder.verdict  # at the report's setting
    out["verdict"], out["verdict_text"] = jsonable(v.to_dict()), folder.verdict_text
    out["reviews"] = review_state
    out["signoff"] = signoff.to_dict() if signoff is not None else None
    out["report"] = {"file": report_file, "sha256": report_sha256, "generated": generated}
    out["integrity"] = {
        "ok": folder.intact,
        "checked": [r["file"] for r in folder.integrity],
        "modified": [r["file"] for r in folder.integrity if not r["ok"]],
    }
    return out


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def _is_companion(name: str) -> bool:
    """Files that may live in an audit folder beside its outputs and that a save keeps: the review database
    (with its ``-wal``/``-shm``/``-journal`` files) and reports (``*.html``, ``*.summary.json``)."""
    return name.startswith(DEFAULT_REVIEWS_FILE) or name.endswith((".html", ".summary.json"))


def _root_of(path: str | Path) -> Path:
    """The folder a cohort's paths are relative to: the folder itself, else the manifest's or file's folder."""
    p = Path(path).expanduser().absolute()
    return p if p.is_dir() else p.parent


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_folder(out_dir: str | Path, inputs: dict[str, str | Path | Cohort | None] | None = None) -> Path:
    """Check that an audit folder can be written at ``out_dir``, before anything is computed.

    Parameters
    ----------
    out_dir : str or Path
        The folder to write.
    inputs : dict of str to path or Cohort, optional
        The cohorts' paths (or loaded cohorts) by name (``train``, ``synthetic``, ``holdout``).

    Returns
    -------
    Path
        ``out_dir``, absolute.

    Raises
    ------
    OutputFolderError
        ``out_dir`` is an existing file; it lies inside an input root (the next audit would read its own
        outputs as images) or holds one (a save replaces the folder as a whole); it is an existing folder
        holding sub-folders or files that are neither an audit's outputs nor a review database or report.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(
            f"--out {out} is an existing file, not a folder. Give a new folder (or an earlier audit folder) to "
            "write the audit into."
        )
    real = out.resolve()
    for name, src in (inputs or {}).items():
        if src is None:
            continue
        root = (src.root if isinstance(src, Cohort) else _root_of(src)).expanduser().absolute().resolve()
        what = {"train": "training", "synthetic": "synthetic", "holdout": "holdout"}.get(name, name)
        if _within(real, root):
            fix = root.parent / (root.name + "-audit")
            raise OutputFolderError(
                f"--out {out} is inside the {what} input root {root}: the next audit would read its own outputs "
                f"as images. Write the audit outside every input folder, e.g. --out {fix}."
            )
        if _within(root, real):
            raise OutputFolderError(
                f"--out {out} holds the {what} input {root}; saving replaces the output folder as a whole. "
                "Write the audit into a folder of its own, outside the inputs."
            )
    if out.is_dir():
        entries = [e for e in os.scandir(out) if not e.name.startswith(".")]
        dirs = sorted(e.name for e in entries if e.is_dir())
        other = sorted(
            e.name for e in entries if not e.is_dir() and e.name not in FOLDER_FILES and not _is_companion(e.name)
        )
        if dirs or other:
            listed = ", ".join([*(d + "/" for d in dirs), *other][:5])
            raise OutputFolderError(
                f"--out {out} already holds files that are not part of an audit folder ({listed}); a save "
                "replaces the folder as a whole. Choose a new or empty folder, or an earlier audit folder."
            )
    return out


def drop_audit_outputs(cohort: Cohort) -> Cohort:
    """The cohort without the slices read from this tool's own output files inside its root.

    An ``audit.npz`` or ``evidence.npz`` beside a ``manifest.json``, ``summary.json`` or ``scores.csv`` (an audit
    folder), or holding this tool's arrays, is an output of an earlier audit, never an image: its slices are
    dropped and the file is listed in ``skipped`` with the reason (not missing evidence).

    Raises
    ------
    inspector.io.NoImagesError
        When nothing else is left.
    """

    def files_of(sl: Any) -> set[str]:
        return set(sl.sources) if sl.sources else {sl.path.split(":", 1)[0]}

    found = {f for sl in cohort.slices for f in files_of(sl) if Path(f).name in IMAGE_LIKE_OUTPUTS}
    own = {rel for rel in found if _is_own_output(cohort.root / rel)}
    if not own:
        return cohort
    keep = [sl for sl in cohort.slices if not files_of(sl) & own]
    # the members of those files that the readers skipped ("audit.npz:null_similarity: unsupported shape") go too
    skipped = [sk for sk in cohort.skipped if sk.path.split(":", 1)[0].split("#", 1)[0] not in own]
    for rel in sorted(own):
        where = Path(rel).parent.as_posix()
        reason = f"{OWN_OUTPUT_REASON} (the audit folder '{where}/' inside this input root); never read as an image"
        skipped.append(SkippedFile(rel, reason))
        log.warning("%s/%s is an output of an earlier audit inside the input root; not read", cohort.name, rel)
    if not keep:
        from .io import NoImagesError

        raise NoImagesError(
            f"Cohort {cohort.name!r} at {cohort.root} holds only the outputs of an earlier audit "
            f"({', '.join(sorted(own))}); point it at the images.",
            skipped,
        )
    files = tuple(f for f in cohort.files if f.path not in own)
    return Cohort(keep, cohort.root, skipped, cohort.name, files)


def _is_own_output(path: Path) -> bool:
    """An ``audit.npz``/``evidence.npz`` in an audit folder, or one holding this tool's members."""
    if any((path.parent / n).is_file() for n in (MANIFEST_FILE, "summary.json", "scores.csv")):
        return True
    try:
        import zipfile

        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except (OSError, ValueError, RuntimeError):  # not a zip (a bare .npy renamed): not ours
        return False
    return bool(names & {"null_similarity", "pairs_json", "neighbour_ref", "audit_id"})


def save_audit(result: AuditResult, out_dir: str | Path) -> Path:
    """Write the audit folder as a whole: ``scores.csv``, ``subjects.csv``, ``summary.json``, ``audit.npz``, the
    evidence and the manifest (see the module docstring), each carrying the audit ID.

    Everything is written into a hidden temporary sibling folder (``.<name>.tmp-*``) and fsynced, then swapped
    in by one rename (an atomic exchange where the system has it): a reader, or a crash, sees the old folder or
    the new one, never a mixture. An existing audit folder (of this audit or another) is replaced; its review
    database and reports are kept (they carry their audit's ID).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    OutputFolderError
        See :func:`check_output_folder` (the result's cohort roots are the inputs).
    """
    inputs = {"train": result.train, "synthetic": result.synthetic, "holdout": result.holdout}
    out = check_output_folder(out_dir, inputs)
    if out.is_symlink():  # replace the folder it names, not the link
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_outputs(result, tmp)
        if out.is_dir():
            for e in os.scandir(out):
                if not e.name.startswith(".") and e.is_file() and _is_companion(e.name):
                    _carry(Path(e.path), tmp / e.name)
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        if out.is_dir():
            if _exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.rmdir(old)
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("audit %s saved to %s", result.audit_id[:12], out)
    return out


def _write_outputs(result: AuditResult, out: Path) -> None:
    from .attribution import subjects_at

    aid = result.audit_id
    atomic_write_bytes(out / "scores.csv", result.table.assign(audit_id=aid).to_csv(index=False).encode())
    # at the audit's own setting, every flag from its Calibration (as the report and the app compute it)
    subjects = subjects_at(result.subjects, result.table, result.calibration, evidence=result.volume_evidence)
    atomic_write_bytes(out / "subjects.csv", subjects.assign(audit_id=aid).to_csv(index=False).encode())
    atomic_write_bytes(out / "volumes.csv", result.volumes().assign(audit_id=aid).to_csv(index=False).encode())
    atomic_write_bytes(out / "summary.json", json.dumps(jsonable(result.summary()), indent=2).encode())
    buf = io.BytesIO()
    arrays = {"null_similarity": np.asarray(result.null_similarity, np.float64), "audit_id": np.array(aid)}
    cal = result.calibration
    if cal.null_groups is not None:  # the holdout volume of each null score: the volume-level calibration
        arrays["null_groups"] = cal.null_groups.astype(str)
    if cal.null_subjects is not None:  # the holdout subject of each null score: its clusters
        arrays["null_subjects"] = cal.null_subjects.astype(str)
    arrays["level"] = np.array(cal.level)
    if getattr(cal, "volume_verified", False):  # the holdout volumes' 3D-verified similarities: the volume null
        arrays["volume_null_similarity"] = np.asarray(cal.volume_null_similarity, np.float64)
        arrays["volume_null_description"] = np.array(cal.volume_null_description or "")
    for layer in result.layers:
        arrays[f"neighbours__{layer}"] = result.neighbours[layer]
        arrays[f"neighbour_sims__{layer}"] = result.neighbour_sims[layer]
    if result.alignment is not None:
        for key, val in result.alignment.as_dict().items():
            arrays[f"alignment__{key}"] = np.asarray(val).astype(str) if key == "flip" else np.asarray(val)
    np.savez(buf, **arrays)
    atomic_write_bytes(out / "audit.npz", buf.getvalue())
    write_evidence(result, out)


def _carry(src: Path, dst: Path) -> None:
    """A companion file into the new folder: a hard link (the same file, so a writer holding it open loses
    nothing), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def load_alignment(audit_dir: str | Path) -> Alignment | None:
    """The registration stored in an audit folder's ``audit.npz`` (None in paper mode)."""
    path = Path(audit_dir) / "audit.npz"
    with np.load(path, allow_pickle=False) as z:
        keys = {k.split("__", 1)[1]: z[k] for k in z.files if k.startswith("alignment__")}
    return Alignment.from_dict(keys) if keys else None


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _finite_or_none(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None
