"""The result of an audit: everything the app, the report and the CLI need.

:class:`AuditResult` is computed once by :func:`inspector.audit` (:mod:`inspector.pipeline`); the app and
the report only read it. Flags, thresholds and the verdict at any ``(alpha, fdr)`` are asked of its
:class:`~inspector.calibration.Calibration` (a look-up over stored arrays, never a recomputation), and pair
views (:meth:`AuditResult.pair`) are built from stored arrays. Saving and loading the audit folder live in
:mod:`inspector.folder`.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .align import Alignment
from .calibration import Calibration, Verdict
from .config import AuditConfig
from .types import Cohort, SkippedFile

__all__ = [
    "AuditResult",
    "MissingEvidenceError",
    "PairEvidence",
    "evidence_note",
    "is_missing_evidence",
    "jsonable",
    "missing_evidence",
    "skipped_records",
    "versions",
]

# ----------------------------------------------------------------------------------------------
# Skipped files: which are missing evidence
# ----------------------------------------------------------------------------------------------

#: Extensions of files that are never images (sidecars, notes, tables, the tool's own text outputs): a
#: cohort file skipped as an unsupported format with one of these is not missing evidence.
NON_IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {
        ".json", ".csv", ".tsv", ".txt", ".md", ".rst", ".html", ".htm", ".pdf", ".xml", ".yaml", ".yml",
        ".toml", ".ini", ".cfg", ".log", ".bval", ".bvec", ".py", ".sh", ".db", ".sqlite", ".sqlite3",
        ".sqlite3-wal", ".sqlite3-shm", ".sqlite3-journal", ".db-wal", ".db-shm", ".db-journal",
    }
)  # fmt: skip
#: Names without an extension that are documentation, never images (BIDS has README, CHANGES, LICENSE).
NON_IMAGE_NAMES: frozenset[str] = frozenset({"readme", "changes", "license", "licence", "authors", "notice"})
#: Reason prefixes of skips that lose no evidence: an empty slice of a volume, a file without content, a
#: manifest listing the same file twice, the tool's own outputs.
_BENIGN_REASONS: tuple[str, ...] = (
    "background-only slice",
    "constant image",
    "constant volume",
    "listed more than once in manifest",
    "output of an earlier audit",
)
#: The reason :func:`inspector.folder.drop_audit_outputs` gives the tool's own output files in an input root.
OWN_OUTPUT_REASON = "output of an earlier audit"


def is_missing_evidence(skipped: SkippedFile) -> bool:
    """Whether a skipped entry is missing evidence: content the audit should have read and did not.

    Not missing evidence: a background-only slice of a volume, a constant (content-free) image or volume, a
    second listing of the same file in a manifest, the tool's own outputs, and a file of an unsupported format
    whose name marks it as a non-image (a ``.json`` sidecar, a ``.tsv`` table, ``README``...;
    :data:`NON_IMAGE_SUFFIXES`, :data:`NON_IMAGE_NAMES`). Everything else is: a corrupt or undecodable file, a
    file over a reader's budget or past its deadline, a special file, a manifest row whose file is missing, a
    slice dropped as a duplicate key, an unsupported file that may be an image. Unknown reasons count as
    missing evidence (the safe side). An entry already judged on its real name (``skipped.missing_evidence``,
    set on pseudonymous copies by :mod:`inspector.naming`) keeps that judgement.
    """
    if skipped.missing_evidence is not None:
        return bool(skipped.missing_evidence)
    reason = skipped.reason.strip().lower()
    if reason.startswith(_BENIGN_REASONS):
        return False
    if reason.startswith("unsupported format"):
        name = Path(skipped.path).name.lower()
        if name in NON_IMAGE_NAMES or any(name.endswith(suf) for suf in NON_IMAGE_SUFFIXES):
            return False
    return True


def missing_evidence(cohort: Cohort | None) -> list[SkippedFile]:
    """The skipped entries of a cohort that are missing evidence (:func:`is_missing_evidence`), in order."""
    if cohort is None:
        return []
    return [sk for sk in cohort.skipped if is_missing_evidence(sk)]


def skipped_records(cohort: Cohort | None) -> list[dict[str, Any]]:
    """``{path, reason, missing_evidence}`` per skipped file of a cohort, for ``summary.json``.

    Background-only slices of volumes (``path#index``, one per empty slice, often thousands) are left out;
    ``manifest.json`` lists them all and ``n_skipped`` counts them.
    """
    if cohort is None:
        return []
    return [
        {"path": sk.path, "reason": sk.reason, "missing_evidence": is_missing_evidence(sk)}
        for sk in cohort.skipped
        if not sk.reason.lower().startswith("background-only slice")
    ]


_COHORT_WORDS = {"train": "training", "holdout": "holdout", "synthetic": "synthetic"}


def evidence_note(counts: dict[str, int]) -> str:
    """The sentence the verdict carries when files were skipped as missing evidence ('' when none).

    Parameters
    ----------
    counts : dict of str to int
        Missing-evidence files per cohort (``train``, ``holdout``, ``synthetic``).
    """
    parts = []
    for name in ("train", "holdout"):
        n = int(counts.get(name, 0) or 0)
        if n:
            parts.append(
                f"{n} {_COHORT_WORDS[name]} file{'s were' if n != 1 else ' was'} skipped: missing evidence"
                + (" (a copy of a skipped training slice cannot be detected)" if name == "train" else "")
                + "."
            )
    n = int(counts.get("synthetic", 0) or 0)
    if n:
        parts.append(
            f"{n} synthetic file{'s' if n != 1 else ''} could not be read and {'were' if n != 1 else 'was'} "
            "not audited."
        )
    return " ".join(parts)


class MissingEvidenceError(ValueError):
    """Training or holdout files were skipped (unreadable, over a budget...) and ``allow_skipped`` is off.

    Attributes
    ----------
    skipped : dict of str to list of SkippedFile
        The missing-evidence files per cohort (``train``, ``holdout``).
    """

    def __init__(self, skipped: dict[str, list[SkippedFile]], names: dict[str, str] | None = None) -> None:
        self.skipped = {k: list(v) for k, v in skipped.items() if v}
        names = names or {}
        total = sum(len(v) for v in self.skipped.values())
        lines = []
        counted = []
        for cohort, files in self.skipped.items():
            word, name = _COHORT_WORDS.get(cohort, cohort), names.get(cohort)
            counted.append(f"{len(files)} {word} file{'s' if len(files) != 1 else ''}")
            lines.append(f"  {word} cohort {name!r}:" if name else f"  {word} cohort:")
            lines.extend(f"    - {sk.path}: {sk.reason}" for sk in files)
        verb = "were" if total != 1 else "was"
        super().__init__(
            f"{' and '.join(counted)} {verb} skipped: missing evidence (a copy of a skipped training slice would go "
            "undetected), so the audit refuses to run.\n"
            + "\n".join(lines)
            + "\nFix or remove these files, or run with --allow-skipped (app: 'Allow skipped') to audit without "
            "them; they are then listed in summary.json, the verdict and the report."
        )

    @property
    def files(self) -> list[tuple[str, SkippedFile]]:
        """``(cohort, skipped file)`` for every missing-evidence file."""
        return [(c, sk) for c, files in self.skipped.items() for sk in files]


def versions() -> dict[str, str]:
    """Versions of the package, Python and the main dependencies."""
    out = {"inspector": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("numpy", "scipy", "torch", "faiss", "pandas", "sklearn", "nibabel", "pydicom"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001 - a missing optional module is just not listed
            continue
    return out


@dataclass
class PairEvidence:
    """What the app and the report show for one synthetic slice.

    Attributes
    ----------
    index : int
        Row of the synthetic slice in ``AuditResult.table``.
    synthetic : np.ndarray, shape (H, W)
        The synthetic slice (float intensities in [0, 1]).
    layers : dict of str to list of dict
        Per layer, the top-k training neighbours: ``{"train_index", "similarity", "path", "slice_index",
        "subject_id", "image"}`` with ``image`` (H, W) aligned to the synthetic slice's view.
    aligned : np.ndarray or None, shape (H, W)
        The best training candidate registered onto the synthetic slice (default mode).
    difference : np.ndarray or None, shape (H, W)
        ``|synthetic - aligned|``.
    transform : dict
        The registration that matched: flip, angle (deg), scale, shift.
    """

    index: int
    synthetic: np.ndarray
    layers: dict[str, list[dict[str, Any]]]
    aligned: np.ndarray | None
    difference: np.ndarray | None
    transform: dict[str, Any] = field(default_factory=dict)


#: The volume stage's columns of ``volumes.csv`` (read back into the calibration's volume evidence).
VOLUME_EVIDENCE_COLUMNS: tuple[str, ...] = (
    "volume",
    "volume_similarity",
    "volume_ncc",
    "coverage",
    "verified_train_volume",
    "verified_train_subject",
    "slice_consistency",
    "run_first",
    "run_last",
    "run_slope",
    "run_offset",
    "n_candidate_volumes",
    "transform",
)


@dataclass
class VolumePair:
    """A synthetic volume and its verified training volume in the synthetic volume's frame (the volume viewer's).

    Attributes
    ----------
    volume, train_volume, train_subject : str
    synthetic : np.ndarray, shape (D, S, S)
        The synthetic volume's slices in slice-index order, in [0, 1].
    aligned : np.ndarray, shape (D, S, S)
        The training volume resampled by the 3D transform onto the synthetic volume's grid (0 outside it).
    difference : np.ndarray, shape (D, S, S)
        ``|synthetic - aligned|``.
    matrix : np.ndarray, shape (3, 4)
        The transform (:class:`inspector.volumes.VolumeAlignment`).
    rows : np.ndarray of int, shape (D,)
        The score table's row of each synthetic slice (its slice-level evidence).
    slice_index : np.ndarray of int, shape (D,)
    similarity, ncc, coverage : float
        The volume similarity (``ncc * coverage``) and its parts.
    """

    volume: str
    train_volume: str
    train_subject: str
    synthetic: np.ndarray
    aligned: np.ndarray
    difference: np.ndarray
    matrix: np.ndarray
    rows: np.ndarray
    slice_index: np.ndarray
    similarity: float
    ncc: float
    coverage: float

    def plane(self, which: str, index: int, image: str = "synthetic") -> np.ndarray:
        """One plane of one stack: ``which`` in ``axial`` (the slices), ``coronal`` (rows), ``sagittal`` (columns).

        ``image`` is ``synthetic``, ``aligned`` or ``difference``; ``index`` is clipped to the stack.

        Returns
        -------
        np.ndarray, shape (S, S) for axial, (D, S) otherwise
        """
        vols = {"synthetic": self.synthetic, "aligned": self.aligned, "difference": self.difference}
        if image not in vols:
            raise ValueError(f"image must be one of {sorted(vols)}; got {image!r}.")
        vol = vols[image]
        if which == "axial":
            return vol[int(np.clip(index, 0, vol.shape[0] - 1))]
        if which == "coronal":
            return vol[:, int(np.clip(index, 0, vol.shape[1] - 1)), :]
        if which == "sagittal":
            return vol[:, :, int(np.clip(index, 0, vol.shape[2] - 1))]
        raise ValueError(f"plane must be axial, coronal or sagittal; got {which!r}.")


@dataclass(eq=False)
class AuditResult:
    """The outcome of :func:`inspector.audit`.

    Attributes
    ----------
    audit_id : str
        Hash of the inputs' content and the config; keys reviewer decisions.
    config : AuditConfig
    train, synthetic : Cohort
    holdout : Cohort or None
    table : pandas.DataFrame
        One row per synthetic slice: the ``scores.csv`` columns
        (:data:`inspector.attribution.SCORE_COLUMNS`), one ``sim_<layer>`` per layer, ``layer_consensus``,
        ``margin``, ``sha256``, ``nearest_train_index``, the registration and baseline columns, and
        ``label``/``source``/``augmentation`` where ground truth exists. Higher ``similarity``, ``mi`` and
        ``mi_z``, lower ``p_value`` and ``oni`` mean *more memorised*. ``flagged`` is at the audit's own
        ``(alpha, fdr)``.
    calibration : Calibration
        The null, the p-values, the flags, the thresholds and the verdict at any ``(alpha, fdr)``.
    subjects : pandas.DataFrame
        Per training subject: slices, synthetic slices attributed, flagged slices.
    layers : list of str
    neighbours, neighbour_sims : dict of str to np.ndarray, shape (m, top_k)
        Per layer, training indices and similarities of each synthetic slice's nearest neighbours.
    alignment : Alignment or None
        The best registered candidate per synthetic slice (with ``train_index``). None in paper mode.
    baselines : dict
        CT-score, AuthPct, DCR and pixel correlation on the same inputs.
    timings : dict of str to float
        Seconds per stage.
    volume_evidence : pandas.DataFrame or None
        Per synthetic volume, its 3D-verified match (:meth:`inspector.pipeline.VolumeEvidence.table`: volume
        similarity, NCC, coverage, the training volume, the slice run and the 3D transform) when the unit is
        ``volume``; None otherwise.
    versions : dict of str to str
    created : str
        UTC timestamp.
    """

    audit_id: str
    config: AuditConfig
    train: Cohort
    synthetic: Cohort
    holdout: Cohort | None
    table: pd.DataFrame
    calibration: Calibration
    subjects: pd.DataFrame
    layers: list[str]
    neighbours: dict[str, np.ndarray]
    neighbour_sims: dict[str, np.ndarray]
    alignment: Alignment | None = None
    baselines: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    extractor_fingerprint: str = ""
    volume_evidence: pd.DataFrame | None = None
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ decisions (asked of the calibration)
    @property
    def verdict(self) -> Verdict:
        """The dataset verdict at the audit's own ``(alpha, fdr)``."""
        return self.calibration.verdict()

    @property
    def missing_evidence(self) -> dict[str, list[SkippedFile]]:
        """Skipped files that are missing evidence, per cohort (``train``, ``synthetic``, ``holdout``).

        Non-empty for ``train``/``holdout`` only when the audit ran with ``allow_skipped``; a synthetic file that
        could not be read was not audited.
        """
        return {
            "train": missing_evidence(self.train),
            "synthetic": missing_evidence(self.synthetic),
            "holdout": missing_evidence(self.holdout),
        }

    @property
    def evidence_complete(self) -> bool:
        """No training or holdout file is missing (the gate fails otherwise unless ``allow_skipped``)."""
        gaps = self.missing_evidence
        return not gaps["train"] and not gaps["holdout"]

    @property
    def evidence_note(self) -> str:
        """The sentence the verdict carries about skipped files ('' when nothing is missing)."""
        return evidence_note({k: len(v) for k, v in self.missing_evidence.items()})

    @property
    def verdict_text(self) -> str:
        """The verdict in plain words, with :attr:`evidence_note` when files are missing."""
        return " ".join(t for t in (self.verdict.text, self.evidence_note) if t)

    @property
    def null_similarity(self) -> np.ndarray:
        """The null scores, shape (n_null,)."""
        return self.calibration.null

    @property
    def has_ground_truth(self) -> bool:
        return "label" in self.table and self.table["label"].notna().any()

    def volumes(self, alpha: float | None = None, fdr: bool | None = None) -> pd.DataFrame:
        """Per synthetic volume at ``(alpha, fdr)``: ``volumes.csv`` (:func:`inspector.attribution.volumes_table`)."""
        from .attribution import volumes_table

        # memoised per setting (an alpha or BH change redraws every page from it); keyed by the objects it reads
        inputs = (self.table, self.calibration, self.volume_evidence)
        hit = self._memo.get(("volumes", alpha, fdr))
        if hit is None or any(a is not b for a, b in zip(hit[0], inputs, strict=True)):
            hit = (inputs, volumes_table(self.table, self.calibration, alpha, fdr, evidence=self.volume_evidence))
            self._memo[("volumes", alpha, fdr)] = hit
        return hit[1].copy()

    def flags(self, alpha: float | None = None, fdr: bool | None = None) -> np.ndarray:
        """Flags at ``(alpha, fdr)`` (default: the audit's), shape (m,) bool. See :meth:`Calibration.flags`."""
        return self.calibration.flags(alpha, fdr)

    # ------------------------------------------------------------------ ground truth
    def roc(self, score: str = "similarity") -> dict[str, Any] | None:
        """ROC curve of ``score`` against the ground truth (``label == "copy"``), when it exists.

        Returns
        -------
        dict with ``fpr``, ``tpr``, ``thresholds`` (arrays), ``auc`` and ``average_precision``, or None.
        """
        hit = self._memo.get(("roc", score))
        if hit is None or hit[0] is not self.table:  # memoised per score while the table is the same object
            hit = (self.table, self._roc(score))
            self._memo[("roc", score)] = hit
        return None if hit[1] is None else dict(hit[1])

    def _roc(self, score: str) -> dict[str, Any] | None:
        if not self.has_ground_truth:
            return None
        from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

        lab = self.table["label"].fillna("").to_numpy()
        known = np.isin(lab, ["copy", "novel"])
        y = (lab[known] == "copy").astype(int)
        s = self.table[score].to_numpy(float)[known]
        if y.min() == y.max():
            return None
        fpr, tpr, thr = roc_curve(y, s)
        return {
            "fpr": fpr,
            "tpr": tpr,
            "thresholds": thr,
            "auc": float(roc_auc_score(y, s)),
            "average_precision": float(average_precision_score(y, s)),
        }

    def confusion_at(self, alpha: float | None = None, fdr: bool | None = None) -> dict[str, int] | None:
        """Confusion counts of the flags at ``(alpha, fdr)`` against the ground truth, when it exists."""
        if not self.has_ground_truth:
            return None
        lab = self.table["label"].fillna("").to_numpy()
        f = self.flags(alpha, fdr)
        copy, novel = lab == "copy", lab == "novel"
        return {
            "tp": int((f & copy).sum()),
            "fp": int((f & novel).sum()),
            "fn": int((~f & copy).sum()),
            "tn": int((~f & novel).sum()),
        }

    # ------------------------------------------------------------------ evidence for one pair
    def pair(self, index: int, k: int | None = None) -> PairEvidence:
        """The synthetic slice ``index`` beside its nearest training slices at every layer.

        Neighbour images are shown in the synthetic slice's matched view (the registration's view of the
        training slice), and the best candidate is registered onto the synthetic slice for the difference map.

        Parameters
        ----------
        index : int
            Row in :attr:`table`.
        k : int, optional
            Neighbours per layer (default ``config.top_k``).

        Returns
        -------
        PairEvidence
        """
        from .align import apply_alignment_single
        from .preprocess import resize_square
        from .views import View

        m = len(self.table)
        if not 0 <= index < m:
            raise IndexError(f"pair index {index} out of range for {m} synthetic slices.")
        k = self.config.top_k if k is None else k
        size = self.config.size
        syn = resize_square(self.synthetic[index].array, size)
        al = self.alignment
        view = View.parse(al.flip[index]) if al is not None else View.ID
        layers: dict[str, list[dict[str, Any]]] = {}
        for layer in self.layers:
            rows = []
            for idx, sim in zip(self.neighbours[layer][index, :k], self.neighbour_sims[layer][index, :k], strict=False):
                sl = self.train[int(idx)]
                rows.append(
                    {
                        "train_index": int(idx),
                        "similarity": float(sim),
                        "path": sl.path,
                        "slice_index": sl.slice_index,
                        "subject_id": sl.subject_id,
                        "image": view.apply(resize_square(sl.array, size)),
                    }
                )
            layers[layer] = rows
        aligned = diff = None
        transform: dict[str, Any] = {}
        if al is not None:
            transform = al.transform(index)
            aligned = apply_alignment_single(resize_square(self.train[transform["train_index"]].array, size), transform)
            diff = np.abs(syn - aligned)
        return PairEvidence(index, syn, layers, aligned, diff, transform)

    def volume_pair(self, volume: str, *, size: int | None = None) -> VolumePair:
        """A synthetic volume beside the training volume it was verified against, aligned by the 3D transform.

        Parameters
        ----------
        volume : str
            A synthetic volume (``volumes.csv``'s ``volume``).
        size : int, optional
            In-plane size of the stacks (default ``config.size``).

        Returns
        -------
        VolumePair

        Raises
        ------
        KeyError
            ``volume`` is not a synthetic volume of this audit, or was not verified in 3D (unit ``slice``, a 2D
            image, or no candidate training volume), with the reason.
        """
        import json

        from .preprocess import resize_square
        from .volumes import resample_to

        ev = self.volume_evidence
        if ev is None:
            raise KeyError(
                f"volume {volume!r}: this audit's unit is 'slice'; run it with --unit volume to verify volumes."
            )
        row = ev[ev["volume"].astype(str) == str(volume)]
        if row.empty:
            raise KeyError(f"{volume!r} is not a synthetic volume of this audit; see volumes.csv for the names.")
        r = row.iloc[0]
        train_volume = str(r["verified_train_volume"] or "")
        if not train_volume or not str(r["transform"] or ""):
            raise KeyError(f"volume {volume!r} was not verified in 3D (a 2D image, or no training volume matched).")
        size = int(size or self.config.size)
        syn_rows = sorted(
            (i for i, s in enumerate(self.synthetic.slices) if s.path == str(volume)),
            key=lambda i: self.synthetic.slices[i].slice_index,
        )
        tr_rows = sorted(
            (i for i, s in enumerate(self.train.slices) if s.path == train_volume),
            key=lambda i: self.train.slices[i].slice_index,
        )
        syn = resize_square(np.stack([self.synthetic.slices[i].array for i in syn_rows]), size)
        tr = resize_square(np.stack([self.train.slices[i].array for i in tr_rows]), size)
        matrix = np.asarray(json.loads(str(r["transform"])), np.float64)
        aligned = resample_to(tr, matrix, syn.shape)
        return VolumePair(
            volume=str(volume),
            train_volume=train_volume,
            train_subject=str(r["verified_train_subject"]),
            synthetic=syn,
            aligned=aligned,
            difference=np.abs(syn - aligned),
            matrix=matrix,
            rows=np.asarray(syn_rows, np.int64),
            slice_index=np.asarray([self.synthetic.slices[i].slice_index for i in syn_rows], np.int64),
            similarity=float(r["volume_similarity"]),
            ncc=float(r["volume_ncc"]),
            coverage=float(r["coverage"]),
        )

    def subject_slices(self, subject_id: str) -> list[int]:
        """Training indices of one subject's slices, ordered by path and slice index."""
        idx = [i for i, s in enumerate(self.train.slices) if s.subject_id == subject_id]
        return sorted(idx, key=lambda i: (self.train[i].path, self.train[i].slice_index))

    # ------------------------------------------------------------------ the JSON summary
    def summary(self) -> dict[str, Any]:
        """The JSON summary: verdict, counts, config, versions, inputs and their hashes.

        Each cohort's root only as ``root_sha256`` (:func:`inspector.naming.root_hash`), never the root; its
        paths (skipped files) are the cohort's own: relative to the root, or labels (``config.show_paths`` off).
        """
        from .privacy import root_hash

        def cohort_info(c: Cohort | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {
                "root_sha256": root_hash(c.root),
                "n_slices": len(c),
                "n_subjects": len(c.subjects),
                "n_files": len({s.path for s in c.slices}),
                "n_skipped": len(c.skipped),
                "n_missing_evidence": len(missing_evidence(c)),
                "skipped": skipped_records(c),
                "content_hash": c.content_hash,
            }

        v = self.verdict
        return {
            "audit_id": self.audit_id,
            "created": self.created,
            "verdict_text": self.verdict_text,
            "verdict": jsonable(v.to_dict()),
            "baselines": jsonable(self.baselines),
            "config": self.config.to_dict(),
            "extractor_fingerprint": self.extractor_fingerprint,
            "layers": list(self.layers),
            "cohorts": {
                "train": cohort_info(self.train),
                "synthetic": cohort_info(self.synthetic),
                "holdout": cohort_info(self.holdout),
            },
            "timings_seconds": {k: round(v, 3) for k, v in self.timings.items()},
            "versions": self.versions,
        }


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy values, tuples and paths as plain JSON types (non-finite floats as None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj
