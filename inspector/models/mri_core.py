"""``mri-core``: the SAM ViT-B image encoder, loaded from an MRI-CORE (or SAM) checkpoint the user gives.

The encoder is written here (no ``segment_anything`` dependency): patch embedding (16 px), absolute
positional embedding stored as ``[1, h, w, C]``, 12 blocks of width 768 with 12 heads, windowed
attention (window 14) except in the global blocks 2, 5, 8 and 11, SAM's decomposed relative positions
when the checkpoint carries them, and optional LayerScale. The SAM neck is not built: features come from
the blocks. Grey input is repeated to three channels and, by default, normalised with the ImageNet mean
and std.

Layers ``block<i>`` are the outputs of block ``i``, ``[B, h, w, C]`` (channels last), pooled by the
mean over ``h`` and ``w`` (keeping ``C``; the reference code pooled the wrong axes). The paper's
default layers are ``block3``, ``block7`` and ``block11``.

Checkpoints (``.pt``/``.pth`` through ``torch.load(weights_only=True)``, ``.safetensors`` when the
``safetensors`` package is installed):

* **DINOv2-style** (MRI-CORE): a ``teacher``, ``model`` or ``student`` dict of ``backbone.*`` keys;
  chunked block names ``backbone.blocks.<chunk>.<i>.`` lose the chunk index; ``mlp.fc1``/``mlp.fc2``
  become ``mlp.lin1``/``mlp.lin2``; LayerScale ``ls1.gamma``/``ls2.gamma`` are applied when present;
  ``pos_embed`` ``[1, 1 + g*g, C]`` loses its CLS token, is reshaped to ``g x g`` and interpolated
  (bilinear, ``align_corners=False``) to the input grid.
* **SAM**: ``image_encoder.*`` keys, ``pos_embed`` already ``[1, h, w, C]`` (interpolated likewise if
  its grid differs from the input grid).

**Relative positions** (``use_rel_pos``, as in segment-anything's ``modeling/image_encoder.py``): when
the blocks carry ``attn.rel_pos_h`` and ``attn.rel_pos_w`` (``[2*S-1, head_dim]``; SAM ViT-B at 1024 px
stores 27 x 64 for its windowed blocks, S = window 14, and 127 x 64 for its global blocks, S = grid 64),
every block's attention adds ``rel_h + rel_w`` to its logits (:func:`add_decomposed_rel_pos`). The
tables are kept as stored and, when the length needed (``2*window-1`` in windowed blocks, ``2*grid-1``
in global blocks at the configured input size: 27 at 224 px) differs, resampled linearly at each
forward (:func:`get_rel_pos`), as SAM does. Tables in some blocks only, or with another ``head_dim``,
raise :class:`RelPosError`. Checkpoints without them run the plain attention, unchanged.

Every model weight must come from the checkpoint; a missing block, patch-embedding or positional
weight raises :class:`IncompleteCheckpointError` naming the keys. Unused checkpoint weights are listed:
CLS/mask/register tokens, the final norm, the SAM neck, DINO/iBOT heads and SAM's prompt encoder and
mask decoder are expected; anything else triggers an :class:`UnusedWeightsWarning`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Extractor, ExtractorConfig, register

__all__ = [
    "MriCoreConfig",
    "MriCoreExtractor",
    "SamImageEncoder",
    "LoadReport",
    "CheckpointError",
    "MissingCheckpointError",
    "IncompleteCheckpointError",
    "RelPosError",
    "UnusedWeightsWarning",
    "convert_checkpoint",
    "read_checkpoint",
    "interpolate_pos_embed",
    "get_rel_pos",
    "add_decomposed_rel_pos",
    "CHECKPOINT_ENV",
]

log = logging.getLogger(__name__)

#: Environment variable consulted when no ``checkpoint`` is given.
CHECKPOINT_ENV = "INSPECTOR_MRI_CORE_CHECKPOINT"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the configured encoder."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint was given, or the given path does not exist."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint leaves encoder weights unloaded; ``missing`` lists them (encoder key names)."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


class RelPosError(CheckpointError):
    """The checkpoint's relative-position tables do not fit the encoder; ``keys`` names them (encoder key names)."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


class UnusedWeightsWarning(UserWarning):
    """The checkpoint holds weights the encoder does not use and that are not known to be expected."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MriCoreConfig(ExtractorConfig):
    """Config of :class:`MriCoreExtractor`.

    Attributes
    ----------
    input_size : int
        Default 224 (the 14 x 14 grid MRI-CORE was pretrained on; no positional interpolation).
    normalisation : str
        Default ``imagenet`` (the reference dataset code); ``unit`` is what its README says.
    checkpoint : str or None
        Path of the checkpoint file; when None, ``$INSPECTOR_MRI_CORE_CHECKPOINT`` is used.
    depth, embed_dim, num_heads, patch_size, window_size, mlp_ratio : architecture (ViT-B defaults).
    global_attn_blocks : tuple of int
        Blocks with global attention; the others attend within ``window_size`` windows.
    trust_checkpoint : bool
        Allow unpickling arbitrary Python objects when ``weights_only`` loading fails. Only for files
        you trust; does not change the weights and is not part of the fingerprint.
    """

    input_size: int = 224
    normalisation: str = "imagenet"
    batch_size: int = 16
    checkpoint: str | None = None
    depth: int = 12
    embed_dim: int = 768
    num_heads: int = 12
    patch_size: int = 16
    window_size: int = 14
    global_attn_blocks: tuple[int, ...] = (2, 5, 8, 11)
    mlp_ratio: float = 4.0
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser()))
        object.__setattr__(self, "global_attn_blocks", tuple(int(b) for b in self.global_attn_blocks))
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1; got {self.depth}.")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} must be a multiple of patch_size {self.patch_size} "
                f"(e.g. {self.patch_size * max(1, round(self.input_size / self.patch_size))})."
            )
        bad = [b for b in self.global_attn_blocks if not 0 <= b < self.depth]
        if bad:
            raise ValueError(f"global_attn_blocks {bad} are outside the {self.depth} blocks.")
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1; got {self.window_size}.")


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv patchifier: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative positional embeddings for every (query, key) pair along one axis (SAM's ``get_rel_pos``).

    Parameters
    ----------
    q_size, k_size : int
        Number of query and key positions along the axis.
    rel_pos : torch.Tensor, shape (L, head_dim)
        The stored table. When ``L != 2 * max(q_size, k_size) - 1`` it is first resampled to that length
        (``F.interpolate``, ``mode="linear"``, ``align_corners=False``).

    Returns
    -------
    torch.Tensor, shape (q_size, k_size, head_dim)
        ``out[i, j] = table[i - j + k_size - 1]`` (coordinates scaled by the size ratio when
        ``q_size != k_size``).
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        resized = rel_pos
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return resized[relative_coords.long()]


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Add SAM's decomposed relative positional terms to attention logits (SAM's ``add_decomposed_rel_pos``).

    ``attn[b, (qh, qw), (kh, kw)] += q[b, (qh, qw)] . Rh[qh, kh] + q[b, (qh, qw)] . Rw[qw, kw]`` with
    ``Rh = get_rel_pos(q_h, k_h, rel_pos_h)`` and ``Rw = get_rel_pos(q_w, k_w, rel_pos_w)``.

    Parameters
    ----------
    attn : torch.Tensor, shape (B, q_h * q_w, k_h * k_w)
        Logits (``B`` counts batch and heads).
    q : torch.Tensor, shape (B, q_h * q_w, head_dim)
        Queries, unscaled.
    rel_pos_h, rel_pos_w : torch.Tensor, shape (L_h, head_dim), (L_w, head_dim)
        Tables along the height and the width.
    q_size, k_size : tuple of int
        ``(q_h, q_w)`` and ``(k_h, k_w)``.

    Returns
    -------
    torch.Tensor, shape (B, q_h * q_w, k_h * k_w)
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    return (attn.view(b, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(
        b, q_h * q_w, k_h * k_w
    )


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid, with SAM's decomposed relative positions.

    Parameters
    ----------
    dim, num_heads : int
    rel_pos_len : tuple of int, optional
        ``(L_h, L_w)``: build ``rel_pos_h`` (L_h, head_dim) and ``rel_pos_w`` (L_w, head_dim) and add
        their terms to the logits (:func:`add_decomposed_rel_pos`), resampling them at each forward to
        ``2*H-1`` and ``2*W-1`` when the lengths differ. None (the default): no relative positions, the
        plain scaled dot-product attention.
    """

    def __init__(self, dim: int, num_heads: int, *, rel_pos_len: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = rel_pos_len is not None
        if rel_pos_len is not None:
            self.rel_pos_h = nn.Parameter(torch.zeros(int(rel_pos_len[0]), head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(int(rel_pos_len[1]), head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): every token attends to every token of the grid."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if not self.use_rel_pos:
            q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
            out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2).reshape(b, h, w, c)
            return self.proj(out)
        # segment-anything's Attention.forward, step by step
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # (B * heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        out = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.proj(out)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (DINOv2's ``ls1``/``ls2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, ws, ws, C), zero padding H and W to multiples of ``ws``."""
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(win: torch.Tensor, ws: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`, removing the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = win.shape[0] // ((hp // ws) * (wp // ws))
    x = win.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


class Block(nn.Module):
    """Pre-norm transformer block on a (B, H, W, C) grid; ``window_size == 0`` means global attention.

    ``rel_pos_len`` is passed to :class:`Attention` (None: no relative positions).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        layerscale: bool,
        rel_pos_len: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_len=rel_pos_len)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.ls1: nn.Module = LayerScale(dim) if layerscale else nn.Identity()
        self.ls2: nn.Module = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + self.ls1(x)
        return x + self.ls2(self.mlp(self.norm2(x)))


class SamImageEncoder(nn.Module):
    """The SAM ViT image encoder without neck.

    Parameters
    ----------
    config : MriCoreConfig
        Architecture and input size.
    layerscale : bool
        Build LayerScale gammas in every block (DINOv2-trained checkpoints carry them).
    rel_pos_len : sequence of (int, int), optional
        Per block, the lengths ``(L_h, L_w)`` of its ``rel_pos_h``/``rel_pos_w`` tables (as stored in the
        checkpoint; ``use_rel_pos``). None (the default): no relative positions in any block.
    """

    def __init__(
        self,
        config: MriCoreConfig,
        *,
        layerscale: bool = False,
        rel_pos_len: list[tuple[int, int]] | tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        g = config.input_size // config.patch_size
        if rel_pos_len is not None and len(rel_pos_len) != config.depth:
            raise ValueError(f"rel_pos_len has {len(rel_pos_len)} entries for {config.depth} blocks.")
        self.patch_embed = PatchEmbed(config.patch_size, 3, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                0 if i in config.global_attn_blocks else config.window_size,
                layerscale,
                rel_pos_len[i] if rel_pos_len is not None else None,
            )
            for i in range(config.depth)
        )

    def forward(self, x: torch.Tensor, blocks: Iterable[int] | None = None) -> dict[int, torch.Tensor]:
        """Run the encoder, returning the outputs of the requested blocks.

        Parameters
        ----------
        x : torch.Tensor, shape (B, 3, H, W), normalised
        blocks : iterable of int, optional
            Block indices to return (default: the last). The forward stops after the deepest one.

        Returns
        -------
        dict of int to torch.Tensor
            ``{i: (B, H/p, W/p, C)}``, channels last.
        """
        want = sorted(set(blocks)) if blocks is not None else [len(self.blocks) - 1]
        x = self.patch_embed(x)
        if x.shape[1:3] != self.pos_embed.shape[1:3]:
            raise ValueError(
                f"Input grid {tuple(x.shape[1:3])} differs from the positional embedding grid "
                f"{tuple(self.pos_embed.shape[1:3])}; feed {self.config.input_size} px images."
            )
        x = x + self.pos_embed
        out: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in want:
                out[i] = x
            if i >= want[-1]:
                break
        return out


# ----------------------------------------------------------------------------------------------
# Checkpoint reading and conversion
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What happened when a checkpoint was loaded.

    Attributes
    ----------
    path : str
    sha256 : str
        Of the checkpoint file.
    format : str
        ``dinov2``, ``sam`` or ``bare`` (encoder keys without prefix).
    loaded : list of str
        Encoder weights set from the checkpoint (encoder key names).
    missing : list of str
        Encoder weights the checkpoint did not provide (always empty after a successful load).
    unused_expected : list of str
        Checkpoint keys left unused that are expected to be (tokens, final norm, neck, heads).
    unused_suspicious : list of str
        Checkpoint keys left unused that the encoder would be expected to use.
    renamed : dict of str to str
        Checkpoint key -> encoder key, where they differ (chunk index, fc -> lin, prefixes).
    pos_embed_source : tuple of int
        Shape of the checkpoint's positional embedding.
    pos_embed_interpolated : bool
        Whether it was resampled to the input grid.
    layerscale : bool
        Whether LayerScale gammas were found and applied.
    rel_pos : list of str
        The relative-position tables loaded (``blocks.<i>.attn.rel_pos_h``/``rel_pos_w``, encoder key
        names; also in ``loaded``); empty when the checkpoint has none (plain attention).
    rel_pos_interpolated : dict of str to tuple of int
        Tables whose stored length differs from the one the configured input needs: key ->
        ``(stored, needed)`` (``needed = 2*S-1``, ``S`` the window or, in global blocks, the token grid);
        they are resampled linearly at each forward, as SAM does.
    """

    path: str
    sha256: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused_expected: list[str] = field(default_factory=list)
    unused_suspicious: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    pos_embed_source: tuple[int, ...] = ()
    pos_embed_interpolated: bool = False
    layerscale: bool = False
    rel_pos: list[str] = field(default_factory=list)
    rel_pos_interpolated: dict[str, tuple[int, int]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs."""
        rel = f"on ({len(self.rel_pos)} tables, {len(self.rel_pos_interpolated)} resampled)" if self.rel_pos else "off"
        return (
            f"{Path(self.path).name} ({self.format}, sha256 {self.sha256[:12]}): {len(self.loaded)} weights loaded, "
            f"{len(self.missing)} missing, {len(self.unused_expected)} expected unused, "
            f"{len(self.unused_suspicious)} suspicious unused; pos_embed {list(self.pos_embed_source)}"
            f"{' interpolated' if self.pos_embed_interpolated else ''}; LayerScale {'on' if self.layerscale else 'off'}"
            f"; rel_pos {rel}"
        )


_WRAPPERS = ("teacher", "model", "state_dict", "student")
_PREFIX_FORMAT = {"image_encoder.": "sam", "backbone.": "dinov2"}
# Outside the encoder: heads and SAM's other parts are expected leftovers.
_EXPECTED_OUTSIDE = (
    "dino_head.",
    "ibot_head.",
    "head.",
    "prompt_encoder.",
    "mask_decoder.",
    "student.",
    "dino_loss.",
    "ibot_patch_loss.",
    "koleo_loss.",
)
# Inside the encoder: tokens, the final norm, the SAM neck.
_EXPECTED_INSIDE = re.compile(r"^(cls_token|mask_token|register_tokens|norm\.|fc_norm\.|neck\.|head\.)")
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_REL_POS = re.compile(r"^blocks\.(\d+)\.attn\.rel_pos_([hw])$")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = _sha256_file(p)
    return _SHA_CACHE[key]


def read_checkpoint(path: str | Path, *, trust: bool = False) -> Mapping[str, Any]:
    """Read a checkpoint file into a (possibly nested) mapping.

    Parameters
    ----------
    path : path
        ``.pt``/``.pth``/``.ckpt`` (``torch.load`` with ``weights_only=True``) or ``.safetensors``.
    trust : bool
        When ``weights_only`` loading fails because the file holds other Python objects, unpickle it
        fully. Only for files you trust.

    Returns
    -------
    Mapping

    Raises
    ------
    MissingCheckpointError
        The file does not exist.
    CheckpointError
        The file cannot be read.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingCheckpointError(f"MRI-CORE checkpoint {str(p)!r} does not exist; check the path.")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(
                f"{p} is a .safetensors file but the 'safetensors' package is not installed: "
                "pip install safetensors, or convert the file to .pth."
            ) from e
        try:
            return load_file(str(p), device="cpu")
        except Exception as e:
            raise CheckpointError(f"Cannot read safetensors checkpoint {p}: {e}") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refused Python object: the file is damaged
            raise CheckpointError(f"Cannot read checkpoint {p} ({type(e).__name__}); is it a torch file?") from e
        if not trust:
            raise CheckpointError(
                f"{p} holds Python objects besides tensors, which weights_only loading refuses "
                f"({str(e).splitlines()[-1] if str(e).strip() else e}). "
                "If you trust this file, pass trust_checkpoint=True; or re-save only its state dict."
            ) from e
        warnings.warn(f"Unpickling {p} fully (trust_checkpoint=True).", UserWarning, stacklevel=2)
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"Cannot read checkpoint {p} ({type(e).__name__}: {e}); is it a torch file?") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict; save model.state_dict().")
    return obj


def _unwrap(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Descend through ``teacher``/``model``/``state_dict``/``student`` wrappers to a flat tensor dict."""
    path: list[str] = []
    cur: Mapping[str, Any] = obj
    for _ in range(4):
        if any(isinstance(v, torch.Tensor) for v in cur.values()):
            break
        nxt = next((w for w in _WRAPPERS if isinstance(cur.get(w), Mapping)), None)
        if nxt is None:
            break
        path.append(nxt)
        cur = cur[nxt]
    tensors = {str(k): v for k, v in cur.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"No tensors found in the checkpoint (top-level keys: {sorted(map(str, obj))[:10]}); expected a "
            f"state dict, possibly under one of {list(_WRAPPERS)}."
        )
    return tensors, path


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """Bring a positional embedding to ``[1, h, w, C]`` on the given grid.

    Parameters
    ----------
    pos : torch.Tensor
        ``[1, N, C]`` with ``N = g*g`` or ``1 + g*g`` (a leading CLS entry, dropped), or ``[1, g, g', C]``.
    grid : tuple of int
        Target ``(h, w)``.

    Returns
    -------
    tuple of (torch.Tensor of shape (1, h, w, C), bool)
        The embedding and whether it was resampled (bilinear, ``align_corners=False``).
    """
    pos = pos.detach().float()
    if pos.dim() == 3:
        n = pos.shape[1]
        g = math.isqrt(n)
        if g * g == n:
            tok = pos
        elif math.isqrt(n - 1) ** 2 == n - 1:
            g = math.isqrt(n - 1)
            tok = pos[:, 1:]
        else:
            raise CheckpointError(f"pos_embed of shape {list(pos.shape)} is neither [1, g*g, C] nor [1, 1+g*g, C].")
        pos = tok.reshape(1, g, g, -1)
    elif pos.dim() != 4 or pos.shape[0] != 1:
        raise CheckpointError(f"pos_embed of shape {list(pos.shape)} is not [1, N, C] or [1, h, w, C].")
    if tuple(pos.shape[1:3]) == tuple(grid):
        return pos.contiguous(), False
    out = F.interpolate(pos.permute(0, 3, 1, 2), size=tuple(grid), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).contiguous(), True


def convert_checkpoint(
    checkpoint: Mapping[str, Any], config: MriCoreConfig
) -> tuple[dict[str, torch.Tensor], LoadReport, dict[str, torch.Tensor]]:
    """Map a DINOv2-style or SAM checkpoint onto :class:`SamImageEncoder` key names.

    Parameters
    ----------
    checkpoint : Mapping
        What :func:`read_checkpoint` returned.
    config : MriCoreConfig

    Returns
    -------
    state : dict of str to torch.Tensor
        Encoder keys (``patch_embed.proj.weight``, ``pos_embed`` as ``[1, h, w, C]``, ``blocks.<i>.…``).
    report : LoadReport
        ``path`` and ``sha256`` left empty; ``loaded``/``missing`` filled by the loader.
    unused : dict of str to torch.Tensor
        Checkpoint entries not mapped onto the encoder, by original key.

    Raises
    ------
    CheckpointError
        No encoder keys found, a malformed positional embedding, or blocks beyond ``config.depth``.
    """
    tensors, _ = _unwrap(checkpoint)
    keys = {k.removeprefix("module."): v for k, v in tensors.items()}
    if any(k.startswith("teacher.") for k in keys):  # a full DINOv2 training state: keep the teacher
        keys = {k.removeprefix("teacher."): v for k, v in keys.items()}
    fmt, prefix = "bare", ""
    for pre, f in _PREFIX_FORMAT.items():
        if any(k.startswith(pre) for k in keys):
            fmt, prefix = f, pre
            break
    if fmt == "bare" and not any(k.startswith(("patch_embed.", "blocks.")) for k in keys):
        raise CheckpointError(
            "No image-encoder weights found: expected keys under 'backbone.' (DINOv2/MRI-CORE), "
            f"'image_encoder.' (SAM) or 'patch_embed.'/'blocks.'; first keys: {sorted(keys)[:8]}."
        )
    report = LoadReport(path="", sha256="", format=fmt)
    state: dict[str, torch.Tensor] = {}
    unused: dict[str, torch.Tensor] = {}
    grid = (config.input_size // config.patch_size,) * 2
    for key, val in keys.items():
        if prefix and not key.startswith(prefix):
            unused[key] = val
            continue
        k = key[len(prefix) :]
        m = _CHUNKED.match(k)
        if m:
            k = f"blocks.{m.group(2)}." + k[m.end() :]
        k = k.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")
        if k == "pos_embed":
            report.pos_embed_source = tuple(val.shape)
            val, report.pos_embed_interpolated = interpolate_pos_embed(val, grid)
        if k != key:
            report.renamed[key] = k
        if k in state:
            raise CheckpointError(f"Two checkpoint keys map onto {k!r} (one is {key!r}); the file is ambiguous.")
        state[k] = val
    extra_blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))} - set(range(config.depth)))
    if extra_blocks:
        n = max(extra_blocks) + 1
        raise CheckpointError(
            f"The checkpoint holds {n} blocks but the encoder is configured with depth={config.depth}; "
            f"pass depth={n} (and matching embed_dim/num_heads)."
        )
    return state, report, unused


def build_encoder(
    checkpoint: Mapping[str, Any], config: MriCoreConfig, *, path: str = "", sha256: str = ""
) -> tuple[SamImageEncoder, LoadReport]:
    """Build a :class:`SamImageEncoder` from a checkpoint mapping, refusing any partial load.

    Parameters
    ----------
    checkpoint : Mapping
    config : MriCoreConfig
    path, sha256 : str
        Recorded in the report.

    Returns
    -------
    tuple of (SamImageEncoder, LoadReport)

    Raises
    ------
    IncompleteCheckpointError
        Some patch-embedding, positional or block weight is missing (the message names them).
    RelPosError
        Relative-position tables in some blocks only, or not of shape ``[L, head_dim]``.
    CheckpointError
        Shape mismatches (wrong architecture) or a malformed checkpoint.

    Warns
    -----
    UnusedWeightsWarning
        Checkpoint weights left unused that are not known leftovers.
    """
    state, report, unused = convert_checkpoint(checkpoint, config)
    report.path, report.sha256 = path, sha256
    report.layerscale = any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in state)
    rel_pos_len = _rel_pos_lengths(state, config, {v: k for k, v in report.renamed.items()}, path)
    model = SamImageEncoder(config, layerscale=report.layerscale, rel_pos_len=rel_pos_len)
    target = model.state_dict()
    missing = sorted(k for k in target if k not in state)
    if missing:
        raise IncompleteCheckpointError(
            f"Checkpoint {path or '<mapping>'} leaves {len(missing)} encoder weight(s) unloaded: "
            f"{_fmt_keys(missing)}. (Names are the encoder's: DINOv2 'mlp.fc1/fc2' map to 'mlp.lin1/lin2', "
            "chunked 'blocks.<chunk>.<i>.' to 'blocks.<i>.'.) Refusing a partial load; is this an MRI-CORE or "
            "SAM ViT-B image-encoder checkpoint matching depth/embed_dim?",
            missing,
        )
    bad_shapes = [
        f"{k}: checkpoint {list(state[k].shape)} vs encoder {list(target[k].shape)}"
        for k in target
        if tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if bad_shapes:
        raise CheckpointError(
            f"Checkpoint {path or '<mapping>'} does not fit the configured encoder "
            f"(embed_dim={config.embed_dim}, num_heads={config.num_heads}, mlp_ratio={config.mlp_ratio}): "
            + "; ".join(bad_shapes[:6])
            + (f"; … {len(bad_shapes) - 6} more" if len(bad_shapes) > 6 else "")
        )
    inside = sorted(k for k in state if k not in target)
    state = {k: state[k] for k in target}
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    report.loaded = sorted(target)
    report.rel_pos = sorted(k for k in target if _REL_POS.match(k))
    if rel_pos_len is not None:
        grid = config.input_size // config.patch_size
        for i, blk in enumerate(model.blocks):
            need = 2 * (blk.window_size or grid) - 1
            for axis, stored in zip("hw", rel_pos_len[i], strict=True):
                if stored != need:
                    report.rel_pos_interpolated[f"blocks.{i}.attn.rel_pos_{axis}"] = (stored, need)
    for k in sorted(unused):  # outside the encoder prefix: heads, SAM's decoder, the student copy
        (report.unused_expected if k.startswith(_EXPECTED_OUTSIDE) else report.unused_suspicious).append(k)
    for k in inside:  # encoder keys the encoder has no place for: tokens, final norm, neck are expected
        expected = bool(_EXPECTED_INSIDE.match(k)) or k.startswith(_EXPECTED_OUTSIDE)
        (report.unused_expected if expected else report.unused_suspicious).append(k)
    if report.unused_suspicious:
        warnings.warn(
            f"Checkpoint {path or '<mapping>'}: {len(report.unused_suspicious)} weight(s) are not used by the "
            f"encoder and are not known leftovers: {_fmt_keys(report.unused_suspicious)}. The features may not "
            "be what the checkpoint's authors computed.",
            UnusedWeightsWarning,
            stacklevel=3,
        )
    if report.unused_expected:
        log.info("unused (expected) checkpoint weights: %s", _fmt_keys(report.unused_expected))
    log.info("loaded %s", report.summary())
    return model, report


def _rel_pos_lengths(
    state: Mapping[str, torch.Tensor], config: MriCoreConfig, source: Mapping[str, str], path: str
) -> list[tuple[int, int]] | None:
    """The per-block ``(L_h, L_w)`` of the checkpoint's relative-position tables, or None when it has none.

    Parameters
    ----------
    state : Mapping
        Converted checkpoint (encoder key names).
    config : MriCoreConfig
    source : Mapping
        Encoder key -> checkpoint key, where they differ (for the messages).
    path : str
        For the messages.

    Raises
    ------
    RelPosError
        A table not of shape ``[L, head_dim]``, or tables in some blocks (or axes) but not in all.
    """
    found = {(int(m.group(1)), m.group(2)): k for k in state if (m := _REL_POS.match(k))}
    if not found:
        return None
    where = path or "<mapping>"
    head_dim = config.embed_dim // config.num_heads
    bad = {
        k: tuple(state[k].shape)
        for k in found.values()
        if state[k].dim() != 2 or state[k].shape[1] != head_dim or state[k].shape[0] < 1
    }
    if bad:
        keys = sorted(bad)
        shapes = "; ".join(f"{source.get(k, k)} has shape {list(bad[k])}" for k in keys[:6])
        dims = {sh[1] for sh in bad.values() if len(sh) == 2 and sh[1] > 0}
        d = dims.pop() if len(dims) == 1 else 0
        if d and config.embed_dim % d == 0:
            fix = f"a head_dim of {d} means {config.embed_dim // d} heads: pass num_heads={config.embed_dim // d}"
        else:
            fix = (
                "check that the checkpoint is a SAM ViT-B image encoder (embed_dim=768, num_heads=12), or pass "
                "its embed_dim and num_heads"
            )
        raise RelPosError(
            f"Checkpoint {where}: relative-position tables must be [2*S-1, head_dim] with head_dim = embed_dim / "
            f"num_heads = {config.embed_dim} / {config.num_heads} = {head_dim}, but {shapes}"
            f"{f' (… {len(keys) - 6} more)' if len(keys) > 6 else ''}. Fix: {fix}.",
            keys,
        )
    missing = [f"blocks.{i}.attn.rel_pos_{a}" for i in range(config.depth) for a in "hw" if (i, a) not in found]
    if missing:
        have = sorted({i for i, _ in found})
        raise RelPosError(
            f"Checkpoint {where} has relative-position tables (attn.rel_pos_h/rel_pos_w, SAM's use_rel_pos) in "
            f"block(s) {have} but lacks {len(missing)}: {_fmt_keys(missing)}. SAM's encoder uses them in every "
            "block or in none, and a block run without the positions it was trained with computes other "
            "features. Fix: use the complete checkpoint (SAM ViT-B carries rel_pos_h and rel_pos_w in all 12 "
            "blocks: 27 x 64 windowed, 127 x 64 global), or check depth.",
            missing,
        )
    return [
        (int(state[f"blocks.{i}.attn.rel_pos_h"].shape[0]), int(state[f"blocks.{i}.attn.rel_pos_w"].shape[0]))
        for i in range(config.depth)
    ]


def _fmt_keys(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", … ({len(keys) - n} more)" if len(keys) > n else "")


# ----------------------------------------------------------------------------------------------
# The extractor
# ----------------------------------------------------------------------------------------------


@register
class MriCoreExtractor(Extractor):
    """MRI-CORE (SAM ViT-B image encoder) features from a local checkpoint.

    Layers ``block0`` … ``block<depth-1>``; default ``block3``, ``block7``, ``block11`` (the paper's;
    for other depths, the blocks at one, two and three thirds of the depth). Each pooled vector is the
    mean of the block output ``[B, h, w, C]`` over ``h`` and ``w``: shape (B, C).

    Parameters
    ----------
    config : MriCoreConfig
        ``checkpoint`` is required (or ``$INSPECTOR_MRI_CORE_CHECKPOINT``).

    Raises
    ------
    MissingCheckpointError
        No checkpoint given, or the file does not exist.
    IncompleteCheckpointError, CheckpointError
        See :func:`build_encoder`.
    """

    name = "mri-core"
    config_cls = MriCoreConfig
    default_layers = ("block3", "block7", "block11")
    requires_fit = False

    def __init__(self, config: MriCoreConfig | None = None) -> None:
        cfg = config if config is not None else MriCoreConfig()
        if cfg.checkpoint is None and os.environ.get(CHECKPOINT_ENV):
            cfg = dataclasses.replace(cfg, checkpoint=os.environ[CHECKPOINT_ENV])
        super().__init__(cfg)
        if cfg.checkpoint is None:
            raise MissingCheckpointError(
                "mri-core needs the MRI-CORE checkpoint file: its weights cannot be downloaded by this tool "
                "(no network access; the authors distribute them). Obtain the .pth file and pass it: "
                "get_extractor('mri-core', checkpoint='/path/to/mri_core.pth'), "
                "inspector.extract(..., extractor='mri-core', checkpoint=...), `inspector scan --checkpoint FILE`, "
                f"or set ${CHECKPOINT_ENV}."
            )
        path = Path(cfg.checkpoint)
        raw = read_checkpoint(path, trust=cfg.trust_checkpoint)
        self._sha256 = file_sha256(path)
        model, self.load_report = build_encoder(raw, cfg, path=str(path), sha256=self._sha256)
        del raw
        model.eval().requires_grad_(False)
        if self.device.type == "cuda":
            model = model.to(self.device, memory_format=torch.channels_last)
        self.model = model

    def available_layers(self) -> tuple[str, ...]:
        return tuple(f"block{i}" for i in range(self.config.depth))

    @property
    def layers(self) -> list[str]:
        if self.config.layers:
            return list(self.config.layers)
        d = self.config.depth
        if d == 12:
            return list(self.default_layers)
        return list(dict.fromkeys(f"block{max(0, round(d * k / 3) - 1)}" for k in (1, 2, 3)))

    def _weights_hash(self) -> str:
        return self._sha256

    def _fingerprint_config(self) -> dict[str, Any]:
        cfg = self.config.to_dict()
        cfg.pop("trust_checkpoint", None)
        cfg["checkpoint"] = None  # identified by its sha256, not by where it lives
        return cfg

    def block_outputs(self, batch: torch.Tensor, blocks: Iterable[int]) -> dict[int, torch.Tensor]:
        """Raw block outputs ``{i: (B, h, w, C)}`` (channels last) for a (B, H, W) batch in [0, 1]."""
        x = self._prepare(batch, channels=3)
        return self.model(x, blocks)

    def _maps(self, batch: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(layers)
        outs = self.block_outputs(batch, [int(n[5:]) for n in names])
        return {n: outs[int(n[5:])].permute(0, 3, 1, 2) for n in names}

    def forward_batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled block features ``{block<i>: (B, C)}``: the mean of ``[B, h, w, C]`` over h and w."""
        self._check_fitted()
        names = self.layers
        with torch.inference_mode():
            outs = self.block_outputs(batch, [int(n[5:]) for n in names])
            return {n: outs[int(n[5:])].mean(dim=(1, 2)) for n in names}
