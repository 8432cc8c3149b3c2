"""Extractor base, registry, and the three extractors (pixels, mri-core, ssl).

The MRI-CORE tests write random-weight checkpoints of a tiny encoder (width 64, depth 4, 2 heads) in
the DINOv2 and the SAM layouts, load them, and compare the extractor with an independent forward pass
written below from the raw parameters (explicit window loops, explicit softmax attention, a NumPy
bilinear interpolation of the positional embedding, SAM's relative positions gathered pair by pair from
a NumPy linear interpolation of the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose, assert_array_equal

from inspector.models import (
    CheckpointError,
    IncompleteCheckpointError,
    MissingCheckpointError,
    NotFittedError,
    SslExtractor,
    UnusedWeightsWarning,
    available_extractors,
    get_extractor,
    normalise_batch,
    nt_xent,
)
from inspector.models.mri_core import CHECKPOINT_ENV
from inspector.preprocess import Augmentation, apply_condition

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# Synthetic structured images
# ------------------------------------------------------------------------------------------------


def blob_images(n: int, size: int, seed: int) -> np.ndarray:
    """Seeded images of a few random smooth ellipses each (asymmetric), shape (n, size, size) in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(rng.integers(3, 6)):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            ry, rx = rng.uniform(0.05, 0.3, 2)
            th = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(th) + dy * np.sin(th)) / rx
            v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
            img += rng.uniform(0.3, 1.0) * np.exp(-((u**2 + v**2) ** 2))
        out[i] = img / img.max()
    return out


def layer_maps(ext, batch: torch.Tensor, layer: str) -> torch.Tensor:
    """The spatial map (B, C, h, w) of one layer, from the maps production pools (``Extractor._maps``)."""
    with torch.inference_mode():
        return ext._maps(batch, [layer])[layer].float()


# ------------------------------------------------------------------------------------------------
# Registry and base
# ------------------------------------------------------------------------------------------------


def test_registry_lists_and_rejects_unknown_names():
    assert {"ssl", "mri-core", "pixels"} <= set(available_extractors())
    with pytest.raises(ValueError, match=r"Unknown extractor 'nope'.*mri-core.*pixels.*ssl"):
        get_extractor("nope")
    with pytest.raises(ValueError, match=r"no setting\(s\) \['colour'\].*input_size.*normalisation"):
        get_extractor("pixels", colour=3)
    with pytest.raises(ValueError, match="normalisation 'minmax'"):
        get_extractor("pixels", normalisation="minmax")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        get_extractor("pixels", dtype="int8")
    with pytest.raises(ValueError, match=r"no layer\(s\) \['pix7'\].*pix8"):
        get_extractor("pixels", layers=("pix7",))
    with pytest.raises(ValueError, match="batch_size"):
        get_extractor("ssl", batch_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda_raises():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        get_extractor("pixels", device="cuda")
    assert get_extractor("pixels").device.type == "cpu"


def test_config_to_dict_is_json_and_frozen():
    ext = get_extractor("ssl", layers=["stage2", "stage4"], epochs=3)
    d = ext.config.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["layers"] == ["stage2", "stage4"] and d["epochs"] == 3 and d["input_size"] == 64
    assert ext.layers == ["stage2", "stage4"]
    with pytest.raises(AttributeError):
        ext.config.epochs = 5  # type: ignore[misc]


def test_normalise_batch_modes():
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(normalise_batch(x, "unit"), x)
    mean = np.array([0.485, 0.456, 0.406])[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225])[None, :, None, None]
    assert_allclose(normalise_batch(x, "imagenet").numpy(), (x.numpy() - mean) / std, rtol=1e-5, atol=1e-6)
    z = normalise_batch(x, "zscore").numpy()
    assert_allclose(z.reshape(2, -1).mean(1), 0, atol=1e-5)
    assert_allclose(z.reshape(2, -1).std(1), 1, atol=1e-4)
    with pytest.raises(ValueError, match="not one of"):
        normalise_batch(x, "bad")


# ------------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------------


def test_pixels_is_pearson_of_block_means():
    imgs = blob_images(4, 64, seed=1)
    ext = get_extractor("pixels")
    assert ext.layers == ["pix8", "pix16", "pix32"] and not ext.requires_fit
    out = ext.forward_batch(torch.from_numpy(imgs))
    for k in (8, 16, 32):
        f = out[f"pix{k}"].numpy()
        assert f.shape == (4, k * k)
        blocks = imgs.reshape(4, k, 64 // k, k, 64 // k).mean(axis=(2, 4)).reshape(4, -1)
        assert_allclose(f, blocks - blocks.mean(1, keepdims=True), atol=1e-6)
        fn = f / np.linalg.norm(f, axis=1, keepdims=True)
        assert_allclose(fn @ fn.T, np.corrcoef(blocks), atol=1e-5)
        maps = layer_maps(ext, torch.from_numpy(imgs), f"pix{k}").numpy()
        assert maps.shape == (4, 1, k, k)
        assert_allclose(maps.reshape(4, -1), blocks, atol=1e-6)
    small = get_extractor("pixels", input_size=16)
    assert small.layers == ["pix8", "pix16"]
    assert get_extractor("pixels").fingerprint() != get_extractor("pixels", normalisation="zscore").fingerprint()
    assert get_extractor("pixels").fingerprint() == get_extractor("pixels").fingerprint()


# ------------------------------------------------------------------------------------------------
# mri-core: random checkpoints and an independent reference forward
# ------------------------------------------------------------------------------------------------

TINY = dict(
    input_size=64,
    depth=4,
    embed_dim=64,
    num_heads=2,
    patch_size=16,
    window_size=3,  # the 4 x 4 grid is padded to 6 x 6: exercises the window padding
    global_attn_blocks=(1, 3),
    batch_size=4,
)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def random_params(
    seed: int,
    *,
    c: int = 64,
    depth: int = 4,
    grid: int = 6,
    cls: bool = True,
    ls: bool = True,
    rel_pos: list[tuple[int, int]] | None = None,
    head_dim: int = 32,
) -> dict:
    """Canonical random encoder parameters (numpy), written out below in either checkpoint layout.

    ``rel_pos``: per block, the lengths ``(L_h, L_w)`` of random ``rel_pos_h``/``rel_pos_w`` tables of
    ``head_dim`` columns (None: no relative positions).
    """
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.05):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    p = {
        "pe_w": r(c, 3, 16, 16, s=0.02),
        "pe_b": r(c),
        "pos": r(1, (1 if cls else 0) + grid * grid, c, s=0.5),
        "cls": r(1, 1, c),
        "blocks": [],
    }
    for _ in range(depth):
        p["blocks"].append(
            {
                "n1w": 1 + r(c, s=0.1),
                "n1b": r(c),
                "qkvw": r(3 * c, c, s=0.15),
                "qkvb": r(3 * c),
                "projw": r(c, c, s=0.1),
                "projb": r(c),
                "n2w": 1 + r(c, s=0.1),
                "n2b": r(c),
                "fc1w": r(4 * c, c, s=0.1),
                "fc1b": r(4 * c),
                "fc2w": r(c, 4 * c, s=0.05),
                "fc2b": r(c),
                "g1": rng.uniform(0.5, 1.5, c).astype(np.float32) if ls else None,
                "g2": rng.uniform(0.5, 1.5, c).astype(np.float32) if ls else None,
            }
        )
    for i, b in enumerate(p["blocks"]):
        lh, lw = rel_pos[i] if rel_pos is not None else (0, 0)
        b["rh"] = r(lh, head_dim, s=0.5) if rel_pos is not None else None
        b["rw"] = r(lw, head_dim, s=0.5) if rel_pos is not None else None
    return p


REL_POS_KEYS = [("rh", "attn.rel_pos_h"), ("rw", "attn.rel_pos_w")]


def _block_keys(mlp: str) -> list[tuple[str, str]]:
    """Per-block (our parameter name, checkpoint key suffix); ``mlp`` is ``fc`` (DINOv2) or ``lin`` (SAM)."""
    return [
        ("n1w", "norm1.weight"),
        ("n1b", "norm1.bias"),
        ("qkvw", "attn.qkv.weight"),
        ("qkvb", "attn.qkv.bias"),
        ("projw", "attn.proj.weight"),
        ("projb", "attn.proj.bias"),
        ("n2w", "norm2.weight"),
        ("n2b", "norm2.bias"),
        ("fc1w", f"mlp.{mlp}1.weight"),
        ("fc1b", f"mlp.{mlp}1.bias"),
        ("fc2w", f"mlp.{mlp}2.weight"),
        ("fc2b", f"mlp.{mlp}2.bias"),
    ]


def to_dinov2(p: dict, chunks: int = 2) -> dict[str, torch.Tensor]:
    """DINOv2 layout: backbone.*, chunked blocks, fc1/fc2, LayerScale, CLS/mask tokens, final norm, heads."""
    t = torch.from_numpy
    depth = len(p["blocks"])
    per = math.ceil(depth / chunks)
    c = p["pe_b"].shape[0]
    sd = {
        "backbone.cls_token": t(p["cls"]),
        "backbone.mask_token": torch.zeros(1, c),
        "backbone.pos_embed": t(p["pos"]),
        "backbone.patch_embed.proj.weight": t(p["pe_w"]),
        "backbone.patch_embed.proj.bias": t(p["pe_b"]),
        "backbone.norm.weight": torch.ones(c),
        "backbone.norm.bias": torch.zeros(c),
        "dino_head.mlp.0.weight": torch.randn(16, c),
        "ibot_head.last_layer.weight_g": torch.ones(16, 1),
    }
    for i, b in enumerate(p["blocks"]):
        pre = f"backbone.blocks.{i // per}.{i}."
        for ours, theirs in [*_block_keys("fc"), ("g1", "ls1.gamma"), ("g2", "ls2.gamma"), *REL_POS_KEYS]:
            if b[ours] is not None:
                sd[pre + theirs] = t(b[ours].copy())
    return sd


def to_sam(p: dict) -> dict[str, torch.Tensor]:
    """SAM layout: image_encoder.*, pos_embed [1, h, w, C], lin1/lin2, a neck, prompt encoder, mask decoder."""
    t = torch.from_numpy
    c = p["pe_b"].shape[0]
    pos = p["pos"]
    g = math.isqrt(pos.shape[1])
    sd = {
        "image_encoder.pos_embed": t(pos.reshape(1, g, g, c).copy()),
        "image_encoder.patch_embed.proj.weight": t(p["pe_w"]),
        "image_encoder.patch_embed.proj.bias": t(p["pe_b"]),
        "image_encoder.neck.0.weight": torch.randn(8, c, 1, 1),
        "image_encoder.neck.1.weight": torch.ones(8),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 8),
        "mask_decoder.iou_token.weight": torch.randn(1, 8),
    }
    for i, b in enumerate(p["blocks"]):
        pre = f"image_encoder.blocks.{i}."
        for ours, theirs in [*_block_keys("lin"), *REL_POS_KEYS]:
            if b[ours] is not None:
                sd[pre + theirs] = t(b[ours].copy())
    return sd


def bilinear_np(grid: np.ndarray, out: int) -> np.ndarray:
    """Bilinear resize of (g, g, C) to (out, out, C), half-pixel centres, edge clamp (align_corners=False)."""
    g = grid.shape[0]

    def coords(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = coords(g, out)
    x0, x1, wx = coords(g, out)
    res = np.zeros((out, out, grid.shape[2]))
    for i in range(out):
        for j in range(out):
            res[i, j] = (
                (1 - wy[i]) * (1 - wx[j]) * grid[y0[i], x0[j]]
                + (1 - wy[i]) * wx[j] * grid[y0[i], x1[j]]
                + wy[i] * (1 - wx[j]) * grid[y1[i], x0[j]]
                + wy[i] * wx[j] * grid[y1[i], x1[j]]
            )
    return res


def linear_np(table: np.ndarray, out: int) -> np.ndarray:
    """Linear resize of a (L, d) table to (out, d) along its first axis: half-pixel centres, edge clamp."""
    n = table.shape[0]
    if n == out:
        return table
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0)[:, None]
    return (1 - w) * table[i0] + w * table[i1]


def rel_pos_logits(q: torch.Tensor, rh: np.ndarray, rw: np.ndarray, hh: int, ww: int) -> torch.Tensor:
    """The relative-position terms of the logits, straight from the formula, for a (hh, ww) token grid.

    ``out[:, q, k] = Rh[qh - kh + hh - 1] . q + Rw[qw - kw + ww - 1] . q``, tokens row-major
    (``q = qh * ww + qw``), ``Rh``/``Rw`` the tables linearly resampled to ``2*hh-1`` / ``2*ww-1``.
    ``q``: (B, N, head_dim) float64, unscaled. Returns (B, N, N).
    """
    big_h = torch.from_numpy(linear_np(np.asarray(rh, np.float64), 2 * hh - 1))
    big_w = torch.from_numpy(linear_np(np.asarray(rw, np.float64), 2 * ww - 1))
    n = hh * ww
    ih, iw = np.zeros((n, n), int), np.zeros((n, n), int)
    for qi in range(n):
        qh, qw = divmod(qi, ww)
        for ki in range(n):
            kh, kw = divmod(ki, ww)
            ih[qi, ki] = qh - kh + (hh - 1)
            iw[qi, ki] = qw - kw + (ww - 1)
    return torch.einsum("bqc,qkc->bqk", q, big_h[ih]) + torch.einsum("bqc,qkc->bqk", q, big_w[iw])


def ref_attention(t: torch.Tensor, b: dict, heads: int, hw: tuple[int, int]) -> torch.Tensor:
    """Multi-head softmax attention of (B, N, C) float64 tokens on an ``hw`` grid, with rel pos when ``b`` has it."""
    d = lambda a: torch.from_numpy(np.asarray(a)).double()  # noqa: E731
    c = t.shape[-1]
    hd = c // heads
    qkv = t @ d(b["qkvw"]).T + d(b["qkvb"])
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        if b.get("rh") is not None:
            logits = logits + rel_pos_logits(q[..., sl], b["rh"], b["rw"], *hw)
        outs.append(torch.softmax(logits, dim=-1) @ v[..., sl])
    return torch.cat(outs, -1) @ d(b["projw"]).T + d(b["projb"])


def expected_pos(p: dict, out_grid: int) -> np.ndarray:
    pos = p["pos"][0]
    g = math.isqrt(pos.shape[0])
    if g * g != pos.shape[0]:  # drop CLS
        pos = pos[1:]
        g = math.isqrt(pos.shape[0])
    grid = pos.reshape(g, g, -1)
    return grid if g == out_grid else bilinear_np(grid, out_grid)


def reference_forward(p: dict, images: np.ndarray, *, heads: int, window: int, global_blocks, use_ls=True):
    """Independent forward: returns {block index: pooled (B, C)} in float64."""
    x = torch.from_numpy(images).double()[:, None].repeat(1, 3, 1, 1)
    x = (x - torch.from_numpy(MEAN).double()[None, :, None, None]) / torch.from_numpy(STD).double()[None, :, None, None]
    d = lambda a: torch.from_numpy(np.asarray(a)).double()  # noqa: E731
    tok = F.conv2d(x, d(p["pe_w"]), d(p["pe_b"]), stride=16).permute(0, 2, 3, 1)  # (B, g, g, C)
    g = tok.shape[1]
    tok = tok + d(expected_pos(p, g))[None]
    c = tok.shape[-1]

    def ln(v, w, b):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * d(w) + d(b)

    def attention(t, b, side):  # t: (B, N, C) on a side x side grid
        return ref_attention(t, b, heads, (side, side))

    pooled = {}
    for i, b in enumerate(p["blocks"]):
        hn = ln(tok, b["n1w"], b["n1b"])
        bsz = hn.shape[0]
        if i in global_blocks:
            a = attention(hn.reshape(bsz, g * g, c), b, g).reshape(bsz, g, g, c)
        else:
            gp = math.ceil(g / window) * window
            padded = torch.zeros(bsz, gp, gp, c, dtype=hn.dtype)
            padded[:, :g, :g] = hn
            res = torch.zeros_like(padded)
            for wy in range(0, gp, window):
                for wx in range(0, gp, window):
                    win = padded[:, wy : wy + window, wx : wx + window].reshape(bsz, window * window, c)
                    res[:, wy : wy + window, wx : wx + window] = attention(win, b, window).reshape(
                        bsz, window, window, c
                    )
            a = res[:, :g, :g]
        g1 = d(b["g1"]) if use_ls and b["g1"] is not None else 1.0
        g2 = d(b["g2"]) if use_ls and b["g2"] is not None else 1.0
        tok = tok + g1 * a
        m = ln(tok, b["n2w"], b["n2b"]) @ d(b["fc1w"]).T + d(b["fc1b"])
        m = F.gelu(m) @ d(b["fc2w"]).T + d(b["fc2b"])
        tok = tok + g2 * m
        pooled[i] = tok.mean(dim=(1, 2)).numpy()
    return pooled


def save(obj, path):
    torch.save(obj, path)
    return path


ALL_BLOCKS = ("block0", "block1", "block2", "block3")


def test_dinov2_checkpoint_matches_independent_forward(tmp_path):
    p = random_params(0, grid=6, cls=True, ls=True)
    ckpt = save({"teacher": to_dinov2(p), "student": to_dinov2(random_params(9))}, tmp_path / "mri_core.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedWeightsWarning)  # only expected leftovers in this file
        ext = get_extractor("mri-core", checkpoint=str(ckpt), layers=ALL_BLOCKS, **TINY)
    rep = ext.load_report
    assert rep.format == "dinov2" and rep.layerscale and rep.pos_embed_interpolated
    assert rep.pos_embed_source == (1, 37, 64)
    assert not rep.unused_suspicious
    assert {"cls_token", "mask_token", "norm.weight", "dino_head.mlp.0.weight"} <= set(rep.unused_expected)
    assert rep.renamed["backbone.blocks.1.3.mlp.fc2.weight"] == "blocks.3.mlp.lin2.weight"
    # positional embedding: CLS dropped, 6x6 interpolated to 4x4 (independently), not zero
    pos = ext.model.pos_embed.detach().numpy()
    assert pos.shape == (1, 4, 4, 64)
    want = bilinear_np(p["pos"][0, 1:].reshape(6, 6, 64), 4)
    assert_allclose(pos[0], want, rtol=1e-5, atol=1e-6)
    assert np.abs(pos).max() > 0.1
    imgs = blob_images(3, 64, seed=2)
    got = ext.forward_batch(torch.from_numpy(imgs))
    ref = reference_forward(p, imgs, heads=2, window=3, global_blocks=(1, 3))
    for i in range(4):
        assert got[f"block{i}"].shape == (3, 64)
        assert_allclose(got[f"block{i}"].numpy(), ref[i], rtol=1e-4, atol=1e-4)


def test_dinov2_training_state_uses_the_teacher(tmp_path):
    teacher, student = to_dinov2(random_params(0, grid=4)), to_dinov2(random_params(1, grid=4))
    state = {
        "model": {
            **{"teacher." + k: v for k, v in teacher.items()},
            **{"student." + k: v for k, v in student.items()},
            "dino_loss.center": torch.zeros(1, 16),
        },
        "iteration": 1000,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedWeightsWarning)
        full = get_extractor("mri-core", checkpoint=str(save(state, tmp_path / "model_0001.pth")), **TINY)
    only_t = get_extractor("mri-core", checkpoint=str(save({"teacher": teacher}, tmp_path / "t.pth")), **TINY)
    only_s = get_extractor("mri-core", checkpoint=str(save({"student": student}, tmp_path / "s.pth")), **TINY)
    imgs = torch.from_numpy(blob_images(2, 64, seed=1))
    a, t, s = (e.forward_batch(imgs)["block3"].numpy() for e in (full, only_t, only_s))
    assert_array_equal(a, t)
    assert np.abs(a - s).max() > 1e-3
    assert "dino_loss.center" in full.load_report.unused_expected


def test_layerscale_is_applied(tmp_path):
    p = random_params(1, grid=4, cls=True, ls=True)
    sd = to_dinov2(p)
    with_ls = get_extractor("mri-core", checkpoint=str(save(sd, tmp_path / "a.pth")), layers=ALL_BLOCKS, **TINY)
    no_ls_sd = {k: v for k, v in sd.items() if not k.endswith(("ls1.gamma", "ls2.gamma"))}
    no_ls = get_extractor("mri-core", checkpoint=str(save(no_ls_sd, tmp_path / "b.pth")), layers=ALL_BLOCKS, **TINY)
    assert with_ls.load_report.layerscale and not no_ls.load_report.layerscale
    assert not with_ls.load_report.pos_embed_interpolated  # 4x4 source grid == input grid
    imgs = torch.from_numpy(blob_images(2, 64, seed=3))
    a, b = with_ls.forward_batch(imgs)["block3"].numpy(), no_ls.forward_batch(imgs)["block3"].numpy()
    assert np.abs(a - b).max() > 1e-2
    ref = reference_forward(p, imgs.numpy(), heads=2, window=3, global_blocks=(1, 3))
    ref_no = reference_forward(p, imgs.numpy(), heads=2, window=3, global_blocks=(1, 3), use_ls=False)
    assert_allclose(a, ref[3], rtol=1e-4, atol=1e-4)
    assert_allclose(b, ref_no[3], rtol=1e-4, atol=1e-4)


def test_sam_checkpoint_loads_and_matches(tmp_path):
    p = random_params(2, grid=4, cls=False, ls=False)
    ckpt = save(to_sam(p), tmp_path / "sam.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedWeightsWarning)
        ext = get_extractor("mri-core", checkpoint=str(ckpt), layers=("block1", "block2"), **TINY)
    rep = ext.load_report
    assert rep.format == "sam" and not rep.layerscale and not rep.pos_embed_interpolated
    assert any(k.startswith("prompt_encoder.") for k in rep.unused_expected)
    assert "neck.0.weight" in rep.unused_expected
    assert_array_equal(ext.model.pos_embed.detach().numpy()[0], p["pos"][0].reshape(4, 4, 64))
    imgs = blob_images(2, 64, seed=4)
    got = ext.forward_batch(torch.from_numpy(imgs))
    ref = reference_forward(p, imgs, heads=2, window=3, global_blocks=(1, 3))
    assert list(got) == ["block1", "block2"]
    assert_allclose(got["block2"].numpy(), ref[2], rtol=1e-4, atol=1e-4)


def test_sam_pos_embed_on_another_grid_is_interpolated(tmp_path):
    p = random_params(3, grid=8, cls=False, ls=False)
    ext = get_extractor("mri-core", checkpoint=str(save(to_sam(p), tmp_path / "s.pth")), **TINY)
    assert ext.load_report.pos_embed_interpolated
    assert_allclose(ext.model.pos_embed.detach().numpy()[0], bilinear_np(p["pos"][0].reshape(8, 8, 64), 4), atol=1e-5)


def test_pooling_is_over_h_and_w_and_maps_are_channels_first(tmp_path):
    p = random_params(4, grid=4)
    ext = get_extractor("mri-core", checkpoint=str(save(to_dinov2(p), tmp_path / "c.pth")), **TINY)
    assert ext.layers == ["block0", "block2", "block3"]  # one, two and three thirds of depth 4
    seen = {}
    hook = ext.model.blocks[2].register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach().clone()))
    imgs = torch.from_numpy(blob_images(2, 64, seed=5))
    with torch.inference_mode():
        pooled = ext.forward_batch(imgs)["block2"]
    hook.remove()
    raw = seen["out"]
    assert raw.shape == (2, 4, 4, 64)  # channels last
    assert pooled.shape == (2, 64)
    assert_allclose(pooled.numpy(), raw.numpy().mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    maps = layer_maps(ext, imgs, "block2")
    assert maps.shape == (2, 64, 4, 4)
    assert_allclose(maps.mean(dim=(2, 3)).numpy(), pooled.numpy(), rtol=1e-5, atol=1e-6)


def test_paper_default_layers_for_depth_12(tmp_path):
    p = random_params(5, c=16, depth=12, grid=4)
    cfg = dict(TINY, depth=12, embed_dim=16, global_attn_blocks=(2, 5, 8, 11))
    ext = get_extractor("mri-core", checkpoint=str(save(to_dinov2(p, chunks=4), tmp_path / "d.pth")), **cfg)
    assert ext.layers == ["block3", "block7", "block11"]
    out = ext.forward_batch(torch.from_numpy(blob_images(1, 64, seed=0)))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"block3": (1, 16), "block7": (1, 16), "block11": (1, 16)}


def test_missing_weights_are_refused_by_name(tmp_path):
    sd = to_dinov2(random_params(6, grid=4))
    bad = {k: v for k, v in sd.items() if k != "backbone.blocks.1.2.mlp.fc1.weight"}
    with pytest.raises(IncompleteCheckpointError, match=r"blocks\.2\.mlp\.lin1\.weight") as e:
        get_extractor("mri-core", checkpoint=str(save(bad, tmp_path / "m.pth")), **TINY)
    assert e.value.missing == ["blocks.2.mlp.lin1.weight"]
    no_pe = {k: v for k, v in sd.items() if "patch_embed" not in k}
    with pytest.raises(IncompleteCheckpointError, match=r"patch_embed\.proj\.bias, patch_embed\.proj\.weight"):
        get_extractor("mri-core", checkpoint=str(save(no_pe, tmp_path / "n.pth")), **TINY)
    no_pos = {k: v for k, v in sd.items() if k != "backbone.pos_embed"}
    with pytest.raises(IncompleteCheckpointError, match="pos_embed"):
        get_extractor("mri-core", checkpoint=str(save(no_pos, tmp_path / "o.pth")), **TINY)
    half_ls = {k: v for k, v in sd.items() if k != "backbone.blocks.0.1.ls2.gamma"}
    with pytest.raises(IncompleteCheckpointError, match=r"blocks\.1\.ls2\.gamma"):
        get_extractor("mri-core", checkpoint=str(save(half_ls, tmp_path / "p.pth")), **TINY)


def test_unexpected_weights_warn_by_name(tmp_path):
    sd = to_dinov2(random_params(7, grid=4))
    sd["backbone.blocks.0.0.attn.q_norm.weight"] = torch.zeros(32)
    sd["backbone.adapter.weight"] = torch.zeros(3)
    sd["decoder.head.weight"] = torch.zeros(3)
    with pytest.warns(UnusedWeightsWarning, match=r"3 weight\(s\)") as rec:
        ext = get_extractor("mri-core", checkpoint=str(save({"model": sd}, tmp_path / "u.pth")), **TINY)
    msg = str(rec[0].message)
    for k in ("blocks.0.attn.q_norm.weight", "adapter.weight", "decoder.head.weight"):
        assert k in msg
    assert "cls_token" not in msg and "dino_head" not in msg
    assert sorted(ext.load_report.unused_suspicious) == sorted(
        ["adapter.weight", "blocks.0.attn.q_norm.weight", "decoder.head.weight"]
    )


def test_wrong_architecture_is_refused(tmp_path):
    ckpt = str(save(to_dinov2(random_params(8, grid=4)), tmp_path / "w.pth"))
    with pytest.raises(CheckpointError, match=r"embed_dim=32.*checkpoint \[192, 64\] vs encoder \[96, 32\]"):
        get_extractor("mri-core", checkpoint=ckpt, **dict(TINY, embed_dim=32))
    with pytest.raises(CheckpointError, match=r"holds 4 blocks.*depth=2.*pass depth=4"):
        get_extractor("mri-core", checkpoint=ckpt, **dict(TINY, depth=2, global_attn_blocks=(1,)))
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="No tensors found"):
        get_extractor("mri-core", checkpoint=str(tmp_path / "empty.pth"), **TINY)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read checkpoint"):
        get_extractor("mri-core", checkpoint=str(tmp_path / "junk.pth"), **TINY)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        get_extractor("mri-core", checkpoint=ckpt, **dict(TINY, input_size=70))


def test_missing_checkpoint_explains_how_to_pass_it(tmp_path, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    with pytest.raises(MissingCheckpointError, match=r"cannot be downloaded.*checkpoint="):
        get_extractor("mri-core")
    with pytest.raises(MissingCheckpointError, match="does not exist"):
        get_extractor("mri-core", checkpoint=str(tmp_path / "absent.pth"))
    ckpt = save(to_dinov2(random_params(0, grid=4)), tmp_path / "env.pth")
    monkeypatch.setenv(CHECKPOINT_ENV, str(ckpt))
    assert get_extractor("mri-core", **TINY).config.checkpoint == str(ckpt)


def test_pickled_objects_need_trust(tmp_path):
    sd = to_dinov2(random_params(0, grid=4))
    path = save({"teacher": sd, "args": argparse.Namespace(arch="vit_base")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="trust_checkpoint=True"):
        get_extractor("mri-core", checkpoint=str(path), **TINY)
    with pytest.warns(UserWarning, match="Unpickling"):
        ext = get_extractor("mri-core", checkpoint=str(path), trust_checkpoint=True, **TINY)
    assert ext.load_report.layerscale


def test_safetensors_checkpoint(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    p = random_params(3, grid=4)
    path = tmp_path / "sam.safetensors"
    st.save_file({k: v.contiguous() for k, v in to_sam(p).items()}, str(path))
    ext = get_extractor("mri-core", checkpoint=str(path), **TINY)
    ref = reference_forward(p, blob_images(1, 64, 0), heads=2, window=3, global_blocks=(1, 3))
    assert_allclose(ext.forward_batch(torch.from_numpy(blob_images(1, 64, 0)))["block3"].numpy(), ref[3], atol=1e-4)


def test_mri_core_fingerprint_follows_checkpoint_content(tmp_path):
    sd = to_dinov2(random_params(0, grid=4))
    a = get_extractor("mri-core", checkpoint=str(save(sd, tmp_path / "a.pth")), **TINY)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "a.pth", tmp_path / "elsewhere" / "copy.pth")
    a2 = get_extractor("mri-core", checkpoint=str(tmp_path / "elsewhere" / "copy.pth"), **TINY)
    sd2 = dict(sd)
    sd2["backbone.blocks.0.0.norm1.bias"] = sd["backbone.blocks.0.0.norm1.bias"] + 1e-3
    b = get_extractor("mri-core", checkpoint=str(save(sd2, tmp_path / "b.pth")), **TINY)
    c = get_extractor("mri-core", checkpoint=str(tmp_path / "a.pth"), **dict(TINY, normalisation="unit"))
    assert a.fingerprint() == a2.fingerprint()  # same bytes elsewhere: same weights
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3


# ------------------------------------------------------------------------------------------------
# mri-core: SAM's decomposed relative positions (use_rel_pos)
# ------------------------------------------------------------------------------------------------

#: SAM's real table shapes at its pretraining size (1024 px: grid 64, window 14, head_dim 64), on a
#: two-block encoder of width 128 (two heads of 64) run at 224 px: the windowed block's 27 x 64 tables are
#: used as stored, the global block's 127 x 64 ones are resampled to 2 * 14 - 1 = 27.
SAM_SMALL = dict(
    input_size=224,
    depth=2,
    embed_dim=128,
    num_heads=2,
    patch_size=16,
    window_size=14,
    global_attn_blocks=(1,),
    batch_size=2,
)
SAM_REL = [(27, 27), (127, 127)]


def _attention_params(attn) -> dict:
    """An :class:`Attention` module's weights as the reference's parameter dict (numpy)."""
    g = lambda t: t.detach().double().numpy()  # noqa: E731
    b = {"qkvw": g(attn.qkv.weight), "qkvb": g(attn.qkv.bias), "projw": g(attn.proj.weight), "projb": g(attn.proj.bias)}
    b["rh"] = g(attn.rel_pos_h) if attn.use_rel_pos else None
    b["rw"] = g(attn.rel_pos_w) if attn.use_rel_pos else None
    return b


@pytest.mark.parametrize(
    ("hw", "lens"),
    [
        ((3, 5), (5, 9)),  # the stored lengths are the needed ones: 2H-1, 2W-1
        ((3, 5), (11, 4)),  # resampled: down along h, up along w
        ((4, 4), (27, 127)),  # SAM's stored lengths on a small grid
    ],
)
def test_decomposed_rel_pos_attention_matches_the_formula(hw, lens):
    from inspector.models.mri_core import Attention

    torch.manual_seed(0)
    dim, heads = 16, 2
    attn = Attention(dim, heads, rel_pos_len=lens).double()
    with torch.no_grad():
        for prm in attn.parameters():
            prm.normal_(0.0, 0.4)
    assert tuple(attn.rel_pos_h.shape) == (lens[0], dim // heads)
    assert tuple(attn.rel_pos_w.shape) == (lens[1], dim // heads)
    x = torch.randn(2, *hw, dim, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x).numpy()
    b = _attention_params(attn)
    want = ref_attention(x.reshape(2, -1, dim), b, heads, hw).reshape(2, *hw, dim).numpy()
    assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # the relative terms matter: without them the output is another one
    plain = ref_attention(x.reshape(2, -1, dim), dict(b, rh=None, rw=None), heads, hw).reshape(2, *hw, dim).numpy()
    assert np.abs(got - plain).max() > 1e-2


def test_get_rel_pos_indexes_and_resamples_like_sam():
    from inspector.models.mri_core import get_rel_pos

    table = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = get_rel_pos(4, 4, table)  # 2*4-1 = 7: no resampling
    assert r.shape == (4, 4, 3)
    for i in range(4):
        for j in range(4):
            assert torch.equal(r[i, j], table[i - j + 3])
    r = get_rel_pos(3, 3, table)  # 7 -> 5
    big = linear_np(table.numpy(), 5)
    for i in range(3):
        for j in range(3):
            assert_allclose(r[i, j].numpy(), big[i - j + 2], rtol=1e-12)


def test_sam_checkpoint_with_rel_pos_is_supported(tmp_path):
    p = random_params(11, c=128, depth=2, grid=64, cls=False, ls=False, rel_pos=SAM_REL, head_dim=64)
    sd = to_sam(p)
    assert tuple(sd["image_encoder.blocks.0.attn.rel_pos_h"].shape) == (27, 64)
    assert tuple(sd["image_encoder.blocks.1.attn.rel_pos_w"].shape) == (127, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedWeightsWarning)  # the tables are used, not left over
        ext = get_extractor(
            "mri-core", checkpoint=str(save(sd, tmp_path / "sam_rel.pth")), layers=("block0", "block1"), **SAM_SMALL
        )
    rep = ext.load_report
    keys = [f"blocks.{i}.attn.rel_pos_{a}" for i in range(2) for a in "hw"]
    assert rep.rel_pos == keys
    assert set(keys) <= set(rep.loaded)
    assert not rep.unused_suspicious and not any("rel_pos" in k for k in rep.unused_expected)
    assert rep.rel_pos_interpolated == {"blocks.1.attn.rel_pos_h": (127, 27), "blocks.1.attn.rel_pos_w": (127, 27)}
    assert "rel_pos on (4 tables, 2 resampled)" in rep.summary()
    assert all(blk.attn.use_rel_pos for blk in ext.model.blocks)
    assert_array_equal(ext.model.blocks[1].attn.rel_pos_h.detach().numpy(), p["blocks"][1]["rh"])  # kept as stored
    imgs = blob_images(2, 224, seed=6)
    got = ext.forward_batch(torch.from_numpy(imgs))
    ref = reference_forward(p, imgs, heads=2, window=14, global_blocks=(1,), use_ls=False)
    for i in range(2):
        assert_allclose(got[f"block{i}"].numpy(), ref[i], rtol=1e-4, atol=1e-4)
    # other tables, other features; zero tables are the plain attention
    for name, scale in (("other", -1.0), ("zero", 0.0)):
        q = {**p, "blocks": [dict(b, rh=b["rh"] * scale, rw=b["rw"] * scale) for b in p["blocks"]]}
        e2 = get_extractor(
            "mri-core", checkpoint=str(save(to_sam(q), tmp_path / f"{name}.pth")), layers=("block1",), **SAM_SMALL
        )
        out = e2.forward_batch(torch.from_numpy(imgs))["block1"].numpy()
        assert np.abs(out - got["block1"].numpy()).max() > 1e-2
        if name == "zero":
            plain = {**p, "blocks": [dict(b, rh=None, rw=None) for b in p["blocks"]]}
            assert_allclose(
                out,
                reference_forward(plain, imgs, heads=2, window=14, global_blocks=(1,), use_ls=False)[1],
                rtol=1e-4,
                atol=1e-4,
            )


def test_dinov2_checkpoint_with_rel_pos_matches_independent_forward(tmp_path):
    # TINY: windows of 3 (needs 5) hold 27-long tables, the global blocks on the 4 x 4 grid 7-long ones (as needed)
    rel = [(27, 27), (7, 7), (27, 27), (7, 7)]
    p = random_params(12, grid=6, cls=True, ls=True, rel_pos=rel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedWeightsWarning)
        ext = get_extractor(
            "mri-core", checkpoint=str(save({"teacher": to_dinov2(p)}, tmp_path / "d.pth")), layers=ALL_BLOCKS, **TINY
        )
    rep = ext.load_report
    assert rep.renamed["backbone.blocks.1.3.attn.rel_pos_w"] == "blocks.3.attn.rel_pos_w"
    assert len(rep.rel_pos) == 8
    assert rep.rel_pos_interpolated == {f"blocks.{i}.attn.rel_pos_{a}": (27, 5) for i in (0, 2) for a in "hw"}
    imgs = blob_images(3, 64, seed=7)
    got = ext.forward_batch(torch.from_numpy(imgs))
    ref = reference_forward(p, imgs, heads=2, window=3, global_blocks=(1, 3))
    for i in range(4):
        assert_allclose(got[f"block{i}"].numpy(), ref[i], rtol=1e-4, atol=1e-4)


def _attention_forward_before_rel_pos(self, x):
    """``Attention.forward`` as it was before relative positions were supported (verbatim)."""
    b, h, w, c = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, h, w, c)
    return self.proj(out)


def test_checkpoint_without_rel_pos_is_bit_identical(tmp_path, monkeypatch):
    from inspector.models import mri_core

    p = random_params(0, grid=6, cls=True, ls=True)
    ext = get_extractor(
        "mri-core", checkpoint=str(save(to_dinov2(p), tmp_path / "plain.pth")), layers=ALL_BLOCKS, **TINY
    )
    assert ext.load_report.rel_pos == [] and ext.load_report.rel_pos_interpolated == {}
    assert not any(blk.attn.use_rel_pos for blk in ext.model.blocks)
    assert not any("rel_pos" in k for k in ext.model.state_dict())
    imgs = torch.from_numpy(blob_images(3, 64, seed=2))
    now = ext.forward_batch(imgs)
    monkeypatch.setattr(mri_core.Attention, "forward", _attention_forward_before_rel_pos)
    before = ext.forward_batch(imgs)
    for layer in ALL_BLOCKS:
        assert_array_equal(now[layer].numpy(), before[layer].numpy())


def test_rel_pos_errors_name_the_key_the_shape_and_the_fix(tmp_path):
    from inspector.models.mri_core import RelPosError

    full = to_sam(random_params(13, grid=4, cls=False, ls=False, rel_pos=[(5, 5), (7, 7)] * 2))
    # in some blocks only
    part = {
        k: v
        for k, v in full.items()
        if not (
            k.startswith("image_encoder.blocks.") and "rel_pos" in k and not k.startswith("image_encoder.blocks.0.")
        )
    }
    with pytest.raises(
        RelPosError, match=r"in block\(s\) \[0\] but lacks 6: blocks\.1\.attn\.rel_pos_h.*Fix: use the complete"
    ) as e:
        get_extractor("mri-core", checkpoint=str(save(part, tmp_path / "part.pth")), **TINY)
    assert e.value.keys == [f"blocks.{i}.attn.rel_pos_{a}" for i in (1, 2, 3) for a in "hw"]
    assert isinstance(e.value, CheckpointError)
    # one axis only
    no_w = {k: v for k, v in full.items() if not k.endswith("rel_pos_w")}
    with pytest.raises(RelPosError, match=r"lacks 4: blocks\.0\.attn\.rel_pos_w, blocks\.1\.attn\.rel_pos_w"):
        get_extractor("mri-core", checkpoint=str(save(no_w, tmp_path / "no_w.pth")), **TINY)
    # another head_dim (32 here): the fix says how many heads the tables imply
    wrong = dict(full)
    wrong["image_encoder.blocks.2.attn.rel_pos_h"] = torch.zeros(5, 16)
    with pytest.raises(
        RelPosError,
        match=r"head_dim = embed_dim / num_heads = 64 / 2 = 32, but image_encoder\.blocks\.2\.attn\.rel_pos_h has "
        r"shape \[5, 16\]\. Fix: a head_dim of 16 means 4 heads: pass num_heads=4",
    ) as e:
        get_extractor("mri-core", checkpoint=str(save(wrong, tmp_path / "wrong.pth")), **TINY)
    assert e.value.keys == ["blocks.2.attn.rel_pos_h"]
    flat = dict(full)
    flat["image_encoder.blocks.0.attn.rel_pos_w"] = torch.zeros(5 * 32)
    with pytest.raises(
        RelPosError, match=r"rel_pos_w has shape \[160\]\. Fix: check that the checkpoint is a SAM ViT-B"
    ):
        get_extractor("mri-core", checkpoint=str(save(flat, tmp_path / "flat.pth")), **TINY)


# ------------------------------------------------------------------------------------------------
# mri-core in the audit: one resampling from the native grid to the encoder's input
# ------------------------------------------------------------------------------------------------


def test_loading_size_is_the_extractors_input_size_when_larger(tmp_path):
    from inspector.config import AuditConfig
    from inspector.pipeline import loading_size

    ckpt = str(save(to_dinov2(random_params(0, grid=4)), tmp_path / "c.pth"))
    assert loading_size(AuditConfig(extractor="ssl")) == 128  # ssl reads 64 px: cfg.size
    assert loading_size(AuditConfig(extractor="pixels", size=48)) == 64
    assert loading_size(AuditConfig(extractor="mri-core", checkpoint=ckpt)) == 224
    assert loading_size(AuditConfig(extractor="mri-core", checkpoint=ckpt, size=256)) == 256


def test_mri_core_slice_is_resampled_once_from_native_to_224(tmp_path):
    from inspector.config import AuditConfig
    from inspector.features import extract
    from inspector.io import LoadConfig, load_cohort
    from inspector.pipeline import load_inputs
    from inspector.preprocess import PreprocessConfig, resize_square

    native = blob_images(5, 300, seed=8)
    for i, img in enumerate(native):
        for d in ("train", "synthetic"):
            sub = tmp_path / d / f"sub-{i % 2}"
            sub.mkdir(parents=True, exist_ok=True)
            np.save(sub / f"s{i}.npy", img)
    cfg224 = dict(TINY, input_size=224)  # the encoder MRI-CORE is run at; a tiny random-weight one
    ckpt = save(to_dinov2(random_params(0, grid=14)), tmp_path / "mri_core.pth")
    inputs = load_inputs(
        tmp_path / "train", tmp_path / "synthetic", config=AuditConfig(extractor="mri-core", checkpoint=str(ckpt))
    )
    raw = load_cohort(tmp_path / "train", LoadConfig(preprocess=PreprocessConfig(size=None)))
    assert [s.array.shape for s in raw.slices] == [(300, 300)] * 5
    once = resize_square(raw.stack(), 224)
    twice = resize_square(resize_square(raw.stack(), 128), 224)  # what loading at cfg.size gave
    assert np.abs(once - twice).max() > 1e-2
    assert_allclose(inputs.train.stack(), once, atol=1e-6)
    # and that is what reaches the encoder: its patch embedding sees the loaded slices unchanged
    ext = get_extractor("mri-core", checkpoint=str(ckpt), **cfg224)
    seen = []
    hook = ext.model.patch_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    extract(inputs.train, ext, use_cache=False)
    hook.remove()
    x = torch.cat(seen).numpy()
    assert x.shape == (5, 3, 224, 224)
    assert_allclose(x[:, 0] * STD[0] + MEAN[0], once, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# ssl
# ------------------------------------------------------------------------------------------------

SSL_TINY = dict(input_size=32, width=8, epochs=12, train_batch=16, proj_dim=32, lr=3e-3, batch_size=64)


def test_nt_xent_matches_reference():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    t = 0.3
    zn = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    sim = zn @ zn.T / t
    losses = []
    for i in range(8):
        pos = (i + 4) % 8
        others = [j for j in range(8) if j != i]
        losses.append(-sim[i, pos] + np.log(np.exp(sim[i, others]).sum()))
    assert_allclose(float(nt_xent(z, t)), np.mean(losses), rtol=1e-5)
    with pytest.raises(ValueError, match="even number"):
        nt_xent(z[:3], t)


def _similarity_auc(ext, train: np.ndarray, copies: np.ndarray) -> float:
    """Mean over copies of the fraction of unrelated training slices less similar than its source.

    Similarity: cosine of centred, L2-normalised pooled features, averaged over layers.
    """
    ft = ext.forward_batch(torch.from_numpy(train))
    fq = ext.forward_batch(torch.from_numpy(copies))
    sims = []
    for k in ft:
        a, b = ft[k].numpy(), fq[k].numpy()
        mu = a.mean(0)
        a = (a - mu) / np.linalg.norm(a - mu, axis=1, keepdims=True)
        b = (b - mu) / np.linalg.norm(b - mu, axis=1, keepdims=True)
        sims.append(b @ a.T)
    s = np.mean(sims, 0)
    n = len(copies)
    src = s[np.arange(n), np.arange(n)]
    others = ~np.eye(n, len(train), dtype=bool)
    return float(np.mean([(s[i][others[i]] < src[i]).mean() for i in range(n)]))


def test_ssl_training_learns_invariance(tmp_path):
    imgs = blob_images(64, 32, seed=11)
    ext = get_extractor("ssl", **SSL_TINY)
    with pytest.raises(NotFittedError, match="call .fit"):
        ext.forward_batch(torch.from_numpy(imgs[:2]))
    with pytest.raises(NotFittedError):
        ext.fingerprint()
    untrained = get_extractor("ssl", **SSL_TINY)
    untrained._set_model(untrained._new_model())  # same seeded initialisation, no training
    calls = []
    ext.fit(imgs, cache_dir=None, progress=lambda *a: calls.append(a))
    assert calls[-1] == ("training", 12 * 4, 12 * 4) and all(c[0] == "training" for c in calls)
    h = ext.loss_history
    assert len(h) == 12 and np.mean(h[-3:]) < np.mean(h[:3]) - 0.3
    out = ext.forward_batch(torch.from_numpy(imgs[:3]))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stage1": (3, 8),
        "stage2": (3, 16),
        "stage3": (3, 32),
        "stage4": (3, 64),
    }
    assert layer_maps(ext, torch.from_numpy(imgs[:3]), "stage2").shape == (3, 16, 8, 8)
    # flips are what an untrained network is not invariant to (measured: ~0.83 before, ~0.97 after)
    for cond in ("hflip", [Augmentation("hflip"), Augmentation("rotate", 10.0)]):
        copies = apply_condition(imgs[:32], cond, rng=5)
        before = _similarity_auc(untrained, imgs, copies)
        after = _similarity_auc(ext, imgs, copies)
        assert after > 0.93, (cond, before, after)
        assert after > before + 0.06, (cond, before, after)
    # a rotation alone is already easy on these blobs for both; training must not lose it
    copies = apply_condition(imgs[:32], "rotate_10", rng=6)
    assert _similarity_auc(ext, imgs, copies) > 0.97


def test_ssl_is_deterministic_and_avgmax_doubles_channels():
    imgs = blob_images(16, 32, seed=3)
    cfg = dict(SSL_TINY, epochs=2)
    a = get_extractor("ssl", **cfg).fit(imgs)
    b = get_extractor("ssl", **cfg).fit(imgs)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb
        assert_array_equal(va.numpy(), vb.numpy())
    assert a.fingerprint() == b.fingerprint()
    c = get_extractor("ssl", **dict(cfg, seed=1)).fit(imgs)
    assert c.fingerprint() != a.fingerprint()
    m = get_extractor("ssl", **dict(cfg, pool="avgmax")).fit(imgs)
    out = m.forward_batch(torch.from_numpy(imgs[:2]))
    assert out["stage4"].shape == (2, 128)
    fmap = layer_maps(m, torch.from_numpy(imgs[:2]), "stage4")
    assert_allclose(out["stage4"][:, 64:].numpy(), fmap.amax(dim=(2, 3)).numpy())
    with pytest.raises(ValueError, match="n >= 2"):
        get_extractor("ssl", **cfg).fit(imgs[:1])


def test_ssl_weight_cache_hit_and_corrupt_file(tmp_path, monkeypatch):
    imgs = blob_images(16, 32, seed=4)
    cfg = dict(SSL_TINY, epochs=2)
    first = get_extractor("ssl", **cfg).fit(imgs, cache_dir=tmp_path)
    path = first.weights_path
    assert path is not None and path.exists() and path.parent == tmp_path / "ssl" and not first.from_cache

    def no_training(self, *a, **k):
        raise AssertionError("retrained although the weights are cached")

    with monkeypatch.context() as mp:
        mp.setattr(SslExtractor, "_train", no_training)
        second = get_extractor("ssl", **dict(cfg, layers=("stage4",), batch_size=7)).fit(imgs, cache_dir=tmp_path)
    assert second.from_cache and second.loss_history == first.loss_history
    assert second._weights_hash() == first._weights_hash()
    # other images or other training settings: another file
    third = get_extractor("ssl", **cfg).fit(imgs[::-1].copy(), cache_dir=tmp_path)
    assert third.weights_path != path and not third.from_cache
    assert get_extractor("ssl", **dict(cfg, temperature=0.5)).weights_key(imgs) != first.weights_key(imgs)
    # a corrupt file retrains (same seed -> same weights) and is rewritten
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        again = get_extractor("ssl", **cfg).fit(imgs, cache_dir=tmp_path)
    assert not again.from_cache and again._weights_hash() == first._weights_hash()
    assert get_extractor("ssl", **cfg).fit(imgs, cache_dir=tmp_path).from_cache
