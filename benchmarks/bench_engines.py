"""Start-up cost of the distributed engines on this machine: Dask distributed (used) and Ray (when importable).

Usage::

    python -m benchmarks.bench_engines [--runs 3]
    RAY_USAGE_STATS_ENABLED=0 /path/to/a/venv/with/ray/bin/python -m benchmarks.bench_engines --engines ray

Each run starts a local engine of two single-threaded worker processes in a fresh Python process, sends one 20 MB
array to both workers and runs four tasks on it, then sums the RSS of every process the engine started. Ray is
not a dependency of this project; measure it from an environment where it is installed. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def _tree_rss_mb(pid: int) -> tuple[float, int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, int]]] = {}
    for line in out.strip().splitlines():
        p, pp, r = map(int, line.split())
        children.setdefault(pp, []).append((p, r))
    total, seen, stack = 0, set(), [pid]
    while stack:
        for p, r in children.get(stack.pop(), []):
            if p not in seen:
                seen.add(p)
                total += r
                stack.append(p)
    return total / 1024, len(seen)


def _task(x: np.ndarray) -> float:
    return float(x.sum())


def one(engine: str) -> str:
    x = np.ones(5_000_000, np.float32)
    t0 = time.perf_counter()
    if engine == "dask":
        import distributed

        lc = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        )
        client = distributed.Client(lc)
        t1 = time.perf_counter()
        fut = client.scatter(x, broadcast=True)
        client.gather([client.submit(_task, fut, pure=False) for _ in range(4)])
    else:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t1 = time.perf_counter()
        ref = ray.put(x)
        ray.get([ray.remote(_task).remote(ref) for _ in range(4)])
    t2 = time.perf_counter()
    time.sleep(1.0)
    rss, n = _tree_rss_mb(os.getpid())
    return f"{t1 - t0:.3f} {t2 - t1:.3f} {rss:.1f} {n}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--engines", nargs="+", default=["dask", "ray"])
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(one(args.one))
        return 0
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Local engine of 2 worker processes, {os.cpu_count()} cores, load average at start {load}; "
          f"median of {args.runs} fresh processes.\n")
    print("| engine | version | start s | first tasks s (20 MB to both workers, 4 tasks) | engine processes | "
          "their RSS MB |")
    print("|---|---|---:|---:|---:|---:|")
    for engine in args.engines:
        mod = "distributed" if engine == "dask" else engine
        try:
            version = __import__(mod).__version__
        except ImportError:
            print(f"| {engine} | not installed | - | - | - | - |")
            continue
        rows = []
        for _ in range(args.runs):
            r = subprocess.run([sys.executable, "-m", "benchmarks.bench_engines", "--one", engine],
                               capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            if r.returncode != 0:
                raise SystemExit(f"{engine} failed:\n{r.stderr[-2000:]}")
            rows.append([float(v) for v in r.stdout.split()[-4:]])
        med = [statistics.median(c) for c in zip(*rows, strict=True)]
        print(f"| {engine} | {version} | {med[0]:.2f} | {med[1]:.2f} | {med[3]:.0f} | {med[2]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
