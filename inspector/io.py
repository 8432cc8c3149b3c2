"""Readers and cohort discovery: NIfTI, DICOM (files, multi-frame, series), PNG/TIFF/JPEG, NumPy.

:func:`load_cohort` turns a folder, a CSV manifest or a single file into a :class:`~inspector.types.Cohort`
of preprocessed 2D :class:`~inspector.types.Slice` objects. Every file that is not loaded ends up in
``Cohort.skipped`` with a reason; nothing is dropped silently and a bad file never aborts a load.

Conventions
-----------
* **Raw slice** (what :attr:`Slice.sha256` hashes, what ``original_shape`` describes): the slice in
  display orientation with the source's own values before intensity normalisation: the stored
  integers (or floats) of PNG/TIFF/JPEG/NumPy files, NIfTI values after the header's ``scl_slope``
  scaling, DICOM values after a non-identity modality rescale (``RescaleSlope``/``RescaleIntercept``
  or a Modality LUT; float64 then) and after ``MONOCHROME1`` inversion (negation). RGB images are
  converted to luminance first.
* **Normalisation** is one rule for every container: **each slice's array is normalised on its
  own** (:func:`inspector.preprocess.normalise_slice`: the slice's robust percentiles
  :attr:`PreprocessConfig.percentiles`, 0.5 and 99.5 by default, mapped to 0 and 1, then clipped),
  so a slice's array depends only on its own pixels, never on the volume around it: the same slice
  stored alone (a 16-bit or 8-bit PNG, a 2D ``.npy``) or inside a NIfTI volume, a DICOM series, a
  multi-page TIFF or a 3D array gives the same array (``tests/test_containers.py``: one real slice in
  seven containers, within 2/255; measured 0.7/255 at most, for the 8-bit PNGs). A linear
  window/level change of a slice (or a DICOM rescale) leaves its array unchanged unless the window
  clips beyond the percentiles; an 8-bit quantisation changes it by at most one step of the 8-bit
  image on the normalised scale (1/255 when the 8-bit image's range is about the slice's percentile
  range, as for a generator's [0, 1] output saved as 8-bit). The **background rule** of a volume's
  slices is decided, as before, on the volume-normalised intensities
  (:func:`inspector.preprocess.normalise_volume`, the same percentiles over the whole volume), so that
  near-empty slices at the ends of a volume (which a per-slice stretch would make look like
  foreground) are still skipped; a lone 2D image is judged on itself. A constant slice has nothing
  to normalise and is skipped (as a constant lone image is), also when the background rule is off.
  Then the square resize is applied per slice.
* **NIfTI / MGH orientation**: the image is reoriented to the closest canonical (RAS+) orientation;
  ``sagittal`` slices along voxel axis 0, ``coronal`` along axis 1, ``axial`` along axis 2. Every
  slice is shown in the radiological convention: patient right on the image left; axial and coronal
  with anterior/superior up; sagittal with superior up and anterior on the left. ``slice_index``
  counts from the left/posterior/inferior end.
* **DICOM** slices keep the acquisition plane and the stored row/column layout (the standard
  display); ``axis`` is derived from ``ImageOrientationPatient`` (``"2d"`` when unknown), and
  :attr:`LoadConfig.axis` does not reslice DICOM. Single-frame files of one series in one folder
  form a volume ordered by ``ImagePositionPatient`` projected on the slice normal (``InstanceNumber``
  as fallback); its ``Slice.path`` is the folder (``folder/series-<n>`` when a folder holds several
  series). Multi-frame files keep their frame order, one slice per frame.
* **NumPy** arrays carry no orientation: a 2D array is one image; a 3D array is a volume sliced along
  :attr:`LoadConfig.array_axis` (default the **last** axis, ``arr[:, :, k]``; use ``0`` for
  ``(n, H, W)`` stacks), each slice kept as stored (no rotation), with the nominal axis label
  ``"axial"``. Each array of an ``.npz`` is handled the same way, with path ``file.npz:key``. A
  multi-page TIFF is a volume of its pages (also labelled ``"axial"``).
* **Subjects** (unless a manifest says otherwise): one per volume file (the file stem without its
  extensions; the relative path without extension when two volume files in different folders share
  a stem), one per DICOM patient (pseudonymised ``PatientID``, else ``PatientName``, else the
  ``SeriesInstanceUID``), and for 2D image files the parent folder relative to the root (the root's
  own name for files at the root).
* **Privacy**: raw DICOM ``PatientID``/``PatientName`` never leave :func:`_dicom_subject`; only
  keyed pseudonyms do (:func:`inspector.privacy.pseudonym`: HMAC-SHA256 under a per-project secret
  key, ``"sub-"`` + 12 hex characters; the key file is :func:`inspector.privacy.key_path`, created on
  first use, overridable by :attr:`LoadConfig.pseudonym_key_file` or the environment variable
  ``INSPECTOR_PSEUDONYM_KEY_FILE``). The key is read (or created) only when a DICOM file is read.
  pydicom warnings raised while reading are swallowed and counted (their text may quote header values).
  File and folder names, and the subject IDs taken from them, stay real in a loaded :class:`Cohort`
  (ground truth and joins need them); :func:`inspector.audit` replaces them in everything it outputs
  by pseudonymous labels (:mod:`inspector.naming`) unless ``AuditConfig.show_paths``.
* **Manifests**: a row whose path lies outside the manifest's folder (absolute elsewhere, or climbing
  out with ``..``) is skipped with :data:`OUTSIDE_ROOT_REASON` unless
  :attr:`LoadConfig.allow_outside_root`.
* **Provenance**: every slice lists the files it was read from (:attr:`Slice.sources`) and the
  cohort holds each such file's size and sha256 (:attr:`Cohort.files`), hashed once, right after
  the file was read.

Readers
-------
Each format is one :class:`Reader` subclass in the registry :data:`READERS`; a file goes to the
reader whose suffix is the longest that ends its name (:func:`reader_for`), else to the first
reader whose :meth:`Reader.sniff` recognises it (DICOM's ``DICM`` preamble). To add a format, write
in this module::

    @register_reader
    class RawReader(Reader):
        name = "raw"                 # unique key in READERS
        label = "raw image"          # "corrupt or unreadable raw image file: ..."
        suffixes = (".raw16",)       # lower case; must not clash with another reader's

        def read(self, c, config, skipped):
            h, w = ...               # the header's dimensions, before decoding anything:
            check_voxel_budget((h, w), config, bytes_per_voxel=2)
            arr = ...                # (H, W) stored values of c.abs; raise _Skip(reason) to skip it
            return [_Unit(c.rel, arr[None], [0], "2d", (1.0, 1.0), "folder", c.rel)]

:data:`SUPPORTED_EXTENSIONS`, skip reasons and error messages follow the registry. A reader that
must see several files at once (DICOM series) overrides :meth:`Reader.read_group`.

Safety: what is opened, how much is read, for how long
------------------------------------------------------
* **Only regular files are opened.** FIFOs, character and block devices and sockets are skipped at
  discovery with a reason, before any reader (or sniffer) opens them, so a FIFO named ``bad.png``
  cannot block. A symlink is resolved and its *target* checked:
  a broken symlink, a symlink loop and a symlink to a non-regular file (``bad.dcm -> /dev/urandom``)
  are skipped. **A symlink that points outside the cohort root is allowed when its target is a
  regular file** (data sets are often assembled from links into a shared store); its path in the
  cohort stays the link's path. Hashing re-checks the opened file (``fstat``), so a file swapped
  for a FIFO after discovery cannot block either.
* **Per-file budgets, checked before decoding.** :attr:`LoadConfig.max_file_bytes` (default 2 GiB)
  bounds the size of a file on disk *and* the decoded size its header declares (voxels times bytes
  per voxel, which matters for compressed files: ``.nii.gz``, ``.npz``, compressed DICOM);
  :attr:`LoadConfig.max_voxels` (default 512 Mi voxels) bounds the voxels its header declares:
  the NIfTI/MGH header shape (the one 3D volume read of a 4D image), PNG/JPEG/TIFF dimensions
  (Pillow's or tifffile's header, nothing decoded; Pillow's decompression-bomb limit
  ``Image.MAX_IMAGE_PIXELS`` is set to the same budget), DICOM ``Rows x Columns x NumberOfFrames``,
  the ``.npy`` header's shape and dtype (:mod:`numpy.lib.format`), and for ``.npz`` each member's
  declared shape and its decompressed size from the zip directory (a 3 MB archive that expands to
  3 GB is skipped without inflating it). A file over a budget is skipped; its reason names the
  budget and how to raise it. A reader added with :func:`register_reader` gets the byte budget for
  free and can call :func:`check_voxel_budget` before it decodes.
* **Per-file timeout.** Each file's read runs in a worker thread with a deadline of
  :attr:`LoadConfig.file_timeout_s` (default 60 s; ``None`` reads in the calling thread without a
  deadline). A read past its deadline is skipped with a reason and abandoned (Python cannot kill a
  thread: the daemon thread finishes or dies with the process, its result is discarded). The
  thread approach works from any thread (the Streamlit app reads outside the main thread, where
  ``signal.alarm`` is unavailable) and also bounds blocking system calls. For DICOM, reading the
  header and decoding the pixels of each file each have this deadline.
* **A bad file never aborts the load**: any exception while reading or preprocessing one file (or
  one DICOM series) becomes a :class:`~inspector.types.SkippedFile` with its reason. Only a
  programming error of a reader (sources outside its candidates) and an unusable pseudonym key
  file (:class:`inspector.privacy.PseudonymKeyError`, a configuration error) are raised.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import stat
import sys
import threading
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from .preprocess import (
    ConstantImageError,
    PreprocessConfig,
    is_background,
    normalise_slice,
    normalise_volume,
    resize_square,
)
from .privacy import load_or_create_key, pseudonym
from .types import Cohort, SkippedFile, Slice, SourceFile, raw_pixel_hash

if TYPE_CHECKING:
    from .store import SliceSpill

__all__ = [
    "LoadConfig",
    "load_cohort",
    "read_labels",
    "pseudonymise",
    "check_voxel_budget",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_VOXELS",
    "DEFAULT_FILE_TIMEOUT_S",
    "CohortNotFoundError",
    "NoImagesError",
    "ManifestError",
    "LoadWarning",
    "SUPPORTED_EXTENSIONS",
    "IGNORED_NAMES",
    "Reader",
    "READERS",
    "register_reader",
    "unregister_reader",
    "reader_for",
    "NiftiReader",
    "DicomReader",
    "ImageReader",
    "TiffReader",
    "NpyReader",
    "NpzReader",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

ProgressCallback = Callable[[str, int, int], None]
#: ``tick(k)``: ``k`` more candidate files are done (drives :data:`ProgressCallback`).
TickCallback = Callable[[int], None]

#: File extensions :func:`load_cohort` reads, in registration order (DICOM files may also have no
#: extension). Derived from :data:`READERS`; rebound by :func:`register_reader`/:func:`unregister_reader`.
SUPPORTED_EXTENSIONS: tuple[str, ...] = ()
#: File names that are never images (the sample data's ground truth and manifests); hidden files too.
IGNORED_NAMES: frozenset[str] = frozenset({"labels.csv", "manifest.csv"})

#: Default per-file byte budget (:attr:`LoadConfig.max_file_bytes`): 2 GiB on disk or decoded.
DEFAULT_MAX_FILE_BYTES: int = 2 * 1024**3
#: Default per-file voxel budget (:attr:`LoadConfig.max_voxels`): 512 Mi voxels (a 256^3 MRI is 16 Mi).
DEFAULT_MAX_VOXELS: int = 512 * 1024**2
#: Default per-file read deadline in seconds (:attr:`LoadConfig.file_timeout_s`).
DEFAULT_FILE_TIMEOUT_S: float = 60.0

_VOLUME_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
_LABEL_VALUES = frozenset({"copy", "novel"})


# ----------------------------------------------------------------------------------------------
# Public configuration, errors, helpers
# ----------------------------------------------------------------------------------------------


class CohortNotFoundError(FileNotFoundError):
    """The cohort path (folder, manifest or file) does not exist."""


class NoImagesError(ValueError):
    """A folder or manifest yielded no readable image.

    Attributes
    ----------
    skipped : list of SkippedFile
        Every file that was found but not loaded, with its reason.
    """

    def __init__(self, message: str, skipped: Sequence[SkippedFile] = ()) -> None:
        super().__init__(message)
        self.skipped = list(skipped)


class ManifestError(ValueError):
    """A CSV manifest is malformed (missing columns, unreadable)."""


class LoadWarning(UserWarning):
    """A recoverable fallback while reading (4D volume reduced to one volume, colour to grey...)."""


@dataclass(frozen=True)
class LoadConfig:
    """How files become slices. Frozen and hashable, so it can be part of cache keys.

    Attributes
    ----------
    axis : str
        Slicing axis for NIfTI/MGH volumes: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    volume_index : int
        Which volume of a 4D NIfTI to read (a warning names the file).
    preprocess : PreprocessConfig
        Percentiles, square output ``size`` and the background rule.
    slice_step : int
        Keep every ``slice_step``-th slice of a volume (indices 0, step, 2*step, ...). Normalisation
        still uses the whole volume.
    array_axis : int
        Axis of 3D NumPy arrays along which slices are taken (default ``-1``, the last axis).
    max_file_bytes : int
        Per-file byte budget (default :data:`DEFAULT_MAX_FILE_BYTES`, 2 GiB): a file larger than
        this on disk, or whose header declares more decoded bytes (voxels x bytes per voxel, e.g.
        a ``.npz`` member's decompressed size), is skipped before it is decoded.
    max_voxels : int
        Per-file pixel budget (default :data:`DEFAULT_MAX_VOXELS`, 512 Mi voxels): a file whose
        header declares more voxels (pixels x frames/slices) is skipped before it is decoded.
    file_timeout_s : float or None
        Per-file read deadline in seconds (default :data:`DEFAULT_FILE_TIMEOUT_S`, 60 s); a read
        past it is skipped. ``None`` disables the deadline (the read runs in the calling thread).
    pseudonym_key_file : str or None
        The secret key file of DICOM subject pseudonyms (HMAC-SHA256); ``None`` (default) uses
        :func:`inspector.privacy.key_path`: ``$INSPECTOR_PSEUDONYM_KEY_FILE``, else
        ``<user config dir>/mri-memorization-inspector/pseudonym.key``. Created (mode 0600) on
        first use. The same key gives the same pseudonyms; share it deliberately to link sites.
    allow_outside_root : bool
        Read CSV manifest rows whose path lies outside the manifest's folder: an absolute path
        elsewhere, or a relative one that climbs out with ``..``. Off by default: such a row is
        skipped with the reason :data:`OUTSIDE_ROOT_REASON` (missing evidence, see
        :func:`inspector.result.is_missing_evidence`). The check is on the path as written
        (normalised, symlinks not followed); a symlink inside the folder is judged as in a folder
        scan (allowed when its target is a regular file).
    """

    axis: str = "axial"
    volume_index: int = 0
    preprocess: PreprocessConfig = PreprocessConfig()
    slice_step: int = 1
    array_axis: int = -1
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_voxels: int = DEFAULT_MAX_VOXELS
    file_timeout_s: float | None = DEFAULT_FILE_TIMEOUT_S
    pseudonym_key_file: str | None = None
    allow_outside_root: bool = False

    def __post_init__(self) -> None:
        if self.axis not in _VOLUME_AXES:
            raise ValueError(f"LoadConfig.axis must be one of {sorted(_VOLUME_AXES)}; got {self.axis!r}.")
        if self.volume_index < 0:
            raise ValueError(f"LoadConfig.volume_index must be >= 0; got {self.volume_index}.")
        if self.slice_step < 1:
            raise ValueError(f"LoadConfig.slice_step must be >= 1; got {self.slice_step}.")
        if self.array_axis not in (-3, -2, -1, 0, 1, 2):
            raise ValueError(f"LoadConfig.array_axis must be in -3..2; got {self.array_axis}.")
        if not isinstance(self.preprocess, PreprocessConfig):
            raise TypeError(f"LoadConfig.preprocess must be a PreprocessConfig; got {type(self.preprocess)}.")
        for name, default in (("max_file_bytes", DEFAULT_MAX_FILE_BYTES), ("max_voxels", DEFAULT_MAX_VOXELS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(
                    f"LoadConfig.{name} must be a positive integer (default {default:_}); "
                    f"got {type(value).__name__} {value!r}."
                )
            if value < 1:
                raise ValueError(f"LoadConfig.{name} must be a positive integer (default {default:_}); got {value}.")
            object.__setattr__(self, name, int(value))
        t = self.file_timeout_s
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int | float | np.integer | np.floating):
                raise TypeError(
                    f"LoadConfig.file_timeout_s must be a number of seconds > 0 or None (no deadline); "
                    f"got {type(t).__name__} {t!r}."
                )
            if not (math.isfinite(float(t)) and float(t) > 0):
                raise ValueError(
                    "LoadConfig.file_timeout_s must be a finite number of seconds > 0, or None for no deadline; "
                    f"got {t}."
                )
            object.__setattr__(self, "file_timeout_s", float(t))
        kf = self.pseudonym_key_file
        if kf is not None:
            if not isinstance(kf, str | os.PathLike) or not os.fspath(kf):
                raise TypeError(
                    "LoadConfig.pseudonym_key_file must be a path (str or PathLike) or None for the default "
                    f"key file; got {kf!r}."
                )
            object.__setattr__(self, "pseudonym_key_file", os.fspath(kf))


#: A stable pseudonymous subject ID for a raw identifier: the keyed HMAC of :func:`inspector.privacy.pseudonym`
#: (``"sub-"`` + 12 hex characters), under the project's key (:func:`inspector.privacy.load_or_create_key`).
pseudonymise = pseudonym


def read_labels(folder_or_csv: str | Path) -> Any:
    """Read the ground-truth ``labels.csv`` of a (sample) synthetic set, if there is one.

    Parameters
    ----------
    folder_or_csv : str or Path
        A folder (``labels.csv`` inside it is read) or the CSV file itself.

    Returns
    -------
    pandas.DataFrame or None
        Columns ``path, label, source, augmentation`` (``source`` and ``augmentation`` only when
        present in the file), ``path`` in POSIX form, ``label`` in ``{"copy", "novel"}``; ``None`` when
        the folder holds no ``labels.csv``.

    Raises
    ------
    CohortNotFoundError
        If ``folder_or_csv`` does not exist.
    ValueError
        If the file lacks the ``path``/``label`` columns or holds other labels than copy/novel.
    """
    import pandas as pd

    p = Path(folder_or_csv).expanduser()
    if not p.exists():
        raise CohortNotFoundError(f"{p} does not exist; expected a folder holding labels.csv or the CSV itself.")
    csv = p / "labels.csv" if p.is_dir() else p
    if not csv.is_file():
        log.debug("no labels.csv in %s", p)
        return None
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:
        raise ValueError(f"Could not read labels file {csv}: {type(e).__name__}: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ValueError(
            f"Labels file {csv} lacks column(s) {missing}; found {list(df.columns)}. "
            "Expected columns: path,label,source,augmentation."
        )
    df["path"] = [Path(s.strip()).as_posix() for s in df["path"]]
    df["label"] = df["label"].str.strip().str.lower()
    bad = sorted(set(df["label"]) - _LABEL_VALUES)
    if bad:
        raise ValueError(f"Labels file {csv} holds label(s) {bad[:5]}; expected one of {sorted(_LABEL_VALUES)}.")
    return df


# ----------------------------------------------------------------------------------------------
# Internal data structures
# ----------------------------------------------------------------------------------------------


class _Skip(Exception):
    """Internal: a file (or part of it) cannot be loaded; the message is the reason."""


@dataclass(frozen=True)
class _Override:
    """Manifest values for one row: subject and label (None = use the default)."""

    subject_id: str | None = None
    label: str | None = None


@dataclass
class _Candidate:
    """One file found by discovery: absolute path (the file that is opened), path relative to the
    root, the reader that claimed it (``sniffed``: by content, not by suffix) and manifest values."""

    abs: Path
    rel: str
    reader: Reader
    override: _Override | None = None
    sniffed: bool = False


@dataclass
class _Unit:
    """One volume or 2D image, in display orientation, before normalisation.

    ``raw`` is a sequence of n 2D arrays (a 3D array (n, H, W) or a list); ``indices`` the slice index
    of each. ``subject_rule`` is ``"stem"``, ``"folder"``, ``"npz"`` or ``"fixed"`` (``subject_id``
    already set). ``sources`` are the relative paths of the candidate files it was read from;
    empty means ``(file_rel,)`` (filled in by the reader machinery, which hashes each of them).
    """

    path: str
    raw: Any
    indices: list[int]
    axis: str
    spacing: tuple[float, float]
    subject_rule: str
    file_rel: str
    subject_id: str = ""
    override: _Override | None = None
    sources: tuple[str, ...] = ()


_local = threading.local()


def _warn(message: str) -> None:
    """``warnings.warn`` pointing at the first caller outside this module (the user's call).

    In a read worker (:func:`_call_with_deadline`) the message is collected instead and warned by
    the calling thread once the read is done, so it points at the user's call and a read abandoned
    after its deadline warns nothing.
    """
    pending = getattr(_local, "pending", None)
    if pending is not None:
        pending.append(message)
        return
    level = 1
    frame = sys._getframe(0)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
        level += 1
    warnings.warn(message, LoadWarning, stacklevel=level)


class _Timeout(Exception):
    """Internal: a read ran past :attr:`LoadConfig.file_timeout_s`; the message is the reason."""


def _call_with_deadline(fn: Callable[[], _T], timeout_s: float | None, what: str = "reading the file") -> _T:
    """Run ``fn()`` in a daemon worker thread and wait at most ``timeout_s`` seconds for it.

    ``None`` (or a call from inside a worker) runs ``fn`` in the calling thread. On expiry
    :class:`_Timeout` is raised and the worker is abandoned: it keeps running until ``fn`` returns
    (or the process exits) and its result, warnings and exceptions are discarded. Exceptions of
    ``fn`` are re-raised in the caller; :func:`_warn` messages of ``fn`` are warned by the caller.
    """
    if timeout_s is None or getattr(_local, "pending", None) is not None:
        return fn()
    box: dict[str, Any] = {}
    pending: list[str] = []
    done = threading.Event()

    def work() -> None:
        _local.pending = pending
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller, which decides
            box["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=work, name="inspector-reader", daemon=True)
    worker.start()
    if not done.wait(timeout_s):  # the caller logs the skip with the file's name
        raise _Timeout(
            f"{what} took longer than the per-file timeout of {timeout_s:g} s (LoadConfig.file_timeout_s); "
            "skipped. If the file is merely large or on a slow disk, raise it, e.g. "
            f"LoadConfig(file_timeout_s={max(2 * timeout_s, 120):g})"
        )
    error = box.get("error")
    if error is not None:
        raise error
    for message in pending:
        _warn(message)
    return box["value"]


_BUDGET_HINT = {
    "max_file_bytes": "the per-file byte budget LoadConfig.max_file_bytes",
    "max_voxels": "the per-file pixel budget LoadConfig.max_voxels",
}


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _over_budget(field: str, found: str, budget: int, needed: int) -> _Skip:
    """The skip for a file over one budget; the reason names the budget and how to raise it."""
    shown = _human_bytes(budget) if field == "max_file_bytes" else f"{budget:_}"
    suggest = 1 << max(0, int(needed) - 1).bit_length()
    return _Skip(
        f"over {_BUDGET_HINT[field]} = {shown}: {found}; skipped before decoding. To read it, raise the "
        f"budget, e.g. LoadConfig({field}={suggest:_})"
    )


def _check_file_bytes(size: int, config: LoadConfig) -> None:
    if size > config.max_file_bytes:
        raise _over_budget(
            "max_file_bytes", f"the file is {_human_bytes(size)} ({size:_} bytes)", config.max_file_bytes, size
        )


def check_voxel_budget(
    shape: Sequence[int], config: LoadConfig, *, bytes_per_voxel: int = 0, what: str = "image"
) -> None:
    """Check a shape declared by a file's header against the per-file budgets, before decoding.

    For readers added with :func:`register_reader`: call it with the header's shape, then decode.

    Parameters
    ----------
    shape : sequence of int
        Declared dimensions (pixels, slices, frames; not colour samples). Negative values are
        refused as corrupt.
    config : LoadConfig
        ``max_voxels`` bounds the product of ``shape``; ``max_file_bytes`` bounds it times
        ``bytes_per_voxel`` (the decoded size; ``0`` skips that check).
    bytes_per_voxel : int
        Decoded bytes of one voxel, all samples included (e.g. 3 for 8-bit RGB).
    what : str
        Named in the reason (``"image"``, ``"volume"``, ``"array"``...).

    Raises
    ------
    _Skip
        Over a budget (the reason names it and how to raise it) or a negative dimension; the file
        is recorded in ``Cohort.skipped``.
    """
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise _Skip(f"corrupt header: negative dimension in the declared {what} shape {dims}")
    voxels = math.prod(dims)
    if voxels > config.max_voxels:
        raise _over_budget(
            "max_voxels", f"the header declares {what} shape {dims} = {voxels:_} voxels", config.max_voxels, voxels
        )
    nbytes = voxels * int(bytes_per_voxel)
    if nbytes > config.max_file_bytes:
        raise _over_budget(
            "max_file_bytes",
            f"the header declares {what} shape {dims} = {_human_bytes(nbytes)} decoded",
            config.max_file_bytes,
            nbytes,
        )


_KIND_NAMES = (
    (stat.S_ISFIFO, "a FIFO, i.e. a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _kind(mode: int) -> str:
    for test, name in _KIND_NAMES:
        if test(mode):
            return name
    return "not a regular file"


def _file_problem(path: Path) -> str | None:
    """Why ``path`` must not be opened (not a regular file, broken symlink...), or ``None``.

    Never opens the file: ``lstat`` and ``stat`` only. A symlink is judged by its resolved target;
    a target outside the cohort root is fine when it is a regular file.
    """
    try:
        lst = os.lstat(path)
    except OSError as e:
        return f"cannot inspect the file: {type(e).__name__}: {e.strerror or e}"
    link = stat.S_ISLNK(lst.st_mode)
    try:
        st = os.stat(path)
    except OSError as e:
        if link and e.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links); not read"
        if link and isinstance(e, FileNotFoundError):
            return "broken symlink (its target does not exist); not read"
        return f"cannot inspect the file: {type(e).__name__}: {e.strerror or e}"
    if stat.S_ISREG(st.st_mode):
        return None
    if link:
        return f"symlink to {_kind(st.st_mode)}, not a regular file; only regular files are read"
    return f"not a regular file ({_kind(st.st_mode)}); only regular files are read"


# ----------------------------------------------------------------------------------------------
# Reader registry
# ----------------------------------------------------------------------------------------------


class Reader(ABC):
    """One input format: which files it claims and how a file becomes volumes or 2D images.

    Subclass it, set the three class attributes, implement :meth:`read` and decorate the class with
    :func:`register_reader`; :func:`load_cohort` then reads the format (see the module notes).
    A registered reader is one instance, shared by every load.

    Attributes
    ----------
    name : str
        Unique short key in :data:`READERS`, e.g. ``"nifti"``.
    label : str
        Human name of the format in skip reasons, e.g. ``"NIfTI/MGH"`` gives
        ``"corrupt or unreadable NIfTI/MGH file: ..."``.
    suffixes : tuple of str
        Lower-case name endings the reader claims, e.g. ``(".nii.gz", ".nii")``; matched
        case-insensitively, the longest registered suffix wins (:func:`reader_for`).
    sniff_hint : str
        What :meth:`sniff` looks for, named in the skip reason of an unrecognised file without
        extension (``"DICOM preamble"`` gives ``"no extension, no DICOM preamble"``).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    sniff_hint: ClassVar[str] = ""

    def sniff(self, path: Path) -> bool:
        """Whether a file whose name ends in no registered suffix is in this format (default: never).

        Parameters
        ----------
        path : Path
            The file; read only its first bytes.

        Returns
        -------
        bool
        """
        return False

    @abstractmethod
    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        """Read one candidate file.

        Parameters
        ----------
        c : _Candidate
            ``c.abs`` is the file to open, ``c.rel`` its path relative to the cohort root (the
            ``path`` and ``file_rel`` of the units it gives).
        config : LoadConfig
            Slicing axis, 4D volume index, NumPy array axis...
        skipped : list of SkippedFile
            Where to record parts of the file that are skipped (e.g. one array of an archive).

        Returns
        -------
        list of _Unit
            Its volumes or 2D images, raw values in display orientation, each ``raw`` of shape
            ``(n, H, W)``.

        Raises
        ------
        _Skip
            The file is not loaded; the message is the reason recorded verbatim.
        Exception
            Any other error is recorded as ``"corrupt or unreadable <label> file: <error>"``.
        """

    def read_or_skip(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        """:meth:`read` one file; a failure becomes a :class:`SkippedFile` (and ``[]``), never an error.

        The manifest override of ``c`` is set on every unit, and ``sources`` defaults to ``(c.rel,)``.
        The read runs with the deadline :attr:`LoadConfig.file_timeout_s` (in a worker thread); a
        read past it is skipped, and what it recorded in ``skipped`` is dropped with it.
        """
        own: list[SkippedFile] = []
        try:
            units = _call_with_deadline(lambda: self.read(c, config, own), config.file_timeout_s)
        except _Timeout as e:
            skipped.append(SkippedFile(c.rel, f"reading it as {self.label}: {e}"))
            log.warning("skipped %s: %s (its read is abandoned in the background)", c.rel, e)
            return []
        except _Skip as e:
            skipped.extend(own)
            skipped.append(SkippedFile(c.rel, str(e)))
            log.info("skipped %s: %s", c.rel, e)
            return []
        except Exception as e:
            skipped.extend(own)
            skipped.append(SkippedFile(c.rel, f"corrupt or unreadable {self.label} file: {_error_text(e)}"))
            log.info("skipped %s: corrupt or unreadable %s file (%s)", c.rel, self.label, type(e).__name__)
            log.debug("traceback for %s", c.rel, exc_info=True)
            return []
        skipped.extend(own)
        units = list(units)
        for u in units:
            u.override = c.override
            if not u.sources:
                u.sources = (c.rel,)
        return units

    def read_group(
        self,
        candidates: Sequence[_Candidate],
        config: LoadConfig,
        skipped: list[SkippedFile],
        tick: TickCallback | None = None,
    ) -> Iterable[_Unit]:
        """Read every candidate this reader claimed in one load (default: each on its own, yielded as it is
        read, so the loader turns a volume into slices and drops its raw array before the next is read).

        Override it when files must be read together (a DICOM series spans files). An override
        records its own failures in ``skipped``, sets each unit's ``override`` and ``sources``
        (among ``candidates``' ``rel``), and calls ``tick(1)`` once per candidate; it may return a list
        or yield its units one at a time (less memory: only the units not yet consumed are held).

        Parameters
        ----------
        candidates : sequence of _Candidate
            In discovery order (sorted relative paths, or manifest order).
        config : LoadConfig
        skipped : list of SkippedFile
        tick : callable, optional
            Progress: ``tick(k)`` after ``k`` more candidates are done.

        Yields
        ------
        _Unit
        """
        for c in candidates:
            units = self.read_or_skip(c, config, skipped)
            if tick is not None:
                tick(1)
            yield from units

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {', '.join(self.suffixes) or 'no suffix'}>"


_R = TypeVar("_R", bound=type[Reader])
_READERS: dict[str, Reader] = {}
#: The registered readers by name, in registration order (read-only; use :func:`register_reader`).
READERS: Mapping[str, Reader] = MappingProxyType(_READERS)
_BY_SUFFIX: dict[str, Reader] = {}
_SUFFIXES_LONGEST_FIRST: list[str] = []


def _sniffs(reader: Reader) -> bool:
    return type(reader).sniff is not Reader.sniff


def _refresh_registry() -> None:
    """Rebuild the suffix index and :data:`SUPPORTED_EXTENSIONS` from :data:`READERS`."""
    global SUPPORTED_EXTENSIONS
    _BY_SUFFIX.clear()
    for r in _READERS.values():
        for suffix in r.suffixes:
            _BY_SUFFIX[suffix] = r
    _SUFFIXES_LONGEST_FIRST[:] = sorted(_BY_SUFFIX, key=len, reverse=True)
    SUPPORTED_EXTENSIONS = tuple(_BY_SUFFIX)


def _supported_text() -> str:
    """``".nii.gz, .nii, ..., DICOM without extension"`` for messages."""
    parts = list(SUPPORTED_EXTENSIONS) + [f"{r.label} without extension" for r in _READERS.values() if _sniffs(r)]
    return ", ".join(parts)


def register_reader(cls: _R) -> _R:
    """Add a :class:`Reader` subclass to :data:`READERS` (usable as a class decorator).

    Parameters
    ----------
    cls : type
        A concrete subclass of :class:`Reader` with a unique ``name``, a ``label`` and lower-case
        ``suffixes`` (or a :meth:`Reader.sniff`); it is instantiated once, without arguments.

    Returns
    -------
    type
        ``cls`` itself.

    Raises
    ------
    TypeError
        If ``cls`` is not a concrete :class:`Reader` subclass.
    ValueError
        If its attributes are malformed, its name is taken, or one of its suffixes is already
        claimed by another reader (the message names both readers).
    """
    if not (isinstance(cls, type) and issubclass(cls, Reader)):
        raise TypeError(f"register_reader expects a Reader subclass; got {cls!r}.")
    where = f"Reader {cls.__name__}"
    name, label, suffixes = cls.name, cls.label, cls.suffixes
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} needs a non-empty class attribute name (e.g. name = 'nifti').")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where} needs a non-empty class attribute label (e.g. label = 'NIfTI/MGH').")
    if not isinstance(suffixes, tuple) or not all(isinstance(x, str) for x in suffixes):
        raise ValueError(f"{where}.suffixes must be a tuple of str (e.g. ('.nii.gz', '.nii')); got {suffixes!r}.")
    bad = [x for x in suffixes if len(x) < 2 or not x.startswith(".") or x != x.lower()]
    if bad:
        raise ValueError(f"{where}.suffixes must be lower case and start with '.'; got {bad}.")
    if len(set(suffixes)) != len(suffixes):
        raise ValueError(f"{where}.suffixes lists a suffix twice: {suffixes!r}.")
    if not suffixes and cls.sniff is Reader.sniff:
        raise ValueError(f"{where} claims no file: give it suffixes or override sniff().")
    if name in _READERS:
        other = type(_READERS[name]).__name__
        raise ValueError(
            f"A reader named {name!r} is already registered ({other}); give {cls.__name__} another name, "
            f"or call unregister_reader({name!r}) first to replace it."
        )
    for suffix in suffixes:
        owner = _BY_SUFFIX.get(suffix)
        if owner is not None:
            raise ValueError(
                f"Reader {name!r} ({cls.__name__}) claims suffix {suffix!r}, which reader {owner.name!r} "
                f"({type(owner).__name__}) already reads. Remove {suffix!r} from one of them, or call "
                f"unregister_reader({owner.name!r}) first to replace that reader."
            )
    instance = cls()  # TypeError here when read() is not implemented
    _READERS[name] = instance
    _refresh_registry()
    log.debug("registered reader %r for %s", name, ", ".join(suffixes) or "sniffed files")
    return cls


def unregister_reader(name: str) -> type[Reader]:
    """Remove a reader from :data:`READERS`.

    Parameters
    ----------
    name : str
        The reader's ``name``.

    Returns
    -------
    type
        The removed reader's class (pass it to :func:`register_reader` to restore it).

    Raises
    ------
    KeyError
        If no reader of that name is registered.
    """
    if name not in _READERS:
        raise KeyError(f"No reader named {name!r} is registered; registered: {sorted(_READERS)}.")
    reader = _READERS.pop(name)
    _refresh_registry()
    log.debug("unregistered reader %r", name)
    return type(reader)


def _match(name: str) -> tuple[Reader | None, str]:
    """Reader and matched suffix for a file name (``None`` and the last extension when unknown)."""
    low = name.lower()
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if low.endswith(suffix) and len(low) > len(suffix):
            return _BY_SUFFIX[suffix], suffix
    return None, "".join(Path(name).suffixes[-1:])


def reader_for(filename: str | os.PathLike[str]) -> Reader | None:
    """The registered reader for a file name, by suffix (case-insensitive, longest suffix wins).

    Parameters
    ----------
    filename : str or PathLike
        A file name or path; only its last component is matched.

    Returns
    -------
    Reader or None
        ``None`` when no registered suffix ends the name (such a file may still be recognised by
        a reader's :meth:`Reader.sniff`, e.g. DICOM without extension).
    """
    return _match(Path(filename).name)[0]


def _strip_ext(rel: str) -> str:
    reader, ext = _match(rel)
    if reader is not None:
        return rel[: -len(ext)]
    return rel


def _no_tick(k: int) -> None:
    """A :data:`TickCallback` that reports nothing."""


def _hash_file(path: Path, rel: str) -> SourceFile:
    """Size and streamed sha256 of one file (the one the reader opened).

    Opened non-blocking and checked with ``fstat``: a file replaced by a FIFO or a device after it
    was read raises :class:`OSError` instead of blocking or reading without end.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file any more ({_kind(st.st_mode)})")
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return SourceFile(rel, int(st.st_size), digest)


def _error_text(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a library exception, shortened (a message may quote a whole header)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_dicm_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def _finite_spacing(values: Sequence[Any]) -> tuple[float, float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = 1.0
        out.append(f if np.isfinite(f) and f > 0 else 1.0)
    return out[0], out[1]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luminance of an (..., 3+) array, float64."""
    c = np.asarray(rgb, dtype=np.float64)
    return c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114


def _check_numeric(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise _Skip(f"unsupported {what} dtype {arr.dtype} (expected integer or float intensities)")
    if arr.size == 0 or 0 in arr.shape:
        raise _Skip(f"zero-size {what} (shape {tuple(arr.shape)})")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f" and arr.dtype.itemsize >= 8:  # float32 ranges always fit in float64
        with np.errstate(all="ignore"):
            finite = np.isfinite(arr)
            hi = float(np.max(arr, where=finite, initial=-np.inf))
            lo = float(np.min(arr, where=finite, initial=np.inf))
        if np.isfinite(lo) and np.isfinite(hi) and not np.isfinite(hi - lo):
            raise _Skip(
                f"{what} values span [{lo:.3g}, {hi:.3g}], wider than float64 can normalise (max - min overflows); "
                "not intensities"
            )
    return arr


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------


def _sniff(path: Path) -> Reader | None:
    """The first registered reader whose :meth:`Reader.sniff` recognises the file."""
    for r in list(_READERS.values()):
        if not _sniffs(r):
            continue
        try:
            if r.sniff(path):
                return r
        except Exception as e:  # a faulty sniffer must not abort the load
            log.debug("reader %r failed to sniff %s: %s: %s", r.name, path, type(e).__name__, e)
    return None


def _classify(path: Path, rel: str, skipped: list[SkippedFile], override: _Override | None) -> _Candidate | None:
    problem = _file_problem(path)  # before any reader or sniffer opens it
    if problem is not None:
        skipped.append(SkippedFile(rel, problem))
        log.info("skipped %s: %s", rel, problem)
        return None
    reader, ext = _match(path.name)
    if reader is not None:
        return _Candidate(path, rel, reader, override)
    reader = _sniff(path)
    if reader is not None:
        return _Candidate(path, rel, reader, override, sniffed=True)
    if ext:
        what = f"({ext})"
    else:
        hints = [r.sniff_hint for r in _READERS.values() if _sniffs(r) and r.sniff_hint]
        what = "(" + ", ".join(["no extension", *(f"no {h}" for h in hints)]) + ")"
    skipped.append(SkippedFile(rel, f"unsupported format {what}; supported: {_supported_text()}"))
    log.info("skipped %s: unsupported format %s", rel, what)
    return None


def _walk(folder: Path) -> list[Path]:
    """All non-hidden, non-ignored files under ``folder``, sorted, following symlinks without cycles."""
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        hidden = [d for d in dirnames if d.startswith(".")]
        for d in hidden:
            log.debug("ignoring hidden folder %s", os.path.join(dirpath, d))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                log.debug("ignoring hidden file %s", os.path.join(dirpath, fn))
            elif fn.lower() in IGNORED_NAMES:
                log.debug("ignoring %s (never an image)", os.path.join(dirpath, fn))
            else:
                out.append(Path(dirpath) / fn)
    return sorted(out, key=lambda p: p.as_posix())


def _discover_folder(
    folder: Path, root: Path, skipped: list[SkippedFile], override: _Override | None = None
) -> list[_Candidate]:
    cands = []
    for p in _walk(folder):
        c = _classify(p, _rel(p, root), skipped, override)
        if c is not None:
            cands.append(c)
    return cands


#: Start of the skip reason of a manifest row whose path lies outside the manifest's folder.
OUTSIDE_ROOT_REASON = (
    "outside the manifest's folder (an absolute path elsewhere or a path climbing out with ..; "
    "LoadConfig.allow_outside_root / --allow-outside-root reads it): listed in manifest"
)


def _within_root(path: Path, root: Path) -> bool:
    """Whether a normalised path lies in ``root`` (as written: symlinks are not followed)."""
    r = Path(os.path.normpath(root))
    return path == r or r in path.parents


def _read_manifest(
    csv: Path, root: Path, skipped: list[SkippedFile], allow_outside_root: bool = False
) -> list[_Candidate]:
    """The candidates a CSV manifest lists. A row whose path lies outside ``root`` (the manifest's folder) is
    skipped with :data:`OUTSIDE_ROOT_REASON` unless ``allow_outside_root``."""
    import pandas as pd

    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:
        raise ManifestError(f"Could not read manifest {csv}: {type(e).__name__}: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("path", "subject_id") if c not in df.columns]
    if missing:
        raise ManifestError(
            f"Manifest {csv} lacks column(s) {missing}; found {list(df.columns)}. "
            "Expected columns: path,subject_id[,label] (paths relative to the manifest's folder or absolute)."
        )
    has_label = "label" in df.columns
    cands: list[_Candidate] = []
    seen: set[Path] = set()
    for i, row in enumerate(df.itertuples(index=False), start=2):  # row 1 is the header
        raw_path = str(row.path).strip()
        if not raw_path:
            skipped.append(SkippedFile(f"{csv.name}:row{i}", "manifest row with an empty path"))
            continue
        p = Path(raw_path).expanduser()
        p = Path(os.path.normpath(p if p.is_absolute() else root / p))
        rel = _rel(p, root)
        if not allow_outside_root and not _within_root(p, root):
            skipped.append(SkippedFile(rel, f"{OUTSIDE_ROOT_REASON} {csv.name} (row {i}); not read"))
            log.info("manifest row %d: %s lies outside the manifest's folder; not read", i, rel)
            continue
        subject = str(row.subject_id).strip() or None
        label = (str(row.label).strip() or None) if has_label else None
        ov = _Override(subject, label)
        if not p.exists() and not os.path.lexists(p):
            skipped.append(SkippedFile(rel, f"listed in manifest {csv.name} (row {i}) but not found"))
            log.info("manifest row %d: %s not found", i, rel)
            continue
        if p.is_dir():
            new = _discover_folder(p, root, skipped, ov)
            if not new:
                log.info("manifest row %d: folder %s holds no image file", i, rel)
        else:
            c = _classify(p, rel, skipped, ov)
            new = [c] if c is not None else []
        for c in new:
            key = c.abs.absolute()
            if key in seen:
                skipped.append(SkippedFile(c.rel, f"listed more than once in manifest {csv.name} (row {i} ignored)"))
                continue
            seen.add(key)
            cands.append(c)
    return cands


# ----------------------------------------------------------------------------------------------
# NIfTI / MGH
# ----------------------------------------------------------------------------------------------


def _display(vol: np.ndarray) -> np.ndarray:
    """(n, P, Q) canonical-plane slices -> (n, Q, P) in radiological display orientation."""
    return vol.transpose(0, 2, 1)[:, ::-1, ::-1]


def _require_content(c: _Candidate, label: str) -> None:
    """Skip an empty (0-byte) file with a clear reason instead of a library's parse error."""
    if os.stat(c.abs).st_size == 0:
        raise _Skip(f"empty file (0 bytes); not a valid {label} file")


def _read_nifti(c: _Candidate, config: LoadConfig) -> list[_Unit]:
    import nibabel as nib

    _require_content(c, "NIfTI/MGH")
    img = nib.load(str(c.abs))
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 0 or 0 in shape:
        raise _Skip(f"zero-size volume (shape {shape})")
    nd = len(shape)
    while nd > 3 and shape[nd - 1] == 1:
        nd -= 1
    if nd > 4:
        raise _Skip(f"unsupported {nd}D image (shape {shape}); expected 2D, 3D or 4D")
    # budgets from the header, before any voxel is read: the one 3D volume of a 4D image is read
    read_shape = shape[:3] if nd == 4 else shape
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    check_voxel_budget(read_shape, config, bytes_per_voxel=itemsize, what="volume")
    if nd >= 3:
        img = nib.as_closest_canonical(img)
        shape = tuple(int(s) for s in img.shape)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    if nd == 4:
        nvol = shape[3]
        vi = config.volume_index
        if vi >= nvol:
            raise _Skip(f"volume_index {vi} is out of range for a 4D image with {nvol} volumes")
        _warn(
            f"{c.rel}: 4D image with {nvol} volumes; reading volume {vi} only "
            "(choose another with LoadConfig.volume_index)."
        )
        index = (slice(None),) * 3 + (vi,) + (0,) * (len(shape) - 4)
        data = np.asanyarray(img.dataobj[index])
    else:
        data = np.asanyarray(img.dataobj)
        data = data.reshape(data.shape[:nd]) if data.ndim > nd else data
    data = _check_numeric(np.asarray(data), "volume")
    if data.ndim == 2:
        data = data[:, :, None]
    singleton = [i for i in range(3) if data.shape[i] == 1]
    if len(singleton) >= 2:
        raise _Skip(f"degenerate image (shape {tuple(data.shape)}); expected a 2D image or a 3D volume")
    if len(singleton) == 1:  # a 2D image stored in 3D
        a = singleton[0]
        p, q = (i for i in range(3) if i != a)
        raw = _display(np.moveaxis(data, a, 0))
        sp = _finite_spacing((zooms[q], zooms[p]))
        return [_Unit(c.rel, raw, [0], "2d", sp, "folder", c.rel)]
    a = _VOLUME_AXES[config.axis]
    p, q = (i for i in range(3) if i != a)
    raw = _display(np.moveaxis(data, a, 0))
    sp = _finite_spacing((zooms[q], zooms[p]))
    return [_Unit(c.rel, raw, list(range(raw.shape[0])), config.axis, sp, "stem", c.rel)]


# ----------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF
# ----------------------------------------------------------------------------------------------


def _pil_to_array(im: Any, rel: str) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "I", "F") or mode.startswith("I;16"):
        arr = np.asarray(im)
        return arr.astype(arr.dtype.newbyteorder("=")) if not arr.dtype.isnative else arr
    if mode in ("LA", "La"):
        log.debug("%s: grey + alpha image; alpha channel dropped", rel)
        return np.asarray(im)[..., 0]
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        conv = im if mode in ("RGB", "RGBA") else im.convert("RGB")
        _warn(f"{rel}: colour image (mode {mode}) converted to greyscale (ITU-R 601-2 luminance).")
        return _luminance(np.asarray(conv)[..., :3])
    raise _Skip(f"unsupported image mode {mode!r}")


#: Decoded bytes per pixel of Pillow modes (others: 4).
_PIL_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def _pil_bytes_per_pixel(mode: str) -> int:
    if mode.startswith("I;16"):
        return 2
    return _PIL_BYTES.get(mode, 4)


def _pil_open(path: Path, config: LoadConfig) -> Any:
    """``Image.open`` (header only) with Pillow's decompression-bomb limit set to the pixel budget.

    ``Image.MAX_IMAGE_PIXELS`` is set to :attr:`LoadConfig.max_voxels` (a process-wide setting:
    the last load's budget), so Pillow never refuses an image within the budget; an image beyond it
    is refused by :func:`check_voxel_budget` (or by Pillow's own error beyond twice the limit),
    always with the budget's reason.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = config.max_voxels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        px = int(m.group(1)) if m else 4 * config.max_voxels
        found = f"the header declares an image of {px:_} pixels (refused by Pillow's decompression-bomb check)"
        raise _over_budget("max_voxels", found, config.max_voxels, px) from e


def _read_pil(c: _Candidate, config: LoadConfig) -> list[_Unit]:
    _require_content(c, "image")
    with _pil_open(c.abs, config) as im:
        w, h = im.size
        check_voxel_budget((h, w), config, bytes_per_voxel=_pil_bytes_per_pixel(im.mode), what="image")
        im.load()
        n = getattr(im, "n_frames", 1)
        if n > 1:
            log.info("%s: %d frames; only the first is read", c.rel, n)
        arr = _check_numeric(_pil_to_array(im, c.rel), "image")
    return [_Unit(c.rel, arr[None], [0], "2d", (1.0, 1.0), "folder", c.rel)]


def _tiff_series_to_pages(arr: np.ndarray, axes: str, rel: str) -> np.ndarray:
    """Move a tifffile series to (pages, Y, X), converting samples (colour) to grey."""
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes or len(axes) != arr.ndim:
        if arr.ndim == 2:
            return arr[None]
        raise _Skip(f"unsupported TIFF layout (axes {axes!r}, shape {tuple(arr.shape)})")
    if "S" in axes:
        s = axes.index("S")
        arr = np.moveaxis(arr, s, -1)
        axes = axes[:s] + axes[s + 1 :] + "S"
        ns = arr.shape[-1]
        if ns >= 3:
            _warn(f"{rel}: colour TIFF ({ns} samples) converted to greyscale (ITU-R 601-2 luminance).")
            arr = _luminance(arr)
        else:
            arr = arr[..., 0]
        axes = axes[:-1]
    y, x = axes.index("Y"), axes.index("X")
    arr = np.moveaxis(arr, (y, x), (-2, -1))
    return arr.reshape((-1, *arr.shape[-2:]))


def _read_tiff(c: _Candidate, config: LoadConfig) -> list[_Unit]:
    _require_content(c, "TIFF")
    try:
        import tifffile

        with tifffile.TiffFile(c.abs) as tf:
            if not tf.series:
                raise _Skip("TIFF holds no image series")
            if len(tf.series) > 1:
                log.info("%s: %d image series; only the first is read", c.rel, len(tf.series))
            series = tf.series[0]
            axes = str(series.axes).upper()
            dims = tuple(int(d) for d in series.shape)
            samples = math.prod(d for d, a in zip(dims, axes, strict=False) if a == "S")
            spatial = tuple(d for d, a in zip(dims, axes, strict=False) if a != "S") or dims
            itemsize = np.dtype(series.dtype).itemsize if series.dtype is not None else 8
            check_voxel_budget(spatial, config, bytes_per_voxel=samples * itemsize, what="TIFF image")
            pages = _tiff_series_to_pages(np.asarray(series.asarray()), series.axes, c.rel)
    except _Skip:
        raise
    except Exception as e:  # tifffile cannot read it (e.g. a codec is missing): try Pillow
        log.debug("%s: tifffile failed (%s: %s); trying Pillow", c.rel, type(e).__name__, e)
        from PIL import ImageSequence

        try:
            with _pil_open(c.abs, config) as im:
                w, h = im.size
                n = int(getattr(im, "n_frames", 1) or 1)
                check_voxel_budget((n, h, w), config, bytes_per_voxel=_pil_bytes_per_pixel(im.mode), what="TIFF image")
                pages = np.stack([_pil_to_array(fr, c.rel) for fr in ImageSequence.Iterator(im)])
        except _Skip:
            raise
        except Exception as e2:
            raise _Skip(
                f"corrupt or unreadable TIFF (tifffile: {type(e).__name__}: {e}; Pillow: {type(e2).__name__}: {e2})"
            ) from e2
    pages = _check_numeric(pages, "image")
    if pages.shape[0] == 1:
        return [_Unit(c.rel, pages, [0], "2d", (1.0, 1.0), "folder", c.rel)]
    return [_Unit(c.rel, pages, list(range(pages.shape[0])), "axial", (1.0, 1.0), "stem", c.rel)]


# ----------------------------------------------------------------------------------------------
# NumPy
# ----------------------------------------------------------------------------------------------


def _array_unit(arr: np.ndarray, path: str, file_rel: str, config: LoadConfig, in_npz: bool) -> _Unit:
    """A 2D array is one image (subject: its folder, or the archive's stem in an .npz); 3D a volume."""
    arr = _check_numeric(np.asarray(arr), "array")
    volume_rule = "npz" if in_npz else "stem"
    if arr.ndim == 2:
        return _Unit(path, arr[None], [0], "2d", (1.0, 1.0), "npz" if in_npz else "folder", file_rel)
    if arr.ndim == 3:
        vol = np.moveaxis(arr, config.array_axis, 0)
        return _Unit(path, vol, list(range(vol.shape[0])), "axial", (1.0, 1.0), volume_rule, file_rel)
    raise _Skip(f"unsupported array shape {tuple(arr.shape)}; expected 2D (H, W) or 3D volume")


def _npy_header(fp: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a ``.npy`` header (:mod:`numpy.lib.format`), nothing else read."""
    from numpy.lib import format as npf

    version = npf.read_magic(fp)
    if version == (1, 0):
        shape, _fortran, dtype = npf.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _fortran, dtype = npf.read_array_header_2_0(fp)
    elif hasattr(npf, "_read_array_header"):  # version 3.0 (utf-8 header): no public reader
        shape, _fortran, dtype = npf._read_array_header(fp, version)
    else:
        raise _Skip(f"unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_array_header(
    shape: tuple[int, ...], dtype: np.dtype, config: LoadConfig, available: int | None, what: str = "array"
) -> int:
    """Refuse object (pickle) and non-numeric dtypes, over-budget and truncated arrays; data bytes."""
    if dtype.hasobject:
        raise _Skip(
            f"object-dtype {what} ({dtype}): pickled Python objects are never loaded (allow_pickle=False); "
            "save the intensities as a numeric array"
        )
    if dtype.kind not in "biuf":
        raise _Skip(f"unsupported {what} dtype {dtype} (expected integer or float intensities)")
    check_voxel_budget(shape, config, bytes_per_voxel=dtype.itemsize, what=what)
    nbytes = math.prod(shape) * dtype.itemsize
    if available is not None and nbytes > available:
        raise _Skip(
            f"truncated {what}: the header declares shape {shape} ({dtype}, {nbytes:_} bytes of data) "
            f"but only {max(available, 0):_} bytes follow it"
        )
    return nbytes


def _read_npy(c: _Candidate, config: LoadConfig) -> list[_Unit]:
    from numpy.lib import format as npf

    _require_content(c, ".npy")
    with open(c.abs, "rb") as fp:
        try:
            shape, dtype = _npy_header(fp)
        except _Skip:
            raise
        except Exception as e:
            raise _Skip(f"not a valid .npy file (unreadable header: {_error_text(e)})") from e
        _check_array_header(shape, dtype, config, os.fstat(fp.fileno()).st_size - fp.tell())
        fp.seek(0)
        arr = npf.read_array(fp, allow_pickle=False)
    return [_array_unit(arr, c.rel, c.rel, config, in_npz=False)]


def _read_npz(c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
    """Each ``.npy`` member, its declared shape and decompressed size checked before it is inflated.

    Budgets hold per member and for the archive as a whole (members are taken in key order until
    the total would exceed a budget; the rest are skipped with that reason).
    """
    from numpy.lib import format as npf

    _require_content(c, ".npz")
    units = []
    with zipfile.ZipFile(c.abs) as zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename
            members[name[:-4] if name.endswith(".npy") else name] = info  # np.load's keys; the last wins
        if not members:
            raise _Skip("empty .npz archive (no arrays)")
        total_voxels = total_bytes = 0
        for k in sorted(members):
            info = members[k]
            path = f"{c.rel}:{k}"
            try:
                if info.file_size > config.max_file_bytes:
                    raise _over_budget(
                        "max_file_bytes",
                        f"member {k!r} decompresses to {_human_bytes(info.file_size)} "
                        f"({info.compress_size:_} bytes compressed)",
                        config.max_file_bytes,
                        info.file_size,
                    )
                with zf.open(info) as fp:
                    try:
                        shape, dtype = _npy_header(fp)
                    except _Skip:
                        raise
                    except Exception as e:
                        raise _Skip(f"not a NumPy array (.npy) member: {_error_text(e)}") from e
                    nbytes = _check_array_header(shape, dtype, config, info.file_size - fp.tell())
                voxels = math.prod(shape)
                if total_voxels + voxels > config.max_voxels:
                    raise _over_budget(
                        "max_voxels",
                        f"the archive's arrays up to {k!r} declare {total_voxels + voxels:_} voxels together",
                        config.max_voxels,
                        total_voxels + voxels,
                    )
                if total_bytes + nbytes > config.max_file_bytes:
                    raise _over_budget(
                        "max_file_bytes",
                        f"the archive's arrays up to {k!r} decode to {_human_bytes(total_bytes + nbytes)} together",
                        config.max_file_bytes,
                        total_bytes + nbytes,
                    )
                with zf.open(info) as fp:
                    arr = npf.read_array(fp, allow_pickle=False)
                total_voxels += voxels
                total_bytes += nbytes
                # every array of an archive belongs to the archive's subject (file stem)
                units.append(_array_unit(arr, path, c.rel, config, in_npz=True))
            except _Skip as e:
                skipped.append(SkippedFile(path, str(e)))
            except Exception as e:
                skipped.append(SkippedFile(path, f"unreadable array in .npz: {_error_text(e)}"))
    return units


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------


def _dcmread(path: Path, rel: str, force: bool) -> Any:
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(str(path), defer_size="64 KB", force=force)
    if caught:  # pydicom's messages may quote header values: count them, never repeat them
        log.debug("%s: pydicom raised %d warning(s) while reading the header", rel, len(caught))
    return ds


def _read_dicom_header(c: _Candidate) -> Any:
    from pydicom.errors import InvalidDicomError

    try:
        ds = _dcmread(c.abs, c.rel, force=False)
    except InvalidDicomError as e:
        if c.sniffed:
            raise _Skip(f"not a valid DICOM file: {_dicom_error(e)}") from e
        try:  # .dcm without the 128-byte preamble (older files): read anyway
            ds = _dcmread(c.abs, c.rel, force=True)
        except Exception as e2:
            raise _Skip(f"not a valid DICOM file: {_dicom_error(e2)}") from e2
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _Skip(
            "DICOM file without pixel data (a DICOMDIR, report or structure set, or a file truncated "
            "before its pixel data)"
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise _Skip("DICOM file without Rows/Columns; not an image")
    return ds


def _dicom_subject(ds: Any, key: bytes, fallback: str) -> str:
    """Keyed pseudonym of the subject: PatientID, else PatientName, else SeriesInstanceUID, else the path.

    The only place raw patient identifiers are read; they leave it only as HMAC pseudonyms
    (:func:`inspector.privacy.pseudonym`). A malformed element counts as absent.
    """
    for tag in ("PatientID", "PatientName", "SeriesInstanceUID"):
        try:
            value = ds.get(tag)
            text = str(value).strip() if value is not None else ""
        except Exception:  # a malformed element (bad encoding...): try the next identifier
            continue
        if text:
            return pseudonym(text, key)
    return pseudonym(fallback, key)


def _dicom_error(e: BaseException, ds: Any | None = None) -> str:
    """``Type: message`` of a library exception, shortened, with any patient identifier redacted."""
    text = f"{type(e).__name__}: {e}"
    if len(text) > 300:
        text = text[:297] + "..."
    if ds is not None:
        for tag in ("PatientID", "PatientName", "OtherPatientIDs", "PatientBirthDate"):
            try:
                value = str(ds.get(tag) or "").strip()
            except Exception:  # a malformed element: nothing to redact
                continue
            if value:
                text = text.replace(value, "<redacted>")
    return text


def _n_frames(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _functional(ds: Any, item: str, tag: str, frame: int | None = None) -> Any:
    """A value from the per-frame, then shared functional groups of an enhanced multi-frame file."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        pf = ds.PerFrameFunctionalGroupsSequence
        if frame < len(pf):
            groups.append(pf[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for g in groups:
        if item in g and len(g[item].value) and tag in g[item].value[0]:
            return g[item].value[0].get(tag)
    return None


def _orientation(ds: Any) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        iop = _functional(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    try:
        v = np.asarray([float(x) for x in iop], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (6,) and np.isfinite(v).all() else None


def _axis_from_iop(iop: np.ndarray | None) -> str:
    if iop is None:
        return "2d"
    normal = np.cross(iop[:3], iop[3:])
    if not np.linalg.norm(normal) > 0:
        return "2d"
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _pixel_spacing(ds: Any) -> tuple[float, float]:
    ps = ds.get("PixelSpacing")
    if ps is None:
        ps = _functional(ds, "PixelMeasuresSequence", "PixelSpacing")
    if ps is None:
        ps = ds.get("ImagerPixelSpacing")
    try:
        return _finite_spacing([ps[0], ps[1]]) if ps is not None and len(ps) >= 2 else (1.0, 1.0)
    except TypeError:
        return (1.0, 1.0)


def _rescale(ds: Any, frames: np.ndarray) -> np.ndarray:
    """Modality values of (F, H, W) stored frames: Modality LUT or non-identity slope/intercept."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(frames, ds))
    out = []
    changed = False
    for f in range(frames.shape[0]):
        slope = ds.get("RescaleSlope")
        inter = ds.get("RescaleIntercept")
        if slope is None and inter is None:
            fr = f if frames.shape[0] > 1 else None
            slope = _functional(ds, "PixelValueTransformationSequence", "RescaleSlope", fr)
            inter = _functional(ds, "PixelValueTransformationSequence", "RescaleIntercept", fr)
        s = float(slope) if slope not in (None, "") else 1.0
        b = float(inter) if inter not in (None, "") else 0.0
        if s != 1.0 or b != 0.0:
            changed = True
        out.append((s, b))
    if not changed:
        return frames
    res = frames.astype(np.float64)
    for f, (s, b) in enumerate(out):
        res[f] = res[f] * s + b
    return res


def _check_dicom_budget(ds: Any, config: LoadConfig) -> None:
    """Rows x Columns x NumberOfFrames (and samples x bits) from the header against the budgets."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError, AttributeError) as e:
        raise _Skip(
            f"corrupt DICOM header: unreadable Rows/Columns/SamplesPerPixel/BitsAllocated ({type(e).__name__})"
        ) from e
    check_voxel_budget(
        (_n_frames(ds), rows, cols),
        config,
        bytes_per_voxel=max(1, spp) * max(1, (bits + 7) // 8),
        what="DICOM image (frames x rows x columns)",
    )


def _decode_dicom(ds: Any, rel: str, config: LoadConfig) -> np.ndarray:
    """Decoded modality values, (F, H, W), with MONOCHROME1 inverted and colour converted to grey."""
    _check_dicom_budget(ds, config)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and ts.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError as e:
            raise _Skip(
                f"compressed transfer syntax {ts.name} ({ts}) has no pydicom pixel data decoder; "
                "convert the file to an uncompressed syntax (e.g. with dcmtk's dcmdjpeg or gdcmconv)"
            ) from e
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "pylibjpeg plugins or gdcm"
            raise _Skip(
                f"compressed transfer syntax {ts.name} ({ts}) cannot be decoded: no installed handler. "
                f"Install one of: {needs} (pylibjpeg: pip install pylibjpeg pylibjpeg-libjpeg "
                "pylibjpeg-openjpeg; gdcm: pip install python-gdcm)"
            )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            arr = np.asarray(ds.pixel_array)
        if caught:
            log.debug("%s: pydicom raised %d warning(s) while decoding pixels", rel, len(caught))
    except Exception as e:
        syntax = f" ({ts.name})" if ts is not None else ""
        raise _Skip(f"could not decode DICOM pixel data{syntax}: {_dicom_error(e, ds)}") from e
    nf = _n_frames(ds)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp > 1:
        _warn(f"{rel}: colour DICOM ({spp} samples per pixel) converted to greyscale (ITU-R 601-2 luminance).")
        arr = _luminance(arr)
    if nf == 1 or arr.ndim == 2:
        arr = arr.reshape((1, *arr.shape[-2:]))
    arr = _check_numeric(arr, "DICOM image")
    arr = _rescale(ds, arr)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        arr = -arr.astype(np.float64)
    return arr


def _order_series(items: list[tuple[_Candidate, Any]]) -> tuple[list[int], str]:
    """Order of the files of one series and how it was found."""
    n = len(items)
    inst: list[float] = []
    for _, ds in items:
        try:
            inst.append(float(ds.get("InstanceNumber")))
        except (TypeError, ValueError):
            inst.append(float("inf"))
    iops = [_orientation(ds) for _, ds in items]
    ipps = []
    for _, ds in items:
        try:
            v = np.asarray([float(x) for x in ds.get("ImagePositionPatient")], dtype=np.float64)
            ipps.append(v if v.shape == (3,) and np.isfinite(v).all() else None)
        except (TypeError, ValueError):
            ipps.append(None)
    if all(o is not None for o in iops) and all(p is not None for p in ipps):
        ref = iops[0]
        if all(np.allclose(o, ref, atol=1e-3) for o in iops):
            normal = np.cross(ref[:3], ref[3:])
            pos = [float(np.dot(p, normal)) for p in ipps]
            return sorted(range(n), key=lambda i: (pos[i], inst[i], items[i][0].rel)), "position"
    if all(np.isfinite(v) for v in inst):
        return sorted(range(n), key=lambda i: (inst[i], items[i][0].rel)), "instance"
    return list(range(n)), "filename"


def _dicom_skip(rel: str, e: Exception, ds: Any | None, skipped: list[SkippedFile]) -> None:
    """Record a DICOM file that could not be read; library messages are shortened and redacted."""
    if isinstance(e, _Skip | _Timeout):
        reason = str(e)
    else:
        reason = f"corrupt or unreadable DICOM file: {_dicom_error(e, ds)}"
    skipped.append(SkippedFile(rel, reason))
    log.log(logging.WARNING if isinstance(e, _Timeout) else logging.INFO, "skipped %s: %s", rel, reason)


def _dicom_header_of(c: _Candidate) -> tuple[Any, int, str]:
    """Header, frame count and series UID of one file (run under the per-file deadline)."""
    _require_content(c, "DICOM")
    ds = _read_dicom_header(c)
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    return ds, _n_frames(ds), uid


def _series_number(ds: Any) -> float:
    try:
        return float(ds.get("SeriesNumber"))
    except Exception:  # absent (None), malformed, unparsable
        return float("inf")


def _read_dicoms(
    cands: Sequence[_Candidate],
    config: LoadConfig,
    skipped: list[SkippedFile],
    tick: TickCallback | None = None,
) -> Iterator[_Unit]:
    """Multi-frame files one by one; single-frame files grouped by (folder, series, manifest row).

    Yields each unit as soon as it is decoded (a multi-frame file while the headers are still being read, a
    series once its files are), so the loader slices it and drops its pixels before the next one.

    Each file's header read and each file's pixel decoding run under the per-file deadline; any
    failure of one file, or of one series as a whole, is recorded in ``skipped``. The pseudonym key
    is loaded (or created) in the calling thread, once, when the first header was read.
    """
    tick = tick if tick is not None else _no_tick
    timeout = config.file_timeout_s
    groups: dict[tuple[str, str, _Override | None], list[tuple[_Candidate, Any]]] = defaultdict(list)
    keys: list[bytes] = []

    def key() -> bytes:  # a key-file problem is a configuration error: raised, never a skipped file
        if not keys:
            keys.append(load_or_create_key(config.pseudonym_key_file))
        return keys[0]

    for c in cands:
        try:
            ds, nf, uid = _call_with_deadline(lambda c=c: _dicom_header_of(c), timeout, "reading the DICOM header")
        except Exception as e:
            _dicom_skip(c.rel, e, None, skipped)
            tick(1)
            continue
        k = key()
        if nf > 1:

            def multiframe(c: _Candidate = c, ds: Any = ds, k: bytes = k) -> _Unit:
                vol = _decode_dicom(ds, c.rel, config)
                return _Unit(
                    c.rel,
                    vol,
                    list(range(vol.shape[0])),
                    _axis_from_iop(_orientation(ds)),
                    _pixel_spacing(ds),
                    "fixed",
                    c.rel,
                    subject_id=_dicom_subject(ds, k, c.rel),
                    override=c.override,
                    sources=(c.rel,),
                )

            try:
                unit = _call_with_deadline(multiframe, timeout, "decoding the DICOM pixel data")
            except Exception as e:
                _dicom_skip(c.rel, e, ds, skipped)
            else:
                yield unit
            tick(1)
            continue
        folder = Path(c.rel).parent.as_posix()
        groups[(folder, uid or f"no-series-uid:{c.rel}", c.override)].append((c, ds))

    per_folder = Counter(folder for folder, _, _ in groups)
    series_no: dict[tuple[str, str, _Override | None], int] = {}
    by_folder: dict[str, list[tuple[str, str, _Override | None]]] = defaultdict(list)
    for gk in groups:
        by_folder[gk[0]].append(gk)
    for _folder, gks in by_folder.items():
        ranked = sorted(gks, key=lambda g: (_series_number(groups[g][0][1]), groups[g][0][0].rel))
        for j, gk in enumerate(ranked, start=1):
            series_no[gk] = j

    for gk, items in groups.items():
        folder = gk[0]
        if len(items) == 1:
            path = items[0][0].rel
        elif per_folder[folder] == 1:
            path = folder
        else:
            path = f"{folder}/series-{series_no[gk]}"
        ticked = [0]

        def count(n: int, ticked: list[int] = ticked) -> None:
            ticked[0] += n
            tick(n)

        own: list[SkippedFile] = []
        try:
            unit = _dicom_series_unit(path, items, config, key(), own, count)
        except Exception as e:  # a malformed header value breaks the series as a whole
            for c, ds in items:
                reason = f"corrupt or unreadable DICOM series {path}: {_dicom_error(e, ds)}"
                skipped.append(SkippedFile(c.rel, reason))
            tick(len(items) - ticked[0])
            log.info("skipped DICOM series %s (%d files): %s", path, len(items), type(e).__name__)
            log.debug("traceback for %s", path, exc_info=True)
            continue
        skipped.extend(own)
        if unit is not None:
            yield unit


def _dicom_series_unit(
    path: str,
    items: list[tuple[_Candidate, Any]],
    config: LoadConfig,
    key: bytes,
    skipped: list[SkippedFile],
    tick: TickCallback,
) -> _Unit | None:
    """One volume from the single-frame files of one series, each decoded under the deadline."""
    try:
        order, how = _order_series(items)
    except Exception as e:  # malformed positions or instance numbers: keep the file order
        order, how = list(range(len(items))), f"filename ({type(e).__name__} in the positions)"
    if len(items) > 1:
        log.debug("%s: %d files ordered by %s", path, len(items), how)
    subject = _dicom_subject(items[0][1], key, path)
    first = items[order[0]][1]
    axis, spacing = _axis_from_iop(_orientation(first)), _pixel_spacing(first)
    decoded: list[tuple[str, np.ndarray]] = []
    for i in order:
        c, ds = items[i]
        try:
            frame = _call_with_deadline(
                lambda c=c, ds=ds: _decode_dicom(ds, c.rel, config)[0],
                config.file_timeout_s,
                "decoding the DICOM pixel data",
            )
            decoded.append((c.rel, frame))
        except Exception as e:
            _dicom_skip(c.rel, e, ds, skipped)
        tick(1)
    if not decoded:
        return None
    shapes = Counter(f.shape for _, f in decoded)
    main = shapes.most_common(1)[0][0]
    for rel, f in decoded:
        if f.shape != main:
            reason = f"slice shape {f.shape} differs from the rest of its series {main}"
            skipped.append(SkippedFile(rel, reason))
            log.info("skipped %s: %s", rel, reason)
    frames = [f for _, f in decoded if f.shape == main]
    contributing = tuple(sorted(rel for rel, f in decoded if f.shape == main))
    return _Unit(
        path,
        frames,
        list(range(len(frames))),
        axis,
        spacing,
        "fixed",
        path,
        subject_id=subject,
        override=items[0][0].override,
        sources=contributing,
    )


# ----------------------------------------------------------------------------------------------
# Built-in readers (registration order is the order of SUPPORTED_EXTENSIONS)
# ----------------------------------------------------------------------------------------------


@register_reader
class NiftiReader(Reader):
    """NIfTI-1/2 and FreeSurfer MGH/MGZ volumes (nibabel), reoriented to RAS+ and sliced along
    :attr:`LoadConfig.axis`; 2D images stored in 3D are one slice, 4D images give one volume."""

    name = "nifti"
    label = "NIfTI/MGH"
    suffixes = (".nii.gz", ".nii", ".mgz", ".mgh")

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return _read_nifti(c, config)


@register_reader
class DicomReader(Reader):
    """DICOM (pydicom): single-frame files of one series in one folder form one volume (read as a
    group), multi-frame files give one slice per frame; files without extension are recognised by
    the ``DICM`` preamble."""

    name = "dicom"
    label = "DICOM"
    suffixes = (".dcm", ".dicom", ".ima")
    sniff_hint = "DICOM preamble"

    def sniff(self, path: Path) -> bool:
        return _has_dicm_preamble(path)

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return list(_read_dicoms([c], config, skipped))

    def read_group(
        self,
        candidates: Sequence[_Candidate],
        config: LoadConfig,
        skipped: list[SkippedFile],
        tick: TickCallback | None = None,
    ) -> Iterator[_Unit]:
        return _read_dicoms(candidates, config, skipped, tick)


@register_reader
class ImageReader(Reader):
    """PNG and JPEG (Pillow): one 2D image per file (the first frame), colour converted to grey."""

    name = "pil"
    label = "image"
    suffixes = (".png", ".jpg", ".jpeg")

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return _read_pil(c, config)


@register_reader
class TiffReader(Reader):
    """TIFF (tifffile, Pillow as fallback): one page is a 2D image, several pages a volume."""

    name = "tiff"
    label = "TIFF"
    suffixes = (".tif", ".tiff")

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return _read_tiff(c, config)


@register_reader
class NpyReader(Reader):
    """NumPy ``.npy`` (no pickles): a 2D array is one image, a 3D array a volume along
    :attr:`LoadConfig.array_axis`."""

    name = "npy"
    label = "NumPy .npy"
    suffixes = (".npy",)

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return _read_npy(c, config)


@register_reader
class NpzReader(Reader):
    """NumPy ``.npz`` archives: every array is read like a ``.npy``, with path ``file.npz:key``."""

    name = "npz"
    label = "NumPy .npz"
    suffixes = (".npz",)

    def read(self, c: _Candidate, config: LoadConfig, skipped: list[SkippedFile]) -> list[_Unit]:
        return _read_npz(c, config, skipped)


def _read_all(
    cands: Sequence[_Candidate],
    config: LoadConfig,
    skipped: list[SkippedFile],
    tick: TickCallback,
    on_unit: Callable[[_Unit], None] | None = None,
) -> tuple[list[_Unit], dict[str, SourceFile]]:
    """Hand each reader its candidates (in registration order), then hash every unit's source files.

    Returns the units and the :class:`SourceFile` of each source, by relative path; a unit whose
    file cannot be hashed (it vanished after reading) is skipped. Before any reader sees a file,
    it is checked again to be a regular file (it may have changed since discovery) and its size
    against :attr:`LoadConfig.max_file_bytes`. ``on_unit(u)`` is called on each unit kept, in the returned
    order, as soon as it is read (the loader makes its slices there and drops ``u.raw``, so the raw volumes
    are never all in memory at once).
    """
    groups: dict[int, list[_Candidate]] = defaultdict(list)
    readers: dict[int, Reader] = {}
    for c in cands:
        problem = _file_problem(c.abs)
        if problem is None:
            try:
                _check_file_bytes(os.stat(c.abs).st_size, config)
            except _Skip as e:
                problem = str(e)
            except OSError as e:
                problem = f"cannot inspect the file: {type(e).__name__}: {e.strerror or e}"
        if problem is not None:
            skipped.append(SkippedFile(c.rel, problem))
            log.info("skipped %s: %s", c.rel, problem)
            tick(1)
            continue
        groups[id(c.reader)].append(c)
        readers[id(c.reader)] = c.reader
    order = {id(r): i for i, r in enumerate(_READERS.values())}
    units: list[_Unit] = []
    hashes: dict[str, SourceFile] = {}
    failed: dict[str, str] = {}
    for key in sorted(groups, key=lambda k: order.get(k, len(order))):
        reader, group = readers[key], groups[key]
        abs_by_rel = {c.rel: c.abs for c in group}
        for u in reader.read_group(group, config, skipped, tick):
            sources = tuple(sorted(set(u.sources or (u.file_rel,))))
            unknown = [rel for rel in sources if rel not in abs_by_rel]
            if unknown:
                raise RuntimeError(
                    f"Reader {reader.name!r} gave unit {u.path!r} sources {unknown} that are not among its "
                    "candidate files; set _Unit.sources to the rel of the files it was read from."
                )
            u.sources = sources
            for rel in sources:
                if rel in hashes or rel in failed:
                    continue
                try:
                    hashes[rel] = _hash_file(abs_by_rel[rel], rel)
                except OSError as e:
                    failed[rel] = f"could not hash source file {rel} after reading it: {type(e).__name__}: {e}"
                    log.warning("%s", failed[rel])
            bad = [rel for rel in sources if rel in failed]
            if bad:
                skipped.append(SkippedFile(u.path, failed[bad[0]]))
                continue
            if on_unit is not None:
                on_unit(u)
            units.append(u)
    return units, hashes


# ----------------------------------------------------------------------------------------------
# Units -> slices
# ----------------------------------------------------------------------------------------------


def _assign_subjects(units: list[_Unit], root_name: str) -> None:
    stems: dict[str, set[str]] = defaultdict(set)
    for u in units:
        if u.subject_rule in ("stem", "npz"):
            stems[Path(_strip_ext(u.file_rel)).name].add(u.file_rel)
    clashes = {s for s, files in stems.items() if len(files) > 1}
    if clashes:
        log.info("volume files share the stem(s) %s; their subject IDs use the relative path", sorted(clashes)[:5])
    for u in units:
        if u.subject_rule in ("stem", "npz"):
            stem = Path(_strip_ext(u.file_rel)).name
            u.subject_id = _strip_ext(u.file_rel) if stem in clashes else stem
        elif u.subject_rule == "folder":
            parent = Path(u.file_rel).parent.as_posix()
            u.subject_id = root_name if parent in (".", "") else parent
        if u.override is not None and u.override.subject_id:
            u.subject_id = u.override.subject_id
        if not u.subject_id:
            u.subject_id = root_name or "subject"


#: Subject ID of a unit's slices while they are made, before every unit is read (see :func:`load_cohort`).
_PENDING_SUBJECT = "\x00pending"


def _unit_slices(u: _Unit, config: LoadConfig, skipped: list[SkippedFile]) -> list[Slice]:
    pp = config.preprocess
    raw = u.raw
    try:
        vol = np.stack(raw) if isinstance(raw, list) else np.asarray(raw)
        norm = normalise_volume(vol, pp.percentiles, name=u.path)
    except ConstantImageError as e:
        what = "image" if len(u.indices) == 1 else "volume"
        skipped.append(SkippedFile(u.path, f"constant {what}: {e}"))
        log.info("skipped %s: constant %s", u.path, what)
        return []
    n = norm.shape[0]
    keep = range(0, n, config.slice_step) if n > 1 else range(1)
    label = u.override.label if u.override is not None else None
    out = []
    for k in keep:
        v = norm[k]  # volume-normalised: decides the background rule only
        idx = u.indices[k]
        if is_background(v, pp):
            frac = float((v > pp.foreground_threshold).mean())
            const = "constant slice; " if float(v.max()) - float(v.min()) <= 1e-8 else ""
            reason = f"background-only slice ({const}foreground fraction {frac:.3f} < {pp.min_foreground_fraction:g})"
            skipped.append(SkippedFile(f"{u.path}#{idx}", reason))
            log.debug("skipped %s#%d: %s", u.path, idx, reason)
            continue
        raw_k = np.asarray(raw[k])
        try:  # the array: the slice normalised on its own (NaN/Inf were logged once for the volume above)
            # a lone 2D image: its volume normalisation is already the slice's own
            s = (
                norm[k]
                if n == 1
                else normalise_slice(vol[k], pp.percentiles, name=f"{u.path}#{idx}", log_nonfinite=False)
            )
        except ConstantImageError as e:
            reason = f"constant slice: {e}"
            skipped.append(SkippedFile(f"{u.path}#{idx}", reason))
            log.debug("skipped %s#%d: %s", u.path, idx, reason)
            continue
        arr = resize_square(s, pp.size) if pp.size is not None else s
        out.append(
            Slice(
                array=arr,
                subject_id=u.subject_id,
                path=u.path,
                slice_index=int(idx),
                axis=u.axis,
                original_shape=(int(raw_k.shape[0]), int(raw_k.shape[1])),
                spacing=u.spacing,
                sha256=raw_pixel_hash(raw_k),
                label=label,
                sources=u.sources,
            )
        )
    return out


def _unit_slices_or_skip(u: _Unit, config: LoadConfig, skipped: list[SkippedFile]) -> list[Slice]:
    """:func:`_unit_slices`; any error (odd values, a shape the resize refuses) skips the unit."""
    own: list[SkippedFile] = []
    try:
        out = _unit_slices(u, config, own)
    except Exception as e:
        reason = f"could not preprocess its pixel values: {_error_text(e)}"
        skipped.append(SkippedFile(u.path, reason))
        log.info("skipped %s: %s", u.path, reason)
        log.debug("traceback for %s", u.path, exc_info=True)
        return []
    skipped.extend(own)
    return out


def _skip_sort_key(sk: SkippedFile) -> tuple[str, int]:
    base, sep, idx = sk.path.rpartition("#")
    if sep and idx.isdigit():
        return base, int(idx)
    return sk.path, -1


def load_cohort(
    source: str | Path | Cohort,
    config: LoadConfig = LoadConfig(),
    *,
    name: str | None = None,
    progress: ProgressCallback | None = None,
    spill: SliceSpill | None = None,
) -> Cohort:
    """Load a folder, a CSV manifest or a single file into a :class:`Cohort` of preprocessed slices.

    Parameters
    ----------
    source : str, Path or Cohort
        A folder (scanned recursively in sorted order; hidden files, ``labels.csv`` and
        ``manifest.csv`` are ignored), a ``.csv`` manifest with columns ``path,subject_id[,label]``
        (paths relative to the manifest's folder or absolute; a path may name a folder; a path outside
        the manifest's folder is skipped unless ``config.allow_outside_root``), a single
        image file, or a :class:`Cohort` (returned unchanged).
    config : LoadConfig
        Slicing axis, 4D volume index, preprocessing, slice step, per-file budgets and timeout, and
        the pseudonym key file (read or created only when a DICOM file is read).
    name : str, optional
        Display name of the cohort (default: the root folder's name).
    progress : callable, optional
        Called as ``progress("loading", done_files, total_files)``.
    spill : inspector.store.SliceSpill, optional
        Moves the slices to disk a chunk at a time while they are made (memory: one chunk and one volume);
        their arrays become read-only views of mapped files. ``None`` (default) keeps them in memory.

    Returns
    -------
    Cohort
        Slices of shape ``(size, size)`` (or native size when ``config.preprocess.size`` is None),
        float32 in ``[0, 1]``, sorted by relative path then slice index; every file or slice not
        loaded is listed in ``Cohort.skipped`` with its reason.

    Raises
    ------
    CohortNotFoundError
        If ``source`` does not exist.
    NoImagesError
        If no readable, non-background slice was found.
    ManifestError
        If a manifest lacks the ``path`` or ``subject_id`` column or cannot be parsed.
    """
    if isinstance(source, Cohort):
        return source
    if not isinstance(config, LoadConfig):
        raise TypeError(f"config must be a LoadConfig; got {type(config).__name__}.")
    src = Path(source).expanduser()
    if not src.exists():
        raise CohortNotFoundError(
            f"Cohort path {src} does not exist. Expected a folder of images ({_supported_text()}), "
            "a CSV manifest with columns path,subject_id[,label], or a single image file."
        )
    src = src.absolute()
    skipped: list[SkippedFile] = []
    if src.is_dir():
        root = src
        cands = _discover_folder(src, root, skipped)
        origin = f"folder {src}"
    elif src.suffix.lower() == ".csv":
        root = src.parent
        cands = _read_manifest(src, root, skipped, config.allow_outside_root)
        origin = f"manifest {src}"
    else:
        root = src.parent
        c = _classify(src, _rel(src, root), skipped, None)
        cands = [c] if c is not None else []
        origin = f"file {src}"
    cohort_name = name or root.name or str(root)

    total = len(cands)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress("loading", done, total)

    if progress is not None:
        progress("loading", 0, total)
    per_unit: list[list[Slice]] = []

    def to_slices(u: _Unit) -> None:
        # each unit becomes slices as soon as it is read and its raw volume is dropped (memory: one volume at a
        # time beside the slices); subject IDs are settled once every unit is known (a stem clash), below
        fixed = u.subject_id
        if not fixed:
            u.subject_id = _PENDING_SUBJECT
        made = _unit_slices_or_skip(u, config, skipped)
        per_unit.append(spill.add(made) if spill is not None else made)
        u.subject_id = fixed
        u.raw = None

    units, hashes = _read_all(cands, config, skipped, tick, on_unit=to_slices)
    if spill is not None:
        spill.flush()

    _assign_subjects(units, root.name or cohort_name)
    slices: list[Slice] = []
    for u, made in zip(units, per_unit, strict=True):
        for s in made:  # in place: nothing of a Slice derives from its subject, and its pixels are not read again
            object.__setattr__(s, "subject_id", u.subject_id)
        slices.extend(made)
    per_unit.clear()
    slices.sort(key=lambda s: (s.path, s.slice_index))
    unique: list[Slice] = []
    seen: set[str] = set()
    for s in slices:
        if s.key in seen:
            skipped.append(SkippedFile(s.key, "duplicate slice key (another source maps to the same path#index)"))
            continue
        seen.add(s.key)
        unique.append(s)
    skipped.sort(key=_skip_sort_key)

    if not unique:
        lines = [f"    - {sk.path}: {sk.reason}" for sk in skipped[:20]]
        if len(skipped) > 20:
            lines.append(f"    ... and {len(skipped) - 20} more")
        listing = ("\n  Skipped files:\n" + "\n".join(lines)) if lines else " No candidate files were found."
        raise NoImagesError(
            f"No readable image in {origin}. Expected files with extensions {_supported_text()} "
            f"(found {total} candidate file(s)).{listing}",
            skipped,
        )
    files = tuple(hashes[rel] for rel in sorted({rel for s in unique for rel in s.sources}))
    cohort = Cohort(unique, root, skipped, cohort_name, files)
    n_files = len({s.path for s in unique})
    log.info(
        "loaded cohort %r: %d slices from %d sources, %d subjects, %d skipped",
        cohort.name,
        len(unique),
        n_files,
        len(cohort.subjects),
        len(skipped),
    )
    return cohort
