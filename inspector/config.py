"""Every setting of an audit, in one frozen dataclass: :class:`AuditConfig`.

The CLI's ``scan`` options and the app's settings are generated from its fields (:func:`settings`): the help
text comes from the class docstring's ``Attributes`` section, the choices from the field's metadata or, for
``extractor``, from the extractor registry. A new setting is one new field with its docstring entry; it then
appears in ``inspector scan --help``, in the app and in ``summary.json``'s config.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuditConfig", "Setting", "settings"]

#: Sections that group the settings in the app and the CLI's help.
SECTIONS: tuple[str, ...] = ("method", "decision", "matching", "input", "runtime")


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
        Views of each synthetic slice matched against the training set (default mode; see inspector.views).
        Paper mode uses the identity only.
    rerank : bool
        Alignment-verified re-ranking of the feature shortlist (default mode).
    shortlist : int
        Training candidates per synthetic slice that are registered and re-ranked (10: measured better than 5
        on shifted and cropped copies, benchmarks/RESULTS.md).
    align_flips : str
        all: register each candidate under all four flips (default, measured best); matched: only under the
        flip of the feature view that found it.
    top_k : int
        Neighbours kept per layer for display and attribution.
    axis : str
        Slicing axis for volumes.
    size : int
        Square size in pixels slices are resampled to on loading.
    align_size : int
        Working resolution in pixels of the registration.
    n_bootstrap : int
        Split-half bootstrap rounds of the paper's null.
    device : str
        auto (CUDA when present, else CPU), cpu or cuda.
    seed : int
        Random seed (encoder training, bootstrap, k-means).
    """

    mode: str = _opt("default", "method", choices=("default", "paper"))
    extractor: str = _opt("ssl", "method", choices=None, registry="extractors")
    checkpoint: str | None = _opt(None, "method", metavar="FILE")
    layers: tuple[str, ...] = _opt((), "method", metavar="NAMES")
    alpha: float = _opt(0.01, "decision")
    fdr: bool = _opt(False, "decision")
    views: tuple[str, ...] = _opt(("id", "hflip", "vflip", "hvflip"), "matching", metavar="NAMES")
    rerank: bool = _opt(True, "matching")
    shortlist: int = _opt(10, "matching", minimum=1)
    align_flips: str = _opt("all", "matching", choices=("all", "matched"))
    top_k: int = _opt(5, "matching", minimum=1)
    axis: str = _opt("axial", "input", choices=("axial", "coronal", "sagittal"))
    size: int = _opt(128, "input", minimum=16)
    align_size: int = _opt(64, "matching", minimum=16)
    n_bootstrap: int = _opt(10, "method", minimum=1)
    device: str = _opt("auto", "runtime", choices=("auto", "cpu", "cuda"))
    seed: int = _opt(0, "runtime", minimum=0)

    def __post_init__(self) -> None:
        for s in settings(registry=False):
            value = getattr(self, s.name)
            if s.choices is not None and value not in s.choices:
                raise ValueError(f"{s.name} must be one of {s.choices}; got {value!r}.")
            if s.minimum is not None and value < s.minimum:
                raise ValueError(f"{s.name} must be >= {s.minimum}; got {value!r}.")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}.")
        from .views import canonical_view_name

        # one spelling per view, so that aliases hash to the same audit and cache entries
        object.__setattr__(self, "views", tuple(dict.fromkeys(canonical_view_name(v) for v in self.views)))
        if "id" not in self.views:
            raise ValueError(f"views must include 'id'; got {self.views}.")

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
    minimum : int or None
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


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(AuditConfig) if f.name == name)


def _extractor_names() -> list[str]:
    from .models import available_extractors

    return available_extractors()
