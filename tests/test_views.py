"""The one view vocabulary (inspector.views): the eight orientations against hand-written references, the
group structure (inverse, composition, closure), torch against NumPy, the names and small rotations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from inspector.preprocess import affine_warp
from inspector.views import (
    DIHEDRAL,
    FLIPS,
    ROTATION_VIEWS,
    View,
    apply_view,
    parse_view,
    training_to_query,
)

# a non-square image, so that any confusion of the two axes shows
H, W = 3, 5


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w))


def ref_loops(x: np.ndarray, name: str) -> np.ndarray:
    """Each orientation written out pixel by pixel for one (h, w) image."""
    h, w = x.shape
    rule = {
        "id": ((h, w), lambda i, j: x[i, j]),
        "hflip": ((h, w), lambda i, j: x[i, w - 1 - j]),
        "vflip": ((h, w), lambda i, j: x[h - 1 - i, j]),
        "hvflip": ((h, w), lambda i, j: x[h - 1 - i, w - 1 - j]),
        # counter-clockwise by 90 degrees: the top row becomes the left column, read bottom-up
        "rot90": ((w, h), lambda i, j: x[j, w - 1 - i]),
        "rot270": ((w, h), lambda i, j: x[h - 1 - j, i]),
        "transpose": ((w, h), lambda i, j: x[j, i]),
        "antitranspose": ((w, h), lambda i, j: x[h - 1 - j, w - 1 - i]),
    }
    shape, f = rule[name]
    out = np.empty(shape, x.dtype)
    for i in range(shape[0]):
        for j in range(shape[1]):
            out[i, j] = f(i, j)
    return out


NUMPY_REF = {
    "id": lambda x: x,
    "hflip": np.fliplr,
    "vflip": np.flipud,
    "hvflip": lambda x: np.rot90(x, 2),
    "rot90": np.rot90,
    "rot270": lambda x: np.rot90(x, -1),
    "transpose": lambda x: x.T,
    "antitranspose": lambda x: np.rot90(x, 2).T,
}


def test_the_eight_orientations():
    assert [v.value for v in View] == list(NUMPY_REF)
    assert DIHEDRAL == tuple(View) and len(set(DIHEDRAL)) == 8
    assert FLIPS == (View.ID, View.HFLIP, View.VFLIP, View.HVFLIP)
    assert [v.is_flip for v in View] == [True] * 4 + [False] * 4
    assert [v.swaps_axes for v in View] == [False] * 4 + [True] * 4


@pytest.mark.parametrize("view", list(View), ids=str)
def test_each_view_matches_hand_written_references(view):
    x = _image()
    ref = ref_loops(x, view.value)
    assert_array_equal(NUMPY_REF[view.value](x), ref)  # the reference table agrees with the loops
    got = view.apply(x)
    assert got.shape == ref.shape == ((W, H) if view.swaps_axes else (H, W))
    assert_array_equal(got, ref)
    # the 8 images of one generic image are all different: no two views coincide
    others = [v.apply(x) for v in View if v is not view]
    assert not any(o.shape == got.shape and np.array_equal(o, got) for o in others)
    # batches: the last two axes, every leading index alike
    batch = np.stack([np.stack([_image(seed=3 * a + b) for b in range(3)]) for a in range(2)])  # (2, 3, H, W)
    out = view.apply(batch)
    assert out.shape == (2, 3, *ref.shape)
    for a, b in itertools.product(range(2), range(3)):
        assert_array_equal(out[a, b], ref_loops(batch[a, b], view.value))


@pytest.mark.parametrize("view", list(View), ids=str)
def test_numpy_results_are_contiguous_copies(view):
    x = _image(6, 6)
    y = view.apply(x)
    if view is View.ID:
        assert y is x
        return
    assert y.flags.c_contiguous and not np.shares_memory(y, x)
    y[...] = -1.0
    assert (x >= 0).all()  # writing the result leaves the input alone


def test_inverse():
    expected = {View.ROT90: View.ROT270, View.ROT270: View.ROT90}
    x = _image()
    for v in View:
        assert v.inverse is expected.get(v, v)  # the rotations by +-90 swap, everything else undoes itself
        assert_array_equal(v.inverse.apply(v.apply(x)), x)
        assert_array_equal(v.apply(v.inverse.apply(x)), x)
        assert v.then(v.inverse) is View.ID and v.inverse.then(v) is View.ID
        assert v.inverse.inverse is v


def test_composition_is_closed_and_is_the_group_of_the_square():
    x = _image()
    table = {}
    for a, b in itertools.product(View, View):
        c = a.then(b)
        assert isinstance(c, View)  # closure: composing two views is a view
        assert_array_equal(c.apply(x), b.apply(a.apply(x)))  # a first, then b
        table[a, b] = c
        assert a.then(b.value) is c  # names are accepted too
    # identity element, a Latin square (every row and column a permutation), associativity
    for a in View:
        assert table[View.ID, a] is a and table[a, View.ID] is a
        assert {table[a, b] for b in View} == set(View)
        assert {table[b, a] for b in View} == set(View)
    for a, b, c in itertools.product(View, View, View):
        assert table[table[a, b], c] is table[a, table[b, c]]
    # not commutative (D4): a flip and a quarter turn do not commute
    assert View.HFLIP.then(View.ROT90) is not View.ROT90.then(View.HFLIP)
    # a few products written out
    assert View.HFLIP.then(View.VFLIP) is View.HVFLIP
    assert View.ROT90.then(View.ROT90) is View.HVFLIP
    assert View.TRANSPOSE.then(View.HVFLIP) is View.ANTITRANSPOSE
    assert View.HFLIP.then(View.ROT90) is View.TRANSPOSE  # mirror, then a quarter turn
    assert View.ROT90.then(View.HFLIP) is View.ANTITRANSPOSE
    # the flips are a subgroup
    for a, b in itertools.product(FLIPS, FLIPS):
        assert a.then(b) in FLIPS


@pytest.mark.parametrize("view", list(View), ids=str)
def test_torch_matches_numpy(view):
    x = np.random.default_rng(7).random((2, 4, 7)).astype(np.float32)
    t = torch.from_numpy(x.copy())
    got = view.apply(t)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert_array_equal(got.numpy(), view.apply(x))
    assert_array_equal(t.numpy(), x)  # the input tensor is untouched
    assert_array_equal(view.apply(torch.from_numpy(x[0].copy())).numpy(), view.apply(x[0]))  # one (H, W) image


def test_names_and_aliases():
    aliases = {
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
    for name, view in aliases.items():
        assert View.parse(name) is view
        assert View.parse(f"  {name.upper()} ") is view  # case and surrounding blanks do not matter
        assert parse_view(name) is view
    for v in View:
        assert View.parse(v.value) is v and View.parse(v) is v and View(v.value) is v
        assert str(v) == v.value and f"{v}" == v.value and v == v.value  # a StrEnum: writes as its name
    assert View.parse("HVflip") is View.HVFLIP
    assert View.parse("rot90") is View.ROT90 and parse_view("rot90") is View.ROT90  # not a small rotation


@pytest.mark.parametrize("bad", ["diagonal", "", "flip", "hhflip", "rot"])
def test_bad_names_raise(bad):
    with pytest.raises(ValueError, match=f"Unknown view {bad!r}") as e:
        View.parse(bad)
    assert "hflip" in str(e.value) and "none" in str(e.value)  # the message lists the names and the aliases
    with pytest.raises(ValueError):
        apply_view(np.zeros((1, 4, 4)), bad)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        View.ROT90.apply(np.zeros(4))
    with pytest.raises(ValueError, match="Bad rotation view 'rotx'"):
        apply_view(np.zeros((1, 4, 4)), "rotx")


def test_apply_view_orientations_and_small_rotations():
    x = np.random.default_rng(8).random((3, 12, 12))
    for v in View:
        got = apply_view(x, v.value)
        assert got.dtype == np.float32
        assert_array_equal(got, v.apply(x.astype(np.float32)))
        assert_array_equal(apply_view(x, v), got)
    for alias, v in {"none": View.ID, "h": View.HFLIP, "rot180": View.HVFLIP}.items():
        assert_array_equal(apply_view(x, alias), v.apply(x.astype(np.float32)))
    # small rotations go through affine_warp (counter-clockwise degrees)
    assert ROTATION_VIEWS == ("rot-5", "rot+5", "rot-10", "rot+10")
    x32 = x.astype(np.float32)
    for name, angle in zip(ROTATION_VIEWS, (-5.0, 5.0, -10.0, 10.0), strict=True):
        assert parse_view(name) == angle
        got = apply_view(x, name)
        assert got.shape == x.shape and got.dtype == np.float32
        assert_allclose(got, affine_warp(torch.from_numpy(x32), angle_deg=angle).numpy(), rtol=0, atol=1e-7)
    assert not np.allclose(apply_view(x, "rot+5"), apply_view(x, "rot-5"))
    assert_allclose(apply_view(x, "rot+0"), x32, atol=1e-5)
    # the two vocabularies agree on the direction: a small rotation by +90 degrees is the quarter turn rot90
    assert_allclose(apply_view(x, "rot+90"), View.ROT90.apply(x32), atol=1e-5)


def test_training_to_query():
    q = np.random.default_rng(9).random((2, 5, 5))
    for v in View:
        training = v.apply(q)  # matched under v: v(query) = training
        back = training_to_query(v)
        assert back is v.inverse and training_to_query(v.value) is v.inverse
        assert_array_equal(back.apply(training), q)  # brings the training slice into the query's frame
    for name in ROTATION_VIEWS:
        assert training_to_query(name) is View.ID  # the registration recovers a small angle itself
    assert training_to_query("none") is View.ID
    with pytest.raises(ValueError, match="Unknown view"):
        training_to_query("diagonal")
