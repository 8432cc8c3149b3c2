"""Bounded ssl training (issue 17 item 2): ``min(epochs * steps_per_epoch, max_steps)`` steps, a wall-clock cap."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal

import inspector.models.ssl as ssl_mod
from inspector.models import SslConfig, SslExtractor, get_extractor
from inspector.models.base import normalise_batch
from inspector.models.ssl import SslNet, nt_xent

# 20 slices of 16 px, batches of 4: 5 steps per epoch
TINY = dict(input_size=16, width=4, epochs=3, train_batch=4, proj_dim=8, batch_size=32, device="cpu")


def _images(n: int = 20, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2) + 0.1 * rng.random((size, size))
        out.append(img / img.max())
    return np.stack(out).astype(np.float32)


def _old_train(ext: SslExtractor, images: np.ndarray) -> tuple[SslNet, list[float]]:
    """The training loop before the budget (a verbatim copy: ``epochs`` full passes, schedule over them)."""
    from inspector.preprocess import random_views

    cfg = ext.config
    dev = ext.device
    model = ext._new_model().to(dev, memory_format=torch.channels_last)
    x_all = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
    n = x_all.shape[0]
    steps_per_epoch = max(1, min(math.ceil(n / cfg.train_batch), n // 2))
    total = cfg.epochs * steps_per_epoch
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    cpu_gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    losses: list[float] = []
    step = 0
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=cpu_gen).to(dev)
        epoch_loss = 0.0
        for idx in torch.tensor_split(perm, steps_per_epoch):
            batch = x_all[idx]
            views = torch.cat([random_views(batch, gen), random_views(batch, gen)])
            inp = normalise_batch(views[:, None], cfg.normalisation).contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = nt_xent(model(inp), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += float(loss.detach())
            step += 1
        losses.append(epoch_loss / steps_per_epoch)
    model.eval()
    return model, losses


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_array_equal(sa[k].numpy(), sb[k].numpy(), err_msg=k)


def _fit(imgs, progress_calls=None, **over):
    ext = get_extractor("ssl", **dict(TINY, **over))
    cb = (lambda *a: progress_calls.append(a)) if progress_calls is not None else None
    return ext.fit(imgs, progress=cb)


class _FakeClock:
    """Advances by ``tick`` seconds at every reading."""

    def __init__(self, tick: float = 1.0) -> None:
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def test_under_budget_is_bit_identical_to_the_unbounded_loop():
    imgs = _images()
    ref = get_extractor("ssl", **TINY)
    old_model, old_losses = _old_train(ref, imgs)
    # 3 epochs x 5 steps = 15 steps: under the default budget, at it exactly, and with no effective bound
    for max_steps in (1500, 15, 10**9):
        ext = _fit(imgs, max_steps=max_steps)
        assert ext.steps_done == ext.steps_planned == 15
        assert ext.loss_history == old_losses  # one mean per epoch, bit for bit
        _assert_same_weights(ext.model, old_model)


def test_training_from_a_memory_mapped_store_reads_batches_and_trains_the_same(tmp_path, monkeypatch):
    """A read-only memmap is trained from a batch at a time (no whole copy: issue 17), with the in-memory weights."""
    imgs = _images()
    np.save(tmp_path / "store.npy", imgs)
    mapped = np.load(tmp_path / "store.npy", mmap_mode="r")
    released = []
    real = ssl_mod._all_finite
    monkeypatch.setattr(ssl_mod, "_RELEASE_EVERY", 2)
    import inspector.store as store_mod

    orig = store_mod.release_pages
    monkeypatch.setattr(store_mod, "release_pages", lambda *a: (released.append(a), orig(*a)))
    monkeypatch.setattr(ssl_mod, "_all_finite", lambda x, chunk=4096: real(x, chunk=3))
    from_disk = _fit(mapped)
    assert released and all(np.shares_memory(r[0], mapped) for r in released)  # its pages given back as it went
    _assert_same_weights(from_disk.model, _fit(imgs).model)
    assert from_disk.train_hash == _fit(imgs).train_hash  # the streamed hash is the whole array's
    bad = imgs.copy()
    bad[17, 3, 3] = np.nan  # in the last chunk of the streamed check
    with pytest.raises(ValueError, match="NaN or Inf"):
        _fit(bad)


def test_steps_are_min_of_epochs_times_steps_per_epoch_and_max_steps():
    imgs = _images()
    # losses: one per epoch under budget; in blocks of ceil(7 / 3) = 3 steps when it cuts: 3 + 3 + 1
    for max_steps, expected, n_losses in ((1500, 15, 3), (7, 7, 3), (1, 1, 1)):
        calls: list[tuple] = []
        ext = _fit(imgs, calls, max_steps=max_steps)
        assert [c[1] for c in calls] == list(range(1, expected + 1)), max_steps
        assert all(c[0] == "training" and c[2] == expected for c in calls)
        assert ext.steps_done == ext.steps_planned == expected == ext._total_steps(len(imgs))
        assert len(ext.loss_history) == n_losses and all(np.isfinite(ext.loss_history))
    # the defaults: 20 epochs of ceil(n / 32) steps, at most 1500, so at most ~90 s whatever |T|
    default = get_extractor("ssl")
    assert [default._total_steps(n) for n in (150, 2400, 2401, 100_000)] == [100, 1500, 1500, 1500]
    assert default.config.epochs * default._steps_per_epoch(2401) == 1520


def test_cut_epochs_still_cover_the_cohort_uniformly(monkeypatch):
    """Each epoch is a fresh permutation: the first 10 of 12 steps see every slice exactly twice."""
    import inspector.preprocess as pre

    imgs = _images()
    x = torch.from_numpy(imgs)
    seen: list[list[int]] = []
    real = pre.random_views
    calls = [0]

    def spy(batch, gen):
        if calls[0] % 2 == 0:  # two views of each batch; record the batch once
            seen.append([int(torch.nonzero((x == b).all(dim=(1, 2)))[0]) for b in batch])
        calls[0] += 1
        return real(batch, gen)

    monkeypatch.setattr(pre, "random_views", spy)
    ext = _fit(imgs, epochs=4, max_steps=12)  # 4 x 5 = 20 planned, cut to 12
    assert ext.steps_done == 12 and len(seen) == 12
    counts = np.bincount(np.concatenate(seen[:10]), minlength=len(imgs))
    assert (counts == 2).all(), counts
    for e in range(2):  # each of the two full epochs is a permutation of T
        assert sorted(sum(seen[5 * e : 5 * e + 5], [])) == list(range(len(imgs)))
    assert len(set(sum(seen[10:], []))) == len(sum(seen[10:], []))  # the cut epoch repeats no slice


def test_lr_schedule_spans_the_bounded_run(monkeypatch):
    lrs: list[float] = []

    class Recording(torch.optim.AdamW):
        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    imgs = _images()
    lr = 3e-3
    ext = _fit(imgs, epochs=20, max_steps=30, lr=lr)  # 100 planned by epochs, 30 by the budget
    assert ext.steps_done == 30 and len(lrs) == 30
    assert lrs[0] == pytest.approx(lr)  # warm-up of max(1, 30 // 20) = 1 step
    assert max(lrs) == pytest.approx(lr)
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] < 0.01 * lr  # decays to ~0 at the end of the bounded run, not a third of the way
    assert lrs[15] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 14 / 29)))


def test_max_seconds_stops_after_the_step_that_passes_it(monkeypatch, caplog, tmp_path):
    imgs = _images()
    monkeypatch.setattr(ssl_mod, "_clock", _FakeClock(1.0))
    calls: list[tuple] = []
    cfg = dict(TINY, epochs=4, max_seconds=3.5)  # 20 steps planned; the clock passes 3.5 s within a few
    with caplog.at_level(logging.WARNING, logger="inspector.models.ssl"):
        ext = get_extractor("ssl", **cfg).fit(imgs, cache_dir=tmp_path, progress=lambda *a: calls.append(a))
    assert ext.steps_planned == 20 and 1 <= ext.steps_done < 20
    steps = [c[1] for c in calls]
    assert steps[:-1] == list(range(1, ext.steps_done + 1)) and calls[-1] == ("training", 20, 20)
    assert any("max_seconds=3.5" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert ext.loss_history and all(np.isfinite(ext.loss_history))
    payload = torch.load(ext.weights_path, map_location="cpu", weights_only=True)
    assert payload["steps_done"] == ext.steps_done and payload["steps_planned"] == 20
    assert payload["max_seconds"] == 3.5
    # the cap is not in the weight key (a capped run is not reproducible across machines) ...
    key = ext.weights_key(imgs)
    assert get_extractor("ssl", **dict(cfg, max_seconds=0)).weights_key(imgs) == key
    assert get_extractor("ssl", **dict(cfg, max_seconds=100)).weights_key(imgs) == key
    assert get_extractor("ssl", **dict(cfg, max_steps=19)).weights_key(imgs) != key
    # ... so the truncated file is reused under the same or a smaller cap, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inspector.models.ssl"):
        again = get_extractor("ssl", **dict(cfg, max_seconds=2.0)).fit(imgs, cache_dir=tmp_path)
    assert again.from_cache and again.steps_done == ext.steps_done
    assert again._weights_hash() == ext._weights_hash()
    assert any("were cut at" in r.getMessage() for r in caplog.records)
    # ... and retrained in full when the cap is lifted (no silent reuse of the truncated weights)
    full = get_extractor("ssl", **dict(cfg, max_seconds=0)).fit(imgs, cache_dir=tmp_path)
    assert not full.from_cache and full.steps_done == 20
    assert full._weights_hash() != ext._weights_hash()
    # the complete run then serves any cap, however small
    small = get_extractor("ssl", **dict(cfg, max_seconds=0.5)).fit(imgs, cache_dir=tmp_path)
    assert small.from_cache and small.steps_done == 20 and small._weights_hash() == full._weights_hash()
    # the embedding fingerprint follows the weights, not the cap
    assert small.fingerprint() == full.fingerprint()


def test_max_seconds_zero_disables_and_a_loose_cap_changes_nothing(monkeypatch):
    imgs = _images()
    ref = _fit(imgs, max_seconds=0)
    monkeypatch.setattr(ssl_mod, "_clock", _FakeClock(1000.0))
    assert _fit(imgs, max_seconds=0).steps_done == 15  # a slow clock, no cap
    monkeypatch.setattr(ssl_mod, "_clock", _FakeClock(1e-6))
    loose = _fit(imgs, max_seconds=240)
    assert loose.steps_done == 15
    _assert_same_weights(loose.model, ref.model)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100"])
def test_max_steps_validation(bad):
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1.*got .*Use e\.g\. max_steps=1500"):
        SslConfig(max_steps=bad)


@pytest.mark.parametrize("bad", [-1.0, -0.001, float("nan")])
def test_max_seconds_validation(bad):
    with pytest.raises(ValueError, match=r"max_seconds must be >= 0.*got .*max_seconds=0 to disable"):
        SslConfig(max_seconds=bad)
    with pytest.raises(ValueError, match="max_seconds must be a number"):
        SslConfig(max_seconds="240")


def test_defaults_and_config_fields():
    cfg = SslConfig()
    assert cfg.max_steps == 1500 and cfg.max_seconds == 240.0
    assert SslConfig(max_steps=np.int64(7)).max_steps == 7 and type(SslConfig(max_steps=np.int64(7)).max_steps) is int
    assert SslConfig(max_seconds=0).max_seconds == 0.0
    d = cfg.to_dict()
    assert d["max_steps"] == 1500 and d["max_seconds"] == 240.0
    assert "max_steps" in ssl_mod._TRAIN_FIELDS and "max_seconds" not in ssl_mod._TRAIN_FIELDS
