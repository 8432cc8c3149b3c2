"""Pseudonymous names in every output: file and folder names become ``<subject pseudonym>/vol-<n>``.

File and folder names of medical images often carry a patient's name or record number
(``Patient_Doe_Jane_MRN12345/scan.nii.gz``), and so do subject IDs derived from them. Unless the user opts
in to real names (:attr:`inspector.config.AuditConfig.show_paths`), :func:`inspector.audit` publishes its
result through :func:`publish` (this module is the one place the mapping is built and applied), so that the
score tables, ``summary.json``, ``manifest.json``, ``evidence.npz``, the review database, the report, the app
and the CLI only ever see the published names. Reading, the ground truth (``labels.csv``, keyed by real paths)
and every internal join run on the real paths first; the mapping is applied to their results.

The rule (deterministic: the same inputs and key give the same names)
---------------------------------------------------------------------
* **Subjects**: a raw subject ID (a file stem, a folder name, a manifest's ``subject_id``) becomes its keyed
  pseudonym :func:`inspector.privacy.pseudonym` (``"sub-"`` + 12 hex characters of HMAC-SHA256 under the
  project's secret key, :func:`inspector.privacy.load_or_create_key`). An ID that already is such a pseudonym
  (every DICOM subject, pseudonymised by the reader) is kept as it is. The same raw ID gives the same
  pseudonym in every cohort.
* **Volumes** (``Slice.path``: a volume file, a 2D image file, a DICOM series folder, an ``.npz`` member):
  ``"<subject pseudonym>/vol-<n>"``, ``n`` counting (from 1, at least 3 digits) the subject's volumes of that
  cohort in the order of their real paths. The slice index stays in its own column (``label#index`` where a key
  joins them).
* **Input files** that are not themselves a volume (each file of a DICOM series, an ``.npz`` holding several
  arrays): ``"<subject pseudonym>/file-<n>"``, numbered per subject in the order of their real paths.
* **Skipped files** that gave no slice (unreadable, unsupported...): ``"skipped/file-<n><ext>"``, numbered per
  cohort in the order of their real paths, keeping the file's extension (which says whether a skipped file
  was an image); a skipped slice of a loaded volume is ``"<volume label>#<index>"``. The entry's real path,
  file name and folder (``folder/``) quoted in its skip reason are replaced by the label (or ``<folder>/``), the
  cohort root by ``<root>``; whether it is missing evidence is judged on the real name and kept
  (:attr:`inspector.types.SkippedFile.missing_evidence`).
* **Cohort names** (the root folder's name by default) become the role: ``train``, ``synthetic``,
  ``holdout``. The roots themselves stay in memory (to refuse an output folder inside an input) and reach the
  outputs only as ``root_sha256`` (:func:`inspector.privacy.root_hash`), with or without ``show_paths``.

Adding or removing a file can renumber the other volumes of its subject; pseudonyms change only with the key.
With ``show_paths`` the mapping is the identity, except that a skip reason quoting the absolute cohort root (a
reader's error message) quotes the path relative to it.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .privacy import pseudonym
from .result import is_missing_evidence
from .types import Cohort, SkippedFile, SourceFile

__all__ = ["Naming", "PSEUDONYM_RE", "SKIPPED_PREFIX", "UNNAMED", "build_naming", "publish"]

log = logging.getLogger(__name__)

#: A keyed subject pseudonym as :func:`inspector.privacy.pseudonym` writes it (kept unchanged).
PSEUDONYM_RE = re.compile(r"sub-[0-9a-f]{12}")
#: Label prefix of skipped files that gave no slice.
SKIPPED_PREFIX = "skipped"
#: What a path that the mapping does not know is published as (never its real name).
UNNAMED = "unnamed"
_INDEX_RE = re.compile(r"^(.*)#(\d+)$")
_ROLES = ("train", "synthetic", "holdout")


@dataclass
class _CohortNames:
    """Raw → published names within one cohort."""

    volumes: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)
    root: str = ""

    def path(self, raw: str) -> str:
        """The label of a volume, an input file or a skipped entry (``path#index`` kept as ``label#index``)."""
        raw = str(raw)
        for table in (self.volumes, self.files, self.skipped, self.members):
            if raw in table:
                return table[raw]
        m = _INDEX_RE.match(raw)
        if m is not None:
            return f"{self.path(m.group(1))}#{m.group(2)}"
        log.warning("a path without a published name was replaced by %r", UNNAMED)
        return UNNAMED


@dataclass
class Naming:
    """The mapping of one audit: raw path → label per cohort, raw subject → pseudonym.

    Build it with :func:`build_naming`; :func:`publish` applies it. With ``show_paths`` it is the identity.

    Attributes
    ----------
    show_paths : bool
        The user opted in to real file and folder names: every method returns its input.
    subjects : dict of str to str
        Raw subject ID → pseudonym (every subject of every cohort).
    cohorts : dict of str to _CohortNames
        Per role (``train``, ``synthetic``, ``holdout``), the labels of its volumes, files and skipped entries.
    key : bytes
        The pseudonym key (for a subject ID met only after the mapping was built); never shown.
    """

    show_paths: bool
    subjects: dict[str, str] = field(default_factory=dict)
    cohorts: dict[str, _CohortNames] = field(default_factory=dict)
    key: bytes = field(default=b"", repr=False)

    # ------------------------------------------------------------------ single names
    def subject(self, raw: Any) -> str:
        """The published subject ID (``""`` stays ``""``)."""
        raw = "" if raw is None else str(raw)
        if self.show_paths or not raw:
            return raw
        if raw not in self.subjects:
            self.subjects[raw] = raw if PSEUDONYM_RE.fullmatch(raw) else pseudonym(raw, self.key)
        return self.subjects[raw]

    def path(self, role: str, raw: Any) -> str:
        """The published name of a path of cohort ``role`` (``""`` stays ``""``)."""
        raw = "" if raw is None else str(raw)
        if self.show_paths or not raw:
            return raw
        if role not in self.cohorts:
            return UNNAMED
        return self.cohorts[role].path(raw)

    # ------------------------------------------------------------------ whole objects
    def cohort(self, role: str, c: Cohort | None) -> Cohort | None:
        """The cohort with published slice paths, subjects, sources, files, skipped entries and name.

        The slices keep their arrays, order, indices and hashes; the root stays the real one (it reaches the
        outputs only as :func:`inspector.privacy.root_hash`). With ``show_paths`` the cohort itself, except that
        a skip reason quoting the absolute root quotes the relative path instead.
        """
        if c is None:
            return c
        if self.show_paths:
            return _without_root(c)
        names = self.cohorts[role]
        slices = []
        for s in c.slices:
            t = copy.copy(s)
            object.__setattr__(t, "path", names.path(s.path))
            object.__setattr__(t, "subject_id", self.subject(s.subject_id))
            object.__setattr__(t, "sources", tuple(sorted(names.path(p) for p in s.sources)))
            slices.append(t)
        files = tuple(SourceFile(names.path(f.path), f.bytes, f.sha256) for f in c.files)
        skipped = [
            SkippedFile(names.path(sk.path), self._reason(role, sk), is_missing_evidence(sk)) for sk in c.skipped
        ]  # judged on the real name: a label no longer shows that a skipped README is no image
        return Cohort(slices, c.root, skipped, role, files)

    def _reason(self, role: str, sk: SkippedFile) -> str:
        """A skip reason with the real path, file and folder names it quotes replaced."""
        reason = sk.reason
        if reason.startswith("background-only slice"):
            return reason
        names = self.cohorts[role]
        base = sk.path
        m = _INDEX_RE.match(base)
        if m is not None:
            base = m.group(1)
        label = names.path(base)
        file_part = base.split(":", 1)[0]
        pairs: list[tuple[str, str]] = []
        root = names.root
        for raw in dict.fromkeys((base, file_part)):
            if root:
                pairs.append((f"{root}/{raw}", label))
            pairs.append((raw, label))
        name = Path(file_part).name
        if name:
            pairs.append((name, label))
        parent = Path(file_part).parent.as_posix()
        if parent not in (".", ""):  # its folder quoted as a folder ('old_audit/')
            pairs.append((parent + "/", "<folder>/"))
        if root:
            pairs.append((root, "<root>"))
        for raw, new in sorted(pairs, key=lambda p: len(p[0]), reverse=True):
            if raw:
                reason = reason.replace(raw, new)
        return reason

    def column(self, role: str, values: Iterable[Any]) -> list[str]:
        """:meth:`path` of every value."""
        return [self.path(role, v) for v in values]

    def subject_column(self, values: Iterable[Any]) -> list[str]:
        """:meth:`subject` of every value."""
        return [self.subject(v) for v in values]

    def table(self, table: pd.DataFrame) -> pd.DataFrame:
        """The score table (``scores.csv``) with published paths and subjects.

        ``synthetic_path``, ``subject_id``, ``nearest_train_path``, ``nearest_train_subject`` and the ground
        truth's ``source`` (a training path, ``path`` or ``path#index``; one that names no training slice or
        file becomes ``""``).
        """
        if self.show_paths:
            return table
        out = table.copy()
        if "synthetic_path" in out:
            out["synthetic_path"] = self.column("synthetic", out["synthetic_path"])
        if "subject_id" in out:
            out["subject_id"] = self.subject_column(out["subject_id"])
        if "nearest_train_path" in out:
            out["nearest_train_path"] = self.column("train", out["nearest_train_path"])
        if "nearest_train_subject" in out:
            out["nearest_train_subject"] = self.subject_column(out["nearest_train_subject"])
        if "source" in out:
            out["source"] = [self._source(v) for v in out["source"]]
        return out

    def _source(self, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        names = self.cohorts.get("train")
        if names is None:
            return ""
        m = _INDEX_RE.match(value)
        base, idx = (m.group(1), f"#{m.group(2)}") if m is not None else (value, "")
        for table in (names.volumes, names.files):
            if base in table:
                return table[base] + idx
        return ""

    def subjects_table(self, subjects: pd.DataFrame) -> pd.DataFrame:
        """``subjects.csv``'s table with published subject IDs and ``flagged_synthetic`` keys."""
        if self.show_paths:
            return subjects
        out = subjects.copy()
        if "subject_id" in out:
            out["subject_id"] = self.subject_column(out["subject_id"])
        if "flagged_synthetic" in out:
            out["flagged_synthetic"] = [
                ";".join(self.path("synthetic", k) for k in str(v).split(";")) if isinstance(v, str) and v else v
                for v in out["flagged_synthetic"]
            ]
        return out

    def volume_evidence(self, df: pd.DataFrame) -> pd.DataFrame:
        """The volume stage's table (:meth:`inspector.pipeline.VolumeEvidence.table`) with published names."""
        if self.show_paths or df is None:
            return df
        out = df.copy()
        out["volume"] = self.column("synthetic", out["volume"])
        out["verified_train_volume"] = self.column("train", out["verified_train_volume"])
        out["verified_train_subject"] = self.subject_column(out["verified_train_subject"])
        return out

    def calibration(self, cal: Any) -> Any:
        """The calibration with published subjects and volume IDs (nothing recomputed)."""
        if self.show_paths:
            return cal
        out = copy.copy(cal)
        out.nearest_subject = np.asarray(self.subject_column(cal.nearest_subject), dtype=object)
        out.groups = np.asarray(self.column("synthetic", cal.groups), dtype=object)
        if cal.null_groups is not None:
            out.null_groups = np.asarray(self.column("holdout", cal.null_groups), dtype=object)
        if cal.null_subjects is not None:
            out.null_subjects = np.asarray(self.subject_column(cal.null_subjects), dtype=object)
        out.volume_ids = np.asarray(self.column("synthetic", cal.volume_ids), dtype=object)
        out._volume_of = {g: i for i, g in enumerate(out.volume_ids)}
        if len(out._volume_of) != len(cal._volume_of):
            raise RuntimeError("two synthetic volumes were given the same published name")
        return out


def _without_root(c: Cohort) -> Cohort:
    """With real names: the cohort itself, or, when a skip reason quotes the root (a reader's error message
    naming the absolute file), a copy whose reasons quote the path relative to the root (the root as
    ``<root>``): the root never reaches the outputs, with or without ``show_paths``."""
    root = str(Path(c.root).expanduser().absolute())
    if not any(root in sk.reason for sk in c.skipped):
        return c
    skipped = [
        SkippedFile(sk.path, sk.reason.replace(root + "/", "").replace(root, "<root>"), is_missing_evidence(sk))
        if root in sk.reason
        else sk
        for sk in c.skipped
    ]
    return Cohort(list(c.slices), c.root, skipped, c.name, c.files)


def _extension(name: str) -> str:
    """The file's extension as the readers see it (``.nii.gz``), else its last suffix when short."""
    from .io import _strip_ext

    stem = _strip_ext(name)
    if stem != name:
        return name[len(stem) :].lower()
    suffix = Path(name).suffix
    return suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9-]{1,12}", suffix or "") else ""


def _cohort_names(c: Cohort, subject_of: Mapping[str, str]) -> _CohortNames:
    names = _CohortNames(root=str(Path(c.root).expanduser().absolute()))
    first_subject: dict[str, str] = {}
    sources: dict[str, tuple[str, ...]] = {}
    for s in c.slices:
        first_subject.setdefault(s.path, s.subject_id)
        sources.setdefault(s.path, s.sources)
    by_subject: dict[str, list[str]] = defaultdict(list)
    for path, subj in first_subject.items():
        by_subject[subject_of[subj]].append(path)
    for pseud, paths in by_subject.items():
        for n, path in enumerate(sorted(paths), start=1):
            names.volumes[path] = f"{pseud}/vol-{n:03d}"
    # input files that are not a volume of their own: numbered per subject of the first volume reading them
    owner: dict[str, str] = {}
    for path in sorted(sources):
        for f in sources[path]:
            if f not in names.volumes:
                owner.setdefault(f, subject_of[first_subject[path]])
    for f in c.files:
        if f.path not in names.volumes and f.path not in owner:
            owner[f.path] = SKIPPED_PREFIX
    files_by: dict[str, list[str]] = defaultdict(list)
    for f, pseud in owner.items():
        files_by[pseud].append(f)
    for pseud, fs in files_by.items():
        for n, f in enumerate(sorted(fs), start=1):
            names.files[f] = f"{pseud}/file-{n:03d}{_extension(f) if pseud == SKIPPED_PREFIX else ''}"
    for path, label in names.volumes.items():
        names.files.setdefault(path, label)
    # skipped entries that name nothing loaded
    unknown: set[str] = set()
    members: dict[str, set[str]] = defaultdict(set)
    for sk in c.skipped:
        base = sk.path
        m = _INDEX_RE.match(base)
        if m is not None:
            base = m.group(1)
        if base in names.volumes or base in names.files:
            continue
        file_part, sep, _ = base.partition(":")
        if sep and file_part in names.files:
            members[file_part].add(base)
        else:
            unknown.add(base)
    for file_part, ms in members.items():
        for n, base in enumerate(sorted(ms), start=1):
            names.members[base] = f"{names.files[file_part]}:member-{n:03d}"
    taken = sum(1 for label in names.files.values() if label.startswith(SKIPPED_PREFIX + "/"))
    for n, base in enumerate(sorted(unknown), start=taken + 1):
        names.skipped[base] = f"{SKIPPED_PREFIX}/file-{n:03d}{_extension(base.split(':', 1)[0])}"
    return names


def build_naming(
    cohorts: Mapping[str, Cohort | None],
    *,
    show_paths: bool = False,
    key: bytes | None = None,
    key_file: str | None = None,
) -> Naming:
    """The mapping of one audit's cohorts (see the module docstring for the rule).

    Parameters
    ----------
    cohorts : mapping of str to Cohort or None
        By role: ``train``, ``synthetic``, ``holdout`` (a missing or None cohort is left out).
    show_paths : bool
        Real names (the identity mapping; no key is read).
    key : bytes, optional
        The pseudonym key; default :func:`inspector.privacy.load_or_create_key` (``key_file``, else
        ``$INSPECTOR_PSEUDONYM_KEY_FILE``, else the user config dir), created on first use.
    key_file : str, optional
        The key file, when ``key`` is not given.

    Returns
    -------
    Naming
    """
    if show_paths:
        return Naming(True)  # the identity, but for roots quoted in skip reasons (see Naming.cohort)
    if key is None:
        from .privacy import load_or_create_key

        key = load_or_create_key(key_file)
    raw_subjects = dict.fromkeys(s.subject_id for c in cohorts.values() if c is not None for s in c.slices)
    subjects = {s: s if PSEUDONYM_RE.fullmatch(s) else pseudonym(s, key) for s in raw_subjects}
    if len(set(subjects.values())) != len(subjects):  # 48-bit HMACs: never in practice, but never silently
        raise RuntimeError("two subjects were given the same pseudonym; rerun with show_paths to audit this set")
    naming = Naming(False, subjects, key=bytes(key))
    for role, c in cohorts.items():
        if c is not None:
            naming.cohorts[role] = _cohort_names(c, subjects)
    return naming


def publish(
    naming: Naming,
    inputs: Any,
    table: pd.DataFrame,
    subjects: pd.DataFrame,
    calibration: Any,
) -> tuple[Any, pd.DataFrame, pd.DataFrame, Any]:
    """Apply ``naming`` to an audit's inputs (:class:`inspector.pipeline.Inputs`), score table, subject table
    and calibration, after every stage that needs the real paths (ground truth, joins) has run.

    Returns
    -------
    (Inputs, pandas.DataFrame, pandas.DataFrame, Calibration)
        New objects; the arguments are not changed. With ``naming.show_paths`` the same tables and calibration
        (and the same cohorts, but for a root quoted in a skip reason).
    """
    out = copy.copy(inputs)
    for role in _ROLES:
        setattr(out, role, naming.cohort(role, getattr(inputs, role)))
    return out, naming.table(table), naming.subjects_table(subjects), naming.calibration(calibration)
