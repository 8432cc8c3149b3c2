"""The memory-mapped slice store (inspector.store): written once, reused, checked, and invisible in the results."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_array_equal

from inspector.config import AuditConfig
from inspector.io import load_cohort
from inspector.pipeline import audit
from inspector.store import store_path, to_store
from inspector.types import Cohort, Slice


def _cohort(rng: np.random.Generator, n: int = 7, shape: tuple[int, int] = (16, 16)) -> Cohort:
    slices = [Slice(rng.random(shape).astype(np.float32), f"sub-{i % 3}", f"s{i}.png", 0, "axial") for i in range(n)]
    return Cohort(slices, root="/data/t")


def test_store_holds_every_slice_read_only_and_stack_returns_it(tmp_path):
    c = _cohort(np.random.default_rng(0))
    before = c.stack()
    to_store(c, tmp_path)
    path = store_path(c, tmp_path)
    assert path is not None and path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # patient pixels: owner only
    assert isinstance(c.store, np.memmap) and c.store.shape == (7, 16, 16)
    assert_array_equal(c.store, before)
    for i, s in enumerate(c.slices):
        assert np.shares_memory(s.array, c.store)
        assert_array_equal(s.array, before[i])
        with pytest.raises(ValueError):
            s.array[0, 0] = 1.0  # read-only
    assert c.stack() is c.store and c.stack(size=16) is c.store
    resized = c.stack(size=8)  # another size: a new array, as before
    assert resized.shape == (7, 8, 8) and not np.shares_memory(resized, c.store)
    sub = c.subset([2, 0])
    assert_array_equal(sub.stack(), before[[2, 0]])


def test_store_is_reused_and_a_damaged_file_is_rewritten(tmp_path, caplog):
    rng = np.random.default_rng(1)
    c = _cohort(rng)
    originals = [np.array(s.array) for s in c.slices]
    to_store(c, tmp_path)
    path = store_path(c, tmp_path)
    mtime = path.stat().st_mtime_ns
    again = Cohort([Slice(np.array(s.array), s.subject_id, s.path, 0, "axial") for s in c.slices], root="/data/t")
    to_store(again, tmp_path)
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert_array_equal(again.store, c.store)
    # damage one value of the file (same shape): the check against the slices read catches it
    arr = np.load(path, mmap_mode="r+")
    arr[3, 4, 5] = arr[3, 4, 5] + 0.5
    arr.flush()
    del arr
    rows = [Slice(a, s.subject_id, s.path, 0, "axial") for a, s in zip(originals, c.slices, strict=True)]
    third = Cohort(rows, root="/data/t")
    with caplog.at_level(logging.WARNING, logger="inspector.store"):
        to_store(third, tmp_path)
    assert "differs from the slices read" in caplog.text
    assert_array_equal(third.store, np.stack(originals))


def test_store_rejects_a_file_of_another_shape(tmp_path, caplog):
    c = _cohort(np.random.default_rng(2))
    path = store_path(c, tmp_path)
    path.parent.mkdir(parents=True)
    np.save(path, np.zeros((3, 16, 16), np.float32))
    with caplog.at_level(logging.WARNING, logger="inspector.store"):
        to_store(c, tmp_path)
    assert "expected (7, 16, 16)" in caplog.text
    assert c.store.shape == (7, 16, 16)


def test_resized_store_is_the_in_memory_resize_written_once_beside_its_parent(tmp_path):
    from inspector.preprocess import resize_square
    from inspector.store import resized_store

    rng = np.random.default_rng(11)
    c = to_store(_cohort(rng, n=5), tmp_path)
    memory = np.stack([resize_square(s.array, 7) for s in Cohort(list(c.slices), root="/data/x").slices])
    sized = c.stack(size=7)
    assert isinstance(sized, np.memmap) and not sized.flags.writeable
    assert_array_equal(sized, memory)
    path = Path(sized.filename)
    assert path.name == f"{Path(c.store.filename).stem}-7px.npy" and stat.S_IMODE(path.stat().st_mode) == 0o600
    mtime = path.stat().st_mtime_ns
    assert_array_equal(c.stack(size=7), memory) and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert c.stack(size=c.store.shape[1]) is c.store  # at the store's own size: the store itself
    assert resized_store(np.zeros((2, 4, 4), np.float32), 3) is None  # not a file: the caller resizes in memory
    with pytest.raises(ValueError, match="size >= 1"):
        resized_store(c.store, 0)
    path.write_bytes(b"damaged")  # a damaged copy is rewritten
    assert_array_equal(c.stack(size=7), memory)


def test_mixed_shapes_and_empty_cohorts_stay_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    c = _cohort(rng, n=2)
    c.slices.append(Slice(rng.random((8, 9)).astype(np.float32), "sub-9", "odd.png", 0, "axial"))
    assert to_store(c, tmp_path).store is None and store_path(c, tmp_path) is None
    assert not (tmp_path / "slices").exists()
    empty = Cohort([], root="/data/e")
    assert to_store(empty, tmp_path).store is None


def test_audit_uses_the_store_only_with_the_cache_and_gives_the_same_result(audit_cohorts, tmp_path):
    p = audit_cohorts
    cfg = AuditConfig(extractor="pixels")
    with_store = audit(p["train"], p["synthetic"], p["holdout"], cfg, cache_dir=tmp_path / "c")
    files = sorted((tmp_path / "c" / "slices").glob("*.npy"))
    parents = [f for f in files if not f.stem.endswith("px")]
    assert len(parents) == 3  # train, synthetic, holdout
    # and each one's copy at the extractor's input size (read by training and extraction), none other
    from inspector.models import extractor_class

    size = extractor_class("pixels").config_cls().input_size
    assert size != cfg.size  # else no resized copy is needed and this test checks nothing
    assert sorted(f.name for f in files if f not in parents) == sorted(f"{f.stem}-{size}px.npy" for f in parents)
    without = audit(p["train"], p["synthetic"], p["holdout"], cfg, cache_dir=tmp_path / "n", use_cache=False)
    assert not (tmp_path / "n").exists() or not (tmp_path / "n" / "slices").exists()
    cols = ["similarity", "p_value", "flagged", "nearest_train_path", "view"]
    pd.testing.assert_frame_equal(with_store.table[cols], without.table[cols], check_exact=True)
    assert with_store.audit_id == without.audit_id
    # the train file holds exactly the loaded training slices
    train = load_cohort(p["train"])
    stored = np.load(store_path(train, tmp_path / "c"), mmap_mode="r")
    assert stored.shape[0] == len(train)


def test_spilled_loading_gives_the_same_slices_and_leaves_no_file(tmp_path):
    from PIL import Image

    from inspector.io import LoadConfig
    from inspector.preprocess import PreprocessConfig
    from inspector.store import SliceSpill

    rng = np.random.default_rng(5)
    data = tmp_path / "data"
    for i in range(3):  # 3 volumes of 6 slices and 4 PNG images: 22 slices, spilled 5 at a time
        sub = data / f"sub-{i}"
        sub.mkdir(parents=True)
        np.save(sub / "vol.npy", rng.uniform(0.2, 1.0, (6, 20, 20)).astype(np.float32))
    for i in range(4):
        Image.fromarray((rng.uniform(0.2, 1.0, (20, 20)) * 255).astype(np.uint8)).save(data / f"img{i}.png")
    lc = LoadConfig(preprocess=PreprocessConfig(size=16), array_axis=0)
    plain = load_cohort(data, lc)
    spill = SliceSpill(tmp_path / "cache", chunk=5)
    spilled = load_cohort(data, lc, spill=spill)
    assert len(spilled.slices) == len(plain.slices) == 22
    assert spill.spilled == 22 and 3 <= spill.files <= 5  # whole volumes, flushed once 5 or more are pending
    for a, b in zip(plain.slices, spilled.slices, strict=True):
        assert (a.key, a.subject_id, a.sha256) == (b.key, b.subject_id, b.sha256)
        assert_array_equal(a.array, b.array)
        assert not b.array.flags.owndata and not b.array.flags.writeable  # a view of the mapped spill file
    assert_array_equal(spilled.stack(), plain.stack())
    assert spilled.content_hash == plain.content_hash
    assert list((tmp_path / "cache" / "slices").iterdir()) == []  # unlinked once mapped
    to_store(spilled, tmp_path / "cache")  # then into the content-addressed store, as a loaded cohort
    assert_array_equal(spilled.store, plain.stack())
    with pytest.raises(ValueError, match="chunk"):
        SliceSpill(tmp_path, chunk=0)


def _rss_file_kb() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssFile:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.skipif(_rss_file_kb() is None, reason="needs Linux /proc/self/status")
def test_release_pages_drops_a_read_store_from_the_resident_set_and_keeps_its_data(tmp_path):
    from inspector.store import release_pages

    rng = np.random.default_rng(0)
    data = rng.random((512, 128, 128), dtype=np.float32)  # 32 MB
    np.save(tmp_path / "s.npy", data)
    arr = np.load(tmp_path / "s.npy", mmap_mode="r")
    before = _rss_file_kb()
    total = float(np.asarray(arr, np.float64).sum())  # touches every page
    touched = _rss_file_kb()
    assert touched - before > 24_000  # the mapped pages are now resident in this process
    release_pages(arr[3], None, data, "not an array", np.asarray(arr))  # a row view finds the whole mapping
    after = _rss_file_kb()
    assert touched - after > 24_000, (before, touched, after)
    assert float(np.asarray(arr, np.float64).sum()) == total  # re-read from the page cache, unchanged
    assert_array_equal(arr[100], data[100])
    release_pages()  # nothing to do


def test_row_subset_reads_the_rows_it_names_and_rejects_rows_outside_the_stack(tmp_path):
    from inspector.store import RowSubset
    from inspector.volumes import VolumeRef, stack_volume

    rng = np.random.default_rng(1)
    data = rng.random((20, 8, 8), dtype=np.float32)
    np.save(tmp_path / "s.npy", data)
    stack = np.load(tmp_path / "s.npy", mmap_mode="r")
    rows = np.array([3, 7, 8, 9, 15])
    sub = RowSubset(stack, rows)
    assert len(sub) == 5 and sub.shape == (5, 8, 8)
    assert_array_equal(sub[np.array([4, 0])], data[[15, 3]])
    assert_array_equal(sub[1:3], data[[7, 8]])
    ref = VolumeRef("v", np.array([1, 2, 3]), np.array([0, 1, 2]), "s")
    assert_array_equal(stack_volume(sub, ref), stack_volume(data[rows], ref))  # as the copied sample reads
    with pytest.raises(IndexError, match=r"rows \[20, -1\] are outside the stack's 20 rows"):
        RowSubset(stack, [0, 20, -1])


def test_stack_hash_streams_the_digest_of_the_whole_array(tmp_path):
    import hashlib

    from inspector.store import stack_hash

    a = np.random.default_rng(2).random((9, 5, 4)).astype(np.float32)
    h = hashlib.blake2b(digest_size=32)
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
    np.save(tmp_path / "a.npy", a)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert stack_hash(a) == stack_hash(mapped, chunk=2) == stack_hash(a.astype(np.float64), chunk=4) == h.hexdigest()
    assert stack_hash(a[:, ::-1]) != h.hexdigest()  # a non-contiguous view hashes its values, in order
    with pytest.raises(ValueError, match="chunk"):
        stack_hash(a, chunk=0)
