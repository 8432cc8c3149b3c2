"""Benchmark of alignment-verified re-ranking on real MRI slices (``python -m benchmarks.bench_align``).

For every condition of :data:`inspector.preprocess.CONDITIONS`, copies (source slices passed through the
condition) are registered onto their source, and so are hard negatives: slices 3-6 apart in the same
volume (the realistic "same subject, a few millimetres away" novel slice) and slices from another axis.
Sample-level ROC-AUC (copy vs negative) of the NCC after alignment is compared against the raw pixel
NCC without alignment (and its best over the four flips), per condition and averaged over seeds, plus the
registration throughput in pairs per second.

Data: nilearn's MNI152 T1 template (bundled, works offline), intensities normalised to [0, 1], slices
resized to 128 px (the audit's loading size) before the condition is applied. The template is exactly
left-right symmetric, so (i) a sagittal slice and its mirror-position slice are identical: such pairs are
never used as negatives; (ii) for axial and coronal slices the left-right flip is an identity, which makes
one of ``hflip``/``vflip`` trivially easy for those axes. Negatives are clean (not augmented), as in the
benchmark protocol; ``--augment-negatives`` passes them through the same condition as the copies.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from inspector.align import MEASURES, pair_ncc, register_pairs, score_alignment
from inspector.preprocess import CONDITIONS, apply_condition, is_background, normalise_volume, resize_square

log = logging.getLogger("bench_align")

LOAD_SIZE = 128  # slices are loaded at this size, as in the audit (AuditConfig.size)
NEIGHBOUR_GAP = (3, 6)  # hard negatives: this many slices apart in the same volume


@dataclass
class PairSet:
    """Fixed/moving stacks with labels (1 copy, 0 negative), the condition and the negative kind."""

    fixed: np.ndarray
    moving: np.ndarray
    label: np.ndarray
    condition: np.ndarray
    kind: np.ndarray  # "copy", "neighbour", "other_axis"


def load_volume(resolution: int, path: str | None = None) -> np.ndarray:
    """The MNI152 T1 template at ``resolution`` mm (or the NIfTI at ``path``, first volume), in [0, 1]."""
    if path is not None:
        import nibabel as nib

        arr = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        while arr.ndim > 3:
            arr = arr[..., 0]
        return normalise_volume(arr, name=path)
    from nilearn.datasets import load_mni152_template

    return normalise_volume(np.asarray(load_mni152_template(resolution=resolution).get_fdata()), name="MNI152")


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return resize_square(np.take(vol, index, axis=axis), LOAD_SIZE)


def _foreground(vol: np.ndarray, axis: int, min_fraction: float = 0.15) -> np.ndarray:
    """Slice indices along ``axis`` whose foreground covers at least ``min_fraction`` of the slice."""
    keep = []
    for i in range(vol.shape[axis]):
        img = np.take(vol, i, axis=axis)
        if not is_background(img) and float((img > 0.1).mean()) >= min_fraction:
            keep.append(i)
    return np.asarray(keep)


def build_pairs(
    vol: np.ndarray,
    n_sources: int,
    seed: int,
    augment_negatives: bool,
    gap: tuple[int, int] = NEIGHBOUR_GAP,
) -> PairSet:
    """Copies for every condition plus neighbour and other-axis negatives for ``n_sources`` source slices.

    Sources are drawn evenly from the three axes; each gets two neighbour negatives (one on each side when
    possible, ``gap`` slices apart, uniform in the inclusive range) and one other-axis negative.
    """
    rng = np.random.default_rng(seed)
    fg = {a: _foreground(vol, a) for a in range(3)}
    nx = vol.shape[0]
    lo_gap, hi_gap = int(gap[0]), int(gap[1])
    fixed, moving, label, cond, kind = [], [], [], [], []
    symmetric = bool(np.allclose(vol, vol[::-1], atol=1e-6))
    per_axis = [n_sources // 3 + (1 if a < n_sources % 3 else 0) for a in range(3)]
    for axis in range(3):
        fg_set = set(fg[axis].tolist())
        allowed = np.asarray([i for i in fg[axis] if i - hi_gap in fg_set or i + hi_gap in fg_set], dtype=int)
        if axis == 0 and symmetric:  # mirror-symmetric template: one hemisphere only, away from the midline
            allowed = allowed[allowed < (nx - 1) / 2 - hi_gap - 2]
        if allowed.size == 0:
            continue
        src_idx = rng.choice(allowed, size=min(per_axis[axis], allowed.size), replace=False)
        for i in src_idx:
            src = _slice(vol, axis, int(i))
            for name in CONDITIONS:
                c_seed = int(rng.integers(2**31))
                fixed.append(apply_condition(src, name, c_seed))
                moving.append(src)
                label.append(1)
                cond.append(name)
                kind.append("copy")
            for side in (-1, 1):
                d = int(rng.integers(lo_gap, hi_gap + 1))
                j = int(i) + side * d
                if j not in fg_set:
                    j = int(i) - side * d
                if j not in fg_set or (axis == 0 and symmetric and abs(j + int(i) - (nx - 1)) < lo_gap):
                    continue
                fixed.append(_slice(vol, axis, j))
                moving.append(src)
                label.append(0)
                cond.append("")
                kind.append("neighbour")
            other = int(rng.choice([a for a in range(3) if a != axis]))
            fixed.append(_slice(vol, other, int(rng.choice(fg[other]))))
            moving.append(src)
            label.append(0)
            cond.append("")
            kind.append("other_axis")
    ps = PairSet(np.stack(fixed), np.stack(moving), np.asarray(label), np.asarray(cond), np.asarray(kind))
    if augment_negatives:
        ps = _augment_negatives(ps, seed)
    return ps


def _augment_negatives(ps: PairSet, seed: int) -> PairSet:
    """One negative set per condition: the negatives' fixed slices passed through that condition."""
    neg = ps.label == 0
    pos = ~neg
    parts = [(ps.fixed[pos], ps.moving[pos], ps.label[pos], ps.condition[pos], ps.kind[pos])]
    for k, name in enumerate(CONDITIONS):
        f = apply_condition(ps.fixed[neg], name, seed * 1000 + k)
        parts.append((f, ps.moving[neg], ps.label[neg], np.full(neg.sum(), name), ps.kind[neg]))
    return PairSet(*(np.concatenate([p[i] for p in parts]) for i in range(5)))


def _auc(scores: np.ndarray, ps: PairSet, condition: str, kinds: tuple[str, ...]) -> float:
    pos = (ps.condition == condition) & (ps.label == 1)
    neg = (ps.label == 0) & np.isin(ps.kind, kinds)
    if (ps.condition[ps.label == 0] != "").any():  # augmented negatives: the same condition only
        neg &= ps.condition == condition
    y = np.r_[np.ones(pos.sum()), np.zeros(neg.sum())]
    return float(roc_auc_score(y, np.r_[scores[pos], scores[neg]]))


def raw_scores(ps: PairSet, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixel NCC (no alignment) and its best over the four flips of the moving image."""
    plain = pair_ncc(ps.fixed, ps.moving, size=size)
    flips = [plain]
    for axes in ((2,), (1,), (1, 2)):
        flips.append(pair_ncc(ps.fixed, np.flip(ps.moving, axis=axes), size=size))
    return plain, np.max(np.stack(flips), axis=0)


def run(
    resolution: int | None,
    sizes: list[int],
    seeds: list[int],
    n_sources: int,
    augment_negatives: bool,
    known_flips: bool,
    register_kwargs: dict,
    gap: tuple[int, int] = NEIGHBOUR_GAP,
    volume: str | None = None,
) -> dict:
    """Run the benchmark; returns nested results (per size: per condition AUCs and throughput)."""
    vol = load_volume(resolution or 2, volume)
    results: dict = {"sizes": {}, "n_pairs": 0, "threads": torch.get_num_threads()}
    sets = {s: build_pairs(vol, n_sources, s, augment_negatives, gap) for s in seeds}
    results["n_pairs"] = int(len(sets[seeds[0]].label))
    results["n_negatives"] = {k: int((sets[seeds[0]].kind == k).sum()) for k in ("neighbour", "other_axis")}
    for size in sizes:
        per_cond: dict[str, dict[str, list[float]]] = {c: {} for c in CONDITIONS}
        rates, cpu_rates = [], []
        for seed in seeds:
            ps = sets[seed]
            flips = None
            if known_flips:
                flips = np.where(np.isin(ps.condition, ["hflip", "combo"]) & (ps.label == 1), "hflip", "none")
                flips = np.where((ps.condition == "vflip") & (ps.label == 1), "vflip", flips)
            t0, c0 = time.perf_counter(), time.process_time()
            al = register_pairs(ps.fixed, ps.moving, flips=flips, size=size, device="cpu", **register_kwargs)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            rates.append(len(ps.label) / dt)
            cpu_rates.append(len(ps.label) / dc)
            scores = {"raw": None, "raw_flips": None}
            scores["raw"], scores["raw_flips"] = raw_scores(ps, size)
            for m in MEASURES:
                scores[m] = (
                    al.ncc
                    if m == register_kwargs.get("measure", MEASURES[0])
                    else score_alignment(ps.fixed, ps.moving, al, size=size, measure=m)
                )
            for c in CONDITIONS:
                for name, sc in scores.items():
                    per_cond[c].setdefault(name, []).append(_auc(sc, ps, c, ("neighbour", "other_axis")))
                    per_cond[c].setdefault(name + "_nb", []).append(_auc(sc, ps, c, ("neighbour",)))
                copies = (ps.condition == c) & (ps.label == 1)
                per_cond[c].setdefault("copy_median", []).append(float(np.median(al.ncc[copies])))
            negs = (ps.label == 0) & (ps.kind == "neighbour")
            per_cond["none"].setdefault("neg_p95", []).append(float(np.percentile(al.ncc[negs], 95)))
            per_cond["none"].setdefault("neg_median", []).append(float(np.median(al.ncc[negs])))
            log.info("size %d seed %d: %d pairs in %.1f s (%.1f pairs/s)", size, seed, len(ps.label), dt, rates[-1])
        results["sizes"][size] = {
            "conditions": {c: {k: float(np.mean(v)) for k, v in d.items()} for c, d in per_cond.items()},
            "pairs_per_s": float(statistics.median(rates)),
            "pairs_per_cpu_s": float(statistics.median(cpu_rates)),
        }
    return results


def markdown(results: dict, measure: str) -> str:
    """Markdown tables of the results."""
    lines = []
    for size, res in results["sizes"].items():
        conds = res["conditions"]
        lines.append(
            f"\n### {size} px: {res['pairs_per_s']:.0f} pairs/s wall, "
            f"{res['pairs_per_cpu_s']:.0f} pairs per CPU-second "
            f"({results['threads']} torch threads), "
            f"{results['n_pairs']} pairs per seed"
        )
        lines.append(
            "\nROC-AUC copy vs negative (neighbour slices + other-axis slices; in brackets: neighbour "
            f"slices only). Score used by register_pairs: `{measure}`.\n"
        )
        keys = ("raw", "raw_flips", *MEASURES)
        lines.append(
            "| condition | raw NCC | raw NCC, best flip | "
            + " | ".join(f"aligned `{m}`" for m in MEASURES)
            + f" | copy median `{measure}` |"
        )
        lines.append("|---" * (len(keys) + 2) + "|")
        for c, d in conds.items():
            cells = [f"{d[k]:.3f} ({d[k + '_nb']:.3f})" for k in keys]
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {d['copy_median']:.4f} |")
        mean = {k: np.mean([d[k] for d in conds.values()]) for k in keys}
        mean_nb = {k: np.mean([d[k + "_nb"] for d in conds.values()]) for k in mean}
        lines.append("| **mean** | " + " | ".join(f"**{mean[k]:.3f}** ({mean_nb[k]:.3f})" for k in mean) + " | |")
        none = conds["none"]
        lines.append(
            f"\nNeighbour negatives, aligned `{measure}`: median {none['neg_median']:.4f}, 95th percentile "
            f"{none['neg_p95']:.4f}."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=2, choices=(1, 2), help="MNI152 resolution in mm")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-sources", type=int, default=30, help="source slices per seed (split over 3 axes)")
    ap.add_argument("--augment-negatives", action="store_true", help="pass negatives through the condition too")
    ap.add_argument("--volume", default=None, help="any NIfTI volume instead of the MNI152 template")
    ap.add_argument("--gap", type=int, nargs=2, default=list(NEIGHBOUR_GAP), help="neighbour gap range, slices")
    ap.add_argument("--known-flips", action="store_true", help="give register_pairs the true flip")
    ap.add_argument("--measure", default=MEASURES[0], choices=MEASURES)
    ap.add_argument("--iterations", type=int, nargs=2, default=None)
    ap.add_argument("--angle-starts", type=float, nargs="+", default=None)
    ap.add_argument("--flip-candidates", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    kw: dict = {"measure": args.measure}
    if args.iterations:
        kw["iterations"] = tuple(args.iterations)
    if args.angle_starts:
        kw["angle_starts"] = tuple(args.angle_starts)
    if args.flip_candidates:
        kw["flip_candidates"] = args.flip_candidates
    res = run(
        args.resolution,
        args.sizes,
        args.seeds,
        args.n_sources,
        args.augment_negatives,
        args.known_flips,
        kw,
        tuple(args.gap),
        args.volume,
    )
    print(
        f"## Alignment-verified re-ranking on {args.volume or f'MNI152 ({args.resolution} mm)'}, seeds {args.seeds}, "
        f"neighbour gap {args.gap[0]}-{args.gap[1]} slices, negatives per seed: {res['n_negatives']}, "
        f"{'augmented' if args.augment_negatives else 'clean'} negatives, "
        f"flips {'known' if args.known_flips else 'searched (flips=None)'}, register_pairs options {kw}"
    )
    print(markdown(res, args.measure))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
