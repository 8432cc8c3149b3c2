"""The look-alike cohort benchmark: does detection hold as hundreds of subjects of one protocol join T?

For each seed and cohort size (training subjects), on a cohort of :mod:`benchmarks.cohort`:

* the audit's own matcher (:func:`inspector.pipeline.make_matcher` of ``AuditConfig``'s defaults, or of the
  given overrides) is fitted on T, its null is the holdout H scored exactly as G (``null_scores``);
* G's novel slices are every slice of the unseen *novel* subjects; its copies are every slice of
  ``n_copied`` training subjects (always among the first 8, so the same copies are scored at every size)
  passed through one condition (:func:`benchmarks.writers.apply_any`);
* per condition: slice ROC-AUC and TPR at 1 % FPR of the calibrated similarity (copies against novel),
  the feature-shortlist AUC (feature similarity alone), the shortlist's **recall** (is the true source among
  the verified candidates?), the fraction of copies flagged at alpha; per size: the novel-slice FPR at
  alpha = 0.01 and 0.05 (on the run's split, and expected over random subject re-splits of holdout and novel
  subjects, :func:`resplit_fpr`) and the wall time per stage;
* ``--calibration-seeds``: more seeds on which only the calibration is measured (new holdout and novel subjects
  each), so that the FPR pools more independent holdouts; ``--size-seeds 1000:0`` runs a costly size on some
  seeds only.

``python -m benchmarks.lookalike --sizes 8 32 128 --seeds 0 1`` prints the tables; ``run_all`` renders them in
RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from inspector.config import AuditConfig
from inspector.features import extract, prepare_extractor
from inspector.pipeline import extractor_overrides, make_matcher
from inspector.scores import empirical_p_values

from .cohort import make_cohort
from .data import DATA_DIR
from .detection import ranking_metrics
from .writers import apply_any

__all__ = ["LookalikeConfig", "run", "tables", "main", "put_lookalike_section", "DEFAULT_CONDITIONS"]

log = logging.getLogger(__name__)

#: The matching settings before issue 16 (four flips, encoder shortlist only, every candidate verified in full).
PREVIOUS: dict[str, Any] = {
    "views": ("id", "hflip", "vflip", "hvflip"),
    "descriptor_shortlist": 0,
    "verify_top": 0,
    "max_angle": 15.0,
    "rotation_shortlist": 0,
}

#: The matching before any-angle registration: rotations within 15 degrees of the eight orientations, no
#: rotation-invariant shortlist (the settings of the ``small angles`` rows).
SMALL_ANGLES: dict[str, Any] = {"max_angle": 15.0, "rotation_shortlist": 0}

#: Method name of the calibration-only runs (the default settings on more seeds, copies unscored).
CALIBRATION = "calibration"

#: Copy conditions scored on look-alike cohorts (the protocol's, the harder ones, and writer conventions).
DEFAULT_CONDITIONS: tuple[str, ...] = (
    "none",
    "noise_0.02",
    "rotate_5",
    "hflip",
    "rotate_10",
    "shift_8pct",
    "crop_85_95",
    "combo",
    "orient_transpose",
    "orient_rot90",
    "fov_0.6_0.8",
    "fov_1.25_1.6",
    "bit8",
    "rotate_any",
)


@dataclass
class LookalikeConfig:
    """Settings of a look-alike benchmark run.

    Attributes
    ----------
    sizes : sequence of int
        Training subjects per cohort.
    seeds : sequence of int
    conditions : sequence of str
    n_holdout, n_novel, n_copied : int
        Unseen holdout subjects, unseen novel subjects, copied training subjects.
    methods : dict of str to dict
        Method name -> AuditConfig overrides (``{}`` = the audit's defaults).
    method_seeds : dict of str to sequence of int
        Seeds of a method when not all of ``seeds`` (a costly comparison run on fewer seeds).
    cache_dir : Path
    calibration_seeds : sequence of int
        More seeds on which only the calibration is measured (the default mode at ``calibration_size``
        training subjects, its null and its novel slices, copies unscored: method ``calibration``): each seed
        draws new holdout and novel subjects, so the fixed-split FPR pools more independent holdouts.
    calibration_size : int
    size_seeds : dict of int to sequence of int
        Sizes run on some seeds only, by the default mode only (a costly large cohort).
    """

    sizes: Sequence[int] = (8, 32, 128)
    seeds: Sequence[int] = (0, 1)
    conditions: Sequence[str] = DEFAULT_CONDITIONS
    n_holdout: int = 20
    n_novel: int = 20
    n_copied: int = 2
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    method_seeds: dict[str, Sequence[int]] = field(default_factory=dict)
    cache_dir: Path = DATA_DIR / "cache"
    calibration_seeds: Sequence[int] = ()
    calibration_size: int = 32
    size_seeds: dict[int, Sequence[int]] = field(default_factory=dict)

    def sizes_of(self, seed: int, method: str = "default") -> list[int]:
        """The cohort sizes run for ``seed`` and ``method`` (a size in ``size_seeds``: default mode, its seeds)."""
        return [
            n for n in self.sizes if n not in self.size_seeds or (method == "default" and seed in self.size_seeds[n])
        ]


def _recall(candidates: np.ndarray | None, source: np.ndarray) -> float:
    if candidates is None:
        return float("nan")
    return float(np.mean((candidates == source[:, None]).any(axis=1)))


#: Random subject-level splits of :func:`resplit_fpr`.
RESPLITS = 2000


def resplit_fpr(
    null: np.ndarray,
    null_subject: np.ndarray,
    novel: np.ndarray,
    novel_subject: np.ndarray,
    alphas: Sequence[float] = (0.01, 0.05),
    n_splits: int = RESPLITS,
    seed: int = 0,
) -> dict[float, float]:
    """Expected novel-slice FPR over random subject-level re-splits of holdout and novel subjects.

    The fixed split of a run draws one holdout (whose 20-odd subjects set the threshold) and one novel set,
    so its FPR varies a lot from seed to seed (slices of one subject are strongly correlated). Holdout and
    novel subjects are exchangeable (both unseen, generated alike), so pooling them and re-drawing which
    subjects form the null (as many as in the run) estimates the *expected* FPR of the calibration with
    far less variance. Each split scores the left-out subjects' slices with :func:`empirical_p_values`.

    Parameters
    ----------
    null, novel : np.ndarray, shape (n,), (m,)
        Similarities of the holdout and the novel slices.
    null_subject, novel_subject : np.ndarray, shape (n,), (m,)
        Their subject ids (disjoint).
    alphas : sequence of float
    n_splits : int
    seed : int

    Returns
    -------
    dict of float to float
        alpha -> mean FPR over the splits (slice-weighted).
    """
    s = np.r_[np.asarray(null, float), np.asarray(novel, float)]
    g = np.r_[np.asarray(null_subject), np.asarray(novel_subject)]
    subjects = np.unique(g)
    n_null = len(np.unique(null_subject))
    if n_null < 1 or n_null >= len(subjects):
        raise ValueError(f"need subjects on both sides of the split; got {n_null} of {len(subjects)}.")
    inv = np.searchsorted(subjects, g)
    rng = np.random.default_rng(seed)
    hits = {a: 0.0 for a in alphas}
    total = 0
    for _ in range(n_splits):
        in_null = np.zeros(len(subjects), bool)
        in_null[rng.choice(len(subjects), n_null, replace=False)] = True
        m = in_null[inv]
        p = empirical_p_values(s[~m], s[m])
        total += p.size
        for a in alphas:
            hits[a] += float(np.sum(p <= a))
    return {a: hits[a] / total for a in alphas}


def run_one(
    lc: LookalikeConfig, seed: int, n_train: int, method: str, overrides: dict[str, Any], say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score one (seed, size, method); returns per-condition rows and the per-size row."""
    co = make_cohort(max(lc.sizes_of(seed)), n_holdout=lc.n_holdout, n_novel=lc.n_novel, seed=seed)
    train_subjects = np.unique(co.subject[co.rows("train")])[:n_train]
    t_rows = np.flatnonzero(np.isin(co.subject, train_subjects))
    h_rows, n_rows = co.rows("holdout"), co.rows("novel")
    rng = np.random.default_rng(seed)
    copied = rng.choice(train_subjects[: min(8, n_train)], size=lc.n_copied, replace=False)
    src_rows = np.flatnonzero(np.isin(co.subject, copied))
    source = np.searchsorted(t_rows, src_rows)  # training index of each copy's source
    cfg = dataclasses.replace(AuditConfig(), seed=seed, **overrides)
    img_t = co.images[t_rows]
    groups = co.subject[t_rows].astype(str)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    ext = prepare_extractor(cfg.extractor, img_t, cache_dir=lc.cache_dir, **extractor_overrides(cfg))
    timing["prepare"] = time.perf_counter() - t0
    views = tuple(cfg.views)
    t0 = time.perf_counter()
    FT = extract(img_t, ext, views=("id",), use_cache=False)
    FH = extract(co.images[h_rows], ext, views=views, use_cache=False)
    FN = extract(co.images[n_rows], ext, views=views, use_cache=False)
    copies = {
        c: apply_any(co.images[src_rows], c, np.random.default_rng([seed, i])) for i, c in enumerate(lc.conditions)
    }
    FC = {c: extract(x, ext, views=views, use_cache=False) for c, x in copies.items()}
    timing["extract"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer = make_matcher(cfg)
    scorer.fit(FT.layers, images=img_t, groups=groups)
    timing["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    null, kind = scorer.null_scores(
        holdout_views=FH.views, holdout_images=co.images[h_rows], train_views=None, train_images=None
    )
    timing["null"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rn = scorer.score_samples(FN.views, images=co.images[n_rows])
    timing["novel"] = time.perf_counter() - t0
    pn = empirical_p_values(rn.similarity, null)
    rows = []
    t0 = time.perf_counter()
    for c in lc.conditions:
        rc = scorer.score_samples(FC[c].views, images=copies[c])
        y = np.r_[np.zeros(len(rn.similarity)), np.ones(len(rc.similarity))]
        auc, ap, tpr1 = ranking_metrics(y, np.r_[rn.similarity, rc.similarity])
        fauc = ranking_metrics(y, np.r_[rn.feature_similarity, rc.feature_similarity])[0]
        pc = empirical_p_values(rc.similarity, null)
        rows.append(
            {
                "seed": seed,
                "size": n_train,
                "method": method,
                "condition": c,
                "auc": auc,
                "ap": ap,
                "tpr_at_1pct": tpr1,
                "feature_auc": fauc,
                "recall": _recall(rc.candidates, source),
                "top1": float(np.mean(rc.nearest == source)),
                "flagged": float(np.mean(pc <= cfg.alpha)),
                "n_copies": len(rc.similarity),
            }
        )
    timing["copies"] = time.perf_counter() - t0
    per_size = {
        "seed": seed,
        "size": n_train,
        "method": method,
        "n_train_slices": len(t_rows),
        "n_holdout": len(h_rows),
        "n_novel": len(n_rows),
        "null_kind": kind,
        "fpr_0.01": float(np.mean(pn <= 0.01)),
        "fpr_0.05": float(np.mean(pn <= 0.05)),
        **{
            f"fpr_resplit_{a}": v
            for a, v in resplit_fpr(null, co.subject[h_rows], rn.similarity, co.subject[n_rows], seed=seed).items()
        },
        "novel_recall_na": float("nan"),
        "train_seconds": float(getattr(ext, "train_seconds", 0.0)),
        "from_cache": bool(getattr(ext, "from_cache", False)),
        **{f"t_{k}": v for k, v in timing.items()},
        "ms_per_query": 1000.0
        * (timing["null"] + timing["novel"] + timing["copies"])
        / (len(h_rows) + len(n_rows) + sum(len(x) for x in copies.values())),
    }
    say(
        f"[lookalike seed {seed} T={n_train} {method}] min AUC {min(r['auc'] for r in rows):.3f}, min recall "
        f"{min(r['recall'] for r in rows):.3f}, FPR@0.01 {per_size['fpr_0.01']:.4f} ({sum(timing.values()):.0f}s)"
    )
    return rows, per_size


def run(lc: LookalikeConfig, progress: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (seed, size, method); returns (per-condition table, per-size table)."""
    say = progress or (lambda m: log.info(m))
    rows, sizes = [], []
    for seed in lc.seeds:
        for n in lc.sizes:
            for method, over in lc.methods.items():
                if seed not in lc.method_seeds.get(method, lc.seeds) or n not in lc.sizes_of(seed, method):
                    continue
                r, s = run_one(lc, seed, n, method, over, say)
                rows += r
                sizes.append(s)
    cal = dataclasses.replace(lc, sizes=(lc.calibration_size,), conditions=("none",), size_seeds={})
    for seed in lc.calibration_seeds:
        r, s = run_one(cal, seed, lc.calibration_size, CALIBRATION, {}, say)
        rows += r
        sizes.append(s)
    return pd.DataFrame(rows), pd.DataFrame(sizes)


def _md(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def tables(per_cond: pd.DataFrame, per_size: pd.DataFrame) -> str:
    """Markdown: per (method, size) the worst condition's AUC/recall, FPRs; then per condition x size AUC."""
    parts = []
    g = per_cond.groupby(["method", "size", "condition"]).mean(numeric_only=True).reset_index()
    s = per_size.groupby(["method", "size"]).mean(numeric_only=True).reset_index()
    body = []
    for (method, size), sub in g.groupby(["method", "size"]):
        srow = s[(s.method == method) & (s["size"] == size)].iloc[0]
        worst = sub.loc[sub.auc.idxmin()]
        body.append(
            [
                method,
                str(size),
                f"{int(srow.n_train_slices)}",
                f"{sub.auc.min():.3f} ({worst.condition})",
                f"{sub.tpr_at_1pct.min():.3f}",
                f"{sub.recall.min():.3f}",
                f"{sub.feature_auc.mean():.3f}",
                f"{sub.flagged.mean():.3f}",
                f"{srow['fpr_0.01']:.4f} / {srow['fpr_resplit_0.01']:.4f}",
                f"{srow['fpr_0.05']:.4f} / {srow['fpr_resplit_0.05']:.4f}",
                f"{srow.ms_per_query:.0f}",
                f"{srow.t_prepare:.0f}",
            ]
        )
    parts.append(
        _md(
            [
                "method",
                "training subjects",
                "training slices",
                "worst slice ROC-AUC (condition)",
                "worst TPR@1%FPR",
                "worst shortlist recall",
                "mean feature-only AUC",
                "copies flagged at α=0.01",
                "novel FPR α=0.01 (fixed / re-split)",
                "novel FPR α=0.05 (fixed / re-split)",
                "ms / query",
                "encoder s",
            ],
            body,
        )
    )
    for method, sub in g.groupby("method"):
        if method == CALIBRATION:  # copies unscored
            continue
        sizes = sorted(sub["size"].unique())
        body = []
        for c in dict.fromkeys(per_cond.condition):
            cells = []
            for n in sizes:
                r = sub[(sub.condition == c) & (sub["size"] == n)]
                cells.append(f"{r.auc.iloc[0]:.3f} / {r.recall.iloc[0]:.2f}" if len(r) else "-")
            body.append([c, *cells])
        parts.append(
            f"ROC-AUC / shortlist recall per condition, method `{method}`:\n\n"
            + _md(["condition", *[f"T = {n} subjects" for n in sizes]], body)
        )
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--conditions", nargs="+", default=list(DEFAULT_CONDITIONS))
    p.add_argument("--pixels", action="store_true", help="also score the default mode with the pixels extractor")
    p.add_argument("--previous-seeds", type=int, nargs="*", default=[], help="seeds of the previous settings")
    p.add_argument("--small-angles-seeds", type=int, nargs="*", default=[], help="seeds of the small-angles settings")
    p.add_argument(
        "--update-results",
        action="store_true",
        help="replace the look-alike section of benchmarks/RESULTS.md with this run's (the rest is kept)",
    )
    p.add_argument(
        "--calibration-seeds",
        type=int,
        nargs="*",
        default=[],
        help="more seeds on which only the calibration (null and novel FPR) is measured, at --calibration-size",
    )
    p.add_argument(
        "--size-seeds",
        nargs="*",
        default=[],
        metavar="SIZE:SEED[,SEED]",
        help="a size (also given in --sizes) run on these seeds only, default mode only (e.g. 1000:0)",
    )
    p.add_argument("--calibration-size", type=int, default=LookalikeConfig.calibration_size)
    p.add_argument("--holdout-subjects", type=int, default=LookalikeConfig.n_holdout, help="unseen holdout subjects")
    p.add_argument("--novel-subjects", type=int, default=LookalikeConfig.n_novel, help="unseen novel subjects")
    p.add_argument("--set", action="append", default=[], metavar="NAME:FIELD=VALUE", help="an extra method")
    p.add_argument("--out", type=Path, default=Path("benchmarks/_out"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods: dict[str, dict[str, Any]] = {"default": {}}
    if a.pixels:
        methods["pixels"] = {"extractor": "pixels"}
    for spec in a.set:
        name, _, kv = spec.partition(":")
        key, _, val = kv.partition("=")
        cur = getattr(AuditConfig(), key)
        conv: Any = tuple(val.split(",")) if isinstance(cur, tuple) else type(cur)(val) if cur is not None else val
        if isinstance(cur, bool):
            conv = val.lower() in ("1", "true", "yes")
        methods.setdefault(name, {})[key] = conv
    seeds_of: dict[str, Sequence[int]] = {}
    if a.previous_seeds:
        methods["previous"] = dict(PREVIOUS)
        seeds_of["previous"] = a.previous_seeds
    if a.small_angles_seeds:
        methods["small angles"] = dict(SMALL_ANGLES)
        seeds_of["small angles"] = a.small_angles_seeds
    t0 = time.perf_counter()
    lc = LookalikeConfig(
        sizes=a.sizes,
        seeds=sorted({*a.seeds, *a.previous_seeds, *a.small_angles_seeds}),
        conditions=a.conditions,
        methods=methods,
        n_holdout=a.holdout_subjects,
        n_novel=a.novel_subjects,
        calibration_seeds=a.calibration_seeds,
        calibration_size=a.calibration_size,
        size_seeds={int(k): [int(x) for x in v.split(",")] for k, _, v in (t.partition(":") for t in a.size_seeds)},
    )
    lc.method_seeds = {"default": a.seeds, **seeds_of}
    pc, ps = run(lc, progress=lambda m: print(m, file=sys.stderr, flush=True))
    a.out.mkdir(parents=True, exist_ok=True)
    pc.to_csv(a.out / "lookalike_per_condition.csv", index=False)
    ps.to_csv(a.out / "lookalike_per_size.csv", index=False)
    print(tables(pc, ps))
    if a.update_results:
        cmd = "python -m benchmarks.lookalike " + " ".join(sys.argv[1:] if argv is None else argv)
        path = put_lookalike_section(pc, ps, cmd, time.perf_counter() - t0)
        print(f"updated {path}", file=sys.stderr)
    return 0


def put_lookalike_section(per_cond: pd.DataFrame, per_size: pd.DataFrame, command: str, seconds: float) -> Path:
    """Replace the look-alike section of RESULTS.md (up to the next ``## `` heading or the 3D section's marker)
    with :func:`section` of this run, stating the machine, the date and the command; the rest is kept."""
    from .results import put_top_section

    return put_top_section(
        LOOKALIKE_HEAD, section(per_cond, per_size), command, seconds, ("\n## ", "\n<!-- volumes3d:start -->")
    )


#: The look-alike section's heading in RESULTS.md.
LOOKALIKE_HEAD = "## Look-alike cohorts: detection as the cohort grows\n"

#: Targets of issue 16 on look-alike cohorts.
TARGET_AUC = 0.99
TARGET_RECALL = 0.99


def _cohort_text(per_size: pd.DataFrame) -> str:
    s = per_size[per_size.method == "default"]
    seeds = sorted(set(s.seed))
    sizes = sorted(set(s["size"]))
    row = s.iloc[0]
    fewer = [
        f"T = {int(n)} on seed{'s' if len(set(g.seed)) > 1 else ''} {', '.join(map(str, sorted(set(g.seed))))} only"
        for n, g in s.groupby("size")
        if len(set(g.seed)) < len(seeds)
    ]
    return (
        f"Cohorts of {', '.join(map(str, sizes))} training subjects (seeds {', '.join(map(str, seeds))}"
        + (f"; {'; '.join(fewer)}" if fewer else "")
        + "), each a "
        f"distinct subject generated from the MNI152 template (`benchmarks/cohort.py`: smooth deformation, affine "
        f"jitter, bias field, contrast, Rician noise; 1.5 mm, axial slices 4.5 mm apart), split by subject; the "
        f"holdout is {int(row.n_holdout)} slices of unseen subjects, the novel slices of G are {int(row.n_novel)} "
        f"slices of other unseen subjects, the copies every slice of 2 training subjects under each condition."
    )


def targets(per_cond: pd.DataFrame, per_size: pd.DataFrame, alpha: float = 0.01) -> str:
    """Issue 16's look-alike targets for the default mode: a markdown table of (target, measured, met)."""
    d = per_cond[per_cond.method == "default"]
    if d.empty:
        return "_no default-mode rows_"
    # sizes measured on every seed, then larger ones measured on fewer seeds (a costly extra), each on its own row
    n_seeds = d.groupby("size").seed.nunique()
    full = sorted(int(n) for n in n_seeds.index if n_seeds[n] == n_seeds.max())
    rows = []
    larger = sorted(set(n_seeds.index) - set(full))
    for sizes, what in ((full, "every size and condition"), (larger, "every condition")):
        if not sizes:
            continue
        g = d[d["size"].isin(sizes)].groupby(["size", "condition"]).mean(numeric_only=True).reset_index()
        used = sorted(set(d[d["size"].isin(sizes)].seed))
        note = f" ({', '.join(map(str, sizes))} subjects; seeds {', '.join(map(str, used))})"
        for col, name, target in (("auc", "slice ROC-AUC", TARGET_AUC), ("recall", "shortlist recall", TARGET_RECALL)):
            w = g.loc[g[col].idxmin()]
            rows.append(
                [
                    f"{name} >= {target} at {what}{note}",
                    f"worst {w[col]:.4f} ({w.condition}, T = {int(w['size'])})",
                    "yes" if g[col].min() >= target else "**no**",
                ]
            )
    # the calibration: the default mode's runs and the calibration-only runs (same settings, more seeds)
    c = per_size[per_size.method.isin(["default", CALIBRATION])]
    draws = c.seed.nunique()
    for a in (0.01, 0.05):
        col = f"fpr_{a}"
        n_nov = c.n_novel.to_numpy()
        k = float((c[col] * n_nov).sum())
        f = k / float(n_nov.sum())
        per = ", ".join(f"T={int(n)}: {v:.4f}" for n, v in c.groupby("size")[col].mean().items())
        rows.append(
            [
                f"novel-slice FPR at alpha = {a} in [{0.5 * a:g}, {2 * a:g}], fixed split (pooled over {len(c)} "
                f"runs; {draws} independent holdout draws, one per seed)",
                f"{int(round(k))}/{int(n_nov.sum())} = {f:.4f} ({per})",
                "yes" if 0.5 * a <= f <= 2 * a else "**no**",
            ]
        )
        rcol = f"fpr_resplit_{a}"
        if rcol in c:
            e = float(c[rcol].mean())
            rows.append(
                [
                    f"novel-slice FPR at alpha = {a} in [{0.5 * a:g}, {2 * a:g}], expected over subject re-splits "
                    f"(mean over the {len(c)} runs of {RESPLITS} random holdout/novel subject splits each)",
                    f"{e:.4f} (runs {c[rcol].min():.4f} to {c[rcol].max():.4f})",
                    "yes" if 0.5 * a <= e <= 2 * a else "**no**",
                ]
            )
    return _md(["target", "measured", "met"], rows)


def section(per_cond: pd.DataFrame, per_size: pd.DataFrame) -> str:
    """The look-alike section of RESULTS.md, every number from the run."""
    parts = [LOOKALIKE_HEAD, _cohort_text(per_size) + "\n"]
    parts.append("### Targets (issue 16)\n")
    parts.append(targets(per_cond, per_size) + "\n")
    parts.append(
        "### Per method and cohort size\n\n`previous` = the matching settings before issue 16 (four flips, the "
        "encoder's shortlist only, every candidate verified in full), on fewer seeds; `small angles` = the default "
        "before any-angle registration (rotations within 15 degrees of the eight orientations, no rotation-invariant "
        "shortlist), where run.\n"
    )
    parts.append(tables(per_cond, per_size) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
