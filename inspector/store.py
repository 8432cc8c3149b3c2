"""The slice store: a cohort's slices in one memory-mapped array on disk, content-addressed and reused.

After loading, :func:`to_store` writes every slice of a cohort (all of one shape: the audit's loading size) into
one ``.npy`` file under ``<cache>/slices/`` and replaces each :class:`~inspector.types.Slice`'s array by a
read-only view into it; :meth:`Cohort.stack` at that size then returns the mapped array itself instead of a
copy. The stages read it in rows or chunks (extraction in batches, the matcher's candidates for registration,
the descriptors in chunks), so the slices' pages are read from disk when needed and, being file-backed, can be
dropped by the kernel under memory pressure instead of being swapped: the process holds the slices once, not
once per stage, and never as anonymous memory that must stay resident.

The file name is a sha256 over the cohort's content hash (every slice's raw-pixel hash, path and index), the
shape and :data:`STORE_VERSION`, so a second audit of the same data reuses the file (warm). A file that does not
match its key's shape is treated as a miss and rewritten. The store lives beside the embedding cache and holds
patient pixels: it is created with owner-only permissions (0600), and ``use_cache=False`` keeps every slice in
memory as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import default_cache_dir, hash_key

if TYPE_CHECKING:  # annotations only: types imports this module (Cohort.stack releases its pages)
    from .types import Cohort

__all__ = [
    "STORE_VERSION",
    "to_store",
    "store_path",
    "resized_store",
    "stack_hash",
    "SliceSpill",
    "RowSubset",
    "release_pages",
    "release_freed_memory",
]

log = logging.getLogger(__name__)

#: Version of the store's file layout (part of the key).
STORE_VERSION = "1"
#: Rows compared at once when an existing store file is checked against the slices read.
_CHUNK = 1024


def store_path(cohort: Cohort, cache_dir: str | Path | None = None) -> Path | None:
    """Where ``cohort``'s store file is (or would be); ``None`` when its slices differ in shape."""
    shapes = {s.array.shape for s in cohort.slices}
    if len(shapes) != 1:
        return None
    shape = (len(cohort.slices), *shapes.pop())
    key = hash_key(kind="slices", content=cohort.content_hash, shape=list(shape), version=STORE_VERSION)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "slices" / f"{key}.npy"


def _valid(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("slice store %s unreadable (%s); rewriting it", path.name, e)
        return None
    if arr.shape != shape or arr.dtype != np.float32:
        log.warning(
            "slice store %s holds %s %s, expected %s float32; rewriting it", path.name, arr.shape, arr.dtype, shape
        )
        return None
    return arr


def _npy_header(fh: Any, shape: tuple[int, ...]) -> None:
    """The ``.npy`` header of a C-ordered float32 array of ``shape`` (its rows are then written as raw bytes)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(fh, header)


def to_store(cohort: Cohort, cache_dir: str | Path | None = None) -> Cohort:
    """Move ``cohort``'s slices into its store file (written once, reused after) and return the cohort.

    Parameters
    ----------
    cohort : Cohort
        Changed in place: every ``Slice.array`` becomes a read-only row view of the mapped array, shape (H, W),
        and ``cohort.store`` the mapped array, shape (n, H, W) float32. A cohort whose slices differ in shape, or
        that is empty, is returned unchanged.
    cache_dir : path, optional
        Cache root (default :func:`inspector.cache.default_cache_dir`); the file goes to ``<root>/slices/``.

    Returns
    -------
    Cohort
        The same object.
    """
    if not cohort.slices or cohort.store is not None:
        return cohort
    path = store_path(cohort, cache_dir)
    if path is None:
        log.info("cohort %r mixes slice shapes; kept in memory", cohort.name)
        return cohort
    shape = (len(cohort.slices), *cohort.slices[0].array.shape)
    # slices spilled while loading (SliceSpill) are read once more here: their pages are dropped from this
    # process's memory every chunk (they stay in the page cache), so copying them does not grow the resident set
    spilled = _mappings(cohort.slices)
    arr = _valid(path, shape) if path.exists() else None
    if arr is not None:  # content-addressed, and checked against the slices just read (a damaged file is rewritten)
        compared = [*spilled, *_mappings([arr])]
        for s in range(0, shape[0], _CHUNK):
            rows = cohort.slices[s : s + _CHUNK]
            same = np.array_equal(arr[s : s + len(rows)], np.stack([r.array for r in rows]))
            _drop_pages(compared)
            if not same:
                log.warning("slice store %s differs from the slices read; rewriting it", path.name)
                arr = None
                break
    if arr is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
        os.close(fd)
        try:
            os.chmod(tmp, 0o600)
            # plain writes, not a writable mapping: the written pages go to the page cache and are never
            # counted in this process's resident memory
            with open(tmp, "wb") as fh:
                _npy_header(fh, shape)
                for i, r in enumerate(cohort.slices):
                    fh.write(np.ascontiguousarray(r.array, np.float32).tobytes())
                    if spilled and (i + 1) % _CHUNK == 0:
                        _drop_pages(spilled)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        arr = np.load(path, mmap_mode="r")
        log.info("slice store: %d slices of %s written to %s", shape[0], shape[1:], path.name)
    else:
        log.info("slice store: %d slices reused from %s", shape[0], path.name)
    for i, s in enumerate(cohort.slices):
        object.__setattr__(s, "array", arr[i])
    cohort.store = arr
    release_freed_memory()
    return cohort


def resized_store(store: np.ndarray, size: int) -> np.ndarray | None:
    """The slices of a store resized to ``size x size``, as a second memory-mapped store beside it.

    The extractor trains and reads at its own input size (64 px for ``ssl``), smaller than the store's loading
    size (128 px); resizing the whole store into memory would hold a second copy of every slice (1.6 GB at
    100,000 slices) in the process. The resized copy is written once, chunk by chunk (the parent's pages are
    released after each chunk), next to the parent file as ``<parent>-<size>px.npy`` (same key, owner-only), so
    it is content-addressed like the parent and reused by later stages and later audits. Each row equals
    :func:`inspector.preprocess.resize_square` of the parent's row.

    Parameters
    ----------
    store : np.ndarray, shape (n, H, W) float32
        A cohort's :attr:`~inspector.types.Cohort.store` (a read-only memory map of a ``.npy`` file).
    size : int
        Target side, >= 1.

    Returns
    -------
    np.ndarray or None
        The read-only mapped array, shape (n, size, size) float32; ``None`` when ``store`` is not a file-backed
        store (the caller then resizes in memory).
    """
    from .preprocess import resize_square

    name = getattr(store, "filename", None)
    if name is None or store.ndim != 3:
        return None
    size = int(size)
    if size < 1:
        raise ValueError(f"resized_store needs size >= 1; got {size}.")
    parent = Path(name)
    path = parent.with_name(f"{parent.stem}-{size}px.npy")
    shape = (int(store.shape[0]), size, size)
    arr = _valid(path, shape) if path.exists() else None
    if arr is not None:
        return arr
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    os.close(fd)
    try:
        os.chmod(tmp, 0o600)
        with open(tmp, "wb") as fh:
            _npy_header(fh, shape)
            for lo in range(0, shape[0], _CHUNK):
                part = resize_square(np.asarray(store[lo : lo + _CHUNK], np.float32), size)
                fh.write(np.ascontiguousarray(part, np.float32).tobytes())
                release_pages(store)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("slice store: %d slices resized to %d px in %s", shape[0], size, path.name)
    return np.load(path, mmap_mode="r")


def stack_hash(images: np.ndarray, chunk: int = 1024) -> str:
    """blake2b (32 bytes) over the shape and the float32 bytes of an image stack, read ``chunk`` rows at a time.

    The identity of a cohort's pixels in the cache keys (the ssl weights, the embeddings). Streamed: a
    memory-mapped store is hashed without a whole copy of its bytes (1.6 GB at 100,000 slices of 64 px), its
    pages released after each chunk; the digest is the one of the whole array's bytes at once.

    Parameters
    ----------
    images : np.ndarray, shape (n, ...)
    chunk : int
        Rows per update (>= 1).

    Returns
    -------
    str
        64 hex characters.
    """
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1 rows; got {chunk}.")
    arr = np.asanyarray(images)
    h = hashlib.blake2b(digest_size=32)
    h.update(str(tuple(arr.shape)).encode())
    if arr.ndim == 0:
        h.update(np.ascontiguousarray(arr, np.float32).tobytes())
        return h.hexdigest()
    for lo in range(0, arr.shape[0], int(chunk)):
        h.update(np.ascontiguousarray(arr[lo : lo + int(chunk)], dtype=np.float32).data)
        release_pages(arr)
    return h.hexdigest()


class SliceSpill:
    """Slices moved to disk while a cohort loads, about ``chunk`` at a time, so loading holds one chunk in memory.

    :func:`inspector.io.load_cohort` hands the slices of each volume to :meth:`add`; once ``chunk`` or more are
    pending, :meth:`flush` writes their arrays (plain writes: the page cache, not this process's memory) to one
    file under ``<root>/slices/``, maps it read-only and replaces each slice's array by a view into the mapping,
    so the in-memory arrays are freed. The file is unlinked as soon as it is mapped (POSIX keeps a mapped file's
    data until the mapping goes): nothing is left on disk after the process, even if it is killed. Where an open
    file cannot be unlinked (Windows) it is removed when the process exits. :func:`to_store` then copies the
    slices, sorted, into the content-addressed store.

    Parameters
    ----------
    root : path, optional
        Cache root (default :func:`inspector.cache.default_cache_dir`); created with owner-only files (0600).
    chunk : int
        Slices per spill file.
    """

    def __init__(self, root: str | Path | None = None, chunk: int = _CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 slice; got {chunk}.")
        base = Path(root).expanduser() if root is not None else default_cache_dir()
        self.folder = base / "slices"
        self.chunk = int(chunk)
        self.pending: list[Any] = []
        self.spilled = 0
        self.files = 0

    def add(self, slices: list[Any]) -> list[Any]:
        """Queue ``slices`` (:class:`~inspector.types.Slice`, changed in place on the next flush); returns them."""
        self.pending.extend(slices)
        if len(self.pending) >= self.chunk:
            self.flush()
        return slices

    def flush(self) -> None:
        """Write the pending slices' arrays to one mapped file and point the slices at it."""
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".spill-", suffix=".f32")
        try:
            os.chmod(tmp, 0o600)
            with os.fdopen(fd, "wb") as fh:
                for s in self.pending:
                    fh.write(np.ascontiguousarray(s.array, np.float32).tobytes())
            total = sum(int(np.prod(s.array.shape)) for s in self.pending)
            mapped = np.memmap(tmp, dtype=np.float32, mode="r", shape=(total,))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            os.unlink(tmp)  # the mapping keeps the data; no file outlives the process
        except OSError:
            import atexit

            atexit.register(lambda path=tmp: Path(path).unlink(missing_ok=True))
        at = 0
        for s in self.pending:
            shape = s.array.shape
            size = int(np.prod(shape))
            object.__setattr__(s, "array", mapped[at : at + size].reshape(shape))
            at += size
        self.spilled += len(self.pending)
        self.files += 1
        self.pending = []
        release_freed_memory()


def _mappings(arrays: Any) -> list[Any]:
    """The distinct memory maps (``mmap.mmap``) behind the arrays (or the slices' arrays) that are file views."""
    found: dict[int, Any] = {}
    for a in arrays:
        x = getattr(a, "array", a)
        while x is not None:
            mm = getattr(x, "_mmap", None)
            if mm is not None:
                found.setdefault(id(mm), mm)
                break
            x = getattr(x, "base", None)
    return list(found.values())


def _drop_pages(maps: list[Any]) -> None:
    """Drop the mapped pages of ``maps`` from this process (re-read from the page cache if touched again)."""
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    for mm in maps:
        try:
            mm.madvise(advice)
        except (AttributeError, OSError, ValueError):  # closed, or not supported here
            pass


def release_pages(*arrays: Any) -> None:
    """Drop the pages of the memory-mapped arrays among ``arrays`` from this process's resident set.

    A stage that streams over a slice store (the extraction's batches, the descriptors' chunks, the
    registration's blocks of candidates, the 3D verification's volumes) touches every page of it once; the
    kernel keeps them mapped into the process, so its resident set would grow by the whole store (64 KB per
    128 px slice: 6.4 GB at 100,000 training slices) although nothing is held. Called after each chunk, the
    pages leave the process but stay in the page cache (a later read is a minor fault, not a disk read).
    Arrays that are not file views (in-memory arrays, tensors, None) are ignored; a no-op where ``madvise``
    is unavailable.

    Parameters
    ----------
    *arrays : np.ndarray (memory maps or views of them), or anything else (ignored)
    """
    _drop_pages(_mappings(a for a in arrays if isinstance(a, np.ndarray)))


class RowSubset:
    """The rows ``rows`` of a stack (an array or a memory-mapped store, shape (n, H, W)), read when indexed.

    ``RowSubset(stack, rows)[idx]`` is ``stack[rows[idx]]``: a stage that reads a sample of a store a few rows
    at a time (the volume null's training volumes, one volume at a time) takes it without copying the whole
    sample into memory first, and each read's pages are released (:func:`release_pages`).

    Parameters
    ----------
    stack : np.ndarray, shape (n, H, W)
    rows : array of int, shape (k,)
        Rows of ``stack``, each in ``[0, n)``.
    """

    def __init__(self, stack: np.ndarray, rows: Any) -> None:
        self.stack = stack
        self.rows = np.asarray(rows, np.int64).reshape(-1)
        n = len(stack)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n):
            bad = self.rows[(self.rows < 0) | (self.rows >= n)][:5].tolist()
            raise IndexError(f"RowSubset rows {bad} are outside the stack's {n} rows; pass rows in [0, {n}).")

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(k, H, W)``."""
        return (len(self), *self.stack.shape[1:])

    def __getitem__(self, index: Any) -> np.ndarray:
        out = np.asarray(self.stack[self.rows[index]])
        release_pages(self.stack)
        return out


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps the memory of freed arrays below its mmap threshold (which rises to 32 MB as large blocks are
    freed) in its arenas; a stage that allocates and frees many such temporaries (the 3D verification, the
    slice loader) otherwise grows the process by fragmentation, not by what it holds.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
