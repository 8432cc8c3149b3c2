"""The feature engine (inspector.extract) with real extractors: shapes, views, cache hits and misses."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

import inspector
from inspector.features import prepare_extractor
from inspector.models import MriCoreConfig, SamImageEncoder, SslExtractor, get_extractor
from inspector.types import Cohort, Slice
from inspector.views import FLIPS, ROTATION_VIEWS, View, apply_view

SSL_TINY = dict(input_size=32, width=8, epochs=6, train_batch=16, proj_dim=16)
MRI_TINY = dict(
    input_size=32,
    depth=2,
    embed_dim=32,
    num_heads=2,
    window_size=2,
    global_attn_blocks=(1,),
    layers=("block0", "block1"),
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Seeded smooth random images in [0, 1], shape (n, size, size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    x = x - x.amin(dim=(1, 2), keepdim=True)
    return (x / x.amax(dim=(1, 2), keepdim=True)).numpy().astype(np.float32)


def sam_checkpoint(path, seed: int) -> str:
    """A random tiny SAM-format checkpoint (image_encoder.* keys) with a non-zero positional embedding."""
    cfg = MriCoreConfig(**{k: v for k, v in MRI_TINY.items() if k != "layers"})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = SamImageEncoder(cfg)
        sd = {f"image_encoder.{k}": v for k, v in enc.state_dict().items()}
        sd["image_encoder.pos_embed"] = torch.randn_like(sd["image_encoder.pos_embed"])
    torch.save(sd, path)
    return str(path)


def test_pixels_views_and_shapes(tmp_path):
    imgs = smooth_images(6, 64, seed=0)
    feats = inspector.extract(imgs, extractor="pixels", views=("hflip", "rot+5", "vflip"), cache_dir=tmp_path)
    assert list(feats.views) == ["id", "hflip", "rot+5", "vflip"]
    assert feats.layer_names == ["pix8", "pix16", "pix32"] and len(feats) == 6
    for layers in feats.views.values():
        assert {k: v.shape for k, v in layers.items()} == {"pix8": (6, 64), "pix16": (6, 256), "pix32": (6, 1024)}
        assert all(v.dtype == np.float32 for v in layers.values())
    direct = get_extractor("pixels").forward_batch(torch.from_numpy(apply_view(imgs, "hflip")))
    assert_allclose(feats.views["hflip"]["pix16"], direct["pix16"].numpy(), atol=1e-6)
    assert_array_equal(apply_view(imgs, "hflip"), imgs[:, :, ::-1])  # the view really is the mirror image
    assert not np.allclose(feats.views["hflip"]["pix16"], feats.views["id"]["pix16"])
    assert feats.from_cache == {"id": False, "hflip": False, "rot+5": False, "vflip": False}


def test_every_view_name_extracts_the_viewed_images(tmp_path):
    """The flip group, the small rotations and the other orientations of inspector.views, by name."""
    imgs = smooth_images(3, 32, seed=8)
    names = (*(v.value for v in FLIPS), *ROTATION_VIEWS, "rot90", "transpose")
    feats = inspector.extract(imgs, extractor="pixels", views=names, input_size=32, cache_dir=tmp_path)
    assert list(feats.views) == list(names)
    ext = get_extractor("pixels", input_size=32)
    for name in names:
        direct = ext.forward_batch(torch.from_numpy(apply_view(imgs, name)))
        for k, v in direct.items():
            assert_allclose(feats.views[name][k], v.numpy(), atol=1e-6)
    # the views differ from one another (no name silently falls back to the identity)
    pix = {name: feats.views[name]["pix16"] for name in names}
    for a, b in zip(names, names[1:], strict=False):
        assert not np.allclose(pix[a], pix[b]), (a, b)
    assert_allclose(pix["rot90"], ext.forward_batch(torch.from_numpy(View.ROT90.apply(imgs)))["pix16"].numpy())
    # each view is its own cache entry: a second call with a subset hits them
    again = inspector.extract(imgs, extractor="pixels", views=("hflip", "rot90"), input_size=32, cache_dir=tmp_path)
    assert again.from_cache == {"id": True, "hflip": True, "rot90": True}
    with pytest.raises(ValueError, match="Unknown view"):
        inspector.extract(imgs, extractor="pixels", views=("mirror",), cache_dir=tmp_path, use_cache=False)


def test_cohort_input_is_resized(tmp_path):
    rng = np.random.default_rng(0)
    slices = [Slice(rng.random((40, 48), dtype=np.float32), subject_id=f"s{i % 2}", path=f"f{i}.png") for i in range(5)]
    cohort = Cohort(slices, tmp_path, name="toy")
    feats = inspector.extract(cohort, extractor="pixels", cache_dir=tmp_path)
    assert feats.layers["pix32"].shape == (5, 1024)
    with pytest.raises(ValueError, match="no slices"):
        inspector.extract(Cohort([], tmp_path, name="empty"), extractor="pixels", cache_dir=tmp_path)


def test_ssl_second_call_is_a_cache_hit_and_faster(tmp_path, monkeypatch):
    imgs = smooth_images(32, 48, seed=1)
    calls: list[tuple] = []
    t0 = time.perf_counter()
    first = inspector.extract(
        imgs, extractor="ssl", views=("hflip",), cache_dir=tmp_path, progress=lambda *a: calls.append(a), **SSL_TINY
    )
    cold = time.perf_counter() - t0
    assert {k: v.shape for k, v in first.layers.items()} == {
        "stage1": (32, 8),
        "stage2": (32, 16),
        "stage3": (32, 32),
        "stage4": (32, 64),
    }
    assert not any(first.from_cache.values())
    # progress: (stage, done, total) with stages training and extracting:<view>, ending at total
    assert all(isinstance(s, str) and isinstance(d, int) and isinstance(t, int) and 0 <= d <= t for s, d, t in calls)
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert stages == ["training", "extracting:id", "extracting:hflip"]
    for st in stages:
        last = [c for c in calls if c[0] == st][-1]
        assert last[1] == last[2]
    assert [c for c in calls if c[0] == "training"][-1] == ("training", 6 * 2, 6 * 2)

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(SslExtractor, "_train", boom)
    monkeypatch.setattr("inspector.features._run", boom)
    t0 = time.perf_counter()
    second = inspector.extract(imgs, extractor="ssl", views=("hflip",), cache_dir=tmp_path, **SSL_TINY)
    warm = time.perf_counter() - t0
    assert second.from_cache == {"id": True, "hflip": True}
    assert second.fingerprint == first.fingerprint and second.content_hash == first.content_hash
    for view in first.views:
        for k in first.layers:
            assert_array_equal(second.views[view][k], first.views[view][k])
    assert warm < cold / 3, (cold, warm)


def test_changes_miss_the_cache(tmp_path):
    imgs = smooth_images(8, 64, seed=2)
    base = inspector.extract(imgs, extractor="pixels", cache_dir=tmp_path)
    assert inspector.extract(imgs, extractor="pixels", cache_dir=tmp_path).from_cache["id"]
    changed = imgs.copy()
    changed[3, 10, 10] += 0.01
    assert not inspector.extract(changed, extractor="pixels", cache_dir=tmp_path).from_cache["id"]
    fewer = inspector.extract(imgs, extractor="pixels", layers=("pix8",), cache_dir=tmp_path)
    assert not fewer.from_cache["id"] and fewer.layer_names == ["pix8"]
    assert_allclose(fewer.layers["pix8"], base.layers["pix8"])
    bigger = inspector.extract(imgs, extractor="pixels", input_size=96, cache_dir=tmp_path)
    assert not bigger.from_cache["id"]
    zs = inspector.extract(imgs, extractor="pixels", normalisation="zscore", cache_dir=tmp_path)
    assert not zs.from_cache["id"]
    assert not inspector.extract(imgs, extractor="pixels", cache_dir=tmp_path, use_cache=False).from_cache["id"]


def test_checkpoint_change_misses_the_cache(tmp_path):
    imgs = smooth_images(4, 32, seed=3)
    a = sam_checkpoint(tmp_path / "a.pth", seed=0)
    b = sam_checkpoint(tmp_path / "b.pth", seed=1)
    fa = inspector.extract(imgs, extractor="mri-core", checkpoint=a, cache_dir=tmp_path, **MRI_TINY)
    assert {k: v.shape for k, v in fa.layers.items()} == {"block0": (4, 32), "block1": (4, 32)}
    assert inspector.extract(imgs, extractor="mri-core", checkpoint=a, cache_dir=tmp_path, **MRI_TINY).from_cache["id"]
    fb = inspector.extract(imgs, extractor="mri-core", checkpoint=b, cache_dir=tmp_path, **MRI_TINY)
    assert not fb.from_cache["id"] and fb.fingerprint != fa.fingerprint
    assert not np.allclose(fb.layers["block1"], fa.layers["block1"])


def test_corrupt_cache_file_is_recomputed(tmp_path):
    imgs = smooth_images(5, 64, seed=4)
    first = inspector.extract(imgs, extractor="pixels", views=("vflip",), cache_dir=tmp_path)
    files = sorted((tmp_path / "embeddings").rglob("*.npz"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(b"\x00 not an npz")
    with pytest.warns(UserWarning, match="Corrupt cache entry"):
        again = inspector.extract(imgs, extractor="pixels", views=("vflip",), cache_dir=tmp_path)
    assert again.from_cache == {"id": False, "vflip": False}
    for k in first.layers:
        assert_allclose(again.views["vflip"][k], first.views["vflip"][k])
    assert inspector.extract(imgs, extractor="pixels", views=("vflip",), cache_dir=tmp_path).from_cache["vflip"]


def test_ssl_trained_on_a_given_training_cohort(tmp_path):
    train = smooth_images(16, 32, seed=5)
    synth = smooth_images(4, 32, seed=6)
    fs = inspector.extract(synth, extractor="ssl", train=train, cache_dir=tmp_path, **SSL_TINY)
    ft = inspector.extract(train, extractor="ssl", cache_dir=tmp_path, **SSL_TINY)  # trains on itself = train
    assert fs.fingerprint == ft.fingerprint  # the same weights, loaded from the weight cache
    assert len(list((tmp_path / "ssl").glob("*.pt"))) == 1
    with pytest.raises(ValueError, match="pass train="):
        prepare_extractor("ssl", None, cache_dir=tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    imgs = smooth_images(6, 64, seed=7)
    cpu = inspector.extract(imgs, extractor="pixels", device="cpu", cache_dir=tmp_path / "c")
    gpu = inspector.extract(imgs, extractor="pixels", device="cuda", cache_dir=tmp_path / "g")
    for k in cpu.layers:
        assert_allclose(gpu.layers[k], cpu.layers[k], atol=1e-5)
    ckpt = sam_checkpoint(tmp_path / "m.pth", seed=0)
    mc = inspector.extract(
        imgs, extractor="mri-core", checkpoint=ckpt, device="cpu", cache_dir=tmp_path / "c", **MRI_TINY
    )
    mg = inspector.extract(
        imgs,
        extractor="mri-core",
        checkpoint=ckpt,
        device="cuda",
        dtype="bfloat16",
        cache_dir=tmp_path / "g",
        **MRI_TINY,
    )
    for k in mc.layers:
        assert_allclose(mg.layers[k], mc.layers[k], rtol=0.05, atol=0.05)
