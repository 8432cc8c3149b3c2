"""Every setting of an audit, in one frozen dataclass: :class:`AuditConfig`.

The CLI's ``scan`` options and the app's settings are generated from its fields (:func:`settings`): the help
text comes from the class docstring's ``Attributes`` section, the choices from the field's metadata or, for
``extractor``, from the extractor registry. A new setting is one new field with its docstring entry; it then
appears in ``inspector scan --help``, in the app and in ``summary.json``'s config.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuditConfig", "ConfigError", "Setting", "settings"]

#: Sections that group the settings in the app and the CLI's help.
SECTIONS: tuple[str, ...] = ("method", "decision", "matching", "input", "runtime")


class ConfigError(ValueError):
    """A setting has a value outside its choices or bounds, or cannot be used on this machine.

    Attributes
    ----------
    field : str
        The :class:`AuditConfig` field at fault (``--field-with-dashes`` on the command line).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    @property
    def flag(self) -> str:
        """The command-line option of :attr:`field`."""
        return "--" + self.field.replace("_", "-")


def _opt(default: Any, section: str, *, choices: tuple[Any, ...] | None = None, **meta: Any) -> Any:
    return field(default=default, metadata={"section": section, "choices": choices, **meta})


@dataclass(frozen=True)
class AuditConfig:
    """Every setting of an audit. Frozen and hashed into the audit ID.

    Attributes
    ----------
    mode : str
        default: calibrated, view-invariant, alignment-verified scores (p-values, flags at alpha); paper: Deo
        et al. 2026 exactly (z-scored MI, ONI, split-half bootstrap null).
    extractor : str
        Feature extractor: ssl (a contrastive encoder trained on the training set, cached), mri-core (needs a
        checkpoint), pixels (downsampled intensities, a baseline).
    checkpoint : str or None
        MRI-CORE weights file (DINOv2-style or SAM format), for extractor mri-core.
    layers : tuple of str
        Feature layers to use (comma-separated on the command line); empty = the extractor's defaults.
    alpha : float
        Target false-positive rate per synthetic slice: a slice is flagged when its p-value <= alpha.
    fdr : bool
        Control the false discovery rate across the synthetic set (Benjamini-Hochberg at level alpha)
        instead of a per-slice alpha.
    views : tuple of str
        Views of each synthetic slice matched against the training set (default mode; see inspector.views):
        all eight orientations by default (the flips, the 90-degree rotations, transpose and anti-transpose, a
        generator's output may come back in any of them); the registration searches the same orientations and
        the null is scored under exactly the same views. Paper mode uses the identity only.
    rerank : bool
        Alignment-verified re-ranking of the feature shortlist (default mode).
    shortlist : int
        Training candidates per synthetic slice that are registered and re-ranked (10: measured better than 5
        on shifted and cropped copies, benchmarks/RESULTS.md).
    align_flips : str
        all: register each candidate under every orientation of the views (default, measured best; always
        at least the four flips); matched: only under the orientation of the feature view that found it.
    descriptor_shortlist : int
        Extra candidates per synthetic slice from a moment-normalised structure descriptor (whitened on the
        training set, searched over every view), registered beside the encoder's shortlist: an encoder
        trained for invariance stops separating look-alike subjects of one protocol as the cohort grows
        (benchmarks/RESULTS.md, look-alike cohorts); 0 turns it off.
    rotation_shortlist : int
        Extra candidates per synthetic slice from a rotation-invariant descriptor (the magnitudes of the
        angular harmonics of rings about the anatomy's centroid, whitened on the training set): a copy rotated
        far from the eight orientations is found by neither the encoder nor the structure descriptor; 0
        turns it off.
    max_angle : float
        Largest in-plane rotation, in degrees beyond the eight orientations, that the registration accepts:
        180 (default) finds a copy rotated by any angle (the registration also starts from the angle read
        off the slices' rings about their centroids); 15 accepts small rotations only (the earlier default).
    verify_top : int
        Pruned verification: every candidate is registered coarsely (32 px) under every orientation, and the
        best verify_top per synthetic slice are registered at align_size and scored; 0 verifies all in full.
    top_k : int
        Neighbours kept per layer for display and attribution.
    unit : str
        What is signed off. volume: every synthetic volume (a NIfTI file, a DICOM series) is also matched as a
        whole: the training volumes its slices match in a consistent order are verified by 3D registration,
        and the volume is calibrated against the holdout volumes scored the same way (volumes.csv, the
        verdict counts volumes); slice: slices only (faster). auto (default): volume when the synthetic set
        and the training set hold volumes of at least 8 slices, else slice.
    volume_shortlist : int
        Training volumes registered in 3D per synthetic volume (those of most consistent slice runs).
    volume_null_train : int
        Training volumes (at most, seeded sample) scored like synthetic ones but against the other training
        subjects only (leave one subject out) and added to the holdout volumes as the volume null: the volume
        similarity is a 3D NCC with nothing fitted on T, so these are as unseen as holdout volumes, and a
        study's few holdout volumes alone estimate the null's tail poorly; 0: holdout volumes only.
    axis : str
        Slicing axis for volumes.
    size : int
        Square size in pixels slices are resampled to on loading (16 to 1024), or the extractor's input size
        when that is larger (224 for mri-core), so each slice is resampled once from its native grid.
    allow_skipped : bool
        Run the audit although training or holdout files could not be read (missing evidence: a copy of a
        skipped training slice cannot be detected). Off by default: the audit then refuses, naming every
        skipped file and its reason. When on, the skipped files are counted and listed in summary.json, the
        verdict and the report, and the CI gate still runs.
    show_paths : bool
        Opt in to real file and folder names in the outputs (scores.csv, subjects.csv, volumes.csv,
        summary.json, manifest.json, evidence.npz, the report, the app, the CLI). Off by default: a file or
        folder name (often a patient's name or record number) is shown as <subject pseudonym>/vol-<n>, and
        subject IDs taken from names as keyed pseudonyms (see inspector.naming). Cohort roots are only ever
        written as hashes.
    allow_outside_root : bool
        Read the rows of a CSV manifest whose path lies outside the manifest's folder (an absolute path
        elsewhere, or one climbing out with ..). Off by default: such a row is skipped with the reason (a
        skipped training or holdout row is missing evidence, so the audit refuses unless allow_skipped).
    align_size : int
        Working resolution in pixels of the registration (16 to 1024).
    n_bootstrap : int
        Split-half bootstrap rounds of the paper's null.
    device : str
        auto (CUDA when present, else CPU), cpu or cuda.
    seed : int
        Random seed (encoder training, bootstrap, k-means), 0 to 2**32 - 1.
    """

    mode: str = _opt("default", "method", choices=("default", "paper"))
    extractor: str = _opt("ssl", "method", choices=None, registry="extractors")
    checkpoint: str | None = _opt(None, "method", metavar="FILE")
    layers: tuple[str, ...] = _opt((), "method", metavar="NAMES")
    alpha: float = _opt(0.01, "decision")
    fdr: bool = _opt(False, "decision")
    views: tuple[str, ...] = _opt(
        ("id", "hflip", "vflip", "hvflip", "rot90", "rot270", "transpose", "antitranspose"), "matching", metavar="NAMES"
    )
    rerank: bool = _opt(True, "matching")
    shortlist: int = _opt(10, "matching", minimum=1, maximum=10_000)
    align_flips: str = _opt("all", "matching", choices=("all", "matched"))
    descriptor_shortlist: int = _opt(5, "matching", minimum=0, maximum=10_000)
    rotation_shortlist: int = _opt(5, "matching", minimum=0, maximum=10_000)
    max_angle: float = _opt(180.0, "matching", minimum=0.0, maximum=180.0)
    verify_top: int = _opt(3, "matching", minimum=0, maximum=10_000)
    top_k: int = _opt(5, "matching", minimum=1, maximum=1_000)
    unit: str = _opt("auto", "decision", choices=("auto", "slice", "volume"))
    volume_shortlist: int = _opt(3, "matching", minimum=1, maximum=1_000)
    volume_null_train: int = _opt(64, "decision", minimum=0, maximum=100_000)
    axis: str = _opt("axial", "input", choices=("axial", "coronal", "sagittal"))
    size: int = _opt(128, "input", minimum=16, maximum=1024)
    allow_skipped: bool = _opt(False, "input")
    show_paths: bool = _opt(False, "input")
    allow_outside_root: bool = _opt(False, "input")
    align_size: int = _opt(64, "matching", minimum=16, maximum=1024)
    n_bootstrap: int = _opt(10, "method", minimum=1, maximum=100_000)
    device: str = _opt("auto", "runtime", choices=("auto", "cpu", "cuda"))
    seed: int = _opt(0, "runtime", minimum=0, maximum=2**32 - 1)

    def __post_init__(self) -> None:
        for s in settings(registry=False):
            value = getattr(self, s.name)
            _check_type(s, value)
            if s.kind is tuple and isinstance(value, list):
                object.__setattr__(self, s.name, tuple(value))
            if s.choices is not None and value not in s.choices:
                raise ConfigError(s.name, f"{s.name} must be one of {s.choices}; got {value!r}.")
            if s.minimum is not None and value < s.minimum:
                raise ConfigError(s.name, f"{s.name} must be >= {s.minimum}; got {value!r}.")
            if s.maximum is not None and value > s.maximum:
                raise ConfigError(s.name, f"{s.name} must be <= {s.maximum}; got {value!r}.")
        if not 0 < self.alpha < 1:
            raise ConfigError("alpha", f"alpha must be in (0, 1); got {self.alpha}.")
        from .views import canonical_view_name

        # one spelling per view, so that aliases hash to the same audit and cache entries
        object.__setattr__(self, "views", tuple(dict.fromkeys(canonical_view_name(v) for v in self.views)))
        if "id" not in self.views:
            raise ConfigError("views", f"views must include 'id'; got {self.views}.")

    def preflight(self) -> None:
        """Every check of the settings that needs no data, against this machine: run before loading.

        Raises
        ------
        ConfigError
            An unknown extractor; a checkpoint for another extractor than ``mri-core``; ``mri-core`` without a
            checkpoint (``--checkpoint`` or ``$INSPECTOR_MRI_CORE_CHECKPOINT``) or with one that is not a file;
            ``device='cuda'`` on a machine without CUDA.
        """
        import os
        from pathlib import Path

        names = _extractor_names()
        if self.extractor not in names:
            raise ConfigError("extractor", f"extractor must be one of {tuple(names)}; got {self.extractor!r}.")
        if self.checkpoint and self.extractor != "mri-core":
            raise ConfigError(
                "checkpoint",
                f"A checkpoint was given ({self.checkpoint!r}) but the extractor is {self.extractor!r}; "
                "checkpoints are for extractor='mri-core'. Choose --extractor mri-core or drop --checkpoint.",
            )
        if self.extractor == "mri-core":
            from .models.mri_core import CHECKPOINT_ENV

            ck = self.checkpoint or os.environ.get(CHECKPOINT_ENV) or ""
            if not ck:
                raise ConfigError(
                    "checkpoint",
                    "extractor 'mri-core' needs its weights: pass --checkpoint FILE (the MRI-CORE .pth file) or set "
                    f"${CHECKPOINT_ENV}. They cannot be downloaded by this tool (no network access).",
                )
            if not Path(ck).expanduser().is_file():
                raise ConfigError("checkpoint", f"MRI-CORE checkpoint {ck!r} is not a file; check --checkpoint.")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "device",
                    "device 'cuda' was requested but CUDA is not available on this machine; use 'auto' or 'cpu'.",
                )

    @classmethod
    def create(cls, **kwargs: Any) -> AuditConfig:
        """Build a config, ignoring ``None`` values (so CLI defaults fall back to the dataclass's).

        Tuple settings (``layers``, ``views``) accept a comma-separated string or a list.
        """
        kw = {k: v for k, v in kwargs.items() if v is not None}
        for s in settings():
            if s.kind is tuple and s.name in kw:
                kw[s.name] = _as_tuple(kw[s.name])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> AuditConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class Setting:
    """One field of :class:`AuditConfig` as the CLI and the app present it.

    Attributes
    ----------
    name : str
        The field name (``--name-with-dashes`` on the command line).
    kind : type
        ``bool``, ``int``, ``float``, ``str`` or ``tuple`` (of str).
    default : Any
    help : str
        From the class docstring.
    section : str
        One of :data:`SECTIONS`.
    choices : tuple or None
        Allowed values (``extractor``: the extractor registry's names).
    minimum, maximum : int or None
        Bounds of a number (inclusive).
    optional : bool
        ``None`` is allowed (e.g. ``checkpoint``).
    metavar : str or None
    """

    name: str
    kind: type
    default: Any
    help: str
    section: str
    choices: tuple[Any, ...] | None
    minimum: int | None
    optional: bool
    metavar: str | None
    maximum: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _docstring_attributes(cls: type) -> dict[str, str]:
    """``{name: description}`` from a NumPy-style ``Attributes`` section."""
    doc = cls.__doc__ or ""
    part = doc.split("Attributes\n    ----------\n", 1)[-1]
    out: dict[str, str] = {}
    for m in re.finditer(r"^    (\w+) : [^\n]*\n((?:        [^\n]*\n?)+)", part, flags=re.M):
        out[m.group(1)] = " ".join(line.strip() for line in m.group(2).splitlines())
    return out


_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "str | None": str, "tuple[str, ...]": tuple}
_SETTINGS: tuple[Setting, ...] | None = None


def settings(*, registry: bool = True) -> tuple[Setting, ...]:
    """Every :class:`AuditConfig` field as a :class:`Setting`, in field order.

    Parameters
    ----------
    registry : bool
        Fill ``extractor``'s choices from the extractor registry at this moment (imports the models);
        ``False`` leaves them ``None`` (the registry itself validates the name).
    """
    global _SETTINGS
    if _SETTINGS is None:
        docs = _docstring_attributes(AuditConfig)
        out = []
        for f in dataclasses.fields(AuditConfig):
            ann = str(f.type)
            if ann not in _KINDS:
                raise TypeError(f"AuditConfig.{f.name} has type {ann!r}; settings support {sorted(_KINDS)}.")
            if f.name not in docs:
                raise TypeError(f"AuditConfig.{f.name} has no entry in the class docstring's Attributes section.")
            meta = f.metadata
            out.append(
                Setting(
                    name=f.name,
                    kind=_KINDS[ann],
                    default=f.default,
                    help=docs[f.name],
                    section=meta.get("section", "method"),
                    choices=meta.get("choices"),
                    minimum=meta.get("minimum"),
                    optional="None" in ann,
                    metavar=meta.get("metavar"),
                    maximum=meta.get("maximum"),
                )
            )
        _SETTINGS = tuple(out)
    if not registry:
        return _SETTINGS
    names = tuple(_extractor_names())
    return tuple(
        dataclasses.replace(s, choices=names) if _field(s.name).metadata.get("registry") == "extractors" else s
        for s in _SETTINGS
    )


def _np_bool() -> type:
    import numpy as np

    return np.bool_


def _check_type(s: Setting, value: Any) -> None:
    """A value of the wrong type (a str for an int, a bool for a number) is a :class:`ConfigError`."""
    if value is None and s.optional:
        return
    ok = {
        bool: lambda v: isinstance(v, bool | _np_bool()),
        int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
        float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        tuple: lambda v: isinstance(v, tuple | list),
    }[s.kind]
    if not ok(value):
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of names"}
        raise ConfigError(s.name, f"{s.name} must be {what[s.kind]}; got {value!r} ({type(value).__name__}).")


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(AuditConfig) if f.name == name)


def _extractor_names() -> list[str]:
    from .models import available_extractors

    return available_extractors()
