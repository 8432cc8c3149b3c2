"""Benchmark data: real MRI slices from installed packages, seeded splits, planted copies, synthetic sets G.

The slices are those of the sample data (``sample_data/build_sample_data.py``): every source of its
:data:`SOURCES` list is read with its own :func:`candidates` (real anatomy only, background dropped, kept
slices at least ``MIN_GAP = 3`` indices apart within a volume and axis, the left sagittal half of the
left-right symmetric MNI152 template never used). Nothing here re-implements that listing; the module is
imported from its file. Each slice then follows the product's intensity rule: normalised on its own
(:func:`inspector.preprocess.normalise_slice` with ``PreprocessConfig().percentiles``, as
:func:`inspector.load_cohort` normalises every slice whatever its container), not with its volume as the
builder's listing does; then it is resized to the audit's loading size (``AuditConfig().size``). The bank
is cached under ``benchmarks/_data/`` (git-ignored, rebuilt when the packages, the builder or the
intensity rule change).

Two settings, both seeded (:func:`make_split`):

``slice``
    As in the paper: every (volume, axis) stratum is shuffled and dealt to the training set T and to
    ``n_folds`` unseen folds (:func:`deal_splits` of the sample-data builder). A novel slice's nearest
    training slice is then often the same acquisition 3 slices away (the hard, realistic negative).
``subject``
    Whole acquisitions go to T or to the unseen side (a seeded choice among the partitions that leave
    enough unseen slices for a holdout that can reach ``alpha = 0.01``); the unseen slices are dealt
    to folds per stratum.

Cross-fitting: for fold ``f`` the holdout H is every unseen slice *not* in fold ``f`` and the pool of
novel slices is fold ``f``, so H and the novel slices of G are always disjoint, and every unseen slice
is a novel slice exactly once per seed (which triples the negatives that the false-positive rate is
measured on without ever calibrating a slice against itself).

Copies (:func:`make_copies`): training slices passed through one condition of
:data:`inspector.preprocess.CONDITIONS`, **always** applied. The MNI152 template is left-right
symmetric: its axial and coronal slices are their own mirror image, so a horizontal flip of one is an
exact copy (the condition would be ``none`` in disguise); those slices are never the source of an
``hflip`` or ``combo`` copy (``_MIRROR_CONDITIONS`` of the builder). Sagittal slices of the template
mirror each other across the midline; only one hemisphere is loaded, so a flipped copy never equals
another training slice.

A synthetic set G (:func:`draw_g`) of fixed size ``n_g`` at duplication rate ``d`` holds
``round(d * n_g)`` copies and ``n_g - round(d * n_g)`` novel slices of one fold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np

from inspector.config import AuditConfig
from inspector.preprocess import CONDITIONS, PreprocessConfig, normalise_slice, resize_square

__all__ = [
    "RATES",
    "N_FOLDS",
    "DATA_DIR",
    "SliceBank",
    "Split",
    "CopySet",
    "GSet",
    "builder",
    "load_bank",
    "make_split",
    "make_copies",
    "copy_eligible",
    "draw_g",
    "check_split",
    "BenchmarkDataError",
]

log = logging.getLogger(__name__)

#: Duplication rates of the protocol (fraction of G that are copies).
RATES: tuple[float, ...] = (0.05, 0.15, 0.30, 0.45)
#: Unseen folds per seed (fold f = novel pool, the other folds = holdout H).
N_FOLDS = 3
#: Share of the slices that go to T in the slice-level split (144 of the 321 slices): the 177 unseen slices
#: give every fold a holdout of >= 118 slices (``p <= 0.01`` needs >= 99) and a novel pool of >= 59.
TRAIN_FRACTION = 0.45
#: Size limits of T in the subject-level split (whole acquisitions; the rest must leave >= 149 unseen slices).
SUBJECT_TRAIN_SIZE: tuple[int, int] = (80, 172)
#: Where generated data is cached (git-ignored).
DATA_DIR = Path(__file__).resolve().parent / "_data"
_BUILDER = Path(__file__).resolve().parents[1] / "sample_data" / "build_sample_data.py"


class BenchmarkDataError(RuntimeError):
    """The benchmark data cannot be built as asked (too few slices, unknown setting)."""


@lru_cache(maxsize=1)
def builder() -> ModuleType:
    """The sample-data builder module (``sample_data/build_sample_data.py``), imported from its file."""
    name = "build_sample_data"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _BUILDER)
    if spec is None or spec.loader is None:
        raise BenchmarkDataError(f"Cannot import the sample-data builder at {_BUILDER}.")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered while it executes
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# The slice bank
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceBank:
    """Every usable real slice, normalised on its own (the product's rule) and resized to the audit's loading size.

    Attributes
    ----------
    images : np.ndarray, shape (n, size, size), float32 in [0, 1]
        Each slice normalised with :func:`inspector.preprocess.normalise_slice` (its own 0.5/99.5
        percentiles to [0, 1]), then resized.
    acquisition : np.ndarray of str, shape (n,)
        The builder's ``Source.subject`` (one acquisition = one subject here).
    axis : np.ndarray of str, shape (n,)
    slice_index : np.ndarray of int, shape (n,)
    source_file : np.ndarray of str, shape (n,)
    volume_index : np.ndarray of str, shape (n,)
        Volume of a 4D file ("" for 3D/2D files).
    mirror : np.ndarray of bool, shape (n,)
        The slice is its own left-right mirror image (axial/coronal slices of the symmetric template):
        a horizontal flip of it is an exact copy.
    """

    images: np.ndarray
    acquisition: np.ndarray
    axis: np.ndarray
    slice_index: np.ndarray
    source_file: np.ndarray
    volume_index: np.ndarray
    mirror: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def stratum(self, i: int) -> tuple[str, str]:
        """(volume, axis) of slice ``i``: slices closer than 3 indices never share one."""
        return (f"{self.source_file[i]}#{self.volume_index[i]}", str(self.axis[i]))

    def key(self, i: int) -> str:
        """A readable unique key, ``acquisition/axis_index``."""
        return f"{self.acquisition[i]}/{self.axis[i]}_{int(self.slice_index[i]):03d}"

    def counts(self) -> dict[str, int]:
        """Slices per acquisition."""
        return dict(Counter(self.acquisition.tolist()))

    def subset(self, indices: Sequence[int] | np.ndarray) -> SliceBank:
        """A bank of the slices at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return SliceBank(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(SliceBank)})

    def sample(self, n: int, seed: int) -> SliceBank:
        """A seeded subset of ``n`` slices, every acquisition kept in proportion (at least one slice each)."""
        if not 0 < n <= len(self):
            raise BenchmarkDataError(f"Cannot sample {n} of {len(self)} slices.")
        rng = np.random.default_rng([seed, 606])
        counts = self.counts()
        take = {a: max(1, int(round(n * c / len(self)))) for a, c in counts.items()}
        keep = []
        for a in sorted(take):
            pool = np.flatnonzero(self.acquisition == a)
            keep.extend(rng.choice(pool, size=min(take[a], len(pool)), replace=False).tolist())
        return self.subset(np.sort(np.asarray(keep)))


#: The bank's intensity rule (part of its cache key): each slice normalised on its own, as the loader does.
_PERCENTILES: tuple[float, float] = PreprocessConfig().percentiles
_INTENSITY_RULE = {"rule": "normalise_slice", "percentiles": list(_PERCENTILES)}


def _bank_key(size: int, sources: Sequence[str]) -> str:
    b = builder()
    h = hashlib.blake2b(digest_size=12)
    versions = {p: b.package_version(p) for p in sorted({s.package for s in b.SOURCES})}
    meta = {"size": size, "sources": list(sources), "versions": versions, "intensity": _INTENSITY_RULE}
    h.update(json.dumps(meta).encode())
    h.update(_BUILDER.read_bytes())
    return h.hexdigest()


def load_bank(
    size: int | None = None, *, sources: Sequence[str] | None = None, cache: bool = True, data_dir: Path = DATA_DIR
) -> SliceBank:
    """Load every usable slice of the sample-data sources (cached under ``data_dir``).

    Parameters
    ----------
    size : int, optional
        Square size of the slices (default ``AuditConfig().size``, the audit's loading size).
    sources : sequence of str, optional
        Subset of the builder's ``SOURCE_KEYS`` (default: all).
    cache : bool
        Read and write ``data_dir/bank-<key>.npz``.
    data_dir : Path

    Returns
    -------
    SliceBank
    """
    b = builder()
    size = int(size or AuditConfig().size)
    chosen = list(b.SOURCE_KEYS) if sources is None else list(sources)
    unknown = [s for s in chosen if s not in b.SOURCE_KEYS]
    if unknown:
        raise BenchmarkDataError(f"Unknown source(s) {unknown}; valid: {list(b.SOURCE_KEYS)}.")
    path = Path(data_dir) / f"bank-{_bank_key(size, chosen)}.npz"
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return SliceBank(**{f.name: z[f.name] for f in dataclasses.fields(SliceBank)})
        except (OSError, KeyError, ValueError) as e:
            log.warning("benchmark slice cache %s unreadable (%s); rebuilding", path, e)
    rows: dict[str, list] = {f.name: [] for f in dataclasses.fields(SliceBank)}
    for src in b.SOURCES:
        if src.subject not in chosen:
            continue
        for it in b.candidates(src):
            img = normalise_slice(it.image, _PERCENTILES, name=f"{src.subject} {it.axis} {it.slice_index}")
            rows["images"].append(resize_square(img, size))
            rows["acquisition"].append(src.subject)
            rows["axis"].append(it.axis)
            rows["slice_index"].append(it.slice_index)
            rows["source_file"].append(src.source_file)
            rows["volume_index"].append("" if src.volume_index is None else str(src.volume_index))
            rows["mirror"].append(it.axis in src.mirror_axes)
    bank = SliceBank(
        images=np.stack(rows["images"]).astype(np.float32),
        acquisition=np.array(rows["acquisition"], dtype=str),
        axis=np.array(rows["axis"], dtype=str),
        slice_index=np.array(rows["slice_index"], dtype=np.int64),
        source_file=np.array(rows["source_file"], dtype=str),
        volume_index=np.array(rows["volume_index"], dtype=str),
        mirror=np.array(rows["mirror"], dtype=bool),
    )
    _check_mirror(bank)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **{f.name: getattr(bank, f.name) for f in dataclasses.fields(SliceBank)})
        tmp.replace(path)
    log.info("benchmark slices: %d from %d acquisitions (%s)", len(bank), len(bank.counts()), bank.counts())
    return bank


def _check_mirror(bank: SliceBank, tol: float = 0.02) -> None:
    """The slices marked ``mirror`` must really be (nearly) their own left-right mirror image."""
    for i in np.flatnonzero(bank.mirror):
        img = bank.images[i]
        if float(np.abs(img - img[:, ::-1]).mean()) > tol:
            raise BenchmarkDataError(f"{bank.key(i)} is marked mirror-symmetric but its hflip differs from it.")


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One seeded split of the bank into T and unseen folds.

    Attributes
    ----------
    kind : str
        ``slice`` or ``subject``.
    seed : int
    train : np.ndarray of int, shape (n_T,)
        Bank indices of the training set T.
    unseen : np.ndarray of int, shape (n_U,)
        Bank indices of every slice not in T.
    fold : np.ndarray of int, shape (n_U,)
        Fold of each unseen slice (0 .. n_folds-1).
    n_folds : int
    train_acquisitions, unseen_acquisitions : tuple of str
    """

    kind: str
    seed: int
    train: np.ndarray
    unseen: np.ndarray
    fold: np.ndarray
    n_folds: int
    train_acquisitions: tuple[str, ...]
    unseen_acquisitions: tuple[str, ...]

    def holdout(self, f: int) -> np.ndarray:
        """Positions in ``unseen`` of the holdout H of fold ``f`` (every other fold)."""
        return np.flatnonzero(self.fold != f)

    def novel(self, f: int) -> np.ndarray:
        """Positions in ``unseen`` of the novel pool of fold ``f``."""
        return np.flatnonzero(self.fold == f)

    def describe(self) -> str:
        return (
            f"{self.kind} split, seed {self.seed}: T = {len(self.train)} slices "
            f"({', '.join(self.train_acquisitions)}), unseen = {len(self.unseen)} in {self.n_folds} folds "
            f"({', '.join(self.unseen_acquisitions)}); H = {min(len(self.holdout(f)) for f in range(self.n_folds))}+, "
            f"novel pool = {min(len(self.novel(f)) for f in range(self.n_folds))}+ per fold"
        )


@dataclass
class _Deal:
    """What the builder's :func:`deal_splits` needs of an item: its stratum, and a ``split`` to set."""

    stratum: tuple[str, str]
    split: str = ""


def _deal(bank: SliceBank, indices: np.ndarray, fractions: dict[str, float], rng: np.random.Generator) -> list[str]:
    items = [_Deal(bank.stratum(int(i))) for i in indices]
    builder().deal_splits(items, rng, fractions)
    return [it.split for it in items]


def _min_unseen(alpha: float, n_folds: int) -> int:
    """Unseen slices needed for every fold's holdout to reach ``p <= alpha`` (``n_H >= 1/alpha - 1``)."""
    need_h = int(np.ceil(1.0 / alpha - 1e-9)) - 1
    return int(np.ceil(need_h * n_folds / (n_folds - 1)))


def _subject_partitions(
    bank: SliceBank, min_unseen: int, train_size: tuple[int, int] = SUBJECT_TRAIN_SIZE
) -> list[tuple[str, ...]]:
    """Every set of acquisitions that can be T: size within ``train_size``, >= ``min_unseen`` left unseen,
    and at least two acquisitions of >= 20 slices in T."""
    counts = bank.counts()
    acqs = sorted(counts)
    n = len(bank)
    out = []
    for r in range(1, len(acqs)):
        for combo in itertools.combinations(acqs, r):
            n_t = sum(counts[a] for a in combo)
            big = [a for a in combo if counts[a] >= 20]
            if train_size[0] <= n_t <= train_size[1] and n - n_t >= min_unseen and len(big) >= 2:
                out.append(combo)
    return out


def make_split(
    bank: SliceBank,
    kind: str,
    seed: int,
    *,
    n_folds: int = N_FOLDS,
    train_fraction: float = TRAIN_FRACTION,
    alpha: float | None = None,
) -> Split:
    """A seeded split of the bank (see the module notes).

    Parameters
    ----------
    bank : SliceBank
    kind : {"slice", "subject"}
    seed : int
    n_folds : int
        Unseen folds (>= 2); fold f's holdout is the other folds.
    train_fraction : float
        Share of the slices dealt to T in the slice split (the subject split picks whole acquisitions,
        so T's share varies).
    alpha : float, optional
        Target false-positive rate (default ``AuditConfig().alpha``); every holdout must have at least
        ``1/alpha - 1`` slices so that ``p <= alpha`` is reachable.

    Returns
    -------
    Split
    """
    alpha = AuditConfig().alpha if alpha is None else alpha
    if n_folds < 2:
        raise BenchmarkDataError(f"n_folds must be >= 2 (a fold's holdout is the other folds); got {n_folds}.")
    idx = np.arange(len(bank))
    fold_names = {f"fold{f}": (1.0 - train_fraction) / n_folds for f in range(n_folds)}
    if kind == "slice":
        labels = _deal(bank, idx, {"train": train_fraction, **fold_names}, np.random.default_rng([seed, 101]))
        lab = np.array(labels)
        train = idx[lab == "train"]
        unseen = idx[lab != "train"]
        fold = np.array([int(s[4:]) for s in lab[lab != "train"]], dtype=np.int64)
    elif kind == "subject":
        need = _min_unseen(alpha, n_folds)
        parts = _subject_partitions(bank, need)
        if not parts:
            raise BenchmarkDataError(
                f"No partition of the {len(bank.counts())} acquisitions leaves >= {need} unseen slices and a "
                "training set of >= 2 sizeable acquisitions; add sources or lower n_folds."
            )
        rng = np.random.default_rng([seed, 202])
        chosen = set(parts[int(rng.integers(len(parts)))])
        in_t = np.isin(bank.acquisition, sorted(chosen))
        train = idx[in_t]
        unseen = idx[~in_t]
        equal = {k: 1.0 / n_folds for k in fold_names}
        lab = np.array(_deal(bank, unseen, equal, np.random.default_rng([seed, 203])))
        fold = np.array([int(s[4:]) for s in lab], dtype=np.int64)
    else:
        raise BenchmarkDataError(f"Unknown split kind {kind!r}; use 'slice' or 'subject'.")
    split = Split(
        kind=kind,
        seed=seed,
        train=train,
        unseen=unseen,
        fold=fold,
        n_folds=n_folds,
        train_acquisitions=tuple(sorted(set(bank.acquisition[train].tolist()))),
        unseen_acquisitions=tuple(sorted(set(bank.acquisition[unseen].tolist()))),
    )
    check_split(bank, split, alpha=alpha)
    return split


def check_split(bank: SliceBank, split: Split, *, alpha: float = 0.01) -> None:
    """Check a split: disjoint, complete, >= 3 slices apart per volume/axis, holdouts big enough.

    The spacing rule is checked by the sample-data builder's own ``check_rows``.

    Raises
    ------
    BenchmarkDataError
    """
    b = builder()
    both = np.concatenate([split.train, split.unseen])
    if len(np.unique(both)) != len(both) or len(both) != len(bank):
        raise BenchmarkDataError("T and the unseen slices must partition the bank exactly.")
    role = {int(i): "train" for i in split.train} | {
        int(i): f"fold{f}" for i, f in zip(split.unseen, split.fold, strict=True)
    }
    rows = [
        {
            "split": role[i],
            "path": bank.key(i),
            "label": "",
            "copy_of": "",
            "source_file": str(bank.source_file[i]),
            "volume_index": str(bank.volume_index[i]),
            "axis": str(bank.axis[i]),
            "slice_index": str(int(bank.slice_index[i])),
        }
        for i in range(len(bank))
    ]
    try:
        b.check_rows(rows)
    except b.SampleDataError as e:
        raise BenchmarkDataError(str(e)) from e
    need_h = int(np.ceil(1.0 / alpha - 1e-9)) - 1
    for f in range(split.n_folds):
        if len(split.holdout(f)) < need_h:
            raise BenchmarkDataError(
                f"fold {f}: the holdout has {len(split.holdout(f))} slices; p <= {alpha} needs >= {need_h}."
            )
        if len(split.novel(f)) == 0:
            raise BenchmarkDataError(f"fold {f} has no novel slices.")
    if split.kind == "subject" and set(split.train_acquisitions) & set(split.unseen_acquisitions):
        raise BenchmarkDataError("subject split: an acquisition is on both sides.")


# ----------------------------------------------------------------------------------------------
# Copies and synthetic sets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopySet:
    """Training slices passed through one condition.

    Attributes
    ----------
    condition : str
    images : np.ndarray, shape (k, size, size), float32 in [0, 1]
    source : np.ndarray of int, shape (k,)
        Bank index of each copy's training source.
    """

    condition: str
    images: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def copy_eligible(bank: SliceBank, split: Split, condition: str) -> np.ndarray:
    """Training slices that can be the source of a copy under ``condition`` (bank indices).

    A mirror-symmetric slice is never the source of a condition that starts with a horizontal flip:
    the flipped copy would equal its source, so the condition would silently be ``none``.
    """
    from .writers import WRITER_CONDITIONS

    if condition not in CONDITIONS and condition not in WRITER_CONDITIONS:
        raise BenchmarkDataError(
            f"Unknown condition {condition!r}; valid: {sorted(CONDITIONS)} and the writer conditions "
            f"{list(WRITER_CONDITIONS)}."
        )
    t = split.train
    if condition in builder()._MIRROR_CONDITIONS:
        t = t[~bank.mirror[t]]
    return t


def make_copies(bank: SliceBank, split: Split, condition: str, n: int, seed: int) -> CopySet:
    """``n`` distinct training slices passed through ``condition`` (always applied, seeded).

    Sources follow one seeded order of T per seed (so the conditions mostly copy the same slices, a
    paired comparison), skipping slices that are not eligible for the condition.
    """
    order = split.train[np.random.default_rng([seed, 303]).permutation(len(split.train))]
    ok = set(copy_eligible(bank, split, condition).tolist())
    src = np.array([i for i in order if int(i) in ok][:n], dtype=np.int64)
    if len(src) < n:
        raise BenchmarkDataError(f"Only {len(src)} training slices are eligible for {condition!r}; {n} requested.")
    from .writers import WRITER_CONDITIONS, apply_any

    ci = sorted(CONDITIONS).index(condition) if condition in CONDITIONS else 100 + WRITER_CONDITIONS.index(condition)
    imgs = apply_any(bank.images[src], condition, np.random.default_rng([seed, 404, ci]))
    return CopySet(condition, np.ascontiguousarray(imgs, dtype=np.float32), src)


@dataclass(frozen=True)
class GSet:
    """One synthetic set: positions of its novel slices (in ``split.unseen``) and of its copies (in a CopySet)."""

    fold: int
    rate: float
    draw: int
    novel: np.ndarray
    copies: np.ndarray

    @property
    def size(self) -> int:
        return len(self.novel) + len(self.copies)

    @property
    def labels(self) -> np.ndarray:
        """1 = copy, 0 = novel, in the order novel then copies; shape (size,)."""
        return np.r_[np.zeros(len(self.novel)), np.ones(len(self.copies))].astype(np.int64)


def n_copies(rate: float, n_g: int) -> int:
    """Copies in a G of size ``n_g`` at duplication rate ``rate`` (at least 1)."""
    return max(1, int(round(rate * n_g)))


def draw_g(split: Split, fold: int, rate: float, n_g: int, n_available: int, seed: int, draw: int = 0) -> GSet:
    """Draw G for one fold and rate: ``n_copies(rate, n_g)`` copies and the rest novel slices of the fold.

    Parameters
    ----------
    split : Split
    fold : int
    rate : float
    n_g : int
        Fixed size of G.
    n_available : int
        Copies available (the CopySet's length).
    seed, draw : int
        The draw is seeded by (seed, fold, rate, draw), the same for every condition and method.
    """
    k = n_copies(rate, n_g)
    pool = split.novel(fold)
    if k > n_available or n_g - k > len(pool):
        raise BenchmarkDataError(
            f"G of {n_g} at rate {rate}: needs {k} copies ({n_available} available) and {n_g - k} novel "
            f"slices (fold {fold} has {len(pool)}); lower n_g."
        )
    rng = np.random.default_rng([seed, 505, fold, int(round(rate * 1000)), draw])
    novel = np.sort(rng.choice(pool, size=n_g - k, replace=False))
    copies = np.sort(rng.choice(n_available, size=k, replace=False))
    return GSet(fold, rate, draw, novel, copies)


def max_g_size(split: Split, rates: Sequence[float] = RATES) -> int:
    """The largest fixed size of G that every fold can fill with novel slices at every rate."""
    smallest = min(len(split.novel(f)) for f in range(split.n_folds))
    lo = min(rates)
    best = 1
    for n in range(2, 2 * smallest + 2):
        if n - n_copies(lo, n) <= smallest:
            best = n
    return best
