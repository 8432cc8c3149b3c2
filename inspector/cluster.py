"""Running an audit past one machine, on Dask distributed.

The two stages whose cost grows with the study are spread over the workers of a cluster:

- **extraction** (:func:`inspector.features.extract` with ``executor=``): each view's slices are cut into parts
  of whole extractor batches; every worker holds one copy of the (fitted) extractor and extracts its parts;
- **matching** (:class:`inspector.matching.MemorizationScorer` with ``executor``): the queries (synthetic,
  holdout, the volume null) are cut into parts of whole registration chunks; every worker holds one copy of the
  fitted scorer (whiteners, the whitened training features, the training slices) and scores its parts: search,
  descriptor shortlist, registration, neighbours.

Both cut on the boundaries the single-machine run already batches on, and every row of either stage depends only
on its own inputs, so a cluster run gives **the same numbers** as the single-machine run (tests/test_cluster.py
compares whole audits on a local two-worker cluster). One exception is documented in :func:`inspector.index.knn`:
a single machine searching ``m, n >= 20,000`` at once switches to the approximate index, where the cluster's
smaller parts search exactly.

:func:`sharded_knn` is the building block for a training base larger than one worker's memory: exact top-k over
base shards held by different workers, merged into the global top-k.

Why Dask rather than Ray (both measured by ``benchmarks/bench_engines.py`` on the 2-core development machine):
a local engine of two worker processes started in about 2 s with 164 MB in its 4 processes (Dask 2026.8) against
5-7 s and 686 MB in 10 processes (Ray 2.60), so the equivalence test runs in CI; Dask's wheels are pure Python
(Ray's is 79 MB); it sends no usage statistics (Ray's ``ray.init`` reports usage unless
``RAY_USAGE_STATS_ENABLED=0``, and patient-data tools must not phone home); and a long-running
``dask scheduler`` / ``dask worker`` pair is the whole deployment.

Addresses (``connect``):

- ``"local"`` or ``"local:N"``: a cluster of N worker processes (default: one per core, at most 8) on this machine,
  bound to 127.0.0.1, without a dashboard; closed with the :class:`Cluster`;
- ``"tcp://HOST:PORT"`` (or ``tls://``): an existing scheduler (``dask scheduler``), whose workers
  (``dask worker tcp://HOST:PORT``) run in an environment with this package installed.

Patient data leaves this process for the workers: use a cluster of your own machines inside the boundary the data
may be in, and Dask's TLS security settings between hosts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Cluster", "ClusterUnavailableError", "connect", "sharded_knn", "part_bounds"]

log = logging.getLogger(__name__)


class ClusterUnavailableError(RuntimeError):
    """Dask distributed is not installed, or the scheduler at the address cannot be reached."""


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - dask is a dependency of the test set-up
        raise ClusterUnavailableError(
            "Running on a cluster needs Dask distributed: pip install 'mri-memorization-inspector[cluster]' "
            "(or pip install dask distributed) in this environment and the workers'."
        ) from exc
    return distributed


def part_bounds(n: int, unit: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into at most ``parts`` contiguous parts whose lengths are multiples of ``unit`` (the last
    one excepted).

    Parameters
    ----------
    n : int
        Rows to cut.
    unit : int
        The batch the single-machine run works in (extractor batch, registration chunk): parts never split one.
    parts : int
        Parts wanted (e.g. twice the workers, so a slow worker does not hold the others up).

    Returns
    -------
    list of (start, stop)
    """
    if n <= 0:
        return []
    unit = max(1, int(unit))
    units = math.ceil(n / unit)
    per = max(1, math.ceil(units / max(1, int(parts))))
    step = per * unit
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class Cluster:
    """A connection to a Dask cluster that maps functions over parts of an array, in order.

    Use :func:`connect` to make one; it is a context manager (closing a ``local`` cluster stops its workers).

    Attributes
    ----------
    client : distributed.Client
    address : str
        The scheduler's address.
    """

    def __init__(self, client: Any, *, local: Any = None, address: str = "") -> None:
        self.client = client
        self._local = local
        self.address = address or str(client.scheduler.address)
        self._shared: dict[int, tuple[Any, Any]] = {}

    @property
    def n_workers(self) -> int:
        """Workers connected now (at least 1)."""
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def share(self, obj: Any) -> Any:
        """One copy of ``obj`` on every worker (a Dask future), sent once per object and reused."""
        hit = self._shared.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        # scattered inside a list: a dict given to scatter itself would be sent as one future per key, under the
        # dict's own keys, which a later dict with the same keys would collide with
        fut = self.client.scatter([obj], broadcast=True, hash=False)[0]
        self._shared[id(obj)] = (obj, fut)
        return fut

    def forget(self, obj: Any) -> None:
        """Drop the workers' copy of ``obj`` made by :meth:`share`."""
        hit = self._shared.pop(id(obj), None)
        if hit is not None:
            try:
                hit[1].release()
            except Exception:  # pragma: no cover - best effort on a closing cluster
                log.debug("could not release a shared object", exc_info=True)

    def map_parts(
        self,
        fn: Callable[..., Any],
        shared: Any,
        parts: Sequence[Any],
        *,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Any]:
        """``[fn(shared, part) for part in parts]``, run on the workers, results in the order of ``parts``.

        Parameters
        ----------
        fn : callable
            A module-level function (workers import it by name).
        shared : object
            Sent to every worker once (:meth:`share`).
        parts : sequence
            One argument per task (sent with the task).
        on_done : callable, optional
            Called with each part's position as it completes (progress).

        Raises
        ------
        Exception
            The first exception a task raised, re-raised here.
        """
        distributed = _import_distributed()
        remote = self.share(shared)
        futures = [self.client.submit(fn, remote, p, pure=False) for p in parts]
        pos = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(futures)
        try:
            for fut in distributed.as_completed(futures):
                i = pos[fut.key]
                out[i] = fut.result()
                if on_done is not None:
                    on_done(i)
        finally:
            for f in futures:
                f.release()
        return out

    def close(self) -> None:
        """Release shared objects, disconnect, and stop the workers of a ``local`` cluster."""
        for obj, _ in list(self._shared.values()):
            self.forget(obj)
        self.client.close()
        if self._local is not None:
            self._local.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cluster({self.address!r}, workers={self.n_workers})"


def connect(address: str, *, timeout: float = 30.0) -> Cluster:
    """Connect to (or start) a Dask cluster.

    Parameters
    ----------
    address : str
        ``"local"``, ``"local:N"`` (N worker processes on this machine, 127.0.0.1 only, no dashboard) or a
        scheduler address ``"tcp://HOST:PORT"`` / ``"tls://HOST:PORT"``.
    timeout : float
        Seconds to wait for the scheduler.

    Returns
    -------
    Cluster

    Raises
    ------
    ValueError
        An address of another form, or ``local:N`` with N < 1.
    ClusterUnavailableError
        Dask distributed is missing or the scheduler does not answer.
    """
    distributed = _import_distributed()
    addr = str(address).strip()
    if addr == "local" or addr.startswith("local:"):
        n_txt = addr.partition(":")[2]
        try:
            n = int(n_txt) if n_txt else min(8, os.cpu_count() or 1)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(
                f"cluster address {address!r}: use 'local', 'local:N' with N >= 1 workers, or tcp://HOST:PORT."
            )
        local = distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.WARNING,
        )
        client = distributed.Client(local, timeout=timeout)
        log.info("started a local Dask cluster of %d worker processes at %s", n, local.scheduler_address)
        return Cluster(client, local=local, address=local.scheduler_address)
    if not (addr.startswith("tcp://") or addr.startswith("tls://")):
        raise ValueError(
            f"cluster address {address!r} is not one of 'local', 'local:N', 'tcp://HOST:PORT', 'tls://HOST:PORT'. "
            "Start a scheduler with 'dask scheduler' and pass the address it prints."
        )
    try:
        client = distributed.Client(addr, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterUnavailableError(
            f"no Dask scheduler answered at {addr} within {timeout:.0f} s ({exc}). Start one with 'dask scheduler' "
            "and workers with 'dask worker ADDRESS' in an environment where this package is installed."
        ) from exc
    return Cluster(client, address=addr)


# ------------------------------------------------------------------------------------------- sharded search
def _search_shard(shared: dict[str, Any], part: tuple[int, np.ndarray, np.ndarray | None]) -> tuple[np.ndarray, ...]:
    from .index import knn

    offset, base, base_groups = part
    s, ix = knn(
        shared["query"],
        base,
        shared["k"],
        metric=shared["metric"],
        query_groups=shared["query_groups"],
        base_groups=base_groups,
        exact=True,
    )
    return s, np.where(ix >= 0, ix + offset, -1)


def sharded_knn(
    query: np.ndarray,
    base: np.ndarray,
    k: int,
    cluster: Cluster,
    *,
    metric: str = "cosine",
    n_shards: int | None = None,
    query_groups: np.ndarray | None = None,
    base_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over base shards searched on the cluster's workers, merged into the global top-k.

    Same answer as :func:`inspector.index.knn` with ``exact=True`` (ties ordered by lower base index).

    Parameters
    ----------
    query : np.ndarray, shape (m, d)
    base : np.ndarray, shape (n, d)
        Cut into ``n_shards`` contiguous shards (default: one per worker); each goes to one worker.
    k : int
    cluster : Cluster
    metric : {"cosine", "ip"}
    n_shards : int, optional
    query_groups, base_groups : np.ndarray, shape (m,) and (n,), optional
        Leave-one-group-out, as in :func:`~inspector.index.knn`.

    Returns
    -------
    sims : np.ndarray, shape (m, min(k, n)), float32
    idx : np.ndarray, shape (m, min(k, n)), int64 (``-1`` padding)
    """
    from .index import IndexInputError

    base = np.asarray(base, np.float32)
    query = np.asarray(query, np.float32)
    if base.ndim != 2 or query.ndim != 2 or base.shape[1] != query.shape[1] or base.shape[0] == 0:
        raise IndexInputError(
            "sharded_knn needs query (m, d) and a non-empty base (n, d) of the same d; "
            f"got {query.shape}, {base.shape}."
        )
    if (query_groups is None) != (base_groups is None):
        raise IndexInputError("pass both query_groups and base_groups, or neither.")
    n = base.shape[0]
    kk = min(int(k), n)
    shards = max(1, min(n, int(n_shards or cluster.n_workers)))
    bounds = part_bounds(n, 1, shards)
    bg = None if base_groups is None else np.asarray(base_groups)
    parts = [(a, base[a:b], None if bg is None else bg[a:b]) for a, b in bounds]
    shared = {
        "query": query,
        "k": kk,
        "metric": metric,
        "query_groups": None if query_groups is None else np.asarray(query_groups),
    }
    results = cluster.map_parts(_search_shard, shared, parts)
    cluster.forget(shared)
    sims = np.concatenate([r[0] for r in results], axis=1)
    idx = np.concatenate([r[1] for r in results], axis=1)
    key_s = np.where(idx >= 0, sims, -np.inf)
    # best similarity first, equal similarities by lower base index (as knn orders them); padding last
    order = np.lexsort((np.where(idx >= 0, idx, np.iinfo(np.int64).max), -key_s), axis=1)[:, :kk]
    return np.take_along_axis(sims, order, 1).astype(np.float32), np.take_along_axis(idx, order, 1)
