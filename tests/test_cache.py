"""The content-addressed embedding cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from inspector.cache import EmbeddingCache, atomic_write_bytes, default_cache_dir, hash_key


def test_hash_key_is_canonical_and_sensitive():
    a = hash_key(x=1, cfg={"b": 2, "a": (1, 2)})
    assert a == hash_key(cfg={"a": [1, 2], "b": 2}, x=1)  # order and tuple/list do not matter
    assert a != hash_key(x=1, cfg={"b": 3, "a": (1, 2)})
    assert len(a) == 64


def test_save_load_roundtrip(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = hash_key(k="roundtrip")
    arrays = {"l1": np.arange(12, dtype=np.float32).reshape(3, 4), "l2": np.ones((3, 2), np.float32)}
    assert cache.load(key) is None
    path = cache.save(key, arrays, {"extractor": "pixels"})
    assert path is not None and path.exists()
    got = cache.load(key)
    assert got is not None and set(got) == {"l1", "l2"}
    assert_array_equal(got["l1"], arrays["l1"])
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["key"] == key and manifest["extractor"] == "pixels"
    assert manifest["arrays"]["l1"]["shape"] == [3, 4]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "manifest", "shape"])
def test_corrupt_entry_is_a_miss_and_removed(tmp_path, damage):
    cache = EmbeddingCache(tmp_path)
    key = hash_key(k=damage)
    path = cache.save(key, {"l": np.ones((5, 3), np.float32)})
    man = path.with_suffix(".json")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "manifest":
        man.write_text("{broken json")
    else:
        meta = json.loads(man.read_text())
        meta["arrays"]["l"]["shape"] = [6, 3]
        man.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="Corrupt cache entry"):
        assert cache.load(key) is None
    assert not path.exists() and not man.exists()


def test_disabled_cache_never_reads_or_writes(tmp_path):
    cache = EmbeddingCache(tmp_path, enabled=False)
    key = hash_key(k="off")
    assert cache.save(key, {"l": np.ones((1, 1), np.float32)}) is None
    assert cache.load(key) is None
    assert not (tmp_path / "embeddings").exists()


def test_bad_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="64 hex"):
        EmbeddingCache(tmp_path).load("../../etc/passwd")


def test_default_cache_dir_env_and_not_site_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("INSPECTOR_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("INSPECTOR_CACHE_DIR")
    assert "site-packages" not in str(default_cache_dir())


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"abc")
    atomic_write_bytes(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
