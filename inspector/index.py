"""Nearest neighbours: cosine / inner-product top-k through faiss, exact by default.

Design
------
* **Candidates from faiss, answers from exact arithmetic.** faiss (``faiss.knn`` on the CPU, which is the kernel
  behind ``IndexFlatIP.search`` without copying the base into an index; ``GpuIndexFlatIP`` on a GPU; an
  ``IVF,SQ8`` index in approximate mode) proposes a candidate set per query. The candidates that can still reach
  the top ``k`` are re-scored in float64 from the float32 (normalised) vectors, rounded to float32 (the returned
  precision), and the top ``k`` are selected with equal values ordered by lower base index. Similarities are
  therefore the same across devices, chunk sizes and thread counts, and duplicated base rows always come out
  lowest index first.
* **Exact means exact, ties included.** In exact mode a query's answer is accepted only when its ``k``-th
  similarity beats the weakest faiss candidate by more than faiss' float32 rounding bound; otherwise (near-ties at
  the boundary, e.g. many identical training slices) the search is repeated with twice the candidates and, past
  :data:`_FAISS_MAX_K`, by a blocked float64 brute force. The result equals a float64 brute force (up to the
  last bit of float64 summation order).
* **Leave-one-subject-out.** With groups, a query asks for ``k`` + (size of its own group in the base) + slack
  candidates and drops its own group, so exclusion stays correct when a group is larger than ``k``; queries are
  bucketed by that size so a large group does not slow the others down.
* **Bounded memory.** Queries are processed ``chunk_size`` rows at a time; no ``m x n`` matrix is ever formed.

The exact -> approximate switch (:data:`APPROX_MIN_PAIRS`, :data:`APPROX_MIN_BASE`, :data:`APPROX_MIN_QUERIES`)
and :data:`DEFAULT_NPROBE` come from ``python -m benchmarks.bench_index``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np
from sklearn.exceptions import NotFittedError

__all__ = [
    "APPROX_MIN_BASE",
    "APPROX_MIN_PAIRS",
    "APPROX_MIN_QUERIES",
    "DEFAULT_NPROBE",
    "DeviceUnavailableError",
    "IndexInputError",
    "METRICS",
    "NeighbourIndex",
    "NotFittedError",
    "gpu_available",
    "knn",
]

log = logging.getLogger(__name__)

METRICS = ("cosine", "ip")

# Exact -> approximate switch, measured with `python -m benchmarks.bench_index` on the 2-core AMD EPYC (KVM)
# development machine, which other jobs shared at the time (load average 4-9, so absolute times are several times a
# quiet run; the ratios measured in the same run are what matter). Clustered data, d = 256, k = 10, m = n, medians:
#   m = n =   1k: exact  0.11 s, approximate (IVF-SQ8 build + search + exact re-rank)  0.52 s -> 0.2x
#   m = n =  10k: exact  3.3 s,  approximate  4.3 s -> 0.8x (0.8x-1.2x with 100-subject leave-one-out)
#   m = n =  20k: exact  9.7 s,  approximate  8.3 s -> 1.2x, recall@10 1.000
#   m = n =  30k: exact 25.9 s,  approximate  8.4 s -> 3.1x, recall@10 1.000
#   m = n = 100k: exact  267 s,  approximate 63 s   -> 4.2x, recall@10 0.9999
# A second full run (load 7-11) gave 0.2x, 0.7x, 1.9x, 1.3x and 3.3x for the same sizes (recall@10 >= 0.9999).
# Exact costs ~m*n*d; approximate costs a build that grows with n (k-means on up to 64 * 4 sqrt(n) rows, adding n
# rows) plus m * (n * nprobe / nlist) * d, so it only pays when both m and n are large. Below ~20k x 20k it wins
# nothing (and loses exactness); from 30k x 30k it is 3x faster. We switch at 5e8 query-base pairs with at least
# 20k queries and 20k base rows: few queries against a huge base stay exact (the build would dominate).
APPROX_MIN_PAIRS = 500_000_000
APPROX_MIN_BASE = 20_000
APPROX_MIN_QUERIES = 20_000

# IVF lists probed per query. nlist ~ 4 sqrt(n) (1265 lists at n = 100k): nprobe = 32 scans ~2.5 % of the base and
# gave recall@10 >= 0.9999 on the benchmark's clustered data at 10k-100k (after exact re-ranking). On much harder data
# (heavily overlapping clusters, top-1 cosine ~0.33) a trial run at 100k gave ~0.93; raise nprobe there.
DEFAULT_NPROBE = 32
# Approximate mode retrieves this many times k candidates (SQ8 codes) and re-ranks them exactly.
DEFAULT_RERANK_FACTOR = 4

# Largest k asked of faiss (GPU faiss supports up to 2048). Beyond it, a blocked float64 brute force is used.
_FAISS_MAX_K = 1024
# Extra candidates asked for in exact mode, beyond k and the query's own group (before rounding up on the bucket
# grid); they certify that no unreturned row can reach the top k, and a row whose certificate fails is retried.
_MIN_SLACK = 4
# Element budget for float64 temporaries (re-ranking gathers, brute-force blocks): 2**23 float64 = 64 MiB.
_ELEM_BUDGET = 1 << 23
# Element budget of one re-ranking gather: 2**18 float64 = 2 MiB stays in cache (a 64 MiB gather ran 3x slower).
_RERANK_BUDGET = 1 << 18
# Re-ranking parts from which they are spread over threads (fewer ran slower threaded: 23 vs 3 ms at 221 x 997).
_THREADED_PARTS = 16
_U32 = 2.0**-24  # unit round-off of float32


class IndexInputError(ValueError):
    """Bad input to the nearest-neighbour search (shape, dtype, non-finite values, k, groups, metric, device)."""


class DeviceUnavailableError(RuntimeError):
    """``device="cuda"`` was requested but faiss-gpu or a CUDA GPU is not available."""


# --------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when the installed faiss has GPU support (faiss-gpu) and sees at least one CUDA GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return int(faiss.get_num_gpus()) > 0
    except Exception:  # noqa: BLE001 - a broken CUDA runtime means "no GPU", never a crash
        return False


def _threads() -> int:
    """Threads for the re-ranking gathers: faiss' OpenMP count (the cores faiss itself uses)."""
    return max(1, int(faiss.omp_get_max_threads()))


def _resolve_device(device: str) -> tuple[str, int]:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` to ``("cpu" | "cuda", gpu_id)``."""
    if not isinstance(device, str):
        raise IndexInputError(f"device must be a string ('auto', 'cpu', 'cuda' or 'cuda:N'); got {device!r}.")
    dev = device.strip().lower()
    if dev == "cpu":
        return "cpu", 0
    if dev == "auto":
        return ("cuda", 0) if gpu_available() else ("cpu", 0)
    match = re.fullmatch(r"cuda(?::(\d+))?", dev)
    if match is None:
        raise IndexInputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    gpu_id = int(match.group(1) or 0)
    if not hasattr(faiss, "StandardGpuResources"):
        raise DeviceUnavailableError(
            f"device={device!r} needs faiss with GPU support, but the installed faiss is CPU-only; install "
            "faiss-gpu (pip install -e .[gpu] in an environment without faiss-cpu) or use device='cpu'/'auto'."
        )
    n_gpu = faiss.get_num_gpus()
    if gpu_id >= n_gpu:
        raise DeviceUnavailableError(
            f"device={device!r} but faiss sees {n_gpu} CUDA GPU(s); use device='cpu' or 'auto', or a valid GPU id."
        )
    return "cuda", gpu_id


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise IndexInputError(f"unknown metric {metric!r}; use one of {METRICS}.")
    return metric


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise IndexInputError(f"{name} must be an integer >= {minimum}; got {value!r} ({type(value).__name__}).")
    if int(value) < minimum:
        raise IndexInputError(f"{name} must be >= {minimum}; got {int(value)}.")
    return int(value)


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """Validate and convert to a C-contiguous float32 (rows, features) matrix."""
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise IndexInputError(f"{name} could not be converted to a numeric array ({e}); pass a 2-D float array.") from e
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise IndexInputError(f"{name} has dtype {arr.dtype}; pass a real-valued 2-D float array (rows, features).")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise IndexInputError(f"{name} is complex ({arr.dtype}); pass real-valued features.")
    if arr.ndim != 2:
        hint = " Use x.reshape(1, -1) for a single vector." if arr.ndim == 1 else ""
        raise IndexInputError(f"{name} must be 2-D (rows, features); got shape {arr.shape}.{hint}")
    if arr.shape[1] == 0:
        raise IndexInputError(f"{name} has shape {arr.shape}: zero features per row; check the feature extraction.")
    with np.errstate(over="ignore"):  # values beyond float32 become Inf, reported just below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size:
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.flatnonzero(~finite.all(axis=1))
            raise IndexInputError(
                f"{name} contains NaN or Inf in {bad.size} row(s) (first: row {int(bad[0])}); values beyond float32 "
                "range count as Inf. Remove or repair those rows before searching."
            )
    return arr


def _row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean row norms computed in float64 (no overflow for large float32 values), blocked."""
    out = np.empty(x.shape[0], dtype=np.float64)
    step = max(1, _ELEM_BUDGET // max(1, x.shape[1]))
    for s in range(0, x.shape[0], step):
        blk = x[s : s + step].astype(np.float64)
        out[s : s + step] = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    return out


def _prepare(x: np.ndarray, metric: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the search-ready float32 matrix (rows normalised under cosine) and its row norms (float64)."""
    norms = _row_norms(x)
    if metric == "ip":
        return x, norms
    zero = np.flatnonzero(norms < np.finfo(np.float32).tiny)
    if zero.size:
        raise IndexInputError(
            f"{name} has {zero.size} zero-norm row(s) (first: row {int(zero[0])}); cosine similarity is undefined "
            "for them. Drop constant/empty slices before searching, or use metric='ip'."
        )
    out = np.empty_like(x)
    step = max(1, _ELEM_BUDGET // x.shape[1])
    for s in range(0, x.shape[0], step):
        out[s : s + step] = x[s : s + step].astype(np.float64) / norms[s : s + step, None]
    return out, np.ones(x.shape[0])


def _as_groups(groups: Any, length: int, name: str, rows: str) -> list[Any]:
    """Groups as a list of hashable, non-missing labels of the given length."""
    if isinstance(groups, np.ndarray):
        if groups.ndim != 1:
            raise IndexInputError(f"{name} must be 1-D (one label per {rows} row); got shape {groups.shape}.")
        seq = groups.tolist()
    elif isinstance(groups, str | bytes) or not isinstance(groups, Iterable):
        raise IndexInputError(f"{name} must be a 1-D array or sequence of labels; got {type(groups).__name__}.")
    else:
        seq = list(groups)
    if len(seq) != length:
        raise IndexInputError(
            f"{name} has {len(seq)} labels but there are {length} {rows} rows; pass exactly one group label "
            f"(e.g. subject id) per {rows} row."
        )
    for i, v in enumerate(seq):
        if v is None or (isinstance(v, float) and v != v):
            raise IndexInputError(f"{name}[{i}] is missing ({v!r}); every row needs a group label (subject id).")
        try:
            hash(v)
        except TypeError as e:
            raise IndexInputError(f"{name}[{i}] = {v!r} is not hashable; use str or int group labels.") from e
    return seq


def _bucket(want: np.ndarray) -> np.ndarray:
    """Round candidate counts up to a half-power-of-two grid (32, 46, 64, 91, ...) so rows share faiss calls;
    rows that all need the same get exactly that (every candidate more costs faiss heap work)."""
    w = np.asarray(want)
    if w.size and w.min() == w.max():
        return np.maximum(w, 1).astype(np.int64)
    w = np.maximum(w.astype(np.float64), 1.0)
    return np.ceil(2.0 ** (np.ceil(2.0 * np.log2(w) - 1e-9) / 2.0)).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------------------


def _select_topk(sims: np.ndarray, ids: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``kk`` of every row, sorted descending; among equal values the earlier *position* wins.

    Callers lay each row out so that positions of equal-valued entries are in increasing base index.

    Parameters
    ----------
    sims : (r, c) float64, ``-inf`` for invalid entries
    ids : (r, c) int64
    kk : int

    Returns
    -------
    (r, kk) float64 and (r, kk) int64 (``-inf`` / ``-1`` where fewer than ``kk`` valid entries exist).
    """
    r, c = sims.shape
    if c < kk:
        sims = np.concatenate([sims, np.full((r, kk - c), -np.inf)], axis=1)
        ids = np.concatenate([ids, np.full((r, kk - c), -1, dtype=np.int64)], axis=1)
        c = kk
    if c > kk:
        kth = np.partition(sims, c - kk, axis=1)[:, c - kk]  # the kk-th largest value per row
        greater = sims > kth[:, None]
        equal = sims == kth[:, None]
        room = kk - greater.sum(axis=1)
        take = greater | (equal & (np.cumsum(equal, axis=1) <= room[:, None]))
        pos = np.nonzero(take)[1].reshape(r, kk)  # exactly kk per row, in increasing position
        sims = np.take_along_axis(sims, pos, axis=1)
        ids = np.take_along_axis(ids, pos, axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    sims = np.take_along_axis(sims, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    ids[np.isneginf(sims)] = -1
    return sims, ids


def _sortable_key(vals32: np.ndarray, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is descending float32 value, then ascending id; invalid entries last.

    Parameters
    ----------
    vals32 : (r, c) float32, no NaN
    ids : (r, c) int64, ``0 <= id < 2**32`` where valid
    valid : (r, c) bool

    Returns
    -------
    (r, c) uint64
    """
    v = vals32 + np.float32(0.0)  # -0.0 -> +0.0: equal values must get equal keys
    bits = v.view(np.uint32)
    # IEEE order as unsigned order: flip every bit of negatives, set the sign bit of non-negatives
    mono = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    desc = (~mono).astype(np.uint64)  # larger value -> smaller key
    key = (desc << np.uint64(32)) | np.where(valid, ids, 0).astype(np.uint64)
    key[~valid] = np.iinfo(np.uint64).max
    return key


def _topk_by_key(vals32: np.ndarray, ids: np.ndarray, valid: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``kk`` valid entries of every row by float32 value, equal values by lower id (one sort of packed keys).

    Parameters
    ----------
    vals32 : (r, c) float32
    ids : (r, c) int64 (non-negative where valid)
    valid : (r, c) bool
    kk : int

    Returns
    -------
    (r, kk) float64 and (r, kk) int64 (``-inf`` / ``-1`` where fewer than ``kk`` valid entries exist).
    """
    r, c = vals32.shape
    key = _sortable_key(vals32, ids, valid)
    if c > kk:
        key = np.partition(key, kk - 1, axis=1)[:, :kk]
    key = np.sort(key, axis=1)
    if c < kk:
        key = np.concatenate([key, np.full((r, kk - c), np.iinfo(np.uint64).max, dtype=np.uint64)], axis=1)
    empty = key == np.iinfo(np.uint64).max
    out_i = (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
    mono = ~(key >> np.uint64(32)).astype(np.uint32)
    bits = np.where(mono & np.uint32(0x80000000), mono & np.uint32(0x7FFFFFFF), ~mono)
    out_s = bits.view(np.float32).astype(np.float64)
    out_s[empty] = -np.inf
    out_i[empty] = -1
    return out_s, out_i


# --------------------------------------------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------------------------------------------


class NeighbourIndex:
    """Top-k cosine / inner-product neighbours of a fixed base set (scikit-learn style).

    Parameters
    ----------
    metric : {"cosine", "ip"}
        ``"cosine"`` L2-normalises rows internally (zero rows are an error); ``"ip"`` uses the vectors as given.
    exact : bool or None
        ``None`` chooses exact search unless the search is large (``m * n >= APPROX_MIN_PAIRS``,
        ``n >= APPROX_MIN_BASE`` and ``m >= APPROX_MIN_QUERIES``); ``True``/``False`` force it.
    device : str
        ``"auto"`` (GPU faiss when faiss-gpu and a CUDA GPU are present, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``.
    chunk_size : int
        Queries processed at once; temporaries stay below ``chunk_size x n`` similarities.
    nprobe : int
        IVF lists probed per query in approximate mode.
    rerank_factor : int
        Approximate mode retrieves ``rerank_factor * k`` candidates and re-ranks them exactly.

    Attributes
    ----------
    n_, d_ : int
        Number and dimension of the fitted base vectors.
    device_ : str
        ``"cpu"`` or ``"cuda"``, as resolved at fit time.
    """

    def __init__(
        self,
        *,
        metric: str = "cosine",
        exact: bool | None = None,
        device: str = "auto",
        chunk_size: int = 4096,
        nprobe: int = DEFAULT_NPROBE,
        rerank_factor: int = DEFAULT_RERANK_FACTOR,
    ) -> None:
        self.metric = metric
        self.exact = exact
        self.device = device
        self.chunk_size = chunk_size
        self.nprobe = nprobe
        self.rerank_factor = rerank_factor

    # -- fitting -----------------------------------------------------------------------------------------------

    def _check_params(self) -> None:
        _check_metric(self.metric)
        if self.exact is not None and not isinstance(self.exact, bool | np.bool_):
            raise IndexInputError(f"exact must be None, True or False; got {self.exact!r}.")
        _check_int(self.chunk_size, "chunk_size")
        _check_int(self.nprobe, "nprobe")
        _check_int(self.rerank_factor, "rerank_factor")

    def fit(self, base: np.ndarray, groups: Any = None) -> NeighbourIndex:
        """Store the base vectors (normalised under cosine) and, optionally, one group label per row.

        Parameters
        ----------
        base : (n, d) array
            Base vectors; float64 and integer input is converted to float32.
        groups : (n,) array or sequence of hashables, optional
            Group (subject) of every base row; a search with query groups then excludes the query's own group.

        Returns
        -------
        NeighbourIndex
            ``self``.
        """
        self._check_params()
        self.device_, self._gpu_id = _resolve_device(self.device)
        x = _as_matrix(base, "base")
        if x.shape[0] == 0:
            raise IndexInputError("base is empty (0 rows); there is nothing to search. Pass at least one base row.")
        self._base, norms = _prepare(x, self.metric, "base")
        self._max_norm = float(norms.max())
        self.n_, self.d_ = (int(s) for s in self._base.shape)
        if self.n_ >= 2**32:
            raise IndexInputError(
                f"base has {self.n_:,} rows; one index holds fewer than 2**32 (row ids are packed in 32 bits). Split "
                "the base into shards and merge their top-k (inspector.cluster does)."
            )
        if groups is None:
            self._lut: dict[Any, int] | None = None
            self._base_codes = None
            self._group_sizes = None
        else:
            seq = _as_groups(groups, self.n_, "base groups", "base")
            lut: dict[Any, int] = {}
            self._base_codes = np.fromiter((lut.setdefault(v, len(lut)) for v in seq), dtype=np.int64, count=self.n_)
            self._lut = lut
            self._group_sizes = np.bincount(self._base_codes, minlength=len(lut))
        self._gpu_res = None
        self._flat_gpu = None
        self._ivf = None
        if self.device_ == "cuda":
            self._init_gpu()
        log.debug("NeighbourIndex fitted: n=%d d=%d metric=%s device=%s", self.n_, self.d_, self.metric, self.device_)
        return self

    def _init_gpu(self) -> None:
        try:
            self._gpu_res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = self._gpu_id
            index = faiss.GpuIndexFlatIP(self._gpu_res, self.d_, cfg)
            index.add(self._base)
            self._flat_gpu = index
        except Exception as e:  # noqa: BLE001 - out of GPU memory or a broken runtime
            if str(self.device).strip().lower() != "auto":
                raise DeviceUnavailableError(
                    f"could not put the {self.n_}x{self.d_} base on GPU {self._gpu_id} ({e}); use device='cpu'."
                ) from e
            warnings.warn(f"GPU faiss failed ({e}); falling back to the CPU.", RuntimeWarning, stacklevel=3)
            self.device_, self._gpu_res, self._flat_gpu = "cpu", None, None

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_"):
            raise NotFittedError("this NeighbourIndex is not fitted yet; call fit(base) before search(query, k).")

    # -- approximate index -------------------------------------------------------------------------------------

    def _approx_index(self) -> Any:
        """The IVF-SQ8 index over the base, built on first use (seeded k-means on a sample)."""
        if self._ivf is None:
            n, d = self.n_, self.d_
            nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39)))
            index = faiss.index_factory(d, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = 1234
            n_train = min(n, 64 * nlist)
            if n_train < n:
                sample = np.sort(np.random.default_rng(0).choice(n, size=n_train, replace=False))
                index.train(np.ascontiguousarray(self._base[sample]))
            else:
                index.train(self._base)
            index.add(self._base)
            index.nprobe = int(min(self.nprobe, nlist))
            if self.device_ == "cuda":
                index = faiss.index_cpu_to_gpu(self._gpu_res, self._gpu_id, index)
            self._ivf = index
            log.debug("approximate index built: IVF%d,SQ8 nprobe=%d on %s", nlist, index.nprobe, self.device_)
        return self._ivf

    def _use_exact(self, m: int) -> bool:
        if self.exact is not None:
            return bool(self.exact)
        return not (self.n_ >= APPROX_MIN_BASE and m >= APPROX_MIN_QUERIES and m * self.n_ >= APPROX_MIN_PAIRS)

    # -- search --------------------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int, groups: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` most similar base rows for every query row.

        Parameters
        ----------
        query : (m, d) array
        k : int
            Neighbours wanted; ``kk = min(k, n)`` are returned.
        groups : (m,) array or sequence of hashables, optional
            Group of every query row; base rows of the same group are excluded. Needs groups at ``fit``.

        Returns
        -------
        sims : (m, kk) float32
            Similarities, descending (``-inf`` padding where fewer than ``kk`` valid neighbours exist).
        idx : (m, kk) int64
            Base row indices (``-1`` padding); equal similarities are ordered by lower base index.
        """
        self._check_fitted()
        self._check_params()
        k = _check_int(k, "k")
        q = _as_matrix(query, "query")
        if q.shape[1] != self.d_:
            raise IndexInputError(
                f"query has {q.shape[1]} features per row but the base has {self.d_}; embed both with the same "
                "extractor and layer."
            )
        m, kk = q.shape[0], min(k, self.n_)
        codes = None
        if groups is not None:
            if self._lut is None:
                raise IndexInputError(
                    "query groups were given but the index was fitted without base groups; pass groups to fit() "
                    "(or to knn as base_groups) to exclude same-group neighbours."
                )
            seq = _as_groups(groups, m, "query groups", "query")
            lut = self._lut
            codes = np.fromiter((lut.get(v, -1) for v in seq), dtype=np.int64, count=m)
        if m == 0:
            return np.empty((0, kk), dtype=np.float32), np.empty((0, kk), dtype=np.int64)
        q, qnorms = _prepare(q, self.metric, "query")
        if self.metric == "ip" and float(qnorms.max()) * self._max_norm >= float(np.finfo(np.float32).max):
            raise IndexInputError(
                "inner products of these query and base vectors can exceed the float32 range (max norms "
                f"{float(qnorms.max()):.3g} and {self._max_norm:.3g}); rescale the features or use metric='cosine'."
            )
        exact = self._use_exact(m)
        if not exact:
            self._approx_index()
        sims = np.empty((m, kk), dtype=np.float32)
        idx = np.empty((m, kk), dtype=np.int64)
        step = _check_int(self.chunk_size, "chunk_size")
        for s in range(0, m, step):
            sl = slice(s, min(s + step, m))
            cs = None if codes is None else codes[sl]
            out_s, out_i = self._search_chunk(q[sl], qnorms[sl], cs, kk, exact)
            sims[sl] = out_s
            idx[sl] = out_i
        return sims, idx

    def _own_group_sizes(self, codes: np.ndarray | None, r: int) -> np.ndarray:
        if codes is None:
            return np.zeros(r, dtype=np.int64)
        assert self._group_sizes is not None
        return np.where(codes >= 0, self._group_sizes[np.maximum(codes, 0)], 0).astype(np.int64)

    def _search_chunk(
        self, q: np.ndarray, qnorms: np.ndarray, codes: np.ndarray | None, kk: int, exact: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search one chunk of (prepared) queries; returns (r, kk) float64 sims and int64 ids."""
        r, n = q.shape[0], self.n_
        out_s = np.full((r, kk), -np.inf)
        out_i = np.full((r, kk), -1, dtype=np.int64)
        own = self._own_group_sizes(codes, r)
        if exact:
            want = kk + own + _MIN_SLACK
        else:
            want = self.rerank_factor * kk + own
        # candidates per row, rounded up on a coarse grid so that rows with similar needs share a faiss call
        kprime = _bucket(want)
        approx = np.full(r, not exact)
        pending = np.arange(r)
        # float32 rounding bound of faiss' inner products: |faiss - exact| <= d u |q| |b| (+ margin)
        tol = 2.0 * (self.d_ + 2) * _U32 * qnorms * self._max_norm
        rounds = 0
        while pending.size:
            rounds += 1
            kp = np.minimum(kprime[pending], n)
            dense = kp > _FAISS_MAX_K
            if dense.any():
                rows = pending[dense]
                ds, di = self._dense(q[rows], None if codes is None else codes[rows], kk)
                out_s[rows], out_i[rows] = ds, di
            retry = []
            for kv in np.unique(kp[~dense]):
                for use_approx in (True, False):
                    sel = (~dense) & (kp == kv) & (approx[pending] == use_approx)
                    rows = pending[sel]
                    if rows.size == 0:
                        continue
                    backend = self._ivf if use_approx else None
                    dist, cand = self._faiss_search(q[rows], int(kv), backend)
                    rs, ri, nvalid = self._rerank(
                        q[rows],
                        cand,
                        None if codes is None else codes[rows],
                        kk,
                        dist,
                        tol=None if use_approx else tol[rows],
                    )
                    out_s[rows], out_i[rows] = rs, ri
                    complete = int(kv) >= n and not use_approx
                    if complete:
                        continue
                    if use_approx:
                        # the probed lists held too few valid candidates: redo those rows exactly
                        short = nvalid < kk
                        approx[rows[short]] = False
                        retry.append(rows[short])
                        continue
                    valid_d = np.where(cand >= 0, dist, np.inf)
                    dmin = valid_d.min(axis=1).astype(np.float64)
                    ok = (nvalid >= kk) & (rs[:, kk - 1] > dmin + tol[rows])
                    bad = rows[~ok]
                    kprime[bad] = np.minimum(kprime[bad] * 2, max(n, 1))
                    # once faiss would have to return the whole base: a complete faiss search if n <= _FAISS_MAX_K
                    # (kp is clipped to n above), else the blocked brute force
                    kprime[bad] = np.where(kprime[bad] >= n, _FAISS_MAX_K + 1, kprime[bad])
                    retry.append(bad)
            pending = np.concatenate(retry) if retry else np.empty(0, dtype=np.int64)
        if rounds > 1:
            log.debug("search chunk needed %d rounds (near-ties or short approximate candidate lists)", rounds)
        return out_s, out_i

    def _faiss_search(self, q: np.ndarray, kv: int, backend: Any) -> tuple[np.ndarray, np.ndarray]:
        if backend is not None:
            dist, cand = backend.search(q, kv)
        elif self._flat_gpu is not None:
            dist, cand = self._flat_gpu.search(q, kv)
        else:
            dist, cand = faiss.knn(q, self._base, kv, metric=faiss.METRIC_INNER_PRODUCT)
        return dist, cand.astype(np.int64, copy=False)

    def _rerank(
        self,
        q: np.ndarray,
        cand: np.ndarray,
        codes: np.ndarray | None,
        kk: int,
        dist: np.ndarray,
        tol: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact scores of the candidates, own group dropped, top ``kk`` with index tie-break.

        Scores are float64 dot products of the float32 vectors, rounded to float32 (the returned precision, on
        which ties are defined). With exact faiss scores ``dist`` and their rounding bound ``tol``, only the
        candidates that can still reach the top ``kk`` (``dist >= kk-th valid dist - 2 tol``) are re-scored; with
        approximate scores (``tol=None``), the best ``rerank_factor * kk`` valid candidates are.

        Returns
        -------
        sims (r, kk) float64, ids (r, kk) int64, number of valid candidates (r,) int64
        """
        r, c = cand.shape
        valid = cand >= 0
        if codes is not None:
            assert self._base_codes is not None
            valid &= self._base_codes[np.maximum(cand, 0)] != codes[:, None]
        nvalid = valid.sum(axis=1)
        score = valid
        if tol is not None and c > kk:
            dv = np.where(valid, dist.astype(np.float64), -np.inf)
            dkk = -np.partition(-dv, kk - 1, axis=1)[:, kk - 1]  # kk-th largest valid faiss value (-inf if short)
            score = valid & (dv >= (dkk - 2.0 * tol)[:, None])
        elif tol is None and c > self.rerank_factor * kk:
            # approximate scores: re-rank the best rerank_factor * kk valid candidates (more only on exact ties)
            nk = self.rerank_factor * kk
            dv = np.where(valid, dist.astype(np.float64), -np.inf)
            dth = -np.partition(-dv, nk - 1, axis=1)[:, nk - 1]
            score = valid & (dv >= dth[:, None])
        rr, cc = np.nonzero(score)
        flat = cand[rr, cc]
        vals = np.empty(rr.size)
        q64 = q.astype(np.float64)
        base = self._base
        step = max(1, _RERANK_BUDGET // self.d_)

        def part(s: int) -> None:
            e = min(s + step, rr.size)
            # float32 x float32 products are exact in float64; the sum's float64 rounding (~d 2^-53) is far below
            # the float32 rounding of the returned value
            vals[s:e] = np.einsum("ij,ij->i", np.take(base, flat[s:e], axis=0).astype(np.float64), q64[rr[s:e]])

        starts = range(0, rr.size, step)
        # gathers and einsum release the GIL: the parts run on all cores, once there are enough of them to pay for
        # the hand-off (just after faiss, its OpenMP threads still spin on the cores for a few ms)
        workers = min(_threads(), len(starts)) if len(starts) >= _THREADED_PARTS else 1
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(part, starts))
        else:
            for s in starts:
                part(s)
        vals32 = np.zeros((r, c), dtype=np.float32)  # entries not scored are masked out by `score` below
        vals32[rr, cc] = vals.astype(np.float32)
        top_s, top_i = _topk_by_key(vals32, cand, score, kk)
        return top_s, top_i, nvalid

    def _dense(self, q: np.ndarray, codes: np.ndarray | None, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocked float64 brute force over the whole base (huge own groups, massive ties)."""
        r, n = q.shape[0], self.n_
        out_s = np.empty((r, kk))
        out_i = np.empty((r, kk), dtype=np.int64)
        rows_step, col_step = 256, 8192  # float64 / int64 temporaries of 16 MiB
        for s in range(0, r, rows_step):
            qb = q[s : s + rows_step].astype(np.float64)
            best_s = np.full((qb.shape[0], kk), -np.inf)
            best_i = np.full((qb.shape[0], kk), -1, dtype=np.int64)
            for c0 in range(0, n, col_step):
                c1 = min(n, c0 + col_step)
                blk = qb @ self._base[c0:c1].astype(np.float64).T  # (rows, cols)
                blk = blk.astype(np.float32).astype(np.float64)  # ties are defined on the returned float32 values
                if codes is not None:
                    assert self._base_codes is not None
                    blk[self._base_codes[c0:c1][None, :] == codes[s : s + rows_step, None]] = -np.inf
                ids = np.broadcast_to(np.arange(c0, c1, dtype=np.int64), blk.shape)
                # earlier blocks hold lower indices, so [best, block] keeps equal values in index order
                best_s, best_i = _select_topk(
                    np.concatenate([best_s, blk], axis=1), np.concatenate([best_i, ids], axis=1), kk
                )
            out_s[s : s + rows_step], out_i[s : s + rows_step] = best_s, best_i
        return out_s, out_i


def knn(
    query: np.ndarray,
    base: np.ndarray,
    k: int,
    *,
    metric: str = "cosine",
    query_groups: np.ndarray | None = None,
    base_groups: np.ndarray | None = None,
    exact: bool | None = None,
    device: str = "auto",
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k most similar base rows for every query row.

    Parameters
    ----------
    query : (m, d) array
        Query vectors (float64 / integer input is converted to float32).
    base : (n, d) array
        Base vectors; must not be empty.
    k : int
        Neighbours wanted (>= 1); ``kk = min(k, n)`` columns are returned.
    metric : {"cosine", "ip"}
        ``"cosine"`` L2-normalises rows internally (zero rows raise :class:`IndexInputError`); ``"ip"`` is the
        plain inner product of the inputs as given.
    query_groups, base_groups : (m,) and (n,) arrays of hashables, optional
        Give both to exclude, for every query row, the base rows of its own group (leave-one-subject-out).
    exact : bool or None
        ``None``: exact search unless ``m * n >= APPROX_MIN_PAIRS``, ``n >= APPROX_MIN_BASE`` and
        ``m >= APPROX_MIN_QUERIES`` (then an IVF-SQ8 index proposes candidates and the best ``4 k`` are re-ranked
        exactly); ``True``/``False`` force it.
    device : str
        ``"auto"`` (GPU faiss if faiss-gpu and a CUDA GPU are present, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"``.
    chunk_size : int
        Queries processed at once; memory stays below ``chunk_size x n`` similarities.

    Returns
    -------
    sims : (m, kk) float32
        Similarities sorted descending; ``-inf`` where a row has fewer than ``kk`` valid neighbours.
    idx : (m, kk) int64
        Base row indices; ``-1`` padding; equal similarities are ordered by lower base index.

    Raises
    ------
    IndexInputError
        Empty base, non-2-D input, dimension mismatch, NaN/Inf, ``k < 1``, zero rows under cosine, group arrays of
        the wrong length or given on one side only, unknown metric or device.
    DeviceUnavailableError
        ``device="cuda"`` without faiss-gpu or a CUDA GPU.
    """
    if (query_groups is None) != (base_groups is None):
        given = "query_groups" if query_groups is not None else "base_groups"
        raise IndexInputError(
            f"only {given} was given; pass both query_groups and base_groups to exclude same-group neighbours, "
            "or neither."
        )
    _check_metric(metric)
    _check_int(k, "k")
    index = NeighbourIndex(metric=metric, exact=exact, device=device, chunk_size=chunk_size)
    index.fit(base, groups=base_groups)
    return index.search(query, k, groups=query_groups)
