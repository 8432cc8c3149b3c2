"""The audit folder: one format, saved and loaded here and nowhere else.

:func:`save_audit` writes an :class:`~inspector.result.AuditResult` into a folder; :func:`load_audit_folder`
reads it back as an :class:`AuditFolder` whose :class:`~inspector.calibration.Calibration` is rebuilt from
the stored scores and null, so the report, the app and the gate ask the same object for every flag,
threshold and verdict. Files:

- ``scores.csv``: one row per synthetic slice (:data:`inspector.attribution.SCORE_COLUMNS` first);
- ``subjects.csv``: per training subject;
- ``summary.json``: the verdict, config, versions, inputs (validated against
  ``inspector/schemas/summary.schema.json``);
- ``audit.npz``: the null, the per-layer neighbours and the registration (``alignment__<field>``);
- ``evidence.npz``: images of every flagged pair and of the closest unflagged pairs;
- ``manifest.json``: every input file's sha256 (recorded by the readers when they loaded it), counts,
  skipped files, the extractor, config, versions and the sha256 of the files above.

Reviewer decisions and sign-offs live in one append-only store (:class:`inspector.review.ReviewStore`),
``reviews.sqlite3`` in the folder unless another database is named. No protected health information: the
folder holds pseudonymous subject IDs, relative paths and hashes only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .align import Alignment
from .cache import atomic_write_bytes
from .calibration import Calibration, Verdict
from .result import AuditResult, jsonable
from .review import DECISIONS, RecordedSignOff, Review, ReviewStore, SignOff, SignOffError
from .types import Cohort

__all__ = [
    "MAX_EVIDENCE_PAIRS",
    "N_CONTEXT_PAIRS",
    "AuditFolder",
    "AuditFolderError",
    "Evidence",
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
AUDIT_OUTPUTS: tuple[str, ...] = ("scores.csv", "subjects.csv", "summary.json", "audit.npz", EVIDENCE_FILE)

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
    }
)



class AuditFolderError(FileNotFoundError):
    """The audit folder lacks a file the report needs (run ``inspector scan --out DIR`` first)."""


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
    """Counts, content hash, every input file's sha256 (as the readers recorded it) and the skipped files."""
    if c is None:
        return None
    rows: list[dict[str, Any]] = [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in c.files]
    recorded = {f.path for f in c.files}
    missing = sorted({s.path for s in c.slices if not s.sources or not set(s.sources) <= recorded})
    for rel in missing:
        log.warning("input %s of cohort %s has no recorded file hash (built without a reader)", rel, c.name)
        rows.append({"path": rel, "bytes": None, "sha256": None, "error": "no file hash recorded when loaded"})
    return {
        "root": str(c.root),
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
    s_key = np.where(np.isfinite(s), -s, np.inf)
    f_rows = rows[flagged]
    f_rows = f_rows[np.lexsort((f_rows, s_key[f_rows], p[f_rows]))]
    u_rows = rows[~flagged]
    u_rows = u_rows[np.lexsort((u_rows, s_key[u_rows]))][:n_context]
    return np.concatenate([f_rows, u_rows]).astype(np.int64)[:max_pairs]


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
    - ``layers_json``: JSON list of the L layer names.

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
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        rows=rows,
        synthetic=synthetic,
        aligned=aligned,
        difference=difference,
        neighbour_images=nb_arr,
        neighbour_ref=refs,
        pairs_json=np.array(json.dumps(pairs)),
        layers_json=np.array(json.dumps(layers)),
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

    @property
    def audit_id(self) -> str:
        return str(self.summary["audit_id"])

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
        p = self.calibration.p_values[rows]
        s = self.calibration.similarity[rows]
        return rows[np.lexsort((rows, -np.nan_to_num(s, nan=-np.inf), p))]

    @property
    def intact(self) -> bool:
        return all(r["ok"] for r in self.integrity)


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
    """Read an audit folder written by ``inspector scan`` (:meth:`AuditResult.save`).

    Raises
    ------
    AuditFolderError
        When the folder or ``summary.json``/``scores.csv``/``subjects.csv`` is missing.
    """
    folder = Path(audit_dir).expanduser()
    if not folder.is_dir():
        raise AuditFolderError(f"Audit folder {folder} does not exist; run 'inspector scan ... --out {folder}' first.")
    try:
        summary = json.loads(_require(folder, "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'summary.json'} is not valid JSON ({e}); re-run 'inspector scan'.") from e
    table = _read_csv(_require(folder, "scores.csv"))
    subjects = _read_csv(_require(folder, "subjects.csv"))
    with np.load(_require(folder, "audit.npz"), allow_pickle=False) as z:
        if "null_similarity" not in z:
            raise AuditFolderError(f"{folder / 'audit.npz'} holds no null; re-run 'inspector scan ... --out {folder}'.")
        null = np.asarray(z["null_similarity"], np.float64)
    calibration = _calibration(summary, table, null, folder)
    manifest = None
    if (folder / MANIFEST_FILE).is_file():
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    else:
        log.warning("%s has no %s: the report will lack input hashes", folder, MANIFEST_FILE)
    evidence = None
    if (folder / EVIDENCE_FILE).is_file():
        with np.load(folder / EVIDENCE_FILE, allow_pickle=False) as z:
            evidence = Evidence(
                rows=np.asarray(z["rows"], np.int64),
                synthetic=np.asarray(z["synthetic"], np.float32),
                aligned=np.asarray(z["aligned"], np.float32),
                difference=np.asarray(z["difference"], np.float32),
                neighbour_images=np.asarray(z["neighbour_images"], np.float32),
                neighbour_ref=np.asarray(z["neighbour_ref"], np.int64),
                pairs=json.loads(str(z["pairs_json"])),
                layers=json.loads(str(z["layers_json"])),
            )
    else:
        log.warning("%s has no %s: the report will show no pair images", folder, EVIDENCE_FILE)
    integrity = []
    for name, expected in (manifest or {}).get("outputs", {}).items():
        actual = sha256_file(folder / name) if (folder / name).is_file() else None
        integrity.append({"file": name, "expected": expected, "actual": actual, "ok": actual == expected})
    if not all(r["ok"] for r in integrity):
        bad = [r["file"] for r in integrity if not r["ok"]]
        log.warning("audit folder %s was modified after the scan: %s", folder, ", ".join(bad))
    return AuditFolder(folder, summary, table, subjects, calibration, manifest, evidence, integrity)


def _calibration(summary: dict[str, Any], table: pd.DataFrame, null: np.ndarray, folder: Path) -> Calibration:
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
    out["verdict"], out["verdict_text"] = jsonable(v.to_dict()), v.text
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


def save_audit(result: AuditResult, out_dir: str | Path) -> Path:
    """Write the audit folder: ``scores.csv``, ``subjects.csv``, ``summary.json``, ``audit.npz``, the evidence
    and the manifest (see the module docstring).

    Returns
    -------
    Path
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "scores.csv", result.table.to_csv(index=False).encode())
    atomic_write_bytes(out / "subjects.csv", result.subjects.to_csv(index=False).encode())
    atomic_write_bytes(out / "summary.json", json.dumps(result.summary(), indent=2).encode())
    buf = io.BytesIO()
    arrays = {"null_similarity": np.asarray(result.null_similarity, np.float64)}
    for layer in result.layers:
        arrays[f"neighbours__{layer}"] = result.neighbours[layer]
        arrays[f"neighbour_sims__{layer}"] = result.neighbour_sims[layer]
    if result.alignment is not None:
        for key, val in result.alignment.as_dict().items():
            arrays[f"alignment__{key}"] = np.asarray(val).astype(str) if key == "flip" else np.asarray(val)
    np.savez(buf, **arrays)
    atomic_write_bytes(out / "audit.npz", buf.getvalue())
    write_evidence(result, out)
    log.info("audit %s saved to %s", result.audit_id[:12], out)
    return out


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
