"""Extraction throughput and peak memory per extractor (CPU, default sizes), cold and cached; ssl training time.

Usage::

    python -m benchmarks.bench_extract [--runs 3] [--threads N] [--n-vit 32]

Data: real MRI slices from the MNI152 2009a template shipped with nilearn (T1 and grey-matter map, all three axes,
every 3rd slice, background slices skipped, resized to 128 px): about 250 slices, the size of the sample data.
Without nilearn, seeded smooth random images of the same size are used (and the header says so).

Every measurement runs in a fresh subprocess so that ``peak RSS`` (``VmHWM``) belongs to that measurement
alone; ``base RSS`` is the same process after importing torch and the package, before building the extractor.
``cold`` = ``inspector.extract`` with an empty embedding cache (for ssl the trained weights are already cached, so
cold measures extraction, not training); ``cached`` = the same call again in the same process. Throughput is slices
per second of the whole call (resizing, batching, forward, cache write or read). ``mri-core`` is a random-weight
ViT-B checkpoint in the MRI-CORE (DINOv2) layout written to a temporary folder: 12 blocks, width 768, LayerScale,
``pos_embed`` [1, 197, 768]; its load time includes the sha256 of the ~345 MB file. ``ssl training`` trains on all
slices from scratch (empty cache) at the default settings. Medians of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def load_slices(size: int = 128) -> tuple[np.ndarray, str]:
    """About 250 real MRI slices (n, size, size) in [0, 1], or seeded smooth images without nilearn."""
    from inspector.preprocess import is_background, normalise_volume, resize_square

    try:
        import nibabel as nib
        import nilearn

        d = Path(nilearn.__file__).parent / "datasets" / "data"
        names = ["mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"]
        out = []
        for name in names:
            vol = normalise_volume(np.asarray(nib.load(d / name).get_fdata(), dtype=np.float32))
            for ax in range(3):
                for i in range(0, vol.shape[ax], 3):
                    s = np.take(vol, i, axis=ax)
                    if not is_background(s):
                        out.append(resize_square(s, size))
        return np.stack(out)[:250], "MNI152 2009a template slices (nilearn)"
    except (ImportError, OSError):
        import torch

        g = torch.Generator().manual_seed(0)
        x = torch.nn.functional.interpolate(torch.rand(250, 1, 16, 16, generator=g), size=(size, size), mode="bicubic")
        x = x[:, 0] - x.amin(dim=(1, 2, 3))[:, None, None]
        return (x / x.amax(dim=(1, 2), keepdim=True)).numpy().astype(np.float32), "seeded smooth random images"


def write_vit_b_checkpoint(path: Path) -> None:
    """A random ViT-B checkpoint in the MRI-CORE layout (teacher/backbone.*, chunked blocks, fc1/fc2, LayerScale)."""
    import torch

    from inspector.models import MriCoreConfig, SamImageEncoder

    torch.manual_seed(0)
    enc = SamImageEncoder(MriCoreConfig(), layerscale=True)
    sd = {}
    for k, v in enc.state_dict().items():
        k = k.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]
        if k == "pos_embed":
            v = torch.randn(1, 197, 768) * 0.02
        sd["backbone." + k] = v
    sd["backbone.cls_token"] = torch.zeros(1, 1, 768)
    sd["backbone.mask_token"] = torch.zeros(1, 768)
    sd["backbone.norm.weight"], sd["backbone.norm.bias"] = torch.ones(768), torch.zeros(768)
    torch.save({"teacher": sd}, path)


def status_mb(*fields: str) -> dict[str, float]:
    """The given kB fields of /proc/self/status (``"VmRSS"``, ``"RssAnon"``, ...) in MB; those absent are left out
    (all of them where /proc is unavailable)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name = line.split(":", 1)[0]
            if name in fields:
                out[name] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return out


def rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM; ru_maxrss on Linux survives exec from the parent)."""
    peak = status_mb("VmHWM").get("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    import torch

    import inspector
    from inspector.features import cohort_images, prepare_extractor
    from inspector.models import get_extractor

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    images = np.load(spec["images"])[: spec["n"]]
    base = rss_mb()
    cache = Path(spec["cache"])
    overrides = dict(spec.get("overrides", {}))
    if spec["task"] == "train":
        ext = get_extractor("ssl", **overrides)
        t0 = time.perf_counter()
        ext.fit(cohort_images(images, ext.config.input_size), cache_dir=cache)
        secs = time.perf_counter() - t0
        return {"seconds": secs, "epochs": ext.config.epochs, "n": len(images), "base_rss": base, "peak_rss": rss_mb()}
    t0 = time.perf_counter()
    ext = get_extractor(spec["extractor"], **overrides)
    if ext.requires_fit:
        prepare_extractor(ext, images, cache_dir=cache)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold = inspector.extract(images, ext, cache_dir=cache)
    t_cold = time.perf_counter() - t0
    assert not any(cold.from_cache.values())
    t0 = time.perf_counter()
    warm = inspector.extract(images, ext, cache_dir=cache)
    t_warm = time.perf_counter() - t0
    assert all(warm.from_cache.values())
    return {
        "load": load,
        "cold": t_cold,
        "cached": t_warm,
        "n": len(images),
        "dims": {k: int(v.shape[1]) for k, v in cold.layers.items()},
        "input_size": ext.config.input_size,
        "base_rss": base,
        "peak_rss": rss_mb(),
    }


def run_worker(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_extract", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker failed: {spec}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--n-vit", type=int, default=32, help="slices for mri-core (ViT-B at 224 px is slow on CPU)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    images, source = load_slices()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# bench_extract: {len(images)} slices of {images.shape[1]} px ({source}); {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} with {args.threads or torch.get_num_threads()} "
        f"threads, CUDA {torch.cuda.is_available()}; load average at start {load}; medians of {args.runs} runs"
    )
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp_path = Path(tmp)
        np.save(tmp_path / "images.npy", images)
        ckpt = tmp_path / "vit_b_random.pth"
        write_vit_b_checkpoint(ckpt)
        common = {"images": str(tmp_path / "images.npy"), "threads": args.threads}

        # ssl training from scratch (empty cache each run)
        train = [
            run_worker({**common, "task": "train", "n": len(images), "cache": str(tmp_path / f"train{r}")})
            for r in range(args.runs)
        ]
        ssl_cache = tmp_path / "train0"  # holds trained weights; extraction runs copy it so cold = extraction only

        rows = []
        for name, n, overrides in [
            ("pixels", len(images), {}),
            ("ssl", len(images), {}),
            ("mri-core", args.n_vit, {"checkpoint": str(ckpt)}),
        ]:
            runs = []
            for r in range(args.runs):
                cache = tmp_path / f"{name}{r}"
                if name == "ssl":
                    shutil.copytree(ssl_cache / "ssl", cache / "ssl")
                runs.append(
                    run_worker(
                        {
                            **common,
                            "task": "extract",
                            "extractor": name,
                            "n": n,
                            "cache": str(cache),
                            "overrides": overrides,
                        }
                    )
                )
            rows.append((name, runs))

    print()
    print(
        "| extractor | input | layers (dims) | slices | load s | cold slices/s | cached slices/s "
        "| base RSS MB | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in rows:
        n = runs[0]["n"]
        dims = ", ".join(f"{k} {v}" for k, v in runs[0]["dims"].items())
        print(
            f"| {name} | {runs[0]['input_size']} px | {dims} | {n} | {med(runs, 'load'):.2f} | "
            f"{n / med(runs, 'cold'):.1f} | {n / med(runs, 'cached'):.0f} | {med(runs, 'base_rss'):.0f} | "
            f"{med(runs, 'peak_rss'):.0f} |"
        )
    secs = med(train, "seconds")
    each = ", ".join(f"{t['seconds']:.1f}" for t in train)
    n, ep = train[0]["n"], train[0]["epochs"]
    print()
    print(
        f"ssl training on {n} slices ({ep} epochs, default config): median {secs:.1f} s "
        f"(runs: {each}); {secs / (n * ep) * 1000:.2f} s per 1,000 slices "
        f"per epoch; peak RSS {med(train, 'peak_rss'):.0f} MB"
    )


if __name__ == "__main__":
    main()
