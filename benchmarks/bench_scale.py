"""The scale curve: the whole audit at T = 1k, 10k (and 100k) training slices, G = H = 10 % of T (issue 17).

Usage::

    python -m benchmarks.bench_scale [--sizes 1000 10000] [--warm] [--cluster local:2] [--update-results]

Data: 3D look-alike cohorts of :mod:`benchmarks.volumes3d_data` (distinct subjects made from the MNI152 template,
cropped to the head, 1.5 x 1.5 x 3 mm, about 38 axial slices per volume) written as NIfTI folders, as many
subjects as the size needs: ``ceil(T / 38)`` training volumes, ``ceil(0.1 T / 38)`` holdout volumes and as many
synthetic volumes (half novel subjects, half copies of training volumes under the 3D conditions). Cached in
``benchmarks/_data/scale-<T>/``.

Per size, the product's :func:`inspector.audit` runs in a fresh Python process (so that its peak RSS is its own),
with an empty cache (**cold**: the encoder is trained, every embedding extracted) and, with ``--warm``, once more
on the same cache (**warm**: encoder and embeddings cached). Reported: wall time per stage (the audit's own
``timings``), peak RSS per stage (sampled every 0.1 s from /proc) and over the run, slices per second end to end.

Then, in this process, at the run's sizes (m = G + H queries, n = T, d = 240, the ``ssl`` encoder's concatenated
layers; clustered data as in :mod:`benchmarks.bench_index`): the machine's float32 GEMM rate (``Q @ B.T``), the
product's exact search (:func:`inspector.index.knn`, k = 32, the shortlist's ``margin_k``), faiss ``IndexFlatIP``
and scikit-learn's brute-force ``NearestNeighbors``, each as seconds and as the fraction of the GEMM rate its
``2 m n d`` flops reach; and the registration rate (:func:`inspector.align.register_pairs` on synthetic slices
against training slices, every orientation, at the default 64 px and at the 32 px pre-pass of pruned
verification), in pairs per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "_data"
OUT = HERE / "_out"
SLICES_PER_VOLUME = 38  # the cropped, 3 mm subjects of volumes3d_data (measured counts are reported)
SEARCH_D = 240
SEARCH_K = 32

log = logging.getLogger("benchmarks.bench_scale")


# ------------------------------------------------------------------------------------------------ data
def cohort_for(size: int, seed: int = 0) -> Any:
    """The NIfTI cohort of about ``size`` training slices (cached)."""
    from benchmarks.volumes3d_data import CONDITIONS_3D, make_volume_cohort

    n_train = max(2, math.ceil(size / SLICES_PER_VOLUME))
    n_side = max(2, math.ceil(0.1 * size / SLICES_PER_VOLUME))
    n_copies = min(len(CONDITIONS_3D), max(1, n_side // 2))
    n_novel = max(1, n_side - n_copies)
    conditions = list(CONDITIONS_3D)[:n_copies]
    return make_volume_cohort(
        DATA / f"scale-{size}",
        n_train,
        n_holdout=n_side,
        n_novel=n_novel,
        copies_per_condition=1,
        conditions=conditions,
        seed=seed,
    )


def code_version() -> str:
    """The checkout's short commit, ``+changes`` when its tracked files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True)
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.returncode else "")


# ------------------------------------------------------------------------------------------------ memory
def rss_parts_mb() -> dict[str, float]:
    """RssAnon (heap, tensors) and RssFile (pages of memory-mapped files, e.g. the slice store) now, MB."""
    from benchmarks.bench_extract import status_mb

    return {k[3:].lower(): v for k, v in status_mb("RssAnon", "RssFile").items()}


def rss_mb() -> float:
    """Resident set size of this process now, MB (VmRSS from /proc; 0 where unavailable). Its peak is
    :func:`benchmarks.bench_extract.rss_mb`."""
    from benchmarks.bench_extract import status_mb

    return status_mb("VmRSS").get("VmRSS", 0.0)


class StageSampler:
    """Samples RSS every ``period`` s and keeps the peak per stage (the stage of the last progress event)."""

    def __init__(self, period: float = 0.1) -> None:
        self.stage = "loading"
        self.peaks: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.entry_mb: dict[str, float] = {}  # RSS when a stage first reported
        self.sub = "loading"
        self.sub_peaks: dict[str, float] = {}  # peaks per full progress name ("aligning:synthetic", ...)
        self.sub_parts: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(period,), daemon=True)
        self.t0 = time.perf_counter()

    def progress(self, stage: str, done: int, total: int) -> None:
        name = stage.split(":", 1)[0]
        self.sub = stage
        if name != self.stage:
            self.stage = name
            self.first.setdefault(name, time.perf_counter() - self.t0)
            self.entry_mb.setdefault(name, rss_mb())

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            r = rss_mb()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), r)
            if r >= self.sub_peaks.get(self.sub, 0.0):
                self.sub_peaks[self.sub] = r
                self.sub_parts[self.sub] = rss_parts_mb()  # anonymous vs file-backed at that peak

    def __enter__(self) -> StageSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


# ------------------------------------------------------------------------------------------------ one audit
@contextlib.contextmanager
def _marked_stages(sampler: StageSampler) -> Iterator[None]:
    """Report the audit's stages that emit no progress of their own (calibration, attribution and baselines,
    naming) to ``sampler``, so their memory is not booked to the volume stage before them."""
    from inspector import naming, pipeline

    # where audit() looks each one up: the pipeline's module globals, and naming's (imported inside audit)
    marks = ((pipeline, "calibrate", "calibrating"), (pipeline, "attribute", "attributing"),
             (naming, "publish", "publishing"))  # fmt: skip
    saved = [(module, name, getattr(module, name)) for module, name, _ in marks]
    for (module, name, f), (_, _, label) in zip(saved, marks, strict=True):

        def wrapped(*a: Any, _f: Any = f, _label: str = label, **k: Any) -> Any:
            sampler.progress(_label, 0, 1)
            return _f(*a, **k)

        setattr(module, name, wrapped)
    try:
        yield
    finally:
        for module, name, f in saved:
            setattr(module, name, f)


def run_one(root: Path, cache: Path, out: Path, extractor: str, cluster: str | None) -> None:
    """One audit in this process; writes its timings and memory to ``out`` (JSON)."""
    import torch

    import inspector
    from benchmarks.bench_extract import rss_mb as peak_rss  # VmHWM, the process's own peak
    from inspector.config import AuditConfig

    base = rss_mb()
    cfg = AuditConfig(extractor=extractor, show_paths=True)
    with StageSampler() as sampler, _marked_stages(sampler):
        t0 = time.perf_counter()
        res = inspector.audit(
            root / "train",
            root / "synthetic",
            root / "holdout",
            cfg,
            cache_dir=cache,
            progress=sampler.progress,
            cluster=cluster,
        )
        wall = time.perf_counter() - t0
    n = {"train": len(res.train), "synthetic": len(res.synthetic), "holdout": len(res.holdout or [])}
    out.write_text(
        json.dumps(
            {
                "n": n,
                "timings": res.timings,
                "wall": wall,
                "base_rss_mb": base,
                "peak_rss_mb": peak_rss(),
                "stage_peak_mb": sampler.peaks,
                "stage_entry_mb": sampler.entry_mb,
                "stage_start_s": sampler.first,
                "substage_peak_mb": sampler.sub_peaks,
                "substage_peak_parts_mb": sampler.sub_parts,
                "unit": res.config.unit,
                "flagged": int(res.table["flagged"].sum()),
                "verdict": res.verdict.copying_reason,
                "torch_threads": torch.get_num_threads(),
                "cluster": cluster,
                "commit": code_version(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
            }
        )
    )


def audit_in_subprocess(root: Path, cache: Path, extractor: str, cluster: str | None, timeout: float) -> dict:
    out = cache.parent / f"{cache.name}-{int(time.time() * 1000)}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_scale",
        "--one",
        str(root),
        "--cache",
        str(cache),
        "--json",
        str(out),
        "--extractor",
        extractor,
    ]
    if cluster:
        cmd += ["--cluster", cluster]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"audit at {root} failed ({p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-20:]))
    r = json.loads(out.read_text())
    r["process_s"] = time.perf_counter() - t0
    return r


# ------------------------------------------------------------------------------------------------ rates
def _median_time(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def search_rates(m: int, n: int, d: int = SEARCH_D, k: int = SEARCH_K, seed: int = 0) -> dict[str, float]:
    """Seconds of GEMM, the product's exact knn, faiss IndexFlatIP and sklearn brute force at (m, n, d)."""
    import faiss
    from sklearn.neighbors import NearestNeighbors

    from benchmarks.bench_index import clustered
    from inspector.index import knn

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), d)).astype(np.float32)
    base = clustered(n, d, centres, rng)
    query = clustered(m, d, centres, rng)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    flops = 2.0 * m * n * d
    step = 4096  # GEMM in the blocks the search uses, so the reference needs no m x n matrix

    def gemm() -> None:
        for s in range(0, m, step):
            np.matmul(query[s : s + step], base.T)

    out = {"gemm": _median_time(gemm)}
    out["knn"] = _median_time(lambda: knn(query, base, k, metric="ip", exact=True))
    index = faiss.IndexFlatIP(d)
    index.add(base)
    out["faiss_flat"] = _median_time(lambda: index.search(query, k))
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(base)
    out["sklearn_brute"] = _median_time(lambda: nn.kneighbors(query), runs=1 if m * n > 5e7 else 3)
    return {"flops": flops, **out}


def registration_rates(root: Path, pairs: int = 384, seed: int = 0) -> dict[str, float]:
    """Pairs per second of the matcher's two registration calls (``MemorizationScorer._rerank`` with the default
    settings): the 32 px pre-pass of every candidate under every orientation, and the 64 px verification of the
    pre-pass's best candidates under the orientation it found; any angle (the default ``max_angle``)."""
    from inspector.align import register_pairs
    from inspector.config import AuditConfig
    from inspector.io import LoadConfig, load_cohort
    from inspector.matching import MemorizationScorer
    from inspector.preprocess import PreprocessConfig
    from inspector.views import FLIPS, View, training_to_query

    lc = LoadConfig(axis="axial", preprocess=PreprocessConfig(size=128))
    syn = load_cohort(root / "synthetic", lc).stack(size=128)
    tr = load_cohort(root / "holdout", lc).stack(size=128)
    rng = np.random.default_rng(seed)
    a = syn[rng.integers(0, len(syn), pairs)]
    b = tr[rng.integers(0, len(tr), pairs)]
    # the orientations the matcher searches (MemorizationScorer._rerank with the default views)
    orient = list(dict.fromkeys([*FLIPS, *(View.parse(training_to_query(v).value) for v in AuditConfig().views)]))
    d = MemorizationScorer()
    angle, size = float(d.max_angle), int(d.align_size)

    def pre() -> Any:
        return register_pairs(
            a, b, orientations=orient, size=min(32, size), coarse_size=min(32, size), iterations=(8, 0),
            flip_candidates=1, max_angle=angle, device="cpu",
        )  # fmt: skip

    flips = pre().flip
    pre_s = _median_time(pre, runs=2)
    ver_s = _median_time(
        lambda: register_pairs(a, b, flips=flips, orientations=orient, size=size, max_angle=angle, device="cpu"),
        runs=2,
    )
    return {"pairs": pairs, "pre_s": pre_s, "verify_s": ver_s, "orientations": len(orient), "size": size}


# ------------------------------------------------------------------------------------------------ report
def machine() -> str:
    import torch

    from benchmarks.bench_index import cpu_model

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu_model()}, {cores} cores usable, {mem:.0f} GB RAM; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), CUDA {torch.cuda.is_available()}; Python {platform.python_version()}; "
        f"load average {load}"
    )


STAGES = ("loading", "training", "extracting", "scoring", "volumes", "baselines")


def render(rows: list[dict], rates: list[dict], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| T | G | H | run | " + " | ".join(f"{s} s" for s in STAGES) + " | total s | slices/s | peak RSS MB | "
        "peak RSS stage | flagged | verdict |"
    )
    lines.append("|" + "---:|" * 3 + "---|" + "---:|" * (len(STAGES) + 3) + "---|---:|---|")
    for r in rows:
        n, t = r["n"], r["timings"]
        total = t.get("total", r["wall"])
        slices = n["train"] + n["synthetic"] + n["holdout"]
        stage_peak = max(r["stage_peak_mb"], key=r["stage_peak_mb"].get) if r["stage_peak_mb"] else "-"
        cells = [f"{t.get(s, 0.0):.1f}" if s in t else "-" for s in STAGES]
        lines.append(
            f"| {n['train']:,} | {n['synthetic']:,} | {n['holdout']:,} | {r['run']} | "
            + " | ".join(cells)
            + f" | {total:.1f} | {slices / total:.0f} | {r['peak_rss_mb']:.0f} | {stage_peak} | {r['flagged']} | "
            f"{r['verdict']} |"
        )
    lines += [
        "",
        "Search at the run's sizes (m = G + H queries, n = T, d = 240, k = 32; median of 3; fraction of the "
        "GEMM rate = (2 m n d / seconds) / the GEMM's):",
        "",
    ]
    lines.append(
        "| m | n | GEMM s (GFLOP/s) | inspector knn s (of GEMM) | faiss IndexFlatIP s (of GEMM) | "
        "sklearn brute s (of GEMM) | knn / sklearn |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rates:
        s = r["search"]
        g = s["flops"] / s["gemm"]

        def cell(key: str, s=s, g=g) -> str:
            return f"{s[key]:.3f} ({s['flops'] / s[key] / g:.0%})"

        lines.append(
            f"| {r['m']:,} | {r['n']:,} | {s['gemm']:.3f} ({g / 1e9:.1f}) | {cell('knn')} | {cell('faiss_flat')} | "
            f"{cell('sklearn_brute')} | {s['sklearn_brute'] / s['knn']:.1f}x |"
        )
    reg = next((r["registration"] for r in rates if r.get("registration")), None)
    if reg:
        lines += [
            "",
            f"Registration (register_pairs as the matcher calls it, {reg['pairs']} synthetic-training pairs, any "
            f"angle, CPU, median of 2): **{reg['pairs'] / reg['verify_s']:.0f} verified pairs/s** at "
            f"{reg['size']} px (the orientation given by the pre-pass); the pre-pass of every candidate under "
            f"{reg['orientations']} orientations at 32 px: {reg['pairs'] / reg['pre_s']:.0f} pairs/s.",
        ]
    lines += ["", *targets(rows, rates)]
    made = [
        f"T = {r['n']['train']:,} {r['run']}: {r.get('commit', 'unknown')} ({r.get('date', 'undated')})" for r in rows
    ]
    if made:
        lines += ["", "Audit rows measured by the code at: " + "; ".join(made) + ". Rates measured now."]
    return "\n".join(lines) + "\n"


#: The study-scale point of issue 17's targets: rows with at least this many training slices are "T = 100k".
TARGET_T = 90_000


def targets(rows: list[dict], rates: list[dict]) -> list[str]:
    """Issue 17's targets against this table's rows and rates (markdown lines); "not run" where a row is absent."""

    def largest(run: str) -> dict | None:
        cand = [r for r in rows if r["run"].startswith(run) and r["n"]["train"] >= TARGET_T]
        return max(cand, key=lambda r: r["n"]["train"]) if cand else None

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    out = ["Targets (issue 17; 2-core CPU machine):", "", "| target | measured | met |", "|---|---|---|"]
    cold, warm = largest("cold"), largest("warm")
    if cold is not None:
        t, mb = cold["timings"].get("total", cold["wall"]), cold["peak_rss_mb"]
        stage = max(cold["stage_peak_mb"], key=cold["stage_peak_mb"].get) if cold["stage_peak_mb"] else "-"
        at = f"T = {cold['n']['train']:,}, G + H = {cold['n']['synthetic'] + cold['n']['holdout']:,}"
        out.append(f"| peak RSS <= 3 GB at T = 100k | {mb:,.0f} MB ({at}; in {stage}) | {met(mb <= 3072)} |")
        out.append(f"| cold end to end <= 45 min at T = 100k | {t / 60:.1f} min ({at}) | {met(t <= 45 * 60)} |")
    else:
        out += [
            "| peak RSS <= 3 GB at T = 100k | not run | - |",
            "| cold end to end <= 45 min at T = 100k | not run | - |",
        ]
    if warm is not None:
        t = warm["timings"].get("total", warm["wall"])
        out.append(f"| warm end to end <= 10 min at T = 100k | {t / 60:.1f} min | {met(t <= 600)} |")
    else:
        out.append("| warm end to end <= 10 min at T = 100k | not run | - |")
    trained = [(r["timings"]["training"], r["n"]["train"]) for r in rows if r["run"].startswith("cold")]
    if trained:
        worst = max(trained)
        out.append(
            f"| encoder training <= 5 min whatever T | at most {worst[0]:.0f} s (T = {worst[1]:,}; cold rows: "
            + ", ".join(f"{s:.0f} s at {n:,}" for s, n in sorted(trained, key=lambda x: x[1]))
            + f") | {met(worst[0] <= 300)} |"
        )
    big = max(rates, key=lambda r: r["n"]) if rates else None
    if big is not None:
        s = big["search"]
        frac, ratio = s["gemm"] / s["knn"], s["sklearn_brute"] / s["knn"]
        at = f"m = {big['m']:,}, n = {big['n']:,}"
        out.append(f"| search >= 70 % of the GEMM rate | {frac:.0%} ({at}) | {met(frac >= 0.7)} |")
        out.append(f"| search >= 4x scikit-learn brute force | {ratio:.1f}x ({at}) | {met(ratio >= 4)} |")
    reg = next((r["registration"] for r in rates if r.get("registration")), None)
    if reg:
        v = reg["pairs"] / reg["verify_s"]
        out.append(f"| registration >= 2,000 verified pairs/s (CPU, {reg['size']} px) | {v:.0f} | {met(v >= 2000)} |")
    out += [
        "| MRI-CORE (ViT-B, 224 px) extraction >= 10,000 slices/s on one H200 | not measured (no GPU lent) | - |",
        "| 1M x 1M search <= 2 min on one H200 | not measured (no GPU lent) | - |",
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="training slices T per point")
    p.add_argument("--warm", action="store_true", help="also time a second run on the warm cache")
    p.add_argument("--extractor", default="ssl")
    p.add_argument("--cluster", default=None, help="run the audits on this cluster (inspector.cluster addresses)")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--skip-rates", action="store_true")
    p.add_argument("--update-results", action="store_true", help="write the section into benchmarks/RESULTS.md")
    p.add_argument(
        "--from-rows",
        type=Path,
        help="render the audits saved by an earlier run (its rows JSON) instead "
        "of running them again; the search and registration rates are measured now",
    )
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.one:
        run_one(args.one, args.cache, args.json, args.extractor, args.cluster)
        return 0
    t_start = time.perf_counter()
    machine_line = machine()
    rows, rates = [], []
    if args.from_rows:
        rows = json.loads(args.from_rows.read_text())
        sizes = sorted({r["n"]["train"] for r in rows})
        for i, n in enumerate(sizes):
            last = [r for r in rows if r["n"]["train"] == n][-1]
            entry = {"m": last["n"]["synthetic"] + last["n"]["holdout"], "n": n}
            entry["search"] = search_rates(entry["m"], n)
            if i == 0:
                size = min(args.sizes, key=lambda s, n=n: abs(s - n))
                entry["registration"] = registration_rates(DATA / f"scale-{size}")
            rates.append(entry)
        args.sizes = []
    for size in args.sizes:
        t0 = time.perf_counter()
        info = cohort_for(size)
        log.info("T=%d: cohort ready in %.0f s at %s", size, time.perf_counter() - t0, info.root)
        cache = DATA / f"scale-cache-{size}-{args.extractor}"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        runs = ["cold", "warm"] if args.warm else ["cold"]
        last = None
        for run in runs:
            r = audit_in_subprocess(info.root, cache, args.extractor, args.cluster, args.timeout)
            r["run"] = run + (f", cluster {args.cluster}" if args.cluster else "")
            log.info("T=%d %s: %.0f s, peak RSS %.0f MB", size, run, r["wall"], r["peak_rss_mb"])
            rows.append(r)
            last = r
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "bench_scale_rows.json").write_text(json.dumps(rows, indent=1))
        if not args.skip_rates and last is not None:
            m = last["n"]["synthetic"] + last["n"]["holdout"]
            n = last["n"]["train"]
            entry = {"m": m, "n": n, "search": search_rates(m, n)}
            if size == args.sizes[0]:
                entry["registration"] = registration_rates(info.root)
            rates.append(entry)
    header = f"Machine: {machine_line}. Extractor {args.extractor}, default mode, unit auto; cold = empty cache."
    text = render(rows, rates, header)
    print(text)
    if args.update_results:
        from benchmarks.results import put_section

        cmd = "python -m benchmarks.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:])
        path = put_section(
            "Scale: the whole audit as the study grows (`bench_scale`)",
            text,
            cmd.strip(),
            time.perf_counter() - t_start,
            machine_line,
        )
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
