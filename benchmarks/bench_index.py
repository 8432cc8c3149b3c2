"""Nearest-neighbour search time: exact vs approximate, 1k-100k queries against as many base embeddings.

Usage::

    python -m benchmarks.bench_index [--quick] [--runs 3] [--out FILE.md]

Data: a Gaussian mixture that looks like image embeddings (n/100 cluster centres ~ N(0, I), every row = centre +
1.5 * N(0, I), so neighbours are meaningful but not trivial); queries are fresh draws from the same mixture, as a
synthetic set is against its training set. k = 10, cosine. Each configuration is timed ``--runs`` times (median
reported; a configuration stops early once it has used ``--budget`` seconds, the 100k exact search being the only
one that does). Timings include everything ``knn`` does (validation, normalisation, index build for approximate
mode, exact re-ranking). As a reference measured in the same run, ``raw faiss`` is a bare ``faiss.knn`` on
pre-normalised float32 data (no validation, no re-ranking). ``recall@10`` is the overlap of the approximate answer
with the exact one; ``= brute force`` is the fraction of query rows whose exact answer equals a float64 numpy brute
force (ties excepted). ``--quick`` skips the 30k and 100k sizes; ``--sizes 20000x256,...`` runs chosen sizes.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from inspector import index as index_mod
from inspector.index import knn

K = 10


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_model()}, {cores} cores usable (faiss OpenMP threads {faiss.omp_get_max_threads()}), "
        f"load average at start {load}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"faiss {faiss.__version__}, GPU faiss: {index_mod.gpu_available()}"
    )


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, d) float32 rows of the mixture."""
    out = np.empty((n, d), dtype=np.float32)
    step = 20_000
    for s in range(0, n, step):
        e = min(n, s + step)
        lab = rng.integers(0, len(centres), size=e - s)
        out[s:e] = centres[lab] + 1.5 * rng.standard_normal((e - s, d), dtype=np.float32)
    return out


def timed(fn: Callable[[], object], runs: int, budget: float) -> tuple[float, int, object]:
    times: list[float] = []
    result = None
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if sum(times) > budget:
            break
    return statistics.median(times), len(times), result


def brute_agreement(q: np.ndarray, b: np.ndarray, idx: np.ndarray, tol: float = 1e-6) -> float:
    """Fraction of rows whose ``idx`` equals a float64 brute force (equal similarities may swap)."""
    qn = q.astype(np.float64)
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    bn = b.astype(np.float64)
    bn /= np.linalg.norm(bn, axis=1, keepdims=True)
    ok = 0
    for s in range(0, len(q), 1000):
        sims = qn[s : s + 1000] @ bn.T
        ref = np.argsort(-sims, axis=1, kind="stable")[:, :K]
        got = idx[s : s + 1000]
        ref_s = np.take_along_axis(sims, ref, axis=1)
        got_s = np.take_along_axis(sims, got, axis=1)
        ok += int(np.sum(np.all((ref == got) | (np.abs(ref_s - got_s) <= tol), axis=1)))
    return ok / len(q)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True))
    return hits / exact.size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only 1k and 10k (skips 30k and 100k)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median reported)")
    ap.add_argument("--budget", type=float, default=90.0, help="stop repeating a configuration after this many s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the markdown table to this file")
    ap.add_argument("--sizes", help="comma-separated NxD configurations instead of the default set, e.g. 20000x256")
    args = ap.parse_args(argv)

    configs = [(1_000, 256), (10_000, 256), (10_000, 768)]
    if not args.quick:
        configs += [(30_000, 256), (100_000, 256)]
    if args.sizes:
        try:
            configs = [(int(a), int(b)) for a, b in (c.lower().split("x") for c in args.sizes.split(","))]
        except ValueError:
            ap.error(f"--sizes {args.sizes!r}: use comma-separated NxD, e.g. 20000x256,50000x256")
    lines = [
        f"Machine: {machine()}",
        "",
        f"k = {K}, cosine, m = n, clustered data; median of up to {args.runs} runs. Current switch: approximate when "
        f"n >= {index_mod.APPROX_MIN_BASE:,}, m >= {index_mod.APPROX_MIN_QUERIES:,} and m*n >= "
        f"{index_mod.APPROX_MIN_PAIRS:.0e}; "
        f"approximate = IVF(4 sqrt n),SQ8, nprobe {index_mod.DEFAULT_NPROBE}, {index_mod.DEFAULT_RERANK_FACTOR}k "
        "candidates re-ranked exactly.",
        "",
        "| m = n | d | groups | raw faiss (s) | exact (s) | approximate (s) | exact / approx | recall@10 "
        "| exact = brute force | runs (exact/approx) | auto picks |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for n, d in configs:
        for grouped in (False, True) if (n, d) == (10_000, 256) else (False,):
            rng = np.random.default_rng(args.seed)
            centres = rng.standard_normal((max(10, n // 100), d), dtype=np.float32)
            base = clustered(n, d, centres, rng)
            query = clustered(n, d, centres, rng)
            kw: dict[str, object] = {}
            if grouped:  # 100 subjects; every query belongs to one of them (leave-one-subject-out)
                kw = {"base_groups": np.arange(n) % 100, "query_groups": rng.integers(0, 100, size=n)}
            raw = "-"
            if not grouped:
                qn = query / np.linalg.norm(query, axis=1, keepdims=True)
                bn = base / np.linalg.norm(base, axis=1, keepdims=True)
                t_raw, _, _ = timed(lambda qn=qn, bn=bn: faiss.knn(qn, bn, K, faiss.METRIC_INNER_PRODUCT), 1, 0)
                raw = f"{t_raw:.2f}"
                del qn, bn
            t_ex, r_ex, (_, i_ex) = timed(
                lambda q=query, b=base, kw=kw: knn(q, b, K, exact=True, **kw), args.runs, args.budget
            )
            t_ap, r_ap, (_, i_ap) = timed(
                lambda q=query, b=base, kw=kw: knn(q, b, K, exact=False, **kw), args.runs, args.budget
            )
            agree = f"{brute_agreement(query, base, i_ex):.4f}" if n <= 10_000 and not grouped else "-"
            lo = max(index_mod.APPROX_MIN_BASE, index_mod.APPROX_MIN_QUERIES)
            big = n >= lo and n * n >= index_mod.APPROX_MIN_PAIRS
            auto = "approx" if big else "exact"
            row = (
                f"| {n:,} | {d} | {'100 subjects, LOSO' if grouped else 'none'} | {raw} | {t_ex:.2f} | {t_ap:.2f} "
                f"| {t_ex / t_ap:.1f}x | {recall(i_ap, i_ex):.4f} | {agree} | {r_ex}/{r_ap} | {auto} |"
            )
            lines.append(row)
            print(row, flush=True)
            del base, query
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
