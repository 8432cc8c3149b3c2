"""Attribution: which training slice and subject each synthetic slice matches, and per subject what copies it.

The pipeline's last numerical stage: it turns a :class:`~inspector.matching.MatchResult` and a
:class:`~inspector.calibration.Calibration` into the score table (``scores.csv``) and the per-subject table
(``subjects.csv``). Flags come from the calibration; nothing here compares a p-value with alpha.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .calibration import Calibration
from .io import read_labels
from .matching import MatchResult
from .scores import PaperScores
from .types import Cohort

__all__ = ["SCORE_COLUMNS", "layer_consensus", "score_table", "subjects_table", "attach_labels"]

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


def subjects_table(table: pd.DataFrame, train: Cohort) -> pd.DataFrame:
    """Per training subject: its slices, the synthetic slices attributed to it and how many are flagged.

    Returns
    -------
    pandas.DataFrame
        Columns ``subject_id, n_train_slices, n_synthetic_matched, n_flagged, max_similarity, min_p_value,
        flagged_synthetic``; most flagged first.
    """
    rows = []
    counts = pd.Series([s.subject_id for s in train.slices]).value_counts()
    for subj in train.subjects:
        mine = table[table["nearest_train_subject"] == subj]
        flagged = mine[mine["flagged"] == 1]
        rows.append(
            {
                "subject_id": subj,
                "n_train_slices": int(counts.get(subj, 0)),
                "n_synthetic_matched": len(mine),
                "n_flagged": len(flagged),
                "max_similarity": float(mine["similarity"].max()) if len(mine) else np.nan,
                "min_p_value": float(mine["p_value"].min()) if len(mine) else np.nan,
                "flagged_synthetic": ";".join(
                    f"{p}#{i}" for p, i in zip(flagged["synthetic_path"], flagged["slice_index"], strict=True)
                ),
            }
        )
    df = pd.DataFrame(rows)
    return df.sort_values(["n_flagged", "max_similarity"], ascending=[False, False], na_position="last").reset_index(
        drop=True
    )


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
