"""The data model: one :class:`Slice` layout, enforced in one place, and the :class:`Cohort` of slices.

Every reader in :mod:`inspector.io` produces :class:`Slice` objects through :meth:`Slice.__post_init__`,
which is the only place the array layout is checked: a 2D ``float32`` array of finite values in
``[0, 1]``, C-contiguous, read-only.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Slice", "SkippedFile", "SourceFile", "Cohort", "raw_pixel_hash", "AXES", "PROGRESS_STAGES", "ProgressFn"]

#: The progress vocabulary: every stage reports ``progress("<step>[:<detail>]", done, total)`` with one of these
#: steps (the detail names the cohort, view or set); the CLI and the app label them from this table only.
PROGRESS_STAGES: dict[str, str] = {
    "loading": "Loading",
    "training": "Training the encoder",
    "extracting": "Extracting features",
    "searching": "Searching nearest neighbours",
    "aligning": "Aligning candidates",
    "scoring": "Scoring",
    "baselines": "Baselines",
}
#: ``progress(stage, done, total)``: the CLI renders it with tqdm, the app with ``st.progress``.
ProgressFn = Callable[[str, int, int], None]

#: Valid slicing axes. ``"2d"`` marks a slice read from a 2D image file.
AXES: tuple[str, ...] = ("axial", "coronal", "sagittal", "2d")


def raw_pixel_hash(raw: np.ndarray) -> str:
    """sha256 of the raw pixels of one slice, independent of memory layout.

    Parameters
    ----------
    raw : np.ndarray, shape (H, W)
        The slice as read from the file, before any intensity normalisation or resizing.

    Returns
    -------
    str
        Hex digest over dtype, shape and the C-ordered bytes.
    """
    arr = np.ascontiguousarray(raw)
    h = hashlib.sha256()
    h.update(str(arr.dtype.str).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Slice:
    """One preprocessed 2D slice and where it came from.

    Attributes
    ----------
    array : np.ndarray, shape (H, W), float32
        Intensities in ``[0, 1]`` after preprocessing (normalisation, resizing). Read-only.
    subject_id : str
        Pseudonymous subject identifier (never a raw DICOM PatientID or PatientName: for DICOM a
        keyed HMAC pseudonym, ``sub-`` + 12 hex characters, see :mod:`inspector.privacy`).
    path : str
        Source file path relative to the cohort root, POSIX separators. For a DICOM series spread
        over a folder, the folder.
    slice_index : int
        Index of the slice along ``axis`` in the source volume (0 for 2D images).
    axis : str
        One of :data:`AXES`.
    original_shape : tuple of int
        Shape of the source slice before resizing, ``(H0, W0)``.
    spacing : tuple of float
        Pixel spacing of the source slice in mm, ``(dy, dx)``; ``(1.0, 1.0)`` when unknown.
    sha256 : str
        :func:`raw_pixel_hash` of the raw source pixels of this slice.
    label : str or None
        Optional label from a manifest (e.g. a class); never used for scoring.
    sources : tuple of str
        Every file this slice was read from, relative to the cohort root (POSIX), sorted: the file
        itself; the ``.npz`` of ``file.npz:key``; every contributing file of a DICOM series (one for a
        multi-frame file). Their sizes and sha256 are in :attr:`Cohort.files`. Empty for a slice
        built by hand.
    """

    array: np.ndarray
    subject_id: str
    path: str
    slice_index: int = 0
    axis: str = "2d"
    original_shape: tuple[int, int] = (0, 0)
    spacing: tuple[float, float] = (1.0, 1.0)
    sha256: str = ""
    label: str | None = None
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 2:
            raise ValueError(
                f"Slice {self.path!r}[{self.slice_index}] must be 2D (H, W); got shape {arr.shape}. "
                "Split volumes into slices with inspector.io before building a Slice."
            )
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"Slice {self.path!r}[{self.slice_index}] is empty: shape {arr.shape}.")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(
                f"Slice {self.path!r}[{self.slice_index}] holds NaN or Inf values; "
                "preprocess it with inspector.preprocess.normalise_slice first."
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"Slice {self.path!r}[{self.slice_index}] has intensities in [{lo:.4g}, {hi:.4g}], "
                "expected [0, 1]; normalise it with inspector.preprocess.normalise_slice."
            )
        if self.axis not in AXES:
            raise ValueError(f"Slice axis {self.axis!r} is not one of {AXES}.")
        if not self.subject_id:
            raise ValueError(f"Slice {self.path!r}[{self.slice_index}] has an empty subject_id.")
        arr.setflags(write=False)
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "path", Path(self.path).as_posix())
        object.__setattr__(self, "original_shape", tuple(int(s) for s in self.original_shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if isinstance(self.sources, str):
            raise TypeError(f"Slice {self.path!r}[{self.slice_index}]: sources must be a sequence of paths, not a str.")
        object.__setattr__(self, "sources", tuple(sorted({Path(p).as_posix() for p in self.sources})))
        if not self.sha256:
            object.__setattr__(self, "sha256", raw_pixel_hash(arr))

    @property
    def key(self) -> str:
        """A human-readable unique key: ``path#slice_index``."""
        return f"{self.path}#{self.slice_index}"

    def __repr__(self) -> str:
        return (
            f"Slice(path={self.path!r}, slice_index={self.slice_index}, axis={self.axis!r}, "
            f"subject_id={self.subject_id!r}, shape={self.array.shape}, sha256={self.sha256[:12]}…)"
        )


@dataclass(frozen=True)
class SkippedFile:
    """A file (or one slice of it) that was not loaded, and why.

    Attributes
    ----------
    path : str
        Path relative to the cohort root (POSIX); ``path#index`` for a single skipped slice.
    reason : str
        Human-readable reason, e.g. ``"corrupt NIfTI: ..."`` or ``"background-only slice"``.
    missing_evidence : bool or None
        Whether the entry is missing evidence, when already judged on the real file name
        (:func:`inspector.result.is_missing_evidence` then returns it): set on the pseudonymous copies
        :mod:`inspector.naming` publishes, whose labels no longer show the name. ``None`` (default): judged
        from ``path`` and ``reason``. Not part of equality.
    """

    path: str
    reason: str
    missing_evidence: bool | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SourceFile:
    """One input file that contributed slices to a cohort, hashed when it was read.

    Attributes
    ----------
    path : str
        Path relative to the cohort root, POSIX separators (as in :attr:`Slice.sources`).
    bytes : int
        Size of the file in bytes when it was hashed.
    sha256 : str
        Hex sha256 of the file's bytes (the whole file, not only its pixels).
    """

    path: str
    bytes: int
    sha256: str


@dataclass(eq=False)
class Cohort:
    """An ordered set of slices from one root folder or manifest.

    Attributes
    ----------
    slices : list of Slice
        In a stable order (sorted paths, then slice index).
    root : Path
        The folder (or the manifest's folder) that ``Slice.path`` is relative to.
    skipped : list of SkippedFile
        Every file or slice that was not loaded, with its reason. Nothing is dropped silently.
    name : str
        A short display name (the root folder's name by default).
    files : tuple of SourceFile
        Every file that contributed at least one slice, unique and sorted by path, with the size
        and sha256 computed when it was read (:func:`inspector.io.load_cohort` fills it). Empty for
        a cohort built by hand.
    store : np.ndarray or None
        Shape (n, H, W) float32: the memory-mapped slice store holding every slice, row i = ``slices[i].array``
        (:func:`inspector.store.to_store`), or None when the slices are separate arrays in memory.
    """

    slices: list[Slice]
    root: Path
    skipped: list[SkippedFile] = field(default_factory=list)
    name: str = ""
    files: tuple[SourceFile, ...] = ()
    store: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.name:
            self.name = self.root.name or str(self.root)
        by_path: dict[str, SourceFile] = {}
        for f in self.files:
            if not isinstance(f, SourceFile):
                raise TypeError(f"Cohort {self.name!r}: files must hold SourceFile objects; got {type(f).__name__}.")
            prev = by_path.setdefault(f.path, f)
            if prev != f:
                raise ValueError(f"Cohort {self.name!r} lists {f.path!r} twice with different sizes or hashes.")
        self.files = tuple(by_path[p] for p in sorted(by_path))
        keys = [s.key for s in self.slices]
        if len(set(keys)) != len(keys):
            dup = [k for k, c in Counter(keys).items() if c > 1][:3]
            raise ValueError(f"Cohort {self.name!r} holds duplicate slice keys {dup}.")

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self) -> Iterator[Slice]:
        return iter(self.slices)

    def __getitem__(self, i: int) -> Slice:
        return self.slices[i]

    @property
    def subjects(self) -> list[str]:
        """Distinct subject IDs in first-seen order."""
        return list(dict.fromkeys(s.subject_id for s in self.slices))

    @property
    def subject_ids(self) -> np.ndarray:
        """Subject ID per slice, shape (n,), dtype object."""
        return np.array([s.subject_id for s in self.slices], dtype=object)

    @property
    def content_hash(self) -> str:
        """sha256 over the ordered slices' raw-pixel hashes, paths and indices."""
        h = hashlib.sha256()
        for s in self.slices:
            h.update(f"{s.sha256}|{s.path}|{s.slice_index}|{s.axis}\n".encode())
        return h.hexdigest()

    def stack(self, size: int | None = None) -> np.ndarray:
        """All slices as one array.

        Parameters
        ----------
        size : int, optional
            If given, each slice is resized (aspect kept, zero padded) to ``size x size``.

        Returns
        -------
        np.ndarray, shape (n, H, W), float32
            The cohort's read-only, memory-mapped :attr:`store` when it has one (the store itself at its size,
            its resized copy beside it at another: :func:`inspector.store.resized_store`); else a new array.
        """
        from .preprocess import resize_square
        from .store import release_pages

        if not self.slices:
            raise ValueError(f"Cohort {self.name!r} is empty; nothing to stack.")
        st = self.store
        if st is not None and len(st) == len(self.slices) and (size is None or st.shape[1:] == (size, size)):
            return st  # the memory-mapped store itself (read-only), not a copy
        if st is not None and len(st) == len(self.slices) and size is not None:
            from .store import resized_store

            sized = resized_store(st, int(size))  # a second mapped store at that size, written once
            if sized is not None:
                return sized
        if size is None:
            shapes = {s.array.shape for s in self.slices}
            if len(shapes) > 1:
                raise ValueError(f"Cohort {self.name!r} mixes slice shapes {sorted(shapes)[:4]}; pass size= to resize.")
            shape = shapes.pop()
        else:
            shape = (int(size), int(size))
        # filled in place, one slice at a time: no list of every slice beside the stacked copy
        out = np.empty((len(self.slices), *shape), np.float32)
        for i, s in enumerate(self.slices):
            out[i] = s.array if size is None else resize_square(s.array, size)
            if st is not None and (i + 1) % 1024 == 0:
                release_pages(st)  # the store's pages read so far leave the process (not the copy's)
        if st is not None:
            release_pages(st)
        return out

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> Cohort:
        """A new cohort holding the slices at ``indices``.

        Parameters
        ----------
        indices : sequence of int or np.ndarray, shape (k,)
            Positions of the slices to keep, in the order wanted.
        name : str, optional
            Display name of the new cohort (default: this cohort's name).

        Returns
        -------
        Cohort
            Same root, no skipped list, and only the :attr:`files` that the kept slices' ``sources``
            name.
        """
        idx = [int(i) for i in np.asarray(indices).ravel()]
        kept = [self.slices[i] for i in idx]
        used = {p for s in kept for p in s.sources}
        files = tuple(f for f in self.files if f.path in used)
        return Cohort(kept, self.root, [], name or self.name, files)

    def summary(self) -> str:
        """A readable multi-line summary: counts of slices, subjects, files and skipped files."""
        files = len({s.path for s in self.slices})
        axes = Counter(s.axis for s in self.slices)
        shapes = Counter(s.array.shape for s in self.slices)
        lines = [
            f"Cohort {self.name!r} at {self.root}",
            f"  {len(self.slices)} slices from {files} files, {len(self.subjects)} subjects",
            f"  axes: {dict(axes)}; slice shapes: {dict(shapes)}",
            f"  skipped: {len(self.skipped)}",
        ]
        for sk in self.skipped[:10]:
            lines.append(f"    - {sk.path}: {sk.reason}")
        if len(self.skipped) > 10:
            lines.append(f"    … and {len(self.skipped) - 10} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    __str__ = summary
