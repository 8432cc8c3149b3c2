"""What the eight orientations, the descriptor shortlist and the pruned verification cost on the sample data.

Usage::

    python -m benchmarks.bench_views [--extractor pixels] [--repeats 3]

On ``sample_data/`` (train, synthetic, holdout), through the pipeline's public stages: the inputs are loaded
and their features extracted once per setting (not timed), then the match stage (shortlist search over every
view, registration of the candidates, the holdout null through the same path) is timed ``--repeats`` times,
interleaving the settings so that the machine's load affects them alike; the median is reported with the
ratio to the matching settings before issue 16 (four flips, the encoder's shortlist only, every candidate
verified in full, rotations within 15 degrees) measured in the same run, and the planted copies' ROC-AUC
from ``labels.csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from inspector.config import AuditConfig
from inspector.pipeline import extract_features, load_inputs, match

from .lookalike import PREVIOUS, SMALL_ANGLES

ROOT = Path(__file__).resolve().parents[1]

#: Settings compared (AuditConfig overrides), the first being the reference of the ratios: the default before
#: issue 16 (the look-alike benchmark's ``previous``: four flips, the encoder's shortlist, every candidate verified
#: in full, rotations within 15 degrees), the default before the any-angle search (``small angles``), today's.
SETTINGS: dict[str, dict] = {
    "previous (4 flips, encoder shortlist, full verification, rotations within 15°)": dict(PREVIOUS),
    "8 orientations + descriptor shortlist + pruned, rotations within 15°": dict(SMALL_ANGLES),
    "default (the above + any angle + rotation-invariant shortlist)": {},
}


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from .detection import ranking_metrics

    return ranking_metrics(y, s)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extractor", default="pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--update-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    data = ROOT / "sample_data"
    labels = {}
    import csv

    with open(data / "synthetic" / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            labels[row["path"]] = row["label"] == "copy"
    prepared = {}
    for name, over in SETTINGS.items():
        cfg = dataclasses.replace(AuditConfig(), extractor=a.extractor, **over)
        inputs = load_inputs(data / "train", data / "synthetic", data / "holdout", cfg)
        feats = extract_features(inputs, cfg, use_cache=False)
        prepared[name] = (cfg, inputs, feats)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    aucs: dict[str, float] = {}
    for _ in range(a.repeats):
        for name, (cfg, inputs, feats) in prepared.items():
            t0 = time.perf_counter()
            m = match(inputs, feats, cfg)
            times[name].append(time.perf_counter() - t0)
            y = np.array([labels.get(s.path.replace(os.sep, "/"), False) for s in inputs.synthetic.slices])
            if y.any() and (~y).any():
                aucs[name] = _auc(y, np.asarray(m.synthetic.similarity))
    first = next(iter(SETTINGS))
    ref = statistics.median(times[first])
    n_q = len(prepared[first][1].synthetic.slices) + len(prepared[first][1].holdout.slices)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"Match stage on sample_data/ ({n_q} queries: synthetic + holdout), extractor {a.extractor}, median of "
        f"{a.repeats} interleaved runs; load average at the end {load} (2 cores). Issue 16's target: the default "
        "at most 2x the previous default.\n",
        "| setting | match s | ms / query | × previous | planted-copy ROC-AUC |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in SETTINGS:
        med = statistics.median(times[name])
        auc = f"{aucs[name]:.3f}" if name in aucs else "—"
        lines.append(f"| {name} | {med:.2f} | {1000 * med / n_q:.1f} | {med / ref:.2f} | {auc} |")
    print("\n".join(lines))
    if a.update_results:
        from .results import put_section

        cmd = "python -m benchmarks.bench_views " + " ".join(sys.argv[1:] if argv is None else argv)
        put_section(
            "The cost of eight orientations, the descriptor shortlist and pruning (`bench_views`)",
            "\n".join(lines),
            cmd.strip(),
            time.perf_counter() - t_start,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
