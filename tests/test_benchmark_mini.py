"""A small, fast, seeded version of the detection benchmark (benchmarks/detection.py).

It builds a small real-MRI benchmark (a stratified subset of the sample-data slices, slice-level split),
scores copies under the clean, flip and rotation conditions with the library's own code paths, and fails
when the default mode (``AuditConfig()`` defaults, whatever extractor they name) falls below ROC-AUC 0.95.
It also checks that the benchmark can tell a bad method from a good one (the paper's method with pixel
features is near chance on flipped copies), that the data obey their rules, that the benchmark's
per-slice scores are exactly what ``inspector.pipeline.audit`` returns, and the fast ranking metrics against
scikit-learn.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from benchmarks.data import (
    BenchmarkDataError,
    draw_g,
    load_bank,
    make_copies,
    make_split,
)
from benchmarks.detection import BenchConfig, evaluate, ranking_metrics, score_seed
from inspector.config import AuditConfig
from inspector.types import Cohort, Slice

SEED = 0
CONDITIONS = ("none", "hflip", "vflip", "rotate_5")
N_SLICES = 100  # stratified subset of the 321 sample-data slices
N_G = 20  # fixed size of G
ALPHA = 0.05  # the mini holdout (~45 slices) cannot reach p <= 0.01; only the calibration check needs it


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(bank, split, run, per_g) of the mini benchmark, computed once for the module."""
    bank = load_bank().sample(N_SLICES, SEED)
    split = make_split(bank, "slice", SEED, alpha=ALPHA)
    default = AuditConfig().extractor
    backbones = tuple(dict.fromkeys(["pixels", default]))
    bc = BenchConfig(
        seeds=(SEED,),
        splits=("slice",),
        conditions=CONDITIONS,
        backbones=backbones,
        default_backbones=(default,),
        n_g=N_G,
        n_draws=1,
        feature_ablations=False,
        baselines=False,
        cache_dir=tmp_path_factory.mktemp("cache"),
    )
    run = score_seed(bank, split, bc, conditions=CONDITIONS)
    per_g, novel = evaluate(run, bc, ALPHA)
    return bank, split, bc, run, per_g, novel


def _auc(run, method: str, cond: str) -> float:
    m = run.methods[method]
    y = np.r_[np.zeros(len(m.unseen)), np.ones(len(m.copies[cond]))]
    return roc_auc_score(y, np.r_[m.unseen, m.copies[cond]])


# ------------------------------------------------------------------------------------------- data rules
def test_data_rules(mini):
    bank, split, bc, run, _, _ = mini
    assert len(bank) == pytest.approx(N_SLICES, abs=6)
    assert len(set(bank.acquisition)) >= 4, "the benchmark must mix several acquisitions"
    assert not set(split.train) & set(split.unseen)
    for f in range(split.n_folds):
        assert not set(split.holdout(f)) & set(split.novel(f))
    # >= 3 slices apart within a volume and axis, whatever the split
    for key in {bank.stratum(i) for i in range(len(bank))}:
        idx = np.sort([bank.slice_index[i] for i in range(len(bank)) if bank.stratum(i) == key])
        assert (np.diff(idx) >= 3).all(), key
    # copies: "none" is the source itself; hflip copies never come from a mirror-symmetric slice and
    # are never identical to their source (which would make the condition "none" in disguise)
    none = make_copies(bank, split, "none", 8, SEED)
    assert_allclose(none.images, bank.images[none.source])
    hf = make_copies(bank, split, "hflip", 8, SEED)
    assert not bank.mirror[hf.source].any()
    diff = np.abs(hf.images - bank.images[hf.source]).mean(axis=(1, 2))
    # real brains are only nearly symmetric (mean |hflip - source| ~ 0.01-0.1); the template's mirror
    # slices would give ~1e-7
    assert (diff > 0.003).all(), diff
    # the symmetric template's axial/coronal slices really are their own mirror image
    m = np.flatnonzero(bank.mirror)
    assert len(m) > 0
    assert np.abs(bank.images[m] - bank.images[m][:, :, ::-1]).mean() < 0.02


def test_split_errors():
    bank = load_bank().sample(60, 1)
    with pytest.raises(BenchmarkDataError, match="holdout"):
        make_split(bank, "slice", 0, alpha=0.01)  # 60 slices cannot give a 99-slice holdout
    with pytest.raises(BenchmarkDataError, match="Unknown split"):
        make_split(bank, "patient", 0, alpha=0.2)


def test_g_sets_have_fixed_size_and_rate(mini):
    _, split, bc, run, _, _ = mini
    for rate in (0.05, 0.15, 0.30, 0.45):
        g = draw_g(split, 0, rate, N_G, run.n_copies, SEED)
        assert g.size == N_G
        assert g.labels.sum() == max(1, round(rate * N_G))
        assert set(g.novel) <= set(split.novel(0))


# ------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("cond", CONDITIONS)
def test_default_mode_detects_copies(mini, cond):
    *_, run, per_g, _ = mini
    method = f"default/{AuditConfig().extractor}"
    auc = _auc(run, method, cond)
    assert auc >= 0.95, f"default mode ({method}) ROC-AUC {auc:.3f} < 0.95 under {cond}"
    # and on the synthetic sets G of every rate
    g = per_g[(per_g["method"] == method) & (per_g["condition"] == cond)]
    assert len(g) > 0 and g["auc"].mean() >= 0.95


def test_paper_mode_with_pixels_fails_on_flips(mini):
    """The benchmark separates methods: the paper's top-1 matching of pixel features misses flipped copies."""
    *_, run, _, _ = mini
    for cond in ("hflip", "vflip"):
        paper = _auc(run, "paper/pixels", cond)
        default = _auc(run, f"default/{AuditConfig().extractor}", cond)
        assert paper < 0.8, f"paper/pixels AUC {paper:.3f} under {cond}: flipped copies should defeat it"
        assert default - paper > 0.15
    # while clean copies are found by both
    assert _auc(run, "paper/pixels", "none") > 0.95


def test_default_mode_false_positive_rate(mini):
    *_, run, _, novel = mini
    d = novel[novel["method"] == f"default/{AuditConfig().extractor}"]
    assert len(d) == len(run.split.unseen)
    # exchangeable novel and holdout slices: P(p <= alpha) <= alpha; ~70 novel slices, allow noise
    assert d["flagged"].mean() <= 3 * ALPHA


def test_benchmark_scores_are_the_audits(mini, tmp_path):
    """The per-slice scores of the benchmark equal what inspector.pipeline.audit returns for the same slices."""
    from inspector.pipeline import audit

    bank, split, bc, run, _, _ = mini
    cfg = dataclasses.replace(AuditConfig(), seed=SEED)
    cond = "hflip"
    copies = make_copies(bank, split, cond, run.n_copies, SEED)
    nov = split.novel(0)[:5]

    def cohort(images, name, subjects):
        pairs = enumerate(zip(images, subjects, strict=True))
        sl = [Slice(a, subject_id=str(s), path=f"{name}/{i:03d}.png") for i, (a, s) in pairs]
        return Cohort(sl, root=tmp_path / name, name=name)

    t = cohort(bank.images[split.train], "train", bank.acquisition[split.train])
    g_imgs = np.concatenate([bank.images[split.unseen[nov]], copies.images[:4]])
    g = cohort(g_imgs, "synthetic", ["g"] * len(g_imgs))
    h_pos = split.holdout(0)[:6]
    h = cohort(bank.images[split.unseen[h_pos]], "holdout", bank.acquisition[split.unseen[h_pos]])
    res = audit(t, g, h, cfg, cache_dir=bc.cache_dir, use_cache=False)
    m = run.methods[f"default/{cfg.extractor}"]
    expect = np.r_[m.unseen[nov], m.copies[cond][:4]]
    assert_allclose(res.table["similarity"].to_numpy(), expect, rtol=1e-5, atol=1e-5)
    assert_allclose(res.null_similarity, m.unseen[h_pos], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- metrics
def test_ranking_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    for _ in range(200):
        m = int(rng.integers(4, 50))
        y = rng.integers(0, 2, m)
        y[:2] = (0, 1)
        s = np.round(rng.random(m) * rng.integers(2, 15))  # many ties
        auc, ap, tpr1 = ranking_metrics(y, s, 0.1)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        assert_allclose([auc, ap, tpr1], [roc_auc_score(y, s), average_precision_score(y, s), tpr[fpr <= 0.1].max()])
    with pytest.raises(ValueError, match="both classes"):
        ranking_metrics(np.ones(4), np.arange(4.0))
