"""What the eight orientations, the descriptor shortlist and the pruned verification cost on the sample data.

Usage::

    python -m benchmarks.bench_views [--extractor pixels] [--repeats 3]

On ``sample_data/`` (train, synthetic, holdout), through the pipeline's public stages: the inputs are loaded
and their features extracted once per setting (not timed), then the match stage (shortlist search over every
view, registration of the candidates, the holdout null through the same path) is timed ``--repeats`` times,
interleaving the settings so that the machine's load affects them alike; the median is reported with the
ratio to the matching settings before issue 16 (four flips, the encoder's shortlist only, every candidate
verified in full) measured in the same run, and the planted copies' ROC-AUC from ``labels.csv``.
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

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, dict] = {
    "previous (4 flips, encoder shortlist, full verification)": {
        "views": ("id", "hflip", "vflip", "hvflip"),
        "descriptor_shortlist": 0,
        "verify_top": 0,
    },
    "4 flips + descriptor shortlist + pruned": {"views": ("id", "hflip", "vflip", "hvflip")},
    "default (8 orientations + descriptor shortlist + pruned)": {},
    "8 orientations, full verification": {"verify_top": 0},
}


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from .detection import ranking_metrics

    return ranking_metrics(y, s)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extractor", default="pixels")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
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
    print(
        f"Match stage on sample_data/ ({n_q} queries: synthetic + holdout), extractor {a.extractor}, median of "
        f"{a.repeats} interleaved runs; load average at the end {load} (2 shared cores).\n"
    )
    print("| setting | match s | ms / query | × previous | planted-copy ROC-AUC |")
    print("|---|---:|---:|---:|---:|")
    for name in SETTINGS:
        med = statistics.median(times[name])
        auc = f"{aucs[name]:.3f}" if name in aucs else "—"
        print(f"| {name} | {med:.2f} | {1000 * med / n_q:.1f} | {med / ref:.2f} | {auc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
