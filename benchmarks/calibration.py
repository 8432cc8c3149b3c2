"""Calibration benchmark: is each decision's false-alarm rate at most its stated level, and what power does it have?

Usage::

    python -m benchmarks.calibration [--reps N] [--quick]

Simulated with the synthetic set G and the null from one distribution (no copying), through the library's own
:class:`inspector.calibration.Calibration` (the object every screen, file and gate asks):

1. **The dataset verdict's false-alarm rate** at its 5 % level, for m = 48, 1,000, 10,000 synthetic slices and
   n_null = 100, 1,000 null slices, with *independent* slices and with *volume-correlated* slices (volumes of 50
   slices: a volume effect plus AR(1) noise with correlation 0.9, in G and in the holdout alike). Beside it, the
   previous rule (the 95 % Wilson interval of the flagged fraction above alpha), which treats flags as
   independent.
2. **The verdict's power** at 1 %, 5 % and 20 % copied slices (copies score far above the null).
3. **On real MRI** (the detection benchmark's data, both splits, every seed, the default mode with its
   default ssl encoder and the paper mode, each calibrated on its holdout): the novel-slice false-positive
   rate at alpha = 0.01 and 0.05, and the verdict's false alarms on synthetic sets made only of novel slices
   (48 slices drawn from the fold's novel pool, 20 draws per fold).
4. **The volume-level false-positive rate**: the fraction of novel volumes flagged, with the volume p-values
   calibrated on the holdout's volumes (the default when the holdout has volumes; p <= alpha needs at least
   1/alpha - 1 holdout volumes, so at alpha = 0.01 it is 0 by construction with fewer); without holdout
   volumes, by Bonferroni within the volume (the fallback) and, for comparison, by the Simes statistic alone.

Every number is measured in the run; the table is printed and written by ``benchmarks.run_all``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
from scipy.signal import lfilter

from inspector.calibration import Calibration, wilson_interval

ALPHA = 0.01
VOLUME = 50
RHO = 0.9


def _volumes(rng: np.random.Generator, m: int, size: int = VOLUME, rho: float = RHO) -> tuple[np.ndarray, np.ndarray]:
    """m scores in volumes of ``size`` slices: a N(0, 1) volume effect plus stationary AR(1) noise."""
    n_vol = max(1, m // size)
    e = lfilter([np.sqrt(1 - rho**2)], [1, -rho], rng.normal(size=(n_vol, size + 50)), axis=1)[:, 50:]
    s = (rng.normal(size=(n_vol, 1)) + e).ravel()
    return s, np.repeat(np.arange(n_vol).astype(str), size).astype(object)


def _one(
    rng: np.random.Generator, m: int, n: int, dependent: bool, copied: float = 0.0
) -> tuple[bool, bool, tuple[float, float, float]]:
    """(verdict alarm, previous-rule alarm, fractions of novel volumes flagged) for one simulated audit: at alpha
    and at 0.05 with holdout volumes; at alpha without holdout volumes (Bonferroni within the volume, and the
    Simes statistic alone)."""
    if dependent:
        g, gg = _volumes(rng, m)
        h, hg = _volumes(rng, n)
    else:
        g, gg, h, hg = rng.normal(size=m), None, rng.normal(size=n), None
    k = int(round(copied * g.size))
    if k:
        g[rng.choice(g.size, k, replace=False)] += 10.0
    cal = Calibration(g, h, null_kind="holdout", alpha=ALPHA, groups=gg, null_groups=hg)
    v = cal.verdict()
    lo = wilson_interval(int((cal.p_values <= ALPHA).sum()), g.size)[0]
    nan = float("nan")
    vol = (nan, nan, nan, nan)
    if dependent and not k:
        no_volumes = Calibration(g, h, null_kind="holdout", alpha=ALPHA, groups=gg)
        vol = (
            float(cal.volume_flags().mean()),
            float(cal.volume_flags(0.05).mean()),
            float(no_volumes.volume_flags().mean()),
            float((no_volumes.volume_simes <= ALPHA).mean()),
        )
    return bool(v.copying), bool(lo > ALPHA), vol


#: The heading of the clustered-holdout table (written into the calibration section on its own).
CLUSTERED_HEAD = "### Independent synthetic slices against a holdout of volumes"


def clustered(reps: int, quick: bool = False) -> str:
    """The verdict when the synthetic slices are independent (2D outputs) but the holdout comes in volumes.

    The holdout's slices are volume-correlated (volumes of :data:`VOLUME` slices, a volume effect plus AR(1)
    noise, rescaled to unit variance), the synthetic slices independent draws from the same marginal: under no
    copying each novel slice passes with a probability that depends on this one holdout, and with 10-20
    volumes that probability varies much more than the Beta-binomial of independent null slices says. Rows:
    false alarms and power of the verdict (which takes the larger of the Beta-binomial and the volume-bootstrap
    p-values, :func:`inspector.calibration.clustered_count_test_p_value`) and of the Beta-binomial alone.
    """
    rng = np.random.default_rng(20261204)
    t0 = time.perf_counter()

    def ar_holdout(n: int) -> tuple[np.ndarray, np.ndarray]:
        h, hg = _volumes(rng, n)
        return h / np.sqrt(2.0), hg  # volume effect N(0, 1) + unit AR(1) noise: unit variance, as the slices

    def icc_holdout(n: int) -> tuple[np.ndarray, np.ndarray]:
        n_vol = max(1, n // VOLUME)
        h = np.sqrt(0.5) * rng.normal(size=(n_vol, 1)) + np.sqrt(0.5) * rng.normal(size=(n_vol, VOLUME))
        return h.ravel(), np.repeat(np.arange(n_vol).astype(str), VOLUME).astype(object)

    models = (
        (f"AR(1) {RHO:g} + volume effect", ar_holdout, (0.0, 0.01, 0.05, 0.20)),
        ("volume effect + independent noise (ICC 0.5)", icc_holdout, (0.0, 0.05)),
    )
    rows = []
    ms = (48, 1000) if quick else (48, 1000, 10000)
    for model, holdout, rates in models:
        for copied in rates:
            for m in ms:
                if copied and m < 1000:
                    continue
                for n in (500, 1000):
                    r = max(50, reps // (4 if m >= 10000 else 1) // (2 if copied else 1))
                    new, old = [], []
                    for _ in range(r):
                        g = rng.normal(size=m)
                        k = int(round(copied * m))
                        if k:
                            g[rng.choice(m, k, replace=False)] += 10.0
                        h, hg = holdout(n)
                        cal = Calibration(g, h, null_kind="holdout", alpha=ALPHA, null_groups=hg)
                        new.append(cal.verdict().copying)
                        old.append(Calibration(g, h, null_kind="holdout", alpha=ALPHA).verdict().copying)
                    rows.append((model, copied, m, n, r, float(np.mean(new)), float(np.mean(old))))
    out = [
        f"{CLUSTERED_HEAD}\n",
        f"alpha = {ALPHA:g} per slice; synthetic slices independent N(0, 1) (copies +10); the holdout in volumes of "
        f"{VOLUME} slices with unit variance, correlated within a volume by one of two models; "
        f"{time.perf_counter() - t0:.0f} s. Under no copying the rate is the false-alarm rate (stated level 0.05), "
        "else the power.\n",
        "| holdout model | copied slices | m | n_null (volumes) | runs | verdict (Beta-binomial and volume "
        "bootstrap) | Beta-binomial alone (the rule before) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, copied, m, n, r, new, old in rows:
        out.append(f"| {model} | {copied:.0%} | {m} | {n} ({n // VOLUME}) | {r} | {new:.3f} | {old:.3f} |")
    fa = [(new, r) for _, copied, _, _, r, new, _ in rows if not copied]
    worst = max(f - 0.05 - 2 * np.sqrt(0.05 * 0.95 / r) for f, r in fa)
    out.append(
        f"\nEvery false-alarm rate of the verdict within 2 s.e. of 5 % or below: **{'yes' if worst <= 0 else 'no'}** "
        f"(largest excess over 5 % + 2 s.e.: {worst:+.3f}).\n"
    )
    return "\n".join(out) + "\n"


def put_clustered(text: str, command: str, seconds: float) -> None:
    """Put :func:`clustered`'s table into RESULTS.md's calibration section (before its real-MRI table)."""
    from .results import RESULTS, replace_block, stamp

    block = text.replace(f"{CLUSTERED_HEAD}\n", f"{CLUSTERED_HEAD}\n\n{stamp(command, seconds)}\n", 1)
    doc = RESULTS.read_text(encoding="utf-8")
    new = replace_block(doc, CLUSTERED_HEAD, block, ("\n### ", "\n## "))
    if new is None:
        anchor = "### On real MRI: novel-slice false positives"
        if anchor not in doc:
            raise SystemExit("RESULTS.md has no calibration section; run python -m benchmarks.run_all first.")
        new = doc.replace(anchor, block.rstrip("\n") + "\n\n" + anchor, 1)
    RESULTS.write_text(new, encoding="utf-8")


def real(seeds: Sequence[int], splits: Sequence[str], n_draws: int = 20, n_g: int = 48) -> str:
    """Novel-slice FPR at alpha 0.01 / 0.05 and the verdict's false alarms on novel-only sets, on real MRI."""
    from .data import load_bank, make_split
    from .detection import BenchConfig, score_seed

    bank = load_bank()
    rng = np.random.default_rng(7)
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for kind in splits:
        for seed in seeds:
            sp = make_split(bank, kind, seed)
            bc = BenchConfig(
                seeds=[seed], splits=[kind], conditions=("none",), backbones=("ssl",), ablations={},
                ablation_conditions=("none",), feature_ablations=False, baselines=False,
            )  # fmt: skip
            r = score_seed(bank, sp, bc, conditions=("none",))
            for name in ("default/ssl", "paper/ssl"):
                m = r.methods[name]
                acc = rows.setdefault((kind, name), {"f01": [], "f05": [], "n": [], "alarm": []})
                for f in range(sp.n_folds):
                    pos, null = sp.novel(f), m.unseen[sp.holdout(f)]
                    cal = Calibration(m.unseen[pos], null, null_kind="holdout")
                    acc["f01"].append(float(cal.flags(0.01).sum()))
                    acc["f05"].append(float(cal.flags(0.05).sum()))
                    acc["n"].append(float(len(pos)))
                    for _ in range(n_draws):
                        g = rng.choice(pos, size=min(n_g, len(pos)), replace=False)
                        v = Calibration(m.unseen[g], null, null_kind="holdout").verdict()
                        acc["alarm"].append(float(v.copying))
    out = [
        "### On real MRI: novel-slice false positives and the verdict on novel-only sets\n",
        f"Seeds {list(seeds)}, splits {list(splits)}; {time.perf_counter() - t0:.0f} s. Each fold's novel pool "
        "against "
        "its holdout (disjoint slices); the verdict on random novel-only sets of "
        f"{n_g} slices ({n_draws} per fold).\n",
        "| split | method | novel FPR at 0.01 (95 % CI) | novel FPR at 0.05 (95 % CI) "
        "| verdict false alarms (level 0.05) |",
        "|---|---|---:|---:|---:|",
    ]
    for (kind, name), acc in rows.items():
        n = int(sum(acc["n"]))
        cells = []
        for key in ("f01", "f05"):
            k = int(sum(acc[key]))
            lo, hi = wilson_interval(k, n)
            cells.append(f"{k}/{n} = {k / n:.4f} ({lo:.4f}–{hi:.4f})")
        alarms = np.asarray(acc["alarm"])
        cells.append(f"{alarms.mean():.3f} ({int(alarms.sum())}/{alarms.size})")
        out.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def run(reps: int, quick: bool = False) -> str:
    rng = np.random.default_rng(20261201)
    ms = (48, 1000) if quick else (48, 1000, 10000)
    rows = []
    t0 = time.perf_counter()
    for dependent in (False, True):
        for m in ms:
            for n in (100, 1000):
                if dependent and m < 2 * VOLUME:
                    continue
                r = max(50, reps // (4 if m >= 10000 else 1))
                res = [_one(rng, m, n, dependent) for _ in range(r)]
                far = np.mean([a for a, _, _ in res])
                old = np.mean([b for _, b, _ in res])
                vf = np.nanmean([c for _, _, c in res], axis=0) if dependent else np.full(4, np.nan)
                se = np.sqrt(0.05 * 0.95 / r)
                rows.append(("volume-correlated" if dependent else "independent", m, n, r, far, se, old, vf))
    power = []
    for copied in (0.01, 0.05, 0.20):
        for m in ms[1:]:
            for n in (100, 1000):
                r = max(50, reps // (8 if m >= 10000 else 2))
                hits = np.mean([_one(rng, m, n, False, copied)[0] for _ in range(r)])
                power.append((copied, m, n, r, hits))
    secs = time.perf_counter() - t0
    out = [
        "### The dataset verdict under no copying (false-alarm rate at its 5 % level)\n",
        f"alpha = {ALPHA:g} per slice; volumes of {VOLUME} slices with AR(1) correlation {RHO:g} plus a volume effect; "
        f"{secs:.0f} s in all.\n",
        "| slices | m | n_null | runs | verdict false alarms | ± 1 s.e. | previous rule (Wilson) | "
        f"novel volumes flagged at {ALPHA:g} / at 0.05 (holdout volumes) | at {ALPHA:g}, no holdout volumes: "
        "Bonferroni / Simes alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, m, n, r, far, se, old, vf in rows:
        vtxt = "—" if np.isnan(vf[0]) else f"{vf[0]:.4f} / {vf[1]:.4f}"
        stxt = "—" if np.isnan(vf[2]) else f"{vf[2]:.4f} / {vf[3]:.4f}"
        out.append(f"| {kind} | {m} | {n} | {r} | {far:.3f} | {se:.3f} | {old:.3f} | {vtxt} | {stxt} |")
    worst = max(far - 0.05 - 2 * se for _, _, _, _, far, se, _, _ in rows)
    out.append(
        f"\nEvery verdict false-alarm rate is within 2 s.e. of 5 % or below: **{'yes' if worst <= 0 else 'no'}** "
        f"(largest excess over 5 % + 2 s.e.: {worst:+.3f}).\n"
    )
    out += [
        "### The dataset verdict's power (independent slices)\n",
        "| copied slices | m | n_null | runs | power |",
        "|---:|---:|---:|---:|---:|",
    ]
    for copied, m, n, r, p in power:
        out.append(f"| {copied:.0%} | {m} | {n} | {r} | {p:.3f} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated audits per cell (fewer for m = 10,000)")
    ap.add_argument("--quick", action="store_true", help="m <= 1,000 and 200 runs per cell; real MRI: one seed")
    ap.add_argument("--no-real", action="store_true", help="simulations only")
    ap.add_argument(
        "--clustered-only",
        action="store_true",
        help="only the table of independent synthetic slices against a holdout of volumes",
    )
    ap.add_argument("--update-results", action="store_true", help="with --clustered-only: put it into RESULTS.md")
    args = ap.parse_args(argv)
    reps = 200 if args.quick else args.reps
    t0 = time.perf_counter()
    text = clustered(max(50, reps // 2), quick=args.quick)
    print(text)
    if args.clustered_only:
        if args.update_results:
            cmd = "python -m benchmarks.calibration " + " ".join(sys.argv[1:] if argv is None else argv)
            put_clustered(text, cmd.strip(), time.perf_counter() - t0)
        return 0
    print(run(reps, quick=args.quick))
    if not args.no_real:
        seeds = (0,) if args.quick else (0, 1, 2, 3, 4)
        print(real(seeds, ("slice",) if args.quick else ("slice", "subject")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
