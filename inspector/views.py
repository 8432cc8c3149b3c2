"""The one view vocabulary: the eight orientations of a square image (the dihedral group) and small rotations.

A *view* is what a generator may have done to a copy before writing it: flip it, rotate it by a multiple of
90°, transpose it (row-major against column-major), or rotate it by a few degrees. Features, registration,
baselines, results and the UI all speak this vocabulary; nothing else in the package spells out a flip.

- :class:`View` is the dihedral group ``D4`` acting on the last two axes of an array (NumPy or torch):
  ``id``, ``hflip`` (mirror left-right), ``vflip`` (mirror up-down), ``hvflip`` (= rotation by 180°),
  ``rot90`` (counter-clockwise, as :func:`numpy.rot90`), ``rot270``, ``transpose`` (swap rows and columns) and
  ``antitranspose``. Each has :meth:`View.apply`, :meth:`View.inverse` and :meth:`View.then` (composition).
- :data:`FLIPS` are the four views of the flip group (``id``, ``hflip``, ``vflip``, ``hvflip``): what the
  registration searches and the default feature views.
- Small rotations are named ``rot<signed degrees>`` (``rot+5``, ``rot-10``); :func:`apply_view` applies any
  view name to a batch.

Convention: a query matched under view ``v`` satisfies ``v(query) ≈ training``, hence
``query ≈ v.inverse(training)``: :func:`training_to_query` is the view that brings a training slice into the
query's frame (for display and registration).
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

__all__ = [
    "View",
    "FLIPS",
    "DIHEDRAL",
    "ROTATION_VIEWS",
    "apply_view",
    "canonical_view_name",
    "parse_view",
    "training_to_query",
]


class View(enum.StrEnum):
    """An orientation of a square image (an element of the dihedral group acting on the last two axes).

    The value is the canonical name written in every output (``scores.csv``'s ``view`` and ``align_flip``,
    ``audit.npz``, the evidence, the app). :meth:`parse` also accepts the aliases ``none``/``identity`` (id),
    ``h``, ``v``, ``hv``/``vh``/``rot180`` and ``t``.
    """

    ID = "id"
    HFLIP = "hflip"
    VFLIP = "vflip"
    HVFLIP = "hvflip"
    ROT90 = "rot90"
    ROT270 = "rot270"
    TRANSPOSE = "transpose"
    ANTITRANSPOSE = "antitranspose"

    def __str__(self) -> str:
        return self.value

    # ------------------------------------------------------------------ naming
    @classmethod
    def parse(cls, name: str | View) -> View:
        """The view called ``name`` (canonical name or alias).

        Raises
        ------
        ValueError
            Naming the unknown value and the valid names.
        """
        if isinstance(name, View):
            return name
        key = str(name).strip().lower()
        hit = _ALIASES.get(key)
        if hit is None:
            raise ValueError(
                f"Unknown view {str(name)!r}; valid views: {[v.value for v in cls]} "
                f"(aliases: {sorted(k for k in _ALIASES if k not in cls._value2member_map_)})."
            )
        return hit

    # ------------------------------------------------------------------ group structure
    @property
    def _code(self) -> tuple[int, bool]:
        """``(k, t)``: the view is ``rot90^k`` after an optional transpose (``t``)."""
        return _CODES[self]

    @property
    def inverse(self) -> View:
        """The view that undoes this one: ``v.inverse.apply(v.apply(x)) == x``."""
        k, t = self._code
        return _FROM_CODE[((-k) % 4 if not t else k, t)]

    def then(self, other: View | str) -> View:
        """The composition ``other ∘ self``: apply ``self`` first, then ``other``."""
        o = View.parse(other)
        k1, t1 = self._code
        k2, t2 = o._code
        # x -> R^k1 T^t1 x -> R^k2 T^t2 R^k1 T^t1 x; T R^k = R^-k T
        if t2:
            return _FROM_CODE[((k2 - k1) % 4, t1 ^ t2)]
        return _FROM_CODE[((k2 + k1) % 4, t1)]

    @property
    def is_flip(self) -> bool:
        """True for the four views of the flip group (:data:`FLIPS`)."""
        return self in FLIPS

    @property
    def swaps_axes(self) -> bool:
        """True when the view exchanges height and width (the odd rotations and the transposes)."""
        k, t = self._code
        return (k % 2 == 1) != t

    # ------------------------------------------------------------------ application
    def apply(self, x: Any) -> Any:
        """Apply the view to the last two axes of ``x``.

        Parameters
        ----------
        x : np.ndarray or torch.Tensor, shape (..., H, W)

        Returns
        -------
        same type, shape (..., H, W), or (..., W, H) when :attr:`swaps_axes`. NumPy results are contiguous
        copies (never views of the input) except for ``id``, which returns ``x`` itself.
        """
        if self is View.ID:
            return x
        axes = _FLIP_AXES.get(self)
        if axes is not None:  # the flips, directly
            return x.flip(axes) if _is_torch(x) else np.ascontiguousarray(np.flip(np.asarray(x), axes))
        k, t = self._code
        if _is_torch(x):
            y = x.transpose(-2, -1) if t else x
            return y.rot90(k, dims=(-2, -1)) if k else y.contiguous()
        a = np.asarray(x)
        if a.ndim < 2:
            raise ValueError(f"View {self.value!r} needs an array of shape (..., H, W); got shape {a.shape}.")
        y = np.swapaxes(a, -2, -1) if t else a
        if k:
            y = np.rot90(y, k, axes=(-2, -1))
        return np.ascontiguousarray(y)


_CODES: dict[View, tuple[int, bool]] = {
    View.ID: (0, False),
    View.ROT90: (1, False),
    View.HVFLIP: (2, False),
    View.ROT270: (3, False),
    View.TRANSPOSE: (0, True),
    # rot90 after a transpose mirrors up-down; rot270 after a transpose mirrors left-right
    View.VFLIP: (1, True),
    View.ANTITRANSPOSE: (2, True),
    View.HFLIP: (3, True),
}
_FROM_CODE: dict[tuple[int, bool], View] = {c: v for v, c in _CODES.items()}
_FLIP_AXES: dict[View, tuple[int, ...]] = {View.HFLIP: (-1,), View.VFLIP: (-2,), View.HVFLIP: (-2, -1)}
_ALIASES: dict[str, View] = {
    **{v.value: v for v in View},
    "none": View.ID,
    "identity": View.ID,
    "h": View.HFLIP,
    "v": View.VFLIP,
    "hv": View.HVFLIP,
    "vh": View.HVFLIP,
    "vhflip": View.HVFLIP,
    "rot180": View.HVFLIP,
    "t": View.TRANSPOSE,
}

#: The flip group: identity, left-right, up-down and both (= 180°).
FLIPS: tuple[View, ...] = (View.ID, View.HFLIP, View.VFLIP, View.HVFLIP)
#: All eight orientations.
DIHEDRAL: tuple[View, ...] = tuple(View)
#: Small-rotation view names understood by :func:`apply_view` (any ``rot<signed degrees>`` works).
ROTATION_VIEWS: tuple[str, ...] = ("rot-5", "rot+5", "rot-10", "rot+10")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _rotation_angle(name: str) -> float | None:
    """The angle of a ``rot<signed degrees>`` view name, or None when ``name`` is not one."""
    s = str(name).strip().lower()
    if not s.startswith("rot") or s in _ALIASES:
        return None
    try:
        return float(s[3:])
    except ValueError as e:
        raise ValueError(
            f"Bad rotation view {name!r}; use e.g. 'rot+5' or 'rot-10', or one of {list(_ALIASES)}."
        ) from e


def parse_view(name: str | View) -> View | float:
    """A :class:`View`, or the angle in degrees of a small-rotation view ``rot<deg>``.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if isinstance(name, View):
        return name
    angle = _rotation_angle(str(name))
    return View.parse(name) if angle is None else angle


def apply_view(images: np.ndarray, view: str | View) -> np.ndarray:
    """Apply a named view to a batch of images.

    Parameters
    ----------
    images : np.ndarray, shape (n, H, W)
    view : str or View
        A :class:`View` name (or alias), or ``rot<signed degrees>`` (e.g. ``rot+5``: a rotation about the
        centre, zero padded, through :func:`inspector.preprocess.affine_warp`).

    Returns
    -------
    np.ndarray, shape (n, H, W) (``(n, W, H)`` for views that swap axes), float32
    """
    x = np.asarray(images, dtype=np.float32)
    v = parse_view(view)
    if isinstance(v, View):
        return v.apply(x)
    import torch

    from .preprocess import affine_warp

    return affine_warp(torch.from_numpy(np.ascontiguousarray(x)), angle_deg=v).numpy()


def canonical_view_name(name: str | View) -> str:
    """The canonical spelling of a view name (``"h"`` -> ``"hflip"``, ``"rot+5.0"`` -> ``"rot+5"``)."""
    v = parse_view(name)
    return v.value if isinstance(v, View) else f"rot{v:+g}"


def training_to_query(view: str | View) -> View:
    """The orientation that maps a training slice onto a query matched under ``view``.

    ``v(query) ≈ training`` gives ``query ≈ v.inverse(training)``. A small-rotation view maps to ``id``: the
    registration recovers the angle.
    """
    v = parse_view(view)
    return v.inverse if isinstance(v, View) else View.ID
