"""Attribution: which training slice and subject each synthetic slice matches, and per subject what copies it.

The pipeline's last numerical stage: it turns a :class:`~inspector.matching.MatchResult` and a
:class:`~inspector.calibration.Calibration` into the score table (``scores.csv``) and the per-subject table
(``subjects.csv``). Flags come from the calibration; nothing here compares a p-value with alpha.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .calibration import Calibration
from .io import read_labels
from .matching import MatchResult
from .scores import PaperScores
from .types import Cohort

__all__ = [
    "volumes_table",
    "SCORE_COLUMNS",
    "LabelsError",
    "attach_labels",
    "check_labels",
    "layer_consensus",
    "score_table",
    "subjects_at",
    "subjects_table",
]

log = logging.getLogger(__name__)

#: Columns of ``scores.csv`` that are part of the stable CLI contract, in order.
SCORE_COLUMNS: tuple[str, ...] = (
    "synthetic_path",
    "slice_index",
    "subject_id",
    "similarity",
    "mi",
    "p_value",
    "flagged",
    "mi_z",
    "oni",
    "nearest_train_path",
    "nearest_train_slice",
    "nearest_train_subject",
)


def layer_consensus(
    neighbours: Mapping[str, np.ndarray], train_subject: np.ndarray, nearest_subject: np.ndarray
) -> np.ndarray:
    """Number of layers whose top-1 neighbour belongs to the matched training subject.

    Parameters
    ----------
    neighbours : mapping of str to np.ndarray, shape (m, k)
        Per layer, training indices (``-1`` = none).
    train_subject : np.ndarray of str, shape (n,)
    nearest_subject : np.ndarray of str, shape (m,)

    Returns
    -------
    np.ndarray of int64, shape (m,)
    """
    count = np.zeros(len(nearest_subject), np.int64)
    for nb in neighbours.values():
        top = nb[:, 0]
        subj = np.where(top >= 0, train_subject[np.clip(top, 0, None)], "")
        count += subj == nearest_subject
    return count


def nearest_subjects(match: MatchResult, train: Cohort) -> np.ndarray:
    """The training subject of each synthetic slice's final match (``""`` when none), shape (m,)."""
    subj = train.subject_ids.astype(str)
    ok = match.nearest >= 0
    return np.where(ok, subj[np.clip(match.nearest, 0, None)], "")


def score_table(
    synthetic: Cohort,
    train: Cohort,
    match: MatchResult,
    calibration: Calibration,
    paper: PaperScores,
    layers: list[str],
    extra: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per synthetic slice: the ``scores.csv`` table.

    Columns: :data:`SCORE_COLUMNS`, one ``sim_<layer>`` per layer, ``layer_consensus``, ``margin``,
    ``feature_similarity``, ``view``, ``sha256``, ``nearest_train_index``, the registration (``align_ncc``,
    ``align_angle``, ``align_scale``, ``align_flip``) when there is one, then ``extra`` (baseline columns).
    Higher ``similarity``/``mi``/``mi_z`` and lower ``p_value``/``oni`` mean more memorised.
    """
    nearest = match.nearest
    ok = nearest >= 0
    nn = np.clip(nearest, 0, None)
    nearest_subj = nearest_subjects(match, train)
    table = pd.DataFrame(
        {
            "synthetic_path": [s.path for s in synthetic.slices],
            "slice_index": [s.slice_index for s in synthetic.slices],
            "subject_id": [s.subject_id for s in synthetic.slices],
            "similarity": calibration.similarity,
            "mi": calibration.mi,
            "p_value": calibration.p_values,
            "flagged": calibration.flags().astype(int),
            "mi_z": np.asarray(paper.mi_z, np.float64),
            "oni": np.asarray(paper.oni, np.float64),
            "nearest_train_path": np.where(ok, [train[i].path for i in nn], ""),
            "nearest_train_slice": np.where(ok, [train[i].slice_index for i in nn], -1),
            "nearest_train_subject": nearest_subj,
        }
    )
    for j, layer in enumerate(layers):
        table[f"sim_{layer}"] = match.layer_similarity[:, j]
    table["layer_consensus"] = layer_consensus(match.neighbours, train.subject_ids.astype(str), nearest_subj)
    table["margin"] = match.margin
    table["feature_similarity"] = match.feature_similarity
    table["view"] = match.view
    table["sha256"] = [s.sha256 for s in synthetic.slices]
    table["nearest_train_index"] = nearest
    al = match.alignment
    if al is not None:
        table["align_ncc"] = al.ncc
        table["align_angle"] = al.angle
        table["align_scale"] = al.scale
        table["align_flip"] = al.flip
    for name, values in (extra or {}).items():
        table[name] = values
    return table


def _mode_per_volume(s: pd.DataFrame, col: str, n_v: int) -> np.ndarray:
    """Per volume ``v`` (0..n_v-1) the most frequent value of ``s[col]`` ("" for a volume without rows); ties go
    to the smallest value, as :meth:`pandas.Series.mode` orders them."""
    out = np.full(n_v, "", dtype=object)
    if len(s):
        cnt = s.groupby(["v", col]).size().reset_index(name="n")
        cnt = cnt.sort_values(["v", "n", col], ascending=[True, False, True], kind="mergesort").drop_duplicates("v")
        out[cnt["v"].to_numpy()] = cnt[col].to_numpy()
    return out


def volumes_table(
    table: pd.DataFrame,
    calibration: Calibration,
    alpha: float | None = None,
    fdr: bool | None = None,
    *,
    evidence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per synthetic volume (``volumes.csv``): its calibrated p-value, flag and best training match.

    A synthetic volume is the slices of one source (:attr:`Calibration.volume_ids`; a 2D image is a volume of
    one slice). Its training match is the training volume (``nearest_train_path``) most of its slices match,
    ``match_fraction`` the share of its slices that match it (a copied volume matches one training volume
    throughout), ``train_slice_offset`` the median of (matched training slice index − synthetic slice index)
    over those slices.

    Returns
    -------
    pandas.DataFrame
        Columns ``volume, n_slices, slice_first, slice_last, p_value, simes (the statistic: Simes' combination of
        the slices' p-values), flagged, p_calibration, n_slices_flagged,
        max_similarity, nearest_train_volume, nearest_train_subject, match_fraction, train_slice_offset``;
        flagged and most significant first. With the volume stage's ``evidence`` (unit ``volume``) also
        ``volume_similarity`` (the 3D-verified score that is calibrated), ``volume_ncc``, ``coverage``,
        ``verified_train_volume``, ``verified_train_subject``, ``slice_consistency``, ``run_first``,
        ``run_last``, ``run_slope``, ``run_offset``, ``n_candidate_volumes`` and ``transform`` (the 3x4 matrix,
        JSON), and ``nearest_train_volume``/``nearest_train_subject`` are the verified ones where a volume was
        verified.
    """
    vi = calibration.volume_index()
    vflags = calibration.volume_flags(alpha, fdr)
    sflags = calibration.flags(alpha, fdr)
    n_v = len(calibration.volume_ids)
    if n_v == 0:
        return pd.DataFrame()
    # vectorised over volumes (this runs on every threshold change in the app): per volume the training volume
    # most of its slices match (ties: the first in sorted order, as pandas' mode), and on those slices the most
    # frequent subject and the median slice offset
    paths = table["nearest_train_path"].astype(str).to_numpy()
    s = pd.DataFrame(
        {
            "v": vi,
            "path": paths,
            "subj": table["nearest_train_subject"].astype(str).to_numpy(),
            "off": pd.to_numeric(table["nearest_train_slice"], errors="coerce").to_numpy(float)
            - table["slice_index"].to_numpy(float),
        }
    )
    best = _mode_per_volume(s, "path", n_v)
    on_best = s[s["path"].to_numpy() == best[vi]]
    subj = _mode_per_volume(on_best, "subj", n_v)
    offset = on_best.groupby("v")["off"].median().reindex(range(n_v)).to_numpy(float)
    n_on_best = np.bincount(on_best["v"].to_numpy(), minlength=n_v)
    n_slices = np.bincount(vi, minlength=n_v)
    sidx = table["slice_index"].to_numpy()
    sim = table["similarity"].to_numpy(float)
    first, last, top = (np.full(n_v, np.nan) for _ in range(3))
    np.fmin.at(first, vi, sidx.astype(float))
    np.fmax.at(last, vi, sidx.astype(float))
    np.fmax.at(top, vi, sim)
    n_flag = np.bincount(vi, weights=np.asarray(sflags, float), minlength=n_v)
    rows = [
        {
            "volume": str(vid),
            "n_slices": int(n_slices[v]),
            "slice_first": int(first[v]),
            "slice_last": int(last[v]),
            "p_value": float(calibration.volume_p_values[v]),
            "simes": float(calibration.volume_simes[v]),
            "flagged": int(vflags[v]),
            "p_calibration": calibration.volume_calibration,
            "n_slices_flagged": int(n_flag[v]),
            "max_similarity": float(top[v]),
            "nearest_train_volume": str(best[v]),
            "nearest_train_subject": str(subj[v]),
            "match_fraction": float(n_on_best[v] / n_slices[v]) if n_slices[v] else 0.0,
            "train_slice_offset": float(offset[v]),
        }
        for v, vid in enumerate(calibration.volume_ids)
    ]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if evidence is not None and len(evidence):
        df = df.merge(evidence, on="volume", how="left")
        ok = df["verified_train_volume"].fillna("").astype(str) != ""
        df.loc[ok, "nearest_train_volume"] = df.loc[ok, "verified_train_volume"]
        df.loc[ok, "nearest_train_subject"] = df.loc[ok, "verified_train_subject"]
    sim = "volume_similarity" if "volume_similarity" in df else "max_similarity"
    return df.sort_values(["flagged", "p_value", sim], ascending=[False, True, False]).reset_index(drop=True)


def subjects_table(
    table: pd.DataFrame,
    train: Cohort,
    volumes: pd.DataFrame | None = None,
    alpha: float | None = 0.01,
    *,
    calibration: Calibration | None = None,
    fdr: bool | None = None,
) -> pd.DataFrame:
    """Per training subject: its slices, the synthetic slices and volumes attributed to it, and a flag.

    With ``calibration`` every flag is the calibration's at ``(alpha, fdr)`` (default: its own setting), the
    volumes are :func:`volumes_table` at that setting and ``table["flagged"]`` is not read: this is how the
    tables of the app, ``subjects.csv`` and the report agree with every other screen. Without it (the older
    call) the slice flags are ``table["flagged"]`` and ``volumes`` as given. The subject rule is
    :func:`subjects_at`'s.

    Parameters
    ----------
    table : pandas.DataFrame
        The score table (:func:`score_table`).
    train : Cohort
        The training cohort (its subjects and their slice counts).
    volumes : pandas.DataFrame, optional
        :func:`volumes_table`; computed from ``calibration`` when that is given and this is None.
    alpha : float, optional
        The per-slice false-positive rate (``None``: the calibration's).
    calibration : Calibration, optional
    fdr : bool, optional
        Benjamini–Hochberg at ``alpha`` (``None``: the calibration's; False without a calibration).

    Returns
    -------
    pandas.DataFrame
        Columns ``subject_id, n_train_slices, n_synthetic_matched, n_flagged, max_similarity, min_p_value,
        flagged_synthetic`` and, with volumes, ``n_volumes_matched, n_volumes_flagged, flagged_volumes`` (the
        flagged synthetic volumes matched to the subject, ``;``-separated), ``p_value, flagged``; most flagged
        first.
    """
    counts = pd.Series([s.subject_id for s in train.slices]).value_counts()
    base = pd.DataFrame(
        {"subject_id": list(train.subjects), "n_train_slices": [int(counts.get(s, 0)) for s in train.subjects]}
    )
    if calibration is not None:
        return subjects_at(base, table, calibration, alpha, fdr, volumes=volumes)
    a = 0.01 if alpha is None else float(alpha)
    flags = table["flagged"].to_numpy().astype(int) == 1
    return _subject_rows(base, table, flags, volumes, a, bool(fdr), decidable=True)


def subjects_at(
    subjects: pd.DataFrame,
    table: pd.DataFrame,
    calibration: Calibration,
    alpha: float | None = None,
    fdr: bool | None = None,
    *,
    volumes: pd.DataFrame | None = None,
    evidence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``subjects.csv`` at ``(alpha, fdr)``, every flag taken from ``calibration`` (nothing else compares p with α).

    The subject rule: a training subject to which ``k`` synthetic volumes are attributed has the p-value
    ``min(1, k · min p_volume)`` (Bonferroni over its volumes, so a subject with no copy is flagged with
    probability at most α however many volumes match it); it is flagged when that is at most α, or, with
    Benjamini–Hochberg, by BH at α across the subjects. Nothing is flagged when the calibration is not
    decidable (no holdout), as for slices.

    Parameters
    ----------
    subjects : pandas.DataFrame
        The training subjects: ``subject_id`` and ``n_train_slices`` (e.g. a ``subjects.csv`` read back; its
        other columns are recomputed).
    table : pandas.DataFrame
        The score table of the same audit (``scores.csv``), in the calibration's row order.
    calibration : Calibration
        The audit's calibration.
    alpha, fdr : optional
        The setting (default: the calibration's own).
    volumes : pandas.DataFrame, optional
        :func:`volumes_table` at the same setting (computed when None).
    evidence : pandas.DataFrame, optional
        The audit's volume evidence (``AuditResult.volume_evidence``), for the computed volumes table: volumes
        are attributed to the training subject they were verified against in 3D.

    Returns
    -------
    pandas.DataFrame
        As :func:`subjects_table`, most flagged first.
    """
    if len(table) != len(calibration):
        raise ValueError(
            f"table has {len(table)} rows but the calibration {len(calibration)} slices; pass the score table of "
            "the same audit."
        )
    cal = calibration.at(alpha, fdr)
    if volumes is None:
        volumes = volumes_table(table, cal, evidence=evidence)
    base = (
        subjects[["subject_id", "n_train_slices"]].copy()
        if "n_train_slices" in subjects
        else subjects[["subject_id"]].assign(n_train_slices=0)
    )
    return _subject_rows(base, table, cal.flags(), volumes, cal.alpha, cal.fdr, decidable=cal.decidable)


def _subject_rows(
    base: pd.DataFrame,
    table: pd.DataFrame,
    flags: np.ndarray,
    volumes: pd.DataFrame | None,
    alpha: float,
    fdr: bool,
    *,
    decidable: bool,
) -> pd.DataFrame:
    """The one implementation of the per-subject table and its subject rule (see :func:`subjects_at`)."""
    from .scores import benjamini_hochberg

    flags = np.asarray(flags, bool)
    nearest = table["nearest_train_subject"].astype(str).to_numpy()
    rows = []
    for subj, n_train in zip(base["subject_id"].astype(str), base["n_train_slices"], strict=True):
        hit = nearest == subj
        mine = table[hit]
        flagged = table[hit & flags]
        row = {
            "subject_id": subj,
            "n_train_slices": int(n_train),
            "n_synthetic_matched": int(hit.sum()),
            "n_flagged": len(flagged),
            "max_similarity": float(mine["similarity"].max()) if len(mine) else np.nan,
            "min_p_value": float(mine["p_value"].min()) if len(mine) else np.nan,
            "flagged_synthetic": ";".join(
                f"{p}#{i}" for p, i in zip(flagged["synthetic_path"], flagged["slice_index"], strict=True)
            ),
        }
        if volumes is not None and not volumes.empty:
            vs = volumes[volumes["nearest_train_subject"].astype(str) == subj]
            k = len(vs)
            row.update(
                {
                    "n_volumes_matched": k,
                    "n_volumes_flagged": int(vs["flagged"].sum()),
                    "p_value": min(1.0, k * float(vs["p_value"].min())) if k else 1.0,
                    "flagged_volumes": ";".join(vs.loc[vs["flagged"].astype(bool), "volume"].astype(str)),
                }
            )
        rows.append(row)
    df = pd.DataFrame(rows)
    if "p_value" in df:
        p = df["p_value"].to_numpy(np.float64)
        matched = df["n_volumes_matched"].to_numpy() > 0
        if not decidable or not len(df):
            subject_flags = np.zeros(len(df), bool)
        elif fdr:
            subject_flags = benjamini_hochberg(p, alpha) & matched
        else:
            subject_flags = (p <= alpha) & matched
        df["flagged"] = subject_flags.astype(int)
    if df.empty:
        return df
    return df.sort_values(["n_flagged", "max_similarity"], ascending=[False, False], na_position="last").reset_index(
        drop=True
    )


class LabelsError(ValueError):
    """The optional ``labels.csv`` beside the synthetic set is malformed; the message names the file and line."""


_LABEL_VALUES = ("copy", "novel")


def check_labels(folder_or_csv: str | Path) -> Path | None:
    """Validate the optional ground truth ``labels.csv`` before any computation, line by line.

    Parameters
    ----------
    folder_or_csv : str or Path
        The synthetic set's root folder (``labels.csv`` inside it is checked) or the CSV itself.

    Returns
    -------
    Path or None
        The file checked; None when there is none.

    Raises
    ------
    LabelsError
        Naming the file and line: not UTF-8, unparsable CSV, no ``path``/``label`` header, more fields than the
        header, an empty path, a label other than copy/novel, a path listed twice.
    """
    import csv as _csv
    import io as _io

    p = Path(folder_or_csv).expanduser()
    f = p / "labels.csv" if p.is_dir() else p
    if not f.is_file():
        return None
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LabelsError(f"Labels file {f} line {line}: not UTF-8 text ({e.reason}); save it as UTF-8 CSV.") from e
    fix = "Expected columns path,label[,source,augmentation] with label copy or novel; fix or remove the file."
    reader = _csv.reader(_io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    seen: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip().lower() for c in row]
                missing = [c for c in ("path", "label") if c not in header]
                if missing:
                    raise LabelsError(f"Labels file {f} line {line}: the header lacks column(s) {missing}. {fix}")
                continue
            if len(row) > len(header):
                raise LabelsError(
                    f"Labels file {f} line {line}: {len(row)} fields, the header has {len(header)}. "
                    "Quote fields that hold commas."
                )
            rec = dict(zip(header, (c.strip() for c in row), strict=False))
            path, label = rec.get("path", ""), rec.get("label", "").lower()
            if not path:
                raise LabelsError(f"Labels file {f} line {line}: empty path. {fix}")
            if label not in _LABEL_VALUES:
                raise LabelsError(f"Labels file {f} line {line}: label {label!r} is not one of {_LABEL_VALUES}. {fix}")
            key = Path(path).as_posix()
            if key in seen:
                raise LabelsError(f"Labels file {f} line {line}: {path!r} is listed again (first on line {seen[key]}).")
            seen[key] = line
    except _csv.Error as e:
        raise LabelsError(f"Labels file {f} line {reader.line_num}: not valid CSV ({e}). {fix}") from e
    if header is None:
        raise LabelsError(f"Labels file {f} line 1: the file is empty. {fix}")
    return f


def attach_labels(table: pd.DataFrame, synthetic: Cohort) -> pd.DataFrame:
    """Add ``label``/``source``/``augmentation`` from a ``labels.csv`` beside the synthetic set, if any.

    Ground truth never influences a score; it only feeds ROC curves and confusion tables.
    """
    try:
        labels = read_labels(synthetic.root)
    except FileNotFoundError:
        return table
    if labels is None or labels.empty:
        return table
    lab = labels.set_index("path")
    keys = [f"{p}#{i}" for p, i in zip(table["synthetic_path"], table["slice_index"], strict=True)]
    for col in [c for c in ("label", "source", "augmentation") if c in lab.columns]:
        vals = []
        for key, p in zip(keys, table["synthetic_path"], strict=True):
            if key in lab.index:
                vals.append(lab.at[key, col])
            elif p in lab.index:
                vals.append(lab.at[p, col])
            else:
                vals.append(None)
        table[col] = vals
    n_known = table["label"].notna().sum() if "label" in table else 0
    log.info("ground truth from %s/labels.csv for %d of %d synthetic slices", synthetic.root, n_known, len(table))
    return table
