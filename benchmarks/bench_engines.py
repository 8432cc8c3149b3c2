"""Start-up cost of the distributed engines on this machine: Dask distributed (used) and Ray (when importable).

Usage::

    python -m benchmarks.bench_engines [--runs 3] [--ray-python /path/to/venv-with-ray/bin/python] [--update-results]

Each run starts a local engine of two single-threaded worker processes in a fresh Python process, sends one 20 MB
array to both workers and runs four tasks on it, then sums the RSS of every process the engine started. Ray is
not a dependency of this project: ``--ray-python`` names the interpreter of an environment where it is installed
(with numpy); its runs use that interpreter, with ``RAY_USAGE_STATS_ENABLED=0``. Prints a table.
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
    p.add_argument("--ray-python", default=sys.executable, help="interpreter of an environment with ray installed")
    p.add_argument("--update-results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(one(args.one))
        return 0
    t_start = time.perf_counter()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        f"Local engine of 2 worker processes, {os.cpu_count()} cores, load average at start {load}; "
        f"median of {args.runs} fresh processes.\n",
        "| engine | version | start s | first tasks s (20 MB to both workers, 4 tasks) | engine processes | "
        "their RSS MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for engine in args.engines:
        python = sys.executable if engine == "dask" else args.ray_python
        mod = "distributed" if engine == "dask" else engine
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": root}
        probe = subprocess.run(
            [python, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True, text=True, env=env
        )
        if probe.returncode != 0:
            lines.append(f"| {engine} | not installed | - | - | - | - |")
            continue
        version = probe.stdout.strip()
        rows = []
        for _ in range(args.runs):
            r = subprocess.run(
                [python, "-m", "benchmarks.bench_engines", "--one", engine],
                capture_output=True,
                text=True,
                env=env,
                cwd=root,
            )
            if r.returncode != 0:
                raise SystemExit(f"{engine} failed:\n{r.stderr[-2000:]}")
            rows.append([float(v) for v in r.stdout.split()[-4:]])
        med = [statistics.median(c) for c in zip(*rows, strict=True)]
        lines.append(f"| {engine} | {version} | {med[0]:.2f} | {med[1]:.2f} | {med[3]:.0f} | {med[2]:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.update_results:
        from benchmarks.results import put_section

        cmd = "python -m benchmarks.bench_engines " + " ".join(argv if argv is not None else sys.argv[1:])
        put_section(
            "Distributed engines: start-up and memory of a local two-worker engine (`bench_engines`)",
            text,
            cmd.strip(),
            time.perf_counter() - t_start,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
