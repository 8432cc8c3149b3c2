"""The feature engine: batched, cached, multi-view extraction of per-layer embeddings.

``extract(cohort, extractor="ssl")`` resizes every slice to the extractor's input size, runs the
extractor in batches (CUDA with autocast when present, else CPU), pools per layer, and stores the
result in the content-addressed cache (:mod:`inspector.cache`). Views (identity, flips, small
rotations) are extracted by transforming the input images, so that view-invariant matching can
compare every view of a query with the identity view of the training set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .cache import EmbeddingCache, hash_key
from .models import Extractor, get_extractor
from .preprocess import resize_square
from .store import release_pages
from .types import Cohort, ProgressFn
from .views import apply_view, canonical_view_name

__all__ = [
    "Features",
    "ProgressFn",
    "cohort_images",
    "prepare_extractor",
    "extract",
]

log = logging.getLogger(__name__)


_MEMMAP_BYTES = 512 * 1024**2  # outputs bigger than this stream to a memory-mapped file


def cohort_images(cohort: Cohort | np.ndarray, size: int) -> np.ndarray:
    """All slices of a cohort resized to ``size x size`` (aspect kept, zero padded).

    Parameters
    ----------
    cohort : Cohort or np.ndarray of shape (n, H, W)
    size : int

    Returns
    -------
    np.ndarray, shape (n, size, size), float32 in [0, 1]
    """
    if isinstance(cohort, Cohort):
        if len(cohort) == 0:
            raise ValueError(f"Cohort {cohort.name!r} has no slices; nothing to extract.")
        return cohort.stack(size=size)
    arr = np.asarray(cohort, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"Expected a Cohort or an array of shape (n, H, W) with n >= 1; got {arr.shape}.")
    if arr.shape[1:] == (size, size):
        return arr
    return resize_square(arr, size)


def _content_hash(images: np.ndarray) -> str:
    from .store import stack_hash

    return stack_hash(images)


@dataclass
class Features:
    """Per-layer, per-view pooled embeddings of one cohort.

    Attributes
    ----------
    views : dict of str to dict of str to np.ndarray
        ``views[view][layer]`` has shape (n, C_layer), float32. ``"id"`` is always present.
    extractor : str
        Extractor name.
    fingerprint : str
        The extractor's fingerprint (config and weights), part of the cache key.
    content_hash : str
        Hash of the images the features were computed from.
    from_cache : dict of str to bool
        Per view, whether it came from the cache.
    seconds : float
        Wall time of the call.
    """

    views: dict[str, dict[str, np.ndarray]]
    extractor: str
    fingerprint: str
    content_hash: str
    from_cache: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def layers(self) -> dict[str, np.ndarray]:
        """The identity view: ``{layer: (n, C_layer)}``."""
        return self.views["id"]

    @property
    def layer_names(self) -> list[str]:
        return list(self.views["id"])

    def __len__(self) -> int:
        return next(iter(self.views["id"].values())).shape[0]


def prepare_extractor(
    extractor: str | Extractor,
    train: Cohort | np.ndarray | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    **overrides,
) -> Extractor:
    """Build an extractor by name and fit it on the training cohort when it needs fitting.

    Parameters
    ----------
    extractor : str or Extractor
        A registry name (see :func:`inspector.models.available_extractors`) or an instance.
    train : Cohort or np.ndarray of shape (n, H, W), optional
        The training cohort T; required when the extractor ``requires_fit`` (``ssl``).
    cache_dir : path, optional
        Cache root (trained weights are cached under it).
    progress : callable, optional
        ``progress(stage, done, total)``.
    **overrides
        Extractor config overrides (e.g. ``checkpoint=...``).

    Returns
    -------
    Extractor
        Fitted if needed.
    """
    ext = get_extractor(extractor, **overrides) if isinstance(extractor, str) else extractor
    if ext.requires_fit and not getattr(ext, "is_fitted", False):
        if train is None:
            raise ValueError(f"Extractor {ext.name!r} is trained on the training cohort: pass train=<training cohort>.")
        images = cohort_images(train, ext.config.input_size)
        root = Path(cache_dir).expanduser() if cache_dir is not None else EmbeddingCache().root
        ext.fit(images, cache_dir=root, progress=progress)
    return ext


def _autocast(ext: Extractor):
    dev = ext.device
    if dev.type == "cuda" and ext.config.dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, ext.config.dtype))
    return nullcontext()


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.require(self.images[i], np.float32, ["C", "W"]))  # a read-only store row is copied


def _layer_array(shape: tuple[int, int], spill_dir: Path | None, name: str) -> np.ndarray:
    """The (n, C) float32 output of one layer: a memory-mapped ``spill_dir/<name>.npy`` when it exceeds
    ``_MEMMAP_BYTES`` and a spill folder is given, else an array in memory."""
    if spill_dir is not None and shape[0] * shape[1] * 4 > _MEMMAP_BYTES:
        spill_dir.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(spill_dir / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)
    return np.empty(shape, dtype=np.float32)


def _run(
    ext: Extractor,
    images: np.ndarray,
    *,
    stage: str,
    progress: ProgressFn | None,
    num_workers: int,
    spill_dir: Path | None,
) -> dict[str, np.ndarray]:
    n = len(images)
    bs = max(1, int(ext.config.batch_size))
    loader = torch.utils.data.DataLoader(
        _ImageDataset(images),
        batch_size=bs,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=ext.device.type == "cuda",
    )
    out: dict[str, np.ndarray] = {}
    done = 0
    with torch.inference_mode(), _autocast(ext):
        for batch in loader:
            batch = batch.to(ext.device, non_blocking=True).float()
            feats = ext.forward_batch(batch)
            for name, t in feats.items():
                arr = t.detach().float().cpu().numpy()
                if name not in out:
                    out[name] = _layer_array((n, arr.shape[1]), spill_dir, f"{stage}-{name}")
                out[name][done : done + len(arr)] = arr
            done += len(batch)
            # the pages of a slice store read for this batch, and of spilled layer arrays written, leave the
            # process (they stay in the page cache; written ones are flushed by the kernel)
            release_pages(images, *out.values())
            if progress:
                progress(stage, done, n)
    for name, arr in out.items():
        if not np.isfinite(arr).all():
            raise FloatingPointError(
                f"Extractor {ext.name!r} produced NaN/Inf in layer {name!r}; "
                "try dtype='float32' or check the checkpoint."
            )
    return out


def _extract_part(ext: Extractor, images: np.ndarray) -> dict[str, np.ndarray]:
    """One part of :func:`_run_on_cluster`, on a worker."""
    return _run(ext, images, stage="extracting", progress=None, num_workers=0, spill_dir=None)


def _run_on_cluster(
    ext: Extractor,
    images: np.ndarray,
    executor: Any,
    *,
    stage: str,
    progress: ProgressFn | None,
    spill_dir: Path | None,
) -> dict[str, np.ndarray]:
    """:func:`_run` over parts of whole batches on a cluster's workers (:mod:`inspector.cluster`), joined in order.

    Parts hold whole ``batch_size`` batches, so every batch is the one the single-machine run forms.
    """
    from .cluster import part_bounds

    n = len(images)
    bounds = part_bounds(n, max(1, int(ext.config.batch_size)), 2 * executor.n_workers)
    out: dict[str, np.ndarray] = {}
    done = [0]

    def on_done(i: int) -> None:
        done[0] += bounds[i][1] - bounds[i][0]
        if progress:
            progress(stage, done[0], n)

    results = executor.map_parts(_extract_part, ext, [images[a:b] for a, b in bounds], on_done=on_done)
    for (a, b), part in zip(bounds, results, strict=True):
        for name, arr in part.items():
            if name not in out:
                out[name] = _layer_array((n, arr.shape[1]), spill_dir, f"{stage}-{name}")
            out[name][a:b] = arr
    return out


def extract(
    cohort: Cohort | np.ndarray,
    extractor: str | Extractor = "ssl",
    *,
    views: Sequence[str] = ("id",),
    train: Cohort | np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    num_workers: int = 0,
    executor: Any = None,
    **overrides,
) -> Features:
    """Extract pooled per-layer features for every slice of ``cohort``, for each requested view.

    Parameters
    ----------
    cohort : Cohort or np.ndarray of shape (n, H, W)
        Slices in [0, 1]; resized to the extractor's input size.
    extractor : str or Extractor
        Registry name or a ready (fitted) extractor. ``"ssl"`` is trained on ``train`` (default: the
        cohort itself) the first time and cached by the training set's hash.
    views : sequence of str
        Views to extract (names of :mod:`inspector.views`: a :class:`~inspector.views.View` or ``rot<deg>``);
        ``"id"`` is always included.
    train : Cohort or np.ndarray, optional
        The training cohort for extractors that need fitting.
    cache_dir : path, optional
        Cache root (default: :func:`inspector.cache.default_cache_dir`).
    use_cache : bool
        Read and write the embedding cache.
    progress : callable, optional
        ``progress(stage, done, total)`` with stages ``training`` and ``extracting[:<view>]``.
    num_workers : int
        DataLoader workers for preparing batches.
    executor : inspector.cluster.Cluster, optional
        Extract on a cluster's workers (parts of whole batches, the same numbers); training stays here.
    **overrides
        Extractor config overrides when ``extractor`` is a name.

    Returns
    -------
    Features
        ``features.layers[layer]`` has shape (n, C_layer).

    Examples
    --------
    >>> feats = inspector.extract(inspector.load_cohort("sample_data/train"), extractor="ssl")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    cache = EmbeddingCache(cache_dir, enabled=use_cache)
    ext = prepare_extractor(
        extractor, train if train is not None else cohort, cache_dir=cache.root, progress=progress, **overrides
    )
    images = cohort_images(cohort, ext.config.input_size)
    content = _content_hash(images)
    fingerprint = ext.fingerprint()
    wanted = list(dict.fromkeys(["id", *views]))
    result: dict[str, dict[str, np.ndarray]] = {}
    hits: dict[str, bool] = {}
    for view in wanted:
        key = hash_key(
            kind="embeddings",
            content=content,
            extractor=ext.name,
            fingerprint=fingerprint,
            view=canonical_view_name(view),  # aliases ("h", "hflip") share one cache entry
            version=__version__,
        )
        arrays = cache.load(key)
        if arrays is not None and set(arrays) == set(ext.layers):
            result[view] = {name: arrays[name] for name in ext.layers}
            hits[view] = True
            if progress:
                progress(f"extracting:{view}", len(images), len(images))
            continue
        spill = cache.root / "spill" / key[:16] if use_cache else None
        if executor is not None and len(images) > ext.config.batch_size:
            arrays = _run_on_cluster(
                ext, apply_view(images, view), executor, stage=f"extracting:{view}", progress=progress, spill_dir=spill
            )
        else:
            arrays = _run(
                ext,
                apply_view(images, view),
                stage=f"extracting:{view}",
                progress=progress,
                num_workers=num_workers,
                spill_dir=spill,
            )
        cache.save(
            key,
            arrays,
            {
                "extractor": ext.name,
                "fingerprint": fingerprint,
                "config": ext.config.to_dict(),
                "view": view,
                "n": len(images),
                "content": content,
                "version": __version__,
            },
        )
        result[view] = {name: np.asarray(arrays[name]) for name in ext.layers}
        hits[view] = False
    secs = time.perf_counter() - t0
    log.info(
        "extracted %s x %d views with %s in %.2fs (cache hits: %s)",
        len(images),
        len(wanted),
        ext.name,
        secs,
        sum(hits.values()),
    )
    return Features(result, ext.name, fingerprint, content, hits, secs)
