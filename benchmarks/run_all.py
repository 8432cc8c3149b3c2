"""Run every benchmark and write ``benchmarks/RESULTS.md`` (``make bench``; ``make bench-quick`` for a smoke run).

Usage::

    python -m benchmarks.run_all [--quick] [--cold] [--skip-speed] [--skip-detection]
                                 [--mri-core-checkpoint FILE] [--out FILE]

1. The detection benchmark (:mod:`benchmarks.detection`, BENCHMARK.md): slice-level and subject-level
   splits, every seed of ``detection.FULL_SEEDS``, the paper's eight conditions and the harder ones, the
   paper and default modes per backbone, the baselines, the registered ablations of the default mode;
   targets of issue 7 checked and the default extractor and settings chosen from the evidence. Every number
   and result statement in the report is computed from the run (nothing measured is pasted in as fixed text).
2. The speed benchmarks owned by their modules (``bench_extract``, ``bench_index``, ``bench_align``,
   ``bench_app``), each run in its own subprocess; their printed tables are collected verbatim.

``--quick`` runs one seed of the slice split on eight conditions, quick settings of the speed
benchmarks, and writes ``benchmarks/_out/RESULTS-quick.md`` instead of ``RESULTS.md``. ``--cold`` trains
the ssl encoders from scratch (an empty weight cache) so that the reported runtime is a cold one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import detection as det
from . import lookalike as la
from . import volumes3d as v3

log = logging.getLogger("benchmarks.run_all")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Speed benchmarks: module -> (full arguments, quick arguments, what it measures).
SPEED: dict[str, tuple[list[str], list[str], str]] = {
    "bench_extract": ([], ["--runs", "1"], "Extraction throughput and peak memory per backbone"),
    "bench_index": ([], ["--quick", "--runs", "1"], "Nearest-neighbour search and scoring time as the sets grow"),
    "bench_align": ([], ["--seeds", "0"], "Alignment-verified re-ranking: registration accuracy and throughput"),
    "bench_app": ([], ["--repeats", "2"], "End to end on the sample data: app (cold, warm), threshold change, pair"),
    "bench_review": ([], ["--repeats", "2"], "Review workspace: alpha / BH change and opening a pair, server time"),
    "bench_views": ([], ["--repeats", "1"], "The cost of eight orientations, the descriptor shortlist and pruning"),
    "bench_scale": (["--warm"], ["--sizes", "1000"], "Scale: the whole audit as the study grows"),
    "bench_engines": ([], ["--runs", "1"], "Distributed engines: start-up and memory of a local two-worker engine"),
}


def run_speed(name: str, args: list[str], timeout: float) -> dict:
    """Run ``python -m benchmarks.<name> args`` and capture its output."""
    path = HERE / f"{name}.py"
    if not path.exists():
        return {"name": name, "status": "missing", "stdout": "", "stderr": "", "seconds": 0.0, "command": ""}
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        status = "ok" if p.returncode == 0 else f"exit {p.returncode}"
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout:.0f} s"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    shown = " ".join(["python", "-m", f"benchmarks.{name}", *map(shlex.quote, args)])
    return {
        "name": name,
        "status": status,
        "stdout": out,
        "stderr": err,
        "seconds": time.perf_counter() - t0,
        "command": shown,
    }


#: The calibration benchmark (simulated decisions under no copying and under copying): full and quick arguments.
CALIBRATION: tuple[list[str], list[str]] = ([], ["--quick"])


def calibration_section(r: dict, machine: str, date: str) -> str:
    """The calibration part of RESULTS.md: the verbatim tables of ``benchmarks.calibration``."""
    parts = ["## Calibration: false alarms and power of the decisions (`calibration`)\n"]
    parts.append(f"- Machine: {machine}\n- Date: {date}\n- Command: `{r['command'] or 'n/a'}`")
    parts.append(f"- Status: {r['status']}, {r['seconds']:.0f} s wall\n")
    if r["stdout"].strip():
        parts.append(r["stdout"].strip() + "\n")
    if r["status"] != "ok":
        tail = "\n".join(r["stderr"].strip().splitlines()[-15:])
        parts.append("Error output (last lines):\n\n```\n" + tail + "\n```\n")
    return "\n".join(parts)


#: The marker put under a section copied from an earlier RESULTS.md (``--carry-over``).
CARRIED = (
    "_Carried over unchanged from an earlier run of this file (its own machine, date and command above); not rerun._"
)


def carried_sections(path: Path) -> dict[str, str]:
    """The calibration, 3D and speed sections of an earlier RESULTS.md, verbatim, by name.

    Returns ``{"calibration": text, "volumes3d": text, "<bench name>": text, ...}``: the calibration section
    (``## Calibration``), the 3D sections of every data family (between their ``<!-- volumes3d... -->`` markers)
    and each speed benchmark's ``### ... (`bench_x`)`` section of ``## Speed and memory``, each with its own
    machine, date and command lines. A section already carried once is returned without its old marker.
    """
    text = Path(path).read_text(encoding="utf-8")
    out: dict[str, str] = {}
    # the 3D sections (one per data family) sit between their own markers, first to last
    starts = [m.start() for m in re.finditer(r"^<!-- volumes3d(?::[\w-]+)?:start -->$", text, re.M)]
    ends = [m.end() for m in re.finditer(r"^<!-- volumes3d(?::[\w-]+)?:end -->$", text, re.M)]
    if starts and ends and ends[-1] > starts[0]:
        out["volumes3d"] = text[starts[0] : ends[-1]].replace(CARRIED, "").rstrip() + "\n"
    # the speed part is last, and the benchmarks' own outputs hold "## " headings: cut at the known headings only
    speed_at = text.find("\n## Speed and memory\n")
    cal_at = text.find("\n## Calibration")
    if cal_at >= 0:
        end = speed_at if speed_at > cal_at else len(text)
        out["calibration"] = text[cal_at + 1 : end].replace(CARRIED, "").rstrip() + "\n"
    if speed_at >= 0:
        body = text[speed_at + 1 :]
        head = r"^### [^\n]*?\(`(bench_\w+)`\)\n"
        for m in re.finditer(head + r".*?(?=^### [^\n]*?\(`bench_\w+`\)\n|\Z)", body, re.S | re.M):
            out[m.group(1)] = m.group(0).replace(CARRIED, "").rstrip() + "\n"
    return out


def speed_section(results: Sequence[dict], machine: str, date: str, carried: dict[str, str] | None = None) -> str:
    """The speed part of RESULTS.md: each benchmark's own tables, with machine, date and command; benchmarks
    not run this time are copied from ``carried`` (:func:`carried_sections`) with a marker, in SPEED's order."""
    parts = ["## Speed and memory\n"]
    parts.append(
        "Each table below is the verbatim output of the named benchmark (owned by its module; see its docstring "
        "for what exactly is timed). Medians of several runs, as BENCHMARK.md asks.\n"
    )
    fresh = {r["name"]: r for r in results}
    names = [n for n in SPEED if n in fresh or n in (carried or {})] + [n for n in fresh if n not in SPEED]
    for name in names:
        if name not in fresh:
            parts.append((carried or {})[name].rstrip() + "\n\n" + CARRIED + "\n")
            continue
        r = fresh[name]
        title = SPEED.get(r["name"], ([], [], r["name"]))[2]
        parts.append(f"### {title} (`{r['name']}`)\n")
        parts.append(f"- Machine: {machine}\n- Date: {date}\n- Command: `{r['command'] or 'n/a'}`")
        parts.append(f"- Status: {r['status']}, {r['seconds']:.0f} s wall\n")
        if r["status"] == "missing":
            parts.append(f"_`benchmarks/{r['name']}.py` does not exist yet; nothing measured._\n")
            continue
        body = r["stdout"].strip()
        if body:
            parts.append(body + "\n")
        if r["status"] != "ok":
            tail = "\n".join(r["stderr"].strip().splitlines()[-15:])
            parts.append("Error output (last lines):\n\n```\n" + tail + "\n```\n")
    return "\n".join(parts)


def _pooled_fpr(out: det.RunOutput, method: str, split: str = "slice") -> tuple[int, int] | None:
    """(flagged, novel) of ``method`` on the novel slices of ``split``, pooled over folds and seeds."""
    nv = out.novel
    x = nv[(nv["split"] == split) & (nv["method"] == method)]
    return (int(x["flagged"].sum()), len(x)) if len(x) else None


def _fpr_text(k_n: tuple[int, int] | None) -> str:
    if k_n is None:
        return "not measured"
    k, n = k_n
    lo, hi = det.wilson_interval(k, n)
    return f"{k}/{n} = {k / n:.4f} (95 % Wilson [{lo:.4f}, {hi:.4f}])"


def _target_lines(out: det.RunOutput) -> list[str]:
    """Which default-mode variants meet every target of issue 7, and the worst condition of each (computed)."""
    lines = []
    methods = set(out.per_g["method"])
    cand = [f"default/{b}" for b in out.config.backbones] + [f"abl:{det.PREVIOUS}/{b}" for b in out.config.backbones]
    for split in [s for s in ("slice", "subject") if s in set(out.per_g["split"])]:
        for m in cand:
            if m not in set(out.per_g.loc[out.per_g["split"] == split, "method"]) or m not in methods:
                continue
            rows = det.targets(out, m, split)
            if not rows:
                continue
            missed = [r[0] for r in rows if r[2] != "yes"]
            worst = [r for r in rows if r[0].startswith("ROC-AUC")]
            worst_txt = "; ".join(f"{r[0]}: {r[1]}" for r in worst)
            state = "meets every target" if not missed else "misses " + "; ".join(f"'{t}'" for t in missed)
            lines.append(f"  - {det._label(m)}, {split}-level split: {state}. {worst_txt}.")
    return lines or ["  - no default-mode variant was scored in this run."]


def notes_section(out: det.RunOutput) -> str:
    """How to read the detection numbers: method descriptions, and every result sentence computed from ``out``."""
    cfg = det.AuditConfig()
    alpha = float(cfg.alpha)
    pg, info = out.per_g, out.split_info
    parts = ["## Notes: how to read these numbers, and what was tried\n"]
    parts.append(
        "- **Targets of issue 7 in this run** (computed from the tables above; worst condition = lowest mean over "
        "seeds):\n" + "\n".join(_target_lines(out))
    )
    abl = list(out.config.ablations)
    tried = (
        "the backbones for the default and the paper modes; re-ranking on and off; feature view sets (identity "
        "only, the four flips, flips + rotations) without registration"
    )
    if abl:
        tried += "; registered variants of the default mode: " + ", ".join(f"`{a}`" for a in abl)
    else:
        tried += "; no registered variants of the default mode (run without `--ablations`)"
    parts.append(
        f"- **What was tried in this run** (seeds {list(out.config.seeds)}; tables above): {tried}. A setting is "
        "recommended only when it is better on every seed (see the choice of the default settings above)."
    )
    if "paper/pixels" in set(pg["method"]):
        sl = pg[(pg["split"] == "slice") & (pg["method"] == "paper/pixels")]
        oni = float(sl["mean_oni"].mean()) if "mean_oni" in sl and sl["mean_oni"].notna().any() else float("nan")
        n_t = det._span(out, "slice", "n_train")
        parts.append(
            "- **The paper's method with `pixels` features.** The paper whitens with an exact ZCA fitted on T; with "
            f"pixel features and T = {n_t} training slices the covariance can be rank-deficient and its split-half "
            "null then does not describe novel slices (DESIGN §2). Measured in this run (slice split): mean ONI of G "
            f"{oni:.3f}, FPR on novel slices at p <= {alpha:g} {_fpr_text(_pooled_fpr(out, 'paper/pixels'))}. The "
            "audit's default mode uses shrinkage whitening and a holdout null instead."
        )
    auth = [m for m in sorted(set(out.novel["method"])) if m.startswith("authpct/")]
    if auth:
        parts.append(
            "- **AuthPct** uses its own binary rule (a sample's distance to T against the nearest training sample's "
            "own nearest-neighbour distance), not a calibrated threshold. Share of real novel slices it calls "
            "unauthentic in this run (slice split): "
            + "; ".join(f"{m.split('/', 1)[1]} {_fpr_text(_pooled_fpr(out, m))}" for m in auth)
            + "."
        )
    if len(info):
        sl = info[info["split"] == "slice"]
        if len(sl):
            n_h = int(sl["min_holdout"].min())
            expected = np.floor(alpha * (n_h + 1) + 1e-9) / (n_h + 1)
            defaults = [f"default/{b}" for b in out.config.backbones if f"default/{b}" in set(out.novel["method"])]
            pooled = "; ".join(f"{det._label(m)} {_fpr_text(_pooled_fpr(out, m))}" for m in defaults)
            parts.append(
                f"- **False-positive rate.** With a holdout of n slices the smallest p-value is 1/(n+1); the smallest "
                f"holdout of this run's slice split has n = {n_h}, so 1/(n+1) = {1 / (n_h + 1):.4f} "
                f"({'<=' if 1 / (n_h + 1) <= alpha else '>'} alpha = {alpha:g}). Under exchangeability the expected "
                f"FPR at p <= alpha is floor(alpha (n+1)) / (n+1) = {expected:.4f} "
                "for that n; methods calibrated on the same holdout share its null. "
                f"Pooled over folds and seeds in this run (slice split): {pooled or 'no default mode scored'}."
            )
        sub = info[info["split"] == "subject"]
        if len(sub):
            mni = out.bank_counts.get("mni152-t1")
            mni_txt = f"the {mni}-slice MNI template" if mni else "the MNI template"
            n_seeds = int(sub["train_acquisitions"].str.contains("mni152-t1").sum())
            parts.append(
                f"- **Subject split.** T is {det._span(out, 'subject', 'n_train')} slices of whole acquisitions; "
                f"{mni_txt} is in T for {n_seeds} of {len(sub)} seeds. Novel and holdout slices come from "
                "acquisitions the encoder never saw."
            )
    parts.append(
        "- **mri-core** is not in the detection tables unless a real checkpoint is passed (`--mri-core-checkpoint`): "
        "with random weights its numbers would say nothing about MRI-CORE."
    )
    return "\n".join(parts) + "\n"


def render(
    out: det.RunOutput | None,
    speed: Sequence[dict],
    *,
    command: str,
    machine: str,
    date: str,
    seconds: dict[str, float],
    mri_core: str | None,
    calibration: dict | None = None,
    lookalike: tuple | None = None,
    volumes3d: str | None = None,
    carried: dict[str, str] | None = None,
) -> str:
    """The whole RESULTS.md (``carried``: calibration, 3D and speed sections of an earlier file, for those not
    run)."""
    parts = ["# Benchmark results\n"]
    parts.append(
        f"Generated by `{command}` on {date}. Reproduce with `make bench` (this file) or `make bench-quick` "
        "(one seed, a smoke run written to `benchmarks/_out/RESULTS-quick.md`). Raw per-set tables are written to "
        "`benchmarks/_out/` (git-ignored); the benchmark data are rebuilt at run time from files inside installed "
        "packages (`benchmarks/data.py`) and never committed.\n"
    )
    parts.append(f"- Machine: {machine}")
    total = sum(seconds.values())
    parts.append(
        "- Runtime: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        + f"; total {total / 60:.1f} min (wall clock on the shared machine)\n"
    )
    if out is not None:
        parts.append(det.headline_section(out, mri_core))
    if lookalike is not None:
        parts.append(la.section(*lookalike))
    carried = carried or {}
    if volumes3d:
        parts.append(volumes3d + "\n")
    elif "volumes3d" in carried:
        parts.append(carried["volumes3d"].rstrip() + "\n\n" + CARRIED + "\n")
    if out is not None:
        parts.append("## Detection: full tables\n")
        parts.append(det.summarise(out))
        parts.append("### Runtime of the detection benchmark per split and seed\n")
        parts.append(det.timing_table(out) + "\n")
        parts.append(notes_section(out))
    if calibration is not None:
        parts.append(calibration_section(calibration, machine, date))
    elif "calibration" in carried:
        parts.append(carried["calibration"].rstrip() + "\n\n" + CARRIED + "\n")
    if speed or any(k in SPEED for k in carried):
        parts.append(speed_section(speed, machine, date, carried))
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, slice split, 8 conditions; quick speed runs")
    ap.add_argument("--cold", action="store_true", help="train the ssl encoders from scratch (empty weight cache)")
    ap.add_argument("--skip-speed", action="store_true", help="detection only")
    ap.add_argument("--skip-detection", action="store_true", help="speed benchmarks only")
    ap.add_argument("--skip-calibration", action="store_true", help="no calibration (decision) benchmark")
    ap.add_argument("--no-ablations", action="store_true", help="skip the registered ablations of the default mode")
    ap.add_argument("--extra-ablations", action="store_true", help="also shortlist=20 and align_size=96 (slower)")
    ap.add_argument("--mri-core-checkpoint", default=None, help="real MRI-CORE weights (adds the mri-core backbone)")
    ap.add_argument("--speed-timeout", type=float, default=1800.0, help="seconds per speed benchmark")
    ap.add_argument("--out", type=Path, default=None, help="report file (default RESULTS.md; quick: _out/...)")
    ap.add_argument("--skip-lookalike", action="store_true", help="no look-alike cohort benchmark")
    ap.add_argument("--skip-volumes3d", action="store_true", help="no 3D (per-volume) benchmark")
    ap.add_argument(
        "--reuse-volumes3d",
        type=Path,
        default=None,
        help="re-render the 3D section from its CSVs in this folder (benchmarks/_out)",
    )
    ap.add_argument(
        "--reuse-lookalike",
        type=Path,
        default=None,
        help="re-render the look-alike section from its CSVs in this folder (benchmarks/_out)",
    )
    ap.add_argument(
        "--reuse-detection",
        type=Path,
        default=None,
        help="re-render from a saved detection run (benchmarks/_out/detection_run.pkl) instead of recomputing",
    )
    ap.add_argument(
        "--carry-over",
        type=Path,
        default=None,
        help="an earlier RESULTS.md: its calibration, 3D and speed sections not run this time are copied, marked",
    )
    ap.add_argument(
        "--speed",
        nargs="+",
        default=None,
        choices=list(SPEED),
        help="run only these speed benchmarks (the others are carried over with --carry-over, else left out)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("inspector").setLevel(logging.ERROR)
    logging.getLogger("benchmarks.data").setLevel(logging.WARNING)
    report = args.out or (HERE / "_out" / "RESULTS-quick.md" if args.quick else HERE / "RESULTS.md")
    command = "python -m benchmarks.run_all" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    seconds: dict[str, float] = {}
    out = None
    tmp = None
    if args.reuse_detection is not None:
        import pickle

        with open(args.reuse_detection, "rb") as f:
            out = pickle.load(f)  # noqa: S301 - our own file, written by benchmarks.detection.save
        seconds["detection"] = out.seconds
    elif not args.skip_detection:
        det_args = ["--quick"] if args.quick else []
        if not args.quick and not args.no_ablations:
            det_args.append("--ablations")
            if args.extra_ablations:
                det_args.append("--extra-ablations")
        if args.mri_core_checkpoint:
            det_args += ["--mri-core-checkpoint", args.mri_core_checkpoint]
        if args.cold:
            tmp = tempfile.mkdtemp(prefix="bench-cache-")
            det_args += ["--cache-dir", tmp]
        bc = det.config_from_args(det.build_parser().parse_args(det_args))
        t0 = time.perf_counter()
        try:
            out = det.run(bc)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        seconds["detection"] = time.perf_counter() - t0
        det.save(out, HERE / "_out")
        print(det.headline_section(out, args.mri_core_checkpoint))
    lookalike = None
    if args.reuse_lookalike is not None:
        import pandas as pd

        lookalike = (
            pd.read_csv(args.reuse_lookalike / "lookalike_per_condition.csv"),
            pd.read_csv(args.reuse_lookalike / "lookalike_per_size.csv"),
        )
    elif not args.skip_lookalike:
        t0 = time.perf_counter()
        lc = la.LookalikeConfig(sizes=(8, 32), seeds=(0,)) if args.quick else la.LookalikeConfig(seeds=(0, 1, 2))
        if not args.quick:
            lc.methods["previous"] = dict(la.PREVIOUS)
            lc.methods["small angles"] = dict(la.SMALL_ANGLES)
            lc.method_seeds = {"default": (0, 1, 2), "previous": (0,), "small angles": (0,)}
        lookalike = la.run(lc, progress=lambda m: log.info(m))
        (HERE / "_out").mkdir(exist_ok=True)
        lookalike[0].to_csv(HERE / "_out" / "lookalike_per_condition.csv", index=False)
        lookalike[1].to_csv(HERE / "_out" / "lookalike_per_size.csv", index=False)
        seconds["look-alike"] = time.perf_counter() - t0
    volumes3d = None
    if args.reuse_volumes3d is not None:
        volumes3d = "\n".join(  # every family whose per-volume table the folder holds
            v3.report(["--reuse", "--family", fam, "--out", str(args.reuse_volumes3d)])
            for fam in v3.FAMILIES
            if (args.reuse_volumes3d / f"{v3.family_tag(fam)}_per_volume.csv").exists()
        )
    elif not args.skip_volumes3d:
        t0 = time.perf_counter()
        quick3d = ["--train", "8", "--holdout", "8", "--novel", "10", "--seeds", "0"] if args.quick else []
        volumes3d = v3.report([*quick3d, "--out", str(HERE / "_out")])
        seconds["3D"] = time.perf_counter() - t0
    calibration = None
    if not args.skip_calibration:
        t0 = time.perf_counter()
        calibration = run_speed("calibration", CALIBRATION[1] if args.quick else CALIBRATION[0], args.speed_timeout)
        log.info("calibration: %s in %.0f s", calibration["status"], calibration["seconds"])
        seconds["calibration"] = time.perf_counter() - t0
    speed = []
    if not args.skip_speed:
        t0 = time.perf_counter()
        for name, (full, quick, _) in SPEED.items():
            if args.speed is not None and name not in args.speed:
                continue
            log.info("speed benchmark %s ...", name)
            r = run_speed(name, quick if args.quick else full, args.speed_timeout)
            log.info("%s: %s in %.0f s", name, r["status"], r["seconds"])
            speed.append(r)
        seconds["speed"] = time.perf_counter() - t0
    carried = carried_sections(args.carry_over) if args.carry_over is not None else None
    machine = det.machine()
    text = render(
        out,
        speed,
        command=command,
        machine=machine,
        date=date,
        seconds=seconds,
        mri_core=args.mri_core_checkpoint,
        calibration=calibration,
        lookalike=lookalike,
        volumes3d=volumes3d,
        carried=carried,
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text, encoding="utf-8")
    log.info("wrote %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
