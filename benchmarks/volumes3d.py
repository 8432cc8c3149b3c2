"""The 3D benchmark (issue 15): volumes copied in 3D, found and verified per volume.

Cohorts come from :mod:`benchmarks.volumes3d_data` (look-alike subjects of one protocol, NIfTI, split by subject;
copies of training volumes made in 3D under eleven conditions; novel volumes from unseen subjects; holdout
volumes for calibration). Each seed's cohort is audited by the product (``inspector.audit`` with ``unit="volume"``,
the default settings otherwise), and three per-volume scores are compared on the same volumes:

* **ours**: the 3D-verified volume similarity (:mod:`inspector.volumes`), flagged at ``p <= alpha`` against the
  holdout volumes;
* **slice max**: the best slice-level aggregate, the maximum slice similarity over the volume's slices
  (flagged when any slice is flagged at the same alpha);
* **Dar et al. 3D**: :class:`inspector.dar3d.Dar3D` trained on the training volumes, max Pearson correlation of the
  embeddings, flagged below their 5th-percentile threshold of the holdout's nearest distances.

Per condition: ROC-AUC of the copies against every novel volume, TPR at 1 % FPR, and the TPR at each method's flag;
over the novel volumes: the FPR at the flag. Seeds are pooled for the FPR (with a Wilson interval).

Run::

    python -m benchmarks.volumes3d --train 16 --seeds 0 1 2 --write-results

``--write-results`` replaces the 3D section of ``benchmarks/RESULTS.md`` (between its markers) with this run's.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from inspector.calibration import wilson_interval

from .data import DATA_DIR
from .detection import ranking_metrics
from .volumes3d_data import CONDITIONS_3D, FAMILIES, make_volume_cohort

log = logging.getLogger(__name__)

OUT_DIR = Path(__file__).resolve().parent / "_out"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
FAMILY_TEXT = {
    "mni152": "the MNI152 T1w template (1 mm)",
    "epi-tlrc": "a whole-brain EPI-contrast volume (nibabel's AFNI scaled+tlrc, 3 mm): a second data family",
}


def markers(family: str) -> tuple[str, str]:
    """The RESULTS.md markers of one family's section."""
    tag = "volumes3d" if family == "mni152" else f"volumes3d:{family}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


METHODS = ("ours", "slice max", "Dar et al. 3D")
#: Issue 15's targets.
TARGET_AUC, TARGET_TPR = 0.99, 0.95


def _volume_labels(result) -> pd.DataFrame:
    """Per synthetic volume (published name): label and condition, from the score table's ground truth."""
    t = result.table
    g = t.groupby("synthetic_path", sort=False).agg(label=("label", "first"), augmentation=("augmentation", "first"))
    g = g.reset_index().rename(columns={"synthetic_path": "volume"})
    g["augmentation"] = g["augmentation"].fillna("").astype(str)
    return g


def _dar_scores(info, cfg_steps: int, seed: int, max_seconds: float = 120.0) -> tuple[pd.DataFrame, float, dict]:
    """Dar et al.'s 3D method on the cohort's files: per synthetic file its score and flag; the threshold."""
    import nibabel as nib

    from inspector.dar3d import Dar3D, Dar3DConfig, prepare_volume

    def read(folder: Path) -> tuple[list[str], list[np.ndarray]]:
        files = sorted(p for p in folder.glob("*.nii.gz"))
        vols = [prepare_volume(np.asarray(nib.load(str(p)).get_fdata(dtype=np.float32))) for p in files]
        return [p.name for p in files], vols

    t0 = time.perf_counter()
    _, train = read(info.train_dir)
    _, hold = read(info.holdout_dir)
    names, syn = read(info.synthetic_dir)
    model = Dar3D(config=Dar3DConfig(steps=cfg_steps, seed=seed, max_seconds=max_seconds)).fit(train)
    thr = model.threshold(hold)
    score = model.score_samples(syn)
    flag = model.is_copy(syn, thr)
    meta = {"steps": int(model.steps_run_), "seconds": time.perf_counter() - t0, "threshold": float(thr)}
    return pd.DataFrame({"file": names, "score": score, "flagged": flag.astype(bool)}), float(thr), meta


def run_seed(
    n_train: int,
    seed: int,
    *,
    n_holdout: int,
    n_novel: int,
    copies: int,
    dar_steps: int,
    extractor: str,
    family: str = "mni152",
):
    """One seed: the cohort, the audit, the three methods. Returns (per-volume frame, timings dict)."""
    import inspector
    from inspector.config import AuditConfig

    root = DATA_DIR / f"vol3d-t{n_train}-h{n_holdout}-n{n_novel}-c{copies}-s{seed}"
    info = make_volume_cohort(
        root, n_train, n_holdout=n_holdout, n_novel=n_novel, copies_per_condition=copies, seed=seed
    )
    cfg = AuditConfig(unit="volume", extractor=extractor, seed=seed, show_paths=True)
    t0 = time.perf_counter()
    res = inspector.audit(info.train_dir, info.synthetic_dir, info.holdout_dir, cfg, cache_dir=DATA_DIR / "cache")
    audit_s = time.perf_counter() - t0
    vt = res.volumes().merge(_volume_labels(res), on="volume", how="left")
    vt["file"] = [Path(v).name for v in vt["volume"]]
    dar, thr, dmeta = _dar_scores(info, dar_steps, seed)
    vt = vt.merge(dar.rename(columns={"score": "dar_score", "flagged": "dar_flagged"}), on="file", how="left")
    vt["seed"] = seed
    vt["n_train"] = n_train
    vt["any_slice_flagged"] = vt["n_slices_flagged"] > 0
    timings = {"seed": seed, "audit_s": audit_s, **{f"t_{k}": v for k, v in res.timings.items()}, **dmeta}
    timings["volume_calibration"] = res.calibration.volume_calibration
    timings["n_null_volumes"] = int(res.calibration.volume_null_similarity.size)
    # the volume null itself (holdout and leave-one-subject-out training volumes), for the resampled FPR
    null = pd.DataFrame({"volume_similarity": res.calibration.volume_null_similarity, "label": "null"})
    null["seed"], null["n_train"] = seed, n_train
    vt = pd.concat([vt, null], ignore_index=True)
    return vt, timings


def _redo_dar(vt: pd.DataFrame, timings: pd.DataFrame, args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Dar et al.'s columns recomputed on each saved seed's cohort with the given training budget."""
    frames = []
    timings = timings.copy()
    for seed, d in vt.groupby("seed"):
        tag = "vol3d" if args.family == "mni152" else f"vol3d-{args.family}"
        root = DATA_DIR / f"{tag}-t{args.train}-h{args.holdout}-n{args.novel}-c{args.copies}-s{seed}"
        info = make_volume_cohort(
            root,
            args.train,
            n_holdout=args.holdout,
            n_novel=args.novel,
            copies_per_condition=args.copies,
            seed=int(seed),
            family=args.family,
        )
        dar, _, meta = _dar_scores(info, args.dar_steps, int(seed), args.dar_seconds)
        d = d.drop(columns=["dar_score", "dar_flagged"]).merge(
            dar.rename(columns={"score": "dar_score", "flagged": "dar_flagged"}), on="file", how="left"
        )
        frames.append(d)
        i = timings.index[timings.seed == seed]
        for k, v in meta.items():
            timings.loc[i, k] = v
        log.info("Dar et al. 3D retrained for seed %s: %s", seed, meta)
    return pd.concat(frames, ignore_index=True), timings


def recalibrate(vt: pd.DataFrame, alpha: float = 0.01) -> pd.DataFrame:
    """Ours' ``p_value`` and ``flagged`` from the saved volume similarities and each seed's volume null, with the
    product's own rule (:func:`inspector.calibration.volume_prediction_p_values`, what ``audit`` computes), so a
    re-rendered table always states the current calibration."""
    from inspector.calibration import volume_prediction_p_values

    out = vt.copy()
    for _, d in out.groupby("seed"):
        null = d.loc[d.label == "null", "volume_similarity"].dropna().to_numpy(float)
        rows = d.index[(d.label != "null") & d["volume_similarity"].notna()]
        if null.size < 3 or not len(rows):
            continue
        p = volume_prediction_p_values(out.loc[rows, "volume_similarity"].to_numpy(float), null)
        out.loc[rows, "p_value"] = p
        out.loc[rows, "flagged"] = (p <= alpha).astype(int)
    return out


def metrics(vt: pd.DataFrame) -> pd.DataFrame:
    """Per seed, condition and method: AUC, TPR at 1 % FPR, TPR at the flag; the novel FPR at the flag."""
    rows = []
    for seed, d in vt.groupby("seed"):
        novel = d[d.label == "novel"]
        for method, score, flag in (
            ("ours", "volume_similarity", "flagged"),
            ("slice max", "max_similarity", "any_slice_flagged"),
            ("Dar et al. 3D", "dar_score", "dar_flagged"),
        ):
            for cond, c in d[d.label == "copy"].groupby("augmentation"):
                y = np.r_[np.ones(len(c)), np.zeros(len(novel))]
                s = np.nan_to_num(np.r_[c[score].to_numpy(float), novel[score].to_numpy(float)], nan=-1.0)
                auc, _, tpr1 = ranking_metrics(y, s, 0.01)
                rows.append(
                    {
                        "seed": seed,
                        "method": method,
                        "condition": cond,
                        "auc": auc,
                        "tpr_at_1pct_fpr": tpr1,
                        "tpr_at_flag": float(c[flag].astype(bool).mean()),
                        "n_copies": len(c),
                        "n_novel": len(novel),
                        "novel_flagged": int(novel[flag].astype(bool).sum()),
                    }
                )
    return pd.DataFrame(rows)


def resampled_fpr(vt: pd.DataFrame, alpha: float, *, n_splits: int = 2000, seed: int = 0) -> tuple[int, int]:
    """The volume calibration's false-alarm count on resampled real scores.

    Within each seed, the similarities of every volume known not to be a copy (the novel volumes and the
    run's volume null) are pooled, split at random into a null of the run's null size and a test set of the
    rest, and the test volumes are scored against that null with the product's own rule
    (:func:`inspector.calibration.volume_prediction_p_values`); those with ``p <= alpha`` are counted.
    Returns ``(flagged, tested)`` over all splits and seeds: many more trials than the run's novel volumes,
    under the run's own score distribution.
    """
    from inspector.calibration import volume_prediction_p_values

    rng = np.random.default_rng(seed)
    k = n = 0
    for _, d in vt[vt.label.isin(["novel", "null"])].groupby("seed"):
        s = d["volume_similarity"].dropna().to_numpy(float)
        n_null = int((d.label == "null").sum())
        if n_null < 3 or s.size - n_null < 1:
            continue
        for _ in range(n_splits):
            perm = rng.permutation(s.size)
            p = volume_prediction_p_values(s[perm[n_null:]], s[perm[:n_null]])
            k += int((p <= alpha).sum())
            n += p.size
    return k, n


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def section(per: pd.DataFrame, vt: pd.DataFrame, timings: pd.DataFrame, args: argparse.Namespace) -> str:
    """The markdown section, every number from this run."""
    seeds = sorted(per.seed.unique())
    g = per.groupby(["method", "condition"]).mean(numeric_only=True).reset_index()
    conds = [c for c in CONDITIONS_3D if c in set(g.condition)]
    start, end = markers(args.family)
    title = "" if args.family == "mni152" else f", second family ({args.family})"
    lines = [start, f"## 3D: volumes copied in 3D, per volume (issue 15){title}\n"]
    novel = vt[vt.label == "novel"]
    n_nov = len(novel)
    vt = vt.copy()
    lines.append(
        f"Machine: {platform.node() or 'unknown'} ({platform.machine()}, {os.cpu_count()} CPU cores, no GPU; shared "
        "with other jobs during the run). "
        f"Look-alike NIfTI cohorts from `benchmarks/volumes3d_data.py`, subjects made from "
        f"{FAMILY_TEXT.get(args.family, args.family)}: {args.train} training subjects, "
        f"{args.holdout} holdout and {args.novel} novel subjects per seed, {args.copies} copies per condition, "
        f"seeds {', '.join(map(str, seeds))}; 1.5 x 1.5 x 3 mm, {vt.groupby('seed').n_slices.median().median():.0f} "
        "axial slices per volume (median). Ours' p-values and flags are computed from the saved volume similarities "
        "and each seed's volume null with the product's own rule (`inspector.calibration.volume_prediction_p_values`). "
        "The audit is the "
        f"product's (`unit=volume`, extractor `{args.extractor}`, everything else default). AUC and TPR are means over "
        "seeds of per-seed values (copies of one condition against every novel volume of the seed); the FPR pools "
        "the seeds.\n"
    )
    lines.append("### Targets\n")
    ours = g[g.method == "ours"]
    w = ours.loc[ours.auc.idxmin()]
    wt = ours.loc[ours.tpr_at_1pct_fpr.idxmin()]
    rows = [
        (
            f"per-volume ROC-AUC >= {TARGET_AUC} in every condition",
            f"worst {_fmt(w.auc)} ({w.condition})",
            w.auc >= TARGET_AUC,
        ),
        (
            f"TPR >= {TARGET_TPR} at 1 % FPR in every condition",
            f"worst {_fmt(wt.tpr_at_1pct_fpr)} ({wt.condition})",
            wt.tpr_at_1pct_fpr >= TARGET_TPR,
        ),
    ]
    for alpha in (0.01, 0.05):
        k = int((novel["p_value"] <= alpha).sum())
        lo, hi = wilson_interval(k, n_nov)
        kr, nr = resampled_fpr(vt, alpha)
        rate = kr / nr if nr else float("nan")
        # the run's own novel volumes are too few to resolve alpha = 0.01; the resampled rate is the estimate
        # and the direct count must agree with it (its 95 % interval overlaps the target range)
        resampled_ok = bool(nr) and 0.5 * alpha <= rate <= 2 * alpha
        direct = k / max(n_nov, 1)
        met = (
            "yes"
            if resampled_ok and 0.5 * alpha <= direct <= 2 * alpha
            else "partly (the direct count is outside, within its interval)"
            if resampled_ok and lo <= 2 * alpha and hi >= 0.5 * alpha
            else "no"
        )
        rows.append(
            (
                f"volume FPR at alpha = {alpha:g} within [{0.5 * alpha:g}, {2 * alpha:g}]",
                f"resampled {rate:.4f} ({kr}/{nr} test volumes: the seed's novel and null volumes pooled and split "
                f"2,000 times into a null of the run's size and the rest); the run's novel volumes {k}/{n_nov} = "
                f"{k / max(n_nov, 1):.3f} (95 % CI {lo:.3f}-{hi:.3f})",
                met,
            )
        )
    ahead, tied, behind = [], [], []
    for c in conds:
        a = float(g[(g.condition == c) & (g.method == "ours")].auc.iloc[0])
        b = float(g[(g.condition == c) & (g.method == "Dar et al. 3D")].auc.iloc[0])
        (ahead if a > b + 1e-9 else tied if abs(a - b) <= 1e-9 else behind).append(c)
    rows.append(
        (
            "ahead of Dar et al.'s 3D method on every condition (AUC, same volumes, one run)",
            f"ahead on {len(ahead)}, tied on {len(tied)} ({', '.join(tied) or 'none'}: both at "
            f"{_fmt(float(g[(g.method == 'ours') & g.condition.isin(tied)].auc.min())) if tied else '-'}), "
            f"behind on {len(behind)}{' (' + ', '.join(behind) + ')' if behind else ''}",
            not behind,
        )
    )
    lines.append("| target | measured | met |\n|---|---|---|")

    def cell(ok: object) -> str:
        if isinstance(ok, str):
            return "**no**" if ok == "no" else ok
        return "yes" if bool(ok) else "**no**"

    lines += [f"| {t} | {m} | {cell(ok)} |" for t, m, ok in rows]
    lines.append("")
    lines.append("### Per condition (mean over seeds)\n")
    head = "| condition | " + " | ".join(f"{m} AUC | {m} TPR@1%FPR | {m} TPR at flag" for m in METHODS) + " |"
    lines.append(head)
    lines.append("|---|" + "---|" * (3 * len(METHODS)))
    for c in conds:
        cells = []
        for m in METHODS:
            r = g[(g.condition == c) & (g.method == m)].iloc[0]
            cells += [_fmt(r.auc), _fmt(r.tpr_at_1pct_fpr), _fmt(r.tpr_at_flag)]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("### False positives on novel volumes (seeds pooled)\n")
    lines.append("| method | flag | novel volumes flagged | FPR |\n|---|---|---|---|")
    for m, col, rule in (
        ("ours", "flagged", f"p <= alpha = {vt['alpha'].iloc[0]:g} (against the volume null)"),
        ("slice max", "any_slice_flagged", "any slice flagged at the same alpha"),
        ("Dar et al. 3D", "dar_flagged", "nearest distance below the holdout's 5th percentile"),
    ):
        k = int(novel[col].astype(bool).sum())
        lines.append(f"| {m} | {rule} | {k}/{n_nov} | {k / max(n_nov, 1):.3f} |")
    lines.append("")
    t = timings.mean(numeric_only=True)
    vol_s = t.get("t_volumes", float("nan"))
    lines.append(
        f"Time per seed (mean): audit {t.audit_s:.0f} s, of which the volume stage {vol_s:.0f} s; "
        f"Dar et al. 3D {t.seconds:.0f} s ({t.steps:.0f} training steps of batch 8 on this CPU, mean over seeds; "
        "their paper trains for 200 epochs on a GPU, so this baseline is trained far less). Volume calibration: "
        f"{_calibration_words(timings)}.\n"
    )
    lines.append(end)
    return "\n".join(lines)


def family_tag(family: str) -> str:
    """The file prefix of a family's tables in the output folder (``volumes3d`` or ``volumes3d-<family>``)."""
    return "volumes3d" if family == "mni152" else f"volumes3d-{family}"


def _sizes_from_run(args: argparse.Namespace, vt: pd.DataFrame, timings: pd.DataFrame) -> None:
    """Set ``args.train/holdout/novel/copies/seeds`` from a saved run's tables (the section states what ran)."""
    first = vt[vt.seed == vt.seed.min()]
    args.seeds = sorted(int(x) for x in vt.seed.unique())
    args.train = int(first.n_train.iloc[0])
    args.novel = int((first.label == "novel").sum())
    args.copies = int(first[first.label == "copy"].groupby("augmentation").size().max())
    n_null = int(timings.n_null_volumes.iloc[0]) if "n_null_volumes" in timings else int((first.label == "null").sum())
    args.holdout = n_null - min(args.train, 64)  # the null: the holdout + up to 64 leave-one-subject-out volumes


def _calibration_words(timings: pd.DataFrame) -> str:
    """The run's volume null (from its timings) and the rule its p-values were recomputed with (the current)."""
    from inspector.calibration import VOLUME_RULE

    null = str(timings.volume_calibration.iloc[0]).split(";")[0]
    return f"{null}; {VOLUME_RULE} (recomputed from the saved similarities with the product's current rule)"


def write_results(text: str, path: Path = RESULTS, family: str = "mni152") -> None:
    """Replace the family's 3D section of RESULTS.md (between its markers), or append it."""
    start, end = markers(family)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")


def report(argv: list[str] | None = None) -> str:
    """Run (or with ``--reuse`` re-render) the benchmark; return its RESULTS.md section (written with
    ``--write-results``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=12)
    ap.add_argument("--novel", type=int, default=30)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--extractor", default="ssl")
    ap.add_argument("--family", default="mni152", choices=FAMILIES)
    ap.add_argument("--dar-steps", type=int, default=300)
    ap.add_argument("--dar-seconds", type=float, default=120.0, help="wall-clock cap of Dar et al.'s training")
    ap.add_argument(
        "--dar-only",
        action="store_true",
        help="retrain only Dar et al.'s baseline (--dar-steps, --dar-seconds) on the saved seeds' cohorts",
    )
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="render from the saved per-volume table of a previous run")
    args = ap.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    tag = family_tag(args.family)
    vt_path, tm_path = args.out / f"{tag}_per_volume.csv", args.out / f"{tag}_timings.csv"
    if args.reuse or args.dar_only:
        # "null" (the volume null's rows) is a label here, not a missing value
        vt, timings = pd.read_csv(vt_path, keep_default_na=False, na_values=[""]), pd.read_csv(tm_path)
        if args.dar_only:
            vt, timings = _redo_dar(vt, timings, args)
            vt.to_csv(vt_path, index=False)
            timings.to_csv(tm_path, index=False)
    else:
        frames, tms = [], []
        for seed in args.seeds:
            v, tm = run_seed(
                args.train,
                seed,
                n_holdout=args.holdout,
                n_novel=args.novel,
                copies=args.copies,
                dar_steps=args.dar_steps,
                extractor=args.extractor,
                family=args.family,
            )
            frames.append(v)
            tms.append(tm)
            pd.concat(frames).to_csv(vt_path, index=False)
            pd.DataFrame(tms).to_csv(tm_path, index=False)
            log.info("seed %d done: %s", seed, tm)
        vt, timings = pd.concat(frames), pd.DataFrame(tms)
    if args.reuse:  # the cohort's sizes from the saved run, not from the command line
        _sizes_from_run(args, vt, timings)
    vt = recalibrate(vt, 0.01)
    vt["alpha"] = 0.01
    per = metrics(vt)
    per.to_csv(args.out / f"{tag}_per_condition.csv", index=False)
    text = section(per, vt, timings, args)
    if args.write_results:
        write_results(text, family=args.family)
    return text


def main(argv: list[str] | None = None) -> int:
    print(report(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
