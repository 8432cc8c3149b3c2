"""The audit on a local two-worker Dask cluster gives the single-machine numbers (inspector.cluster)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal

pytest.importorskip("distributed")

from inspector import pipeline  # noqa: E402
from inspector.cli import main  # noqa: E402
from inspector.cluster import ClusterUnavailableError, connect, part_bounds, sharded_knn  # noqa: E402
from inspector.config import AuditConfig  # noqa: E402
from inspector.features import extract  # noqa: E402
from inspector.index import IndexInputError, knn  # noqa: E402
from inspector.matching import MemorizationScorer, concat_match_results  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with connect("local:2") as c:
        yield c


@pytest.fixture
def sent(monkeypatch):
    """The functions Cluster.map_parts ran on the workers, with their number of parts: proves the cluster path
    was taken (an equality with the single-machine run alone would also hold if the executor were ignored)."""
    from inspector.cluster import Cluster

    calls: list[tuple[str, int]] = []
    original = Cluster.map_parts

    def spy(self, fn, shared, parts, **kw):
        calls.append((fn.__name__, len(parts)))
        return original(self, fn, shared, parts, **kw)

    monkeypatch.setattr(Cluster, "map_parts", spy)
    return calls


# ------------------------------------------------------------------------------------------------ parts
@pytest.mark.parametrize(("n", "unit", "parts"), [(10, 3, 2), (256, 64, 4), (1000, 256, 4), (5, 8, 4), (1, 1, 9)])
def test_part_bounds_cover_in_whole_units(n, unit, parts):
    b = part_bounds(n, unit, parts)
    assert b[0][0] == 0 and b[-1][1] == n
    assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    assert len(b) <= parts
    assert all((stop - start) % unit == 0 for start, stop in b[:-1])  # only the last part may be short


def test_part_bounds_empty():
    assert part_bounds(0, 8, 4) == []


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("address", ["localhost", "local:0", "local:x", "http://127.0.0.1:8786", ""])
def test_connect_rejects_bad_addresses(address):
    with pytest.raises(ValueError, match="local:N"):
        connect(address)


def test_connect_unreachable_scheduler():
    with pytest.raises(ClusterUnavailableError, match="dask scheduler"):
        connect("tcp://127.0.0.1:9", timeout=2)


def test_cli_bad_cluster_exits_2_before_loading(tmp_path, capsys, monkeypatch):
    import functools

    import inspector.cluster

    monkeypatch.setattr(inspector.cluster, "connect", functools.partial(connect, timeout=2))
    (tmp_path / "t").mkdir()
    code = main(
        [
            "scan",
            "--train",
            str(tmp_path / "t"),
            "--synthetic",
            str(tmp_path / "t"),
            "--out",
            str(tmp_path / "o"),
            "--cluster",
            "tcp://127.0.0.1:9",
            "--quiet",
        ]
    )
    assert code == 2
    assert "--cluster" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ search
def test_sharded_knn_equals_exact_knn(cluster):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(503, 24)).astype(np.float32)
    query = rng.normal(size=(41, 24)).astype(np.float32)
    want_s, want_i = knn(query, base, 7, metric="cosine", exact=True)
    got_s, got_i = sharded_knn(query, base, 7, cluster, metric="cosine", n_shards=3)
    assert_array_equal(got_i, want_i)
    assert_allclose(got_s, want_s, rtol=0, atol=1e-6)


def test_sharded_knn_leave_group_out_and_small_shards(cluster):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 8)).astype(np.float32)
    query = base[:12] + 0.01 * rng.normal(size=(12, 8)).astype(np.float32)
    bg = np.repeat(np.arange(8), 5).astype(str)
    qg = bg[:12]
    want_s, want_i = knn(query, base, 6, metric="ip", query_groups=qg, base_groups=bg, exact=True)
    got_s, got_i = sharded_knn(query, base, 6, cluster, metric="ip", n_shards=7, query_groups=qg, base_groups=bg)
    assert_array_equal(got_i, want_i)
    assert_allclose(got_s, want_s, rtol=0, atol=1e-6)
    assert not np.isin(got_i[:5], np.arange(5)).any()  # own group excluded


def test_successive_shared_dicts_do_not_collide(cluster):
    """Each sharded_knn shares a dict with the same keys ("query", "k", ...); the second must not see (or lose)
    the first's: a regression of scattering the dict itself, which sent one future per key under its keys."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(60, 6)).astype(np.float32)
    for k in (3, 5, 2):
        query = rng.normal(size=(9, 6)).astype(np.float32)
        want = knn(query, base, k, metric="ip", exact=True)[1]
        assert_array_equal(sharded_knn(query, base, k, cluster, metric="ip", n_shards=4)[1], want)


def test_sharded_knn_errors(cluster):
    with pytest.raises(IndexInputError, match="same d"):
        sharded_knn(np.zeros((2, 3)), np.zeros((4, 5)), 2, cluster)
    with pytest.raises(IndexInputError, match="both"):
        sharded_knn(np.ones((2, 3)), np.ones((4, 3)), 2, cluster, query_groups=np.zeros(2))


# ------------------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("name", ["pixels", "ssl"])
def test_extraction_on_cluster_equals_local(cluster, name, tmp_path, sent):
    rng = np.random.default_rng(2)
    images = rng.random((150, 48, 48)).astype(np.float32)
    kw = {"width": 4, "epochs": 1, "max_steps": 2, "batch_size": 32} if name == "ssl" else {"batch_size": 32}
    local = extract(images, name, views=("id", "hflip"), cache_dir=tmp_path / "a", use_cache=False, **kw)
    seen = []
    remote = extract(
        images,
        name,
        views=("id", "hflip"),
        cache_dir=tmp_path / "a",
        use_cache=False,
        executor=cluster,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
        **kw,
    )
    for view in local.views:
        for layer, arr in local.views[view].items():
            assert_array_equal(remote.views[view][layer], arr)
    assert ("extracting:id", 150, 150) in seen
    assert sent == [("_extract_part", 3), ("_extract_part", 3)]  # each view: 150 slices = 5 batches of 32, 3 parts


# ------------------------------------------------------------------------------------------------ scoring
def test_concat_match_results_pads_candidates():
    from inspector.align import Alignment
    from inspector.matching import MatchResult

    def res(m, width, start):
        return MatchResult(
            similarity=np.arange(start, start + m, dtype=np.float32),
            feature_similarity=np.zeros(m, np.float32),
            layer_similarity=np.zeros((m, 1), np.float32),
            nearest=np.arange(m),
            view=np.array(["id"] * m, dtype=object),
            neighbours={"a": np.zeros((m, 2), np.int64)},
            neighbour_sims={"a": np.zeros((m, 2), np.float32)},
            margin=np.zeros(m, np.float32),
            alignment=Alignment(
                np.zeros(m), np.zeros(m), np.ones(m), np.zeros((m, 2)), ["id"] * m, train_index=np.arange(m)
            ),
            candidates=np.ones((m, width), np.int64),
        )

    out = concat_match_results([res(3, 2, 0), res(2, 4, 3)])
    assert_array_equal(out.similarity, np.arange(5))
    assert out.candidates.shape == (5, 4) and (out.candidates[:3, 2:] == -1).all()
    assert out.alignment.ncc.shape == (5,) and out.alignment.overlap is None
    with pytest.raises(ValueError, match="at least one"):
        concat_match_results([])


def test_scorer_pickles_without_its_executor(cluster):
    import pickle

    rng = np.random.default_rng(3)
    s = MemorizationScorer(rerank=False, executor=cluster).fit({"a": rng.normal(size=(20, 4))})
    s.holdout_result_ = "big"
    back = pickle.loads(pickle.dumps(s))
    assert back.executor is None and not hasattr(back, "holdout_result_")
    assert s.executor is cluster


CHUNK = 8  # registration chunk of both runs, so that a 16-query set is cut into parts on the cluster


@pytest.fixture(scope="module")
def small_chunks():
    original = pipeline.make_matcher

    def with_chunk(cfg, **kw):
        m = original(cfg, **kw)
        if isinstance(m, MemorizationScorer):
            m.chunk = CHUNK
        return m

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "make_matcher", with_chunk)
    yield
    mp.undo()


COLUMNS = [
    "similarity",
    "p_value",
    "mi",
    "mi_z",
    "oni",
    "flagged",
    "nearest_train_path",
    "nearest_train_slice",
    "view",
    "feature_similarity",
]


def _frame(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in COLUMNS if c in table.columns]].reset_index(drop=True)


@pytest.fixture(scope="module")
def single_holdout(audit_cohorts, tmp_path_factory, small_chunks):
    p = audit_cohorts
    return pipeline.audit(
        p["train"],
        p["synthetic"],
        p["holdout"],
        AuditConfig(extractor="pixels"),
        cache_dir=tmp_path_factory.mktemp("c"),
    )


@pytest.mark.parametrize("holdout", [True, False], ids=["holdout", "leave-one-subject-out"])
def test_audit_on_cluster_equals_single_machine(
    audit_cohorts, tmp_path, cluster, small_chunks, holdout, single_holdout, sent
):
    p = audit_cohorts
    cfg = AuditConfig(extractor="pixels")
    h = p["holdout"] if holdout else None
    single = single_holdout
    if not holdout:
        single = pipeline.audit(p["train"], p["synthetic"], h, cfg, cache_dir=tmp_path / "c1")
    seen: list[tuple[str, int, int]] = []
    spread = pipeline.audit(
        p["train"],
        p["synthetic"],
        h,
        cfg,
        cache_dir=tmp_path / "c2",
        cluster=cluster,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert len(single.table) > CHUNK
    pd.testing.assert_frame_equal(_frame(spread.table), _frame(single.table), check_exact=True)
    assert_array_equal(spread.calibration.null, single.calibration.null)
    assert spread.verdict == single.verdict
    assert spread.audit_id == single.audit_id
    assert any(stage == "aligning:synthetic" and done == total for stage, done, total in seen)
    scored = [n for fn, n in sent if fn == "_score_part"]
    assert len(scored) >= 2 and all(n >= 2 for n in scored)  # synthetic and null queries, each in parts


def test_cli_scan_on_local_cluster(audit_cohorts, tmp_path, small_chunks, single_holdout, sent):
    p = audit_cohorts
    single = single_holdout
    out = tmp_path / "out"
    code = main(
        [
            "scan",
            "--train",
            str(p["train"]),
            "--synthetic",
            str(p["synthetic"]),
            "--holdout",
            str(p["holdout"]),
            "--extractor",
            "pixels",
            "--cache-dir",
            str(tmp_path / "c2"),
            "--out",
            str(out),
            "--quiet",
            "--cluster",
            "local:2",
        ]
    )
    assert code == 0
    assert any(fn == "_score_part" for fn, _ in sent)
    scores = pd.read_csv(out / "scores.csv")
    assert_allclose(scores["similarity"].to_numpy(), single.table["similarity"].to_numpy(), rtol=0, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit_id"] == single.audit_id
